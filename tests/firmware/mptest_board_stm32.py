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
MPTEST_HELPERS = ("link_helpers.py",)  # (the link counters' test)

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


# The ground link's receive interrupt (board.GroundUart, irqtimer.ground_open). QEMU 7.2's
# STM32 USART takes a status register written below 0x400 as written (TXE kept), and
# raises its interrupt when a byte comes or CR1 is written with RXNEIE while RXNE is set
# (hw/char/stm32f2xx_usart.c): RXNE written, then CR1 rewritten, is a byte's arrival (the
# data register's last byte); ORE with it an overrun, which QEMU never makes itself.
_USART1 = 0x40011000
_CR1 = 0x4001100C
_SR_ORE = 0x08
_SR_RXNE = 0x20
_SR_TXE = 0x80


def _arrive(count, status=_SR_RXNE | _SR_TXE):
    for _ in range(count):
        machine.mem32[_USART1] = status
        machine.mem32[_CR1] = machine.mem32[_CR1]
    if status & _SR_ORE:
        machine.mem32[_USART1] = _SR_TXE  # (QEMU keeps ORE until written; the part clears it)


def test_the_ground_rings_interrupt_keeps_bytes_and_counts_what_it_loses():
    link = board.GroundUart(_USART1, 16)
    try:
        byte = machine.mem32[_USART1 + 4] & 0xFF  # what each arrival brings (clears RXNE)
        link.start_receiving()
        _arrive(20)  # 4 more than the ring holds
        assert link.rx_words[2] == 20 and link.rx_lost() == (4, 0), list(link.rx_words)
        _arrive(1, _SR_RXNE | _SR_ORE | _SR_TXE)  # an overrun: counted, its byte lost too
        assert link.rx_words[2] == 21 and link.rx_lost() == (5, 1), list(link.rx_words)
        buf = bytearray(32)
        micropython.heap_lock()  # the application's read allocates nothing
        try:
            count = link.readinto(buf)
            again = link.readinto(buf)
        finally:
            micropython.heap_unlock()
        assert (count, again) == (16, 0), (count, again)
        assert buf[:16] == bytes([byte]) * 16
        _arrive(10)  # past the ring's end, from its start (one byte value: a read across
        # the end at a wrong offset shows only in test_netduino2_ground_rx.py's random bytes)
        assert link.readinto(buf) == 10 and link.rx_lost() == (5, 1)
        link.stop_receiving()
        # polled again: no interrupt takes the byte, the class's read does
        _arrive(1)
        assert link.rx_words[2] == 31 and not link.receiving
        assert link.readinto(buf) == 1 and buf[0] == byte
    finally:
        link.stop_receiving()
        machine.mem32[_USART1] = _SR_TXE  # nothing left for the REPL to read


_NVIC_ISPR1 = 0xE000E204  # set-pending, IRQs 32-63
_GROUND_IRQ = 37


def test_an_overrun_without_a_byte_is_cleared_and_counted():
    # On the part SR.ORE can be set with RXNE clear: a byte that finishes between the
    # handler's SR read and its DR read sets ORE, and that DR read clears only RXNE. RXNEIE
    # raises the interrupt for ORE too, so a handler that looks only at RXNE returns with
    # the line still up, is entered again at once, and the main loop starves until the
    # next byte clears it (a silent link: the watchdog). QEMU raises the line only for
    # RXNE, so ORE is written alone and the interrupt pended by hand: the handler must
    # read DR (what clears ORE on the part) and count the byte the overrun lost, none
    # kept. (A handler that breaks on RXNE clear counts nothing: (0, 0).)
    link = board.ground_link
    try:
        link.start_receiving()
        machine.mem32[_USART1] = _SR_ORE | _SR_TXE
        machine.mem32[_NVIC_ISPR1] = 1 << (_GROUND_IRQ - 32)
        words = list(link.rx_words)
        assert link.rx_lost() == (0, 1), words
        assert words[0] == 0 and words[2] == 0, words  # nothing put in the ring
        machine.mem32[_USART1] = _SR_TXE
        _arrive(1, _SR_RXNE | _SR_ORE | _SR_TXE)  # with its byte: one overrun, one byte
        assert link.rx_words[2] == 1 and link.rx_lost() == (0, 2), list(link.rx_words)
    finally:
        link.stop_receiving()
        machine.mem32[_USART1] = _SR_TXE


