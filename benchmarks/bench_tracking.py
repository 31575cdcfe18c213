"""Tracking loop benchmark (make bench): loop-step cost on both targets, the loop rate it
allows, and the closed-loop figures over several seeds (docs/tracking.md "Figures").

    .venv/bin/python -m pytest -q benchmarks/bench_tracking.py -s

Step cost is printed as a ratio against a baseline measured in the same run and process:
a method that calls an empty viper function with the same three array arguments, the
call overhead a timer interrupt would pay anyway.
"""

from __future__ import annotations

import math
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from bench_tracking_model import _firmware_tracking
from scipy.signal import welch

from emulator.optical_plant import PlantParams
from emulator.targets import (
    CONTROLLER_HEAP_BYTES,
    FIRMWARE_DIR,
    MICROPYTHON_BIN,
    REPO_ROOT,
    QemuTarget,
)
from emulator.tracking_lockstep import run_lockstep
from host.deploy.raw_repl import RawRepl

OUT_DIR = REPO_ROOT / "build" / "bench"
STEPS = 4000
QEMU_ICOUNT_SHIFT = 0  # 1 ns of virtual time per instruction: ticks_us * 1000 = instructions
MCU_HZ = 25_000_000

# Runs on the target: time STEPS loop steps in FINE with a lit, slightly offset beacon,
# and as many calls of an empty viper function with the same arguments (baseline).
STEP_COST_PROGRAM = f"""
import micropython, array
import board
from payload import tracking
t = tracking.Tracker()
t.load_predictions([[i * 15000000, 0, 15000, 0, 0, 0, -50000, 0] for i in range(8)])
io = t.io
def feed(q, cam):
    io[0] = q[0]; io[1] = q[1]; io[2] = q[2]; io[3] = q[3]
    io[4] = 1; io[5] = 0; io[6] = 0; io[7] = cam
t.start()
for _ in range(3):
    feed((25, 25, 25, 25), 0); t.step()
for _ in range(20):
    feed((2400, 2600, 2450, 2550), 5000); t.step()
assert t.state == tracking.FINE, t.state
@micropython.viper
def empty(a: ptr32, b: ptr32, c: ptr16) -> int:
    return 0
clock = board.clock.ticks_us
class Baseline:  # the same call shape as Tracker.step(): method, attributes, 3 arrays
    def __init__(self, t):
        self.words = t.words
        self.table = t.table
        self._sin = t._sin
    def step(self):
        return empty(self.words, self.table, self._sin)
base = Baseline(t)
feed((2400, 2600, 2450, 2550), 5000)
t0 = clock()
for _ in range({STEPS}):
    t.step()
t1 = clock()
for _ in range({STEPS}):
    base.step()
t2 = clock()
print("@@cost", t.state, (t1 - t0) & 0x3FFFFFFF, (t2 - t1) & 0x3FFFFFFF)
"""


def _parse_cost(output: str) -> tuple[int, int, int]:
    for line in output.splitlines():
        if line.startswith("@@cost"):
            state, step_us, base_us = (int(v) for v in line.split()[1:])
            return state, step_us, base_us
    raise AssertionError(f"no cost line in output:\n{output[-2000:]}")


def _cost_on_unix() -> tuple[int, int, int]:
    with tempfile.TemporaryDirectory() as workdir:
        script = Path(workdir) / "cost.py"
        script.write_text(STEP_COST_PROGRAM)
        env = dict(os.environ)
        env["MICROPYPATH"] = os.pathsep.join(
            [str(FIRMWARE_DIR), str(FIRMWARE_DIR / "boards" / "unix"), ".frozen"]
        )
        proc = subprocess.run(
            [str(MICROPYTHON_BIN), "-X", f"heapsize={CONTROLLER_HEAP_BYTES}", str(script)],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
        )
    assert proc.returncode == 0, proc.stderr
    return _parse_cost(proc.stdout)


def _cost_on_qemu() -> tuple[int, int, int]:
    with QemuTarget(boot="maintenance", icount_shift=QEMU_ICOUNT_SHIFT) as target:
        with RawRepl(target.ground_port, timeout_s=30.0) as repl:
            return _parse_cost(repl.exec(STEP_COST_PROGRAM, timeout_s=300))


