"""`qkdsat payload` against the real firmware on its pty: clear output, downloads into
PASS_DIR/satellite/ with products.json, exit codes 1 (rejected/link) and 2 (bad input),
and the maintenance telecommand, which opens a code-update session and no REPL."""

import json

import pytest
from linkhelpers import KEY, PRODUCT_KEY, product_set, qemu_payload, unix_payload

from emulator.payload_run import COMMAND_TIMEOUT_S
from host.cli import main
from host.link.client import PayloadClient


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "payload.key"
    path.write_text(KEY.hex() + "\n")  # hex text is accepted as well as raw bytes
    return path


def _qkdsat(port, key_file, tmp_path, *action):
    return main(
        ["payload", "--port", port, "--key", str(key_file)]
        + ["--counter-file", str(tmp_path / "counter"), *action]
    )


def test_status_list_download_delete(tmp_path, key_file, capsys):
    products = product_set(20, {"patterns.qrec": 5000, "tdc.qrec": 300})
    product_key = tmp_path / "product.key"
    product_key.write_text(PRODUCT_KEY.hex())
    with unix_payload(tmp_path, products, product_key=PRODUCT_KEY) as target:
        port = target.ground_port
        assert _qkdsat(port, key_file, tmp_path, "status", "--json") == 0
        status = json.loads(capsys.readouterr().out)
        assert _qkdsat(port, key_file, tmp_path, "status") == 0  # aligned text for people
        rows = [line.split() for line in capsys.readouterr().out.splitlines()]
        assert ["key", "provisioned"] in rows
        assert status["key"] == "provisioned" and status["version"].startswith("qkdsat-fw")
        assert _qkdsat(port, key_file, tmp_path, "list") == 0
        out = capsys.readouterr().out
        assert "patterns.qrec" in out and "2 products, 5300 bytes" in out
        pass_dir = tmp_path / "pass"
        # the pattern product is served sealed: without the product key, a clear refusal
        assert _qkdsat(port, key_file, tmp_path, "download", str(pass_dir)) == 1
        assert "give the product key" in capsys.readouterr().err
        with_product_key = ("--product-key", str(product_key), "download", str(pass_dir))
        assert _qkdsat(port, key_file, tmp_path, *with_product_key) == 0
        out = capsys.readouterr().out
        assert "CRC-32" in out and "verified" in out
        assert "patterns.qrec: 5000 bytes, sealed (AES-256-GCM)" in out
        for name, data in products.items():
            assert (pass_dir / "satellite" / name).read_bytes() == data
        listing = json.loads((pass_dir / "satellite" / "products.json").read_text())
        assert {p["name"]: p["bytes"] for p in listing["products"]} == {
            "patterns.qrec": 5000,
            "tdc.qrec": 300,
        }
        assert _qkdsat(port, key_file, tmp_path, "list", "--json") == 0
        listed = json.loads(capsys.readouterr().out)
        assert {p["name"] for p in listed} == {"patterns.qrec", "tdc.qrec"}
        assert _qkdsat(port, key_file, tmp_path, "delete", "tdc.qrec", "--json") == 0
        assert json.loads(capsys.readouterr().out) == {"deleted": "tdc.qrec"}
        assert _qkdsat(port, key_file, tmp_path, "time", "2026-11-27T10:00:00Z") == 0
        capsys.readouterr()
        # rejections and bad input: exit 1 with the payload's reason, exit 2 naming what
        assert _qkdsat(port, key_file, tmp_path, "delete", "tdc.qrec") == 1
        assert "rejected by the payload (product" in capsys.readouterr().err
        assert _qkdsat(port, key_file, tmp_path, "config", "--set", "rep_rate_hz=1e8") == 1
        assert "unknown key 'rep_rate_hz'" in capsys.readouterr().err  # the data path says why
        assert _qkdsat(port, key_file, tmp_path, "download", str(pass_dir), "nope.qrec") == 2
        assert "nope.qrec" in capsys.readouterr().err
    bad_key = tmp_path / "short.key"
    bad_key.write_bytes(b"123")
    assert _qkdsat("/dev/null", bad_key, tmp_path, "status") == 2
    assert "short.key: 3 bytes" in capsys.readouterr().err
    assert _qkdsat(str(tmp_path / "no-such-port"), key_file, tmp_path, "status") == 2
    assert "no-such-port" in capsys.readouterr().err


# What an operator would type at a REPL to take the keys: at the friendly prompt, then in
# raw REPL mode (Ctrl-A ... Ctrl-D, what mpremote and RawRepl send), after Ctrl-C twice.
_REPL_INPUT = (
    b"\r\x03\x03print(open('/flash/link/product_key','rb').read())\r\n"
    b"import machine\r\nprint(machine.mem32[0x20000000])\r\n"
    b"\r\x01print(open('/flash/link/product_key','rb').read())\x04"
)


@pytest.mark.qemu
def test_maintenance_opens_no_repl_and_no_key_comes_back_over_the_link(tmp_path, key_file, capsys):
    with qemu_payload({}, product_key=PRODUCT_KEY) as target:
        assert _qkdsat(target.ground_port, key_file, tmp_path, "maintenance") == 0
        assert "no REPL" in capsys.readouterr().out
        counter_file = tmp_path / "counter"
        with PayloadClient(
            target.ground_port, KEY, counter_file=counter_file, timeout_s=COMMAND_TIMEOUT_S
        ) as payload:
            received = bytearray()  # every byte the port gives, frames and anything else
            read = payload.link.serial.read

            def read_and_keep(size=1):
                chunk = read(size)
                received.extend(chunk)
                return chunk

            payload.link.serial.read = read_and_keep
            payload.link.write(_REPL_INPUT)
            # A ping sent after the probe and answered proves the probe was read and
            # handled first (the link is read in order): a fixed listening window (3 s
            # before) could end before a slow, loaded emulator's REPL answered. A REPL
            # would also have taken the ping's bytes: no answer, the test fails.
            assert payload.ping().startswith("qkdsat-fw")
        answer = bytes(received)
        for secret in (PRODUCT_KEY, repr(PRODUCT_KEY).encode(), KEY, repr(KEY).encode()):
            assert secret not in answer
        for prompt in (b">>>", b"raw REPL", b"Traceback"):
            assert prompt not in answer, answer
        # the application still serves the link, authenticated (the input was garbage to
        # its frame reader, counted and dropped)
        assert _qkdsat(target.ground_port, key_file, tmp_path, "ping") == 0
        assert "qkdsat-fw" in capsys.readouterr().out
