"""Firmware data-path benchmarks (`make bench`): the sequencer's QRNG -> symbol kernel with
viper, as plain bytecode, and a bytearray copy of the same QRNG bytes (the baseline: the
ratio to it is the figure of merit), and the TDC ring kernels, on the unix target (wall
time) and on QEMU (instruction counts: -icount shift=0 makes the emulated clock advance
1 ns per instruction). Then the whole loop on unix: slots/s and TDC events/s through the
payload bus, ring and storage with nothing lost.

Numbers are printed, not asserted (no timing assertions); run with -s to see them."""

import mpbench

from emulator.optical_head import OpticalHead, TdcSources
from emulator.payload_run import run_pass
from emulator.targets import QemuTarget
from host.deploy.raw_repl import RawRepl

KERNELS = (
    """
import array
import board
from payload import sequencer, tdc
"""
    + mpbench.TIMED
    + """

SLOTS = 4096
qrng = bytearray((i * 2654435761 >> 7) & 0xFF for i in range(4 * SLOTS))
out = bytearray(SLOTS // 2)
copy_dst = bytearray(4 * SLOTS)
thr = sequencer.thresholds_for([0.5, 0.25, 0.25], 0.5)
state = array.array("I", bytes(4 * tdc.STATE_WORDS))
ring = bytearray(9 * 4096)
burst = bytearray((i * 7) & 0xFF for i in range(9 * 227))
for i in range(227):
    burst[9 * i] = 3
block = bytearray(9 * 227)
pps = bytearray(8 * 16)
epochs = bytearray(8 * tdc.EPOCH_SLOTS)


def viper():
    sequencer.map_symbols(qrng, SLOTS, out, thr)


def bytecode():
    sequencer.map_symbols_bytecode(qrng, SLOTS, out, thr)


def copy():
    copy_dst[:] = qrng


def tdc_burst():
    tdc.ring_push(state, ring, 4096, burst, 227, pps, epochs)
    tdc.ring_pop(state, ring, 4096, block, 227)


R = REPS
result = {
    "slots": SLOTS,
    "viper": timed(viper, R[0]),
    "bytecode": timed(bytecode, R[1]),
    "copy": timed(copy, R[2]),
    "tdc_events": 227,
    "tdc": timed(tdc_burst, R[3]),
}
print("BENCH", result)
"""
)


