"""A small, fast synthetic pass for distillation tests, written with the project's own
format writers (host/formats). It is not the physics simulator (emulator/pass_model, the
`sim` work): it draws detections from the standard decoy-state channel model with a
constant transmittance, a light-time delay that changes linearly and quadratically over
the pass (Doppler), a ground clock with offset and drift, timing jitter and dark counts,
so each test controls exactly the statistics it checks. truth/ holds each detection's
true slot and photon number."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from host.formats.passdir import PassDir, write_pass_json
from host.formats.patterns import InsecureTestPatternSource, write_pattern_source
from host.formats.qdet import write_detections
from host.protocol.symbols import SymbolMapping, decode_symbols

MICIUS = {
    "intensities": {"mu": 0.8, "nu": 0.1, "vac": 0.0},
    "intensity_probabilities": {"mu": 0.5, "nu": 0.25, "vac": 0.25},
    "basis_probability_z": 0.5,
}
BIASED = {
    "intensities": {"mu": 0.6, "nu": 0.2, "vac": 0.0},
    "intensity_probabilities": {"mu": 0.7, "nu": 0.2, "vac": 0.1},
    "basis_probability_z": 0.9,
}


def make_pass(
    root: Path,
    *,
    duration_s: float = 6.0,
    slot_rate_hz: float = 1e8,
    transmittance: float = 3e-3,
    misalignment: float = 0.01,
    dark_per_slot: float = 1e-7,
    profile: dict = MICIUS,
    seed: int = 1,
    delay_s: float = 4.2e-3,
    delay_rate: float = -1.5e-5,
    delay_accel_per_s: float = 4e-7,
    ground_offset_ps: int = 123_456,
    ground_drift: float = 2e-8,
    jitter_ps: float = 200.0,
) -> Path:
    root = Path(root)
    pd = PassDir(root).create()
    rng = np.random.default_rng(seed)
    names = list(profile["intensities"])
    mus = np.array([profile["intensities"][n] for n in names])
    probs = [profile["intensity_probabilities"][n] for n in names]
    mapping = SymbolMapping.from_probabilities(profile["basis_probability_z"], probs)
    slot_count = int(duration_s * slot_rate_hz)
    source = InsecureTestPatternSource(
        seed * 7919 + 11, mapping, 0, slot_count, dict(profile["intensities"])
    )
    write_pattern_source(pd.satellite / "pattern_source.json", source)
    # candidate slots at the highest click probability, thinned per intensity
    p_max = 1 - np.exp(-transmittance * mus.max()) + dark_per_slot * 4
    n_cand = rng.binomial(slot_count, p_max)
    cand = np.unique(rng.integers(0, slot_count, n_cand))
    basis_x, bit, k = decode_symbols(source.symbols(cand))
    mu = mus[k]
    p_signal = 1 - np.exp(-transmittance * mu)
    p_click = p_signal + (1 - p_signal) * dark_per_slot * 4
    keep = rng.random(cand.size) < p_click / p_max
    cand, basis_x, bit, k, mu = cand[keep], basis_x[keep], bit[keep], k[keep], mu[keep]
    p_signal, p_click = p_signal[keep], p_click[keep]
    signal = rng.random(cand.size) < p_signal / p_click
    # detected photons given at least one: zero-truncated Poisson (1 + Poisson is close
    # enough at these transmittances); the photons lost on the way are Poisson(mu (1-eta))
    photons_det = np.where(signal, 1 + rng.poisson(transmittance * mu), 0)
    photons_emitted = photons_det + rng.poisson(mu * (1 - transmittance))
    bob_basis = rng.integers(0, 2, cand.size).astype(np.uint8)
    # same basis: Alice's bit flipped with misalignment; other basis: random
    same = bob_basis == basis_x
    flip = rng.random(cand.size) < misalignment
    bob_bit = np.where(same, bit ^ flip, rng.integers(0, 2, cand.size)).astype(np.uint8)
    bob_bit = np.where(signal, bob_bit, rng.integers(0, 2, cand.size)).astype(np.uint8)
    channel = (bob_basis * 2 + bob_bit).astype(np.int16)
    t_emit = cand / slot_rate_hz
    delay = delay_s + delay_rate * t_emit + 0.5 * delay_accel_per_s * t_emit**2
    t_rx = t_emit + delay
    ground_ps = (
        ground_offset_ps
        + np.rint(t_rx * 1e12 * (1 + ground_drift) + rng.normal(0, jitter_ps, cand.size))
    ).astype(np.int64)
    order = np.argsort(ground_ps, kind="stable")
    write_detections(
        pd.ground / "detections.qdet",
        ground_ps[order],
        channel[order],
        {"clock": "ground", "channels": {"0": "H", "1": "V", "2": "D", "3": "A"}},
    )
    pps_true = np.arange(-2, int(duration_s) + 3)  # docs/formats.md: from 2 s before
    pps_ps = (ground_offset_ps + np.rint(pps_true * 1e12 * (1 + ground_drift))).astype(np.int64)
    write_detections(
        pd.ground / "pps.qdet",
        pps_ps,
        np.zeros(pps_ps.size, np.int16),
        {"clock": "ground", "channels": {"0": "PPS"}},
    )
    np.savez(
        pd.truth / "detections.npz",
        slot=cand[order],
        photons_emitted=photons_emitted[order],
        signal=signal[order],
    )
    write_pass_json(
        pd.pass_json,
        {
            "format_version": 1,
            "profile": "synthetic-test",
            "utc_start": "2017-01-01T00:00:00Z",
            "slot_rate_hz": slot_rate_hz,
            **json.loads(json.dumps(profile)),
            "formats": {"qdet": 1, "pattern_source": 1},
        },
    )
    return root
