"""The paced tracking loop during an emulated pass on QEMU MPS2 with -icount (make bench):
which duties run while the loop is paced, the longest call of each, and the loop's
periods, overruns and worst lateness, read from housekeeping (docs/scheduling.md,
"Stalls of the paced loop in a pass"), with the loop paced by the scheduler over the
payload bus (before) and run from the board's timer interrupt over its own tracking link
(after: "The loop on a timer interrupt").

    .venv/bin/python -m pytest -q benchmarks/bench_paced_loop_stalls.py -s

The real firmware image, the emulated optical head with the tracking plant behind its
0x0500 block over the payload bus (TCP), the authenticated ground link: configure (a
full-pass prediction upload and a pass configuration with a tracking section), start,
RUN_S seconds, housekeeping, stop. -icount shift=0: 1 ns of virtual time an
instruction, so a duty's worst_us * 1000 is the instructions its longest call held the
CPU, the spin waiting for the emulated head's bus bytes included (QEMU's UART hands the
guest its bytes at the host's pace: that wait is not CPU work and is not the flight
bus's speed). Figures are printed, not asserted: they depend on the host's load.

A baseline image in the same run (the figures move with the host's load, so a change is
judged against the image before it measured beside it, pass for pass):

    QKDSAT_BASELINE_IMAGE=/path/to/before/firmware.elf .venv/bin/python -m pytest -q \
        benchmarks/bench_paced_loop_stalls.py -s

runs each pass on that image first, then on the build's, and prints both.
"""

from __future__ import annotations

import os
import time

import pytest

from emulator.optical_head import HeadServer, TdcSources
from emulator.optical_plant import OpticalPlant, PlantParams, prediction_table
from emulator.payload_run import payload_session
from emulator.tracking_lockstep import TrackingHead
from host.protocol import tracking as trk
from tests.tracking_passes import attach_pattern_generator

RUN_S = 20.0
QEMU_ICOUNT_SHIFT = 0  # 1 ns of virtual time per instruction
MCU_HZ = 25_000_000
# The mission's satellite TDC sources in a controller-sequenced pass (host/mission/run.py:
# the sync laser at the profiles' 10 kHz, the beacon's timing channel at 1 kHz)
MISSION_SOURCES = TdcSources(sync_rate_hz=1e4, beacon_rate_hz=1e3)
# One more duty, last in a pass, for the measurement: when the pass starts it clears every
# duty's worst_us and the loop's worst lateness (so the figures are the pass's, not the
# configure's), and it counts the garbage collections (it sees the free heap grow: only a
# collection frees blocks here) and the pass's virtual time, kept where the status carries
# them, in its own worst_us: 10^9 + ms of the pass * 100 + collections (10^9 keeps it above
# what the scheduler writes there, the duty's call time, ~1 ms with gc.mem_free's heap
# walk; a housekeeping packet has no room for more fields: with one more duty it shed
# worst_us). And the mission status leaves out the sections this bench does not read (bus,
# generator, clock): with the TDC at 11 k events/s the report is near its packet's limit,
# and housekeeping then sheds worst_us first (telecommands.HOUSEKEEPING_SHED_ORDER), the
# figures this bench is for.
GC_WATCH = """
import gc
from payload import mission as _mission
_duties = _mission.Mission.duties
_gcw = [0, 0, None, None, 0, 0]
def _watch():
    mission, sched = _gcw[3]
    now = mission.board.clock.ticks_us()
    if mission.pass_running and not _gcw[4]:
        _gcw[4] = 1
        _gcw[5] = now
        for duty in sched.duties:
            if duty is not _gcw[2]:
                duty.worst_us = 0
        if sched.loop is not None:
            sched.loop.state[4] = 0  # scheduler._WORST_LATE
    free = gc.mem_free()
    grew = free > _gcw[1] + 2048
    _gcw[1] = free
    if grew:
        _gcw[0] += 1
    ms = ((now - _gcw[5]) & 0x3FFFFFFF) // 1000 if _gcw[4] else 0
    _gcw[2].worst_us = 1000000000 + ms * 100 + min(_gcw[0], 99)  # (above its own call's us)
    return False
def _duties_watched(self, sched):
    _duties(self, sched)
    _gcw[2] = sched.add("gcw", _watch)
    _gcw[3] = (self, sched)
_mission.Mission.duties = _duties_watched
_status = _mission.Mission.status
def _status_read(self):
    out = _status(self)
    for key in ("bus", "generator", "clock"):
        out.pop(key, None)
    return out
_mission.Mission.status = _status_read
"""


