"""Generate a pass directory from a profile: geometry -> link -> detections -> files.

The physics comes from one seed through numpy SeedSequence children, one per component,
so the same seed (and the same pattern secret) gives the same pass byte for byte, and
changing one model (say, the pointing) does not reshuffle the others. Alice's pattern comes
from a separate secret (fresh from os.urandom unless given), kept in satellite/ and truth/
only: the seed is published in pass.json.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import zlib
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np

from emulator.pass_model import geometry as geo
from emulator.pass_model.clocks import Clock, pps_true_times_s
from emulator.pass_model.detectors import CHANNEL_NAMES, KIND_PHOTON, Receiver
from emulator.pass_model.link import LinkBudget, PointingJitter
from emulator.pass_model.sampler import (
    Channel,
    PhotonEvents,
    SlotClock,
    ground_tags,
    sample_photon_clicks,
)
from host.distil.durable import write_atomic
from host.errors import BadInput
from host.formats.passdir import PassDir, write_pass_json
from host.formats.patterns import (
    PATTERN_LOG_NAME,
    PATTERN_SOURCE_NAME,
    InsecureTestPatternSource,
    KeyedPatternSource,
    write_pattern_source,
)
from host.formats.qdet import write_detections
from host.formats.qrec import Kind, PatternFrame, RecordWriter, encode_tdc_block
from host.protocol.symbols import SymbolMapping, pack_nibbles

SIMULATOR_VERSION = 1
TDC_CHANNEL_PPS = 0
TDC_CHANNEL_SYNC = 1
GROUND_CHANNEL_PPS = 0
GROUND_CHANNEL_SYNC = 4
PATTERN_FRAME_SLOTS = 1 << 20
TDC_BLOCK_EVENTS = 1 << 16
AUTO_LOG_MAX_SLOTS = 50_000_000
_SEED_STREAMS = ("pattern", "pointing", "photons", "ground", "sync", "pps")


@dataclass
class Scenario:
    profile: dict
    station: dict
    geometry: geo.PassGeometry
    seed: int
    slot_rate_hz: float
    slot_period_ps: int
    slot_count: int
    classes: list[str]
    mapping: SymbolMapping
    pattern: KeyedPatternSource
    channel: Channel
    slots: SlotClock
    ground_clock: Clock
    rngs: dict
    # Alice's pattern comes from this secret, never from the public seed (which pass.json
    # publishes): it goes only to satellite/ (as the pattern source or log) and truth/
    pattern_secret: bytes = b""


def build_scenario(
    profile: dict,
    *,
    station_name: str | None = None,
    tle_text: str | None = None,
    tle_origin: str = "TLE",
    start_utc: str | None = None,
    seed: int = 1,
    duration_s: float | None = None,
    pointing_log: tuple[np.ndarray, np.ndarray] | None = None,
    window_start_s: float | None = None,
    pattern_secret: bytes | None = None,
    geometry: geo.PassGeometry | None = None,
    clocks: tuple | None = None,
) -> Scenario:
    """Everything needed to simulate one pass. `pointing_log` = (t_s, error_urad) replaces
    the pointing-jitter model with a measured or simulated tracking log (t_s after the
    QKD window's start). `duration_s` crops the pass around culmination, or from
    `window_start_s` (seconds after the pass's start) when given. `geometry` and `clocks`
    (satellite, ground) replace the profile's orbit and clocks: a two-way pass
    (host/timetransfer/simulate.py) gives its inertial orbit, already cut to the window,
    and its noisy clocks."""
    from host.simulate.profiles import station as pick_station

    station = pick_station(profile, station_name)
    if geometry is None:
        geometry = profile_geometry(
            profile, station, tle_text, tle_origin, start_utc, duration_s, window_start_s
        )

    children = np.random.SeedSequence(seed).spawn(len(_SEED_STREAMS))
    rngs = {
        name: np.random.default_rng(child)
        for name, child in zip(_SEED_STREAMS, children, strict=True)
    }
    if pattern_secret is None:
        pattern_secret = os.urandom(PATTERN_SECRET_BYTES)
    pattern_key = pattern_key_from_secret(pattern_secret)

    source = profile["source"]
    classes = list(source["intensities"])
    rate = float(source["slot_rate_hz"])
    period_ps = int(round(1e12 / rate))
    slot_count = int(math.floor(geometry.duration_s * rate))
    mapping = SymbolMapping.from_probabilities(
        source["basis_probability_z"], [source["intensity_probabilities"][c] for c in classes]
    )
    # AES-256-CTR under a key only the secret gives (the emulated head's QRNG stand-in):
    # splitmix64 of a 64-bit seed, as before, is recoverable from the bases Alice publishes
    # in sifting (InsecureTestPatternSource), so its keys were never secret
    # the source records the mean photon numbers its laser was set to (Alice's own record,
    # which the distillation checks pass.json's `intensities` against)
    laser_mu = {c: float(source["intensities"][c]) for c in classes}
    pattern = KeyedPatternSource(pattern_key, mapping, 0, slot_count, laser_mu)

    link_cfg = profile["link"]
    link = LinkBudget(
        station["aperture_diameter_m"],
        link_cfg["divergence_full_urad"],
        link_cfg["zenith_transmittance"],
        link_cfg["optics_efficiency"],
    )
    if pointing_log is not None:
        pointing = PointingJitter.from_log(*pointing_log)
    else:
        pointing = PointingJitter.from_model(
            geometry.duration_s + 1.0,
            link_cfg["pointing_jitter_urad_rms_per_axis"],
            link_cfg["pointing_correlation_s"],
            link_cfg["pointing_bias_urad"],
            rngs["pointing"],
        )
    det = profile["detectors"]
    receiver = Receiver(
        tuple(det["efficiency"]),
        tuple(det["dark_count_hz"]),
        tuple(det["background_hz"]),
        int(round(det["dead_time_ns"] * 1000)),
        det["afterpulse_probability"],
        det["afterpulse_time_constant_ns"] * 1000.0,
        det["jitter_ps_rms"],
        det["misalignment_error"],
        det["z_split"],
    )
    channel = Channel(
        geometry, link, pointing, receiver, np.array([source["intensities"][c] for c in classes])
    )
    sat = profile["clocks"]["satellite"]
    gnd = profile["clocks"]["ground"]
    if clocks is not None:
        sat_clock, ground_clock = clocks
    else:
        sat_clock = Clock(
            "satellite", int(round(sat["offset_s"] * 1e12)), sat["drift"], sat["aging_per_s"]
        )
        ground_clock = Clock(
            "ground", int(round(gnd["offset_s"] * 1e12)), gnd["drift"], gnd["aging_per_s"]
        )
    slots = SlotClock(sat_clock, first_slot_ps(sat_clock, period_ps), period_ps, slot_count)
    return Scenario(
        profile, station, geometry, seed, rate, period_ps, slot_count, classes, mapping,
        pattern, channel, slots, ground_clock, rngs, bytes(pattern_secret),
    )  # fmt: skip


def first_slot_ps(sat_clock, period_ps: int) -> int:
    """The satellite clock's reading of the pass's first slot: the laser starts on the
    first whole slot period of the TDC clock after T = 0."""
    start_ps = int(sat_clock.to_clock_ps(0.0))
    return -(-start_ps // period_ps) * period_ps


def profile_geometry(
    profile: dict,
    station: dict,
    tle_text: str | None,
    tle_origin: str,
    start_utc: str | None,
    duration_s: float | None,
    window_start_s: float | None,
) -> geo.PassGeometry:
    """The pass of the profile's synthetic orbit or of a TLE, cut to `duration_s`."""
    if tle_text is not None:
        search_start = geo.parse_utc(start_utc or profile["orbit"]["utc_start"], "--start")
        geometry = geo.tle_pass(
            tle_text, station, search_start, station["elevation_mask_deg"], origin=tle_origin
        )
    else:
        orbit = profile["orbit"]["synthetic"]
        utc_start = geo.parse_utc(start_utc or profile["orbit"]["utc_start"], "start")
        geometry = geo.synthetic_circular_pass(
            utc_start,
            orbit["altitude_km"],
            orbit["min_range_km"],
            orbit["start_range_km"],
            orbit["end_range_km"],
        )
    if duration_s is not None:
        geometry = crop_around_culmination(geometry, duration_s, window_start_s)
    return geometry


PATTERN_SECRET_BYTES = 16


def pattern_key_from_secret(secret: bytes) -> bytes:
    """Alice's 32-byte pattern key (AES-256-CTR, KeyedPatternSource): a keyed hash of the
    pattern secret alone, never of the public simulation seed."""
    if len(secret) < PATTERN_SECRET_BYTES:
        raise BadInput(f"pattern secret: {len(secret)} bytes, need {PATTERN_SECRET_BYTES}")
    return hashlib.blake2b(secret, digest_size=32, person=b"qkdsat-pattern-k").digest()


def crop_around_culmination(
    geometry: geo.PassGeometry, duration_s: float, start_s: float | None = None
) -> geo.PassGeometry:
    """The `duration_s` seconds of the pass centred on culmination, or from `start_s`
    (short runs)."""
    if not 0 < duration_s <= geometry.duration_s:
        raise BadInput(
            f"--duration-s {duration_s} must be in (0, {geometry.duration_s:.1f}] s (the pass)"
        )
    centre = geometry.events.get("culmination", geometry.duration_s / 2)
    begin = centre - duration_s / 2 if start_s is None else start_s
    begin = min(max(begin, 0.0), geometry.duration_s - duration_s)
    count = int(math.ceil(duration_s / geo.DEFAULT_STEP_S)) + 1
    t = np.linspace(0.0, duration_s, count)
    cropped = geo.PassGeometry(
        geometry.utc_start + timedelta(seconds=begin),
        duration_s,
        t,
        geometry.range_at(t + begin),
        geometry.elevation_at(t + begin),
        geometry.range_rate_at(t + begin),
        {**geometry.source, "cropped_from_s": [round(begin, 6), round(begin + duration_s, 6)]},
    )
    cropped.events = {
        k: v - begin for k, v in geometry.events.items() if begin <= v <= begin + duration_s
    }
    return cropped


# ---------------------------------------------------------------- running


def simulate_photons(scenario: Scenario, progress: bool = False) -> PhotonEvents:
    rate = scenario.slot_rate_hz
    chunk = int(rate)  # one second of slots per step
    bin_slots = max(1, int(rate * 1e-3))  # 1 ms bins: eta varies < 1e-4 across one
    parts = []
    starts = range(0, scenario.slot_count, chunk)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=scenario.slot_count, unit="slot", unit_scale=True, desc="simulate")
    for begin in starts:
        end = min(begin + chunk, scenario.slot_count)
        parts.append(
            sample_photon_clicks(
                scenario.channel,
                scenario.slots,
                scenario.pattern,
                begin,
                end,
                bin_slots,
                scenario.rngs["photons"],
            )
        )
        if bar is not None:
            bar.update(end - begin)
    if bar is not None:
        bar.close()
    return PhotonEvents.concatenate(parts)


def run(
    scenario: Scenario,
    out_dir: str | Path,
    *,
    pattern_mode: str = "auto",
    progress: bool = False,
) -> dict:
    """Simulate the pass and write the pass directory; returns the truth summary."""
    started = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if not (out / "pass.json").exists():
            raise BadInput(f"{out}: exists, is not empty and is not a pass directory")
        for sub in ("satellite", "ground", "truth"):
            for stale in (out / sub).glob("*") if (out / sub).is_dir() else []:
                stale.unlink()
    pass_dir = PassDir(out).create()
    geometry, slots = scenario.geometry, scenario.slots
    receiver = scenario.channel.receiver

    photons = simulate_photons(scenario, progress)
    t_end_emit = float(slots.true_time_s(scenario.slot_count))
    window = (
        float(geometry.downlink_delay_s(np.array([0.0]))[0]) - 1e-3,
        t_end_emit + float(geometry.downlink_delay_s(np.array([t_end_emit]))[0]) + 1e-3,
    )
    tags = ground_tags(photons, receiver, scenario.ground_clock, window, scenario.rngs["ground"])

    # ---- satellite/: patterns, TDC (PPS + sync emissions), product list
    if pattern_mode == "auto":
        pattern_mode = "log" if scenario.slot_count <= AUTO_LOG_MAX_SLOTS else "source"
    if pattern_mode == "log":
        write_pattern_log(pass_dir.satellite / PATTERN_LOG_NAME, scenario.pattern)
    elif pattern_mode == "source":
        write_pattern_source(pass_dir.satellite / PATTERN_SOURCE_NAME, scenario.pattern)
    else:
        raise BadInput(f"--pattern {pattern_mode!r}: use auto, log or source")

    profile = scenario.profile
    sync_rate = float(profile["sync"]["rate_hz"])
    slots_per_sync = int(round(scenario.slot_rate_hz / sync_rate))
    sync_slots = np.arange(0, scenario.slot_count, slots_per_sync, dtype=np.int64)
    sync_sat_ps = slots.sat_time_ps(sync_slots)
    pps_true = pps_true_times_s(
        geometry.utc_start.microsecond * 1e-6, window[1], margin_s=2.0
    )  # whole UTC seconds
    sat_pps_ps = slots.clock.to_clock_ps(
        pps_true,
        scenario.rngs["pps"].normal(
            0, profile["clocks"]["satellite"]["pps_jitter_ps_rms"], pps_true.size
        ),
    )
    write_tdc_log(
        pass_dir.satellite / "tdc.qrec",
        np.concatenate(
            [np.full(sat_pps_ps.size, TDC_CHANNEL_PPS), np.full(sync_slots.size, TDC_CHANNEL_SYNC)]
        ),
        np.concatenate([sat_pps_ps, sync_sat_ps]),
    )
    write_products(pass_dir.satellite)

    # ---- ground/: detections, PPS, sync detections
    write_ground_detections(pass_dir.ground, scenario, tags, "qkdsat simulate")
    write_ground_clock_marks(
        pass_dir.ground, pass_dir.truth, scenario, geometry, slots, pps_true, sync_slots
    )

    # ---- truth/ and pass.json
    truth = write_truth(pass_dir.truth, scenario, photons, tags, window, slots_per_sync, started)
    write_pass_json(pass_dir.pass_json, pass_json(scenario, slots_per_sync, pattern_mode))
    return truth


def write_ground_detections(ground_dir: Path, scenario: Scenario, tags, source: str) -> None:
    """ground/detections.qdet: the station's time tags, for `qkdsat simulate` and the
    mission's ground segment alike."""
    write_detections(
        ground_dir / "detections.qdet",
        tags.time_ps,
        tags.channel,
        {
            "clock": "ground",
            "channels": {str(k): v for k, v in CHANNEL_NAMES.items()},
            "station": scenario.station["name"],
            "source": source,
        },
    )


def write_truth(
    truth_dir: Path, scenario: Scenario, photons, tags, window, slots_per_sync: int, started
) -> dict:
    """truth/detections.npz, geometry.npz and truth.json (the summary, returned), for
    `qkdsat simulate` and the mission's ground segment alike; `started`: the
    time.perf_counter() at which the generation began (truth.json's wall_seconds)."""
    geometry = scenario.geometry
    _save_npz_private(
        truth_dir / "detections.npz",
        slot=tags.slot,
        kind=tags.kind,
        photons=tags.photons,
        symbol=tags.symbol,
        true_rx_s=tags.true_rx_s,
    )
    np.savez(
        truth_dir / "geometry.npz",
        t_s=geometry.t_s,
        range_km=geometry.range_km,
        elevation_deg=geometry.elevation_deg,
        range_rate_km_s=geometry.range_rate_km_s,
    )
    truth = truth_summary(scenario, photons, tags, window)
    truth["sync_slots_per_pulse"] = slots_per_sync
    truth["wall_seconds"] = round(time.perf_counter() - started, 3)
    _write_json(truth_dir / "truth.json", truth)
    return truth


def write_ground_clock_marks(
    ground_dir: Path,
    truth_dir: Path,
    scenario: Scenario,
    geometry,
    slots,
    pps_true: np.ndarray,
    sync_slots: np.ndarray,
) -> None:
    """The station's PPS (ground/pps.qdet) and the sync pulses it saw (ground/sync.qdet,
    with their true slots in truth/sync.npz, row for row), on the ground clock."""
    profile = scenario.profile
    station_name = scenario.station["name"]
    gnd_pps_ps = scenario.ground_clock.to_clock_ps(
        pps_true,
        scenario.rngs["pps"].normal(
            0, profile["clocks"]["ground"]["pps_jitter_ps_rms"], pps_true.size
        ),
    )
    write_detections(
        ground_dir / "pps.qdet",
        gnd_pps_ps,
        np.full(gnd_pps_ps.size, GROUND_CHANNEL_PPS),
        {"clock": "ground", "channels": {"0": "PPS"}, "station": station_name},
    )
    sync_rng = scenario.rngs["sync"]
    seen = sync_rng.random(sync_slots.size) < profile["sync"]["ground_detection_probability"]
    sync_emit_s = slots.true_time_s(sync_slots[seen])
    sync_rx_s = sync_emit_s + geometry.downlink_delay_s(sync_emit_s)
    sync_ps = scenario.ground_clock.to_clock_ps(
        sync_rx_s, sync_rng.normal(0, profile["sync"]["jitter_ps_rms"], sync_rx_s.size)
    )
    order = np.argsort(sync_ps, kind="stable")
    write_detections(
        ground_dir / "sync.qdet",
        sync_ps[order],
        np.full(sync_ps.size, GROUND_CHANNEL_SYNC),
        {
            "clock": "ground",
            "channels": {str(GROUND_CHANNEL_SYNC): "SYNC"},
            "station": station_name,
        },
    )
    np.savez(truth_dir / "sync.npz", slot=sync_slots[seen][order], true_rx_s=sync_rx_s[order])


def write_pattern_log(path: Path, pattern: KeyedPatternSource | InsecureTestPatternSource) -> None:
    """Frames of symbols behind a PATTERN_CONFIG record with the thresholds that made
    them, as the payload's sequencer writes (docs/formats.md): Alice checks pass.json's
    probabilities against it. The symbols are Alice's raw key: the log is created 0600,
    a symlink planted under its name removed, never written through."""
    path = Path(path)
    if path.is_symlink():
        path.unlink()
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    writer = RecordWriter(path)
    cuts = list(pattern.mapping.intensity_thresholds)
    thresholds = [pattern.mapping.basis_threshold, cuts[0], cuts[1] if len(cuts) > 2 else 65536]
    writer.append(
        Kind.PATTERN_CONFIG,
        json.dumps(
            {"source": "qkdsat simulate", "thresholds": thresholds}
            | ({"intensities": pattern.intensities} if pattern.intensities else {})
        ).encode(),
    )
    for frame, first in enumerate(range(0, pattern.slot_count, PATTERN_FRAME_SLOTS)):
        count = min(PATTERN_FRAME_SLOTS, pattern.slot_count - first)
        nibbles = pattern.symbols(np.arange(first, first + count, dtype=np.int64))
        writer.append(
            Kind.PATTERN_FRAME, PatternFrame(frame, first, count, pack_nibbles(nibbles)).encode()
        )


def write_tdc_log(path: Path, channels: np.ndarray, times_ps: np.ndarray) -> None:
    order = np.argsort(times_ps, kind="stable")
    channels, times_ps = channels[order], times_ps[order]
    if times_ps.size and times_ps[0] < 0:
        raise ValueError("TDC times must be non-negative (u64 on the payload)")
    writer = RecordWriter(path)
    for first in range(0, times_ps.size, TDC_BLOCK_EVENTS):
        block = slice(first, first + TDC_BLOCK_EVENTS)
        writer.append(Kind.TDC_BLOCK, encode_tdc_block(channels[block], times_ps[block]))


def write_products(satellite_dir: Path) -> None:
    products = []
    for path in sorted(satellite_dir.iterdir()):
        if path.name == "products.json" or path.name.endswith(".tmp"):
            continue
        crc = 0
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 22):
                crc = zlib.crc32(chunk, crc)
        products.append({"name": path.name, "bytes": path.stat().st_size, "crc32": crc})
    _write_json(satellite_dir / "products.json", {"products": products})


