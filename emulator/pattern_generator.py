"""The optical head's pattern generator and pattern memory (head-generation mode,
docs/sequencer.md "Head generation"; registers in docs/payload-bus.md, block 0x0600;
firmware side firmware/payload/headgen.py).

While GEN_CTRL is set the head emits, at every frame boundary, symbols mapped from its
QRNG at the slot clock (emulator/head_qrng.py stands in for the physics), with the
thresholds the controller programmed, exactly as the sequencer maps QRNG bytes. It writes
every emitted symbol to its pattern memory (on-board mass memory). Slot i of the memory
is the i-th generated slot since generation was last enabled: the pass's slot 0 is the
first generated slot.

There is no seed and no register that reads anything random: the controller programs
the thresholds and reads the run's frame numbers. The symbols leave the head only through
the pattern-memory port (`OpticalHead` OP_PATTERN_READ, by lists of slot indices), which
the payload processor reads for Alice; tests read them through `truth()`.

`fast_forward(head, t_ps)` is the emulation's stand-in for the pass going by: in lockstep
the head's clock only moves when the controller waits for it, and in head-generation mode
the controller has nothing to wait for, so the mission advances the clock to the end of
the pass at once (TDC events included) instead of one frame boundary at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from emulator.head_qrng import health_failures
from emulator.optical_head import RegisterDevice
from host.formats.patterns import mapping_from_thresholds
from host.protocol import payload_bus as pb
from host.protocol.symbols import SymbolMapping

BASE = 0x0600
GEN_CTRL, GEN_THRESHOLDS, GEN_FIRST_FRAME, GEN_FRAMES = 0x00, 0x05, 0x08, 0x09
GEN_HEALTH = 0x0A  # R: the run's QRNG health-test failures (head_qrng.RCT_FAILED | APT_FAILED)


@dataclass(frozen=True)
class PatternRun:
    """One enable..disable of the generator: what the pattern memory holds."""

    first_frame: int  # the head's frame number of the first generated frame
    frame_slots: int
    mapping: SymbolMapping
    word_offset: int  # QRNG words used before this run: the memory never reuses one


class PatternMemory:
    """The head's pattern memory: the symbols of the current (or last) run, by slot index.

    On hardware this is mass memory written at the slot clock (4 bits per slot,
    docs/sequencer.md gives the size per pass); here the stored symbols are recomputed
    from the QRNG stand-in on read, which is the same thing for every reader."""

    def __init__(self, generator: PatternGenerator):
        self._generator = generator

    @property
    def slot_count(self) -> int:
        run = self._generator.run
        return 0 if run is None else self._generator.frames() * run.frame_slots

    first_slot = 0

    def covers(self, slot_indices) -> np.ndarray:
        slots = np.asarray(slot_indices, dtype=np.int64)
        return (slots >= 0) & (slots < self.slot_count)

    def symbols(self, slot_indices) -> np.ndarray:
        """Symbol nibbles (uint8) of the given slots; IndexError for a slot not held."""
        slots = np.asarray(slot_indices, dtype=np.int64).reshape(-1)
        if not np.all(self.covers(slots)):
            raise IndexError("slot not in the pattern memory")
        return self.generated(slots)

    def generated(self, slots: np.ndarray) -> np.ndarray:
        """The run's symbols of `slots`, emitted or not yet (PlannedTruth's source)."""
        run = self._generator.run
        if slots.size == 0:
            return np.zeros(0, np.uint8)
        words = self._generator.head.qrng.slot_words(run.word_offset + slots)
        return run.mapping.symbols(words)


class PatternTruth:
    """What the head emitted, for tests and the ground simulation (the photons carry it):
    the emulator's truth interface. Never a product, a register or a message."""

    seed = None  # there is none; host.simulate.passgen.truth_summary records this field

    def __init__(self, memory: PatternMemory, slot_count: int):
        self._memory = memory
        self.first_slot = 0
        self.slot_count = slot_count

    def covers(self, slot_indices) -> np.ndarray:
        slots = np.asarray(slot_indices, dtype=np.int64)
        return (slots >= 0) & (slots < self.slot_count)

    def symbols(self, slot_indices) -> np.ndarray:
        return self._memory.symbols(slot_indices)


class PlannedTruth(PatternTruth):
    """What the head will emit over the run's first `slot_count` slots, computed before
    the frames go by (the QRNG stand-in is a keyed generator, the mapping the run's): the
    ground simulation of a pass the head emits at the pass's pace (`qkdsat mission` with
    the time transfer during the pass) needs its photons before they leave. The
    emulator's truth interface, as PatternTruth: never a product, register or message."""

    def symbols(self, slot_indices) -> np.ndarray:
        slots = np.asarray(slot_indices, dtype=np.int64).reshape(-1)
        if not np.all(self.covers(slots)):
            raise IndexError("slot not in the planned run")
        return self._memory.generated(slots)


