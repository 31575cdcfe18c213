"""`qkdsat send` / `receive`: an image from A to B arrives bit-identical, an altered
message is rejected, the pad bits are gone from both pools, a short pool is refused."""

from __future__ import annotations

import json
import os
import struct
import zlib

import pytest
from network_keys import distilled

from host.cli import main as qkdsat
from host.network.messaging import AES_GCM
from host.network.pool import StationPool, fill_pair, pool_path
from host.network.relay import AUTH_BYTES, relay


def _png(width: int, height: int) -> bytes:
    """A real PNG (noise), as Jinan-1 sent images."""
    raw = b"".join(b"\x00" + os.urandom(3 * width) for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))  # fmt: skip


@pytest.fixture
def net(tmp_path):
    """Beijing and Stellenbosch share 40000 relayed bytes."""
    net = tmp_path / "net"
    distilled(tmp_path / "a", 8 * 41_000, "pass-a")
    distilled(tmp_path / "b", 8 * 41_000, "pass-b")
    fill_pair(net, "Beijing", tmp_path / "a")
    fill_pair(net, "Stellenbosch", tmp_path / "b")
    relay(net, "Beijing", "Stellenbosch", 8 * 40_000)
    return net


def _used(net, holder, peer) -> int:
    with StationPool(pool_path(net, holder, peer)) as pool:
        return pool.used_bytes


def test_an_image_arrives_bit_identical_and_its_pad_is_gone_from_both_pools(net, tmp_path):
    image = tmp_path / "image.png"
    image.write_bytes(_png(64, 48))
    size = image.stat().st_size
    message, received = tmp_path / "image.msg", tmp_path / "received.png"
    assert qkdsat(["send", "--network", str(net), "--from", "Beijing", "--to", "Stellenbosch",
                   str(image), "--out", str(message)]) == 0  # fmt: skip
    assert image.read_bytes()[16:48] not in message.read_bytes()
    assert qkdsat(["receive", "--network", str(net), "--at", "Stellenbosch", str(message),
                   "--out", str(received)]) == 0  # fmt: skip
    assert received.read_bytes() == image.read_bytes()
    assert _used(net, "Beijing", "Stellenbosch") == size + AUTH_BYTES
    assert _used(net, "Stellenbosch", "Beijing") == size + AUTH_BYTES
    # The same message again: its pad is gone, refused.
    assert qkdsat(["receive", "--network", str(net), "--at", "Stellenbosch", str(message),
                   "--out", str(tmp_path / "again.png")]) == 2  # fmt: skip
    assert not (tmp_path / "again.png").exists()


@pytest.mark.parametrize("cipher", ["otp-wegman-carter", AES_GCM])
@pytest.mark.parametrize("where", ["body", "header"])
def test_an_altered_message_is_rejected_and_nothing_written(net, tmp_path, cipher, where):
    image = tmp_path / "image.png"
    image.write_bytes(_png(16, 16))
    message = tmp_path / "image.msg"
    assert qkdsat(["send", "--network", str(net), "--from", "Beijing", "--to", "Stellenbosch",
                   str(image), "--out", str(message), "--cipher", cipher]) == 0  # fmt: skip
    data = bytearray(message.read_bytes())
    if where == "body":
        data[-30] ^= 0x01
    else:
        data[data.index(b'"name": "') + 9] ^= 0x01  # the file name in the header
    message.write_bytes(bytes(data))
    out = tmp_path / "received.png"
    assert qkdsat(["receive", "--network", str(net), "--at", "Stellenbosch", str(message),
                   "--out", str(out)]) == 3  # fmt: skip
    assert not out.exists()


