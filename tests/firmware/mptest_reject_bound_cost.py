# What the rejection reports' token buckets cost a scheduler pass (docs/ground-link.md
# "Verification and reason codes"), counted in instructions on QEMU (-icount shift 0: the
# clock follows the instruction count, 1 ns an instruction). While a bucket is below its
# burst the ground poll refills it every pass (a ticks_us and a few small-int operations);
# every pass carries the tracking loop's periods (docs/scheduling.md). An empty poll:
# ~6,000 instructions; refilling, +1,270 (MPS2) and +1,170 (netduino2) with the refill in
# viper (telecommands.refill_reject_credit); as a GroundLink method it was +3,210 and
# +3,365, and this test failed.
import board
from payload import keystore

QEMU_ICOUNT_SHIFT = 0
# _ROOT, _fresh_root (appended by the harness)
MPTEST_HELPERS = ("link_helpers.py",)
POLLS = 200


def _wrapped_us(a, b):
    return (b - a) & 0x3FFFFFFF


def test_a_ground_poll_refilling_the_buckets_costs_under_2000_instructions_more():
    from payload import app

    class Silent:
        """A ground link that has nothing to read and takes everything written."""

        def readinto(self, buf):
            return 0

        def write(self, data):
            return len(data)

    class Board:
        def __getattr__(self, name):
            return getattr(board, name)

    quiet = Board()
    quiet.ground_link = Silent()
    root = _fresh_root(bytes(range(32)))
    quiet.key_region = keystore.FileRegion(root + ".keyregion")
    controller = app.Controller(quiet, root)
    link = controller.link
    clock = board.clock
    poll = controller.poll_ground

    def polls_us():
        start = clock.ticks_us()
        for _ in range(POLLS):
            poll()
        return _wrapped_us(start, clock.ticks_us())

    polls_us()  # warm (the first calls' lookups)
    assert not link.reject_credit_low
    full_us = polls_us()
    link.handle(b"\x00")  # a garbage frame: its report spends the garbage bucket
    controller.ground_queue.drain(1_000_000)
    assert link.reject_credit_low
    low_us = polls_us()
    assert link.reject_credit_low  # (200 polls are well under the bucket's 2 s)
    assert link.rejected[1] == 1 and not link.rejections_unreported
    if board.NAME != "unix":  # -icount shift 0: 1 ns an instruction
        full = full_us * 1000 // POLLS
        extra = (low_us - full_us) * 1000 // POLLS
        print("@@reject-bound pass", full, "instructions, refilling +", extra)
        assert extra < 2000, (full, extra)
