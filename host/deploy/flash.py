"""`qkdsat flash --port PORT`: deploy the payload firmware to a MicroPython board with
mpremote, and verify what landed (docs/ground-link.md, "Flashing").

What is deployed: firmware/payload/*.py and the board module compiled to .mpy by the
project's own mpy-cross (MicroPython 1.25, the version every target runs), for the
board's native architecture (read from sys.implementation._mpy, so viper code runs), plus
main.py as source (the boot entry point). Files go to the board's storage root; each is
read back and its SHA-256 compared, then the package is imported from there and its
version checked. Why .mpy and not a ROMFS image: ROMFS needs a ROM partition that only
some ports expose in 1.25 (the QEMU port has none: MICROPY_VFS_ROM_IOCTL=0), while every
board with a filesystem loads .mpy; .mpy skips compiling on the board (RAM, boot time).

Two ways onto the board (docs/ground-link.md "Maintenance in flight"):
- at its REPL, which only the maintenance strap at boot gives (ground integration,
  physical access): mpremote copies the files, reads them back and imports the package;
  --provision-key writes the payload's link key into <storage>/link/key;
- a running application, with the link key (--key): over the payload's code-update
  session (authenticated telecommands: arm, maintenance, then each file put in chunks and
  committed with its SHA-256, which the payload checks before it renames the file to
  <name>.new; then one activate puts the whole set in place through a journal the next
  boot finishes if a reset cuts it). No REPL opens; the link can write code files and
  nothing else (no key, no read). The new code runs from the next boot (--reset reboots
  at the end).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from emulator.targets import BUILD_DIR, FIRMWARE_DIR, firmware_version
from host.errors import BadInput

# sys.implementation._mpy >> 10: MicroPython's native architecture numbering
MPY_ARCHES = (
    None,
    "x86",
    "x64",
    "armv6",
    "armv6m",
    "armv7m",
    "armv7em",
    "armv7emsp",
    "armv7emdp",
    "xtensa",
    "xtensawin",
    "rv32imc",
)


class FlashError(RuntimeError):
    pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", required=True, help="the board's serial port (its REPL)")
    parser.add_argument(
        "--board",
        help="board module to deploy: firmware/boards/<BOARD>/board.py (default: the one "
        "the board runs now; required on a board without one)",
    )
    parser.add_argument(
        "--key",
        type=Path,
        metavar="FILE",
        help="FILE holding the payload's link key (16..64 raw bytes, or their hex digits): "
        "deploy to a running application over its code-update session (no REPL there); "
        "the name of a file, never the key itself",
    )
    parser.add_argument(
        "--provision-key",
        type=Path,
        metavar="FILE",
        help="write the link key held in FILE to the board (the name of a file, never the "
        "key); only at the REPL of the maintenance strap, never over the link",
    )
    parser.add_argument(
        "--reset",
        action="store_true",
        help="hard-reset (over the link: reboot) the board at the end",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=3.0,
        help="with --key: seconds to wait for each reply over the link, as 'qkdsat payload "
        "--timeout' (default 3; the REPL probe before it keeps its own 3 s)",
    )


def mpy_cross() -> Path:
    for candidate in (BUILD_DIR / "bin" / "mpy-cross", shutil.which("mpy-cross")):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    raise BadInput("mpy-cross not found: run 'make setup'")


def _mpremote(port: str, *commands: str, timeout_s: float = 120.0) -> str:
    cmd = [sys.executable, "-m", "mpremote", "connect", port, "resume", *commands]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise FlashError(
            f"mpremote {' '.join(commands[:2])} on {port}: no end within {timeout_s:.0f} s"
        ) from None
    if proc.returncode != 0:
        raise FlashError(
            f"mpremote {' '.join(commands[:2])} on {port} failed: "
            f"{(proc.stderr or proc.stdout).strip()[-600:]}"
        )
    return proc.stdout


def _exec(port: str, code: str) -> str:
    return _mpremote(port, "exec", code)


_PREPARE = """
import os, sys
try:
    import board
    root = board.mount_storage()
    name = board.NAME
except ImportError:
    root = '/flash' if 'flash' in os.listdir('/') else ''
    name = '?'
for d in ('', '/payload', '/link'):
    try:
        os.mkdir(root + d)
    except OSError:
        pass
