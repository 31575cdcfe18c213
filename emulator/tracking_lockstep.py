"""Close the REAL firmware tracking loop (firmware/payload/tracking.py running under
MicroPython, unix port or QEMU) against the CPython optical plant, in lockstep over the
payload bus (docs/tracking.md).

The plant serves the bus (emulator/endpoint.py FrameEndpoint); the firmware runs a small
program: build the Tracker with the scenario's configuration and the uplinked prediction,
then `PlantLink.run()`. Each loop period costs one bus round trip, so emulated time is
exact whatever the host load.
"""

from __future__ import annotations

import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from emulator.endpoint import FrameEndpoint
from emulator.optical_head import HeadServer, OpticalHead
from emulator.optical_plant import NRAD, URAD, OpticalPlant, PlantParams, prediction_table
from emulator.targets import (
    QemuTarget,
    unix_firmware_command,
    unix_firmware_env,
)
from host.deploy.raw_repl import RawRepl
from host.protocol import payload_bus as pb
from host.protocol import tracking as trk

# Tracking register blocks (firmware/payload/tracking_duty.py, docs/tracking.md).
REG_TRK_SENSORS = pb.REG_TRACKING_BASE
REG_TRK_COMMANDS = pb.REG_TRACKING_BASE + 0x10
SENSOR_WORDS = 12
COMMAND_WORDS = 7


class LockstepError(RuntimeError):
    pass


