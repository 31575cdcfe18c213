# Board support for an STM32 payload controller: the STM32F2/F4 family (Cortex-M3/M4),
# run in CI as the STM32F205 of QEMU's netduino2 machine (docs/targets.md). Registers
# from RM0033 (STM32F205/207 reference manual); the same offsets hold on the F4 (RM0090).
# The only firmware module besides the other boards' that touches `machine`.
#
#   0x40011000 USART1   ground link (QEMU's first -serial; the port's REPL UART), received
#                       by irqtimer's RXNE interrupt (IRQ 37) into a ring once the
#                       application runs (GroundUart)
#   0x40004400 USART2   payload bus to the optical head (QEMU's second -serial)
#   0x40004800 USART3   tracking link to the optical head (QEMU's third -serial, when the
#                       launcher wires it: "track" on its command line), the TRACK
#                       exchange's own link, received by irqtimer's RX interrupt (IRQ 39)
#   SysTick             the tracking loop's period interrupt (irqtimer; docs/targets.md)
#   0x40000000 TIM2     microsecond clock (32-bit up-counter, free-running)
#   0x40003000 IWDG     independent watchdog (LSI-clocked: runs even if the core clock
#                       stops; once started it cannot be stopped)
#   0x40023C00 FLASH    flash interface: on the real part the link key's sector and the
#                       littlefs region are programmed through it (docs/targets.md)
#   the link key's region: a flash sector of its own on the real part; in this emulation
#   (QEMU models the flash as ROM) a RAM buffer outside littlefs (KeyRegion below)
import array

# imported at boot: its first import takes the timer interrupt's stack reserve off the
# main program's stack limit (firmware/cmodules/irqtimer/irqtimer.c STACK_RESERVE); the
# ground link's receive interrupt (GroundUart)
import irqtimer
import machine
import micropython
from micropython import const
from payload import boardkit, keystore, waits

NAME = "netduino2"

# The payload bus's reply timeout a try, in flight: the largest frame (bus.MAX_BODY_BYTES
# 2,064 bytes of body, ~2,080 on the wire with COBS, CRC and delimiter) takes 20.8 ms at
# 1 Mbaud (10 bits a byte; USART2 runs at 1 Mbaud and above, docs/targets.md), so a full
# request and a full reply 42 ms; 500 ms is 12 times that, for the head's own latency, and
# even at 115,200 baud the round trip (361 ms) fits. A dead head costs 4 tries (waits.
# BUS_RETRIES 3): 2 s before the fault is reported. Checked against the IWDG below.
FLIGHT_BUS_TIMEOUT_US = const(500_000)

# The tracking loop's rate in pass mode (the scheduler's paced loop over the payload bus):
# the highest configurable rate whose paced period leaves at least 15 % of the CPU to the
# other duties, measured on this image with QEMU -icount (tests/firmware/
# mptest_paced_loop_cost.py, docs/tracking.md "Loop rate in pass mode"): at 2 kHz on the
# 120 MHz core ~31 % at two cycles an instruction (9,230 instructions a period). A pass
# gets that rate's gain set (2 kHz: the defaults, which the 0.5 urad culmination figure is
# for); a faster one is refused.
TRACKING_LOOP_RATE_HZ = const(2000)
# Where the tracking link is wired the loop's period runs from the timer interrupt
# (payload/tracking_duty.py TimerLoop): how long into its period it polls for the TRACK
# reply still on its way before leaving it to the next period. A fifth of the 2 kHz period:
# QEMU hands the UART its bytes at the host's pace (docs/scheduling.md "The loop on a timer
# interrupt"); a head on SPI with DMA answers in microseconds, well within it.
TRACKING_REPLY_WAIT_US = const(100)
# Cycles an instruction takes, for figures counted in instructions (QEMU -icount): flash at
# 3 wait states at 120 MHz behind the ART accelerator; two assumed, a margin over the
# accelerator's near one (to be measured on the part with DWT_CYCCNT: docs/targets.md).
CYCLES_PER_INSTRUCTION = const(2)

