"""`qkdsat flash` both ways onto a board (docs/ground-link.md "Maintenance in flight"):
at the REPL of the maintenance strap (QEMU: .mpy files with mpremote, a link key
provisioned, every file verified, the deployed firmware run and commanded with the new
key), and to a running application over its code-update session (unix: the board then
boots the deployed code, and a module uploaded later replaces its old version)."""

import hashlib
import shutil
import subprocess
import time

import pytest
from linkhelpers import KEY, unix_payload

from emulator.payload_run import COMMAND_TIMEOUT_S
from emulator.targets import (
    FIRMWARE_DIR,
    MICROPYTHON_BIN,
    QemuTarget,
    UnixTarget,
    firmware_version,
)
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
def test_flash_at_the_strap_repl_then_command_it_with_the_new_key(tmp_path, capsys):
    next_key = bytes(range(200, 232))
    new_key = tmp_path / "payload.key"
    new_key.write_bytes(next_key)
    with QemuTarget(boot="maintenance") as target:  # the strap: the REPL on the link
        port = target.ground_port
        # the wrong board is refused
        assert main(["flash", "--port", port, "--board", "unix"]) == 2
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
        for wrong in (ccsds.DEVELOPMENT_KEY, KEY):  # the public key, another key
            with PayloadClient(port, wrong, timeout_s=2.0) as intruder:
                with pytest.raises(LinkError, match="no answer"):
                    intruder.ping()  # rejected, and the rejection is tagged with the real key
                assert intruder.unauthenticated_packets >= 1


def test_flash_refuses_clearly_without_a_repl_or_a_key(tmp_path, capsys):
    with UnixTarget(storage_dir=tmp_path) as target:  # running the application
        assert main(["flash", "--port", target.ground_port]) == 1
    assert "no REPL" in capsys.readouterr().err


def _put(payload, name, offset, data):
    arg = ccsds.name_arg(name) + offset.to_bytes(4, "big") + data
    payload.command("put", ccsds.SVC_FUNCTION, 1, bytes([ccsds.FN_CODE_PUT]) + arg)


def _commit(payload, name, total, digest):
    arg = ccsds.name_arg(name) + total.to_bytes(4, "big") + digest
    payload.command("commit", ccsds.SVC_FUNCTION, 1, bytes([ccsds.FN_CODE_COMMIT]) + arg)


def _boot_from_storage(storage):
    """The unix board booting what is deployed in its storage, as a board runs main.py
    from its filesystem: the script's directory (the storage root) comes first on
    sys.path, so the deployed board module and payload package are the ones imported."""
    return UnixTarget(storage_dir=storage, script=storage / "main.py")


