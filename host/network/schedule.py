"""Pass schedule of one satellite over the network's stations (docs/network.md).

Every complete pass above a station's mask (its elevation mask, raised by the local
horizon profile) in the window is found from the TLE with sgp4 (skyfield), independently
of skyfield's `find_events` (the tests compare the two): elevation sampled every
COARSE_STEP_S, crossings refined by bisection. A pass is QKD-capable when the station is
dark (the sun below SUN_MAX_ELEVATION_DEG at the station for the whole pass: the
background of a night sky, not the satellite's eclipse, is what QKD needs; whether the
satellite is sunlit is reported only) and it lasts at least MIN_QKD_DURATION_S.
One transmitter serves one station at a time: overlapping QKD-capable passes are resolved
by `resolve_conflicts`.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from emulator.pass_model.geometry import parse_tle, with_iau2000b_nutation
from host.errors import BadInput
from host.network.stations import Station

SUN_MAX_ELEVATION_DEG = -12.0  # nautical dusk: sky background near its night level
MIN_QKD_DURATION_S = 60.0  # shorter passes do not collect enough detections for a key
HANDOVER_S = 60.0  # slew the satellite's body and reacquire the next station's beacon
COARSE_STEP_S = 10.0  # a pass above the mask for >= 2 steps is always found
SUN_STEP_S = 30.0
SCHEDULE_FORMAT_VERSION = 1

# status of a pass in the schedule
SCHEDULED, CONFLICT, DAYLIGHT, SHORT = "scheduled", "conflict", "daylight", "short"


def _ephemeris():
    """de421 from the pinned skyfield-data package: never downloaded at run time."""
    import skyfield_data
    from skyfield.api import Loader

    data_dir = Path(skyfield_data.__file__).parent / "data"
    return Loader(str(data_dir), verbose=False)("de421.bsp")


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class _Sky:
    """Satellite and sun as seen from one station, as functions of seconds from start."""

    def __init__(self, tle_text: str, station: Station, start: datetime, origin: str):
        from skyfield.api import EarthSatellite, load, wgs84

        self.name, line1, line2 = parse_tle(tle_text, origin)
        self.ts = load.timescale(builtin=True)
        self.satellite = EarthSatellite(line1, line2, self.name, self.ts)
        self.topos = wgs84.latlon(station.lat_deg, station.lon_deg, elevation_m=station.alt_m)
        self.relative = self.satellite - self.topos
        self.station = station
        self.start = start
        self._t0 = self.ts.from_datetime(start)

    def times(self, seconds):
        return with_iau2000b_nutation(self._t0 + np.asarray(seconds, dtype=float) / 86400.0)

    def alt_az_deg(self, seconds):
        alt, az, _ = self.relative.at(self.times(seconds)).altaz()
        return alt.degrees, az.degrees

    def margin_deg(self, seconds):
        """Elevation above the mask (negative below it)."""
        alt, az = self.alt_az_deg(seconds)
        return alt - self.station.mask_deg(az)


def _refine(function, low, high, iterations: int = 30):
    """Vectorised bisection of sign changes of `function` in [low, high] (arrays)."""
    low, high = np.array(low, dtype=float), np.array(high, dtype=float)
    if low.size == 0:
        return low
    low_sign = function(low) > 0
    for _ in range(iterations):
        middle = 0.5 * (low + high)
        same = (function(middle) > 0) == low_sign
        low = np.where(same, middle, low)
        high = np.where(same, high, middle)
    return 0.5 * (low + high)


def _culmination(sky: _Sky, rise, set_, iterations: int = 40):
    """Time of maximum elevation in each [rise, set] by vectorised golden-section search."""
    low, high = np.array(rise, dtype=float), np.array(set_, dtype=float)
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    for _ in range(iterations):
        a = high - ratio * (high - low)
        b = low + ratio * (high - low)
        upper = sky.alt_az_deg(a)[0] < sky.alt_az_deg(b)[0]
        low = np.where(upper, a, low)
        high = np.where(upper, high, b)
    return 0.5 * (low + high)


def station_passes(
    tle_text: str,
    station: Station,
    start: datetime,
    days: float,
    eph=None,
    origin: str = "TLE",
    sun_max_elevation_deg: float = SUN_MAX_ELEVATION_DEG,
    min_duration_s: float = MIN_QKD_DURATION_S,
) -> list[dict]:
    """Every complete pass over `station` in [start, start + days], QKD-capable or not
    (status DAYLIGHT or SHORT otherwise; the capable ones SCHEDULED until conflicts are
    resolved). BadInput when the satellite never rises above the station's mask."""
    eph = eph if eph is not None else _ephemeris()
    sky = _Sky(tle_text, station, start, origin)
    window_s = days * 86400.0
    coarse = np.arange(0.0, window_s + COARSE_STEP_S / 2, COARSE_STEP_S)
    margin = sky.margin_deg(coarse)
    if not np.all(np.isfinite(margin)):
        raise BadInput(f"{origin}: sgp4 could not propagate the TLE over the window")
    above = margin > 0
    rise_index = np.flatnonzero(~above[:-1] & above[1:])
    set_index = np.flatnonzero(above[:-1] & ~above[1:])
    # Only complete passes: a set before the first rise, or a rise without a set, is cut
    # by the window's edges.
    set_index = set_index[set_index > (rise_index[0] if rise_index.size else len(coarse))]
    rise_index = rise_index[: set_index.size]
    if rise_index.size == 0:
        raise BadInput(
            f"{origin}: {sky.name} never rises above station {station.name}'s mask "
            f"({station.elevation_mask_deg:g} deg) in the {days:g} days after {_iso(start)}"
        )
    rise = _refine(sky.margin_deg, coarse[rise_index], coarse[rise_index + 1])
    set_ = _refine(sky.margin_deg, coarse[set_index], coarse[set_index + 1])
    culmination = _culmination(sky, rise, set_)
    max_elevation = sky.alt_az_deg(culmination)[0]
    sun_max = _sun_max_elevation(sky, eph, rise, set_)
    sunlit = sky.satellite.at(sky.times(culmination)).is_sunlit(eph)
    passes = []
    for k in range(rise.size):
        duration_s = float(set_[k] - rise[k])
        if sun_max[k] >= sun_max_elevation_deg:
            status = DAYLIGHT
        elif duration_s < min_duration_s:
            status = SHORT
        else:
            status = SCHEDULED
        passes.append(
            {
                "station": station.name,
                "rise_s": float(rise[k]),
                "culmination_s": float(culmination[k]),
                "set_s": float(set_[k]),
                "rise_utc": _iso(start + timedelta(seconds=float(rise[k]))),
                "culmination_utc": _iso(start + timedelta(seconds=float(culmination[k]))),
                "set_utc": _iso(start + timedelta(seconds=float(set_[k]))),
                "duration_s": round(duration_s, 3),
                "max_elevation_deg": round(float(max_elevation[k]), 4),
                "sun_max_elevation_deg": round(float(sun_max[k]), 3),
                "satellite_sunlit_at_culmination": bool(sunlit[k]),
                "status": status,
            }
        )
    return passes