_USART1 = const(0x40011000)
_USART2 = const(0x40004400)
_USART3 = const(0x40004800)
_TIM2 = const(0x40000000)
_IWDG = const(0x40003000)
# USART registers (byte offsets) and bits
_SR = const(0x00)
_DR = const(0x04)
_CR1 = const(0x0C)
_SR_RXNE = const(1 << 5)
_SR_TXE = const(1 << 7)
_CR1_ENABLE = const((1 << 13) | (1 << 3) | (1 << 2))  # UE | TE | RE
# TIM2 registers
_TIM_CR1 = const(0x00)
_TIM_EGR = const(0x14)
_TIM_CNT = const(0x24)
_TIM_PSC = const(0x28)
_TIM_ARR = const(0x2C)
# IWDG registers and keys
_IWDG_KR = const(0x00)
_IWDG_PR = const(0x04)
_IWDG_RLR = const(0x08)
_KEY_START = const(0xCCCC)
_KEY_UNLOCK = const(0x5555)
_KEY_FEED = const(0xAAAA)
# LSI 32 kHz / 256 = 125 Hz, 12-bit reload: 32.8 s nominal, the longest the IWDG has. The
# LSI is an RC oscillator of 17-47 kHz (STM32F205 datasheet, LSI characteristics), so the
# part may reset after 4,096 * 256 / 47 kHz = 22.3 s unfed: the limit the main loop's
# longest bounded wait is held to (payload/waits.py: at most 3/4 of it, 16.7 s; the laser
# stop's 10 s deadline and a dead head's 2 s transaction in flight: 12 s).
_IWDG_PRESCALER_256 = const(6)
_IWDG_RELOAD = const(4095)
WATCHDOG_PERIOD_S = const(32)
WATCHDOG_LIMIT_US = const(22_309_000)  # (4095 + 1) * 256 / 47,000 Hz, rounded down

_RX_SPIN = const(400)  # status polls to wait for the next byte of a burst
# The ground link's receive ring (GroundUart), a power of two: 1,024 bytes are 89 ms of
# uplink at 115,200 baud (10 bits a byte) that the main loop may spend elsewhere before a
# byte is lost, longer than its longest duty (a full bus transaction at 1 Mbaud 42 ms, a
# NOR commit 34-89 ms: docs/storage.md), and most of the largest telecommand's frame
# (encoded_capacity(1,200)); 1 KiB of this heap, taken when the application starts.
GROUND_RX_RING_BYTES = const(1024)
# Status polls the tracking link's write waits for TXE before each byte (see
# _uart_write_bounded): a write that gives up costs ~2,960 instructions (measured on this
# image, -icount: mptest_board_stm32.py), ~49 us at 120 MHz and two cycles an instruction,
# five byte times at 1 Mbaud; once per period at most (the next byte is not waited for).
_TX_SPIN = const(64)
_CPU_HZ = const(120_000_000)  # the netduino2 machine's system clock
# TIM2's input clock in this emulation, divided down to 1 MHz by the prescaler. On a real
# STM32F205 at 120 MHz, TIM2 on APB1 is clocked at 60 MHz: PSC = 59 (docs/targets.md).
TIMER_INPUT_HZ = 1_000_000_000  # QEMU's stm32f2xx_timer "clock-frequency"

# The TDC ring between the head's FIFO and storage: 512 events (4.6 kB) instead of 2048,
# so the data path fits the 128 KiB part (docs/targets.md).
TDC_RING_EVENTS = 512
# The tracking loop's telemetry ring: 64 samples (320 ms at the default decimation of 10 at
# 2 kHz; the product drains 40 at a time, losses are counted) instead of 256, so the tracker
# is 3.3 kB (2.8 kB since its transition ring was packed), not 8.7 kB: with the application
# up, this heap had ~28 kB free in holes of at most ~7.7 kB, and the 8.7 kB tracker found
# none (MemoryError at configure; docs/targets.md "A tracking pass on the STM32 board").
TRACKING_TELEMETRY_SLOTS = 64

STORAGE_ROOT = "/flash"
# littlefs on flash: the store keeps 1/8 of the filesystem out of its quota whatever the
# size (payload/storage.py, docs/storage.md "Quota").
STORAGE_MEDIUM = "littlefs"
_FLASH_BLOCK_BYTES = const(256)
_FLASH_BLOCKS = const(80)  # 20 KiB of RAM standing in for the flash region
# littlefs through EraseAhead (docs/storage.md "Erase ahead"), as on the flight board's
# NOR: 4 sectors erased ahead; the map of 64 blocks needs 66 of the journal's 16-byte
# slots, a 256-byte sector holds 16, so each journal copy spans 6 sectors (96 slots). So
# littlefs sees 80 - 12 - 4 = 64 blocks (16 KiB).
_FLASH_SPARES = const(4)
_FLASH_JOURNAL_SECTORS = const(6)
# Where that RAM is: SRAM the linker script keeps out of .bss, the heap and the stack
# (stm32f205.ld, region FLASHDISK), so the heap is what the real part's application has.
_FLASH_DISK_ADDR = const(0x20018800)


