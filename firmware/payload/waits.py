# The main loop's bounded waits, in one place, and the rule that ties them to the watchdog
# (issue 15 finding 2; docs/targets.md "Waits against the watchdog"). The watchdog is fed
# once a scheduler pass (app.Controller.poll), so each wait must end, and the fault it ends
# in be reported, well before the watchdog fires: a board checks its values at import
# (check), and tests/firmware/mptest_board.py checks them on every target.
from micropython import const

# Bus transactions (bus.Bus): a request is sent again on a reply timeout, up to BUS_RETRIES
# times, so a dead head costs (BUS_RETRIES + 1) bus timeouts before the fault is reported.
BUS_RETRIES = const(3)
# Longest wait for the laser to finish its frame (sequencer.wait_laser_idle, Sequencer.stop):
# a frame is at most MAX_FRAME_SLOTS, and the head runs at >= 1 kHz slot rates in any
# configuration that makes sense (4.1 s).
LASER_STOP_TIMEOUT_US = const(10_000_000)
# Longest a scheduler pass spends writing to the ground link (app.TxQueue): at 115200 baud
# a 1 KiB packet takes ~89 ms, more than two 41 ms frame periods, so it goes out in slices.
GROUND_TX_SLICE_US = const(2000)
# How long a ground poll (app.Controller.poll_ground) that got bytes goes on reading until a
# frame is complete: the rest of a telecommand already on its way is taken in the same pass
# instead of a few bytes a pass. At 115200 baud a stop, start or housekeeping request (~40
# bytes with its leading delimiter) takes 3.5 ms on the wire; a larger frame (a 200-byte
# configuration) goes on in the next passes. The STM32 board's emulation states a longer
# one on its launcher's command line (boards/netduino2 EMULATION_OVERRIDES: QEMU hands the
# USART its bytes at the host's pace, ms apart on a loaded host; docs/targets.md).
GROUND_RX_WAIT_US = const(5000)
# When the ground queue is full, how long a new packet may wait for room before it is
# dropped (and counted): a ground link nobody reads must not stop the payload.
GROUND_TX_FULL_WAIT_US = const(200_000)
# Before a reboot: time to get the acceptance report out.
GROUND_TX_FLUSH_US = const(2_000_000)
# How long a pass's stop waits for the timer interrupt's loop to confirm its IDLE commands
# on the head (mission.Mission.stop): a few periods on the flight link; bounded for a
# silent head, and long enough for an emulated head on a loaded host.
TIMER_LOOP_STOP_US = const(1_000_000)
# The longest wait may take at most this many quarters of the watchdog's limit: the last
# quarter is for the rest of the pass (its other duties are sliced to milliseconds) and the
# code around the waits. The limit itself is the board's shortest time to a reset (the
# STM32's IWDG at its LSI's fastest, not its nominal).
WAIT_QUARTERS_OF_WATCHDOG = const(3)


def longest_wait_us(bus_timeout_us):
    """(microseconds, name) of the longest bounded wait one duty call can block the main
    loop for, with a payload-bus timeout of bus_timeout_us a try."""
    transaction = (BUS_RETRIES + 1) * bus_timeout_us
    waits = (
        (transaction, "bus transaction"),
        # a dead head, a pass: the first transaction that timed out, then the others fail at
        # once (bus.Bus.down) but a stop's laser-off command, which gets its own tries
        (2 * transaction, "dead head a pass"),
        # the deadline, then the LASER_ACTIVE read under way when it passed
        (LASER_STOP_TIMEOUT_US + transaction, "laser stop"),
        (GROUND_TX_FLUSH_US, "ground flush"),
        (GROUND_TX_FULL_WAIT_US, "ground queue full"),
        (TIMER_LOOP_STOP_US, "tracking stop"),
        (GROUND_TX_SLICE_US, "ground slice"),
        (GROUND_RX_WAIT_US, "ground frame"),
    )
    return max(waits)


def check_wait(name, wait_us, watchdog_limit_us, context=""):
    """Raise ValueError unless wait_us leaves the watchdog its margin: at least 0 and at
    most WAIT_QUARTERS_OF_WATCHDOG quarters of watchdog_limit_us (a poll takes its elapsed
    time modulo 2^30 us, so a negative wait is none and one of 2^30 us or more never
    ends; both are outside this)."""
    if not 0 <= 4 * wait_us <= WAIT_QUARTERS_OF_WATCHDOG * watchdog_limit_us:
        raise ValueError(
            "waits: %s %d us%s not within 0..%d/4 of the watchdog's %d us"
            % (name, wait_us, context, WAIT_QUARTERS_OF_WATCHDOG, watchdog_limit_us)
        )


def check(bus_timeout_us, watchdog_limit_us):
    """Raise ValueError unless the longest bounded wait leaves the watchdog its margin;
    watchdog_limit_us None: no watchdog (the unix target's launcher supervises)."""
    if watchdog_limit_us is None:
        return
    wait_us, name = longest_wait_us(bus_timeout_us)
    check_wait(name, wait_us, watchdog_limit_us, " with bus timeout %d us" % bus_timeout_us)
