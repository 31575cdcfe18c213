# The ground link locked down (docs/ground-link.md): no built-in key, the key kept where a
# storage format cannot erase it, the replay ceiling persisted before a command acts,
# counter exhaustion and the rekey that recovers from it, the armed maintenance window,
# a main loop that survives any exception, and long sends that never block the loop.
# (Split from mptest_ground_link.py: the netduino2 board compiles each test file in its
# 96 KiB heap.)
import hashlib
import os

import board
import micropython
from payload import ccsds, scheduler, telecommands

# What the firmware used to fall back to when no key was provisioned: public.
PUBLIC_KEY = hashlib.sha256(b"qkdsat development key, not for flight").digest()

# _ROOT, _fresh_root, _link, _tc, _verification, _unhex (appended by the harness)
MPTEST_HELPERS = ("link_helpers.py",)


def _rmtree(path):
    for entry in os.listdir(path):
        full = path + "/" + entry
        try:
            os.remove(full)
        except OSError:
            _rmtree(full)
    os.rmdir(path)


def test_counter_exhaustion_does_not_lock_the_link_and_rekey_recovers():
    # The golden vectors end with counter 0xFFFFFFFF on an ordinary command: it used to
    # be accepted and lock the link for good. Counters above ORDINARY_COUNTER_MAX are
    # refused for ordinary commands (not consumed) and kept for the rekey.
    vectors = load_vectors("ccsds.json")
    key = _unhex(vectors["key"])
    root = _fresh_root(key)
    link, sent = _link(root)
    link.handle(_tc(key, 0xFFFFFF00, 17, 1))
    assert _verification(sent[-1]) == (False, ccsds.REJECT_STATE), sent
    assert link.last_counter == 0  # not consumed
    link.handle(_tc(key, 0xFFFFFEFF, 17, 1))  # the last ordinary counter
    assert _verification(sent[-2]) == (True, 0)
    next_key = bytes(range(7, 39))
    link.handle(_rekey_tc(b"wrong key" * 4, 0xFFFFFFFF, next_key))
    assert _verification(sent[-1]) == (False, ccsds.REJECT_AUTH)
    link.handle(_rekey_tc(key, 0xFFFFFFFF, next_key))
    assert _verification(sent[-1]) == (True, 0), sent[-1]
    assert link.last_counter == 0 and link.key_state == "provisioned"
    link.handle(_tc(next_key, 1, 17, 1))  # the new key, from counter 1
    assert _verification(sent[-2]) == (True, 0)
    link.handle(_tc(key, 2, 17, 1))  # the old key is gone
    assert _verification(sent[-1]) == (False, ccsds.REJECT_AUTH)
    # after a reboot: the new key from its region, its own counter (not the old 2**32-1):
    # up to the key region's coarse ceiling, written for the new key by the rekey
    again, sent = _link(root)
    assert again.key_state == "provisioned"
    assert 1 <= again.last_counter <= telecommands.REGION_TC_STEP, again.last_counter
    again.handle(_tc(next_key, again.last_counter + 1, 17, 1))
    assert _verification(sent[0]) == (True, 0)


def test_no_key_means_no_command_and_the_public_key_is_refused():
    root = _fresh_root()  # nothing provisioned
    link, sent = _link(root)
    assert link.key_state == "missing"
    link.handle(_tc(PUBLIC_KEY, 1, 17, 1))
    link.handle(_tc(b"\0" * 32, 2, 17, 1))
    assert [_verification(p) for p in sent] == [(False, ccsds.REJECT_AUTH)] * 2


