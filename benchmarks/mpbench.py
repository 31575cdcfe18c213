"""Running a MicroPython benchmark program on the firmware's targets (unix: wall time;
QEMU MPS2-AN385 with -icount shift=0: one emulated ns per instruction) and reading the
dict it prints on its `BENCH ` line. Shared by bench_firmware.py and bench_product_seal.py."""

import json
import os
import subprocess
import tempfile
from pathlib import Path

from emulator.targets import CONTROLLER_HEAP_BYTES, FIRMWARE_DIR, MICROPYTHON_BIN, QemuTarget
from host.deploy.raw_repl import RawRepl

# MicroPython: timed(fn, reps) -> (elapsed us, reps) on the board's clock; a benchmark
# program imports board, then includes this.
TIMED = """
clock = board.clock


def timed(fn, reps):
    clock.update()
    t0 = clock.ticks_us()
    for _ in range(reps):
        fn()
    return ((clock.ticks_us() - t0) & 0x3FFFFFFF, reps)
"""


def parse_bench(output: str) -> dict:
    line = next(line for line in output.splitlines() if line.startswith("BENCH "))
    return json.loads(line[6:].replace("(", "[").replace(")", "]").replace("'", '"'))


def run_unix(program_text: str) -> dict:
    with tempfile.TemporaryDirectory() as work:
        program = Path(work) / "bench.py"
        program.write_text(program_text)
        env = dict(os.environ)
        env["MICROPYPATH"] = f"{FIRMWARE_DIR}:{FIRMWARE_DIR / 'boards' / 'unix'}:.frozen"
        env["QKDSAT_STORAGE"] = str(Path(work) / "flash")
        proc = subprocess.run(
            [str(MICROPYTHON_BIN), "-X", f"heapsize={CONTROLLER_HEAP_BYTES}", str(program)],
            capture_output=True, text=True, env=env, cwd=work, timeout=300,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return parse_bench(proc.stdout)


def run_qemu(program_text: str) -> dict:
    with QemuTarget(boot="maintenance", icount_shift=0) as target:
        with RawRepl(target.ground_port, timeout_s=30.0) as repl:
            return parse_bench(repl.exec(program_text, timeout_s=600))
