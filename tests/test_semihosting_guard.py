"""The semihosting guard (firmware/cmodules/semihosting_guard) on genuine faults: only a
semihosting call is answered as refused; every other HardFault reaches the port's register
dump (ports/qemu/mcu/arm/errorhandler.c) with the registers it faulted with, and the
handler reads no instruction outside the image (on the part a bus fault in the HardFault
handler is a lockup: no dump, nothing until the IWDG).

The faults are raised from the maintenance REPL (QEMU with -semihosting, which answers a
BKPT 0xAB itself: the guard sees only genuine faults there). The guard's answer to a call
with no host, from thread mode and from an interrupt: the MPS2 image on QEMU without
-semihosting, whose maintenance strap is a RAM word, so its REPL is there with no host
(the netduino2 image's strap is the semihosting line: tests/test_netduino2_launcher.py
boots it with no host, as the part, the app and no REPL)."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from emulator.targets import Netduino2Target, QemuTarget
from host.deploy.raw_repl import RawRepl

GUARD_C = (
    Path(__file__).resolve().parent.parent
    / "firmware/cmodules/semihosting_guard/semihosting_guard.c"
)

# A BKPT 0xAB in the heap (inside the image's RAM, where asm_thumb code lives), branched to
# with the Thumb bit clear: an INVSTATE UsageFault, escalated to HardFault, whose stacked PC
# is that BKPT. Not a semihosting call: the dump must show the PC and r0 it faulted with.
INVSTATE_AT_A_CALL = """
import uctypes
code = bytearray(b"\\xab\\xbe\\x00\\xbf\\x00\\xbf")  # BKPT 0xAB, NOP, NOP
@micropython.asm_thumb
def branch(r0):
    data(2, 0x4700)  # BX r0
print("@@at %08X" % uctypes.addressof(code))
branch(uctypes.addressof(code))
print("@@survived")
"""
# A BKPT with another immediate: a breakpoint, not a semihosting call
OTHER_BKPT = """
@micropython.asm_thumb
def breakpoint(r0):
    data(2, 0xBE01)  # BKPT 0x01
print("@@at 0")
breakpoint(0x5E5E)
print("@@survived")
"""
# A call through an erased flash word (0xFFFFFFFF): the fetch at 0xFFFFFFFE faults
ERASED_POINTER = """
@micropython.asm_thumb
def branch(r0):
    data(2, 0x4700)  # BX r0