def test_loop_step_cost_and_achievable_rate():
    state, step_us, base_us = _cost_on_unix()
    per_step_us = step_us / STEPS
    print(f"\n[tracking] loop step on unix (x86-64, viper): {per_step_us:.2f} us/step in FINE; ")
    print(
        f"[tracking]   baseline empty viper call {base_us / STEPS:.2f} us; ratio "
        f"{step_us / max(base_us, 1):.1f}x; achievable rate {1e6 / per_step_us:,.0f} Hz"
    )
    state_q, step_vus, base_vus = _cost_on_qemu()
    ns_per_instr = 2**QEMU_ICOUNT_SHIFT
    instr = step_vus * 1000 / ns_per_instr / STEPS
    base_instr = base_vus * 1000 / ns_per_instr / STEPS
    # Instruction count, not cycles: a Cortex-M3 runs about one instruction per cycle
    # (loads/branches take 2), so the rate at 25 MHz is an upper bound within ~1.5x.
    rate_hz = MCU_HZ / instr
    print(
        f"[tracking] loop step on QEMU Cortex-M3 (-icount shift={QEMU_ICOUNT_SHIFT}): "
        f"{instr:,.0f} instructions/step (baseline call {base_instr:,.0f}, ratio "
        f"{instr / max(base_instr, 1):.1f}x)"
    )
    print(
        f"[tracking]   at 25 MHz: {instr / 25:.0f} us/step, loop rate <= {rate_hz:,.0f} Hz "
        f"(2 kHz loop uses {100 * 2000 / rate_hz:.0f}% of the CPU)"
    )
    assert state == state_q == 4


def _band_rms(f, psd, lo, hi):
    sel = (f >= lo) & (f < hi)
    return math.sqrt(float(np.sum(psd[sel]) * (f[1] - f[0])))


def test_closed_loop_figures_over_seeds():
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2024)
    rows = []
    spectra = []
    for seed in range(1, 6):
        # Beacon anywhere in the 5 mrad cone (uniform over the disc), seeded.
        radius = 5000.0 * math.sqrt(rng.uniform(0.05, 1.0))
        angle = rng.uniform(0, 2 * math.pi)
        initial = (radius * math.cos(angle), radius * math.sin(angle))
        params = PlantParams(seed=seed, initial_error_urad=initial)
        result = run_lockstep(params, duration_s=10.0)
        acquired = result.first_entry_s("FINE")
        rms_x, rms_y, n = result.fine_rms_urad(settle_s=0.5)
        rows.append((seed, radius, acquired, rms_x, rms_y, n))
        if seed == 1:
            result.write_pointing_log(OUT_DIR / "pointing_seed1.qrec")
        fine = result.states_per_step() == 4
        ex, ey = result.error_urad()
        start = np.flatnonzero(fine)[0] + int(0.5 * params.loop_rate_hz) if fine.any() else 0
        if fine[start:].all() and len(ex) - start > 4096:
            f, px = welch(ex[start:], fs=params.loop_rate_hz, nperseg=4096)
            _, py = welch(ey[start:], fs=params.loop_rate_hz, nperseg=4096)
            vib_f, pv = welch(
                result.plant.vib_x[start : result.steps] * 1e6,
                fs=params.loop_rate_hz,
                nperseg=4096,
            )
            spectra.append((f, px, py, pv))
    print("\n[tracking] closed loop, real firmware on unix, 2 kHz, honest default plant")
    print("[tracking]  seed  offset(urad)  acquisition(s)  fine RMS x / y (urad)  samples")
    for seed, radius, acquired, rms_x, rms_y, n in rows:
        acq = f"{acquired:6.2f}" if acquired is not None else "  none"
        print(
            f"[tracking]  {seed:4d}  {radius:12.0f}  {acq:>14}  {rms_x:9.3f} / {rms_y:5.3f}  {n}"
        )
    acq_times = [r[2] for r in rows if r[2] is not None]
    rms_all = [max(r[3], r[4]) for r in rows]
    print(
        f"[tracking]  acquisition median {np.median(acq_times):.2f} s, worst "
        f"{np.max(acq_times):.2f} s (target <= 10 s); worst-axis RMS median "
        f"{np.median(rms_all):.3f}, worst {np.max(rms_all):.3f} urad (target <= 0.5, Micius 0.47)"
    )
    if spectra:
        f, px, py, pv = (np.mean([s[i] for s in spectra], axis=0) for i in range(4))
        print("[tracking]  residual spectrum (band RMS, urad): band      x      y   vibration")
        for lo, hi in ((0, 1), (1, 5), (5, 10), (10, 30), (30, 100), (100, 1000)):
            print(
                f"[tracking]  {lo:>5}-{hi:<5} Hz  {_band_rms(f, px, lo, hi):6.3f} "
                f"{_band_rms(f, py, lo, hi):6.3f}   {_band_rms(f, pv, lo, hi):7.3f}"
            )
        np.savetxt(
            OUT_DIR / "tracking_residual_psd.csv",
            np.c_[f, px, py, pv],
            delimiter=",",
            header="freq_hz,psd_x_urad2_per_hz,psd_y_urad2_per_hz,vibration_psd_urad2_per_hz",
        )
        _plot(f, px, py, pv, OUT_DIR / "tracking_residual_psd.png")
        print(f"[tracking]  spectrum: {OUT_DIR / 'tracking_residual_psd.png'} (and .csv)")
    assert len(acq_times) == len(rows)
    _elevation_and_idealised_figures()


