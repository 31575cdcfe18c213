# Board support for the emulated controller: QEMU's mps2-an385 (Cortex-M3, 25 MHz, no FPU).
# The only firmware module besides boards/unix/board.py that touches `machine`.
#
# Memory map used (ARM AN385 application note, QEMU hw/arm/mps2.c):
#   0x40000000 CMSDK TIMER0   microsecond clock (free-running, counts down at 25 MHz)
#   0x40004000 CMSDK UART0    ground link (QEMU's first -serial; also the REPL)
#   0x40005000 CMSDK UART1    payload bus to the optical head (QEMU's second -serial)
#   0x40006000 CMSDK UART2    tracking link to the optical head (QEMU's third -serial, when
#                             the launcher wires it: strap word 2), the TRACK exchange's own
#                             link, received by irqtimer's RX interrupt (IRQ 4)
#   0x40001000 CMSDK TIMER1   the tracking loop's period interrupt (irqtimer, IRQ 9)
#   0x40008000 CMSDK WATCHDOG resets the MCU when the main loop stops feeding it
#   0x20000000 SSRAM2         boot strap word (set by the launcher with -device loader)
#   0x21000000 PSRAM          the "flash": a NOR chip of 4 KiB sectors (erased to 0xFF)
#                             that littlefs is mounted on through EraseAhead
#   0x21200000 PSRAM          the link key's region, outside littlefs (keystore.py)
# MicroPython itself lives in SSRAM1 at 0x00000000, so the last two are free for us.

# imported at boot: its first import takes the timer interrupt's stack reserve off the
# main program's stack limit (firmware/cmodules/irqtimer/irqtimer.c STACK_RESERVE)
import irqtimer  # noqa: F401
import machine
import micropython
from micropython import const
from payload import boardkit, keystore, waits

NAME = "qemu"

# The optical head behind UART1 is emulated by a host process on a shared machine, not an
# FPGA that answers in microseconds: a reply can be seconds late under load without
# anything being wrong. A flight board uses 500 ms.
BUS_TIMEOUT_US = const(10_000_000)

# The tracking loop's rate in pass mode (the scheduler's paced loop over the payload bus):
# the highest configurable rate whose paced period leaves at least 15 % of the CPU to the
# other duties, measured on this image with QEMU -icount: 9,305 instructions, 74 % of the
# 25 MHz CPU at 2 kHz (the limit 10,625; tests/firmware/mptest_paced_loop_cost.py,
# docs/scheduling.md "The paced loop"). A pass gets that rate's gain set; a faster one is
# refused.
TRACKING_LOOP_RATE_HZ = const(2000)
# Where the tracking link is wired the loop's period runs from the timer interrupt
# (payload/tracking_duty.py TimerLoop): how long into its period it polls for the TRACK
# reply still on its way before leaving it to the next period. A fifth of the 2 kHz period:
# QEMU hands the UART its bytes at the host's pace (docs/scheduling.md "The loop on a timer
# interrupt"); a head on SPI with DMA answers in microseconds, well within it.
TRACKING_REPLY_WAIT_US = const(100)
# Cycles an instruction takes, for figures counted in instructions (QEMU -icount): the
# MPS2's SSRAM has no wait states, one cycle an instruction as -icount counts them.
CYCLES_PER_INSTRUCTION = const(1)

