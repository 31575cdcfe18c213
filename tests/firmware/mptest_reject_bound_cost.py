# What the rejection reports' token buckets cost a scheduler pass (docs/ground-link.md
# "Verification and reason codes"), counted in instructions on QEMU (-icount shift 0: the
# clock follows the instruction count, 1 ns an instruction). While a bucket is below its
# burst the ground poll refills it every pass (a ticks_us and a few small-int operations);
# every pass carries the tracking loop's periods (docs/scheduling.md). An empty poll:
# ~6,000 instructions; refilling, +1,270 (MPS2) and +1,170 (netduino2) with the refill in
# viper (telecommands.refill_reject_credit); as a GroundLink method it was +3,210 and
# +3,365, and this test failed.
import gc

import board
import micropython
from payload import keystore

QEMU_ICOUNT_SHIFT = 0
# _ROOT, _fresh_root (appended by the harness)
MPTEST_HELPERS = ("link_helpers.py",)
POLLS = 200


def _wrapped_us(a, b):
    return (b - a) & 0x3FFFFFFF


class _Silent:
    """A ground link that has nothing to read and takes everything written."""

    def readinto(self, buf):
        return 0

    def write(self, data):
        return len(data)


class _Board:
    def __getattr__(self, name):
        return getattr(board, name)


def _quiet_controller():
    from payload import app

    quiet = _Board()
    quiet.ground_link = _Silent()
    root = _fresh_root(bytes(range(32)))
    quiet.key_region = keystore.FileRegion(root + ".keyregion")
    return app.Controller(quiet, root)


def test_a_ground_poll_refilling_the_buckets_costs_under_2000_instructions_more():
    controller = _quiet_controller()
    link = controller.link
    clock = board.clock
    poll = controller.poll_ground

    def polls_us(locked):
        # Locked: a bytecode call whose frame is over 11 words (VM_MAX_STATE_ON_STACK,
        # py/objfun.c) takes it from the heap and frees it on return, and gc_alloc's
        # search for the block costs what the heap's fragmentation makes it: the same
        # empty poll measured 3,300 to 21,000 instructions with the heap in different
        # states, which made `extra` below anything from -14,000 up (the test passed
        # for the wrong reason). With the heap locked the frame goes on the C stack
        # (objfun.c's fallback): the poll's own instructions, the same in both phases.
        gc.collect()
        if locked:
            micropython.heap_lock()
        try:
            start = clock.ticks_us()
            for _ in range(POLLS):
                poll()
            return _wrapped_us(start, clock.ticks_us())
        finally:
            if locked:
                micropython.heap_unlock()

    polls_us(False)  # warm (the first calls' lookups)
    assert not link.reject_credit_low
    full_us = polls_us(True)
    full_heap_us = polls_us(False)
    link.handle(b"\x00")  # a garbage frame: its report spends the garbage bucket
    controller.ground_queue.drain(1_000_000)
    assert link.reject_credit_low
    low_us = polls_us(True)
    low_heap_us = polls_us(False)
    assert link.reject_credit_low  # (800 polls are well under the bucket's 2 s)
    assert link.rejected[1] == 1 and not link.rejections_unreported
    if board.NAME != "unix":  # -icount shift 0: 1 ns an instruction
        full = full_us * 1000 // POLLS
        extra = (low_us - full_us) * 1000 // POLLS
        print(
            "@@reject-bound pass",
            full,
            "instructions, refilling +",
            extra,
            "(frames from the heap:",
            full_heap_us * 1000 // POLLS,
            "and",
            low_heap_us * 1000 // POLLS,
            ")",
        )
        assert extra < 2000, (full, extra)
    del controller, link, poll
    gc.collect()  # one Controller at a time (the STM32 board's 96 KiB heap)


def test_an_empty_ground_poll_allocates_nothing_with_the_buckets_low_or_full():
    # Every pass calls the ground poll (the tracking loop's periods ride on the passes,
    # docs/scheduling.md); whatever it allocates is garbage a collection must clear in
    # the middle of a pass. It passed `self.on_ground_frame` to _pump_frame, a new bound
    # method each pass (12 bytes on the M3), whether a bucket was refilling or not; the
    # bus poll (no data path) `self.on_bus_frame` likewise. (A Controller pass hides
    # this: the scheduler counts a duty's MemoryError as its error and goes on.)
    from payload import telecommands as t

    controller = _quiet_controller()
    link = controller.link
    poll = controller.poll_ground
    poll_bus = controller.poll_bus
    poll()  # warm
    poll_bus()
    link.handle(b"\x00")  # a garbage frame's report: the garbage bucket low
    controller.ground_queue.drain(1_000_000)
    states = []
    for _ in range(2):
        gc.collect()
        low = link.reject_credit_low
        refilled_at = link.reject_credit[2]  # the ticks of the last refill
        micropython.heap_lock()
        try:
            for _ in range(20):
                poll()
                poll_bus()  # (the payload bus's poll, where no data path owns the bus)
        finally:
            micropython.heap_unlock()
        # refilled every pass while low; not at all while full (its cost is one read)
        states.append((low, link.reject_credit[2] != refilled_at))
        # both full: not refilled (the poll reads the flag only)
        link.reject_credit[0] = t.GARBAGE_REPORT_INTERVAL_US * t.GARBAGE_REPORT_BURST
        link.reject_credit[1] = t.REFUSAL_REPORT_INTERVAL_US * t.REFUSAL_REPORT_BURST
        link.reject_credit_low = 0
    assert states == [(1, True), (0, False)], states
    del controller, link, poll, poll_bus
    gc.collect()