def _elevation_and_idealised_figures():
    from emulator.optical_plant import PassGeometry

    print("[tracking] fine residual RMS per axis (urad, mean included), honest plant:")
    summary = []
    for label, geometry, target in (
        ("culmination", PassGeometry(time_from_culmination_s=-4.0), 0.5),
        ("20 deg elevation", PassGeometry().at_elevation(20.0), 1.0),
        ("15 deg elevation", PassGeometry().at_elevation(15.0), None),
    ):
        worst_axis = []
        for seed in (1, 2, 3):
            params = PlantParams(seed=seed, geometry=geometry, initial_error_urad=(600.0, -400.0))
            result = run_lockstep(params, duration_s=8.0)
            rms_x, rms_y, n = result.fine_rms_urad(settle_s=0.5)
            print(
                f"[tracking]  {label:>17}  seed {seed}  acquisition "
                f"{result.first_entry_s('FINE') or float('nan'):5.2f} s  "
                f"x {rms_x:6.3f}  y {rms_y:6.3f}  ({n} samples, {len(result.transitions)} "
                f"transitions)  targets: culmination <= 0.5, 20 deg <= 1.0"
            )
            worst_axis.append(max(rms_x, rms_y))
        summary.append((label, np.median(worst_axis), np.max(worst_axis), target))
    for label, median, worst, target in summary:
        verdict = (
            ""
            if target is None
            else f" (target <= {target}: {'met' if worst <= target else 'NOT met'})"
        )
        print(
            f"[tracking]  {label:>17}  worst-axis RMS median {median:.3f}, worst {worst:.3f} urad"
            f"{verdict}"
        )
    ideal = run_lockstep(PlantParams.idealised(seed=1), duration_s=8.0)
    rms_x, rms_y, _ = ideal.fine_rms_urad(settle_s=0.5)
    print(f"[tracking]  idealised plant (before issue 15), same loop: x {rms_x:.3f} y {rms_y:.3f}")
    # The 2 kHz gains at 500 Hz, wheel-line resonators off (they are tuned for 2 kHz): what
    # a loop configured for another rate without its own set gives (the 1 kHz set below).
    slow = run_lockstep(
        PlantParams(seed=1, initial_error_urad=(300.0, -200.0), loop_rate_hz=500),
        duration_s=6.0,
        config={"wheel_lines_hz": [0.0, 0.0]},
    )
    rms_x, rms_y, _ = slow.fine_rms_urad(settle_s=0.5)
    print(f"[tracking]  culmination at a 500 Hz loop, seed 1: x {rms_x:.3f} y {rms_y:.3f} urad")