_TIMER0 = const(0x40000000)
_UART0 = const(0x40004000)
_UART1 = const(0x40005000)
_UART2 = const(0x40006000)
_STRAP_ADDR = const(0x20000000)
_FLASH_ADDR = const(0x21000000)
_FLASH_BLOCK_BYTES = const(4096)
_FLASH_BLOCKS = const(512)  # 2 MiB of the 16 MiB PSRAM: a W25Q16-class NOR's sectors
# EraseAhead (docs/storage.md "Erase ahead"): sectors kept erased ahead, and the journal's
# sectors per copy: the map of 500 blocks needs 502 of its 16-byte slots, 4 sectors hold
# 1024 (a compaction every ~520 remaps). littlefs sees 512 - 8 - 4 = 500 blocks.
_FLASH_SPARES = const(4)
_FLASH_JOURNAL_SECTORS = const(4)
# littlefs read/program granularity (also its cache size per file): the default 32 made
# a 2 kB record's append + sync cost 13.5 M instructions (a Python block-device call per
# 32 bytes), 512 costs 2.1 M (measured with -icount; docs/scheduling.md). Two 256-byte
# NOR pages per program call.
_LFS_IO_BYTES = const(512)
# littlefs's read size: 32, below the program size. Each time littlefs's allocator has used
# its lookahead window it walks every file's block list, one read per block, and a read is
# a whole read size through the Python block device: with 512 that walk was one append of
# 3.7-6.5 M instructions every ~1,400 appends (QEMU -icount, 4,000 appends of 200, 972 and
# 28 bytes with a sync per 40: worst append 6.5 M, worst sync 2.95 M); with 32 the worst
# append is 1.75 M, the worst sync 0.93 M and all of them cost 14 % less (docs/storage.md
# "littlefs's mount parameters"). The lookahead stays 32 bytes (a 256-block window of the
# 500): 64, the whole store, made the walks rarer but each no shorter (worst append 2.09 M
# at read size 32, 8.6 M at 512).
_LFS_READ_BYTES = const(32)
_LFS_LOOKAHEAD_BYTES = const(32)
_KEY_REGION_ADDR = const(0x21200000)  # just past the littlefs blocks: a format spares it
_STRAP_MAINTENANCE = const(0x4E49414D)  # b"MAIN" little-endian: stay in the REPL
_STRAP_TRACK_ADDR = const(0x20000004)
_STRAP_TRACK = const(0x4B415254)  # b"TRAK": the launcher wired the tracking link
_WATCHDOG = const(0x40008000)
_WDOG_LOAD = const(0x00)
_WDOG_CTRL = const(0x08)
_WDOG_INTCLR = const(0x0C)
_WDOG_LOCK = const(0xC00)
# The watchdog raises its interrupt at one period and resets at the second, so a hung loop
# resets in <= 220 s; the main loop's waits are held to the first (the interrupt may be
# the NMI, whose handler in the port does not return). The longest bounded wait here is a
# pass with a dead head that takes a stop: its first timed-out transaction and the
# laser-off command's, 4 tries each of the emulation's 10 s BUS_TIMEOUT_US: 80 s, within
# 3/4 of 110 s (payload/waits.py; the laser stop's 50 s was already above 3/4 of the former
# 60 s). This test chip flies nowhere: the period is the emulation's (the CMSDK counter
# takes up to 171 s at 25 MHz).
WATCHDOG_PERIOD_S = const(110)
WATCHDOG_LIMIT_US = const(110_000_000)
_CPU_HZ = const(25_000_000)
_CYCLES_PER_US = const(25)
# CMSDK UART registers (word offsets) and bits
_UART_DATA = const(0)
_UART_STATE = const(1)
_UART_CTRL = const(2)
_UART_BAUDDIV = const(4)
_STATE_TX_FULL = const(1)
_STATE_RX_FULL = const(2)
_RX_SPIN = const(400)  # status polls to wait for the next byte of a burst
# Status polls one write waits for the transmit register, in all (not per byte): the
# tracking link's write runs in the timer interrupt, and a peer that stops reading holds
# TX_FULL set for good (QEMU: its socket's buffers full), so an unbounded wait hung the
# interrupt until the watchdog reset the board. A few tens of microseconds at 25 MHz.
_TX_SPIN = const(400)

STORAGE_ROOT = "/flash"
# littlefs on flash: the store keeps 1/8 of the filesystem out of its quota whatever the
# size (payload/storage.py, docs/storage.md "Quota").
STORAGE_MEDIUM = "littlefs"