print('QKDSAT', sys.implementation._mpy, name, repr(root))
"""


def repl_answers(port: str, timeout_s: float = 3.0) -> bool:
    """A quick probe (mpremote itself waits long on a port where no REPL answers)."""
    from host.deploy.raw_repl import RawRepl, RawReplError

    try:
        repl = RawRepl(port, timeout_s=timeout_s)
    except OSError as error:
        raise BadInput(f"port {port}: {error}") from None
    try:
        repl.enter(attempt_s=1.0)
        repl.serial.write(b"\x02")  # back to the friendly REPL for mpremote
        return True
    except RawReplError:
        return False
    finally:
        repl.close()


def read_repl(port: str) -> tuple[int, str, str]:
    """(the board's .mpy ABI word, its board module's NAME or '?', its storage root),
    from the REPL of a board in maintenance boot."""
    out = _exec(port, _PREPARE)
    for line in out.splitlines():
        if line.startswith("QKDSAT "):
            _, abi, name, root = line.split(" ", 3)
            return int(abi), name, root.strip().strip("'\"")
    raise FlashError(f"unexpected answer from the board on {port}: {out!r}")


def compile_firmware(
    board: str, arch: str | None, out_dir: Path, firmware_dir: Path = FIRMWARE_DIR
) -> dict[str, Path]:
    """{path on the board relative to the storage root: local file}. firmware_dir: the
    sources (a snapshot of firmware/: the unix target's tree)."""
    board_module = firmware_dir / "boards" / board / "board.py"
    if not board_module.exists():
        known = sorted(p.name for p in (firmware_dir / "boards").iterdir() if p.is_dir())
        raise BadInput(f"--board {board}: no {board_module} (known: {', '.join(known)})")
    # The Thumb assembler modules (payload/_*_thumb.py) exist only for ARM cores; their
    # importers fall back to viper without them (framing, bus, memcopy)
    arm = (arch or "").startswith("arm")
    sources = {
        f"payload/{p.stem}.mpy": p
        for p in sorted((firmware_dir / "payload").glob("*.py"))
        if arm or not p.stem.endswith("_thumb")
    }
    sources["board.mpy"] = board_module
    files = {}
    compiler = mpy_cross()
    for target, source in sources.items():
        output = out_dir / target
        output.parent.mkdir(parents=True, exist_ok=True)
        cmd = [str(compiler), "-o", str(output), "-s", target.replace(".mpy", ".py")]
        if arch:
            cmd.append(f"-march={arch}")
        proc = subprocess.run([*cmd, str(source)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise FlashError(f"mpy-cross {source}: {proc.stderr.strip()}")
        files[target] = output
    files["main.py"] = firmware_dir / "main.py"
    return files


_VERIFY = """
import hashlib, sys
def _sha(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        while True:
            b = f.read(512)
            if not b:
                break
            h.update(b)
    return h.digest().hex()
for p in {paths!r}:
    print('SHA', p, _sha({root!r} + '/' + p))
for m in [m for m in sys.modules if m == 'board' or m.startswith('payload')]:
    del sys.modules[m]
sys.path.insert(0, {root!r})
from payload import version
print('VERSION', version.FIRMWARE_VERSION, version.__file__)
"""


def verify(port: str, root: str, files: dict[str, Path]) -> str:
    out = _exec(port, _VERIFY.format(paths=sorted(files), root=root))
    landed = {}
    version_line = ""
    for line in out.splitlines():
        if line.startswith("SHA "):
            _, path, digest = line.split()
            landed[path] = digest
        elif line.startswith("VERSION "):
            version_line = line
    for path, local in files.items():
        expected = hashlib.sha256(local.read_bytes()).hexdigest()
        if landed.get(path) != expected:
            raise FlashError(f"{root}/{path} on the board does not match {local}")
    parts = version_line.split()
    if len(parts) != 3 or parts[1] != firmware_version() or not parts[2].startswith(root):
        raise FlashError(f"the deployed package does not import from {root}: {version_line!r}")
    return parts[1]


# The native .mpy architecture of each board module's MCU: over the link there is no
# REPL to ask sys.implementation._mpy (the unix board: the host's own)
BOARD_ARCHES = {"qemu": "armv7m", "netduino2": "armv7m"}
_HOST_ARCHES = {"x86_64": "x64", "amd64": "x64", "i686": "x86", "i386": "x86"}


def host_arch() -> str | None:
    """The native .mpy architecture of this machine (the unix board's), None if unknown."""
    return _HOST_ARCHES.get(platform.machine().lower())


def _board_to_deploy(port: str, board: str | None, running_board: str) -> str:
    if board is None:
        if running_board == "?":
            raise BadInput(f"the board on {port} has no board module yet: give --board")
        return running_board
    if running_board not in ("?", board):
        raise BadInput(
            f"--board {board}, but the board on {port} runs board module {running_board!r}: "
            "deploying another board's register map could drive the wrong hardware"
        )
    return board


def flash(
    port: str,
    board: str | None = None,
    key_path: Path | None = None,
    provision_key: Path | None = None,
    reset: bool = False,
    timeout_s: float = 3.0,
) -> dict:
    started = time.monotonic()
    if not repl_answers(port):
        if key_path is None:
            raise FlashError(
                f"no REPL on {port}: boot the board with the maintenance strap, or give "
                "--key to deploy over the payload's code-update session"
            )
        if provision_key is not None:
            raise BadInput(
                "--provision-key: no key is ever written over the link; provision at the "
                "REPL of the maintenance strap, or rotate with 'qkdsat payload rekey'"
            )
        return flash_over_link(port, board, key_path, reset, started, timeout_s)
    abi, running_board, root = read_repl(port)
    board = _board_to_deploy(port, board, running_board)
    arch_index = abi >> 10
    arch = MPY_ARCHES[arch_index] if arch_index < len(MPY_ARCHES) else None
    with tempfile.TemporaryDirectory(prefix="qkdsat-flash-") as tmp:
        files = compile_firmware(board, arch, Path(tmp))
        if provision_key is not None:
            from host.link.cli import load_key

            key_file = Path(tmp) / "link.key"
            key_file.write_bytes(load_key(provision_key))
            files["link/key"] = key_file
        copies = []
        for target, local in files.items():
            copies += ["+", "fs", "cp", str(local), f":{root}/{target}"]
        _mpremote(port, *copies[1:])
        version = verify(port, root, files)
    if reset:
        _mpremote(port, "reset")
    return {
        "via": "repl",
        "root": root,
        "arch": arch,
        "files": sorted(files),
        "version": version,
        "seconds": time.monotonic() - started,
    }


def flash_over_link(
    port: str,
    board: str | None,
    key_path: Path,
    reset: bool,
    started: float,
    timeout_s: float = 3.0,
) -> dict:
    """Deploy to a running application over its code-update session."""
    from host.link.cli import load_key
    from host.link.client import LinkError, PayloadClient
    from host.link.framed_serial import LinkLost

    try:
        payload = PayloadClient(port, load_key(key_path), timeout_s=timeout_s)
    except OSError as error:
        raise BadInput(f"port {port}: {error}") from None
    with payload, tempfile.TemporaryDirectory(prefix="qkdsat-flash-") as tmp:
        try:
            running = payload.ping().split()  # "qkdsat-fw <version> <board NAME>"
            payload.open_code_session()
        except (LinkError, LinkLost) as error:
            raise FlashError(
                f"no REPL on {port}, and the maintenance telecommand failed: {error}"
            ) from None
        board = _board_to_deploy(port, board, running[-1] if running else "?")
        arch = BOARD_ARCHES.get(board)
        if board == "unix":
            arch = host_arch()
        files = compile_firmware(board, arch, Path(tmp))
        committed = []
        try:
            for target in sorted(files):
                payload.upload_code(target, files[target].read_bytes())
                committed.append(target)
        except (LinkError, LinkLost) as error:
            raise FlashError(
                f"deploying over the link stopped at {len(committed)} of {len(files)} files "
                f"({error}); nothing activated, the old firmware boots whole: run it again"
            ) from None
        try:
            # the whole set in place at once: a reset part-way through is finished by the
            # next boot before it imports any of it (the payload's journal)
            payload.activate_code(sorted(files))
            if reset:
                payload.reboot()
        except (LinkError, LinkLost) as error:
            raise FlashError(
                f"deploying over the link: every file committed, the activation or reboot "
                f"not confirmed ({error}); the old or the whole new set boots: run it again"
            ) from None
    return {
        "via": "link",
        "root": "<storage root>",
        "arch": arch,
        "files": sorted(files),
        "version": firmware_version(),
        "was": " ".join(running[1:2]),
        "seconds": time.monotonic() - started,
    }


def run(args: argparse.Namespace) -> int:
    from host.link.cli import load_key

    if args.provision_key is not None:
        load_key(args.provision_key, "--provision-key")  # a bad key file before the board
    if args.key is not None:
        load_key(args.key)
    if not (math.isfinite(args.timeout) and 0 < args.timeout <= 3600):
        raise BadInput(f"--timeout {args.timeout}: must be between 0 and 3600 s")
    try:
        result = flash(
            args.port, args.board, args.key, args.provision_key, args.reset, args.timeout
        )
    except FlashError as error:
        print(f"qkdsat flash: {error}", file=sys.stderr)
        return 1
    files = f"{len(result['files'])} files, .mpy for {result['arch'] or 'bytecode only'}"
    if result["via"] == "link":
        after = "rebooting into it" if args.reset else "it runs from the next boot (--reset)"
        print(
            f"deployed qkdsat-fw {result['version']} ({files}) over the code-update session "
            f"on {args.port} (was {result['was'] or '?'}); SHA-256 of every file verified by "
            f"the payload before it replaced the old one; {after} ({result['seconds']:.1f} s)"
        )
        return 0
    print(
        f"deployed qkdsat-fw {result['version']} ({files}) to {result['root'] or '/'} on "
        f"{args.port}; SHA-256 of every file verified, package imports from there "
        f"({result['seconds']:.1f} s)"
    )
    return 0