def test_key_lives_outside_storage_so_a_format_keeps_it():
    # ... and the replay counter's coarse ceiling beside it: with the counter only in
    # littlefs, the format made every telecommand ever recorded under the kept key
    # acceptable again (a code update's included: a downgrade).
    key = b"f" * 32
    root = _fresh_root(key)
    link, sent = _link(root)
    assert link.key_state == "provisioned"
    assert "key" not in os.listdir(root + "/link")  # moved out of the filesystem
    recorded = [_tc(key, n, 8, 1, bytes([ccsds.FN_REBOOT])) for n in (1, 70)]
    for frame in recorded:  # 70: past the first littlefs ceiling (64)
        link.handle(frame)
        assert _verification(sent[-1]) == (True, 0)
    _rmtree(root)  # what formatting the storage does to everything in it
    _mkdirs(root)
    again, sent = _link(root)
    assert again.key_state == "provisioned"
    for frame in recorded:
        again.handle(frame)
        assert _verification(sent[-1]) == (False, ccsds.REJECT_REPLAY), sent[-1]
    assert again.pending_action is None
    # the ground resyncs from the replay report's counter (host/link/client.py), once
    behind = ccsds.get_u32(sent[-1], ccsds.TM_HEADER_BYTES + 6)
    assert behind == again.last_counter >= 70
    again.handle(_tc(key, behind + 1, 17, 1))
    assert _verification(sent[-2]) == (True, 0)
    again.handle(_tc(PUBLIC_KEY, behind + 2, 17, 1))
    assert _verification(sent[-1]) == (False, ccsds.REJECT_AUTH)


def test_a_counter_that_cannot_be_persisted_refuses_the_command():
    key = b"c" * 32
    root = _fresh_root(key)
    link, sent = _link(root)
    os.mkdir(root + "/link/counter.tmp")  # the ceiling's write now fails (a directory)
    link.handle(_tc(key, 1, 8, 1, bytes([ccsds.FN_REBOOT])))
    assert _verification(sent[0]) == (False, ccsds.REJECT_STORAGE), sent
    assert link.pending_action is None  # nothing acted
    assert link.link_counters().get("counter_write_failures") == 1
    link.handle(_tc(key, 1, 17, 1))  # still a replay: the counter was used in RAM
    assert _verification(sent[1]) == (False, ccsds.REJECT_REPLAY)
    os.rmdir(root + "/link/counter.tmp")
    link.handle(_tc(key, 2, 8, 1, bytes([ccsds.FN_REBOOT])))
    assert _verification(sent[2]) == (True, 0)
    assert link.pending_action == ccsds.FN_REBOOT


def test_maintenance_needs_an_armed_window():
    key = b"w" * 32
    link, sent = _link(_fresh_root(key))
    link.handle(_tc(key, 1, 8, 1, bytes([ccsds.FN_MAINTENANCE])))
    assert _verification(sent[-1]) == (False, ccsds.REJECT_STATE)
    link.maintenance_window_us = -1  # the window has passed
    link.handle(_tc(key, 2, 8, 1, bytes([ccsds.FN_MAINTENANCE_ARM])))
    link.handle(_tc(key, 3, 8, 1, bytes([ccsds.FN_MAINTENANCE])))
    assert _verification(sent[-1]) == (False, ccsds.REJECT_STATE)
    assert link.code_session is None
    link.maintenance_window_us = telecommands.MAINTENANCE_WINDOW_US
    link.handle(_tc(key, 4, 8, 1, bytes([ccsds.FN_MAINTENANCE_ARM])))
    link.handle(_tc(key, 5, 8, 1, bytes([ccsds.FN_MAINTENANCE])))
    assert _verification(sent[-1]) == (True, 0)
    # maintenance opens the code-update session: nothing for the main loop to act on
    # (it used to stop the application for the REPL), the key stays in use
    assert link.pending_action is None and link.code_session is not None
    link.handle(_tc(key, 6, 17, 1))
    assert _verification(sent[-2]) == (True, 0)


def test_keyboard_interrupt_in_a_duty_does_not_end_the_loop():
    calls = []

    def interrupted():
        raise KeyboardInterrupt  # what 0x03 on a REPL UART raises

    def healthy():
        calls.append(1)
        return True

    loop = scheduler.Scheduler(board.clock)
    loop.add("ground", interrupted)
    loop.add("hk", healthy)
    for _ in range(3):
        loop.run_once()
    assert len(calls) == 3
    report = loop.telemetry()["ground"]
    assert report["errors"] == 3 and "KeyboardInterrupt" in report["last_error"], report


