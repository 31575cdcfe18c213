"""Detections of a full pass without enumerating its slots.

A slot of intensity mu_k sent as (basis, bit) at true time T clicks with probability
P_any = 1 - exp(-mu_k eta(T) sum_j q_j), at most p_bin = 1 - exp(-mu_max eta_bin q_max)
within a short bin of slots (eta_bin bounds the pointing-free link efficiency over the
bin; pointing only lowers it). The clicking slots are therefore an exact thinning of a
Bernoulli(p_bin) process over the slots of each bin:

1. per bin, the number of candidate slots is Binomial(slots_in_bin, p_bin) and the
   candidates are a uniformly random subset of the bin's slots (duplicates redrawn);
2. the pattern source says what was sent in each candidate (any slot, no enumeration);
3. a candidate is kept with probability P_any / p_bin, evaluated at its own time with the
   pointing error of that moment;
4. a kept slot's detected photons are zero-truncated Poisson(Lambda = sum_j lambda_j),
   split multinomially over the detectors (lambda_j / Lambda); the photons lost on the
   way are Poisson(mu - Lambda), which gives the true emitted photon number (truth).

Work is proportional to the number of detections (~2x), not of slots: a 2.7e10-slot
Micius pass draws ~7e6 candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from emulator.pass_model.clocks import Clock
from emulator.pass_model.detectors import (
    KIND_AFTERPULSE,
    KIND_NOISE,
    KIND_PHOTON,
    Receiver,
    apply_dead_time,
    zero_truncated_poisson,
)
from emulator.pass_model.geometry import PassGeometry
from emulator.pass_model.link import LinkBudget, PointingJitter
from host.protocol.symbols import decode_symbols

BOUND_MARGIN = 1.0 + 1e-6


@dataclass
class SlotClock:
    """Slot i leaves the satellite when its clock reads first_slot_ps + i * period_ps."""

    clock: Clock
    first_slot_ps: int
    period_ps: int
    slot_count: int

    def sat_time_ps(self, slots) -> np.ndarray:
        return self.first_slot_ps + np.asarray(slots, dtype=np.int64) * self.period_ps

    def true_time_s(self, slots) -> np.ndarray:
        return self.clock.true_time_s(self.sat_time_ps(slots))


@dataclass
class Channel:
    """Everything between the laser and the detectors."""

    geometry: PassGeometry
    link: LinkBudget
    pointing: PointingJitter
    receiver: Receiver
    intensities_mu: np.ndarray  # by intensity class index

    def efficiency_no_pointing(self, true_s) -> np.ndarray:
        return self.link.efficiency_no_pointing(
            self.geometry.range_at(true_s), self.geometry.elevation_at(true_s)
        )

    def efficiency(self, true_s) -> np.ndarray:
        return self.link.efficiency(
            self.geometry.range_at(true_s),
            self.geometry.elevation_at(true_s),
            self.pointing.error_at(true_s),
        )


@dataclass
class PhotonEvents:
    slot: np.ndarray  # int64
    channel: np.ndarray  # int16
    true_rx_s: np.ndarray  # float64, true arrival time (s after utc_start)
    photons: np.ndarray  # int16, photons the slot carried (emitted)
    symbol: np.ndarray  # int16, symbol nibble sent
    candidates: int = 0

    @classmethod
    def concatenate(cls, parts: list[PhotonEvents]) -> PhotonEvents:
        if not parts:
            empty = np.zeros(0)
            return cls(*(empty.astype(t) for t in ("i8", "i2", "f8", "i2", "i2")))
        return cls(
            np.concatenate([p.slot for p in parts]),
            np.concatenate([p.channel for p in parts]),
            np.concatenate([p.true_rx_s for p in parts]),
            np.concatenate([p.photons for p in parts]),
            np.concatenate([p.symbol for p in parts]),
            sum(p.candidates for p in parts),
        )


def _distinct_offsets(sizes: np.ndarray, counts: np.ndarray, rng) -> tuple[np.ndarray, ...]:
    """For each bin b, counts[b] distinct uniform offsets in [0, sizes[b]). Duplicates are
    redrawn until none remain: sequential rejection, so each subset is uniform."""
    bins = np.repeat(np.arange(sizes.size), counts)
    offsets = rng.integers(0, sizes[bins])
    while True:
        key = bins.astype(np.int64) * (int(sizes.max()) + 1) + offsets
        order = np.argsort(key, kind="stable")
        key, bins, offsets = key[order], bins[order], offsets[order]
        duplicate = np.zeros(key.size, dtype=bool)
        duplicate[1:] = key[1:] == key[:-1]
        if not duplicate.any():
            return bins, offsets
        offsets[duplicate] = rng.integers(0, sizes[bins[duplicate]])


def sample_photon_clicks(
    channel: Channel,
    slots: SlotClock,
    pattern,
    slot_begin: int,
    slot_end: int,
    bin_slots: int,
    rng: np.random.Generator,
) -> PhotonEvents:
    """Photon detections from slots [slot_begin, slot_end)."""
    receiver = channel.receiver
    mu_table = np.asarray(channel.intensities_mu, dtype=np.float64)
    mu_max = float(mu_table.max())
    q_max = float(max(receiver.efficiency))
    starts = np.arange(slot_begin, slot_end, bin_slots, dtype=np.int64)
    sizes = np.minimum(starts + bin_slots, slot_end) - starts
    edges_s = slots.true_time_s(np.append(starts, slot_end))
    eta_edges = channel.efficiency_no_pointing(edges_s)
    eta_bound = np.maximum(eta_edges[:-1], eta_edges[1:]) * BOUND_MARGIN
    p_bin = -np.expm1(-mu_max * eta_bound * q_max)
    counts = rng.binomial(sizes, p_bin)
    bins, offsets = _distinct_offsets(sizes, counts, rng)
    candidate = starts[bins] + offsets
    true_emit_s = slots.true_time_s(candidate)
    eta = channel.efficiency(true_emit_s)
    symbol = pattern.symbols(candidate)
    basis_x, bit, intensity = decode_symbols(symbol)
    mu = mu_table[intensity]
    lam = (mu * eta)[:, None] * receiver.channel_fractions(basis_x, bit)
    lam_total = lam.sum(axis=1)
    ratio = -np.expm1(-lam_total) / p_bin[bins]
    if ratio.size and ratio.max() > 1.0:
        raise AssertionError(f"thinning bound violated (ratio {ratio.max()})")
    kept = rng.random(ratio.size) < ratio
    candidate, true_emit_s, symbol = candidate[kept], true_emit_s[kept], symbol[kept]
    lam, lam_total, mu = lam[kept], lam_total[kept], mu[kept]
    detected = zero_truncated_poisson(lam_total, rng)
    per_detector = rng.multinomial(detected, lam / lam_total[:, None])
    lost = rng.poisson(np.maximum(mu - lam_total, 0.0))
    photons = detected + lost
    rows, cols = np.nonzero(per_detector)
    true_rx_s = true_emit_s + channel.geometry.downlink_delay_s(true_emit_s)
    return PhotonEvents(
        candidate[rows],
        cols.astype(np.int16),
        true_rx_s[rows],
        np.minimum(photons[rows], np.iinfo(np.int16).max).astype(np.int16),
        symbol[rows].astype(np.int16),
        int(counts.sum()),
    )


@dataclass
class GroundTags:
    """All ground detections, sorted by ground-clock time, with their truth."""

    time_ps: np.ndarray  # int64, ground clock
    channel: np.ndarray  # int16
    slot: np.ndarray  # int64, -1 for noise and afterpulses
    kind: np.ndarray  # uint8: KIND_PHOTON, KIND_NOISE, KIND_AFTERPULSE
    photons: np.ndarray  # int16, -1 unless a photon detection
    symbol: np.ndarray  # int16, -1 unless a photon detection
    true_rx_s: np.ndarray  # float64
    lost_to_dead_time: int = 0


def ground_tags(
    photon: PhotonEvents,
    receiver: Receiver,
    ground_clock: Clock,
    record_window_s: tuple[float, float],
    rng: np.random.Generator,
) -> GroundTags:
    """Photon clicks + dark/background noise + afterpulses, jittered, on the ground clock,
    with dead time applied per detector."""
    n_photon = photon.slot.size
    jitter = rng.normal(0.0, receiver.jitter_ps_rms, n_photon)
    photon_ps = ground_clock.to_clock_ps(photon.true_rx_s, jitter)
    # Noise: a Poisson process per detector over the recording window.
    t0, t1 = record_window_s
    noise_channel = np.repeat(
        np.arange(4, dtype=np.int16), rng.poisson(receiver.noise_hz * (t1 - t0))
    )
    noise_true_s = rng.uniform(t0, t1, noise_channel.size)
    noise_ps = ground_clock.to_clock_ps(noise_true_s)
    fill = np.full(noise_channel.size, -1)
    tags = _sorted(
        GroundTags(
            np.concatenate([photon_ps, noise_ps]),
            np.concatenate([photon.channel, noise_channel]),
            np.concatenate([photon.slot, fill]),
            np.concatenate(
                [np.full(n_photon, KIND_PHOTON), np.full(noise_channel.size, KIND_NOISE)]
            ).astype(np.uint8),
            np.concatenate([photon.photons, fill]).astype(np.int16),
            np.concatenate([photon.symbol, fill]).astype(np.int16),
            np.concatenate([photon.true_rx_s, noise_true_s]),
        )
    )
    before = tags.time_ps.size
    tags = _dead_time(tags, receiver.dead_time_ps)
    # Afterpulses follow registered clicks, after the dead time, exponentially delayed.
    parent = np.flatnonzero(rng.random(tags.time_ps.size) < receiver.afterpulse_probability)
    delay_ps = receiver.dead_time_ps + rng.exponential(
        receiver.afterpulse_time_constant_ps, parent.size
    )
    after_ps = tags.time_ps[parent] + np.rint(delay_ps).astype(np.int64)
    fill = np.full(parent.size, -1)
    tags = _sorted(
        GroundTags(
            np.concatenate([tags.time_ps, after_ps]),
            np.concatenate([tags.channel, tags.channel[parent]]),
            np.concatenate([tags.slot, fill]),
            np.concatenate([tags.kind, np.full(parent.size, KIND_AFTERPULSE, np.uint8)]),
            np.concatenate([tags.photons, fill.astype(np.int16)]),
            np.concatenate([tags.symbol, fill.astype(np.int16)]),
            np.concatenate([tags.true_rx_s, tags.true_rx_s[parent] + delay_ps * 1e-12]),
        )
    )
    added = parent.size
    tags = _dead_time(tags, receiver.dead_time_ps)
    tags.lost_to_dead_time = before + added - tags.time_ps.size
    return tags


def _sorted(tags: GroundTags) -> GroundTags:
    order = np.lexsort((tags.channel, tags.time_ps))
    return _select(tags, order)


def _select(tags: GroundTags, index) -> GroundTags:
    return GroundTags(
        tags.time_ps[index],
        tags.channel[index],
        tags.slot[index],
        tags.kind[index],
        tags.photons[index],
        tags.symbol[index],
        tags.true_rx_s[index],
        tags.lost_to_dead_time,
    )


def _dead_time(tags: GroundTags, dead_time_ps: int) -> GroundTags:
    keep = np.ones(tags.time_ps.size, dtype=bool)
    for ch in range(4):
        index = np.flatnonzero(tags.channel == ch)
        keep[index] = apply_dead_time(tags.time_ps[index], dead_time_ps)
    return _select(tags, np.flatnonzero(keep))
