"""Firmware data-path benchmarks (`make bench`): the sequencer's QRNG -> symbol kernel with
viper, as plain bytecode, and a bytearray copy of the same QRNG bytes (the baseline: the
ratio to it is the figure of merit), and the TDC ring kernels, on the unix target (wall
time) and on QEMU (instruction counts: -icount shift=0 makes the emulated clock advance
1 ns per instruction). Then the whole loop on unix: slots/s and TDC events/s through the
payload bus, ring and storage with nothing lost.

Numbers are printed, not asserted (no timing assertions); run with -s to see them."""

import json
import os
import subprocess
import tempfile
from pathlib import Path

from emulator.optical_head import OpticalHead, TdcSources
from emulator.payload_run import run_pass
from emulator.targets import CONTROLLER_HEAP_BYTES, FIRMWARE_DIR, MICROPYTHON_BIN, QemuTarget
from host.deploy.raw_repl import RawRepl

KERNELS = """
import array
import board
from payload import sequencer, tdc

clock = board.clock


def timed(fn, reps):
    clock.update()
    t0 = clock.ticks_us()
    for _ in range(reps):
        fn()
    return ((clock.ticks_us() - t0) & 0x3FFFFFFF, reps)


SLOTS = 4096
qrng = bytearray((i * 2654435761 >> 7) & 0xFF for i in range(4 * SLOTS))
out = bytearray(SLOTS // 2)
copy_dst = bytearray(4 * SLOTS)
thr = sequencer.thresholds_for([0.5, 0.25, 0.25], 0.5)
state = array.array("I", bytes(32))
ring = bytearray(9 * 4096)
burst = bytearray((i * 7) & 0xFF for i in range(9 * 227))
for i in range(227):
    burst[9 * i] = 3
block = bytearray(9 * 227)
pps = bytearray(8 * 16)


def viper():
    sequencer.map_symbols(qrng, SLOTS, out, thr)


def bytecode():
    sequencer.map_symbols_bytecode(qrng, SLOTS, out, thr)


def copy():
    copy_dst[:] = qrng


def tdc_burst():
    tdc.ring_push(state, ring, 4096, burst, 227, pps)
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


def _parse(output: str) -> dict:
    line = next(line for line in output.splitlines() if line.startswith("BENCH "))
    return json.loads(line[6:].replace("(", "[").replace(")", "]").replace("'", '"'))


def _run_unix(reps) -> dict:
    with tempfile.TemporaryDirectory() as work:
        program = Path(work) / "bench.py"
        program.write_text(KERNELS.replace("REPS", repr(reps)))
        env = dict(os.environ)
        env["MICROPYPATH"] = f"{FIRMWARE_DIR}:{FIRMWARE_DIR / 'boards' / 'unix'}:.frozen"
        env["QKDSAT_STORAGE"] = str(Path(work) / "flash")
        proc = subprocess.run(
            [str(MICROPYTHON_BIN), "-X", f"heapsize={CONTROLLER_HEAP_BYTES}", str(program)],
            capture_output=True, text=True, env=env, cwd=work, timeout=300,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return _parse(proc.stdout)


def _run_qemu(reps) -> dict:
    with QemuTarget(boot="maintenance", icount_shift=0) as target:
        with RawRepl(target.ground_port, timeout_s=30.0) as repl:
            return _parse(repl.exec(KERNELS.replace("REPS", repr(reps)), timeout_s=600))


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