def _sun_max_elevation(sky: _Sky, eph, rise, set_) -> np.ndarray:
    """The sun's highest elevation at the station over each pass: sampled at the rise,
    every SUN_STEP_S and at the set (the sun moves < 0.13 deg in a step)."""
    earth, sun = eph["earth"], eph["sun"]
    samples, owner = [], []
    for k in range(len(rise)):
        points = np.append(np.arange(rise[k], set_[k], SUN_STEP_S), set_[k])
        samples.append(points)
        owner.append(np.full(points.size, k))
    samples, owner = np.concatenate(samples), np.concatenate(owner)
    alt, _, _ = (earth + sky.topos).at(sky.times(samples)).observe(sun).apparent().altaz()
    result = np.full(len(rise), -90.0)
    np.maximum.at(result, owner, alt.degrees)
    return result


def priority(candidate: dict, station: Station) -> float:
    """Expected key of a pass, up to a common factor: clear-sky probability x time above
    the mask x sin(highest elevation) (the link loss falls with range, which is shortest
    at a high culmination)."""
    return (
        station.clear_night_fraction
        * candidate["duration_s"]
        * math.sin(math.radians(candidate["max_elevation_deg"]))
    )


def resolve_conflicts(passes: list[dict], stations: dict[str, Station]) -> None:
    """One station at a time: QKD-capable passes are taken greedily by `priority`
    (ties: earlier rise, then station name); a pass whose window, widened by HANDOVER_S
    on both sides, overlaps a pass already taken becomes CONFLICT with `lost_to` naming
    the winner. Whole passes only: the losing pass is not trimmed."""
    capable = [p for p in passes if p["status"] == SCHEDULED]
    capable.sort(key=lambda p: (-priority(p, stations[p["station"]]), p["rise_s"], p["station"]))
    taken: list[dict] = []
    for candidate in capable:
        winner = next(
            (
                other
                for other in taken
                if candidate["rise_s"] - HANDOVER_S < other["set_s"]
                and other["rise_s"] < candidate["set_s"] + HANDOVER_S
            ),
            None,
        )
        if winner is None:
            taken.append(candidate)
        else:
            candidate["status"] = CONFLICT
            candidate["lost_to"] = f"{winner['station']} {winner['rise_utc']}"


def make_schedule(
    tle_text: str,
    stations: list[Station],
    start: datetime,
    days: float,
    origin: str = "TLE",
    sun_max_elevation_deg: float = SUN_MAX_ELEVATION_DEG,
    min_duration_s: float = MIN_QKD_DURATION_S,
) -> dict:
    if not 0 < days <= 366:
        raise BadInput(f"--days {days}: must be in (0, 366]")
    if start.tzinfo is None:
        raise BadInput("the schedule start must be a UTC time (with Z or +00:00)")
    name, line1, line2 = parse_tle(tle_text, origin)
    eph = _ephemeris()
    passes = []
    for station in stations:
        passes += station_passes(
            tle_text, station, start, days, eph, origin, sun_max_elevation_deg, min_duration_s
        )
    resolve_conflicts(passes, {station.name: station for station in stations})
    passes.sort(key=lambda p: (p["rise_s"], p["station"]))
    return {
        "format_version": SCHEDULE_FORMAT_VERSION,
        "satellite": {"name": name, "line1": line1, "line2": line2},
        "start_utc": _iso(start),
        "days": days,
        "stations": [station.name for station in stations],
        "policy": {
            "sun_max_elevation_deg": sun_max_elevation_deg,
            "min_duration_s": min_duration_s,
            "handover_s": HANDOVER_S,
            "conflicts": "greedy by clear_night_fraction x duration x sin(max elevation)",
        },
        "passes": passes,
    }
