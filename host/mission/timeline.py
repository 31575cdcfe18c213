"""The mission's timeline over the pass (docs/mission.md "Timeline"): what the ground
detected, what the pipeline had sifted and reconciled, whether the optical link was up and
how far the pipeline lagged behind the detections, second by second, until both keys
existed.

One row schema for both ways of distilling (the streaming pipeline's reports carry the
same rows):

    {"t_s", "detections", "sifted_bits", "reconciled_bits", "link_up", "backlog_bits",
     "lag_s"}

t_s is link (pass) time: seconds after pass.json's utc_start, the clock of the optical
link (emulator/optical_link.py). detections, sifted_bits and reconciled_bits are running
totals; backlog_bits are the detections the pipeline has not yet worked off; lag_s is how
far behind the newest detection the pipeline's work stands.

Post-pass distillation (what `post_pass_timeline` draws) starts only at loss of signal:
during the pass nothing is sifted, the whole pass is backlog and the lag grows with the
pass; the distillation then shows as steps after the last detection, at the ends of its
stages as the ground endpoint timed them (report.json stage_seconds).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from host.formats.qdet import read_detections

ROW_FIELDS = (
    "t_s",
    "detections",
    "sifted_bits",
    "reconciled_bits",
    "link_up",
    "backlog_bits",
    "lag_s",
)
# the protocol's stages in the order they run (host/distil/protocol.py); sifting ends
# the "sifted" step, error correction the "reconciled" one
SIFTED_AFTER = ("sync", "sifting")
RECONCILED_AFTER = ("sync", "sifting", "estimation", "error_correction")


def detection_times_s(out: Path, scenario) -> np.ndarray:
    """Ground detections on the pass clock (true time, s after utc_start), sorted."""
    times_ps, _channels, _header = read_detections(out / "ground" / "detections.qdet")
    return np.sort(scenario.ground_clock.true_time_s(times_ps))


def row_step_s(pass_s: float) -> float:
    """1 s rows (the streaming block size) for a pass; finer for a short segment."""
    return 1.0 if pass_s >= 20.0 else 0.1


def post_pass_timeline(
    detections_s: np.ndarray,
    pass_end_s: float,
    link_up,
    *,
    distil_start_s: float,
    key_latency_s: float | None,
    stage_seconds: dict,
    sifted_bits: int | None,
    reconciled_bits: int | None,
) -> list[dict]:
    """Rows for a distillation that starts after the pass (at distil_start_s, link time).

    link_up(t_s) -> bool is the link schedule. key_latency_s: from the last detection
    until both keys were written (None: no key was made; the rows then end where the
    distillation ended, at distil_start_s + stage total)."""
    step = row_step_s(pass_end_s)
    total = int(detections_s.size)
    first = float(detections_s[0]) if total else 0.0
    rows = []
    for k in range(int(math.floor(pass_end_s / step)) + 1):
        t = round(k * step, 6)
        seen = int(np.searchsorted(detections_s, t, side="right"))
        lag = float(detections_s[seen - 1]) - first if seen else 0.0
        rows.append(timeline_row(t, seen, 0, 0, link_up(t), seen, lag))

    def after(names) -> float:
        return distil_start_s + sum(float(stage_seconds.get(n, 0.0)) for n in names)

    last_detection_s = float(detections_s[-1]) if total else pass_end_s
    end_s = (
        last_detection_s + key_latency_s
        if key_latency_s is not None
        else distil_start_s + float(stage_seconds.get("total", 0.0))
    )
    sifted_at, reconciled_at = after(SIFTED_AFTER), after(RECONCILED_AFTER)
    start = rows[-1]["t_s"]
    steps = max(int(math.ceil((end_s - start) / step)), 0)
    for k in range(1, steps + 1):
        t = round(min(start + k * step, end_s), 6)
        sifted = int(sifted_bits or 0) if t >= sifted_at else 0
        reconciled = int(reconciled_bits or 0) if t >= reconciled_at else 0
        done = key_latency_s is not None and k == steps
        backlog = 0 if done else total
        # until the keys exist the pipeline has worked off none of the pass: it lags the
        # newest detection by the whole pass
        lag = 0.0 if done else max(last_detection_s - first, 0.0)
        rows.append(timeline_row(t, total, sifted, reconciled, link_up(t), backlog, lag))
    return rows


def timeline_row(t, detections, sifted, reconciled, up, backlog, lag) -> dict:
    """One row of the timeline, its fields in ROW_FIELDS order: the one writer of the
    schema, for the post-pass rows here and the streaming pipeline's (host/distil/stream.py
    Timeline.rows)."""
    return {
        "t_s": t,
        "detections": detections,
        "sifted_bits": sifted,
        "reconciled_bits": reconciled,
        "link_up": bool(up),
        "backlog_bits": backlog,
        "lag_s": round(lag, 3),
    }


def lag_figures(rows: list[dict]) -> dict:
    """lag_s_max and lag_s_median over the rows (the pass and the wait for the keys)."""
    during = [r["lag_s"] for r in rows] or [0.0]
    return {
        "lag_s_max": round(float(np.max(during)), 3),
        "lag_s_median": round(float(np.median(during)), 3),
    }


def link_intervals(rows: list[dict]) -> list[tuple[float, float, bool]]:
    """(start_s, end_s, up) runs of the rows' link state, for the figure."""
    runs = []
    for row in rows:
        if runs and runs[-1][2] == row["link_up"]:
            runs[-1][1] = row["t_s"]
        else:
            start = runs[-1][1] if runs else row["t_s"]
            runs.append([start, row["t_s"], row["link_up"]])
    return [tuple(r) for r in runs]
