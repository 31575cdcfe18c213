"""The QEMU target as the deploy path and as a deterministic clock."""

import subprocess
import sys
from pathlib import Path

import pytest

from emulator.targets import QemuTarget
from host.deploy.raw_repl import RawRepl

MPREMOTE = str(Path(sys.executable).with_name("mpremote"))
pytestmark = pytest.mark.qemu


def test_mpremote_executes_code_through_the_qemu_pty():
    # The same raw-REPL path that deploys to a real board over USB/UART.
    with QemuTarget(boot="maintenance") as target:
        result = subprocess.run(
            [MPREMOTE, "connect", target.ground_port, "exec",
             "import board, sys; print(sys.platform, board.NAME, board.boot_mode(), 6 * 7)"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["qemu", "qemu", "maintenance", "42"]


# Reads TIMER0 (25 MHz down-counter) directly: cycles, not microseconds, so there is no
# rounding to hide a difference.
TIMED_LOOP = """
import machine
total = 0
start = machine.mem32[0x40000004]
for i in range(20000):
    total += i * 3
end = machine.mem32[0x40000004]
print("elapsed_cycles", (start - end) & 0xFFFFFFFF)
"""


def _elapsed_cycles(icount_shift):
    with QemuTarget(boot="maintenance", icount_shift=icount_shift) as target:
        with RawRepl(target.ground_port) as repl:
            out = repl.exec(TIMED_LOOP)
    return int(out.split()[-1])


def test_icount_makes_emulated_time_follow_the_instruction_count():
    # With -icount the same code takes the same emulated time, however loaded the host
    # is: timing-dependent firmware tests cannot flake. A larger shift means more ns per
    # instruction, so the same loop takes proportionally longer in emulated time.
    first = _elapsed_cycles(icount_shift=4)
    second = _elapsed_cycles(icount_shift=4)
    assert first == second > 0
    slower = _elapsed_cycles(icount_shift=6)
    assert 3.5 < slower / first < 4.5