# The controller's whole frame path on the MCU, without the transport: the sequencer's
# step for 4096-slot frames (FIFO_READ replies decoded: COBS + CRC-16; symbols mapped;
# MEM_WRITE requests encoded; COMMIT; the PATTERN_FRAME record written to littlefs with
# its CRCs) and the TDC step (227-event bursts into the ring, blocks spooled). A first run
# records the head's replies (built on the MCU, not timed); the timed run replays that
# byte stream, so the link costs a memory copy, as a DMA-fed UART would.
FRAME_PATH = """
import board, os
from payload import bus as busmod, framing, sequencer, storage, tdc

clock = board.clock
root = board.mount_storage() + "/bench%d" % clock.ticks_us()
os.mkdir(root)


class Recorder:
    def __init__(self):
        self.rx = framing.FrameReader(busmod.MAX_BODY_BYTES)
        self.tx = framing.FrameWriter(busmod.MAX_BODY_BYTES)
        self.stream = bytearray()
        self.pos = 0
        self.frame = 0
        self.seed = 12345

    def readinto(self, buf):
        n = min(len(buf), len(self.stream) - self.pos)
        buf[:n] = self.stream[self.pos : self.pos + n]
        self.pos += n
        return n

    def write(self, buf):
        n = len(buf)
        i = 0
        view = memoryview(buf)
        while i < n:
            i += self.rx.feed(view[i:], n - i)
            if self.rx.ready:
                self.answer(bytes(self.rx.body))
        return n

    def answer(self, req):
        op, tag = req[0], req[1]
        if op == 1:
            count = req[4]
            body = bytearray(6 + 4 * count)
            body[3], body[4], body[5] = req[2], req[3], count
            body[6] = self.frame & 0xFF
            body[7] = self.frame >> 8
        elif op == 3:
            fifo, size = req[2], req[3] | (req[4] << 8)
            if fifo == busmod.FIFO_TDC:
                size = 9 * 227
            body = bytearray(6 + size)
            body[3], body[4], body[5] = fifo, size & 0xFF, size >> 8
            seed = self.seed
            for j in range(6, 6 + size):
                seed = (seed * 1103515245 + 12345) & 0x3FFFFFFF
                body[j] = seed >> 20
            self.seed = seed
            if fifo == busmod.FIFO_TDC:
                for e in range(227):
                    body[6 + 9 * e] = 3  # an uplink channel, not PPS
        else:
            body = bytearray(3)
            if op == 2 and (req[2] | (req[3] << 8)) == busmod.REG_COMMIT:
                self.frame += 1
        body[0] = op | 0x80
        body[1] = tag
        self.stream += self.tx.encode(body)


class Replay:
    def __init__(self, stream):
        self.stream = memoryview(stream)
        self.pos = 0

    def readinto(self, buf):
        n = min(len(buf), len(self.stream) - self.pos)
        buf[:n] = self.stream[self.pos : self.pos + n]
        self.pos += n
        return n

    def write(self, buf):
        return len(buf)


CONFIG = {"intensity_probabilities": [0.5, 0.25, 0.25], "slot_rate_hz": 100_000,
          "frame_slots": 4096}
FRAMES = 3
BURSTS = 8


def steps(link, name):
    store = storage.Storage(root + "/" + name)
    bus = busmod.Bus(link, clock)
    seq = sequencer.Sequencer(bus, store)
    seq.configure(CONFIG, 0)
    seq.running = True
    drain = tdc.TdcDrain(bus, store, ring_events=512)
    drain.running = True
    clock.update()
    t0 = clock.ticks_us()
    for _ in range(FRAMES):
        assert seq.step()
    t1 = clock.ticks_us()
    for _ in range(BURSTS):
        drain.step()
    t2 = clock.ticks_us()
    return ((t1 - t0) & 0x3FFFFFFF, (t2 - t1) & 0x3FFFFFFF, seq.frames_sent,
            drain.events_spooled, bus.bad_replies, bus.timeouts)


for d in ("/rec", "/run"):
    os.mkdir(root + d)
recorder = Recorder()
steps(recorder, "rec")
seq_us, tdc_us, frames, spooled, bad, timeouts = steps(Replay(recorder.stream), "run")
assert frames == FRAMES and bad == 0 and timeouts == 0, (frames, bad, timeouts)
print("BENCH", {"frame_slots": 4096, "frames": FRAMES, "seq_us": seq_us,
                "tdc_events": 227 * BURSTS, "tdc_spooled": spooled, "tdc_us": tdc_us})
"""


def _run_unix(reps) -> dict:
    return mpbench.run_unix(KERNELS.replace("REPS", repr(reps)))


def _run_qemu(reps) -> dict:
    return mpbench.run_qemu(KERNELS.replace("REPS", repr(reps)))


def _per(entry, items):
    elapsed_us, reps = entry
    return elapsed_us / (reps * items)  # us per item


