"""Run MicroPython test files on the firmware's targets, for pytest (see conftest.py).

A firmware test file is `tests/firmware/mptest_*.py`, written in MicroPython:
- every `def test_*()` is a test; it passes unless it raises;
- `load_vectors("framing.json")` returns the parsed golden vectors from tests/vectors/
  (the harness embeds them, as the QEMU target has no host filesystem);
- it runs on every target (unix, QEMU MPS2-AN385, QEMU netduino2: the STM32 board);
  `TARGETS = ("unix",)` with `TARGETS_REASON = "..."` narrows that (the STM32 board's
  96 KiB heap runs every file but the NOR-chip model's, mptest_flash_faults.py);
- `QEMU_ICOUNT_SHIFT = N` runs QEMU with its clock following the instruction count;
- `UNIX_HEAP_PERCENT = N` runs it on unix with N % of the controller's heap, so that a file
  whose fixtures take a large share of the heap keeps its margin (docs/targets.md);
- `NETDUINO2_TESTS_PER_SESSION = N` runs it on the STM32 board in sessions of at most N
  tests (fewer than the default 8: less source held in its 96 KiB heap while they run);
- `MPTEST_HELPERS = ("link_helpers.py",)` appends those files of tests/firmware/ (set-up
  shared by several test files) after the file's own source, so that its line numbers
  stay the file's; the helpers only have to exist by the time the tests are called.

Each file runs once per target, in one fresh interpreter (unix) or one freshly booted
QEMU image (maintenance boot, raw REPL); results are split per test function. On the
STM32 board (96 KiB heap) a file runs in sessions of at most NETDUINO2_TESTS_PER_SESSION
tests, each on a fresh boot with only its own tests' source sent (the others' lines are
blanked, so line numbers stay the file's): the raw REPL keeps the whole program text and
its compiled code in the heap while the tests run. With all 16 tracking tests in one
session, 8.5 KiB more source was enough for a Tracker's 8.6 KiB of words to find no
contiguous block; in sessions of 8, 17 KiB more still passes. gc.collect() runs before
each test on every target, so no test starts in the previous one's garbage.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from emulator.targets import (
    CONTROLLER_HEAP_BYTES,
    Netduino2Target,
    QemuTarget,
    unix_firmware_command,
    unix_firmware_env,
)
from host.deploy.raw_repl import ExecutionFailed, RawRepl, RawReplError

VECTORS_DIR = Path(__file__).parent / "vectors"
FIRMWARE_TESTS_DIR = Path(__file__).parent / "firmware"
ALL_TARGETS = ("unix", "qemu", "netduino2")
NETDUINO2_TESTS_PER_SESSION = 8
_MARK = "@@mptest"


@dataclass
class FileSpec:
    path: Path
    source: str
    test_names: list[str]
    test_lines: dict[str, int]
    test_spans: dict[str, tuple[int, int]]  # name -> first, last source line (1-based)
    targets: tuple[str, ...]
    targets_reason: str | None
    icount_shift: int | None
    helpers: tuple[str, ...] = ()
    unix_heap_percent: int = 100  # of the controller's heap, to keep a margin (docs/targets.md)
    netduino2_tests_per_session: int = 8  # NETDUINO2_TESTS_PER_SESSION, the default

    @property
    def uses_vectors(self) -> bool:
        return bool(_vector_files(self))


@dataclass
class FileResult:
    outcomes: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (status, text)
    fatal: str | None = None  # the whole file failed to run


def parse_spec(path: Path) -> FileSpec:
    source = path.read_text()
    tree = ast.parse(source, filename=str(path))
    tests = [
        node
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
    ]
    names = [node.name for node in tests]
    lines = {node.name: node.lineno - 1 for node in tests}
    spans = {
        node.name: (min([node.lineno] + [d.lineno for d in node.decorator_list]), node.end_lineno)
        for node in tests
    }
    constants = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name) and target.id in (
                "TARGETS",
                "TARGETS_REASON",
                "QEMU_ICOUNT_SHIFT",
                "MPTEST_HELPERS",
                "UNIX_HEAP_PERCENT",
                "NETDUINO2_TESTS_PER_SESSION",
            ):
                constants[target.id] = ast.literal_eval(node.value)
    targets = tuple(constants.get("TARGETS", ALL_TARGETS))
    reason = constants.get("TARGETS_REASON")
    if set(targets) != set(ALL_TARGETS) and not reason:
        raise ValueError(f"{path}: TARGETS narrows the targets but TARGETS_REASON says not why")
    helpers = tuple(constants.get("MPTEST_HELPERS", ()))
    for helper in helpers:
        if helper.startswith("mptest_") or not (FIRMWARE_TESTS_DIR / helper).is_file():
            raise ValueError(f"{path}: MPTEST_HELPERS names {helper!r}, not a helper file")
    return FileSpec(
        path,
        source,
        names,
        lines,
        spans,
        targets,
        reason,
        constants.get("QEMU_ICOUNT_SHIFT"),
        helpers,
        constants.get("UNIX_HEAP_PERCENT", 100),
        constants.get("NETDUINO2_TESTS_PER_SESSION", NETDUINO2_TESTS_PER_SESSION),
    )


def _source_of(spec: FileSpec, names: tuple[str, ...]) -> str:
    """The file's source with the tests not in names blanked to empty lines: the session
    compiles only what it runs, and tracebacks keep the file's line numbers."""
    lines = spec.source.split("\n")
    for name in spec.test_names:
        if name not in names:
            first, last = spec.test_spans[name]
            lines[first - 1 : last] = [""] * (last - first + 1)
    return "\n".join(lines)