BASELINE_IMAGE = os.environ.get("QKDSAT_BASELINE_IMAGE")


def measure_pass(
    mode: str,
    sources: TdcSources,
    run_s: float = RUN_S,
    image=None,
    timer: bool = True,
    target: str = "qemu",
    reply_wait_us: int | None = None,
    prediction_s: float = 400.0,
) -> dict:
    """Housekeeping's mission status during the pass (after run_s) and after stop.
    timer: the tracking link wired, so the loop runs from the board's timer interrupt
    (False: paced by the scheduler over the payload bus, as before)."""
    params = PlantParams(seed=5, initial_error_urad=(500.0, -300.0))
    plant = OpticalPlant(params, 120.0)
    # head generation: the head's clock follows the wall clock (nothing in the pass polls
    # a bank, which is what advances a lockstep head); controller: lockstep, as run_pass
    head = TrackingHead(
        seed=5,
        fifo_depth=2048,
        sources=sources,
        pps_period_ps=10**12,
        time_scale=1.0 if mode == "head" else None,
    )
    head.attach(plant)
    if mode == "head":
        attach_pattern_generator(head)
    chunks, reference = trk.prediction_upload(prediction_table(params, prediction_s))
    config = {
        "intensity_probabilities": [0.5, 0.25, 0.25],
        "basis_probability_z": 0.7,
        # head: the mission's 100 MHz source; controller: within its rated 10 k slots/s
        "slot_rate_hz": 100_000_000 if mode == "head" else 10_000,
        "frame_slots": 4096,
        "pps_period_ps": 10**12,
        "tdc": {"bursts_per_step": 1},
        "pattern_generation": mode,
        "tracking": {"parameters": {}, "predictions": reference},
    }
    with HeadServer(head) as server:
        with payload_session(
            target,
            server.address,
            icount_shift=QEMU_ICOUNT_SHIFT,
            before_app=GC_WATCH
            + ("" if reply_wait_us is None else f"\n_mission.REPLY_WAIT_US = {reply_wait_us}\n"),
            image=image,
            track_address=server.track_address if timer else None,
        ) as (_target, payload):
            for chunk in chunks:
                payload.configure(chunk)
            payload.configure(config)
            payload.start()
            started = payload.housekeeping()["mission"]
            time.sleep(run_s)
            during = payload.housekeeping()["mission"]
            payload.stop()
            after = payload.housekeeping()["mission"]
    return {"started": started, "during": during, "after": after, "plant_periods": plant.k}


def _watched(status: dict) -> tuple[int, int]:
    """(ms of the pass's virtual time, collections so far) from the gcw duty's worst_us."""
    code = status["worst_us"]["gcw"] - 1_000_000_000
    return code // 100, code % 100


LOOP_PERIOD_US = 500  # the 2 kHz set both MCU boards run


def _report(title: str, r: dict) -> None:
    during = r["during"]
    state, steps, bus_errors, _, _, overruns, path = during["tracking"]
    how = {2: "timer interrupt, tracking link", 1: "paced by the scheduler, payload bus"}
    print(f"\n[{title}] {RUN_S:.0f} s of host time, -icount shift={QEMU_ICOUNT_SHIFT}, "
          f"the loop {how.get(path, 'general period')}")  # fmt: skip
    virtual_ms, collections = _watched(during)  # the pass's virtual time when sampled
    due = virtual_ms * 1000 // LOOP_PERIOD_US
    print(f"  loop: {steps} kernel periods in {virtual_ms} ms of virtual time ({due} due): "
          f"{steps * 1000 // max(virtual_ms, 1)} Hz, {steps * 100 // max(due, 1)} % of the "
          f"periods; {overruns} late or skipped ({overruns * 100 // max(steps + overruns, 1)} "
          f"%); worst lateness {during['worst_us']['trk']:,} us of virtual time; state "
          f"{state}, bus errors {bus_errors}")  # fmt: skip
    tdc = during["tdc"]
    _, before = _watched(r["started"])
    print(f"  garbage collections during the pass: {collections - before}")
    print(f"  tdc: {tdc['events_accepted']} events taken, {tdc['lost']} lost (FIFO overflow); "
          f"sequencer frames sent {during['sequencer']['frames_sent']}")  # fmt: skip
    print(
        "  longest call of each duty (instructions, waits on the bus included; "
        "ms at 25 MHz if it were all CPU):"
    )
    for name, worst_us in sorted(during["worst_us"].items(), key=lambda kv: -kv[1]):
        if name in ("trk", "gcw"):
            continue
        instructions = worst_us * 1000
        print(f"    {name:10s} {instructions / 1e6:8.2f} M  {instructions / MCU_HZ * 1e3:8.1f} ms")


