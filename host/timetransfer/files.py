"""The time-transfer files of a pass directory: their one writer and one reader.

    PASS_DIR/timetransfer.json          scenario: profile, predicted orbit, station,
                                        calibrated delays, ground clock epoch
    PASS_DIR/satellite/tt_uplink_rx.npz     satellite tags of received up photons
    PASS_DIR/satellite/tt_downlink_tx.npz   satellite tags of emitted down photons
    PASS_DIR/ground/tt_uplink_pattern.json  the ground transmitter's pattern source (its
                                            key: 0600, never sent), its slot clock in
                                            timetransfer.json (uplink_slot_clock)
    PASS_DIR/ground/tt_downlink_rx.npz      ground tags of received down photons
    PASS_DIR/truth/tt_uplink_tx.npz         which ground pulses were detected on board (the
                                            simulation's truth: no endpoint reads it)
    PASS_DIR/truth/tt_truth.npz             true offset (satellite minus ground clock)

Each event file holds `tag_ps` (int64 picoseconds of that side's clock), `basis` and
`bit` (uint8) of every detected photon (the ground's downlink file also `slot`, int64,
when the pass came with its QKD detections), both bases: sifting is done by the two
endpoints over the classical link (host/timetransfer/endpoints.py), never from these files
together. The ground's uplink record is its transmitter (pattern and slot clock), as a
real station knows it: the satellite finds the pulse of each detection itself (the
uplink's time synchronisation); truth/tt_uplink_tx.npz, index for index with the
satellite's record, is only for tests. Index i of a tx file and index i of the matching
rx file are the same photon: the index stands for the slot identification the downlink's
time synchronisation gives
(host/distil/timesync.py); emission tags are slot epochs, public once sifting names the
slot.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from host.distil.durable import write_atomic
from host.errors import BadInput
from host.formats.patterns import KeyedPatternSource, read_pattern_source, write_pattern_source

FORMAT = "qkdsat-timetransfer/1"
EVENT_FILES = {
    "uplink_tx": "truth/tt_uplink_tx.npz",
    "uplink_rx": "satellite/tt_uplink_rx.npz",
    "downlink_tx": "satellite/tt_downlink_tx.npz",
    "downlink_rx": "ground/tt_downlink_rx.npz",
}
SCENARIO_FILE = "timetransfer.json"
TRUTH_FILE = "truth/tt_truth.npz"
UPLINK_PATTERN_FILE = "ground/tt_uplink_pattern.json"


def write_pass(pass_dir: Path, scenario: dict, events: dict, truth: dict | None,
               uplink_pattern: KeyedPatternSource | None = None) -> None:  # fmt: skip
    """`uplink_pattern`: the ground transmitter's pattern source (its slot clock goes in
    the scenario's uplink_slot_clock)."""
    pass_dir = Path(pass_dir)
    if uplink_pattern is not None:
        (pass_dir / "ground").mkdir(parents=True, exist_ok=True)
        write_pattern_source(pass_dir / UPLINK_PATTERN_FILE, uplink_pattern)
    for sub in ("satellite", "ground", "truth"):
        (pass_dir / sub).mkdir(parents=True, exist_ok=True)
    for key, relative in EVENT_FILES.items():
        if key not in events:  # a side whose record is elsewhere (a mission's satellite)
            continue
        tag_ps, basis, bit = events[key][:3]
        extra = {}
        if len(events[key]) > 3:  # the ground's slot of each downlink detection
            extra["slot"] = np.asarray(events[key][3], dtype=np.int64)
        buffer = io.BytesIO()
        np.savez(
            buffer,
            tag_ps=np.asarray(tag_ps, dtype=np.int64),
            basis=np.asarray(basis, dtype=np.uint8),
            bit=np.asarray(bit, dtype=np.uint8),
            **extra,
        )
        # 0600: the bits of the downlink emissions are the QKD pass's raw key (Alice's
        # symbols), the rest is each side's own record, as the pattern log is
        write_atomic(pass_dir / relative, buffer.getvalue(), 0o600)
    if truth is not None:
        np.savez(pass_dir / TRUTH_FILE, **truth)
    scenario = dict(scenario, format=FORMAT)
    (pass_dir / SCENARIO_FILE).write_text(json.dumps(scenario, indent=1) + "\n")


def read_scenario(pass_dir: Path) -> dict:
    path = Path(pass_dir) / SCENARIO_FILE
    if not Path(pass_dir).is_dir():
        raise BadInput(f"{pass_dir}: not a directory")
    if not path.is_file():
        raise BadInput(f"{path}: missing (no two-way time-transfer data in this pass)")
    try:
        scenario = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadInput(f"{path}: not JSON ({error})") from None
    if scenario.get("format") != FORMAT:
        raise BadInput(f"{path}: format {scenario.get('format')!r}, expected {FORMAT!r}")
    for field in ("orbit", "station", "delays_ps", "ground_clock_epoch_ps", "wavelengths_nm"):
        if field not in scenario:
            raise BadInput(f"{path}: field {field!r} missing")
    orbit_fields = ("altitude_km", "inclination_deg", "cross_track_deg", "t_reference_s")
    for field in orbit_fields + ("range_sigma_mm", "range_rate_sigma_mm_s"):
        if not isinstance(scenario["orbit"].get(field), (int, float)):
            raise BadInput(f"{path}: orbit.{field} missing or not a number")
    # the uplink's synchronisation: the payload's coarse time (its first anchor's search)
    # and the ground transmitter's intensity classes (what it correlates with)
    coarse = scenario.get("satellite_coarse_time")
    if not isinstance(coarse, dict):
        raise BadInput(f"{path}: field 'satellite_coarse_time' missing")
    for field in ("satellite_reference_ps", "offset_ps", "rate", "half_width_ps"):
        value = coarse.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BadInput(f"{path}: satellite_coarse_time.{field} missing or not a number")
    if not 0 < coarse["half_width_ps"] <= 1e9:
        raise BadInput(f"{path}: satellite_coarse_time.half_width_ps not in (0, 1 ms]")
    intensities = scenario.get("uplink_intensities")
    if (
        not isinstance(intensities, dict)
        or not 1 <= len(intensities) <= 4
        or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1e3
            for v in intensities.values()
        )
    ):
        raise BadInput(f"{path}: uplink_intensities missing or not 1-4 mean photon numbers")
    return scenario