class Uart(boardkit.PolledUart):
    """A CMSDK APB UART driven by register polling; non-blocking like a FIFO-less MCU UART.

    QEMU holds back further input until DATA is read, so nothing is lost while the
    firmware is busy: the host side simply waits (hardware flow control in effect).
    """

    def __init__(self, base):
        machine.mem32[base + 4 * _UART_BAUDDIV] = 16
        machine.mem32[base + 4 * _UART_CTRL] = 3  # TX and RX enabled
        super().__init__(base, _uart_readinto, _uart_write)


@micropython.viper
def _uart_readinto(base: int, buf: ptr8, length: int) -> int:
    # Once a byte has come, wait a little for the next one (a byte time at 1 Mbaud is
    # ~250 cycles): returning after every byte would cost a Python call per byte.
    regs = ptr32(base)
    count = 0
    spin = 0
    while count < length:
        if not (regs[_UART_STATE] & _STATE_RX_FULL):
            if count == 0 or spin >= _RX_SPIN:
                break
            spin += 1
            continue
        buf[count] = regs[_UART_DATA]
        count += 1
        spin = 0
    return count


@micropython.viper
def _uart_write(base: int, buf: ptr8, length: int) -> int:
    # Bounded: the bytes the transmit register took (fewer under back-pressure: the main
    # loop's callers write the rest later, bounded by their own timeouts; the tracking
    # period counts its request as not sent, a link fault: tracking_duty._timer_period).
    regs = ptr32(base)
    count = 0
    spin = 0
    while count < length:
        if regs[_UART_STATE] & _STATE_TX_FULL:
            if spin >= _TX_SPIN:
                break
            spin += 1
            continue
        regs[_UART_DATA] = buf[count]
        count += 1
    return count


class Clock(boardkit.ExtendedClock):
    """Microsecond clock from TIMER0, extended to 64 bits without allocating (the state and
    its single-writer rules: payload/boardkit.py). TIMER0 counts down through 2**32 cycles
    (171.8 s at 25 MHz); `update()` must run at least that often (the scheduler calls it
    every pass). A copy holds (last timer value, leftover cycles, microseconds low word,
    high word)."""

    def __init__(self):
        machine.mem32[_TIMER0 + 8] = 0xFFFFFFFF  # RELOAD
        machine.mem32[_TIMER0 + 0] = 1  # CTRL: enable, no interrupt
        super().__init__(_clock_update, _clock_stamp, machine.mem32[_TIMER0 + 4] & 0xFFFFFFFF)


@micropython.viper
def _clock_update(state: ptr32) -> int:
    active = state[0]
    src = 1 + 4 * active
    dst = 5 - 4 * active
    now = ptr32(_TIMER0)[1]
    elapsed = state[src] - now  # down-counter: wraps modulo 2**32 in 32-bit arithmetic
    # 67.1 s of cycles, to take off an elapsed >= 2**31 before signed division; built at
    # run time because a folded constant >= 2**30 would be a heap object here.
    big_chunk_us = 0x4000000
    big_chunk_cycles = big_chunk_us
    big_chunk_cycles *= _CYCLES_PER_US
    total = state[src + 1] + elapsed
    add_us = 0
    if total < 0:  # elapsed >= 2**31 cycles (signed overflow): take a chunk off first
        total -= big_chunk_cycles
        add_us = big_chunk_us
    whole_us = total // _CYCLES_PER_US  # (one division: a runtime call each)
    add_us += whole_us
    low = state[src + 2]
    new_low = low + add_us
    high = state[src + 3]
    if uint(new_low) < uint(low):
        high += 1
    state[dst] = now
    state[dst + 1] = total - whole_us * _CYCLES_PER_US
    state[dst + 2] = new_low
    state[dst + 3] = high
    state[0] = 1 - active  # publish: one word store
    return new_low & 0x3FFFFFFF  # ticks_us() (boardkit.ExtendedClock): one native call