# The QPD-only loop before the angular-rate sensor (docs/tracking.md "Tuning"), and a set
# tuned on the same model for a head with 2 samples of latency (robust at 2 and 3).
QPD_ONLY_CONFIG = dict(fine_kp=0.108, fine_ki=0.287, fine_kii=0.084, fine_kd=0.002,
                       wheel_line_gains=[0.031, 0.0128], wheel_line_phases_deg=[-70.0, 37.7],
                       ars_feedforward_taps=[0.0, 0.0, 0.0, 0.0])  # fmt: skip
LATENCY_2_CONFIG = dict(fine_kp=0.0133, fine_ki=0.1964, fine_kii=0.0063, fine_kd=0.0035,
                        wheel_line_gains=[0.0443, 0.0247], wheel_line_phases_deg=[-14.6, 78.1],
                        ars_feedforward_taps=[0.9992, 0.1547, 0.222, -0.4484])  # fmt: skip


# The set for a 1 kHz loop, the firmware's own (tracking.RATE_SETS[1000]): the set a pass
# gets on a board whose paced period does not fit 2 kHz (the 25 MHz MPS2 until its period
# fell from 16.0k to 10.5k instructions: mptest_paced_loop_cost.py). Tuned on the same model as the
# 2 kHz default (bench_tracking_model.py), robust to 0.5-1.5x QPD slope and one more
# sample of latency (every pole inside 0.9985); loss_samples 10 keeps the 10 ms fade hold.
ONE_KHZ_CONFIG = dict(_firmware_tracking().RATE_SETS[1000])


def test_closed_loop_at_the_application_rate():
    """The closed-loop figures of the 1 kHz set (tracking.RATE_SETS[1000]), which a board
    whose paced period does not fit 2 kHz gets (both MCU images now run 2 kHz, the
    figures above; the MPS2 ran 1 kHz until its period fell to 10.5k): culmination seeds
    1-5, 20 and 15 deg seeds 1-3, 8 s each, the honest default plant at 1 kHz (one sample
    of latency is then 1 ms, as the bus's TRACK exchange gives: the command computed in
    one period goes out with the next period's request)."""
    from emulator.optical_plant import PassGeometry

    print("\n[tracking] closed loop at 1 kHz (the 1 kHz set), unix:")
    summary = []
    for label, geometry, seeds, target in (
        ("culmination", PassGeometry(time_from_culmination_s=-4.0), (1, 2, 3, 4, 5), 0.5),
        ("20 deg elevation", PassGeometry().at_elevation(20.0), (1, 2, 3), 1.0),
        ("15 deg elevation", PassGeometry().at_elevation(15.0), (1, 2, 3), None),
    ):
        worst_axis = []
        for seed in seeds:
            params = PlantParams(seed=seed, geometry=geometry, loop_rate_hz=1000,
                                 initial_error_urad=(600.0, -400.0))  # fmt: skip
            result = run_lockstep(params, duration_s=8.0, config=dict(ONE_KHZ_CONFIG))
            rms_x, rms_y, n = result.fine_rms_urad(settle_s=0.5)
            print(
                f"[tracking]  {label:>17}  seed {seed}  acquisition "
                f"{result.first_entry_s('FINE') or float('nan'):5.2f} s  x {rms_x:6.3f}  "
                f"y {rms_y:6.3f}  ({n} samples, {len(result.transitions)} transitions)"
            )
            assert n > 6000  # in FINE for the run: a figure of the tracking loop
            worst_axis.append(max(rms_x, rms_y))
        summary.append((label, worst_axis, target))
    for label, worst_axis, target in summary:
        verdict = (
            ""
            if target is None
            else (f" (target <= {target}: {'met' if max(worst_axis) <= target else 'NOT met'})")
        )
        print(
            f"[tracking]  1 kHz {label:>17}  worst-axis RMS median "
            f"{np.median(worst_axis):.3f}, worst {max(worst_axis):.3f} urad{verdict}"
        )