def _ended(target, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while target.running() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not target.running()


@pytest.mark.slow
def test_flash_over_the_code_session_then_a_module_upload_runs_after_reboot(tmp_path, capsys):
    key_file = tmp_path / "payload.key"
    key_file.write_bytes(KEY)
    storage = tmp_path / "flash"
    with unix_payload(tmp_path, {}) as target:  # the application, from firmware/'s unix tree
        port = target.ground_port
        assert main(["flash", "--port", port, "--key", str(key_file), "--reset"]) == 0
        out = capsys.readouterr().out
        assert "over the code-update session" in out and "rebooting" in out, out
        assert _ended(target)  # the reboot: the unix board's reset ends the process
    deployed = sorted(p.relative_to(storage).as_posix() for p in storage.rglob("*.*py"))
    assert "main.py" in deployed and "board.mpy" in deployed
    assert "payload/app.mpy" in deployed and "payload/codeupdate.mpy" in deployed
    assert not (storage / "code.part").exists()
    uploaded = b'FIRMWARE_VERSION = "9.9.9-uploaded"\n'
    with _boot_from_storage(storage) as target:
        with PayloadClient(target.ground_port, KEY, timeout_s=COMMAND_TIMEOUT_S) as payload:
            assert payload.ping() == f"qkdsat-fw {firmware_version()} unix"
            # one module replaced over the session (a .py is imported before a .mpy)
            payload.open_code_session()
            payload.upload_code("payload/version.py", uploaded, chunk_bytes=16)
            payload.activate_code(["payload/version.py"])
            assert payload.ping() == f"qkdsat-fw {firmware_version()} unix"  # until reboot
            payload.reboot()
        assert _ended(target)
    assert (storage / "payload" / "version.py").read_bytes() == uploaded
    with _boot_from_storage(storage) as target:
        with PayloadClient(target.ground_port, KEY, timeout_s=COMMAND_TIMEOUT_S) as payload:
            assert payload.ping() == "qkdsat-fw 9.9.9-uploaded unix"
            # a wrong SHA-256 or a cut-off upload: refused, said why, the old file kept
            payload.open_code_session()
            name = "payload/version.py"
            _put(payload, name, 0, b"broken")
            with pytest.raises(LinkError, match="SHA-256 mismatch, old file kept"):
                _commit(payload, name, 6, hashlib.sha256(b"other").digest())
            _put(payload, name, 0, b"broken")
            with pytest.raises(LinkError, match="6 of 16 bytes staged, old file kept"):
                _commit(payload, name, 16, hashlib.sha256(b"broken" * 2).digest())
            for name in ("link/product_key", "link/key", "../link/key", "/flash/main.py"):
                with pytest.raises(LinkError, match="not a code file name"):
                    payload.upload_code(name, b"x" * 32)
    assert (storage / "payload" / "version.py").read_bytes() == uploaded


# A power cut during the activation, after the journal and `renames` of the set's renames:
# the firmware's own CodeSession.activate, run by the unix port from the deployed storage,
# its os.rename of a `<name>.new` ending the process (as the cut does) once `renames` ran.
_ACTIVATION_CUT = """
import os, sys
sys.path.insert(0, %(root)r)
from payload import codeupdate
class CutAfter:
    def __init__(self, renames):
        self.renames = renames
    def rename(self, source, target):
        if source.endswith(".new"):
            if not self.renames:
                sys.exit(9)
            self.renames -= 1
        os.rename(source, target)
    def stat(self, path):
        return os.stat(path)
    def remove(self, path):
        os.remove(path)
    def mkdir(self, path):
        os.mkdir(path)
codeupdate.os = CutAfter(%(renames)d)
session = codeupdate.CodeSession(%(root)r, 60000000, 0)
session.activate(b"".join(bytes([len(n)]) + n for n in %(names)r))
"""


def _cut_activation(storage, names, renames):
    script = _ACTIVATION_CUT % {
        "root": str(storage),
        "renames": renames,
        "names": [name.encode() for name in names],
    }
    done = subprocess.run(
        [str(MICROPYTHON_BIN), "-c", script], cwd=storage, capture_output=True, timeout=60
    )
    assert done.returncode == 9, done.stderr  # cut, not finished nor failed
    assert (storage / "deploy.journal").exists()


def _deploy_source(storage):
    """The application deployed as source, as `qkdsat flash` lays it out (.py for .mpy)."""
    (storage / "products").mkdir(parents=True)
    (storage / "link").mkdir()
    (storage / "link" / "key").write_bytes(KEY)
    shutil.copy(FIRMWARE_DIR / "main.py", storage / "main.py")
    shutil.copy(FIRMWARE_DIR / "boards" / "unix" / "board.py", storage / "board.py")
    shutil.copytree(
        FIRMWARE_DIR / "payload", storage / "payload", ignore=shutil.ignore_patterns("__pycache__")
    )


def _version_booted(storage):
    with _boot_from_storage(storage) as target:
        with PayloadClient(target.ground_port, KEY, timeout_s=COMMAND_TIMEOUT_S) as payload:
            return payload.ping()


@pytest.mark.slow
def test_a_deploy_cut_at_any_point_boots_a_whole_set_old_or_new(tmp_path):
    # Before the activation (journal) each commit renamed one file into place, so a power
    # cut part-way through a deploy left old and new modules mixed: with an interface
    # changed, `from payload import app` raised at every boot and main.py reset the board
    # each time, with no code session reachable. Here the new set's version.py imports a
    # module the old set lacks, and is committed first (sorted order, as `qkdsat flash`).
    storage = tmp_path / "flash"
    _deploy_source(storage)
    old = f"qkdsat-fw {firmware_version()} unix"
    new_set = {
        "payload/version.py": b"from payload.zz_release import TEXT as FIRMWARE_VERSION\n",
        "payload/zz_release.py": b'TEXT = "9.9.9-set"\n',
    }
    names = sorted(new_set)
    with _boot_from_storage(storage) as target:
        with PayloadClient(target.ground_port, KEY, timeout_s=COMMAND_TIMEOUT_S) as payload:
            assert payload.ping() == old
            payload.open_code_session()
            payload.upload_code(names[0], new_set[names[0]])
    # the process killed after 1 of 2 files committed: the old set boots whole
    assert _version_booted(storage) == old, "a cut between commits left a mixed set"
    with _boot_from_storage(storage) as target:
        with PayloadClient(target.ground_port, KEY, timeout_s=COMMAND_TIMEOUT_S) as payload:
            payload.open_code_session()
            payload.upload_code(names[1], new_set[names[1]])
    # every file committed, no activation: nothing that boots changed
    assert _version_booted(storage) == old
    assert sorted(p.name for p in storage.rglob("*.new")) == [
        "version.py.new",
        "zz_release.py.new",
    ]
    # a journal torn or damaged (a byte flipped) is ignored: no rename had begun
    _cut_activation(storage, names, renames=0)
    journal = bytearray((storage / "deploy.journal").read_bytes())
    journal[-1] ^= 0x01
    (storage / "deploy.journal").write_bytes(journal)
    assert _version_booted(storage) == old
    assert not (storage / "deploy.journal").exists()
    # the cut after the journal and 1 of the 2 renames: the boot finishes the set first
    _cut_activation(storage, names, renames=1)
    assert (storage / "payload" / "version.py").read_bytes() == new_set[names[0]]
    assert not (storage / "payload" / "zz_release.py").exists()
    assert _version_booted(storage) == "qkdsat-fw 9.9.9-set unix"
    assert not (storage / "deploy.journal").exists() and not list(storage.rglob("*.new"))
    for name in names:
        assert (storage / name).read_bytes() == new_set[name]