class Uart(boardkit.PolledUart):
    """An STM32 USART by register polling; non-blocking (returns what moved now) unless
    given the bounded write (the tracking link's)."""

    def __init__(self, base, write=None):
        machine.mem32[base + _CR1] = _CR1_ENABLE
        super().__init__(base, _uart_readinto, write or _uart_write)


class GroundUart(Uart):
    """USART1, the ground link. Polled like the others until the application takes the
    link (`start_receiving`, app.run); from then on received by its RXNE interrupt into a
    ring (irqtimer, C: nothing allocated in the handler) that `readinto` drains. On the
    part the USART holds one byte, and a polled link lost every byte that came while the
    main loop was busy elsewhere for more than a byte time (87 us at 115,200 baud): a bus
    transaction, a storage commit. Not at boot: the maintenance REPL reads USART1's data
    register itself and would get nothing."""

    def __init__(self, base, ring_bytes):
        super().__init__(base)
        self._ring_bytes = ring_bytes
        self._ring = None
        self.receiving = False
        # the interrupt's words: bytes put into the ring, bytes taken out, bytes received,
        # bytes lost to a full ring, USART overruns (irqtimer.ground_open)
        self.rx_words = array.array("i", bytes(20))

    def start_receiving(self):
        if self._ring is None:
            self._ring = bytearray(self._ring_bytes)
        irqtimer.ground_open(self._ring, self.rx_words)
        self.readinto = irqtimer.ground_read  # (the instance's: one C call a read)
        self.receiving = True

    def stop_receiving(self):
        """Back to polling (tests; the REPL after them): what the ring still holds is
        dropped."""
        irqtimer.ground_close()
        if self.receiving:
            del self.readinto  # the class's polled read again
            self.receiving = False

    def rx_lost(self):
        """(bytes lost to a full ring, USART overruns) since start_receiving, each
        wrapping at 2^30: the board's link counters (telecommands.link_counters)."""
        return self.rx_words[3], self.rx_words[4]


@micropython.viper
def _uart_readinto(base: int, buf: ptr8, length: int) -> int:
    regs = ptr32(base)
    count = 0
    spin = 0
    while count < length:
        if not (regs[0] & _SR_RXNE):  # SR
            if count == 0 or spin >= _RX_SPIN:
                break
            spin += 1
            continue
        buf[count] = regs[1]  # DR (reading it clears RXNE)
        count += 1
        spin = 0
    return count


@micropython.viper
def _uart_write(base: int, buf: ptr8, length: int) -> int:
    # Non-blocking: as many bytes as the transmit register takes now (the application
    # queues the rest, app.TxQueue).
    regs = ptr32(base)
    count = 0
    while count < length:
        if not (regs[0] & _SR_TXE):
            break
        regs[1] = buf[count]
        count += 1
    return count


@micropython.viper
def _uart_write_bounded(base: int, buf: ptr8, length: int) -> int:
    # The tracking link's write, called in the timer interrupt with a whole request frame
    # (tracking_duty._timer_period). A USART takes one byte at a time: TXE is clear for a
    # byte time after each byte goes into DR, so the non-blocking write above returns
    # after a byte or two on the part, and every period's request was cut short (counted
    # as send_failed, the head left with a frame's head). Here each byte waits for TXE, at
    # most _TX_SPIN polls; a TXE that stays clear (a link that stopped) ends the write
    # short after one such wait, and the period counts the request not sent. QEMU's USART
    # keeps TXE set (it writes each byte through at once): tests/firmware/
    # mptest_board_stm32.py shows the wait with a status register that clears as a USART's.
    regs = ptr32(base)
    count = 0
    spin = 0
    while count < length:
        if not (regs[0] & _SR_TXE):
            if spin >= _TX_SPIN:
                break
            spin += 1
            continue
        regs[1] = buf[count]
        count += 1
        spin = 0
    return count


