"""One distillation over the emulated optical link: the payload processor (Alice, its own
process, host/payload_processor.py) and the ground station (Bob, `qkdsat distil --role
bob`, its own process), each connected to its terminal of the link
(emulator/optical_link.py). Used by the tests, `make bench` and the mission.

    link = link_for_pass(pass_dir, seed=1)
    run = distil_over_link(pass_dir, out_dir, link, distil_options=["--ec", "ldpc"])
    run.codes, run.alice, run.bob, run.link, run.alice_dir, run.bob_dir

Bob's folder is OUT_DIR/ground unless `ground_dir` names another (the mission: its OUT);
`logs=True` sends each process's stdout and stderr to processor.log / ground.log in
OUT_DIR instead of this process's (the mission keeps its own stdout for its summary).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from host.distil.durable import write_atomic
from host.distil.run import write_json_atomic

ROOT = Path(__file__).parents[1]


@dataclass
class LinkRun:
    codes: tuple  # exit codes (payload processor, ground)
    alice: dict  # Alice's report.json (on board)
    bob: dict  # Bob's report.json (ground)
    link: dict  # the link's report
    alice_dir: Path  # the on-board key store's folder of this pass
    bob_dir: Path
    started_unix_s: float = 0.0  # wall clock (time.time) when both processes were started
    wall_s: float = 0.0  # until both processes had exited


def provision_pools(out_dir: Path, station: str, pool: bytes) -> tuple[Path, Path]:
    """The same pre-shared authentication pool on board (KS/STATION/auth.pool) and at the
    ground station (out_dir/ground.pool): what a real mission provisions before launch."""
    keystore = out_dir / "onboard"
    (keystore / station).mkdir(parents=True, exist_ok=True, mode=0o700)
    onboard = keystore / station / "auth.pool"
    ground = out_dir / "ground.pool"
    for path in (onboard, ground):
        # a fresh 0600 file renamed into place: a symlink planted under the name is
        # replaced, never written through (host/distil/durable.py)
        write_atomic(path, pool, 0o600)
    return keystore, ground


def distil_over_link(
    pass_dir: Path,
    out_dir: Path,
    link,
    *,
    station: str,
    distil_options: list[str] = (),
    alice_options: list[str] = (),
    bob_options: list[str] = (),
    pool: bytes | None = None,
    timeout_s: float = 3600.0,
    ground_dir: Path | None = None,
    logs: bool = False,
    beside=None,
) -> LinkRun:
    """`beside(link)`: started once the link listens, for other streams of the same link
    (the time transfer's); it returns a callable that waits for them, called once the
    distillation's endpoints have ended and before the link's report is taken."""
    pass_dir, out_dir = Path(pass_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bob_dir = Path(ground_dir) if ground_dir is not None else out_dir / "ground"
    keystore, ground_pool = provision_pools(out_dir, station, pool or os.urandom(1 << 20))
    fresh = ["--new-auth-pool"]  # the pools were just provisioned: no usage record yet
    distil_options = list(distil_options)
    if "--stream" in distil_options:
        # Streaming: the link's clock starts at the first detection (link time start_s), and
        # so does Bob's replay, at his stream_start: the pass moves on the link's clock to
        # that moment (the processes' start-up is not pass time). Both endpoints are told
        # when the link ends, as the pass geometry predicts it, on that same clock.
        from emulator.optical_link import UP

        link.on_message(UP, "stream_start", lambda lk: lk.align_pass_to_now(), first=True)
        link_end_s = link.predicted_end_s() - link.start_s
        if link_end_s > 0:  # else the link is gone before the pass: it fails as it does
            distil_options += ["--stream-link-end-s", repr(float(link_end_s))]
    sat_port, ground_port = link.start()
    join_beside = beside(link) if beside is not None else None
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    outputs = {}
    if logs:
        for name in ("processor", "ground"):
            handle = open(out_dir / f"{name}.log", "wb")  # noqa: SIM115 (closed below)
            outputs[name] = {"stdout": handle, "stderr": subprocess.STDOUT}
    started_unix_s, t0 = time.time(), time.monotonic()
    alice = subprocess.Popen(
        [sys.executable, "-m", "host.payload_processor", str(pass_dir), "--station", station]
        + ["--keystore", str(keystore), "--connect", f"127.0.0.1:{sat_port}"]
        + fresh
        + list(distil_options)
        + list(alice_options),
        env=env,
        **outputs.get("processor", {}),
    )
    bob = subprocess.Popen(
        [sys.executable, "-m", "host.cli", "distil", str(pass_dir), "--role", "bob"]
        + ["--connect", f"127.0.0.1:{ground_port}", "--auth-pool", str(ground_pool)]
        + ["--out", str(bob_dir)]
        + fresh
        + list(distil_options)
        + list(bob_options),
        env=env,
        **outputs.get("ground", {}),
    )
    try:
        codes = (alice.wait(timeout=timeout_s), bob.wait(timeout=timeout_s))
        wall_s = time.monotonic() - t0
        if join_beside is not None:
            join_beside()
        link_report = link.wait(60)
    finally:
        for process in (alice, bob):
            if process.poll() is None:
                process.kill()
                process.wait()
        link.close()
        for output in outputs.values():
            output["stdout"].close()
    (out_dir / "link.json").write_text(json.dumps(link_report, indent=1) + "\n")
    passes = sorted((keystore / station / "passes").iterdir())
    alice_dir = passes[-1]

    def report(folder: Path) -> dict:
        path = folder / "report.json"
        if not path.exists():
            return {}
        data = json.loads(path.read_text())
        if data.get("timeline"):
            mark_link_state(data, link_report, link.started_unix_s, link.start_s)
            write_json_atomic(path, data)
        return data

    return LinkRun(
        codes, report(alice_dir), report(bob_dir), link_report, alice_dir, bob_dir,
        started_unix_s, wall_s,
    )  # fmt: skip


def mark_link_state(report: dict, link_report: dict, started_unix_s: float, start_s: float):
    """A streamed report's timeline `link_up` column from the link's own record of its
    outages (link time -> UTC -> the report's pass clock), instead of the endpoint's view
    (docs/streaming.md)."""
    stream = report.get("stream") or {}
    epoch, speedup = stream.get("epoch_unix_s"), stream.get("speedup")
    if epoch is None or not speedup:
        return
    down = []
    for outage in link_report.get("outages", []):
        end = outage.get("end_s")
        end = math.inf if end is None else end
        down.append(
            tuple(
                (started_unix_s + (t - start_s) - epoch) * speedup
                for t in (outage["start_s"], end)
            )
        )
    lost = link_report.get("lost_at_s")
    if lost is not None:
        down.append(((started_unix_s + (lost - start_s) - epoch) * speedup, math.inf))
    for row in report["timeline"]:
        row["link_up"] = not any(a <= row["t_s"] < b for a, b in down)