def test_an_error_whose_text_finds_no_heap_is_counted_and_the_loop_goes_on():
    # The handler runs after the failure, often a MemoryError with the heap full: here the
    # heap is locked when the duty raises, so keeping the error's text (a repr: a heap
    # string) fails. That MemoryError escaped run_once, then app.run's loop (whose own
    # handler made the same repr), and main.py ended in the REPL on the ground link.
    import micropython

    interrupt = KeyboardInterrupt()  # made while the heap is open
    calls = []
    locked = [0]  # (heap_lock nests: unlocked exactly as often as it was locked)

    def unlock():
        if locked[0]:
            locked[0] = 0
            micropython.heap_unlock()

    def exhausted():
        locked[0] = 1
        micropython.heap_lock()
        raise interrupt

    def healthy():
        unlock()
        calls.append(1)
        return True

    loop = scheduler.Scheduler(board.clock)
    loop.add("ground", exhausted)
    loop.add("hk", healthy)
    try:
        for _ in range(3):
            loop.run_once()
    finally:
        unlock()
    assert len(calls) == 3
    report = loop.telemetry()["ground"]
    assert report["errors"] == 3, report
    assert report["last_error"] == scheduler.NO_HEAP_ERROR_TEXT, report


class _Reset(Exception):
    pass


class _BootFails:
    """The board, but its storage raises at boot (fault injection): what a board whose
    application cannot come up does next. Its reset is recorded, not made (the test's
    session goes on); the watchdog is not started (nothing would feed it after the test),
    nor a receive interrupt on the ground link (none here: the test's REPL keeps its UART)."""

    ground_link = None

    def __init__(self, error):
        self.error = error
        self.mounts = 0
        self.resets = 0

    def watchdog_start(self):
        pass

    def watchdog_stop(self):
        pass

    def mount_storage(self):
        self.mounts += 1
        raise self.error

    def reset(self):
        self.resets += 1
        raise _Reset()


def _run_until_the_board_resets(app, faulty_board):
    # app.run never returns on a board: it runs the loop or resets
    try:
        app.run(faulty_board)
        raise AssertionError("app.run returned")
    except _Reset:
        pass
    finally:
        micropython.kbd_intr(3)  # back for the harness's raw REPL


def test_an_application_that_cannot_boot_resets_the_board_and_leaves_no_repl():
    # An exception out of app.run ends main.py, and the port then opens the REPL on the
    # ground link, no telecommand needed: a storage fault at boot, a MemoryError, or a
    # 0x03 before the console was locked. Each now resets the board instead.
    from payload import app

    for error in (OSError(5), MemoryError(), KeyboardInterrupt()):
        faulty = _BootFails(error)
        _run_until_the_board_resets(app, faulty)
        # (the injected error, not another one before it, is what reset the board)
        assert faulty.mounts == 1 and faulty.resets == 1, (error, faulty.mounts)


class _WatchdogFails(_BootFails):
    """A board whose watchdog refuses to start (a machine.WDT timeout the port does not
    take raises ValueError): the first thing app.run does with the board."""

    def watchdog_start(self):
        raise ValueError("timeout out of range")


def test_a_watchdog_that_cannot_start_resets_the_board_and_leaves_no_repl():
    # app.run started the watchdog (and locked the console) before its guard: an
    # exception there ended main.py, and the port opened the REPL on the ground link
    from payload import app

    faulty = _WatchdogFails(OSError(5))
    _run_until_the_board_resets(app, faulty)
    assert faulty.resets == 1 and faulty.mounts == 0, (faulty.resets, faulty.mounts)


class _SlowLink:
    """Takes at most 16 bytes per write, like a UART with a small FIFO."""

    def __init__(self):
        self.out = bytearray()
        self.accepting = True

    def write(self, buf):
        if not self.accepting:
            return 0
        n = min(16, len(buf))
        self.out += bytes(buf[:n])
        return n


def test_long_sends_go_out_in_slices_and_a_full_queue_drops_whole_frames():
    from payload import app

    link = _SlowLink()
    queue = app.TxQueue(link, board.clock, 3000, -1, -1)  # one write per pump
    frame = bytes((i * 7 + 1) & 0xFF for i in range(1100))
    assert queue.push(frame)
    assert queue.pump() and len(link.out) == 16  # the loop goes on after one slice
    passes = 1
    while queue.pending():
        queue.pump()
        passes += 1
    assert bytes(link.out) == frame and passes == 69
    link.accepting = False  # nobody takes bytes: the queue fills, frames are dropped whole
    assert queue.push(frame) and queue.push(frame)
    assert not queue.push(frame)
    assert queue.dropped_frames == 1 and queue.pending() == 2200
    link.accepting = True
    link.out = bytearray()
    queue.drain(10_000_000)
    assert bytes(link.out) == frame + frame  # across the ring's wrap, in order
