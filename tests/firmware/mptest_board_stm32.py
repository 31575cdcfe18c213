# The STM32 board's tracking-link write (boards/netduino2 _uart_write_bounded), on the
# netduino2 image. QEMU's STM32 USART writes each byte through at once and keeps TXE set
# (hw/char/stm32f2xx_usart.c: "I/O being synchronous, TXE is always set"), so a USART3
# that clears TXE for a byte time after each byte, as the part's does, cannot be shown on
# it. The status register here is SysTick's current value instead: its bit 7, where the
# USART has TXE, is clear for 128 of every 256 ticks of the 120 MHz core clock (~1,070
# instructions under -icount shift=0), and its data register is then SysTick's
# calibration word (read-only: writes are ignored).
import board
import machine
import micropython

TARGETS = ("netduino2",)
TARGETS_REASON = "the STM32 board's registers (boards/netduino2)"
QEMU_ICOUNT_SHIFT = 0  # one instruction a nanosecond: the SysTick windows deterministic

_SYST_CSR = 0xE000E010
_SYST_RVR = 0xE000E014
_SYST_CVR = 0xE000E018
_FRAME_BYTES = 32  # a TRACK request frame (tracking_duty._TRACK_REQUEST_FRAME_BYTES)


def _writes_against_systick(write, frame, count):
    machine.mem32[_SYST_RVR] = 0xFFFFFF
    machine.mem32[_SYST_CVR] = 0
    machine.mem32[_SYST_CSR] = 5  # enabled, core clock, no interrupt
    try:
        return [write(_SYST_CVR, frame, _FRAME_BYTES) for _ in range(count)]
    finally:
        machine.mem32[_SYST_CSR] = 0


def test_the_tracking_links_write_waits_for_txe_and_sends_whole_frames():
    # Without the wait (the board's other USARTs' write) a frame that meets TXE clear
    # goes out cut short: 0 or a few bytes, the rest of the request lost every period.
    frame = bytes(range(1, _FRAME_BYTES + 1))
    sent = _writes_against_systick(board._uart_write_bounded, frame, 20)
    assert sent == [_FRAME_BYTES] * 20, sent
    assert board.tracking_link is None or board.tracking_link._write is board._uart_write_bounded


def test_a_txe_that_never_sets_ends_the_write_after_a_bounded_wait():
    # A link that stopped taking bytes: the write returns (0 sent), after _TX_SPIN polls.
    # Its cost in instructions (-icount shift=0: one a nanosecond, TIM2 counts 1 MHz)
    stuck = bytearray(8)  # SR 0: TXE clear for good
    import uctypes

    base = uctypes.addressof(stuck)
    frame = bytes(_FRAME_BYTES)
    write = board._uart_write_bounded
    ticks = board.clock.ticks_us
    micropython.heap_lock()  # the interrupt's write allocates nothing
    try:
        t0 = ticks()
        for _ in range(100):
            assert write(base, frame, _FRAME_BYTES) == 0
        elapsed_us = (ticks() - t0) & 0x3FFFFFFF
    finally:
        micropython.heap_unlock()
    per_write = elapsed_us * 1000 // 100
    print("@@txe_stuck_write_instructions", per_write)
    # bounded: _TX_SPIN (64) polls of ~36 instructions and the call (2,960 measured; the
    # SysTick windows above are ~1,070 instructions, so a whole frame still goes out)
    assert per_write < 4_000, per_write


def test_the_launchers_bus_timeout_is_an_override_the_board_states():
    # The board carries the flight value; the emulation's longer one comes from the
    # launcher's command line (emulator/targets.py Netduino2Target), named, never silent.
    assert board.FLIGHT_BUS_TIMEOUT_US == 500_000
    overrides = board.EMULATION_OVERRIDES
    assert overrides == {"bus_timeout_us": 10_000_000, "ground_rx_wait_us": 200_000}, overrides
    assert board.BUS_TIMEOUT_US == 10_000_000
    # the ground poll's wait for the rest of a frame, the same way (payload/waits.py)
    from payload import waits

    assert waits.GROUND_RX_WAIT_US == 5_000
    assert board.GROUND_RX_WAIT_US == 200_000


def test_a_ground_wait_override_outside_the_watchdog_rule_is_refused():
    # The poll measures its wait modulo 2^30 us: a wait of 2^30 us or more never ended on a
    # frame left incomplete (a hang), a negative one was none. The board refuses both at
    # import, as it refuses a flight value past the rule (payload/waits.py).
    from payload import waits

    assert board.ground_rx_wait_us({}) == waits.GROUND_RX_WAIT_US
    assert board.ground_rx_wait_us({"ground_rx_wait_us": 0}) == 0
    assert board.ground_rx_wait_us({"ground_rx_wait_us": 16_000_000}) == 16_000_000
    for wait_us in (-1, 17_000_000, 1 << 30, 1 << 40):
        try:
            board.ground_rx_wait_us({"ground_rx_wait_us": wait_us})
        except ValueError:
            continue
        raise AssertionError(wait_us)