def _save_npz_private(path: Path, **arrays) -> None:
    """np.savez into a file created 0600 (a planted symlink removed, never followed): the
    detections' truth holds each one's symbol, Alice's basis and bit, as secret as the
    pattern secret in truth.json."""
    path = Path(path)
    if path.is_symlink():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    with os.fdopen(fd, "wb") as out:
        np.savez(out, **arrays)


def _write_json(path: Path, data: dict) -> None:
    """0600 through a fresh temporary (durable.write_atomic): truth.json holds the pattern
    secret, and satellite/ is Alice's; a symlink planted at the temporary name is removed,
    never written through."""
    write_atomic(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode(), 0o600)


def pass_json(scenario: Scenario, slots_per_sync: int, pattern_mode: str) -> dict:
    profile = scenario.profile
    geometry = scenario.geometry
    station = scenario.station
    source = profile["source"]
    det = profile["detectors"]
    return {
        "profile": profile["name"],
        "profile_file": Path(profile["_path"]).name,
        "profile_overrides": profile.get("_overrides", {}),
        "station": {k: station[k] for k in ("name", "lat_deg", "lon_deg", "alt_m")}
        | {"aperture_diameter_m": station["aperture_diameter_m"]},
        "utc_start": geo.iso_utc(geometry.utc_start),
        "utc_end": geo.iso_utc(geometry.utc_end),
        "slot_rate_hz": scenario.slot_rate_hz,
        "slot_period_ps": scenario.slot_period_ps,
        "slot_count": scenario.slot_count,
        "first_slot": 0,
        "intensities": {c: source["intensities"][c] for c in scenario.classes},
        "intensity_probabilities": {
            c: source["intensity_probabilities"][c] for c in scenario.classes
        },
        "basis_probability_z": source["basis_probability_z"],
        "wavelength_nm": source.get("wavelength_nm"),
        "seeds": {"simulation": scenario.seed},
        "formats": {"qrec": 1, "qdet": 1, "pattern_source": 1},
        "satellite_products": {
            "patterns": PATTERN_LOG_NAME if pattern_mode == "log" else PATTERN_SOURCE_NAME,
            "tdc": "tdc.qrec",
        },
        "tdc_channels": {"0": "PPS", "1": "SYNC"},
        "sync": {
            "rate_hz": float(profile["sync"]["rate_hz"]),
            "slots_per_pulse": slots_per_sync,
            "first_pulse_slot": 0,
            "satellite_tdc_channel": TDC_CHANNEL_SYNC,
            "ground_file": "ground/sync.qdet",
            "ground_channel": GROUND_CHANNEL_SYNC,
        },
        "pps": {
            "satellite_tdc_channel": TDC_CHANNEL_PPS,
            "ground_file": "ground/pps.qdet",
            "ground_channel": GROUND_CHANNEL_PPS,
            "marks": "whole UTC (GPS) seconds",
        },
        "receiver": {
            "channels": {str(k): v for k, v in CHANNEL_NAMES.items()},
            "dead_time_ps": int(round(det["dead_time_ns"] * 1000)),
            "jitter_ps_rms": det["jitter_ps_rms"],
            "coincidence_window_ps": profile["protocol"]["coincidence_window_ps"],
        },
        "orbit": geometry.source,
        "predicted_geometry": geometry.table(profile["orbit"]["prediction_along_track_error_s"]),
        "simulator": {"version": SIMULATOR_VERSION, "geometry": geometry.summary()},
    }


