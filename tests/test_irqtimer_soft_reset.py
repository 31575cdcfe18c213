"""irqtimer (firmware/cmodules/irqtimer) across the raw REPL's soft reset, on both MCU
images: a program that leaves the timer and the tracking link's receive interrupt running
(killed, or an error before its stop) must not leave them calling into the heap the reset
frees. The module's finaliser stops both when the reset sweeps the heap; the next session
starts with them stopped and can start them again."""

from __future__ import annotations

import pytest

from emulator.targets import Netduino2Target, QemuTarget
from host.deploy.raw_repl import RawRepl

LEFT_RUNNING = """
import array, irqtimer
counter = array.array("i", [0])
rx = bytearray(64)
words = array.array("i", [0, 0, 0])
def count(c):
    c[0] += 1
irqtimer.open(rx, words)
irqtimer.start(100, count, counter)
x = 0
for i in range(100000):
    x += i
print("@@before", irqtimer.running(), counter[0] > 0)
"""
AFTER_RESET = """
import array, gc, irqtimer
fired = irqtimer.fired()  # (the count of the last run, kept: it counts from a start)
junk = [bytearray(512) for _ in range(64)]  # the heap the old callback lived in, reused
junk = None
gc.collect()
print("@@after", irqtimer.running(), irqtimer.fired() == fired)
counter = array.array("i", [0])
def count(c):
    c[0] += 1
irqtimer.start(100, count, counter)
x = 0
for i in range(100000):
    x += i
irqtimer.stop()
print("@@again", counter[0] > 0, irqtimer.counters()[1])
"""


@pytest.mark.parametrize("target_class", [QemuTarget, Netduino2Target], ids=["qemu", "netduino2"])
def test_a_soft_reset_stops_the_timer_and_the_link_interrupt(target_class):
    with target_class(boot="maintenance", icount_shift=0) as target:
        with RawRepl(target.ground_port, timeout_s=30.0) as repl:
            assert "@@before True True" in repl.exec(LEFT_RUNNING, timeout_s=60)
            repl.serial.write(b"\x04")  # at the raw REPL's prompt: a soft reset
            repl._read_until(b"raw REPL; CTRL-B to exit\r\n>", 30.0)
            output = repl.exec(AFTER_RESET, timeout_s=60)
    assert "@@after False True" in output, output  # stopped: no callback since the reset
    assert "@@again True 0" in output, output