class PatternGenerator(RegisterDevice):
    def __init__(self, head):
        self.head = head
        self.enabled = False
        self.thresholds = [0, 0, 0]
        self.first_frame = 0
        self._frames_at_stop = 0
        self._words_used = 0
        self.run: PatternRun | None = None
        self.runs: list[PatternRun] = []
        self.memory = PatternMemory(self)
        self.health = 0  # GEN_HEALTH: the current (or last) run's failed tests
        self._health_checked = 0  # frames of the run whose QRNG bytes passed the tests

    def frames(self) -> int:
        if self.enabled:
            return self.head.frame_count - self.first_frame
        return self._frames_at_stop

    def read_reg(self, offset: int) -> int:
        if offset == GEN_CTRL:
            return int(self.enabled)
        if GEN_THRESHOLDS <= offset < GEN_THRESHOLDS + 3:
            return self.thresholds[offset - GEN_THRESHOLDS]
        if offset == GEN_FIRST_FRAME:
            return self.first_frame
        if offset == GEN_FRAMES:
            return self.frames()
        if offset == GEN_HEALTH:
            return self.health
        raise KeyError(offset)

    def advance_to(self, t_ps: int) -> None:
        """The QRNG health tests (SP 800-90B, head_qrng.health_failures) on each frame's
        QRNG bytes before the frame is mapped and emitted: a frame that fails is not
        emitted, generation stops there (GEN_CTRL reads 0, GEN_FRAMES counts the frames
        before it) and GEN_HEALTH says which test failed, until the next run. The emulated
        source is AES-256-CTR, which passes them (tests/test_head_qrng.py runs them over
        its stream), so only the frames an injected fault reaches (HeadQrng.stick_from)
        are recomputed here: a pass's 10^10 slots are not."""
        run = self.run
        stuck = self.head.qrng.stuck_from()
        if not self.enabled or run is None or stuck is None:
            return
        started = self.head.frame_count - self.first_frame
        first = max(self._health_checked, (stuck - run.word_offset) // run.frame_slots)
        for frame in range(max(first, 0), started):
            first_word = run.word_offset + frame * run.frame_slots
            words = self.head.qrng.slot_words_range(first_word, run.frame_slots)
            failed = health_failures(words.astype("<u4").tobytes())
            if failed:
                self.health = failed
                self._frames_at_stop = frame
                self.enabled = False
                return
            self._health_checked = frame + 1

    def write_reg(self, offset: int, value: int) -> int:
        if offset == GEN_CTRL:
            on = bool(value & 1)
            if on and not self.enabled:
                if self.head.regs[pb.REG_LASER_CTRL] & 1:
                    return pb.E_REFUSED  # the pattern banks are in use
                self.first_frame = self.head.frame_count  # the next boundary's frame
                if self.run is not None:
                    self._words_used += self._frames_at_stop * self.run.frame_slots
                self.run = PatternRun(
                    self.first_frame,
                    self.head.regs[pb.REG_FRAME_SLOTS],
                    mapping_from_thresholds(*self.thresholds),
                    self._words_used,
                )
                self.runs.append(self.run)
                self._frames_at_stop = 0
                self.health = 0
                self._health_checked = 0
                self.enabled = True
            elif not on and self.enabled:
                self._frames_at_stop = self.head.frame_count - self.first_frame
                self.enabled = False
            return pb.OK
        if self.enabled:
            return pb.E_REFUSED  # thresholds are fixed while generating
        if GEN_THRESHOLDS <= offset < GEN_THRESHOLDS + 3:
            limit = 1 << 15 if offset == GEN_THRESHOLDS else 1 << 16
            if value > limit:
                return pb.E_BAD_LENGTH
            self.thresholds[offset - GEN_THRESHOLDS] = value
            return pb.OK
        if offset in (GEN_FIRST_FRAME, GEN_FRAMES, GEN_HEALTH):
            return pb.E_READ_ONLY
        return pb.E_BAD_ADDRESS

    def truth(self) -> PatternTruth:
        """What the laser emitted in the current (or last) run (tests, ground simulation)."""
        return PatternTruth(self.memory, self.memory.slot_count)


def attach(head) -> PatternGenerator:
    generator = PatternGenerator(head)
    head.attach(BASE, generator)
    head.pattern_memory = generator.memory
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
