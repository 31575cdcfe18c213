"""`qkdsat flash` against the QEMU target's pty: from a running application (stopped by
the maintenance telecommand), deploy .mpy files with mpremote, provision a link key,
verify every file, then run the deployed firmware and command it with the new key."""

import time

import pytest
from linkhelpers import KEY, qemu_payload

from emulator.payload_run import COMMAND_TIMEOUT_S
from emulator.targets import UnixTarget
from host.cli import main
from host.deploy.raw_repl import RawRepl
from host.link.client import LinkError, PayloadClient
from host.protocol import ccsds

_RUN_DEPLOYED = (
    "import sys\n"
    "for m in [m for m in sys.modules if m == 'board' or m.startswith('payload')]:\n"
    "    del sys.modules[m]\n"
    "sys.path.insert(0, '/flash')\n"
    "import board\n"
    "from payload import app\n"
    "print('RUNNING', app.__file__)\n"
    "app.run(board)\n"
)


@pytest.mark.qemu
@pytest.mark.slow
def test_flash_from_a_running_payload_then_command_it_with_the_new_key(tmp_path, capsys):
    old_key = tmp_path / "old.key"
    old_key.write_bytes(KEY)
    next_key = bytes(range(200, 232))
    new_key = tmp_path / "payload.key"
    new_key.write_bytes(next_key)
    with qemu_payload({}, key=KEY) as target:  # provisioned, running the application
        port = target.ground_port
        # the application is stopped by the (armed) maintenance TC; the wrong board is
        # refused
        assert main(["flash", "--port", port, "--key", str(old_key), "--board", "unix"]) == 2
        assert "runs board module 'qemu'" in capsys.readouterr().err
        code = main(["flash", "--port", port, "--provision-key", str(new_key)])
        out = capsys.readouterr()
        assert code == 0, out.err
        assert "SHA-256 of every file verified" in out.out and "/flash" in out.out
        repl = RawRepl(port, timeout_s=10.0)
        repl.enter()
        repl.serial.write(_RUN_DEPLOYED.encode() + b"\x04")
        repl._read_until(b"OK", 5.0)
        started = repl._read_until(b"\n", 10.0)
        assert b"RUNNING /flash/payload/app.mpy" in started, started
        repl.close()
        # Before it answers, the deployed application mounts littlefs and imports its
        # .mpy modules through the NOR-chip model; QEMU runs this without -icount, so on
        # a loaded machine it took over the client's default 3 s (CI at 1af35ce, load 11)
        with PayloadClient(port, next_key, timeout_s=COMMAND_TIMEOUT_S) as payload:
            started_s = time.monotonic()
            hk = payload.housekeeping()
            print(f"deployed application answered in {time.monotonic() - started_s:.2f} s")
            assert hk["key"] == "provisioned" and hk["version"].endswith("qemu")
        for wrong in (ccsds.DEVELOPMENT_KEY, KEY):  # the public key, the replaced key
            with PayloadClient(port, wrong, timeout_s=2.0) as intruder:
                with pytest.raises(LinkError, match="no answer"):
                    intruder.ping()  # rejected, and the rejection is tagged with the real key
                assert intruder.unauthenticated_packets >= 1


def test_flash_refuses_clearly_without_a_repl_or_a_key(tmp_path, capsys):
    with UnixTarget(storage_dir=tmp_path) as target:  # running the application
        assert main(["flash", "--port", target.ground_port]) == 1
    assert "no REPL" in capsys.readouterr().err
