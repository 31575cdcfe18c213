"""`qkdsat payload` against the real firmware on its pty: clear output, downloads into
PASS_DIR/satellite/ with products.json, exit codes 1 (rejected/link) and 2 (bad input),
and the maintenance telecommand that hands UART0 to the REPL on QEMU."""

import json

import pytest
from linkhelpers import KEY, PRODUCT_KEY, product_set, qemu_payload, unix_payload

from host.cli import main
from host.deploy.raw_repl import RawRepl


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


@pytest.mark.qemu
def test_maintenance_telecommand_hands_the_port_to_the_repl(tmp_path, key_file, capsys):
    with qemu_payload({}) as target:
        assert _qkdsat(target.ground_port, key_file, tmp_path, "maintenance") == 0
        assert "REPL" in capsys.readouterr().out
        with RawRepl(target.ground_port, timeout_s=10.0) as repl:
            assert repl.exec("import board\nprint(board.NAME)").strip() == "qemu"