print("@@at FFFFFFFE")
branch(0xFFFFFFFF)
print("@@survived")
"""


class _LoggedTarget:
    """The target with QEMU's guest-error log: an access to no device (which the part
    answers with a bus fault) is logged as 'Invalid read at addr ...'."""

    def __init__(self, target_class, log_path: Path):
        self.log_path = log_path

        class Logged(target_class):
            def command(inner):
                return super().command() + ["-d", "guest_errors", "-D", str(log_path)]

        self.target = Logged(boot="maintenance", icount_shift=0)


def _fault(target_class, code: str, tmp_path: Path) -> tuple[str, dict[str, int], str]:
    """Run code at the maintenance REPL until the port's register dump: (what the code
    printed before, the dump's registers, QEMU's guest-error log)."""
    logged = _LoggedTarget(target_class, tmp_path / "qemu.log")
    with logged.target as target:
        repl = RawRepl(target.ground_port, timeout_s=30.0)
        try:
            repl.enter()
            repl.serial.write(code.encode() + b"\x04")
            text = repl._read_until(b"xPSR: ", 30.0) + repl._read_until(b"\n", 5.0)
        finally:
            repl.close()
    output = text.decode(errors="replace")
    assert "HardFault exception caught" in output, output
    assert "@@survived" not in output, output
    registers = {
        name: int(value, 16) for name, value in re.findall(r"(\w+):\s+([0-9A-F]{8})", output)
    }
    log = logged.log_path.read_text() if logged.log_path.exists() else ""
    return output, registers, log


TARGETS = pytest.mark.parametrize(
    "target_class",
    [
        pytest.param(QemuTarget, marks=pytest.mark.qemu),
        pytest.param(Netduino2Target, marks=pytest.mark.netduino2),
    ],
    ids=["qemu", "netduino2"],
)


@TARGETS
def test_a_genuine_fault_at_a_semihosting_bkpt_reaches_the_dump_as_it_faulted(
    target_class, tmp_path
):
    output, registers, _ = _fault(target_class, INVSTATE_AT_A_CALL, tmp_path)
    at = int(re.search(r"@@at ([0-9A-F]{8})", output)[1], 16)
    # Before the fault status was looked at, the guard took the BKPT under the stacked PC
    # for a call: it stepped past it and wrote -1 into r0 (the dump showed PC at+2, r0
    # FFFFFFFF, a fault that never happened there)
    assert (registers["R15"], registers["R0"]) == (at, at), output


@TARGETS
def test_another_breakpoint_reaches_the_dump(target_class, tmp_path):
    output, registers, _ = _fault(target_class, OTHER_BKPT, tmp_path)
    assert registers["R0"] == 0x5E5E, output


@TARGETS
def test_a_fetch_from_outside_the_image_is_not_read_again_by_the_handler(target_class, tmp_path):
    output, registers, log = _fault(target_class, ERASED_POINTER, tmp_path)
    assert (registers["R15"], registers["R0"]) == (0xFFFFFFFE, 0xFFFFFFFF), output
    # pc + 2 wrapped to 0 for this PC, so it passed for inside the flash, and the handler
    # read the halfword at 0xFFFFFFFE: on the part, a bus fault in the HardFault handler
    assert "Invalid read at addr 0xFFFFFFFE" not in log, log


# The guard's test of the stacked PC and fault status, compiled for the host: the bounds
# are linker symbols, set here to the netduino2 image's (arm-none-eabi-nm firmware.elf), and
# to an image linked at the part's flash address (0x08000000, as a board port links it:
# below it, 0x00100000-0x07FFFFFF, the STM32F205 has nothing to read)
_NETDUINO2_BOUNDS = {
    "isr_vector": 0x0,
    "_sidata": 0x56AB0,
    "_sdata": 0x20000000,
    "_ebss": 0x20018580,
}
_FLASH_LINKED_BOUNDS = dict(_NETDUINO2_BOUNDS, isr_vector=0x08000000, _sidata=0x08056AB0)
_HARNESS = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
uint32_t semihosting_guard_may_be_call(uint32_t pc, uint32_t cfsr);
int main(int argc, char **argv) {
    for (int i = 1; i + 1 < argc; i += 2) {
        uint32_t pc = strtoul(argv[i], NULL, 0), cfsr = strtoul(argv[i + 1], NULL, 0);
        printf("%u\n", semihosting_guard_may_be_call(pc, cfsr));
    }
    return 0;
}
"""