class Clock(boardkit.ExtendedClock):
    """Microsecond clock from TIM2 (32 bits at 1 MHz: wraps every 71.6 min), extended to
    64 bits: the QEMU board's state and single-writer rules (payload/boardkit.py), a copy
    holding (last counter, unused, low word, high word)."""

    def __init__(self):
        prescaler = TIMER_INPUT_HZ // 1_000_000 - 1
        machine.mem32[_TIM2 + _TIM_PSC] = prescaler
        machine.mem32[_TIM2 + _TIM_ARR] = 0xFFFFFFFF
        machine.mem32[_TIM2 + _TIM_EGR] = 1  # load the prescaler now
        machine.mem32[_TIM2 + _TIM_CR1] = 1  # CEN: count up
        super().__init__(_clock_update, _clock_stamp, machine.mem32[_TIM2 + _TIM_CNT] & 0xFFFFFFFF)


@micropython.viper
def _clock_update(state: ptr32) -> int:
    active = state[0]
    src = 1 + 4 * active
    dst = 5 - 4 * active
    now = ptr32(_TIM2)[9]  # CNT (0x24)
    elapsed = now - state[src]  # up-counter, wraps modulo 2**32
    low = state[src + 2]
    new_low = low + elapsed
    high = state[src + 3]
    if uint(new_low) < uint(low):
        high += 1
    state[dst] = now
    state[dst + 2] = new_low
    state[dst + 3] = high
    state[0] = 1 - active  # publish: one word store
    return new_low & 0x3FFFFFFF  # ticks_us() (boardkit.ExtendedClock): one native call


@micropython.viper
def _clock_stamp(state: ptr32, buf: ptr8, offset: int):
    src = 1 + 4 * state[0]
    low = state[src + 2]
    high = state[src + 3]
    new_low = low + (ptr32(_TIM2)[9] - state[src])
    if uint(new_low) < uint(low):
        high += 1
    for i in range(4):
        buf[offset + i] = (new_low >> (8 * i)) & 0xFF
        buf[offset + 4 + i] = (high >> (8 * i)) & 0xFF


ground_link = GroundUart(_USART1, GROUND_RX_RING_BYTES)
payload_bus = Uart(_USART2)
clock = Clock()
# the link key's region: a flash sector of its own on the real part, RAM here
key_region = keystore.BufferRegion(bytearray(keystore.REGION_BYTES))
storage_formatted = False
# The STM32F205 has 1 MiB of on-chip flash, but QEMU's netduino2 models it as ROM (no
# flash controller), so the emulation keeps the filesystem in SRAM outside the heap (the
# linker script's FLASHDISK); the real board programs flash sectors through the FLASH
# interface (docs/targets.md). Like flash, its contents survive a soft reset.
flash = boardkit.RamNorDevice(_FLASH_DISK_ADDR, _FLASH_BLOCK_BYTES, _FLASH_BLOCKS)
# littlefs with 32-byte reads and programs (a 128-byte cache: 64 would cut the worst of 120
# appends from 1.05 to 0.70 M instructions for 256 B more of this heap) and an 8-byte
# lookahead, the whole 64-block store in one window (32 measured the same: -icount, docs/
# storage.md "littlefs's mount parameters"; 24 B less heap)
store = boardkit.FlashStore(flash, STORAGE_ROOT, 32, _FLASH_SPARES, _FLASH_JOURNAL_SECTORS, 32, 8)


# The launcher's command line the board reads, its NUL included (emulator/targets.py
# NETDUINO2_LAUNCHER_LINE_BYTES, which the launcher holds its line to)
_LAUNCHER_LINE_BYTES = const(96)


@micropython.asm_thumb
def _semihost(r0, r1):  # r0 = operation, r1 = parameter block; returns r0
    data(2, 0xBEAB)  # BKPT 0xAB: the ARM semihosting call


def _launcher_words():
    """The emulator's command line for the firmware (QEMU -semihosting-config arg=...),
    split in words: SYS_GET_CMDLINE, once at boot. On a part with no debugger the BKPT
    faults, and the HardFault handler (firmware/cmodules/semihosting_guard) answers it as
    a refused call: no words, so boot mode 'app' and the flight values (docs/targets.md
    "Boot strap")."""
    import uctypes

    # SYS_GET_CMDLINE fails (-1: nothing read, the flight values) on a line that does not
    # fit, so the launcher refuses one longer (emulator/targets.py
    # NETDUINO2_LAUNCHER_LINE_BYTES): its longest today is 73 characters and the NUL
    text = bytearray(_LAUNCHER_LINE_BYTES)
    block = array.array("I", (uctypes.addressof(text), len(text)))
    if _semihost(0x15, block) != 0:
        return []
    return bytes(text[: block[1]]).decode().split()