def test_default_loop_off_its_nominal_plant():
    """Culmination, seeds 1-3, 6 s: the default loop and the QPD-only loop when the head
    differs from its datasheet (latency, QPD slope) or the sensor is worse than modelled."""
    cases = (
        ("latency 2 samples", dict(latency_samples=2), (None, QPD_ONLY_CONFIG, LATENCY_2_CONFIG)),
        ("QPD slope 1.5x (spot 16.7 urad)", dict(qpd_spot_radius_urad=16.7),
         (None, QPD_ONLY_CONFIG)),
        ("QPD slope 0.67x (spot 37.5 urad)", dict(qpd_spot_radius_urad=37.5),
         (None, QPD_ONLY_CONFIG)),
        ("sensor noise 3x (6 urad/s/rtHz)", dict(ars_noise_urad_s_rthz=6.0), (None,)),
        ("sensor high-pass at 5 Hz", dict(ars_highpass_hz=5.0), (None,)),
    )  # fmt: skip
    names = {None: "default", id(QPD_ONLY_CONFIG): "QPD-only",
             id(LATENCY_2_CONFIG): "tuned for 2 samples"}  # fmt: skip
    print("\n[tracking] culmination, seeds 1-3, fine RMS x / y (urad), off the nominal plant:")
    for label, change, configs in cases:
        for config in configs:
            figures = []
            for seed in (1, 2, 3):
                params = PlantParams(seed=seed, initial_error_urad=(300.0, -200.0), **change)
                result = run_lockstep(params, duration_s=6.0, config=config)
                rms_x, rms_y, _ = result.fine_rms_urad(settle_s=0.5)
                figures.append(f"{rms_x:.3f} / {rms_y:.3f}")
            name = names[None if config is None else id(config)]
            print(f"[tracking]  {label:33s} {name:20s} " + ", ".join(figures))


