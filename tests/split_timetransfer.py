"""`qkdsat timetransfer` in split mode for tests: the satellite endpoint in its own
process (`--role satellite --listen`, as on the payload processor), the ground in the
test's (`--role ground --connect`), over TCP on a free local port."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from host.cli import main


def run_split(common: list[str], out: Path, satellite_wait_s: float = 120.0) -> tuple[dict, dict]:
    """Both endpoints of `qkdsat <common>`, outputs in out/gnd and out/sat; both must
    exit 0. Returns (the ground's report, the satellite's report)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    satellite = subprocess.Popen(
        [sys.executable, "-m", "host.cli", *common, "--role", "satellite", "--listen",
         f"127.0.0.1:{port}", "--out", str(out / "sat")],
        env=env,
    )  # fmt: skip
    try:
        code = main(
            [*common, "--role", "ground", "--connect", f"127.0.0.1:{port}", "--out",
             str(out / "gnd")]
        )  # fmt: skip
        assert satellite.wait(timeout=satellite_wait_s) == 0
    finally:
        satellite.kill()
    assert code == 0
    ground = json.loads((out / "gnd" / "report.json").read_text())
    return ground, json.loads((out / "sat" / "report.json").read_text())