def test_aes_gcm_is_marked_computational_and_uses_32_pool_bytes(net, tmp_path, capsys):
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(100_000))  # larger than the pool: only AES-GCM can carry it
    assert qkdsat(["send", "--network", str(net), "--from", "Beijing", "--to", "Stellenbosch",
                   str(big), "--out", str(tmp_path / "m")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "holds 320000 bits, the message needs 800128" in err and "nothing was taken" in err
    assert _used(net, "Beijing", "Stellenbosch") == 0
    assert qkdsat(["send", "--network", str(net), "--from", "Beijing", "--to", "Stellenbosch",
                   str(big), "--out", str(tmp_path / "m"), "--cipher", AES_GCM]) == 0  # fmt: skip
    assert "computational security" in capsys.readouterr().out
    assert qkdsat(["receive", "--network", str(net), "--at", "Stellenbosch",
                   str(tmp_path / "m"), "--out", str(tmp_path / "r")]) == 0  # fmt: skip
    assert (tmp_path / "r").read_bytes() == big.read_bytes()
    assert _used(net, "Beijing", "Stellenbosch") == _used(net, "Stellenbosch", "Beijing") == 32


def test_stations_without_a_shared_key_are_told_to_relay(net, tmp_path, capsys):
    image = tmp_path / "x"
    image.write_bytes(b"hello")
    assert qkdsat(["send", "--network", str(net), "--from", "Beijing", "--to", "Wuhan",
                   str(image), "--out", str(tmp_path / "m")]) == 2  # fmt: skip
    assert "relay one first" in capsys.readouterr().err


def test_the_decrypted_file_is_private_and_a_planted_symlink_is_not_followed(net, tmp_path):
    """The plaintext is written 0600 through a fresh temporary file: a symlink planted
    under the temporary name (predictable: the pid) neither has its target overwritten
    with the plaintext nor becomes the output."""
    image = tmp_path / "image.png"
    image.write_bytes(_png(16, 16))
    message, received = tmp_path / "image.msg", tmp_path / "received.png"
    assert qkdsat(["send", "--network", str(net), "--from", "Beijing", "--to", "Stellenbosch",
                   str(image), "--out", str(message)]) == 0  # fmt: skip
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"not yours to overwrite")
    (tmp_path / f".received.png.{os.getpid()}.tmp").symlink_to(victim)
    assert qkdsat(["receive", "--network", str(net), "--at", "Stellenbosch", str(message),
                   "--out", str(received)]) == 0  # fmt: skip
    assert victim.read_bytes() == b"not yours to overwrite"
    assert not received.is_symlink() and received.read_bytes() == image.read_bytes()
    assert received.stat().st_mode & 0o777 == 0o600
    assert not (tmp_path / f".received.png.{os.getpid()}.tmp").exists()


@pytest.mark.parametrize("drop", ["to", "from", "pool_offset"])
def test_a_message_missing_a_header_field_is_bad_input_and_takes_nothing(
    net, tmp_path, capsys, drop
):
    """A header without one of its fields is the sender's malformed input: a one-line
    error naming the file (exit 2, not an internal error), and no pool byte taken."""
    image = tmp_path / "x"
    image.write_bytes(b"hello")
    message = tmp_path / "m"
    assert qkdsat(["send", "--network", str(net), "--from", "Beijing", "--to", "Stellenbosch",
                   str(image), "--out", str(message)]) == 0  # fmt: skip
    data = message.read_bytes()
    size = int.from_bytes(data[8:12], "little")
    header = json.loads(data[12 : 12 + size])
    del header[drop]
    encoded = json.dumps(header, sort_keys=True).encode()
    message.write_bytes(data[:8] + len(encoded).to_bytes(4, "little") + encoded
                        + data[12 + size :])  # fmt: skip
    capsys.readouterr()
    assert qkdsat(["receive", "--network", str(net), "--at", "Stellenbosch", str(message),
                   "--out", str(tmp_path / "out")]) == 2  # fmt: skip
    assert "not a qkdsat message" in capsys.readouterr().err
    assert _used(net, "Stellenbosch", "Beijing") == 0
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cipher", ["otp-wegman-carter", AES_GCM])
def test_a_header_claiming_more_bytes_than_the_message_carries_takes_nothing(
    net, tmp_path, cipher
):
    """The header is authenticated only after the pool bytes are taken, so its lengths
    must agree with the file first: otherwise a few forged bytes claiming a large file
    burn that much of the receiver's pool."""
    image = tmp_path / "x"
    image.write_bytes(b"hello")
    message = tmp_path / "m"
    assert qkdsat(["send", "--network", str(net), "--from", "Beijing", "--to", "Stellenbosch",
                   str(image), "--out", str(message), "--cipher", cipher]) == 0  # fmt: skip
    data = message.read_bytes()
    size = int.from_bytes(data[8:12], "little")
    header = json.loads(data[12 : 12 + size])
    header["plaintext_bytes"] = 30_000
    header["pool_bytes"] = 30_000 + (AUTH_BYTES if cipher != AES_GCM else 0)
    if cipher == AES_GCM:
        header["pool_bytes"] = 32
    encoded = json.dumps(header, sort_keys=True).encode()
    message.write_bytes(data[:8] + len(encoded).to_bytes(4, "little") + encoded
                        + data[12 + size :])  # fmt: skip
    assert qkdsat(["receive", "--network", str(net), "--at", "Stellenbosch", str(message),
                   "--out", str(tmp_path / "out")]) == 3  # fmt: skip
    assert _used(net, "Stellenbosch", "Beijing") == 0
    assert not (tmp_path / "out").exists()