@pytest.mark.parametrize(
    "mode, sources, title",
    [
        ("head", TdcSources(), "head generation (the mission's default), TDC: PPS only"),
        ("head", MISSION_SOURCES, "head generation, TDC at 11 k events/s"),
        ("controller", MISSION_SOURCES, "controller sequencing, TDC at 11 k events/s"),
    ],
)
def test_bench_paced_loop_stalls_in_a_pass_on_qemu(mode, sources, title):
    if BASELINE_IMAGE:  # (an image from before the tracking link: the loop paced)
        _report(
            f"{title}; baseline {BASELINE_IMAGE}",
            measure_pass(mode, sources, image=BASELINE_IMAGE, timer=False),
        )
    # this build: the loop paced by the scheduler over the payload bus (no tracking link),
    # then on the timer interrupt over its own link, in the same run
    _report(title + "; the loop paced", measure_pass(mode, sources, timer=False))
    _report(title + "; the loop on the timer interrupt", measure_pass(mode, sources, timer=True))


# What a record's commit holds the CPU on littlefs over the QEMU board's NOR model: the
# duties that log without touching the bus (clock, epochs, trk-tm) stall the loop this long
STORAGE_COMMITS = """
import board, os
from payload import storage
clock = board.clock
root = board.mount_storage() + "/stalls%d" % clock.ticks_us()
os.mkdir(root)
store = storage.Storage(root, -1, storage.RECORDS_PER_SYNC, clock)
store.sync_age_us = 0x3FFFFFFF  # deferred logs: synced below, by hand, timed apart
for name, size, mode in (
    ("clock", 28, 0), ("hk", 200, 0), ("tdc", 2047, 1), ("clock-d", 28, 2), ("hk-d", 200, 2)
):
    log = store.open_log(name, storage.KIND_CLOCK_DISCIPLINE, size, mode == 1, mode == 2)
    data = bytes(size)
    worst = total = 0
    for _ in range(24):
        t0 = clock.ticks_us()
        log.append(data)
        took = (clock.ticks_us() - t0) & 0x3FFFFFFF
        total += took
        worst = max(worst, took)
    t0 = clock.ticks_us()
    log.sync()  # deferred: the one sync of its 24 records (the sync duty's call)
    synced = (clock.ticks_us() - t0) & 0x3FFFFFFF
    print("@@commit", name, size, mode, total // 24, worst, synced)
"""


def test_bench_record_commit_on_littlefs_on_qemu():
    from emulator.targets import QemuTarget
    from host.deploy.raw_repl import RawRepl

    with QemuTarget(boot="maintenance", icount_shift=QEMU_ICOUNT_SHIFT) as target:
        with RawRepl(target.ground_port, timeout_s=60.0) as repl:
            output = repl.exec(STORAGE_COMMITS, timeout_s=600)
    print("\n[qemu MPS2-AN385, one record appended to a fresh log on littlefs, -icount]")
    modes = ("synced", "batched (a sync per 8)", "deferred (sync duty)")
    for line in output.splitlines():
        if line.startswith("@@commit"):
            _, name, size, mode, mean_us, worst_us, sync_us = line.split()
            print(f"  {name:7s} {size:>5s} bytes {modes[int(mode)]:22s} "
                  f"mean {int(mean_us) / 1000:.2f} M, "
                  f"worst {int(worst_us) / 1000:.2f} M instructions "
                  f"({int(worst_us) * 1000 / MCU_HZ * 1e3:.0f} ms at 25 MHz)"
                  + (f"; then one sync of the 24: {int(sync_us) / 1000:.2f} M"
                     if mode == "2" else ""))  # fmt: skip