@dataclass
class LockstepResult:
    target: str
    plant: OpticalPlant
    steps: int
    period_us: int
    transitions: list[trk.Transition]
    samples: np.ndarray  # firmware telemetry (SAMPLE_DTYPE)
    telemetry_payloads: list[bytes]
    step_time_total: int = 0  # clock ticks (us) spent in Tracker.step()
    step_time_worst: int = 0
    telemetry_lost: int = 0
    output: str = ""
    extra: dict = field(default_factory=dict)

    # ------------------------------------------------------------ derived figures
    def state_sequence(self) -> list[tuple[int, str, str]]:
        return [(t.step, trk.STATE_NAMES[t.old], trk.STATE_NAMES[t.new]) for t in self.transitions]

    def first_entry_s(self, state: str, after_s: float = 0.0) -> float | None:
        """Time (s) of the first transition into `state` at or after `after_s`."""
        for t in self.transitions:
            when = t.step * self.period_us * 1e-6  # as Transition.describe
            if trk.STATE_NAMES[t.new] == state and when >= after_s:
                return when
        return None

    def states_per_step(self) -> np.ndarray:
        return self.plant.states[: self.steps]

    def error_urad(self, downlink: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """True pointing error per step (urad): downlink (includes point-ahead error) or
        beacon tracking error."""
        n = self.steps
        if downlink:
            return self.plant.downlink_x[:n] / URAD, self.plant.downlink_y[:n] / URAD
        return self.plant.err_x[:n] / URAD, self.plant.err_y[:n] / URAD

    def fine_rms_urad(self, settle_s: float = 0.5, window=None) -> tuple[float, float, int]:
        """RMS per axis of the true downlink error over steps in FINE with the beacon on,
        skipping the first `settle_s` after each entry into FINE; optional (start_s, end_s)
        window. RMS about zero: a mean offset (quadrant mismatch, point-ahead) counts.
        Returns (rms_x, rms_y, samples)."""
        states = self.states_per_step()
        fine = states == 4
        settle = int(settle_s * 1e6 / self.period_us)
        mask = fine.copy()
        entries = np.flatnonzero(np.diff(fine.astype(np.int8)) == 1) + 1
        if fine[0]:
            entries = np.r_[0, entries]
        for e in entries:
            mask[e : e + settle] = False
        # Samples with the beacon already gone (the few before the loss is declared) are
        # not tracking: the outage figures cover them.
        mask &= self.plant.beacon_on[: self.steps]
        if window:
            t = np.arange(self.steps) * self.period_us * 1e-6
            mask &= (t >= window[0]) & (t < window[1])
        ex, ey = self.error_urad()
        if mask.sum() == 0:
            return float("nan"), float("nan"), 0
        rms_x = float(np.sqrt(np.mean(ex[mask] ** 2)))
        rms_y = float(np.sqrt(np.mean(ey[mask] ** 2)))
        return rms_x, rms_y, int(mask.sum())

    def write_pointing_log(self, path: Path) -> None:
        """The true downlink pointing error at the loop rate, as TRACKING sample records
        (docs/tracking.md "Pointing-error export"): the pass simulator's pointing-loss
        input. Same format as the firmware's telemetry, decimation 1."""
        n = self.steps
        p = self.plant
        samples = np.zeros(n, trk.SAMPLE_DTYPE)
        samples["step"] = np.arange(n)
        samples["state"] = p.states[:n]
        samples["err_x_nrad"] = np.round(p.downlink_x[:n] / NRAD).astype(np.int64)
        samples["err_y_nrad"] = np.round(p.downlink_y[:n] / NRAD).astype(np.int64)
        samples["fsm_x_nrad"] = np.round(p.fsm_cmd_log[:n, 0]).astype(np.int64)
        samples["fsm_y_nrad"] = np.round(p.fsm_cmd_log[:n, 1]).astype(np.int64)
        per = 2000
        payloads = [
            trk.encode_samples(samples[i : i + per], self.period_us, 1) for i in range(0, n, per)
        ]
        payloads.append(trk.encode_transitions(self.transitions, self.period_us))
        trk.write_tracking_log(path, payloads)

    def write_telemetry_log(self, path: Path) -> None:
        """The firmware's own telemetry product (satellite/tracking.qrec)."""
        payloads = list(self.telemetry_payloads)
        payloads.append(trk.encode_transitions(self.transitions, self.period_us))
        trk.write_tracking_log(path, payloads)


def firmware_program(
    config: dict, rows: list[list[int]], steps: int, start_at: int, stop_at: int, target: str
) -> str:
    idle = "board.idle" if target == "unix" else "None"
    return (
        "import board\n"
        "from payload import tracking, tracking_link\n"
        f"tracker = tracking.Tracker({config!r})\n"
        f"tracker.load_predictions({rows!r})\n"
        f"link = tracking_link.PlantLink(board.payload_bus, tracker, {idle})\n"
        f"total, worst = link.run({steps}, {start_at}, {stop_at}, board.clock.ticks_us)\n"
        "print('@@lockstep done', total, worst)\n"
    )


class TrackingHead(OpticalHead):
    """The optical head with the tracking plant behind its 0x0500 register block: a READ
    of the sensor block samples the plant (once per period), the WRITE of the command
    block ending with STATE applies the commands and advances the plant one period. The
    duty's READ_WRITE does both in that order: last period's commands, then the new
    sample (the plant's sequence is the same as with a separate READ and WRITE)."""

    def attach(self, plant: OpticalPlant) -> None:
        self.plant = plant
        self._sample: tuple | None = None
        self._commands = [0] * COMMAND_WORDS

    def track_checkpoint(self):
        return self._sample, list(self._commands), self.plant.checkpoint()

    def track_restore(self, saved) -> None:
        self._sample, self._commands, plant_state = saved
        self.plant.restore(plant_state)

    def read_reg(self, addr: int) -> int:
        if REG_TRK_SENSORS <= addr < REG_TRK_SENSORS + SENSOR_WORDS:
            if self.plant.k >= self.plant.steps:
                raise KeyError(addr)  # the scenario is over: answered as a bad address
            if self._sample is None:
                self._sample = self.plant.measure()
            return self._sample[addr - REG_TRK_SENSORS] & 0xFFFFFFFF
        return super().read_reg(addr)

    def write_reg(self, addr: int, value: int) -> int:
        if REG_TRK_COMMANDS <= addr < REG_TRK_COMMANDS + COMMAND_WORDS:
            if self._sample is None:
                return pb.E_REFUSED  # commands before the period's sensors were read
            index = addr - REG_TRK_COMMANDS
            self._commands[index] = value - (1 << 32) if value >= 1 << 31 else value
            if index == COMMAND_WORDS - 1:
                fx, fy, rx, ry, pax, pay, state = self._commands
                self.plant.apply((fx, fy), (rx, ry), (pax, pay), state)
                self._sample = None
            return pb.OK
        return super().write_reg(addr, value)


def bus_program(config: dict, rows: list[list[int]], steps: int, start_at: int) -> str:
    """The firmware as it runs in the application: bus client, scheduler, tracking duty."""
    return (
        "import board\n"
        "from payload import bus, scheduler, storage, tracking, tracking_duty\n"
        f"tracker = tracking.Tracker({config!r})\n"
        f"tracker.load_predictions({rows!r})\n"
        # Lockstep: the head answers when the host gets to it, so the reply timeout would
        # measure host load, not the firmware; 10 s instead of the flight 0.5 s.
        "link = bus.Bus(board.payload_bus, board.clock, timeout_us=board.BUS_TIMEOUT_US)\n"
        "duty = tracking_duty.TrackingDuty(link, tracker)\n"
        "store = storage.Storage(board.mount_storage())\n"
        "product = tracking_duty.TrackingProduct(tracker, store)\n"
        "sched = scheduler.Scheduler(board.clock)\n"
        "sched.add('tracking', duty.step)\n"
        "sched.add('tracking-telemetry', product.step)\n"
        f"for k in range({steps}):\n"
        f"    if k == {start_at}:\n"
        "        tracker.start()\n"
        "    sched.run_once()\n"
        "duty.flush()\n"  # the last period's commands: no next period carries them
        "product.flush()\n"
        "for t in tracker.transitions():\n"
        "    print('@@tr', *t)\n"
        "print('@@product', product.records, product.transitions_lost, tracker.telemetry_lost())\n"
        "store.close()\n"
        "for name, size, crc in store.products():\n"
        "    print('@@stored', name, size, crc)\n"
        "print('@@bus', duty.steps, duty.bus_errors, sched.telemetry()['tracking']['worst_us'])\n"
    )


def run_over_bus(
    params: PlantParams,
    duration_s: float,
    target: str = "unix",
    config: dict | None = None,
    start_at_s: float = 0.0,
    icount_shift: int | None = None,
    head: TrackingHead | None = None,
) -> LockstepResult:
    """Run the scenario through the payload bus: the firmware's bus client and scheduler
    drive the tracking duty; the plant sits behind the optical head's register block
    (`head`, a TrackingHead not yet attached, when a test needs its own: a faulty one)."""
    config = dict(config or {})
    config.setdefault("loop_rate_hz", params.loop_rate_hz)
    plant = OpticalPlant(params, duration_s)
    rows = prediction_table(params, duration_s)
    head = head if head is not None else TrackingHead(seed=params.seed)
    head.attach(plant)
    start_at = int(round(start_at_s * params.loop_rate_hz))
    program = bus_program(config, rows, plant.steps, start_at)
    collector = _Collector(plant)
    files: dict[str, bytes] = {}
    with HeadServer(head) as server:
        if target == "unix":
            output = _run_unix(program, server.address, collector, 600.0, files)
        else:
            output = _run_qemu(program, server.address, collector, 600.0, icount_shift)
    transitions, stats, stored, product = [], None, {}, None
    for line in output.splitlines():
        if line.startswith("@@tr"):
            transitions.append(trk.Transition(*(int(v) for v in line.split()[1:5])))
        elif line.startswith("@@bus"):
            stats = [int(v) for v in line.split()[1:]]
        elif line.startswith("@@stored"):
            _, name, size, crc = line.split()
            stored[name] = (int(size), int(crc))
        elif line.startswith("@@product"):
            product = [int(v) for v in line.split()[1:]]
    if stats is None:
        raise LockstepError(f"bus run did not finish:\n{output[-3000:]}")
    return LockstepResult(
        target=target,
        plant=plant,
        steps=plant.k,
        period_us=1_000_000 // params.loop_rate_hz,
        transitions=transitions,
        samples=np.zeros(0, trk.SAMPLE_DTYPE),
        telemetry_payloads=[],
        step_time_worst=stats[2],
        output=output,
        extra={
            "duty_steps": stats[0],
            "bus_errors": stats[1],
            "head": head,
            "stored": stored,  # product name -> (bytes, crc32) as the firmware lists it
            "files": files,  # unix only: product name -> bytes
            "product": product,  # records written, transitions lost, telemetry lost
        },
    )


class _Collector:
    def __init__(self, plant: OpticalPlant):
        self.plant = plant
        self.payloads: list[bytes] = []
        self.transition_payloads: list[bytes] = []
        self.end: str | None = None
        self.error: str | None = None
        self.done = threading.Event()

    def handle(self, body: bytes) -> bytes | None:
        try:
            tag = body[:1]
            if tag in (b"S", b"C"):
                return self.plant.on_bus_body(body)
            if tag == b"T":
                self.payloads.append(bytes(body[1:]))
            elif tag == b"R":
                self.transition_payloads.append(bytes(body[1:]))
            elif tag == b"E":
                self.end = body[1:].decode()
                self.done.set()
            else:
                raise ValueError(f"unknown bus body tag {tag!r}")
        except Exception as error:  # the firmware side would hang: record and stop
            self.error = f"{type(error).__name__}: {error}"
            self.done.set()
        return None


def run_lockstep(
    params: PlantParams,
    duration_s: float,
    target: str = "unix",
    config: dict | None = None,
    start_at_s: float = 0.0,
    stop_at_s: float | None = None,
    icount_shift: int | None = None,
    timeout_s: float = 600.0,
    progress=None,
    progress_interval_s: float = 5.0,
) -> LockstepResult:
    """`progress`, when given, is called with a line now and then while the firmware runs
    (loop time done against the plant's clock): the command line's progress lines."""
    config = dict(config or {})
    config.setdefault("loop_rate_hz", params.loop_rate_hz)
    if config["loop_rate_hz"] != params.loop_rate_hz:
        raise ValueError("the firmware's loop rate and the plant's must agree")
    plant = OpticalPlant(params, duration_s)
    with _LoopProgress(plant, params.loop_rate_hz, progress, progress_interval_s):
        return _run_lockstep(
            params, plant, duration_s, target, config, start_at_s, stop_at_s, icount_shift,
            timeout_s,
        )  # fmt: skip


class _LoopProgress:
    """A heartbeat thread that reports the plant's step count every `interval_s` (the
    main thread is blocked in the firmware's process, so it cannot report itself)."""

    def __init__(self, plant: OpticalPlant, loop_rate_hz: int, progress, interval_s: float):
        self.plant, self.rate, self.progress, self.interval_s = (
            plant, loop_rate_hz, progress, interval_s,
        )  # fmt: skip
        self._stop = threading.Event()
        self._thread = None

    def _beat(self) -> None:
        total_s = self.plant.steps / self.rate
        while not self._stop.wait(self.interval_s):
            done_s = min(self.plant.k, self.plant.steps) / self.rate
            self.progress(f"loop time {done_s:.1f} of {total_s:g} s")

    def __enter__(self):
        if self.progress is not None:
            self._thread = threading.Thread(target=self._beat, name="progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1.0)


def _run_lockstep(
    params, plant, duration_s, target, config, start_at_s, stop_at_s, icount_shift, timeout_s
) -> LockstepResult:
    rows = prediction_table(params, duration_s)
    steps = plant.steps
    period_us = 1_000_000 // params.loop_rate_hz
    start_at = int(round(start_at_s * params.loop_rate_hz))
    stop_at = -1 if stop_at_s is None else int(round(stop_at_s * params.loop_rate_hz))
    program = firmware_program(config, rows, steps, start_at, stop_at, target)
    collector = _Collector(plant)
    output = ""
    with FrameEndpoint(collector.handle, max_body_bytes=1024) as endpoint:
        if target == "unix":
            output = _run_unix(program, endpoint.address, collector, timeout_s)
        elif target == "qemu":
            output = _run_qemu(program, endpoint.address, collector, timeout_s, icount_shift)
        else:
            raise ValueError(f"unknown target {target!r}")
        collector.done.wait(5.0)
    if collector.error:
        raise LockstepError(f"{target}: plant side: {collector.error}\n{output[-2000:]}")
    if collector.end is None:
        raise LockstepError(f"{target}: the firmware did not finish the run:\n{output[-3000:]}")
    n_steps, total, worst, lost = (int(v) for v in collector.end.split())
    transitions: list[trk.Transition] = []
    for payload in collector.transition_payloads:
        transitions.extend(trk.decode_payload(payload)[3])
    chunks = [trk.decode_payload(p)[3] for p in collector.payloads]
    samples = np.concatenate(chunks) if chunks else np.zeros(0, trk.SAMPLE_DTYPE)
    return LockstepResult(
        target=target,
        plant=plant,
        steps=n_steps,
        period_us=period_us,
        transitions=transitions,
        samples=samples,
        telemetry_payloads=collector.payloads,
        step_time_total=total,
        step_time_worst=worst,
        telemetry_lost=lost,
        output=output,
    )


def _run_unix(
    program: str, address, collector: _Collector, timeout_s: float, files: dict | None = None
) -> str:
    """Run the program on the unix port; `files`, if given, receives every stored product
    file's bytes by name (the unix target's flash is a directory)."""
    with tempfile.TemporaryDirectory(prefix="lockstep-") as workdir:
        script = Path(workdir) / "lockstep.py"
        script.write_text(program)
        proc = subprocess.run(
            unix_firmware_command(script),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            cwd=workdir,
            env=unix_firmware_env(Path(workdir) / "flash", address),
            stdin=subprocess.DEVNULL,
        )
        if files is not None:
            for path in (Path(workdir) / "flash" / "products").glob("*.qrec"):
                files[path.name] = path.read_bytes()
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise LockstepError(f"unix: MicroPython exited {proc.returncode}:\n{output[-3000:]}")
    return output


def _run_qemu(program, address, collector, timeout_s, icount_shift) -> str:
    with QemuTarget(bus_address=address, boot="maintenance", icount_shift=icount_shift) as q:
        with RawRepl(q.ground_port, timeout_s=30.0) as repl:
            return repl.exec(program, timeout_s=timeout_s)
