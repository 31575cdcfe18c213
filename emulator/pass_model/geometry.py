"""Pass geometry: slant range, elevation and range rate of the satellite seen from a ground
station over one pass, from a TLE (skyfield/sgp4) or from a synthetic circular orbit.

Both produce a `PassGeometry`: samples every `step_s` seconds from the start of the QKD
window (t = 0 at `utc_start`), with cubic-spline interpolation for any time inside it.
The spline of range is what the light-time (propagation delay) computation uses, so it is
sampled finely enough (1 s; the range's fourth derivative makes the interpolation error
far below a millimetre).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np
from scipy.interpolate import CubicSpline
from scipy.optimize import brentq

from host.errors import BadInput

EARTH_RADIUS_KM = 6371.0
EARTH_MU_KM3_S2 = 398600.4418
SPEED_OF_LIGHT_KM_S = 299792.458
DEFAULT_STEP_S = 1.0


@dataclass
class PassGeometry:
    """Samples of one pass. Times are seconds after `utc_start` (the QKD window start)."""

    utc_start: datetime
    duration_s: float
    t_s: np.ndarray
    range_km: np.ndarray
    elevation_deg: np.ndarray
    range_rate_km_s: np.ndarray
    source: dict  # how it was made (public: TLE lines or the synthetic orbit's parameters)
    events: dict = field(default_factory=dict)  # rise/culmination/set, seconds after start
    _splines: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._splines = {
            "range_km": CubicSpline(self.t_s, self.range_km),
            "elevation_deg": CubicSpline(self.t_s, self.elevation_deg),
            "range_rate_km_s": CubicSpline(self.t_s, self.range_rate_km_s),
        }

    @property
    def utc_end(self) -> datetime:
        return self.utc_start + timedelta(seconds=self.duration_s)

    def range_at(self, t_s) -> np.ndarray:
        return self._splines["range_km"](t_s)

    def elevation_at(self, t_s) -> np.ndarray:
        return self._splines["elevation_deg"](t_s)

    def range_rate_at(self, t_s) -> np.ndarray:
        return self._splines["range_rate_km_s"](t_s)

    def downlink_delay_s(self, t_emit_s: np.ndarray) -> np.ndarray:
        """Light time of a photon emitted at `t_emit_s`: |r_sat(t_emit) - r_station| / c,
        i.e. the range at emission. The station's own motion during the ~3 ms flight (the
        Sagnac term, a few ns that vary slowly over the pass) is neglected; using the
        range at *reception* instead would be wrong by range_rate * tau (~80 ns)."""
        return self.range_at(np.asarray(t_emit_s, dtype=np.float64)) / SPEED_OF_LIGHT_KM_S

    def summary(self) -> dict:
        i_min = int(np.argmin(self.range_km))
        return {
            "utc_start": iso_utc(self.utc_start),
            "utc_end": iso_utc(self.utc_end),
            "duration_s": round(self.duration_s, 3),
            "range_km_start_min_end": [
                round(float(self.range_km[0]), 1),
                round(float(self.range_km[i_min]), 1),
                round(float(self.range_km[-1]), 1),
            ],
            "elevation_deg_start_max_end": [
                round(float(self.elevation_deg[0]), 2),
                round(float(self.elevation_deg.max()), 2),
                round(float(self.elevation_deg[-1]), 2),
            ],
        }

    def table(self, time_shift_s: float = 0.0) -> dict:
        """The geometry as a public prediction table (pass.json), optionally as predicted
        with an along-track timing error of `time_shift_s` (an aged TLE)."""
        t = self.t_s
        shifted = np.clip(t + time_shift_s, 0.0, self.duration_s)
        return {
            "t_s": [round(float(x), 3) for x in t],
            "range_km": [round(float(x), 4) for x in self.range_at(shifted)],
            "elevation_deg": [round(float(x), 4) for x in self.elevation_at(shifted)],
            "range_rate_km_s": [round(float(x), 6) for x in self.range_rate_at(shifted)],
        }


def iso_utc(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_utc(text: str, what: str = "time") -> datetime:
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise BadInput(f"{what}: {text!r} is not an ISO-8601 UTC time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


# ---------------------------------------------------------------- synthetic circular pass


def synthetic_circular_pass(
    utc_start: datetime,
    altitude_km: float,
    min_range_km: float,
    start_range_km: float,
    end_range_km: float,
    step_s: float = DEFAULT_STEP_S,
) -> PassGeometry:
    """A pass over a spherical, non-rotating Earth from a circular orbit whose ground
    track misses the station by the angle that gives `min_range_km` at culmination. The
    QKD window runs from `start_range_km` (rising) to `end_range_km` (setting).

    Range: rho^2 = Rs^2 + Re^2 - 2 Rs Re cos(beta) cos(psi), psi = omega (t - t_c);
    elevation: sin(el) = (Rs cos(gamma) - Re) / rho with cos(gamma) = cos(beta) cos(psi).
    """
    re, rs = EARTH_RADIUS_KM, EARTH_RADIUS_KM + altitude_km
    if not altitude_km < min_range_km <= min(start_range_km, end_range_km):
        raise BadInput(
            f"synthetic pass: need altitude_km ({altitude_km}) < min_range_km ({min_range_km})"
            f" <= start/end ranges ({start_range_km}, {end_range_km})"
        )
    horizon_km = math.sqrt(rs**2 - re**2)
    if max(start_range_km, end_range_km) >= horizon_km:
        raise BadInput(
            f"synthetic pass: ranges beyond the horizon range {horizon_km:.0f} km "
            f"at altitude {altitude_km} km"
        )
    omega = math.sqrt(EARTH_MU_KM3_S2 / rs**3)
    cos_beta = (rs**2 + re**2 - min_range_km**2) / (2 * rs * re)

    def psi_at_range(range_km: float) -> float:
        cos_gamma = (rs**2 + re**2 - range_km**2) / (2 * rs * re)
        return math.acos(min(1.0, cos_gamma / cos_beta))

    t_rise = -psi_at_range(start_range_km) / omega  # relative to culmination
    t_set = psi_at_range(end_range_km) / omega
    duration = t_set - t_rise
    count = int(math.ceil(duration / step_s)) + 1
    t = np.linspace(0.0, duration, count)
    psi = omega * (t + t_rise)
    cos_gamma = cos_beta * np.cos(psi)
    rho = np.sqrt(rs**2 + re**2 - 2 * rs * re * cos_gamma)
    elevation = np.degrees(np.arcsin((rs * cos_gamma - re) / rho))
    range_rate = rs * re * cos_beta * np.sin(psi) * omega / rho
    source = {
        "kind": "synthetic-circular",
        "altitude_km": altitude_km,
        "min_range_km": min_range_km,
        "start_range_km": start_range_km,
        "end_range_km": end_range_km,
        "orbit_speed_km_s": round(omega * rs, 4),
    }
    events = {"start": 0.0, "culmination": -t_rise, "end": duration}
    return PassGeometry(utc_start, duration, t, rho, elevation, range_rate, source, events)


# ---------------------------------------------------------------- TLE pass (skyfield)


def parse_tle(text: str, origin: str = "TLE") -> tuple[str, str, str]:
    """(name, line1, line2) from a 2- or 3-line TLE; BadInput naming what is wrong."""
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    if len(lines) == 3:
        name, line1, line2 = lines[0].strip(), lines[1], lines[2]
    elif len(lines) == 2:
        name, (line1, line2) = "satellite", lines
    else:
        raise BadInput(f"{origin}: {len(lines)} non-empty lines, a TLE has 2 (or 3 with a name)")
    for number, line in ((1, line1), (2, line2)):
        if len(line) != 69 or not line.startswith(f"{number} "):
            raise BadInput(
                f"{origin}: line {number} must be 69 characters starting '{number} ' "
                f"(got {len(line)} characters: {line[:20]!r}...)"
            )
        if not line[68].isdigit() or _tle_checksum(line) != int(line[68]):
            raise BadInput(f"{origin}: line {number} checksum does not match ({line[68]!r})")
    if line1[2:7] != line2[2:7]:
        raise BadInput(f"{origin}: catalog numbers differ ({line1[2:7]!r} vs {line2[2:7]!r})")
    return name, line1, line2


def _tle_checksum(line: str) -> int:
    total = sum(int(c) if c.isdigit() else (1 if c == "-" else 0) for c in line[:68])
    return total % 10


def with_iau2000b_nutation(times):
    """`times` (a skyfield Time) with its nutation from the IAU 2000B series, for searches
    that evaluate the sky hundreds of times: skyfield's default IAU 2000A sums 1,365 terms
    (~13 ms a call whatever the array's size: 0.7 s of a 0.3 s pass's simulation, 15 s of
    a 3-day campaign's schedule), 2000B 77 terms, within 1 milliarcsecond of it (~5 mm at
    1,000 km), against a TLE's kilometre. skyfield's own almanac searches set it so, and its
    Time keeps the setter for this use."""
    from skyfield.nutationlib import iau2000b_radians

    times._nutation_angles_radians = iau2000b_radians(times)
    return times


def tle_pass(
    tle_text: str,
    station: dict,
    search_start: datetime,
    elevation_mask_deg: float,
    search_hours: float = 24.0,
    step_s: float = DEFAULT_STEP_S,
    origin: str = "TLE",
) -> PassGeometry:
    """The first complete pass after `search_start` above `elevation_mask_deg`, sampled
    with sgp4 through skyfield (no ephemeris file: satellites need none). Rise and set
    are found here by root-finding on the sampled elevation, independently of skyfield's
    `find_events` (the tests compare the two)."""
    from skyfield.api import EarthSatellite, load, wgs84

    name, line1, line2 = parse_tle(tle_text, origin)
    ts = load.timescale(builtin=True)
    satellite = EarthSatellite(line1, line2, name, ts)
    topos = wgs84.latlon(station["lat_deg"], station["lon_deg"], elevation_m=station["alt_m"])
    relative = satellite - topos

    def elevation_deg(times_s: np.ndarray) -> np.ndarray:
        moments = [search_start + timedelta(seconds=float(x)) for x in np.atleast_1d(times_s)]
        alt, _, _ = relative.at(with_iau2000b_nutation(ts.from_datetimes(moments))).altaz()
        return alt.degrees

    # Coarse scan (10 s) for intervals above the mask, then refine the crossings.
    coarse_t = np.arange(0.0, search_hours * 3600.0 + 10.0, 10.0)
    coarse_el = elevation_deg(coarse_t)
    if not np.all(np.isfinite(coarse_el)):
        raise BadInput(f"{origin}: sgp4 could not propagate the TLE over the window")
    above = coarse_el > elevation_mask_deg
    rises = np.flatnonzero(~above[:-1] & above[1:])
    t_rise = t_set = None
    for index in rises:
        sets = np.flatnonzero(above[index + 1 : -1] & ~above[index + 2 :])
        if sets.size:
            set_index = index + 1 + sets[0]
            t_rise = _crossing(
                elevation_deg, coarse_t[index], coarse_t[index + 1], elevation_mask_deg
            )
            t_set = _crossing(
                elevation_deg, coarse_t[set_index], coarse_t[set_index + 1], elevation_mask_deg
            )
            break
    if t_rise is None:
        raise BadInput(
            f"{origin}: station {station.get('name', '?')} never sees {name} above "
            f"{elevation_mask_deg} deg in the {search_hours:g} h after {iso_utc(search_start)}"
        )
    utc_start = search_start + timedelta(seconds=t_rise)
    duration = t_set - t_rise
    count = int(math.ceil(duration / step_s)) + 1
    t = np.linspace(0.0, duration, count)
    moments = ts.from_datetimes([utc_start + timedelta(seconds=float(x)) for x in t])
    position = relative.at(moments)
    alt, _, distance = position.altaz()
    _, _, _, _, _, range_rate = position.frame_latlon_and_rates(topos)
    geometry = PassGeometry(
        utc_start,
        duration,
        t,
        distance.km,
        alt.degrees,
        range_rate.km_per_s,
        {"kind": "tle", "name": name, "line1": line1, "line2": line2},
    )
    culmination = brentq(lambda x: geometry.range_rate_at(x), 0.0, duration, xtol=1e-6)
    geometry.events = {"start": 0.0, "culmination": float(culmination), "end": duration}
    return geometry


def _crossing(function, t0: float, t1: float, level: float) -> float:
    return brentq(lambda x: float(function(np.array([x]))[0]) - level, t0, t1, xtol=1e-4)