# ---------------------------------------------------------------- truth


def truth_summary(scenario: Scenario, photons: PhotonEvents, tags, window) -> dict:
    geometry = scenario.geometry
    channel = scenario.channel
    link = channel.link
    pointing_factor = link.mean_pointing_efficiency(
        scenario.profile["link"]["pointing_jitter_urad_rms_per_axis"],
        scenario.profile["link"]["pointing_bias_urad"],
    )
    events = geometry.events
    loss = {}
    for name, t in events.items():
        r = float(geometry.range_at(t))
        loss[name] = {
            "t_s": round(t, 3),
            "range_km": round(r, 2),
            "elevation_deg": round(float(geometry.elevation_at(t)), 3),
            "link_loss_db": round(
                float(link.link_loss_db(r, geometry.elevation_at(t), 1.0, pointing_factor)),
                3,
            ),
        }
    stats = detection_statistics(scenario.classes, tags)
    return {
        "simulator_version": SIMULATOR_VERSION,
        "seed": scenario.seed,
        "pattern_seed": scenario.pattern.seed,
        "pattern_secret": scenario.pattern_secret.hex(),
        "slot_count": scenario.slot_count,
        "clocks": {
            "satellite": scenario.slots.clock.to_json(),
            "ground": scenario.ground_clock.to_json(),
            "first_slot_satellite_ps": scenario.slots.first_slot_ps,
        },
        "recording_window_s": [round(window[0], 9), round(window[1], 9)],
        "geometry": geometry.summary(),
        "events": loss,
        "pointing_rms_urad": round(channel.pointing.rms_urad(), 4),
        "candidates_drawn": photons.candidates,
        "photon_clicks_before_dead_time": int(photons.slot.size),
        "lost_to_dead_time": int(tags.lost_to_dead_time),
        "detections": int(tags.time_ps.size),
        "detections_by_kind": {
            name: int(np.count_nonzero(tags.kind == kind))
            for name, kind in (("photon", 0), ("noise", 1), ("afterpulse", 2))
        },
        "statistics": stats,
        # s_{B,1} of the decoy-state analysis: sifted events from single-photon pulses,
        # all intensities together (tag level: before windowing and squashing).
        "single_photon_sifted": {
            basis: sum(v["single_photon_sifted"] for v in stats[basis].values())
            for basis in ("Z", "X")
        },
        "single_photon_errors": {
            basis: sum(v["single_photon_errors"] for v in stats[basis].values())
            for basis in ("Z", "X")
        },
    }


