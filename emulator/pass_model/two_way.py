"""Two-way light-time physics of a LEO pass, in an Earth-centred inertial (ECI) frame.

The one-way `PassGeometry` of geometry.py gives range, elevation and range rate over a
non-rotating Earth: enough for the downlink's slot assignment, not for picosecond time
transfer. Here the satellite flies a circular orbit and the station sits on the rotating
Earth, both as ECI position and velocity, and every photon's flight time is the solution
of the light-time equation with both ends moving:

    up   (ground emits at t1, satellite receives at t2): c (t2 - t1) = |r_sat(t2) - r_gnd(t1)|
    down (satellite emits at t3, ground receives at t4): c (t4 - t3) = |r_gnd(t4) - r_sat(t3)|

(plus the Shapiro delay, a few ps, and the troposphere's group delay at each wavelength).
Solving in the inertial frame contains the Sagnac term (the station moves ~0.4 km/s
during the ~3 ms flight) and the satellite's motion during the flight (up to 7 km/s, so
an up and a down photon in flight at the same moment see light times that differ by
tens of ns). `sagnac_s` gives the Sagnac part alone, for the report.

Time: "true time" t is ground proper time (a clock on the geoid, which the station's
reference realises); the light time is coordinate time of the inertial frame, which
differs from ground proper time by 7e-10 fractional: 2 fs over a 3 ms flight, neglected.
The satellite clock's relativistic rate against ground proper time is

    y_rel = [(|v_gnd|^2 - |v_sat|^2) / 2 + mu / |r_gnd| - mu / |r_sat|] / c^2

(velocity dilation about -3.2e-10, gravitational blueshift about +5e-11 at 500 km; a
spherical Earth: J2 terms are ~1e-12 periodic and are left out, said so in the docs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from emulator.pass_model.geometry import (
    EARTH_MU_KM3_S2,
    EARTH_RADIUS_KM,
    SPEED_OF_LIGHT_KM_S,
    PassGeometry,
)

EARTH_ROTATION_RAD_S = 7.2921150e-5
SHAPIRO_S = 2.0 * EARTH_MU_KM3_S2 / SPEED_OF_LIGHT_KM_S**3  # 2 GM / c^3, seconds
LIGHT_TIME_ITERATIONS = 4  # each iteration gains a factor v/c ~ 2.5e-5


@dataclass(frozen=True)
class InertialPass:
    """A circular orbit (ascending node at ECI longitude 0) and a station on a spherical,
    rotating Earth. t is seconds after the pass's window start; `t_reference_s` is the
    window start on the orbit's own time axis (0 = satellite at the station's latitude)."""

    altitude_km: float
    inclination_deg: float
    station_lat_deg: float
    station_height_km: float
    cross_track_deg: float  # station east of the ground track at the reference epoch
    t_reference_s: float = 0.0
    altitude_error_km: float = 0.0  # for an orbit *as predicted*: radial error
    along_track_error_s: float = 0.0  # and along-track timing error

    @property
    def orbit_radius_km(self) -> float:
        return EARTH_RADIUS_KM + self.altitude_km + self.altitude_error_km

    @property
    def mean_motion_rad_s(self) -> float:
        return math.sqrt(EARTH_MU_KM3_S2 / (EARTH_RADIUS_KM + self.altitude_km) ** 3)

    def _u0_and_station_lon(self) -> tuple[float, float]:
        inclination = math.radians(self.inclination_deg)
        latitude = math.radians(self.station_lat_deg)
        u0 = math.asin(math.sin(latitude) / math.sin(inclination))
        right_ascension = math.atan2(math.cos(inclination) * math.sin(u0), math.cos(u0))
        return u0, right_ascension + math.radians(self.cross_track_deg)

    def satellite_state(self, t_s) -> tuple[np.ndarray, np.ndarray]:
        """ECI position (km) and velocity (km/s), arrays of shape (N, 3)."""
        t = np.asarray(t_s, dtype=np.float64) + self.t_reference_s + self.along_track_error_s
        u0, _ = self._u0_and_station_lon()
        n = self.mean_motion_rad_s
        a = self.orbit_radius_km
        u = u0 + n * t
        cos_u, sin_u = np.cos(u), np.sin(u)
        cos_i, sin_i = (
            math.cos(math.radians(self.inclination_deg)),
            math.sin(math.radians(self.inclination_deg)),
        )
        position = a * np.stack([cos_u, sin_u * cos_i, sin_u * sin_i], axis=-1)
        speed = a * n
        velocity = speed * np.stack([-sin_u, cos_u * cos_i, cos_u * sin_i], axis=-1)
        return position, velocity

    def station_state(self, t_s) -> tuple[np.ndarray, np.ndarray]:
        t = np.asarray(t_s, dtype=np.float64) + self.t_reference_s
        _, lon0 = self._u0_and_station_lon()
        radius = EARTH_RADIUS_KM + self.station_height_km
        latitude = math.radians(self.station_lat_deg)
        lon = lon0 + EARTH_ROTATION_RAD_S * t
        position = radius * np.stack(
            [math.cos(latitude) * np.cos(lon), math.cos(latitude) * np.sin(lon)]
            + [np.full_like(lon, math.sin(latitude))],
            axis=-1,
        )
        velocity = EARTH_ROTATION_RAD_S * np.stack(
            [-position[..., 1], position[..., 0], np.zeros_like(lon)], axis=-1
        )
        return position, velocity

    def elevation_deg(self, t_s) -> np.ndarray:
        sat, _ = self.satellite_state(t_s)
        gnd, _ = self.station_state(t_s)
        line = sat - gnd
        up = gnd / np.linalg.norm(gnd, axis=-1, keepdims=True)
        sine = np.sum(line * up, axis=-1) / np.linalg.norm(line, axis=-1)
        return np.degrees(np.arcsin(sine))

    def range_km(self, t_s) -> np.ndarray:
        sat, _ = self.satellite_state(t_s)
        gnd, _ = self.station_state(t_s)
        return np.linalg.norm(sat - gnd, axis=-1)

    # ------------------------------------------------------------ light time

    def _flight_s(self, a_km: np.ndarray, b_km: np.ndarray) -> np.ndarray:
        separation = np.linalg.norm(b_km - a_km, axis=-1)
        ra, rb = np.linalg.norm(a_km, axis=-1), np.linalg.norm(b_km, axis=-1)
        shapiro = SHAPIRO_S * np.log((ra + rb + separation) / (ra + rb - separation))
        return separation / SPEED_OF_LIGHT_KM_S + shapiro

    def _light_time_s(self, t_s, emitter_state, receiver_state, at_emission: bool):
        """Flight time (vacuum + Shapiro) of a photon from the emitter to the receiver,
        given its emission time (at_emission) or its reception time `t_s`: fixed-point
        iteration from the range, the other end taken where it is when the photon leaves
        or arrives there."""
        t = np.asarray(t_s, dtype=np.float64)
        known_state, other_state = (
            (emitter_state, receiver_state) if at_emission else (receiver_state, emitter_state)
        )
        known, _ = known_state(t)
        tau = self.range_km(t) / SPEED_OF_LIGHT_KM_S
        for _ in range(LIGHT_TIME_ITERATIONS):
            other, _ = other_state(t + tau if at_emission else t - tau)
            tau = self._flight_s(known, other) if at_emission else self._flight_s(other, known)
        return tau

    def up_light_time_s(self, t_emit_s) -> np.ndarray:
        """Flight time of a photon the station emits at `t_emit_s` (vacuum + Shapiro)."""
        return self._light_time_s(t_emit_s, self.station_state, self.satellite_state, True)

    def down_light_time_s(self, t_emit_s) -> np.ndarray:
        """Flight time of a photon the satellite emits at `t_emit_s`."""
        return self._light_time_s(t_emit_s, self.satellite_state, self.station_state, True)

    def down_light_time_by_reception_s(self, t_receive_s) -> np.ndarray:
        """Flight time of a downlink photon the station receives at `t_receive_s`."""
        return self._light_time_s(t_receive_s, self.satellite_state, self.station_state, False)

    def sagnac_s(self, t_s) -> np.ndarray:
        """Sagnac term of an up photon at `t_s`: omega_E (r_gnd x r_sat)_z / c^2; a down
        photon gets the opposite sign, so the two-way offset sees it once, whole."""
        sat, _ = self.satellite_state(t_s)
        gnd, _ = self.station_state(t_s)
        cross_z = gnd[..., 0] * sat[..., 1] - gnd[..., 1] * sat[..., 0]
        return EARTH_ROTATION_RAD_S * cross_z / SPEED_OF_LIGHT_KM_S**2

    # ------------------------------------------------------------ relativity

    def relativistic_rate(self, t_s) -> dict:
        """Fractional rate of a satellite clock against ground proper time, by part."""
        sat, v_sat = self.satellite_state(t_s)
        gnd, v_gnd = self.station_state(t_s)
        c2 = SPEED_OF_LIGHT_KM_S**2
        velocity = (np.sum(v_gnd**2, axis=-1) - np.sum(v_sat**2, axis=-1)) / (2.0 * c2)
        gravity = (
            EARTH_MU_KM3_S2 / np.linalg.norm(gnd, axis=-1)
            - EARTH_MU_KM3_S2 / np.linalg.norm(sat, axis=-1)
        ) / c2
        return {"velocity": velocity, "gravity": gravity, "total": velocity + gravity}

    def relativistic_offset_s(self, t_s, step_s: float = 1.0) -> np.ndarray:
        """Time the satellite clock gains against ground proper time from t = 0 to t_s."""
        t = np.asarray(t_s, dtype=np.float64)
        end = max(float(np.max(t)) if t.size else 0.0, 0.0) + step_s
        grid = np.arange(0.0, end + step_s, step_s)
        rate = self.relativistic_rate(grid)["total"]
        accumulated = np.concatenate([[0.0], np.cumsum(0.5 * (rate[1:] + rate[:-1]) * step_s)])
        return np.interp(t, grid, accumulated)


def pass_window(orbit: InertialPass, elevation_mask_deg: float, search_s: float = 900.0):
    """(start, end) in the orbit's own time (s) around the reference epoch where the
    elevation is above the mask; None when the station never sees the satellite."""
    t = np.arange(-search_s, search_s, 0.5)
    above = orbit.elevation_deg(t) > elevation_mask_deg
    if not above.any():
        return None
    indices = np.flatnonzero(above)
    return float(t[indices[0]]), float(t[indices[-1]])


# ------------------------------------------------------------ troposphere


def group_refractivity(wavelength_nm: float) -> float:
    """Group refractivity (N units) of standard dry air (Ciddor-based formula of the ILRS /
    Mendes & Pavlis 2004 dispersion): N_g = 287.6155 + 4.88660/lambda^2 + 0.06800/lambda^4,
    lambda in micrometres."""
    wavelength_um = wavelength_nm * 1e-3
    return 287.6155 + 4.88660 / wavelength_um**2 + 0.06800 / wavelength_um**4


def troposphere_delay_s(
    elevation_deg, wavelength_nm: float, station_height_km: float
) -> np.ndarray:
    """One-way tropospheric group delay: a zenith delay of 2.40 m at 532 nm and sea-level
    pressure (Mendes & Pavlis 2004 magnitude), scaled by the group refractivity at the
    wavelength and by pressure (scale height 8.4 km), mapped with 1/sin(elevation). The
    plain mapping is within ~1 % above 20 deg; a wavelength difference between the up and
    down photons leaves a non-reciprocal part of ~1.6 % of the delay (850 vs 1550 nm)."""
    zenith_m = (
        2.40
        * math.exp(-station_height_km / 8.4)
        * group_refractivity(wavelength_nm)
        / group_refractivity(532.0)
    )
    sine = np.sin(np.radians(np.asarray(elevation_deg, dtype=np.float64)))
    return zenith_m / np.maximum(sine, 0.05) / (SPEED_OF_LIGHT_KM_S * 1e3)


# ------------------------------------------------------------ the QKD pass on this orbit


@dataclass
class InertialPassGeometry(PassGeometry):
    """The one-way `PassGeometry` of the QKD pass generator, tabulated from an
    `InertialPass` (range, elevation, range rate: the link budget), whose downlink delay
    is the exact one of this module instead of range / c: the satellite's transmitter
    delay, the light-time solution (Sagnac and Shapiro included), the troposphere at the
    downlink wavelength and the station's receiver delay. A pass simulated on it
    (`qkdsat simulate --two-way`) has downlink detections that are the time transfer's
    downlink events to the picosecond."""

    orbit: InertialPass | None = None
    wavelength_nm: float = 850.0
    equipment_delay_s_tx: float = 0.0  # satellite: emission tag to photon leaving
    equipment_delay_s_rx: float = 0.0  # station: photon arriving to detection tag

    def downlink_delay_s(self, t_emit_s) -> np.ndarray:
        t = np.asarray(t_emit_s, dtype=np.float64)
        leave = t + self.equipment_delay_s_tx
        flight = self.orbit.down_light_time_s(leave)
        flight = flight + troposphere_delay_s(
            self.orbit.elevation_deg(leave), self.wavelength_nm, self.orbit.station_height_km
        )
        return self.equipment_delay_s_tx + flight + self.equipment_delay_s_rx


def inertial_pass_geometry(
    orbit: InertialPass,
    duration_s: float,
    utc_start: datetime,
    source: dict,
    wavelength_nm: float,
    satellite_tx_delay_s: float,
    ground_rx_delay_s: float,
    step_s: float = 1.0,
) -> InertialPassGeometry:
    """The pass of `orbit` from its t = 0 for `duration_s`, tabulated every `step_s`
    (cubic splines between: the range is kept to well below a millimetre, which is all
    the link budget needs; the light time is never interpolated)."""
    count = int(math.ceil(duration_s / step_s)) + 1
    t = np.linspace(0.0, duration_s, count)
    half_ms = 5e-4
    range_rate = (orbit.range_km(t + half_ms) - orbit.range_km(t - half_ms)) / (2 * half_ms)
    geometry = InertialPassGeometry(
        utc_start, duration_s, t, orbit.range_km(t), orbit.elevation_deg(t), range_rate,
        source, orbit=orbit, wavelength_nm=wavelength_nm,
        equipment_delay_s_tx=satellite_tx_delay_s, equipment_delay_s_rx=ground_rx_delay_s,
    )  # fmt: skip
    fine = np.linspace(0.0, duration_s, 20 * count)
    geometry.events = {"culmination": float(fine[np.argmin(orbit.range_km(fine))])}
    return geometry
