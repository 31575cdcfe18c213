"""Emulated payload controllers: the real firmware on the MicroPython unix port or on
bare-metal MicroPython in QEMU (mps2-an385), wired the same way on both.

    ground link (UART0)  -> a pty; the host opens `target.ground_port` with pyserial,
                            exactly as it would a board's serial port
    payload bus (UART1)  -> a TCP connection to the emulated optical head at `bus_address`
    tracking link        -> QEMU only, with `track_address`: a second TCP connection to the
      (UART2 / USART3)      head, the TRACK exchange's own link (docs/scheduling.md "The loop
                            on a timer interrupt"), announced to the board by a strap
    storage              -> a directory (unix) or littlefs on emulated PSRAM (QEMU)

Both are context managers: the firmware runs inside the `with` block and is stopped at
its end; `kill()` cuts power abruptly (for power-cut tests).
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
import tty
from pathlib import Path

from host.errors import EnvironmentFailure

REPO_ROOT = Path(__file__).resolve().parents[1]
BUILD_DIR = Path(os.environ.get("QKDSAT_BUILD_DIR", REPO_ROOT / "build"))
FIRMWARE_DIR = REPO_ROOT / "firmware"
MICROPYTHON_BIN = BUILD_DIR / "bin" / "micropython"
QEMU_IMAGE = BUILD_DIR / "qemu" / "firmware.elf"
NETDUINO2_IMAGE = BUILD_DIR / "netduino2" / "firmware.elf"
QEMU_BIN = "qemu-system-arm"

# Boot strap word the QEMU board reads at 0x20000000 (firmware/boards/qemu/board.py).
_STRAP_ADDR = 0x20000000
_STRAP_MAINTENANCE = 0x4E49414D
# The second word: the tracking link is wired (b"TRAK" little-endian; board.tracking_link)
_STRAP_TRACK_ADDR = 0x20000004
_STRAP_TRACK = 0x4B415254


def _read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            values[key] = value
    return values


MICROPYTHON_ENV = _read_env_file(REPO_ROOT / "tools" / "micropython.env")
CONTROLLER_HEAP_BYTES = int(MICROPYTHON_ENV["CONTROLLER_HEAP_BYTES"])


def firmware_version() -> str:
    """FIRMWARE_VERSION from firmware/payload/version.py (the firmware's single source)."""
    text = (FIRMWARE_DIR / "payload" / "version.py").read_text()
    match = re.search(r'FIRMWARE_VERSION = "([^"]+)"', text)
    if not match:
        raise TargetError("firmware/payload/version.py does not define FIRMWARE_VERSION")
    return match.group(1)


class TargetError(RuntimeError):
    pass


class BuildMissing(TargetError, EnvironmentFailure):
    """A build product is absent: the machine's setup, not a bug (exit 1, not 'internal
    error ... report it')."""


def require(path: Path, what: str) -> Path:
    if not path.exists():
        raise BuildMissing(f"{what} not found at {path}: run 'make setup' (or 'make firmware')")
    return path


def unix_firmware_tree() -> Path:
    """The firmware as the unix target runs it: every module compiled by mpy-cross for this
    host's architecture (`flash.compile_firmware`, what `qkdsat flash` deploys), with
    main.py beside them, in build/unix-mpy/<digest of the sources and of how they are
    compiled>.

    A board runs its code frozen or from .mpy files, never parsing source; the unix port
    parsing firmware/*.py at import needed about five times a module's resident size at
    once (tracking.py: ~200 KB of heap to import, 43 KB kept, 37 KB as .mpy), so a
    configure that first imported it failed at 84 % of the heap budget for the parse
    alone (docs/targets.md, "RAM budget"). Compiled once per state of the sources, from a
    snapshot of the very bytes the digest was taken over (a file edited during the compile,
    a checkout while tests run, cannot put other code under the name); a concurrent
    compile (parallel tests) renames its own complete tree into place or finds one there."""
    from host.deploy import flash
    from host.errors import BadInput

    try:
        compiler = flash.mpy_cross()
    except BadInput as error:
        raise BuildMissing(f"the unix target's firmware: {error}") from None
    arch = flash.host_arch()
    sources = {
        path.relative_to(FIRMWARE_DIR): path.read_bytes()
        for path in [
            *sorted((FIRMWARE_DIR / "payload").glob("*.py")),
            FIRMWARE_DIR / "boards" / "unix" / "board.py",
            FIRMWARE_DIR / "main.py",
        ]
    }
    stat = compiler.stat()
    digest = hashlib.sha256(f"{arch} {stat.st_size} {stat.st_mtime_ns}".encode())
    digest.update(Path(flash.__file__).read_bytes() + b"\0")
    for name, content in sources.items():
        digest.update(str(name).encode() + b"\0" + content + b"\0")
    tree = BUILD_DIR / "unix-mpy" / digest.hexdigest()[:16]
    if not tree.parent.is_dir():
        tree.parent.mkdir(parents=True, exist_ok=True)
        tree.parent.chmod(0o755)  # whatever the umask: the trees are shared
    if _mark_used(tree):
        return tree
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=tree.parent))
    try:
        snapshot = staging / "sources"
        for name, content in sources.items():
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            (snapshot / name).write_bytes(content)
        compiled = staging / "tree"
        try:
            files = flash.compile_firmware("unix", arch, compiled, firmware_dir=snapshot)
        except flash.FlashError as error:
            raise BuildMissing(f"the unix target's firmware does not compile: {error}") from None
        shutil.copyfile(files["main.py"], compiled / "main.py")
        # readable by every user (mkdtemp's 0700, a umask of 077): a tree is shared
        for folder, _, names in os.walk(compiled):
            os.chmod(folder, 0o755)
            for name in names:
                os.chmod(os.path.join(folder, name), 0o644)
        try:
            os.rename(compiled, tree)
        except OSError:  # another process put the same tree in place first, or a cut-off
            _replace_incomplete_tree(tree, compiled)  # prune left part of one
        _prune_unix_trees(tree)  # spares this tree, just made (its mtime: now)
        return tree
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# A tree is ~260 KB on disk and every edit of the firmware makes one: the trees nobody has
# launched for a week go when a new one is made. A week, not less: a process imports some
# modules late (payload.tracking at configure), so a tree must outlive any launch from it.
# A staging folder older than a day is a compile that was killed (a compile takes seconds;
# a day, so that a compile paused by a suspended laptop overnight keeps its folder).
UNIX_TREE_UNUSED_S = 7 * 86400
UNIX_STAGING_ABANDONED_S = 86400