# The record commits alone, without the emulated head: the real Scheduler paces a loop
# at the 2 kHz period (an empty step: the loop's own cost is not the subject) while four
# duties commit records to the board's littlefs at the pass's rates and sizes (clock
# 28 B a second, housekeeping ~200 B every 100 ms, tracking 972 B every 200 ms, epochs
# 12 B every 10 s), plus the sync duty where the image has one. No bus I/O, so under
# -icount the figures do not move with the host's load (the passes above do: their bus
# waits run at the host's pace). Two time bases: the virtual time as the passes above
# count it (1 ns an instruction: a 500 us period is 500 k instructions), and the 25 MHz
# M3's (every time, the sync age included, divided by 40: a 2 kHz period is 12,500
# instructions, the rates and the 1 s age those of 25 M instructions a second).
COMMIT_STALLS = """
import board, os
from payload import scheduler, storage
clock = board.clock
root = board.mount_storage() + "/cstall%d" % clock.ticks_us()
os.mkdir(root)
try:
    store = storage.Storage(root, -1, storage.RECORDS_PER_SYNC, clock)
    options = {"deferred": True}
except TypeError:  # an image before the deferred syncs
    store = storage.Storage(root)
    options = {}
SCALE = SCALE_VALUE
if hasattr(store, "sync_age_us"):
    store.sync_age_us //= SCALE
sched = scheduler.Scheduler(clock)
logs = []
def producer(name, size, period_us):
    log = store.open_log(name, storage.KIND_HOUSEKEEPING, size, **options)
    logs.append(log)
    data = bytes(size)
    def step():
        log.append(data)
        return True
    sched.add(name, step, period_us // SCALE)
producer("clock", 28, 1_000_000)
producer("hk", 200, 100_000)
producer("trk-tm", 972, 200_000)
producer("epochs", 12, 10_000_000)
if hasattr(store, "sync_step"):
    sched.add("sync", store.sync_step)
loop = sched.set_loop("trk", lambda: True, 500 // SCALE)
t0 = clock.ticks_us()
while (clock.ticks_us() - t0) & 0x3FFFFFFF < RUN_US:
    sched.run_once()
print("@@loop", loop.periods, loop.overruns, loop.worst_us)
for d in sched.duties:
    print("@@duty", d.name, d.calls, d.worst_us, d.total_s * 1000000 + d.total_us)
syncs = sum(getattr(log, "syncs", log.next_seq) for log in logs)
print("@@syncs", syncs, sum(log.next_seq for log in logs))
"""
COMMIT_STALLS_S = 3


def _commit_stalls(image=None, scale=1) -> str:
    from emulator.targets import QemuTarget
    from host.deploy.raw_repl import RawRepl

    options = {} if image is None else {"image": image}
    with QemuTarget(boot="maintenance", icount_shift=QEMU_ICOUNT_SHIFT, **options) as target:
        with RawRepl(target.ground_port, timeout_s=60.0) as repl:
            return repl.exec(
                COMMIT_STALLS.replace("RUN_US", str(COMMIT_STALLS_S * 1_000_000)).replace(
                    "SCALE_VALUE", str(scale)
                ),
                timeout_s=900,
            )


def test_bench_record_commit_stalls_of_a_paced_loop_on_qemu():
    runs = [("this build", None)]
    if BASELINE_IMAGE:
        runs.insert(0, (f"baseline {BASELINE_IMAGE}", BASELINE_IMAGE))
    for scale, base in ((1, "virtual time"), (40, "25 MHz time (times / 40)")):
        for title, image in runs:
            _report_commit_stalls(f"{base}; {title}", _commit_stalls(image, scale), scale)


def _report_commit_stalls(title, output, scale):
    print(f"\n[record commits beside a loop paced at 2 kHz, {COMMIT_STALLS_S * scale} s of "
          f"{title}, -icount shift={QEMU_ICOUNT_SHIFT}, no bus]")  # fmt: skip
    for line in output.splitlines():
        fields = line.split()
        if line.startswith("@@loop"):
            periods, overruns, worst_us = map(int, fields[1:])
            due = COMMIT_STALLS_S * scale * 2000  # periods of 2 kHz in the run
            print(f"  loop: {periods} periods of {due} due ({periods / due:.1%}), "
                  f"{overruns} overruns "
                  f"({overruns / max(periods, 1):.1%} late), worst lateness "
                  f"{worst_us / 1000:.2f} M instructions "
                  f"({worst_us * 1000 / MCU_HZ * 1e3:.0f} ms at 25 MHz)")  # fmt: skip
        elif line.startswith("@@duty"):
            name, calls, worst_us, total_us = fields[1], *map(int, fields[2:])
            print(f"  {name:7s} {calls:7d} calls, longest {worst_us / 1000:6.2f} M "
                  f"instructions, {total_us / 1000:8.1f} M in all")  # fmt: skip
        elif line.startswith("@@syncs"):
            print(f"  littlefs syncs of these logs: {fields[1]} for {fields[2]} records")