def detection_statistics(classes: list[str], tags, window_ps: float | None = None) -> dict:
    """Truth-side tallies of photon detections: per sent intensity and basis, the clicks
    in Bob's matching basis (sifted) and the errors among them, and the same restricted
    to single-photon emissions (what decoy-state analysis bounds)."""
    from host.protocol.symbols import decode_symbols

    photon = tags.kind == KIND_PHOTON
    basis_x, bit, intensity = decode_symbols(tags.symbol[photon].astype(np.uint8))
    bob_x = tags.channel[photon] // 2
    bob_bit = tags.channel[photon] % 2
    single = tags.photons[photon] == 1
    sifted = bob_x == basis_x
    error = sifted & (bob_bit != bit)
    out = {}
    for k, name in enumerate(classes):
        for b, basis in ((0, "Z"), (1, "X")):
            sel = (intensity == k) & (basis_x == b)
            out.setdefault(basis, {})[name] = {
                "clicks": int(np.count_nonzero(sel)),
                "sifted": int(np.count_nonzero(sel & sifted)),
                "errors": int(np.count_nonzero(sel & error)),
                "single_photon_sifted": int(np.count_nonzero(sel & sifted & single)),
                "single_photon_errors": int(np.count_nonzero(sel & error & single)),
            }
    return out