def test_a_ground_byte_is_taken_within_the_tracking_period_s_interrupt():
    # The ground interrupt's priority (0x20) is above the timer's (0x40): a byte that comes
    # while the period runs (~154 us at 2 kHz, two byte times at 115,200 baud) is taken
    # then, not after it (on the part the next byte would overrun it). Here the period's
    # callback makes an arrival and reads the ring's count before it returns: 1 if IRQ 37
    # preempted it, 0 at the timer's priority or below.
    import array

    import irqtimer

    link = board.ground_link
    seen = array.array("i", [-1, 0])  # the count the callback saw, calls

    def period(seen):
        if seen[1]:
            return
        seen[1] = 1
        machine.mem32[_USART1] = _SR_RXNE | _SR_TXE
        machine.mem32[_CR1] = machine.mem32[_CR1]  # RXNEIE with RXNE: a byte's arrival
        seen[0] = link.rx_words[2]

    try:
        link.start_receiving()
        irqtimer.start(1000, period, seen)
        for _ in range(100000):
            if seen[1]:
                break
        irqtimer.stop()
        assert seen[1] == 1 and irqtimer.last_error() is None, (list(seen), irqtimer.last_error())
        assert seen[0] == 1, list(seen)
        assert link.rx_words[2] == 1, list(link.rx_words)
    finally:
        irqtimer.stop()
        link.stop_receiving()
        machine.mem32[_USART1] = _SR_TXE


_USART3 = 0x40004800
_CR1_USART3 = 0x4000480C
_TRACK_IRQ = 39


def test_the_tracking_links_overruns_are_cleared_and_counted_as_dropped():
    # USART3's handler (irqtimer.open) as the ground link's above: ORE alone (the
    # interrupt pended by hand, as QEMU raises it only for RXNE) is cleared by a DR read
    # and its lost byte counted in words[1], not kept; ORE with a byte keeps the byte and
    # counts the one lost after it. (A handler that looks only at RXNE counts neither.)
    import array

    import irqtimer

    rx = bytearray(8)
    words = array.array("i", [0, 0, 0])
    try:
        irqtimer.open(rx, words)
        machine.mem32[_USART3] = _SR_ORE | _SR_TXE
        machine.mem32[_NVIC_ISPR1] = 1 << (_TRACK_IRQ - 32)
        assert list(words) == [0, 1, 0], list(words)
        machine.mem32[_USART3] = _SR_RXNE | _SR_ORE | _SR_TXE
        machine.mem32[_CR1_USART3] = machine.mem32[_CR1_USART3]  # RXNEIE with RXNE: a byte
        assert list(words) == [1, 2, 1], list(words)
    finally:
        irqtimer.close()
        machine.mem32[_USART3] = _SR_TXE


def test_a_ring_that_is_not_a_power_of_two_is_refused():
    import array

    import irqtimer

    for length in (0, 12, 1000):
        try:
            irqtimer.ground_open(bytearray(length), array.array("i", bytes(20)))
        except ValueError:
            continue
        raise AssertionError(length)


def test_the_link_counters_report_the_ground_links_lost_bytes():
    link = board.ground_link
    try:
        link.start_receiving()
        ground = _link(_fresh_root(), keep=False)[0]
        counters = ground.link_counters()
        assert "rx_ring_full" not in counters and "rx_overruns" not in counters, counters
        _arrive(board.GROUND_RX_RING_BYTES + 3)
        _arrive(1, _SR_RXNE | _SR_ORE | _SR_TXE)
        counters = ground.link_counters()
        assert counters["rx_ring_full"] == 4 and counters["rx_overruns"] == 1, counters
    finally:
        link.stop_receiving()
        machine.mem32[_USART1] = _SR_TXE


class _Started(Exception):
    pass


class _ProbeBoard:
    """The board as app.run sees it, up to its watchdog's start: what the ground link
    is by then."""

    ground_link = board.ground_link

    def watchdog_start(self):
        raise _Started(board.ground_link.receiving)

    def reset(self):
        pass


def test_the_application_takes_the_ground_link_by_interrupt_before_anything_else():
    from payload import app

    try:
        app.run(_ProbeBoard())
    except _Started as started:
        assert started.args == (True,), started.args
    else:
        raise AssertionError("app.run returned")
    finally:
        board.ground_link.stop_receiving()
        micropython.kbd_intr(3)  # (app.run's lock_console took Ctrl-C off the REPL)