def _plot(f, px, py, pv, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.loglog(f[1:], pv[1:], label="micro-vibration (open loop)", color="0.6")
    ax.loglog(f[1:], px[1:], label="fine residual x")
    ax.loglog(f[1:], py[1:], label="fine residual y")
    ax.set_xlabel("frequency (Hz)")
    ax.set_ylabel("PSD (urad$^2$/Hz)")
    ax.set_title("Downlink pointing error in FINE, 2 kHz loop, mean of seeds")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# A 2-hour run of the kernel (issue 15, finding 5): a 10-minute pass table, then 110 minutes
# past its end, scripted sensors (encoder on the prediction, a lit beacon with a 0.5 s
# outage every 10 minutes). A CRC-32 of every output word of every step, printed every
# 10 minutes, must be equal on unix and QEMU (past the 35.8 minutes where the old us clock
# wrapped, and on to 2 hours); pass time and prediction must be held.
TWO_HOUR_PROGRAM = """
import binascii
from payload import tracking
rows = {rows!r}
t = tracking.Tracker({{'loop_rate_hz': 500, 'wheel_lines_hz': (0.0, 0.0)}})
t.load_predictions(rows)
io = t.io
outputs = io[tracking.IO_FSM_X:]
LIT = (3000, 3300, 2900, 3200)
DARK = (25, 25, 25, 25)
t.start()
crc = 0
worst_rate = 0
for minute10 in range({blocks}):
    for k in range(300000):
        quads, cam = LIT, 5000
        if k < 20 or 150000 <= k < 150250:
            quads, cam = DARK, 0
        io[0] = quads[0]; io[1] = quads[1]; io[2] = quads[2]; io[3] = quads[3]
        io[4] = 1; io[5] = 0; io[6] = 0; io[7] = cam
        io[8] = io[tracking.IO_PRED_X]
        io[9] = io[tracking.IO_PRED_Y]
        t.step()
        crc = binascii.crc32(bytes(outputs), crc)
        r = io[tracking.IO_RATE_X]
        if r > worst_rate or -r > worst_rate:
            worst_rate = abs(r)
    print('@@2h', minute10, crc, t.state, t.pass_time_ms(), io[tracking.IO_PRED_X],
          io[tracking.IO_PRED_Y], worst_rate, t.transition_count())
"""


def _run_program(program: str, target: str, timeout_s: float) -> str:
    if target == "qemu":
        with QemuTarget(boot="maintenance") as target_qemu:
            with RawRepl(target_qemu.ground_port, timeout_s=30.0) as repl:
                return repl.exec(program, timeout_s=timeout_s)
    with tempfile.TemporaryDirectory() as workdir:
        script = Path(workdir) / "program.py"
        script.write_text(program)
        env = dict(os.environ)
        env["MICROPYPATH"] = os.pathsep.join(
            [str(FIRMWARE_DIR), str(FIRMWARE_DIR / "boards" / "unix"), ".frozen"]
        )
        proc = subprocess.run(
            [str(MICROPYTHON_BIN), "-X", f"heapsize={CONTROLLER_HEAP_BYTES}", str(script)],
            capture_output=True, text=True, timeout=timeout_s, env=env, cwd=workdir,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.timeout(3000)
def test_two_hour_run():
    from emulator.optical_plant import PassGeometry, prediction_table

    params = PlantParams(geometry=PassGeometry(time_from_culmination_s=-300.0))
    rows = prediction_table(params, 600.0)
    lines = {}
    for target, blocks in (("unix", 12), ("qemu", 12)):
        out = _run_program(TWO_HOUR_PROGRAM.format(rows=rows, blocks=blocks), target, 2400.0)
        lines[target] = [ln.split()[1:] for ln in out.splitlines() if ln.startswith("@@2h")]
    print("\n[tracking] 2-hour run at 500 Hz (3.6 M steps): 10-minute digests unix vs QEMU")
    for u, q in zip(lines["unix"], lines["qemu"] + [["-"] * 8] * 8, strict=False):
        same = "unix only" if q[0] == "-" else ("equal" if u == q else "DIFFER")
        print(f"[tracking]  {int(u[0]) * 10 + 10:4d} min  crc unix {u[1]:>10} qemu {q[1]:>10}"
              f"  {same}  pass time {u[3]} ms, pred x {u[4]}")  # fmt: skip
    assert lines["unix"] == lines["qemu"] and len(lines["unix"]) == 12
    last = lines["unix"][-1]
    assert int(last[3]) == (len(rows) - 2) * 1000 + 11000  # held past the extrapolation


# Pass mode (issue 15, finding 5): the application's tracking duty does one bus TRACK
# exchange per loop period (the last period's commands out, this period's sensors in, in
# a fixed layout). This measures the controller's CPU per period on QEMU with -icount
# (1 instruction = 1 ns of virtual time): the duty over a loopback link that answers each
# request with a precomputed reply frame, minus the loopback's own cost, and the kernel
# alone. The baseline, in the same run, is the period as it was before TRACK: a
# READ_WRITE of the generic register layout through the general transaction path, the
# copy into io and Tracker.step(). The wire time comes from the frame lengths the bus
# client really sends and receives.
PASS_MODE_PROGRAM = """
import gc
import struct
import board
from payload import bus, framing, scheduler, tracking, tracking_duty
N = {steps}
t = tracking.Tracker()
t.load_predictions([[0, 0, 0, 0, 0, 0, -50000, 0]] * 4)
writer = framing.FrameWriter(256)
sensors = (3000, 3300, 2900, 3200, 1, 0, 0, 5000, 0, 0, 0, 0)
values = struct.pack('<12I', *sensors)
def frames(head):
    out = []
    for tag in range(256):
        body = bytes([head[0], tag]) + head[1:]
        out.append(bytes(writer.encode(body, len(body))))
    return out
READ_WRITE = frames(bytes([0x86, 0, 0x00, 0x05, 12]) + values)
TRACK = frames(bytes([0x88, 0]) + struct.pack('<4HB7I', *sensors))
class Loopback:
    # answers the client's n-th transaction (tag n + 1) with the next reply of `cycle`
    def __init__(self):
        self.count = 0
        self.pending = None
        self.cycle = [TRACK]
        self.phase = 0
        self.sent = {{}}
    def write(self, data):
        replies = self.cycle[self.phase]
        self.phase = (self.phase + 1) % len(self.cycle)
        self.count += 1
        self.pending = replies[self.count & 0xFF]
        self.sent[id(replies)] = len(data)
        return len(data)
    def readinto(self, buf):
        p = self.pending
        if p is None:
            return 0
        buf[: len(p)] = p
        self.pending = None
        return len(p)
class ReadWriteDuty(tracking_duty.TrackingDuty):
    # the period before TRACK (main before this change): one READ_WRITE, copy, step
    def step(self):
        tracker = self.tracker
        if tracker.idle():
            self._last_us = -1
            return False
        bus = self.bus
        now = bus.clock.ticks_us()
        if self._last_us >= 0 and ((now - self._last_us) & 0x3FFFFFFF) > tracker.cfg[0]:
            self.overruns += 1
        self._last_us = now
        status = bus.read_write(tracking_duty.REG_TRK_COMMANDS, self._commands,
                                7 * self._unsent, tracking_duty.REG_TRK_SENSORS,
                                tracking_duty.SENSOR_WORDS)
        if status != 0:
            self.bus_errors += 1
            return False
        tracking_duty._copy_words(bus.words, tracker.io, tracking_duty.SENSOR_WORDS)
        tracker.step()
        self._unsent = 1
        self.steps += 1
        return True
link = Loopback()
client = bus.Bus(link, board.clock, timeout_us=1000000)
duty = tracking_duty.TrackingDuty(client, t)
before = ReadWriteDuty(client, t)
t.start()
for _ in range(40):
    duty.step()
assert t.state == tracking.FINE, t.state
assert t.io[0] == 3000 and t.io[7] == 5000, list(t.io)
assert client._chunk_fill == 0  # the replies took Bus.track's fast path, not the general one
clock = board.clock.ticks_us
# each loop starts on a collected heap: a collection inside one (its timing depends on the
# image's heap layout) moved a period's figure by several thousand instructions
gc.collect()
t0 = clock()
for _ in range(N):
    duty.step()
t1 = clock()
link.cycle = [READ_WRITE]
link.phase = 0
gc.collect()
t1b = clock()
for _ in range(N):
    before.step()
t2 = clock()
sent = [link.sent[id(f)] for f in (TRACK, READ_WRITE)]
scratch = bytearray(512)
frame = bytes(sent[0])
gc.collect()
t2b = clock()
for _ in range(N):  # the loopback alone, one transaction's calls
    link.write(frame); link.readinto(scratch)
t3 = clock()
gc.collect()
t3b = clock()
for _ in range(N):
    t.step()
t4 = clock()
# the application's way: the duty called by the scheduler (its only duty here), one pass
# a period (the scheduler times each duty: two clock reads)
sched = scheduler.Scheduler(board.clock)
sched.add('tracking', duty.step)
link.cycle = [TRACK]
link.phase = 0
link.count = client._tag  # the loopback-alone loop above answered no request
gc.collect()
t4b = clock()
for _ in range(N):
    sched.run_once()
t5 = clock()
# the application's pass mode now: the scheduler's paced loop (a 1 us period: every
# period due at once, so the run counts the periods' cost, not the waits between them)
paced = scheduler.Scheduler(board.clock)
paced.set_loop('trk', duty.paced_step()[0], 1, duty.paced_args)
link.count = client._tag
gc.collect()
t5b = clock()
for _ in range(N):
    paced.run_once()
t6 = clock()
assert t.state == tracking.FINE
d = lambda a, b: (b - a) & 0x3FFFFFFF
print('@@pass', t.state, d(t0, t1), d(t1b, t2), d(t2b, t3), d(t3b, t4), d(t4b, t5), d(t5b, t6),
      sent[0], len(TRACK[1]), sent[1], len(READ_WRITE[1]),
      duty.bus_errors + before.bus_errors + client.bad_replies + client.timeouts)
"""


def test_pass_mode_loop_rate():
    steps = 400
    out = _run_program(PASS_MODE_PROGRAM.format(steps=steps), "unix", 300.0)
    line = [ln for ln in out.splitlines() if ln.startswith("@@pass")][0].split()[1:]
    assert int(line[0]) == 4 and int(line[-1]) == 0
    with QemuTarget(boot="maintenance", icount_shift=QEMU_ICOUNT_SHIFT) as target:
        with RawRepl(target.ground_port, timeout_s=30.0) as repl:
            out = repl.exec(PASS_MODE_PROGRAM.format(steps=steps), timeout_s=600)
    fields = [ln for ln in out.splitlines() if ln.startswith("@@pass")][0].split()[1:]
    state, track_us, before_us, loop_us, kernel_us, sched_us, paced_us = (
        int(v) for v in fields[:7]
    )
    tq, tr, xq, xr, errors = (int(v) for v in fields[7:])
    assert state == 4 and errors == 0
    ns = 2**QEMU_ICOUNT_SHIFT
    loop_instr = loop_us * 1000 / ns / steps  # the loopback's cost of one transaction
    track_instr = track_us * 1000 / ns / steps - loop_instr
    before_instr = before_us * 1000 / ns / steps - loop_instr
    kernel_instr = kernel_us * 1000 / ns / steps
    sched_instr = sched_us * 1000 / ns / steps - loop_instr
    paced_instr = paced_us * 1000 / ns / steps - loop_instr
    print(f"\n[tracking] pass mode on QEMU Cortex-M3 (-icount shift={QEMU_ICOUNT_SHIFT}), FINE:")
    print(f"[tracking]  kernel alone {kernel_instr:,.0f} instructions a step")
    rows = (
        ("READ_WRITE (before)", before_instr, xq + xr, f"READ_WRITE {xq}+{xr}"),
        ("TRACK", track_instr, tq + tr, f"TRACK {tq}+{tr}"),
    )
    for name, instr, wire_bytes, detail in rows:
        print(
            f"[tracking]  {name}: {instr:,.0f} instructions a period; at 25 MHz "
            f"{instr / 25:,.0f} us -> CPU-bound <= {MCU_HZ / instr:,.0f} Hz"
        )
        # UART bits per byte 10 (start, stop); SPI 8. The CPU waits for the wire (the
        # period is request, reply, step in turn), so the two add up.
        for bus_name, bit_rate, bits in (("UART 115.2 kbaud", 115_200, 10),
                                         ("UART 1 Mbaud", 1_000_000, 10),
                                         ("UART 4 Mbaud", 4_000_000, 10),
                                         ("SPI 8 Mbit/s", 8_000_000, 8)):  # fmt: skip
            wire_s = wire_bytes * bits / bit_rate
            rate = 1.0 / (wire_s + instr / MCU_HZ)
            print(
                f"[tracking]    {bus_name:>16}: {wire_bytes} bytes a period ({detail})"
                f" = {wire_s * 1e6:,.0f} us; with the CPU serialised: <= {rate:,.0f} Hz"
            )
    print(f"[tracking]  TRACK / READ_WRITE: CPU {track_instr / before_instr:.2f}")
    print(
        f"[tracking]  TRACK period through the scheduler (its only duty): {sched_instr:,.0f} "
        f"instructions -> CPU-bound <= {MCU_HZ / sched_instr:,.0f} Hz"
    )
    print(
        f"[tracking]  2 kHz at 25 MHz is {MCU_HZ / 2000:,.0f} instructions a period: the duty "
        f"uses {100 * track_instr * 2000 / MCU_HZ:.0f} % of the CPU (kernel "
        f"{100 * kernel_instr * 2000 / MCU_HZ:.0f} %), with the scheduler "
        f"{100 * sched_instr * 2000 / MCU_HZ:.0f} %"
    )
    print(
        f"[tracking]  the application's paced loop (Scheduler.set_loop, mission pass mode): "
        f"{paced_instr:,.0f} instructions a period -> CPU-bound <= {MCU_HZ / paced_instr:,.0f}"
        f" Hz; at 1 kHz {100 * paced_instr * 1000 / MCU_HZ:.0f} % of the CPU, at 2 kHz"
        f" (board.TRACKING_LOOP_RATE_HZ) {100 * paced_instr * 2000 / MCU_HZ:.0f} % (limit 85 %)"
    )
    # the fixed-layout exchange must cost less than the generic one, and carry fewer bytes
    assert track_instr < before_instr and tq + tr < xq + xr
