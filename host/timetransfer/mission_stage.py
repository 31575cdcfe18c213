"""The time-transfer stage of `qkdsat mission --timetransfer`: after the distillation, the
pass's two-way time tags (the time-transfer simulator over the mission's window, with the
two-way profile of the mission's profile) and `qkdsat timetransfer` sealed with the key
the mission just distilled; outputs in OUT/timetransfer/.

Post-pass, like the mission's distillation. During the pass over the optical link is the
real-time mission's business (docs/mission.md); the endpoints (endpoints.py) take any
transport already."""

from __future__ import annotations

import json
from pathlib import Path

from host.errors import ProtocolAborted
from host.timetransfer import simulate
from host.timetransfer.command import time_transfer

OUT_NAME = "timetransfer"


def run_stage(out: Path, qkd_profile: str, seed: int, window_s: float | None,
              key_made: bool, satellite_keys: Path | None = None) -> dict:  # fmt: skip
    """The stage's figures for mission.json; `aborted` with the reason when there is no
    time transfer to vouch for (no key to seal with, or the protocol aborted). Bob's key
    is in OUT, Alice's in `satellite_keys` (the on-board key store's pass directory after
    a distillation over the optical link; OUT after a local one)."""
    if not key_made:
        return {
            "aborted": True,
            "abort_reason": "no key from the distillation: nothing to seal the time data with",
        }
    profile = simulate.load_profile(simulate.profile_for(qkd_profile))
    simulate.simulate(profile, out, seed, window_s)
    try:
        report = time_transfer(out, out / OUT_NAME, out, satellite_keys_dir=satellite_keys)
    except ProtocolAborted:
        report = json.loads((out / OUT_NAME / "report.json").read_text())
    figures = {
        "aborted": bool(report["aborted"]),
        "abort_reason": report.get("abort_reason"),
        "profile": profile["name"],
        "out": f"{OUT_NAME}/",
    }
    if "key" in report:
        figures["key_bits_used"] = {
            "pad": report["key"]["pad_bits"],
            "auth": report["key"]["auth_bits"],
        }
    if not report["aborted"]:
        figures.update(
            bins=report["bins"],
            time_data_rate_hz=report["time_data_rate_hz"],
            qber=report["qber"],
            tdev_ps=report["stability"]["tdev_ps"],
            offset_bias_ps=report.get("truth", {}).get("offset_bias_ps"),
            precision_1s_ps=report.get("truth", {}).get("precision_1s_ps"),
            range_check_violation=report["range_check"]["violation"],
        )
    return figures