def _report(name, r, unit):
    slots = r["slots"]
    viper, bytecode, copy = (_per(r[k], slots) for k in ("viper", "bytecode", "copy"))
    tdc = _per(r["tdc"], r["tdc_events"])
    if unit == "wall":
        print(f"\n[{name}] sequencer kernel, {slots} slots per call (wall time)")
        print(f"  viper     {1e6 / viper:14,.0f} slots/s")
        print(f"  bytecode  {1e6 / bytecode:14,.0f} slots/s   viper is {bytecode / viper:.1f}x")
        print(f"  copy      {1e6 / copy:14,.0f} slots/s   (bytearray copy of the 4 QRNG bytes)")
        print(f"  viper / copy-baseline time ratio: {viper / copy:.1f}  (figure of merit)")
        print(f"  TDC ring push+pop: {1e6 / tdc:,.0f} events/s")
    else:
        # icount shift=0: 1 emulated ns per instruction, so us * 1000 = instructions
        print(f"\n[{name}] sequencer kernel, {slots} slots per call (instructions, -icount)")
        print(f"  viper     {viper * 1000:8.1f} instructions/slot")
        print(f"  bytecode  {bytecode * 1000:8.1f} instructions/slot   viper is "
              f"{bytecode / viper:.1f}x")  # fmt: skip
        print(f"  copy      {copy * 1000:8.1f} instructions/slot")
        print(f"  viper / copy-baseline ratio: {viper / copy:.1f}  (figure of merit)")
        print(f"  TDC ring push+pop: {tdc * 1000:.1f} instructions/event")
        print(f"  at 25 MHz and 1 instruction/cycle: viper {25e6 / (viper * 1000):,.0f} slots/s,"
              f" TDC {25e6 / (tdc * 1000):,.0f} events/s")  # fmt: skip


def test_bench_sequencer_and_tdc_kernels_unix_and_qemu():
    _report("unix", _run_unix((200, 10, 2000, 2000)), "wall")
    _report("qemu MPS2-AN385", _run_qemu((3, 1, 20, 20)), "icount")


def run_frame_path_qemu(image=None) -> dict:
    """Instructions per frame and per TDC event of the whole controller path (-icount)."""
    kwargs = {"image": image} if image else {}
    with QemuTarget(boot="maintenance", icount_shift=0, **kwargs) as target:
        with RawRepl(target.ground_port, timeout_s=60.0) as repl:
            return mpbench.parse_bench(repl.exec(FRAME_PATH, timeout_s=900))


def test_bench_whole_frame_path_on_qemu():
    r = run_frame_path_qemu()
    per_frame = r["seq_us"] * 1000 / r["frames"]  # icount shift=0: 1 ns per instruction
    per_event = r["tdc_us"] * 1000 / r["tdc_events"]
    print(
        f"\n[qemu MPS2-AN385, whole frame path, -icount] {r['frame_slots']}-slot frame: "
        f"{per_frame / 1e6:.2f} M instructions ({per_frame / r['frame_slots']:.0f} per "
        f"slot) -> {25e6 * r['frame_slots'] / per_frame:,.0f} slots/s at 25 MHz"
    )
    print(f"  TDC burst path: {per_event:,.0f} instructions/event -> "
          f"{25e6 / per_event:,.0f} events/s at 25 MHz ({r['tdc_spooled']} spooled)")  # fmt: skip


def test_bench_whole_loop_on_unix():
    frame_slots, frames = 4096, 300
    head = OpticalHead(seed=1, pps_period_ps=10**9)
    config = {
        "intensity_probabilities": [0.5, 0.25, 0.25],
        "basis_probability_z": 0.5,
        "slot_rate_hz": 100_000_000,
        "frame_slots": frame_slots,
        "tdc": {"bursts_per_step": 1},
    }
    run = run_pass("unix", head, config, frames)
    slots = len(head.emitted) * frame_slots
    print(f"\n[unix, whole loop] sequencer through bus + storage: "
          f"{slots / run.run_seconds:,.0f} slots/s ({len(head.emitted)} frames)")  # fmt: skip
    # TDC: 8 bursts per pass, just under that rating (8 * 227 events per frame): nothing
    # may be lost; events/s of wall time through bus, ring and storage
    per_frame, frames = 1700, 100
    rate_hz = per_frame * 100_000_000 / frame_slots / 4
    head = OpticalHead(seed=2, sources=TdcSources(uplink_rate_hz=(rate_hz,) * 4))
    config["tdc"] = {"bursts_per_step": 8}
    run = run_pass("unix", head, config, frames)
    drained = run.telemetry["tdc"]["events_spooled"]
    assert run.telemetry["tdc"]["lost"] == 0
    print(f"[unix, whole loop] TDC drained without loss: {drained / run.run_seconds:,.0f} "
          f"events/s ({drained} events, lost {run.telemetry['tdc']['lost']})")  # fmt: skip