# Read once: boot_mode, the overrides and the tracking link each read it, and each call is
# a trap to the host (on the part, a HardFault taken and answered)
_LAUNCHER_WORDS = _launcher_words()


def boot_mode():
    """'maintenance' when the launcher asked for it (a boot strap), else 'app'."""
    return "maintenance" if "maintenance" in _LAUNCHER_WORDS else "app"


def _emulation_overrides():
    """{name: value} the emulator's launcher set on its command line (bus_timeout_us=N):
    values for an emulated head on a loaded host, never the part's (a real board has no
    semihosting, and boots with the flight values)."""
    overrides = {}
    for word in _LAUNCHER_WORDS:
        if word.startswith("bus_timeout_us="):
            overrides["bus_timeout_us"] = int(word[15:])
        elif word.startswith("ground_rx_wait_us="):
            overrides["ground_rx_wait_us"] = int(word[18:])
    return overrides


# The flight values must leave the IWDG its margin: an image whose waits outlast the
# watchdog does not boot (ValueError at import), and tests/firmware/mptest_board.py checks
# the same on every target.
waits.check(FLIGHT_BUS_TIMEOUT_US, WATCHDOG_LIMIT_US)
# The emulation's override, stated on the launcher's command line (emulator/targets.py
# Netduino2Target: 10 s, QEMU hands the USART its bytes at the host's pace) and kept here
# for the REPL and tests to read. It is not held to the IWDG: QEMU's netduino2 does not
# model the IWDG (nothing resets the emulated board), and the part never gets it.
EMULATION_OVERRIDES = _emulation_overrides()
BUS_TIMEOUT_US = EMULATION_OVERRIDES.get("bus_timeout_us", FLIGHT_BUS_TIMEOUT_US)
# How long a ground poll that got bytes reads on for the rest of the frame (payload/app.py
# _pump_frame): the flight value, or the launcher's for QEMU, whose USART gets its bytes
# ms apart on a loaded host (Netduino2Target: 200 ms). Held to the watchdog rule's 3/4 of
# the IWDG's limit all the same (16.7 s, far above 200 ms), and refused at import past it:
# the poll takes its elapsed time modulo 2^30 us, so a wait of 2^30 us (~18 min) or more
# never ended while a frame stayed incomplete, and a negative one was no wait at all.


def ground_rx_wait_us(overrides):
    """The ground poll's wait for the rest of a frame: the launcher's override, checked, or
    the flight value."""
    wait_us = overrides.get("ground_rx_wait_us", waits.GROUND_RX_WAIT_US)
    waits.check_wait("ground_rx_wait_us", wait_us, WATCHDOG_LIMIT_US)
    return wait_us


GROUND_RX_WAIT_US = ground_rx_wait_us(EMULATION_OVERRIDES)


# The TRACK exchange's own link (docs/scheduling.md "The loop on a timer interrupt"), where
# the launcher wired one; None: the loop is paced over the payload bus
tracking_link = Uart(_USART3, _uart_write_bounded) if "track" in _LAUNCHER_WORDS else None


def mount_storage():
    """Mount littlefs at STORAGE_ROOT through EraseAhead, formatting a device that does
    not mount (first boot)."""
    global storage_formatted
    if store.mount():
        storage_formatted = True
    return STORAGE_ROOT


def storage_background():
    """The scheduler's last duty: one sector erased ahead, if one is owed."""
    return store.background()


def watchdog_start():
    """IWDG: LSI / 256, reload 4095 (32.8 s). QEMU's netduino2 does not model the IWDG (its
    registers read as zero and writes are ignored), so here only the sequence is run."""
    machine.mem32[_IWDG + _IWDG_KR] = _KEY_UNLOCK
    machine.mem32[_IWDG + _IWDG_PR] = _IWDG_PRESCALER_256
    machine.mem32[_IWDG + _IWDG_RLR] = _IWDG_RELOAD
    machine.mem32[_IWDG + _IWDG_KR] = _KEY_START


def watchdog_feed():
    machine.mem32[_IWDG + _IWDG_KR] = _KEY_FEED


def watchdog_stop():
    """The IWDG cannot be stopped: the maintenance REPL lasts one watchdog period unless
    the operator feeds it (board.watchdog_feed())."""


def idle():
    machine.idle()


def reset():
    machine.reset()


def cpu_hz():
    return _CPU_HZ
