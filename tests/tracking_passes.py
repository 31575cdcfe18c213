"""Shared setup of the tracking-loop sessions on the MCU images (tests/test_tracking_*.py,
benchmarks/bench_paced_loop_stalls.py): the emulated head with the tracking plant, the
mission's default pass (the head generates the pattern), and a program run on a board in
maintenance boot with the head on both its links."""

from __future__ import annotations

import contextlib
import time

from emulator import pattern_generator
from emulator.optical_head import HeadServer, OpticalHead
from emulator.optical_plant import OpticalPlant, PlantParams, prediction_table
from emulator.payload_run import payload_session
from emulator.tracking_lockstep import TrackingHead
from host.deploy.raw_repl import RawRepl
from host.protocol import tracking as trk

# the sessions' plant: its seed and the pointing error the loop starts from
PLANT_PARAMS = PlantParams(seed=5, initial_error_urad=(500.0, -300.0))


def attach_pattern_generator(head) -> None:
    """The head generates the pattern (the mission's default): TrackingHead.attach takes
    the plant, so the generator's block is attached by hand."""
    generator = pattern_generator.PatternGenerator(head)
    OpticalHead.attach(head, pattern_generator.BASE, generator)
    head.pattern_memory = generator.memory


def run_board_program(target_class, program: str, marker: str, **fields) -> str:
    """`program` (formatted with the plant's prediction rows and `fields`) run from the
    raw REPL of a board in maintenance boot, the head on its payload bus and tracking link,
    1 ns an instruction; the output's line that starts with `marker`."""
    head = TrackingHead(seed=5)
    head.attach(OpticalPlant(PLANT_PARAMS, 30.0))
    source = program.format(rows=prediction_table(PLANT_PARAMS, 30.0), **fields)
    with HeadServer(head) as server:
        with target_class(
            boot="maintenance",
            bus_address=server.address,
            track_address=server.track_address,
            icount_shift=0,
        ) as target:
            with RawRepl(target.ground_port, timeout_s=30.0) as repl:
                output = repl.exec(source, timeout_s=300)
    return next(x for x in output.splitlines() if x.startswith(marker))


# track_address for configured_pass: the head's own tracking link
HEAD_TRACKING_LINK = object()


@contextlib.contextmanager
def configured_pass(
    target: str,
    before_app: str | list[str],
    track_address=HEAD_TRACKING_LINK,
    prediction_s: float = 60.0,
):
    """The application on `target` (1 ns an instruction) with the mission's default pass
    configured: the head generates the pattern at its slot clock, which follows the wall
    clock (benchmarks/bench_paced_loop_stalls.py), the prediction (prediction_s of it)
    uploaded in chunks, then the pass's configuration. track_address: the head's tracking
    link, None (not wired) or another peer's address. Yields (payload, prediction nodes)."""
    head = TrackingHead(seed=5, fifo_depth=2048, pps_period_ps=10**12, time_scale=1.0)
    head.attach(OpticalPlant(PLANT_PARAMS, 120.0))
    attach_pattern_generator(head)
    chunks, reference = trk.prediction_upload(prediction_table(PLANT_PARAMS, prediction_s))
    config = {
        "intensity_probabilities": [0.5, 0.25, 0.25],
        "basis_probability_z": 0.7,
        "slot_rate_hz": 100_000_000,
        "frame_slots": 4096,
        "pps_period_ps": 10**12,
        "tdc": {"bursts_per_step": 1},
        "pattern_generation": "head",
        "tracking": {"parameters": {}, "predictions": reference},
    }
    with HeadServer(head) as server:
        if track_address is HEAD_TRACKING_LINK:
            track_address = server.track_address
        with payload_session(
            target,
            server.address,
            icount_shift=0,
            track_address=track_address,
            before_app=before_app,
        ) as (_target, payload):
            for chunk in chunks:
                payload.configure(chunk)
            payload.configure(config)
            yield payload, len(chunks)


def pass_status(payload, run_s: float) -> tuple[dict, dict]:
    """Start the configured pass, run_s of host time, then the housekeeping mission status
    during the pass and after its stop."""
    payload.start()
    time.sleep(run_s)
    during = payload.housekeeping()["mission"]
    payload.stop()
    return during, payload.housekeeping()["mission"]