@contextlib.contextmanager
def _trees_locked(trees: Path, exclusive: bool):
    """An flock on <trees>/.lock for the with block; yields whether it is held. A launch
    marks its tree under a shared lock, a prune checks and removes under an exclusive one,
    so a tree marked is never then removed and a tree removed is never then returned. Not
    held where the lock cannot be had (another user's folder): a launch then marks without
    it, a prune does not run."""
    try:
        descriptor = os.open(trees / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        os.fchmod(descriptor, 0o644)  # whatever the umask: other users take shared locks
    except OSError:
        try:  # another user's lock file: a shared lock needs only to read it
            descriptor = os.open(trees / ".lock", os.O_RDONLY)
        except OSError:
            descriptor = None
    try:
        held = descriptor is not None
        if held:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            except OSError:
                held = False
        yield held
    finally:
        if descriptor is not None:
            os.close(descriptor)  # releases the flock


def _mark_used(tree: Path) -> bool:
    """Whether the tree is complete; if so its folder's mtime becomes now (its last launch,
    what _prune_unix_trees goes by), under the trees' shared lock."""
    with _trees_locked(tree.parent, exclusive=False):
        if not (tree / "main.py").exists():
            return False
        try:
            os.utime(tree)
        except OSError:  # another user's tree: launched as is, theirs to prune
            pass
        return True


def _prune_unix_trees(current: Path, now_s: float | None = None) -> list[str]:
    """Remove the unix-mpy trees unused for UNIX_TREE_UNUSED_S and the staging folders of
    compiles killed mid-way (older than UNIX_STAGING_ABANDONED_S); returns their names.
    Only names unix_firmware_tree makes (16 hex digits, .staging-*) are touched, and none
    at all without the trees' exclusive lock."""
    now_s = time.time() if now_s is None else now_s
    removed = []
    with _trees_locked(current.parent, exclusive=True) as held:
        if not held:
            return []
        for entry in list(current.parent.iterdir()):
            if entry == current or not entry.is_dir() or entry.is_symlink():
                continue
            is_tree = re.fullmatch(r"[0-9a-f]{16}", entry.name) is not None
            if not is_tree and not entry.name.startswith(".staging-"):
                continue
            try:
                age_s = now_s - entry.stat().st_mtime
            except OSError:  # gone meanwhile
                continue
            if age_s <= (UNIX_TREE_UNUSED_S if is_tree else UNIX_STAGING_ABANDONED_S):
                continue
            doomed = entry
            if is_tree:
                # out of the trees' names first (one rename), so that a prune cut off
                # mid-way leaves a staging folder, never a tree with main.py and not all
                # of its modules, which a launch would take as whole
                doomed = Path(tempfile.mkdtemp(prefix=".staging-pruned-", dir=entry.parent))
                try:
                    os.rename(entry, doomed)
                except OSError:
                    os.rmdir(doomed)
                    continue
            shutil.rmtree(doomed, ignore_errors=True)
            if not doomed.exists():
                removed.append(entry.name)
    return removed


def _replace_incomplete_tree(tree: Path, compiled: Path) -> None:
    """Put the compiled tree in place of a folder without main.py (a tree's files removed by
    hand, a crash of the file system), which a rename cannot replace. A tree renamed into
    place is always complete, so such a folder is never another process's work."""
    with _trees_locked(tree.parent, exclusive=True):
        if (tree / "main.py").exists():  # another process's complete tree
            return
        shutil.rmtree(tree, ignore_errors=True)
        try:
            os.rename(compiled, tree)
        except OSError as error:
            raise TargetError(
                f"the unix target's firmware tree {tree} cannot be put in place: {error}"
            ) from None


def unix_firmware_env(
    storage_dir: str | os.PathLike,
    bus_address: tuple[str, int] | None = None,
    boot: str | None = None,
    extra: dict[str, str] | None = None,
    tree: Path | None = None,
) -> dict[str, str]:
    """The environment the unix board reads (firmware/boards/unix/board.py): the firmware
    from its compiled tree (tree, else unix_firmware_tree())."""
    env = dict(os.environ)
    env["MICROPYPATH"] = os.pathsep.join([str(tree or unix_firmware_tree()), ".frozen"])
    env["QKDSAT_STORAGE"] = str(storage_dir)
    if boot:
        env["QKDSAT_BOOT"] = boot
    if bus_address:
        env["QKDSAT_BUS"] = f"{bus_address[0]}:{bus_address[1]}"
    env.update(extra or {})
    return env


def unix_firmware_command(
    script: str | os.PathLike, heap_bytes: int = CONTROLLER_HEAP_BYTES
) -> list[str]:
    """The unix port running a script with the heap capped at the controller's RAM."""
    binary = require(MICROPYTHON_BIN, "MicroPython unix port")
    return [str(binary), "-X", f"heapsize={heap_bytes}", str(script)]


class Target(abc.ABC):
    """Common lifetime handling: a child process with a ground-link pty."""

    name = "?"

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.ground_port: str | None = None
        self._keep_fds: list[int] = []

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    @abc.abstractmethod
    def start(self) -> None:
        """Launch the firmware; set self.process and self.ground_port."""

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """Cut power: SIGKILL, no chance to flush or close anything."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._close_fds()

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in self._keep_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._keep_fds.clear()

    def stderr_text(self) -> str:
        if self.process is None or self.process.stderr is None or self.running():
            return ""
        return self.process.stderr.read().decode(errors="replace")


class UnixTarget(Target):
    """The firmware on the MicroPython unix port, heap capped at the controller's RAM."""

    name = "unix"

    def __init__(
        self,
        storage_dir: str | os.PathLike | None = None,
        bus_address: tuple[str, int] | None = None,
        boot: str = "app",
        script: str | os.PathLike | None = None,
        heap_bytes: int = CONTROLLER_HEAP_BYTES,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        self._tmp = None
        if storage_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="qkdsat-unix-")
            storage_dir = self._tmp.name
        self.storage_dir = Path(storage_dir)
        self.bus_address = bus_address
        self.boot = boot
        self.script = Path(script) if script else None  # None: the tree's main.py
        self.heap_bytes = heap_bytes
        self.extra_env = extra_env or {}

    def start(self) -> None:
        tree = unix_firmware_tree()  # once: the script and the imports from one tree
        command = unix_firmware_command(self.script or tree / "main.py", self.heap_bytes)
        master, slave = os.openpty()
        tty.setraw(slave)
        # The firmware must never block on a ground link nobody reads (like a UART).
        flags = fcntl.fcntl(master, fcntl.F_GETFL)
        fcntl.fcntl(master, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        env = unix_firmware_env(
            self.storage_dir, self.bus_address, self.boot, self.extra_env, tree=tree
        )
        self.process = subprocess.Popen(
            command,
            stdin=master,
            stdout=master,
            stderr=subprocess.PIPE,
            env=env,
            cwd=str(self.storage_dir),
        )
        # Keep both sides open for the target's lifetime, as a UART outlives the program
        # driving it: the pty survives between host connections, and what the firmware
        # wrote just before it reset or exited stays readable by the host.
        self._keep_fds += [master, slave]
        self.ground_port = os.ttyname(slave)

    def stop(self, timeout_s: float = 5.0) -> None:
        super().stop(timeout_s)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


class QemuTarget(Target):
    """The frozen firmware image on QEMU's mps2-an385 (Cortex-M3, 25 MHz, no FPU).

    icount_shift: if set, QEMU's clocks follow the instruction count (2**shift ns per
    instruction) instead of the host's clock, so timing-dependent tests are deterministic
    on a loaded machine.
    """

    name = "qemu"

    def __init__(
        self,
        bus_address: tuple[str, int] | None = None,
        boot: str = "app",
        icount_shift: int | None = None,
        image: str | os.PathLike = QEMU_IMAGE,
        track_address: tuple[str, int] | str | None = None,
    ) -> None:
        super().__init__()
        self.bus_address = bus_address
        self.boot = boot
        self.icount_shift = icount_shift
        self.image = Path(image)
        self.track_address = track_address

    def _bus_chardev(self, address: tuple[str, int] | None = None) -> str:
        """The payload bus UART's QEMU chardev (or the tracking link's, given its address):
        the emulated payload's TCP socket, or none."""
        address = address or self.bus_address
        if not address:
            return "null"
        if isinstance(address, str):  # a unix socket's path (a test's peer)
            return f"unix:{address}"
        # nodelay: a bus round trip per frame (lockstep) must not wait for Nagle.
        return f"tcp:{address[0]}:{address[1]},nodelay=on"

    def _track_args(self) -> list[str]:
        """The third serial port: the tracking link, when the head serves one."""
        if not self.track_address:
            return []
        return ["-serial", self._bus_chardev(self.track_address)]

    def _icount_args(self) -> list[str]:
        if self.icount_shift is None:
            return []
        return ["-icount", f"shift={self.icount_shift},align=off,sleep=off"]

    def command(self) -> list[str]:
        image = require(self.image, "QEMU firmware image")
        cmd = [
            QEMU_BIN,
            "-machine", "mps2-an385",
            "-nographic", "-monitor", "null", "-semihosting",
            "-serial", "pty",
            "-serial", self._bus_chardev(),
            "-kernel", str(image),
        ]  # fmt: skip
        cmd[cmd.index("-kernel") : cmd.index("-kernel")] = self._track_args()
        cmd += self._icount_args()
        if self.boot == "maintenance":
            cmd += [
                "-device",
                f"loader,addr={_STRAP_ADDR:#x},data={_STRAP_MAINTENANCE:#x},data-len=4",
            ]
        if self.track_address:
            cmd += [
                "-device",
                f"loader,addr={_STRAP_TRACK_ADDR:#x},data={_STRAP_TRACK:#x},data-len=4",
            ]
        return cmd

    def start(self, timeout_s: float = 10.0) -> None:
        self.process = subprocess.Popen(
            self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        seen = b""
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            seen += line
            match = re.search(rb"redirected to (/dev/pts/\d+) \(label serial0\)", line)
            if match:
                self.ground_port = match.group(1).decode()
                return
        self.stop()
        raise TargetError(
            f"QEMU did not open its ground-link pty: {seen.decode(errors='replace')}"
        )

    def stderr_text(self) -> str:
        return ""


# The payload bus's reply timeout a try that the launcher sets on the emulated STM32 board,
# over its flight value (boards/netduino2 FLIGHT_BUS_TIMEOUT_US, 500 ms): QEMU hands the
# USART its bytes at the host's pace, and a loaded host delays an emulated head's reply by
# seconds. QEMU does not model the IWDG, so nothing resets the emulated board when a dead
# head's 4 tries (40 s) outlast the part's watchdog (docs/targets.md).
NETDUINO2_EMULATED_BUS_TIMEOUT_US = 10_000_000
# How long the emulated STM32 board's ground poll reads on for the rest of a frame once
# bytes came, over its flight value (payload/waits.py GROUND_RX_WAIT_US, 5 ms): QEMU's
# USART holds one byte and gets the next when QEMU's main loop runs, 2-5 ms apart on a
# host at load ~10 (a 37-byte telecommand took up to 182 ms), so with the flight value a
# telecommand arrived a byte or two a scheduler pass (docs/targets.md).
NETDUINO2_EMULATED_GROUND_RX_WAIT_US = 200_000
# The board reads the command line below into a buffer of this many bytes, its NUL
# included (boards/netduino2/board.py _LAUNCHER_LINE_BYTES). QEMU answers a line that does
# not fit with an error and nothing else, and the board then boots as from no line at all:
# the app, not the maintenance boot asked for, flight timeouts, no tracking link (seen with
# ground_rx_wait_us=10**40). So a longer line is refused here.
NETDUINO2_LAUNCHER_LINE_BYTES = 96
# The SRAM that stands in for the STM32 board's flash (boards/netduino2/board.py
# _FLASH_DISK_ADDR, _FLASH_BLOCK_BYTES * _FLASH_BLOCKS; stm32f205.ld FLASHDISK): littlefs
# with the provisioning drop box. A copy of it loaded there before reset is a board whose
# flash was programmed before it left the bench (Netduino2Target storage_image).
NETDUINO2_FLASH_DISK_ADDR = 0x20018800
NETDUINO2_FLASH_DISK_BYTES = 80 * 256


class Netduino2Target(QemuTarget):
    """The frozen STM32 image (firmware/boards/netduino2) on QEMU's netduino2 machine: an
    STM32F205 Cortex-M3 with STM32 USARTs and timers, 128 KiB of SRAM (docs/targets.md).
    USART1 is the ground link, USART2 the payload bus. The boot strap is the emulator's
    semihosting command line (the board reads it with SYS_GET_CMDLINE).

    bus_timeout_us: the emulation's override of the board's payload-bus timeout, on that
    command line (`arg=bus_timeout_us=N`, the board's EMULATION_OVERRIDES); None: the
    board's flight value. ground_rx_wait_us: the same for the ground poll's wait for the
    rest of a frame (`arg=ground_rx_wait_us=N`).

    semihosting=False: QEMU without -semihosting, which takes a BKPT as the part with no
    debugger attached does (a HardFault, docs/targets.md "Boot strap"): the flight board.
    There is no command line then, so the board boots the app with its flight values and
    no tracking link; boot and track_address cannot be given, and the overrides are None.
    storage_image: a file of NETDUINO2_FLASH_DISK_BYTES loaded over the board's flash
    region before reset (a provisioned board: emulator.payload_run.
    netduino2_storage_image)."""

    name = "netduino2"

    def __init__(
        self,
        bus_address: tuple[str, int] | None = None,
        boot: str = "app",
        icount_shift: int | None = None,
        image: str | os.PathLike = NETDUINO2_IMAGE,
        track_address: tuple[str, int] | str | None = None,
        bus_timeout_us: int | None = NETDUINO2_EMULATED_BUS_TIMEOUT_US,
        ground_rx_wait_us: int | None = NETDUINO2_EMULATED_GROUND_RX_WAIT_US,
        semihosting: bool = True,
        storage_image: str | os.PathLike | None = None,
    ) -> None:
        super().__init__(bus_address, boot, icount_shift, image, track_address)
        if not semihosting:
            if boot != "app" or track_address:
                raise ValueError(
                    "netduino2 without semihosting has no command line: it boots the app"
                    " with no tracking link (boot='app', no track_address)"
                )
            bus_timeout_us = ground_rx_wait_us = None  # the board's flight values
        self.semihosting = semihosting
        self.bus_timeout_us = bus_timeout_us
        self.ground_rx_wait_us = ground_rx_wait_us
        self.storage_image = None if storage_image is None else Path(storage_image)

    def launcher_words(self) -> list[str]:
        """The board's command line (SYS_GET_CMDLINE: these words joined by spaces);
        ValueError if it would not fit the board's buffer (NETDUINO2_LAUNCHER_LINE_BYTES)."""
        words = ["qkdsat", self.boot] + (["track"] if self.track_address else [])
        if self.bus_timeout_us is not None:
            words.append(f"bus_timeout_us={int(self.bus_timeout_us)}")
        if self.ground_rx_wait_us is not None:
            words.append(f"ground_rx_wait_us={int(self.ground_rx_wait_us)}")
        line_bytes = len(" ".join(words).encode()) + 1
        if line_bytes > NETDUINO2_LAUNCHER_LINE_BYTES:
            raise ValueError(
                f"netduino2 launcher line of {line_bytes} bytes with its NUL: the board reads"
                f" {NETDUINO2_LAUNCHER_LINE_BYTES} (boards/netduino2/board.py"
                f" _LAUNCHER_LINE_BYTES): {words}"
            )
        return words

    def command(self) -> list[str]:
        image = require(self.image, "netduino2 firmware image (make firmware)")
        cmd = [QEMU_BIN, "-machine", "netduino2", "-nographic", "-monitor", "null"]
        if self.semihosting:
            strap = ",".join(f"arg={word}" for word in self.launcher_words())
            cmd += ["-semihosting-config", f"enable=on,target=native,{strap}"]
        cmd += [
            "-serial", "pty",
            "-serial", self._bus_chardev(),
            *self._track_args(),
            "-kernel", str(image),
        ]  # fmt: skip
        if self.storage_image is not None:
            storage = require(self.storage_image, "netduino2 storage image")
            if storage.stat().st_size != NETDUINO2_FLASH_DISK_BYTES:
                raise ValueError(
                    f"{storage}: {storage.stat().st_size} bytes, the board's flash region"
                    f" is {NETDUINO2_FLASH_DISK_BYTES}"
                )
            cmd += [
                "-device",
                f"loader,file={storage},addr={NETDUINO2_FLASH_DISK_ADDR:#x},force-raw=on",
            ]
        cmd += self._icount_args()
        return cmd


def make_target(name: str, **kwargs) -> Target:
    if name == "unix":
        kwargs.pop("icount_shift", None)
        return UnixTarget(**kwargs)
    if name == "qemu":
        kwargs.pop("storage_dir", None)
        return QemuTarget(**kwargs)
    if name == "netduino2":
        kwargs.pop("storage_dir", None)
        return Netduino2Target(**kwargs)
    raise ValueError(f"unknown target {name!r}: expected 'unix', 'qemu' or 'netduino2'")