SATELLITE_FILES = ("uplink_rx", "downlink_tx")  # what the payload recorded
GROUND_FILES = ("downlink_rx",)  # what the ground station recorded (and its transmitter)


def read_ground_records(pass_dir: Path, scenario: dict) -> dict:
    """The ground endpoint's records: its downlink detections and its uplink transmitter."""
    events = read_events(pass_dir, GROUND_FILES)
    events["uplink_transmitter"] = read_uplink_transmitter(pass_dir, scenario)
    return events


def read_uplink_transmitter(pass_dir: Path, scenario: dict) -> dict:
    """The ground transmitter's own record: {"pattern": its pattern source (symbols of any
    slot), "slot_clock": timetransfer.json's uplink_slot_clock}; BadInput naming the
    file or field."""
    path = Path(pass_dir) / UPLINK_PATTERN_FILE
    if not path.is_file():
        raise BadInput(f"{path}: missing (the ground transmitter's uplink pattern)")
    pattern = read_pattern_source(path)
    clock = scenario.get("uplink_slot_clock")
    where = f"{Path(pass_dir) / SCENARIO_FILE}: uplink_slot_clock"
    if not isinstance(clock, dict):
        raise BadInput(f"{where} missing")
    for field in ("first_epoch_ps", "period_ps", "slot_count"):
        value = clock.get(field)
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadInput(f"{where}.{field} missing or not an integer")
    if clock["period_ps"] <= 0 or clock["slot_count"] != pattern.slot_count:
        raise BadInput(f"{where}: period or slot count does not fit {path.name}")
    # the slot clock numbers the slots from 0 (first_epoch_ps): a source whose range
    # starts elsewhere lacks the symbols of slots the satellite may name
    if pattern.first_slot != 0:
        raise BadInput(f"{path}: first_slot {pattern.first_slot}: the uplink slot clock's is 0")
    if not pattern.intensities:
        raise BadInput(f"{path}: intensities missing (the uplink's sync needs them)")
    return {"pattern": pattern, "slot_clock": clock}


def read_events(pass_dir: Path, keys=tuple(EVENT_FILES)) -> dict:
    """{key: (tag_ps, basis, bit)} of the files `keys` (one side's: SATELLITE_FILES or
    GROUND_FILES); BadInput naming the file that is missing or wrong."""
    events = {}
    for key in keys:
        relative = EVENT_FILES[key]
        path = Path(pass_dir) / relative
        if not path.is_file():
            raise BadInput(f"{path}: missing ({key.replace('_', ' ')} time tags)")
        try:
            with np.load(path) as data:
                tag_ps, basis, bit = data["tag_ps"], data["basis"], data["bit"]
        except (OSError, ValueError, KeyError) as error:
            raise BadInput(
                f"{path}: not a time-tag file with tag_ps/basis/bit ({error})"
            ) from None
        if tag_ps.dtype != np.int64 or not (tag_ps.shape == basis.shape == bit.shape):
            raise BadInput(f"{path}: tag_ps must be int64 with basis and bit of equal length")
        events[key] = (tag_ps, basis, bit)
    # the uplink is paired by its time synchronisation (endpoints.sift_uplink_by_epoch):
    # a satellite record with events lost or added is a real pass's, not bad input
    for direction in ("downlink",):
        if f"{direction}_tx" not in events or f"{direction}_rx" not in events:
            continue
        tx, rx = events[f"{direction}_tx"][0], events[f"{direction}_rx"][0]
        if tx.size != rx.size:
            raise BadInput(
                f"{pass_dir}: {direction} has {tx.size} emitted and {rx.size} received "
                "events; the lists must be matched one to one"
            )
    return events


def read_downlink_slots(pass_dir: Path) -> np.ndarray | None:
    """The slot of each downlink detection (ground/tt_downlink_rx.npz `slot`, what the
    downlink's time synchronisation identified), or None when the file has none."""
    path = Path(pass_dir) / EVENT_FILES["downlink_rx"]
    with np.load(path) as data:
        if "slot" not in data.files:
            return None
        slots, tags = data["slot"], data["tag_ps"]
    if slots.dtype != np.int64 or slots.shape != tags.shape:
        raise BadInput(f"{path}: slot must be int64, one per detection")
    return slots


def read_truth(pass_dir: Path) -> dict | None:
    path = Path(pass_dir) / TRUTH_FILE
    if not path.is_file():
        return None
    with np.load(path) as data:
        return {name: data[name] for name in data.files}
