"""Headline numbers of a simulated pass, counted with the truth (truth/), the way a
perfectly synchronised Bob would count them: each ground detection is mapped to the slot
whose expected arrival is nearest, kept when within +-coincidence_window/2 of it, and
compared with what Alice sent in that slot. For checking the simulator against published
passes; distillation never does this (it has no truth)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np

from emulator.pass_model.clocks import Clock
from emulator.pass_model.geometry import PassGeometry, parse_utc
from host.formats.passdir import read_pass_json
from host.formats.patterns import open_patterns
from host.formats.qdet import read_detections
from host.protocol.symbols import decode_symbols


def load_truth_geometry(pass_dir: Path, utc_start: datetime) -> PassGeometry:
    data = np.load(pass_dir / "truth" / "geometry.npz")
    t = data["t_s"]
    return PassGeometry(
        utc_start, float(t[-1]), t, data["range_km"], data["elevation_deg"],
        data["range_rate_km_s"], {"kind": "truth"},
    )  # fmt: skip


def headline(pass_dir: str | Path, seed: int = 0) -> dict:
    pass_dir = Path(pass_dir)
    scenario = read_pass_json(pass_dir)
    truth = json.loads((pass_dir / "truth" / "truth.json").read_text())
    geometry = load_truth_geometry(pass_dir, parse_utc(scenario["utc_start"]))
    sat = Clock("satellite", **truth["clocks"]["satellite"])
    ground = Clock("ground", **truth["clocks"]["ground"])
    first_slot_ps = truth["clocks"]["first_slot_satellite_ps"]
    period_ps = scenario["slot_period_ps"]
    window_ps = scenario["receiver"]["coincidence_window_ps"]
    time_ps, channel, _ = read_detections(pass_dir / "ground" / "detections.qdet")

    measured_s = ground.true_time_s(time_ps)
    emit_s = measured_s - geometry.range_at(measured_s) / 299792.458
    for _ in range(3):
        emit_s = measured_s - geometry.downlink_delay_s(emit_s)
    slot_f = (sat.reading_ps(emit_s) - (first_slot_ps - sat.offset_ps)) / period_ps
    slot = np.rint(slot_f).astype(np.int64)
    offset_ps = (slot_f - slot) * period_ps
    keep = (np.abs(offset_ps) <= window_ps / 2) & (slot >= 0) & (slot < scenario["slot_count"])
    slot, channel = slot[keep], channel[keep]
    # One event per slot: a multi-click slot keeps one of its clicks at random (squashing).
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(slot.size), slot))
    slot, channel = slot[order], channel[order]
    first = np.ones(slot.size, dtype=bool)
    first[1:] = slot[1:] != slot[:-1]
    slot, channel = slot[first], channel[first]

    patterns = open_patterns(pass_dir / "satellite")
    basis_x, bit, intensity = decode_symbols(patterns.symbols(slot))
    bob_x, bob_bit = channel // 2, channel % 2
    sifted = basis_x == bob_x
    error = sifted & (bit != bob_bit)
    classes = list(scenario["intensities"])
    counts = {}
    for b, basis in ((0, "Z"), (1, "X")):
        for k, name in enumerate(classes):
            sel = sifted & (basis_x == b) & (intensity == k)
            counts.setdefault(basis, {})[name] = {
                "n": int(np.count_nonzero(sel)),
                "m": int(np.count_nonzero(sel & error)),
            }
    signal = sifted & (intensity == 0)
    result = {
        "detections": int(slot.size),
        "detections_all_tags": int(time_ps.size),
        "sifted_bits": int(np.count_nonzero(sifted)),
        "qber_signal": float(np.count_nonzero(error & signal) / max(1, np.count_nonzero(signal))),
        "qber_all": float(np.count_nonzero(error) / max(1, np.count_nonzero(sifted))),
        "counts": counts,
        "coincidence_window_ps": window_ps,
    }
    return result


def compare_with_published(result: dict, published: dict) -> dict:
    rows = {}
    for key, ours in (
        ("detections", result["detections"]),
        ("sifted_bits", result["sifted_bits"]),
        ("qber", result["qber_signal"]),
    ):
        if key in published:
            rows[key] = {
                "simulated": ours,
                "published": published[key],
                "ratio": round(ours / published[key], 4),
            }
    return rows
