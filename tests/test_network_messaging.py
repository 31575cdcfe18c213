"""`qkdsat send` / `receive`: an image from A to B arrives bit-identical, an altered
message is rejected, the pad bits are gone from both pools, a short pool is refused."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from network_keys import distilled

from host.cli import main as qkdsat
from host.network import messaging
from host.network.messaging import AES_GCM
from host.network.pool import SATELLITE, StationPool, fill_pair, pool_path
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
    """Beijing and Stellenbosch share 40000 relayed bytes: 20000 for messages from each."""
    net = tmp_path / "net"
    distilled(tmp_path / "a", 8 * 82_000, "pass-a")  # the satellite's half relays
    distilled(tmp_path / "b", 8 * 82_000, "pass-b")
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
    assert "holds 160000 bits for messages from Beijing, the message needs 800128" in err
    assert "nothing was taken" in err
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


def _rewrite_header(message: Path, out: Path, edit) -> None:
    """`out` = `message` with its header edited by `edit(header)` (the head rewritten by
    the product's writer, the body and tag kept): a forger's rewrite."""
    data = message.read_bytes()
    header, head_bytes = messaging.unpack_head(data)
    edit(header)
    out.write_bytes(messaging.pack_head(header) + data[head_bytes:])


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
    _rewrite_header(message, message, lambda header: header.pop(drop))
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

    def claim_30000_bytes(header):
        header["plaintext_bytes"] = 30_000
        header["pool_bytes"] = 30_000 + (AUTH_BYTES if cipher != AES_GCM else 0)
        if cipher == AES_GCM:
            header["pool_bytes"] = 32

    _rewrite_header(message, message, claim_30000_bytes)
    assert qkdsat(["receive", "--network", str(net), "--at", "Stellenbosch", str(message),
                   "--out", str(tmp_path / "out")]) == 3  # fmt: skip
    assert _used(net, "Stellenbosch", "Beijing") == 0
    assert not (tmp_path / "out").exists()


ROOT = Path(__file__).resolve().parents[1]


def _qkdsat_process(*args: str) -> subprocess.Popen:
    """`qkdsat ARGS` as its own process (the broken console-script shebang avoided)."""
    return subprocess.Popen(
        [sys.executable, "-m", "host.cli", *args], cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _pad(message: bytes, plaintext: bytes) -> bytes:
    """What an eavesdropper who knows the file learns: ciphertext xor plaintext."""
    _, head_bytes = messaging.unpack_head(message)
    ciphertext = message[head_bytes : head_bytes + len(plaintext)]
    return bytes(c ^ p for c, p in zip(ciphertext, plaintext, strict=True))


def _assert_disjoint(ranges: list[tuple[int, int]]) -> None:
    ordered = sorted(ranges)
    for (start, end), (next_start, _) in zip(ordered, ordered[1:], strict=False):
        assert start < end <= next_start, f"pool bytes used twice: {ordered}"


@pytest.mark.slow  # ~10 s: four qkdsat processes
def test_messages_crossing_in_both_directions_never_share_a_pad(net, tmp_path):
    """Beijing and Stellenbosch send to each other at the same time, two rounds, each
    send its own process: no byte of pad serves two messages (found by where each pad,
    ciphertext xor the known file, lies in the pair's pool), and every message arrives.
    Before the pools were split by direction both ends took from offset 0: one pad hid
    two files (C1 xor C2 = P1 xor P2) and both were refused at reception as replays."""
    sends = []
    for round_number in range(2):
        running = []
        for sender, receiver in (("Beijing", "Stellenbosch"), ("Stellenbosch", "Beijing")):
            plain = tmp_path / f"{sender}-{round_number}.bin"
            plain.write_bytes(os.urandom(700 + 100 * round_number))
            message = tmp_path / f"{sender}-{round_number}.msg"
            running.append(_qkdsat_process(
                "send", "--network", str(net), "--from", sender, "--to", receiver, str(plain),
                "--out", str(message)))  # fmt: skip
            sends.append((receiver, plain, message))
        for process in running:
            assert process.wait(timeout=120) == 0, process.stderr.read()
    pool = pool_path(net, "Beijing", "Stellenbosch").read_bytes()
    assert pool == pool_path(net, "Stellenbosch", "Beijing").read_bytes()
    ranges = []
    for _, plain, message in sends:
        pad = _pad(message.read_bytes(), plain.read_bytes())
        start = pool.find(pad)
        assert start >= 0 and pool.find(pad, start + 1) < 0
        ranges.append((start, start + len(pad) + AUTH_BYTES))  # the pad, then its tag key
    _assert_disjoint(ranges)
    for receiver, plain, message in sends:
        out = tmp_path / f"{message.name}.out"
        assert qkdsat(["receive", "--network", str(net), "--at", receiver, str(message),
                       "--out", str(out)]) == 0  # fmt: skip
        assert out.read_bytes() == plain.read_bytes()


def test_a_send_killed_after_taking_its_pad_then_resent_reuses_no_byte(net, tmp_path):
    """The attacker's view: Beijing's send is SIGKILLed as soon as its usage record moves
    (its pad reserved, its message perhaps written and intercepted), Beijing sends the
    file again and Stellenbosch sends to Beijing. The resent pad lies beyond the killed
    send's, and Stellenbosch's pad lies apart from both (before, Stellenbosch took the
    killed send's bytes again: its record had not moved), and the resent message arrives."""
    plain, answer = tmp_path / "image.bin", tmp_path / "answer.bin"
    plain.write_bytes(os.urandom(5000))
    answer.write_bytes(os.urandom(3000))
    record = Path(f"{pool_path(net, 'Beijing', 'Stellenbosch')}.used")
    before = record.stat().st_ino
    send = ["send", "--network", str(net), "--from", "Beijing", "--to", "Stellenbosch",
            str(plain)]  # fmt: skip
    killed = _qkdsat_process(*send, "--out", str(tmp_path / "killed.msg"))
    deadline = time.monotonic() + 60
    while record.stat().st_ino == before and time.monotonic() < deadline:
        time.sleep(0.0005)  # the take replaces the record (renamed into place)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert record.stat().st_ino != before, "the send never took its pad"
    resent, answered = tmp_path / "resent.msg", tmp_path / "answer.msg"
    assert qkdsat([*send, "--out", str(resent)]) == 0
    assert qkdsat(["send", "--network", str(net), "--from", "Stellenbosch", "--to", "Beijing",
                   str(answer), "--out", str(answered)]) == 0  # fmt: skip
    pool = pool_path(net, "Beijing", "Stellenbosch").read_bytes()
    resent_at = pool.find(_pad(resent.read_bytes(), plain.read_bytes()))
    answer_at = pool.find(_pad(answered.read_bytes(), answer.read_bytes()))
    assert resent_at > 0 and answer_at >= 0
    # the killed send took Beijing's first bytes: everything before the resent pad
    ranges = [(0, resent_at), (resent_at, resent_at + 5000 + AUTH_BYTES),
              (answer_at, answer_at + 3000 + AUTH_BYTES)]  # fmt: skip
    if (tmp_path / "killed.msg").exists():  # written before the kill: intercepted
        assert pool.find(_pad((tmp_path / "killed.msg").read_bytes(), plain.read_bytes())) == 0
    _assert_disjoint(ranges)
    out = tmp_path / "received.bin"
    assert qkdsat(["receive", "--network", str(net), "--at", "Stellenbosch", str(resent),
                   "--out", str(out)]) == 0  # fmt: skip
    assert out.read_bytes() == plain.read_bytes()


def test_a_message_to_the_satellite_and_a_relay_never_share_a_pad(net, tmp_path):
    """Beijing sends to the satellite over their pair, then (before the satellite has
    received it) the satellite relays from its pool for Beijing: the relayed key and the
    message's pad lie apart in that pool. Before, the satellite took the pad's bytes as
    K_A (its record had not moved), and Beijing refused the relay as a replay after the
    satellite had used them."""
    plain = tmp_path / "telemetry.bin"
    plain.write_bytes(os.urandom(600))
    message = tmp_path / "to-satellite.msg"
    send = _qkdsat_process("send", "--network", str(net), "--from", "Beijing", "--to",
                           SATELLITE, str(plain), "--out", str(message))  # fmt: skip
    assert send.wait(timeout=120) == 0, send.stderr.read()
    relayed_before = pool_path(net, "Beijing", "Stellenbosch").stat().st_size
    relay(net, "Beijing", "Stellenbosch", 8 * 600)
    pool = pool_path(net, "Beijing", SATELLITE).read_bytes()
    relayed = pool_path(net, "Beijing", "Stellenbosch").read_bytes()[relayed_before:]
    pad = _pad(message.read_bytes(), plain.read_bytes())
    key_at, pad_at = pool.find(relayed), pool.find(pad)
    assert key_at >= 0 and pad_at >= 0
    _assert_disjoint([(key_at, key_at + len(relayed) + AUTH_BYTES),
                      (pad_at, pad_at + len(pad) + AUTH_BYTES)])  # fmt: skip
    out = tmp_path / "at-satellite.bin"
    assert qkdsat(["receive", "--network", str(net), "--at", SATELLITE, str(message),
                   "--out", str(out)]) == 0  # fmt: skip
    assert out.read_bytes() == plain.read_bytes()


@pytest.mark.parametrize("cipher", ["otp-wegman-carter", AES_GCM])
def test_a_forged_message_naming_a_far_pool_offset_burns_nothing(net, tmp_path, cipher):
    """A forger who rewrites a message's pool_offset (lengths consistent, tag not) must not
    make the receiver skip, and lose, the pool bytes up to that offset: the tag is
    checked before the pool moves. Before, the receiver took the bytes first: 10,000
    bytes of its pool were gone and the genuine message was then refused as a replay."""
    image = tmp_path / "x"
    image.write_bytes(b"hello, Stellenbosch")
    message = tmp_path / "m"
    assert qkdsat(["send", "--network", str(net), "--from", "Beijing", "--to", "Stellenbosch",
                   str(image), "--out", str(message), "--cipher", cipher]) == 0  # fmt: skip
    forged = tmp_path / "forged"
    _rewrite_header(message, forged, lambda header: header.update(pool_offset=10_000))
    out = tmp_path / "out"
    assert qkdsat(["receive", "--network", str(net), "--at", "Stellenbosch", str(forged),
                   "--out", str(out)]) == 3  # fmt: skip
    assert _used(net, "Stellenbosch", "Beijing") == 0 and not out.exists()
    assert qkdsat(["receive", "--network", str(net), "--at", "Stellenbosch", str(message),
                   "--out", str(out)]) == 0  # fmt: skip
    assert out.read_bytes() == image.read_bytes()
    assert _used(net, "Stellenbosch", "Beijing") == _used(net, "Beijing", "Stellenbosch")


def test_messages_received_out_of_order_are_all_accepted_once(net, tmp_path):
    """Message files travel independently (and the link's attacker may reorder them):
    Beijing sends three files, Stellenbosch receives the third, then the first, then the
    second. Each is accepted once: the later one's take skipped the others' bytes, which
    stay takeable at exactly their offsets until their message comes (they were never
    used at this end), and each replay is refused. Before, the first and second were
    refused as replays ("already used"): genuine messages lost to an ordering."""
    sent = []
    for number in range(3):
        plain, message = tmp_path / f"p{number}", tmp_path / f"m{number}"
        plain.write_bytes(os.urandom(300 + 50 * number))
        assert qkdsat(["send", "--network", str(net), "--from", "Beijing", "--to",
                       "Stellenbosch", str(plain), "--out", str(message)]) == 0  # fmt: skip
        sent.append((plain, message))
    for number in (2, 0, 1):
        plain, message = sent[number]
        out = tmp_path / f"out{number}"
        assert qkdsat(["receive", "--network", str(net), "--at", "Stellenbosch", str(message),
                       "--out", str(out)]) == 0, number  # fmt: skip
        assert out.read_bytes() == plain.read_bytes()
    for number in range(3):  # each once only
        assert qkdsat(["receive", "--network", str(net), "--at", "Stellenbosch",
                       str(sent[number][1]), "--out", str(tmp_path / "again")]) == 2  # fmt: skip
    assert not (tmp_path / "again").exists()
    with StationPool(pool_path(net, "Stellenbosch", "Beijing")) as pool:
        level = pool.level()
    assert level.used_bytes == _used(net, "Beijing", "Stellenbosch") == 3 * 16 + 1050
    assert level.lost_bytes == 0 and level.taken_bytes == level.used_bytes


def _send_one(net, tmp_path, name: str, size: int) -> tuple[Path, Path]:
    plain, message = tmp_path / f"{name}.bin", tmp_path / f"{name}.msg"
    plain.write_bytes(os.urandom(size))
    assert qkdsat(["send", "--network", str(net), "--from", "Beijing", "--to", "Stellenbosch",
                   str(plain), "--out", str(message)]) == 0  # fmt: skip
    return plain, message


def test_a_receive_whose_output_cannot_be_written_can_run_again(net, tmp_path, capsys):
    """The output directory missing (or the disk full): the receive fails with a one-line
    error and its pool does not move, so the same message received again to a good path
    decrypts. Before, the pad was taken first: the message was then refused as a replay,
    lost for good (its sender's pad is gone too)."""
    plain, message = _send_one(net, tmp_path, "image", 2000)
    missing = tmp_path / "no-such-directory" / "image.bin"
    assert qkdsat(["receive", "--network", str(net), "--at", "Stellenbosch", str(message),
                   "--out", str(missing)]) == 2  # fmt: skip
    assert str(missing) in capsys.readouterr().err
    assert _used(net, "Stellenbosch", "Beijing") == 0
    out = tmp_path / "image.out"
    assert qkdsat(["receive", "--network", str(net), "--at", "Stellenbosch", str(message),
                   "--out", str(out)]) == 0  # fmt: skip
    assert out.read_bytes() == plain.read_bytes()


def test_a_send_whose_message_cannot_be_written_takes_nothing(net, tmp_path, capsys):
    """--out in a missing directory: a one-line error naming it, exit 2, and the sender's
    pool untouched. Before, the pad was taken first and the write then failed (a
    traceback, exit 1): the bytes were lost for nothing."""
    plain = tmp_path / "image.bin"
    plain.write_bytes(os.urandom(3000))
    missing = tmp_path / "no-such-directory" / "image.msg"
    assert qkdsat(["send", "--network", str(net), "--from", "Beijing", "--to", "Stellenbosch",
                   str(plain), "--out", str(missing)]) == 2  # fmt: skip
    assert str(missing.parent) in capsys.readouterr().err
    assert _used(net, "Beijing", "Stellenbosch") == 0


@pytest.mark.slow  # ~8 s: four killed qkdsat receive processes
def test_a_receive_killed_at_any_step_delivers_its_file_once_and_never_loses_it(net, tmp_path):
    """SIGKILL `qkdsat receive` at each of its steps in turn (its temporary file made, the
    file in place, the usage record moved, the journal line written); then the same
    message is received again. The file is always there in the end, whole, and the
    message is accepted at most once more (when the kill fell between the file and the
    take), never refused while its file is missing."""
    record = Path(f"{pool_path(net, 'Stellenbosch', 'Beijing')}.used")
    journal = Path(f"{pool_path(net, 'Stellenbosch', 'Beijing')}.journal")
    points = {
        "temporary file made": lambda out: len(list(out.parent.glob(f".{out.name}.*.tmp"))),
        "file in place": lambda out: out.exists(),
        "record moved": lambda out: record.stat().st_ino,
        "journal written": lambda out: journal.stat().st_size,
    }
    for number, (point, watched) in enumerate(points.items()):
        plain, message = _send_one(net, tmp_path, f"image{number}", 8000 // 2**number)
        out = tmp_path / f"out{number}" / "image.bin"
        out.parent.mkdir()
        before = watched(out)
        killed = _qkdsat_process("receive", "--network", str(net), "--at", "Stellenbosch",
                                 str(message), "--out", str(out))  # fmt: skip
        deadline = time.monotonic() + 60
        while watched(out) == before and killed.poll() is None and time.monotonic() < deadline:
            time.sleep(0.0002)
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        assert watched(out) != before, f"the receive never reached: {point}"
        again = qkdsat(["receive", "--network", str(net), "--at", "Stellenbosch",
                        str(message), "--out", str(out)])  # fmt: skip
        assert again in (0, 2), point
        assert out.read_bytes() == plain.read_bytes(), point
        assert qkdsat(["receive", "--network", str(net), "--at", "Stellenbosch",
                       str(message), "--out", str(tmp_path / "again")]) == 2, point  # fmt: skip
