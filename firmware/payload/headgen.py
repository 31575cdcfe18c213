# Head-generation mode (docs/sequencer.md, "Head generation"): at source rates the
# controller-driven sequencer cannot reach (100-625 MHz), the optical head maps its own
# QRNG's bits to symbols at the slot clock, with the thresholds the controller programs,
# and writes every symbol to its pattern memory. Nothing random passes through the
# controller: there is no seed, and the symbols leave the head only through its
# pattern-memory port to the payload processor (Alice). The controller logs each run's
# description as PATTERN_RUN records (kind 7) in products/patterns.qrec (docs/formats.md):
# thresholds and frame numbers, nothing an eavesdropper could use.
#
# Registers (block 0x0600, docs/payload-bus.md):
#   GEN_CTRL        bit 0: generate (the head emits its generated pattern every frame)
#   GEN_THRESHOLDS  round(p_Z 2^15), c_0, c_1 (c_k = round(cumulative p_k 2^16), last 65536)
#   GEN_FIRST_FRAME R: the first generated frame;  GEN_FRAMES R: frames generated
#   GEN_HEALTH      R: the head QRNG's health tests (SP 800-90B, run by the head on its
#                   bytes before it maps them): bit 0 repetition count, bit 1 adaptive
#                   proportion failed; a failure has stopped generation in the head
from micropython import const

from payload import bus as busmod
from payload.sequencer import ConfigError
from payload.sequencer import _require as req

REG_GEN_CTRL = const(0x0600)
REG_GEN_THRESHOLDS = const(0x0605)  # 3 registers
REG_GEN_FIRST_FRAME = const(0x0608)
REG_GEN_FRAMES = const(0x0609)
REG_GEN_HEALTH = const(0x060A)
KIND_PATTERN_RUN = const(7)
RECORD_BYTES = const(28)
GENERATOR_HEAD_QRNG = const(2)  # 1 was the retired splitmix64 seed expansion


def _put_u32(buf, offset, value):
    for i in range(4):
        buf[offset + i] = (value >> (8 * i)) & 0xFF


class HeadGenerator:
    """Programs the head's generator, logs what it generates. Not a scheduler duty: once
    started, the head needs nothing from the controller until stop."""

    def __init__(self, bus, sequencer):
        self.bus = bus
        self.sequencer = sequencer  # its configuration, thresholds and pattern log
        self.running = False
        self.first_frame = 0
        self.frames = 0
        self.records = 0
        self.qrng_fault = None  # "rct" / "apt": the head's health tests stopped this run

    def _record(self):
        """PATTERN_RUN payload: u32 generator, u32 basis_threshold, u32 c_0, u32 c_1,
        u32 first_frame, u32 frame_slots, u32 frames (0 while running)."""
        log = self.sequencer.log
        rec = log.payload
        _put_u32(rec, 0, GENERATOR_HEAD_QRNG)
        thresholds = self.sequencer._thresholds
        for i in range(3):
            _put_u32(rec, 4 + 4 * i, thresholds[i])
        _put_u32(rec, 16, self.first_frame)
        _put_u32(rec, 20, self.sequencer.config["frame_slots"])
        _put_u32(rec, 24, self.frames)
        kind = log.kind
        log.kind = KIND_PATTERN_RUN  # the pattern product holds both record kinds
        try:
            seq = log.commit(RECORD_BYTES, sync=True)  # durable before the run emits
        finally:
            log.kind = kind
        if seq < 0:
            return False  # storage full or failing: counted in the storage status
        self.records += 1
        return True

    def start(self):
        seq = self.sequencer
        cfg = seq.config
        bus = self.bus
        if not seq.log.can_commit(RECORD_BYTES):
            raise ConfigError("storage full: no room to log the run (delete products)")
        req(bus.write1(busmod.REG_LASER_CTRL, 0), "LASER_CTRL")
        req(bus.write1(REG_GEN_CTRL, 0), "GEN_CTRL (no generator in this head?)")
        req(bus.write1(busmod.REG_FRAME_SLOTS, cfg["frame_slots"]), "FRAME_SLOTS")
        req(bus.write1(busmod.REG_SLOT_RATE_HZ, cfg["slot_rate_hz"]), "SLOT_RATE_HZ")
        thresholds = seq._thresholds
        for i in range(3):
            req(bus.write1(REG_GEN_THRESHOLDS + i, thresholds[i]), "GEN_THRESHOLDS")
        # read back: the record must describe what the head generates
        req(bus.read(REG_GEN_THRESHOLDS, 3), "GEN read-back")
        w = bus.words
        for i in range(3):
            if w[i] != thresholds[i]:
                raise ConfigError("optical head did not take GEN_THRESHOLDS")
        self.qrng_fault = None
        req(bus.write1(REG_GEN_CTRL, 1), "GEN_CTRL")
        self.first_frame = bus.read1(REG_GEN_FIRST_FRAME)
        if self.first_frame < 0:
            raise ConfigError("optical head: GEN_FIRST_FRAME unreadable")
        self.frames = 0
        if cfg.get("intensities") is not None:
            # the laser's mean photon numbers travel with the run records: Alice's own
            # record, which the distillation checks pass.json against (docs/formats.md)
            seq._log_config()
        # the run is logged before a single slot of it is emitted, or it does not run
        if not self._record():
            bus.write1(REG_GEN_CTRL, 0)
            raise ConfigError("storage could not log the run: generator stopped")
        self.running = True

    def check(self):
        """While the head generates (housekeeping's period): its QRNG's health, which the
        controller cannot test itself (the bytes never leave the head). A failure has
        stopped generation in the head at the failing frame, none of whose bytes was
        emitted; here the run's end is logged with the frames before it, and the fault is
        reported (qrng_fault) until the next start. True if it found one."""
        if not self.running:
            return False
        health = self.bus.read1(REG_GEN_HEALTH)
        if health <= 0:  # healthy, or unreadable (a bus failure, counted by the bus)
            return False
        self.qrng_fault = "rct" if health & 1 else "apt"
        self.stop()
        return True

    def stop(self):
        bus = self.bus
        if not self.running and self.qrng_fault is not None:
            return True  # stopped by a health-test failure: its end is logged already
        self.running = False
        bus.try_again()  # the generator-off command gets its tries (bus.Bus.down)
        status = bus.write1(REG_GEN_CTRL, 0)
        frames = bus.read1(REG_GEN_FRAMES)
        if status != busmod.OK or frames < 0:
            self.sequencer.bus_failures += 1
            return False
        self.frames = frames
        return self._record()  # False: the run's end is not logged (storage status says why)

    def telemetry(self):
        out = {
            "running": self.running,
            "first_frame": self.first_frame,
            "frames": self.frames,
            "records": self.records,
        }
        if self.qrng_fault is not None:
            out["qrng_fault"] = self.qrng_fault
        return out