def expected_photon_clicks(scenario: Scenario, step_s: float = 1e-3) -> dict:
    """Analytical expectation of photon clicks (no noise, no dead time) from the link
    model: sum over time steps of slots * p_k * p_(basis,bit) * sum_j (1 - exp(-mu_k eta
    q_j)), using the realised pointing and the mapping's realised probabilities. Returns
    {basis_sent: {class: {"Z": clicks in H/V, "X": clicks in D/A}}}."""
    slots = scenario.slots
    t_end = float(slots.true_time_s(scenario.slot_count))
    edges = np.arange(0.0, t_end + step_s, step_s)
    edges[-1] = t_end
    mid = 0.5 * (edges[1:] + edges[:-1])
    slots_per_step = np.diff(edges) * scenario.slot_rate_hz * (1 + slots.clock.drift)
    eta = scenario.channel.efficiency(mid)
    p_z, p_class = scenario.mapping.realised_probabilities()
    receiver = scenario.channel.receiver
    out: dict = {}
    for b, basis in ((0, "Z"), (1, "X")):
        p_basis = p_z if b == 0 else 1 - p_z
        for k, name in enumerate(scenario.classes):
            mu = scenario.channel.intensities_mu[k]
            totals = {"Z": 0.0, "X": 0.0}
            for bit in (0, 1):
                q = receiver.channel_fractions(np.array([b]), np.array([bit]))[0]
                for j in range(4):
                    clicks = slots_per_step * -np.expm1(-mu * eta * q[j])
                    totals["Z" if j < 2 else "X"] += float(
                        clicks.sum() * p_class[k] * p_basis * 0.5
                    )
            out.setdefault(basis, {})[name] = totals
    return out