@micropython.viper
def _clock_stamp(state: ptr32, buf: ptr8, offset: int):
    src = 1 + 4 * state[0]
    low = state[src + 2]
    high = state[src + 3]
    now = ptr32(_TIMER0)[1]
    elapsed = state[src] - now
    if elapsed < 0:  # a whole update period without update(): cannot be, clamp
        elapsed = 0
    add_us = (state[src + 1] + elapsed) // _CYCLES_PER_US
    new_low = low + add_us
    if uint(new_low) < uint(low):
        high += 1
    for i in range(4):
        buf[offset + i] = (new_low >> (8 * i)) & 0xFF
        buf[offset + 4 + i] = (high >> (8 * i)) & 0xFF


# An image whose waits outlast the watchdog does not boot (ValueError at import);
# tests/firmware/mptest_board.py checks the same on every target.
waits.check(BUS_TIMEOUT_US, WATCHDOG_LIMIT_US)

ground_link = Uart(_UART0)
payload_bus = Uart(_UART1)
# The TRACK exchange's own link (docs/scheduling.md "The loop on a timer interrupt"), where
# the launcher wired one; None: the loop is paced over the payload bus
tracking_link = Uart(_UART2) if machine.mem32[_STRAP_TRACK_ADDR] == _STRAP_TRACK else None
clock = Clock()
key_region = keystore.MemoryRegion(_KEY_REGION_ADDR)
storage_formatted = False  # set when mounting failed and storage was formatted
flash = boardkit.RamNorDevice(_FLASH_ADDR, _FLASH_BLOCK_BYTES, _FLASH_BLOCKS)
store = boardkit.FlashStore(
    flash,
    STORAGE_ROOT,
    _LFS_IO_BYTES,
    _FLASH_SPARES,
    _FLASH_JOURNAL_SECTORS,
    _LFS_READ_BYTES,
    _LFS_LOOKAHEAD_BYTES,
)


def boot_mode():
    """'maintenance' when the launcher set the strap word (stay at the REPL), else 'app'."""
    if machine.mem32[_STRAP_ADDR] == _STRAP_MAINTENANCE:
        return "maintenance"
    return "app"


def mount_storage():
    """Mount littlefs at STORAGE_ROOT through EraseAhead, formatting a device that does
    not mount (first boot); the link key is not lost (it lives outside littlefs)."""
    global storage_formatted
    if store.mount():
        storage_formatted = True
    return STORAGE_ROOT


def storage_background():
    """The scheduler's last duty: one sector erased ahead, if one is owed."""
    return store.background()


_WDOG_UNLOCK_KEY = (0x1ACCE << 12) | 0x551  # 0x1ACCE551: a heap int, made once


def _watchdog_unlock():
    machine.mem32[_WATCHDOG + _WDOG_LOCK] = _WDOG_UNLOCK_KEY


def watchdog_start():
    """CMSDK APB watchdog (ARM DDI 0479): counts down at the 25 MHz system clock, raises
    its interrupt at zero and reloads; still unfed at the next zero, it resets the MCU."""
    _watchdog_unlock()
    machine.mem32[_WATCHDOG + _WDOG_LOAD] = WATCHDOG_PERIOD_S * _CPU_HZ
    machine.mem32[_WATCHDOG + _WDOG_CTRL] = 3  # INTEN | RESEN
    machine.mem32[_WATCHDOG + _WDOG_LOCK] = 0


def watchdog_feed():
    # a write to INTCLR clears the interrupt and reloads the counter (needs the unlock)
    _watchdog_unlock()
    machine.mem32[_WATCHDOG + _WDOG_INTCLR] = 1
    machine.mem32[_WATCHDOG + _WDOG_LOCK] = 0


def watchdog_stop():
    """For the maintenance REPL on the emulated board (an STM32 IWDG cannot be stopped:
    there the REPL session lasts one watchdog period unless the operator feeds it)."""
    _watchdog_unlock()
    machine.mem32[_WATCHDOG + _WDOG_CTRL] = 0
    machine.mem32[_WATCHDOG + _WDOG_LOCK] = 0


def watchdog_remaining_cycles():
    return machine.mem32[_WATCHDOG + 0x04] & 0xFFFFFFFF


def idle():
    machine.idle()


def reset():
    machine.reset()  # QEMU: exits through semihosting; a board restarts


def cpu_hz():
    return _CPU_HZ
