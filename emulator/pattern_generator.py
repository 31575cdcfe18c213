"""The optical head's pattern generator (head-generation mode, docs/sequencer.md "Faster
sources"; registers in docs/payload-bus.md, block 0x0600; firmware side
firmware/payload/headgen.py).

While GEN_CTRL is set the head emits, at every frame boundary, the symbols of the
counter-based generator: the i-th generated slot (from 0 at the first generated frame
GEN_FIRST_FRAME) gets the QRNG word `host.protocol.symbols.counter_words(seed, i)`,
mapped with the thresholds the controller programmed exactly as the sequencer maps QRNG
bytes. What it emitted is therefore `CounterPatternSource(seed, mapping, first_slot,
slot_count)`: the emulator keeps only that description, never the slots (2.7e10 per pass).

`fast_forward(head, t_ps)` is the emulation's stand-in for the pass going by: in lockstep
the head's clock only moves when the controller waits for it, and in head-generation mode
the controller has nothing to wait for, so the mission advances the clock to the end of
the pass at once (TDC events included) instead of one frame boundary at a time.
"""

from __future__ import annotations

from emulator.optical_head import RegisterDevice
from host.formats.patterns import CounterPatternSource, mapping_from_thresholds
from host.protocol import payload_bus as pb

BASE = 0x0600
GEN_CTRL, GEN_SEED, GEN_THRESHOLDS, GEN_FIRST_FRAME, GEN_FRAMES = 0x00, 0x01, 0x05, 0x08, 0x09


class PatternGenerator(RegisterDevice):
    def __init__(self, head):
        self.head = head
        self.enabled = False
        self.seed_words = [0, 0, 0, 0]
        self.thresholds = [0, 0, 0]
        self.first_frame = 0
        self._frames_at_stop = 0
        self.runs: list[CounterPatternSource] = []  # one per enable..disable

    @property
    def seed(self) -> int:
        return sum((w & 0xFFFF) << (16 * i) for i, w in enumerate(self.seed_words))

    def frames(self) -> int:
        if self.enabled:
            return self.head.frame_count - self.first_frame
        return self._frames_at_stop

    def read_reg(self, offset: int) -> int:
        if offset == GEN_CTRL:
            return int(self.enabled)
        if GEN_SEED <= offset < GEN_SEED + 4:
            return self.seed_words[offset - GEN_SEED]
        if GEN_THRESHOLDS <= offset < GEN_THRESHOLDS + 3:
            return self.thresholds[offset - GEN_THRESHOLDS]
        if offset == GEN_FIRST_FRAME:
            return self.first_frame
        if offset == GEN_FRAMES:
            return self.frames()
        raise KeyError(offset)

    def write_reg(self, offset: int, value: int) -> int:
        if offset == GEN_CTRL:
            on = bool(value & 1)
            if on and not self.enabled:
                if self.head.regs[pb.REG_LASER_CTRL] & 1:
                    return pb.E_REFUSED  # the pattern banks are in use
                self.first_frame = self.head.frame_count  # the next boundary's frame
                self.enabled = True
            elif not on and self.enabled:
                self._frames_at_stop = self.head.frame_count - self.first_frame
                self.enabled = False
                self.runs.append(self.emitted())
            return pb.OK
        if self.enabled:
            return pb.E_REFUSED  # seed and thresholds are fixed while generating
        if GEN_SEED <= offset < GEN_SEED + 4:
            if value > 0xFFFF:
                return pb.E_BAD_LENGTH
            self.seed_words[offset - GEN_SEED] = value
            return pb.OK
        if GEN_THRESHOLDS <= offset < GEN_THRESHOLDS + 3:
            limit = 1 << 15 if offset == GEN_THRESHOLDS else 1 << 16
            if value > limit:
                return pb.E_BAD_LENGTH
            self.thresholds[offset - GEN_THRESHOLDS] = value
            return pb.OK
        if offset in (GEN_FIRST_FRAME, GEN_FRAMES):
            return pb.E_READ_ONLY
        return pb.E_BAD_ADDRESS

    def emitted(self) -> CounterPatternSource:
        """What the laser emitted in the current (or last) run."""
        slots = self.head.regs[pb.REG_FRAME_SLOTS]
        mapping = mapping_from_thresholds(*self.thresholds)
        # slot i of the run (counted from the first generated slot) gets word i
        return CounterPatternSource(self.seed, mapping, 0, self.frames() * slots)


def attach(head) -> PatternGenerator:
    generator = PatternGenerator(head)
    head.attach(BASE, generator)
    return generator


def fast_forward(head, t_ps: int) -> None:
    """Advance the head's clock to t_ps in one step. Only valid with the pattern banks
    idle (LASER_CTRL clear, nothing committed): every boundary passed would then only
    have counted the frame, which this does arithmetically."""
    with head._lock:
        if head.regs[pb.REG_LASER_CTRL] & 1 or head.back_committed is not None:
            raise RuntimeError("fast_forward: the pattern banks are in use")
        slots = head.regs[pb.REG_FRAME_SLOTS]
        rate = head.regs[pb.REG_SLOT_RATE_HZ]
        # boundaries k with k * slots / rate <= t: k <= t * rate / (slots * 1e12)
        last = t_ps * rate // (slots * 10**12)
        while head.boundary_ps(last + 1) <= t_ps:  # boundary_ps rounds down
            last += 1
        while last >= 0 and head.boundary_ps(last) > t_ps:
            last -= 1
        head._tdc_until(t_ps)
        head.frame_count = max(head.frame_count, last + 1)
        head.laser_active = False
        head.current = None
        for device in head.devices.values():
            device.advance_to(t_ps)