# What the loop on the timer interrupt takes from the main program, on both MCU images:
# a fixed viper workload timed alone, then with the loop running over the tracking link
# (-icount shift=0: the difference over the periods fired is the instructions the
# interrupt took a period, its entry, the callback, the kernel, the Thumb pair and the
# bounded poll for a reply still on its way, which on QEMU's UART is the host's pace).
TIMER_LOOP_COST = """
import board, micropython
from payload import bus, tracking, tracking_duty
@micropython.viper
def spin(n: int) -> int:
    x = 0
    for i in range(n):
        x = (x + i) & 0xFFFF
    return x
tracker = tracking.Tracker({{"loop_rate_hz": 2000}})
tracker.load_predictions({rows!r})
link = bus.Bus(board.payload_bus, board.clock, timeout_us=board.BUS_TIMEOUT_US)
duty = tracking_duty.TrackingDuty(link, tracker)
irqtimer = tracking_duty.timer_interrupt()
loop = tracking_duty.TimerLoop(duty, board.tracking_link, irqtimer, {wait_us})
duty.timer_loop = loop
ticks = board.clock.ticks_us
t0 = ticks()
spin({spins})
alone_us = (ticks() - t0) & 0x3FFFFFFF
tracker.start()
loop.start(tracker.cfg[0])
spin(2000)  # (the first periods: start, acquisition)
f0, s0, w0 = irqtimer.fired(), duty.steps, loop.words[2]
t0 = ticks()
spin({spins})
with_us = (ticks() - t0) & 0x3FFFFFFF
f1, s1, w1 = irqtimer.fired(), duty.steps, loop.words[2]
tracker.stop()
tk, ta = board.clock.ticks_source()
loop.stop(tk, ta, 200_000)
print("@@cost", alone_us, with_us, f1 - f0, s1 - s0, w1 - w0, irqtimer.counters()[4])
"""


@pytest.mark.parametrize("target", ["qemu", "netduino2"])
def test_bench_timer_loop_cpu_per_period_on_qemu(target):
    from emulator.targets import Netduino2Target, QemuTarget
    from host.deploy.raw_repl import RawRepl

    target_class = QemuTarget if target == "qemu" else Netduino2Target
    params = PlantParams(seed=5, initial_error_urad=(500.0, -300.0))
    rows = prediction_table(params, 30.0)
    print(f"\n[{target}: the loop on the timer interrupt, instructions it takes a period]")
    for wait_us in (0, 100):
        head = TrackingHead(seed=5)
        head.attach(OpticalPlant(params, 30.0))
        program = TIMER_LOOP_COST.format(rows=rows, wait_us=wait_us, spins=2_000_000)
        with HeadServer(head) as server:
            with target_class(
                boot="maintenance",
                bus_address=server.address,
                track_address=server.track_address,
                icount_shift=QEMU_ICOUNT_SHIFT,
            ) as t:
                with RawRepl(t.ground_port, timeout_s=30.0) as repl:
                    output = repl.exec(program, timeout_s=600)
        line = next(x for x in output.splitlines() if x.startswith("@@cost"))
        alone, with_loop, fired, steps, waits, busy = (int(v) for v in line.split()[1:])
        per_period = (with_loop - alone) * 1000 // max(fired, 1)
        per_kernel = (with_loop - alone) * 1000 // max(steps, 1)
        print(
            f"  poll {wait_us:3d} us: {fired} periods in {with_loop} us ({alone} us alone), "
            f"{steps} ran the kernel, {waits} waited: {per_period:,} instructions a period, "
            f"{per_kernel:,} a kernel period (all included); the longest period {busy} us; "
            f"{(with_loop - alone) * 100 // with_loop} % of the virtual time"
        )
