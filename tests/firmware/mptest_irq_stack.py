# The timer interrupt's callback runs on the stack of the code it interrupts
# (firmware/cmodules/irqtimer, docs/scheduling.md "The loop on a timer interrupt"). The
# port checks that stack only against its limit (10,240 bytes, ports/qemu/main.c), and the
# STM32 board's C stack region is exactly that long, with the RAM disk standing in for the
# flash right below it (stm32f205.ld). Found in review: a recursion of the main program to
# the limit stopped the tracking loop's timer (its callback raised RuntimeError on the
# main program's stack), and the C code that runs past the last check (the raise, and the
# interrupt on top of it) wrote ~240 bytes below the stack region, into the STM32 board's
# flash disk. irqtimer now keeps a reserve of the stack for the interrupt and that C code.
import array

import board
import micropython

# the clock follows the instruction count (1 ns an instruction): the interrupts that land
# in the recursions are the same in every run, whatever the host's load
QEMU_ICOUNT_SHIFT = 0
TARGETS = ("qemu", "netduino2")
TARGETS_REASON = "the unix port has no timer interrupt (irqtimer is in the MCU images only)"
_REGION_BYTES = 10_240  # the stack both MCU images' C code may use (the port's limit)
_BELOW_BYTES = 2_048  # what is checked below it
_PERIOD_US = 50


# The bottom of the C stack region: the STM32 board's linker script's STACK region (right
# above its FLASHDISK, firmware/boards/netduino2/stm32f205.ld); the MPS2's stack starts at
# the top of its 4 MiB of RAM (firmware/boards/qemu/mps2_an385.ld)
_NETDUINO2_STACK_BOTTOM = 0x2001D800
_MPS2_STACK_TOP = 0x400000


def _stack_bottom():
    if board.NAME == "netduino2":
        return _NETDUINO2_STACK_BOTTOM
    return _MPS2_STACK_TOP - _REGION_BYTES


def _below_the_stack():
    import machine

    start = _stack_bottom() - _BELOW_BYTES
    return bytes(machine.mem8[start + i] for i in range(_BELOW_BYTES))


def _deep(n):
    return _deep(n + 1) + 1


def _to_the_limit():
    try:
        _deep(0)
    except RuntimeError:  # the port's stack check: maximum recursion depth
        return True
    return False


@micropython.viper
def _count(counter):
    c = ptr32(counter)
    c[0] = c[0] + 1


def test_a_recursion_to_the_stack_limit_neither_stops_the_timer_nor_leaves_the_stack():
    import irqtimer

    counter = array.array("i", [0])
    before = _below_the_stack()
    irqtimer.start(_PERIOD_US, _count, counter)
    try:
        # each recursion spends a few us near the limit: many of them, at a 50 us period,
        # put the interrupt there (the first few did, on the image before the reserve)
        for _ in range(300):
            assert _to_the_limit()
    finally:
        irqtimer.stop()
    fired, errors, _, _, _ = irqtimer.counters()  # (kept after the stop)
    error = irqtimer.last_error()
    after = _below_the_stack()
    assert errors == 0 and error is None, (fired, errors, error)
    print("@@irq_stack", fired)
    # (272 interrupts during the 300 recursions on the MPS2, 298 on netduino2: the same
    # in every run under -icount)
    assert fired >= 200 and counter[0] == fired, (fired, counter[0])
    changed = [i for i in range(_BELOW_BYTES) if before[i] != after[i]]
    assert not changed, "%d bytes changed, the deepest %d below the stack" % (
        len(changed),
        _BELOW_BYTES - changed[0],
    )