@pytest.mark.parametrize(
    "bounds", [_NETDUINO2_BOUNDS, _FLASH_LINKED_BOUNDS], ids=["at_0", "at_flash"]
)
def test_the_guard_reads_only_a_whole_halfword_inside_the_image(bounds, tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no host C compiler")
    harness = tmp_path / "harness.c"
    harness.write_text(_HARNESS)
    binary = tmp_path / "guard"
    symbols = ",".join(f"--defsym={name}={value:#x}" for name, value in bounds.items())
    subprocess.run(
        [cc, "-std=gnu99", "-Wall", "-Werror", "-O2", "-fno-pie", "-no-pie", "-o", str(binary),
         str(harness), str(GUARD_C), f"-Wl,{symbols}"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    flash_start, flash_end = bounds["isr_vector"], bounds["_sidata"]
    ram_start, ram_end = bounds["_sdata"], bounds["_ebss"]
    cases = {
        (flash_start, 0): 1,
        (flash_start + 0x1000, 0): 1,
        (flash_end - 2, 0): 1,
        (flash_end - 1, 0): 0,  # odd: no stacked PC is
        (flash_end, 0): 0,
        (ram_start - 2, 0): 0,
        (ram_start, 0): 1,
        (ram_end - 2, 0): 1,
        (ram_end, 0): 0,
        (0x2001FFF0, 0): 0,  # the stack: no code there
        (0xFFFFFFFE, 0): 0,  # pc + 2 wraps to 0
        (0xFFFFFFFC, 0): 0,
        (0x00100000, 0): 0,  # linked at 0x08000000: reserved on the part
        (flash_start + 0x1000, 1 << 17): 0,  # UFSR.INVSTATE: a UsageFault, not a BKPT
        (flash_start + 0x1000, 1 << 0): 0,  # MMFSR.IACCVIOL
        (flash_start + 0x1000, 1 << 10): 0,  # BFSR.IMPRECISERR: the PC is past the store
    }
    args = [f"{value:#x}" for case in cases for value in case]
    started = time.monotonic()
    result = subprocess.run([str(binary), *args], check=True, capture_output=True, text=True)
    assert time.monotonic() - started < 10
    answers = [int(line) for line in result.stdout.split()]
    assert dict(zip(cases, answers, strict=True)) == cases


class _Mps2WithNoHost(QemuTarget):
    """The MPS2 image with QEMU given no -semihosting: a BKPT is taken as on a part with no
    debugger (HardFault, into the guard), and the maintenance strap is the RAM word the
    launcher loads (not the semihosting line), so the REPL is there to call from."""

    def command(self):
        return [arg for arg in super().command() if arg != "-semihosting"]


_CALLS = """
import array, irqtimer
@micropython.asm_thumb
def call(r0, r1):
    data(2, 0xBEAB)  # BKPT 0xAB
@micropython.asm_thumb
def call_then_r1(r0, r1):
    data(2, 0xBEAB)
    mov(r0, r1)
print("@@thread", call(0x15, 0) & 0xFFFFFFFF, call_then_r1(0x01, 1234))
got = array.array("I", [0, 0])
def in_irq(got):
    if got[1] == 0:
        got[0] = call(0x15, 0)
        got[1] = 1
irqtimer.start(100, in_irq, got)
for i in range(200000):
    if got[1]:
        break
irqtimer.stop()
print("@@irq", got[0], got[1])
"""
_EXIT_IN_IRQ = """
import irqtimer
@micropython.asm_thumb
def call(r0, r1):
    data(2, 0xBEAB)
def in_irq(arg):
    call(0x18, 0x20026)  # SYS_EXIT, ADP_Stopped_ApplicationExit
irqtimer.start(100, in_irq, None)
for i in range(200000):
    pass
print("@@survived")
"""


@pytest.mark.qemu
def test_a_call_with_no_host_is_refused_in_thread_mode_and_in_an_interrupt():
    # The HardFault taken from thread mode and from the timer's interrupt handler (nested:
    # EXC_RETURN to handler mode) both return past the BKPT with -1 in r0 and the other
    # registers as they were (r1 here); a guard that did not step the PC would fault on
    # the same BKPT for good
    with _Mps2WithNoHost(boot="maintenance", icount_shift=0) as target:
        assert "-semihosting" not in target.command()
        with RawRepl(target.ground_port, timeout_s=30.0) as repl:
            output = repl.exec(_CALLS, timeout_s=60)
    assert "@@thread 4294967295 1234" in output, output
    assert "@@irq 4294967295 1" in output, output


@pytest.mark.qemu
def test_sys_exit_in_an_interrupt_resets_the_part():
    with _Mps2WithNoHost(boot="maintenance", icount_shift=0) as target:
        repl = RawRepl(target.ground_port, timeout_s=30.0)
        try:
            repl.enter()
            repl.serial.write(_EXIT_IN_IRQ.encode() + b"\x04")
            # the reset boots the image again: its banner, the strap reloaded with it
            text = repl._read_until(b"maintenance mode", 30.0)
        finally:
            repl.close()
        assert target.running()
    assert b"@@survived" not in text, text