def _vector_files(spec: FileSpec) -> list[str]:
    return sorted(set(re.findall(r"load_vectors\(\s*[\"']([^\"']+)[\"']", spec.source)))


def vectors_program(spec: FileSpec) -> str:
    """What defines load_vectors: the file's golden vectors embedded as text."""
    embedded = {name: (VECTORS_DIR / name).read_text() for name in _vector_files(spec)}
    return (
        "import json as _mptest_json\n"
        f"_MPTEST_VECTORS = {embedded!r}\n"
        "def load_vectors(name):\n"
        "    return _mptest_json.loads(_MPTEST_VECTORS[name])\n"
    )


def build_program(
    spec: FileSpec, names: tuple[str, ...] | None = None, with_vectors: bool = True
) -> str:
    """The program that runs the tests `names`; with_vectors False: without the
    definition of load_vectors (sent apart beforehand, vectors_program)."""
    names = tuple(spec.test_names) if names is None else names
    helpers = "".join((FIRMWARE_TESTS_DIR / name).read_text() + "\n" for name in spec.helpers)
    prelude = helpers + (vectors_program(spec) if with_vectors else "")
    postlude = f"""
def _mptest_main(names):
    import gc
    import sys
    for name in names:
        gc.collect()
        print("\\n{_MARK} start", name)
        try:
            globals()[name]()
            print("\\n{_MARK} pass", name)
        except Exception as error:
            print("\\n{_MARK} fail", name)
            sys.print_exception(error)
    print("\\n{_MARK} done")
_mptest_main({names!r})
"""
    # The test source comes first so MicroPython's tracebacks give the file's own line
    # numbers; load_vectors and the helpers only have to exist by the time the tests are
    # called.
    return _source_of(spec, names) + "\n" + prelude + postlude


def split_results(spec: FileSpec, output: str) -> FileResult:
    result = FileResult()
    current = None
    status = None
    lines: list[str] = []

    def close():
        if current is not None:
            result.outcomes[current] = (status or "fail", "\n".join(lines).strip())

    done = False
    for line in output.splitlines():
        if line.startswith(_MARK):
            parts = line.split()
            if parts[1] == "start":
                close()
                current, status, lines = parts[2], None, []
            elif parts[1] in ("pass", "fail"):
                status = parts[1]
            elif parts[1] == "done":
                done = True
        elif current is not None:
            lines.append(line)
    close()
    if not done:
        result.fatal = "the test file did not run to completion:\n" + output[-4000:]
    return result


def run_on_unix(spec: FileSpec, timeout_s: float = 300.0) -> FileResult:
    with tempfile.TemporaryDirectory(prefix="mptest-") as workdir:
        program = Path(workdir) / spec.path.name
        program.write_text(build_program(spec))
        proc = subprocess.run(
            unix_firmware_command(program, CONTROLLER_HEAP_BYTES * spec.unix_heap_percent // 100),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            cwd=workdir,
            env=unix_firmware_env(Path(workdir) / "flash"),
            stdin=subprocess.DEVNULL,
        )
    result = split_results(spec, proc.stdout)
    if result.fatal or proc.returncode != 0:
        result.fatal = (result.fatal or f"exit code {proc.returncode}") + "\n" + proc.stderr
    return result


def run_on_qemu(
    spec: FileSpec,
    timeout_s: float = 300.0,
    target_class=QemuTarget,
    names: tuple[str, ...] | None = None,
) -> FileResult:
    with target_class(boot="maintenance", icount_shift=spec.icount_shift) as target:
        try:
            with RawRepl(target.ground_port, timeout_s=30.0) as repl:
                # The vectors go first, in a program of their own: the raw REPL keeps the
                # text of the program it runs in the heap until it ends, and the vectors'
                # text would be held twice (as source and as the string it makes). On the
                # STM32 board at 85 % of its heap, mptest_aesgcm's 12.6 KB of vectors
                # held beside the tests left no block for a 3 KB vector string.
                if spec.uses_vectors:
                    repl.exec(vectors_program(spec), timeout_s=timeout_s)
                output = repl.exec(build_program(spec, names, False), timeout_s=timeout_s)
        except ExecutionFailed as failure:
            result = split_results(spec, failure.stdout)
            result.fatal = "MicroPython raised outside a test:\n" + failure.traceback
            return result
        except RawReplError as error:
            return FileResult(fatal=f"{target_class.name} target: {error}")
    return split_results(spec, output)


def run_on_netduino2(spec: FileSpec, timeout_s: float = 300.0) -> FileResult:
    merged = FileResult()
    fatals = []
    names = tuple(spec.test_names)
    per_session = spec.netduino2_tests_per_session
    for first in range(0, len(names), per_session):
        group = names[first : first + per_session]
        result = run_on_qemu(spec, timeout_s, Netduino2Target, group)
        merged.outcomes.update(result.outcomes)
        if result.fatal:
            fatals.append(f"session {group[0]}..{group[-1]}: {result.fatal}")
    merged.fatal = "\n".join(fatals) or None
    return merged


RUNNERS = {"unix": run_on_unix, "qemu": run_on_qemu, "netduino2": run_on_netduino2}


def run_file(spec: FileSpec, target: str) -> FileResult:
    return RUNNERS[target](spec)


def dumps_for_debug(result: FileResult) -> str:
    return json.dumps({"fatal": result.fatal, "outcomes": result.outcomes}, indent=1)
