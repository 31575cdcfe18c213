"""Emulated optical plant for the tracking loop: what the firmware's sensors see and what
its actuators do, stepped in lockstep with the firmware (docs/tracking.md).

Geometry (round Earth, circular orbit): the satellite flies at `altitude_km` with orbital
speed `speed_km_s`; the station sits `cross_track_km` off the ground track; `t = 0` of a
scenario is `time_from_culmination_s` before or after the closest approach
(`PassGeometry.at_elevation(deg)` finds it for a given station elevation). The line of
sight (LOS) to the station, seen from the nadir-pointing satellite, has two angles: x along
track, y across track. At 500 km overhead the LOS turns at 15.2 mrad/s at culmination; a
pass is tracked from 15 deg elevation (x = 63.6 deg off nadir, range 1407 km).

Chain, per axis (all angles in radians internally, nanoradians at the sensor/actuator
interface, as the firmware uses):

    beacon direction  los(t) + vibration(t)
    coarse axis       c(t): rate servo of finite bandwidth, rate and acceleration limits,
                      stiction below a rate, encoder quantised (gimbal or body)
    fast-steering mirror f(t): second-order resonance (0.7 kHz, damping 0.1), range limits,
                      exact zero-order-hold discretisation, commands applied
                      `latency_samples` periods after the sensors they answer
    pointing error    e = los + vib - c - f   (seen by the quadrant detector)
    acquisition camera sees los + vib - c inside its field (no FSM in its path)

Quadrant detector: Gaussian spot of 1/e^2 radius `qpd_spot_radius_urad` (angle units),
per-axis fraction on the positive half (1 + erf(sqrt(2) x / w)) / 2, so
X = ((B+D)-(A+C))/S = erf(sqrt(2) x / w) as in REFERENCES.md, each quadrant with its own
gain (`qpd_quadrant_gains`, a 1-2 % mismatch the loop cannot see). Signal photo-electrons
scale as (range_ref / range)^2 times the beacon's scintillation (log-normal, scintillation
index `scintillation_index`, correlation time `scintillation_correlation_ms`), plus
background per quadrant; shot noise (Gaussian approximation of Poisson), 16-bit ADC.

Micro-vibration: stationary Gaussian noise, PSD ~ 1/f between 0.2 and 30 Hz with a
2nd-order roll-off above 30 Hz, plus three tones, normalised to `vibration_rms_urad` per
axis (9.3 urad default, Micius); on top, reaction-wheel lines (`wheel_lines`: 1 urad at
95 Hz, 0.5 urad at 190 Hz) and a white floor (`vibration_floor_urad_rthz`). Independent
per axis.

Everything random comes from one numpy Generator seeded by `seed` and drawn up front, so a
scenario is bit-for-bit reproducible whatever the firmware does.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field, replace

import numpy as np
from scipy.linalg import expm
from scipy.signal import lfilter
from scipy.special import erf

C_M_S = 299_792_458.0
NRAD = 1e-9
URAD = 1e-6
MRAD = 1e-3

# Payload-bus bodies of the lockstep exchange (docs/tracking.md "Lockstep link").
# Firmware -> plant: 'S' start (no command applied) or 'C' command for one step.
COMMAND_FORMAT = (
    "<cIiiiiiiBB"  # tag, step, fsm x/y nrad, coarse rate x/y urad/s, pa x/y, state, flags
)
COMMAND_BYTES = struct.calcsize(COMMAND_FORMAT)
# Plant -> firmware: 'M' measurement at the start of a step.
# tag, step, A,B,C,D, cam_new, cam x/y, cam signal, enc x/y, angular-rate sensor x/y (nrad)
MEASUREMENT_FORMAT = "<cIHHHHBiiiiiii"
MEASUREMENT_BYTES = struct.calcsize(MEASUREMENT_FORMAT)


EARTH_RADIUS_KM = 6371.0


@dataclass(frozen=True)
class PassGeometry:
    altitude_km: float = 500.0
    speed_km_s: float = 7.6  # orbital speed
    cross_track_km: float = 0.0
    time_from_culmination_s: float = -10.0  # scenario t=0 this long before culmination

    def _vectors(self, t_s):
        """LOS components (km) in the satellite's frame: along track, across, nadir."""
        r_sat = EARTH_RADIUS_KM + self.altitude_km
        phi = self.speed_km_s / r_sat * (np.asarray(t_s, float) + self.time_from_culmination_s)
        psi = self.cross_track_km / EARTH_RADIUS_KM
        along = -EARTH_RADIUS_KM * math.cos(psi) * np.sin(phi)
        across = EARTH_RADIUS_KM * math.sin(psi) * np.ones_like(phi)
        nadir = r_sat - EARTH_RADIUS_KM * math.cos(psi) * np.cos(phi)
        return along, across, nadir

    def los_rad(self, t_s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Along-track and cross-track LOS angles (rad) and range (km) at scenario time."""
        along, across, nadir = self._vectors(t_s)
        x = np.arctan2(along, nadir)
        y = np.arctan2(across, np.hypot(nadir, along))
        range_km = np.sqrt(along**2 + across**2 + nadir**2)
        return x, y, range_km

    def elevation_deg(self, t_s: np.ndarray) -> np.ndarray:
        """The satellite's elevation seen from the station."""
        along, across, nadir = self._vectors(t_s)
        range_km = np.sqrt(along**2 + across**2 + nadir**2)
        r_sat = EARTH_RADIUS_KM + self.altitude_km
        # station -> satellite dotted with the station's vertical, via the law of cosines
        sin_el = (r_sat**2 - EARTH_RADIUS_KM**2 - range_km**2) / (2 * EARTH_RADIUS_KM * range_km)
        return np.degrees(np.arcsin(sin_el))

    def at_elevation(self, elevation_deg: float, rising: bool = True) -> PassGeometry:
        """The same pass with scenario t=0 when the satellite is at `elevation_deg`."""
        lo, hi = 0.0, 2000.0  # seconds from culmination
        probe = replace(self, time_from_culmination_s=0.0)
        if probe.elevation_deg(np.array([0.0]))[0] < elevation_deg:
            raise ValueError(f"the pass never reaches {elevation_deg} deg elevation")
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if probe.elevation_deg(np.array([mid]))[0] > elevation_deg:
                lo = mid
            else:
                hi = mid
        return replace(self, time_from_culmination_s=-lo if rising else lo)

    def point_ahead_rad(self, t_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """2 v_perp / c along the LOS motion (REFERENCES.md: up to ~51 urad at 500 km)."""
        along, across, nadir = self._vectors(t_s)
        range_km = np.sqrt(along**2 + across**2 + nadir**2)
        v_perp = self.speed_km_s * 1e3 * np.sqrt(1.0 - (along / range_km) ** 2)
        pa = 2.0 * v_perp / C_M_S
        return -pa * np.ones_like(np.asarray(t_s, float)), np.zeros_like(np.asarray(t_s, float))


@dataclass(frozen=True)
class PlantParams:
    loop_rate_hz: int = 2000
    seed: int = 1
    geometry: PassGeometry = field(default_factory=PassGeometry)
    # What the firmware does not know: where the beacon really is against the prediction.
    initial_error_urad: tuple[float, float] = (2400.0, -2000.0)  # |.| = 3.1 mrad
    prediction_drift_urad_s: tuple[float, float] = (6.0, -4.0)  # attitude knowledge drifts
    prediction_timing_error_s: float = 0.05
    # Coarse axis (gimbal or body): rate servo, limits, friction, encoder
    coarse_rate_max_urad_s: float = 50_000.0
    coarse_accel_max_urad_s2: float = 200_000.0
    coarse_bandwidth_hz: float = 5.0  # rate servo: first-order lag
    coarse_stiction_urad_s: float = 20.0  # commanded rates below this do not move the axis
    encoder_resolution_nrad: float = 374.5  # 24-bit encoder: 2 pi / 2**24
    # Fast-steering mirror: a resonance inside the loop's band, lightly damped
    fsm_natural_hz: float = 700.0
    fsm_damping: float = 0.1
    fsm_range_urad: float = 1000.0
    # Sensor-to-actuator latency: commands act this many periods after their sample
    latency_samples: int = 1
    # Quadrant detector
    qpd_spot_radius_urad: float = 25.0
    qpd_field_urad: float = 150.0  # field stop: no beacon light beyond this error
    qpd_signal_e_per_ms: float = 20000.0  # photo-electrons per ms at range_ref_km
    qpd_background_e_per_ms: float = 50.0  # per quadrant
    qpd_read_noise_e: float = 5.0
    qpd_quadrant_gains: tuple[float, float, float, float] = (1.02, 1.0, 0.99, 0.99)  # A..D
    range_ref_km: float = 500.0
    # Uplink beacon scintillation: log-normal intensity, scintillation index sigma_I^2
    scintillation_index: float = 0.7
    scintillation_correlation_ms: float = 5.0
    # Acquisition camera (wide field, slower)
    camera_rate_hz: int = 100
    camera_field_urad: float = 1000.0  # half width of the square field
    camera_signal_counts: float = 4000.0
    camera_background_counts: float = 60.0
    camera_centroid_noise_urad: float = 2.0
    # Micro-vibration
    vibration_rms_urad: float = 9.3
    vibration_tones_hz: tuple[float, ...] = (2.7, 7.1, 17.3)
    vibration_rolloff_order: int = 2  # PSD ~ f^-(2 order) above 30 Hz
    wheel_lines: tuple[tuple[float, float], ...] = ((95.0, 1.0), (190.0, 0.5))  # Hz, urad RMS
    vibration_floor_urad_rthz: float = 0.004  # white floor, one-sided PSD
    # Angular-rate sensor on the terminal's base (MHD type, as laser terminals carry for
    # line-of-sight stabilisation; docs/tracking.md "Angular-rate sensor"): it sees the
    # platform's micro-vibration, not the gimbal or the mirror; its output is the rate
    # integrated to angle (nrad), high-passed at `ars_highpass_hz` (an MHD sensor does not
    # measure DC), with white rate noise of `ars_noise_urad_s_rthz` (one-sided density).
    ars_highpass_hz: float = 2.0
    ars_noise_urad_s_rthz: float = 2.0
    # Beacon outages: list of (start_s, duration_s); duration inf = never returns
    dropouts: tuple[tuple[float, float], ...] = ()

    def with_(self, **changes) -> PlantParams:
        return replace(self, **changes)

    @classmethod
    def idealised(cls, **changes) -> PlantParams:
        """The plant before issue 15: no latency, a 2 kHz mirror at a 2 kHz loop, the
        vibration falling as f^-8 above 30 Hz, no wheel lines, floor or scintillation,
        matched quadrants, an ideal coarse axis and encoder, a near-zenith pass."""
        base = dict(
            initial_error_urad=(3500.0, -3000.0), prediction_drift_urad_s=(0.0, 0.0),
            coarse_bandwidth_hz=0.0, coarse_stiction_urad_s=0.0, encoder_resolution_nrad=1.0,
            fsm_natural_hz=2000.0, fsm_damping=0.7, latency_samples=0,
            qpd_quadrant_gains=(1.0, 1.0, 1.0, 1.0), scintillation_index=0.0,
            vibration_rolloff_order=4, wheel_lines=(), vibration_floor_urad_rthz=0.0,
        )  # fmt: skip
        base.update(changes)
        return cls(**base)


def vibration_series(
    rng: np.random.Generator,
    n: int,
    rate_hz: float,
    rms_urad: float,
    tones_hz,
    rolloff_order: int = 4,
    wheel_lines=(),
    floor_urad_rthz: float = 0.0,
) -> np.ndarray:
    """n samples of one axis of micro-vibration (rad): shaped noise + tones at the given
    RMS, plus reaction-wheel lines (Hz, urad RMS; random phase) and a white floor."""
    nfft = 1 << max(10, int(math.ceil(math.log2(n + 1))))
    freqs = np.fft.rfftfreq(nfft, 1.0 / rate_hz)
    shape = np.zeros_like(freqs)
    band = freqs >= 0.2
    shape[band] = 1.0 / np.sqrt(freqs[band])  # amplitude ~ f^-1/2: PSD ~ 1/f
    shape *= 1.0 / np.sqrt(1.0 + (freqs / 30.0) ** (2 * rolloff_order))  # PSD roll-off
    spectrum = shape * (rng.standard_normal(freqs.size) + 1j * rng.standard_normal(freqs.size))
    noise = np.fft.irfft(spectrum, nfft)[:n]
    noise /= np.std(noise)
    t = np.arange(n) / rate_hz
    tones = np.zeros(n)
    for f in tones_hz:
        tones += np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
    if tones_hz:
        tones /= np.std(tones)
    # Half the power in the broadband part, half in the tones.
    series = noise * math.sqrt(0.5) + tones * math.sqrt(0.5) if tones_hz else noise
    series *= rms_urad * URAD / np.std(series)
    for f, line_rms_urad in wheel_lines:
        phase = rng.uniform(0, 2 * np.pi)
        series += math.sqrt(2.0) * line_rms_urad * URAD * np.sin(2 * np.pi * f * t + phase)
    if floor_urad_rthz > 0.0:
        # One-sided PSD floor^2 up to Nyquist: RMS = floor * sqrt(rate / 2).
        series += floor_urad_rthz * URAD * math.sqrt(rate_hz / 2.0) * rng.standard_normal(n)
    return series


def scintillation_series(
    rng: np.random.Generator, n: int, rate_hz: float, index: float, correlation_ms: float
) -> np.ndarray:
    """Beacon intensity factor per sample, mean 1: log-normal with scintillation index
    sigma_I^2 = `index` (var(I)/mean(I)^2), log-amplitude an AR(1) process of correlation
    time `correlation_ms` (Andrews & Phillips: sigma_lnI^2 = ln(1 + sigma_I^2))."""
    if index <= 0.0:
        return np.ones(n)
    sigma_ln = math.sqrt(math.log1p(index))
    rho = math.exp(-1000.0 / (rate_hz * correlation_ms))
    white = rng.standard_normal(n)
    white[0] /= math.sqrt(1.0 - rho * rho)  # start in the stationary distribution
    g = lfilter([math.sqrt(1.0 - rho * rho)], [1.0, -rho], white)  # AR(1), unit variance
    return np.exp(sigma_ln * g - 0.5 * sigma_ln * sigma_ln)


def ars_series(
    rng: np.random.Generator,
    jitter_rad: np.ndarray,
    rate_hz: float,
    highpass_hz: float,
    noise_urad_s_rthz: float,
) -> np.ndarray:
    """What the angular-rate sensor reports per sample (nrad, int): the platform jitter
    plus the sensor's white rate noise integrated to angle, through the sensor's
    first-order high-pass (its angle output carries no DC and no drift)."""
    dt = 1.0 / rate_hz
    # one-sided density N (urad/s/rtHz) -> per-sample rate noise N sqrt(rate / 2)
    rate_noise = noise_urad_s_rthz * URAD * math.sqrt(rate_hz / 2.0)
    angle = jitter_rad + np.cumsum(rate_noise * rng.standard_normal(jitter_rad.size)) * dt
    a = 1.0 / (1.0 + 2.0 * math.pi * highpass_hz * dt)  # y_k = a (y_k-1 + x_k - x_k-1)
    out = lfilter([a, -a], [1.0, -a], angle - angle[0])
    return np.round(out / NRAD).astype(np.int64)


def prediction_table(params: PlantParams, duration_s: float) -> list[list[int]]:
    """The uplinked pass prediction, as the firmware stores it (docs/tracking.md).

    One node per second: [x, y (nrad), vx, vy (nrad/ms), ax, ay (nrad/ms^2, Q16),
    pa_x, pa_y (nrad)]. The prediction has a timing error (the orbit is known late or
    early) and does not know the attitude bias `initial_error_urad`: that is the
    uncertainty the scan must cover.
    """
    g = params.geometry
    nodes = int(math.ceil(duration_s)) + 2
    t = np.arange(nodes, dtype=float) + params.prediction_timing_error_s
    eps = 1e-3
    x, y, _ = g.los_rad(t)
    xp, yp, _ = g.los_rad(t + eps)
    xm, ym, _ = g.los_rad(t - eps)
    vx, vy = (xp - xm) / (2 * eps), (yp - ym) / (2 * eps)  # rad/s
    ax, ay = (xp - 2 * x + xm) / eps**2, (yp - 2 * y + ym) / eps**2  # rad/s^2
    pax, pay = g.point_ahead_rad(t)
    rows = []
    for i in range(nodes):
        rows.append(
            [
                round(x[i] / NRAD),
                round(y[i] / NRAD),
                round(vx[i] / NRAD / 1000.0),
                round(vy[i] / NRAD / 1000.0),
                round(ax[i] / NRAD / 1e6 * 65536),
                round(ay[i] / NRAD / 1e6 * 65536),
                round(pax[i] / NRAD),
                round(pay[i] / NRAD),
            ]
        )
    return rows


class OpticalPlant:
    """Steps the physical world one firmware loop period per command, deterministically.

    `measure()` gives the sensor readings at the current time; `apply(command)` holds the
    actuator commands for one period and advances time. `log` keeps the true pointing
    error (downlink: tracking error plus point-ahead error) per step for analysis.
    """

    def __init__(self, params: PlantParams, duration_s: float):
        self.p = params
        self.dt = 1.0 / params.loop_rate_hz
        self.steps = int(round(duration_s * params.loop_rate_hz))
        n = self.steps + 2
        rng = np.random.default_rng(params.seed)
        self.t = np.arange(n) * self.dt
        g = params.geometry
        self.los_x, self.los_y, self.range_km = g.los_rad(self.t)
        self.pa_x, self.pa_y = g.point_ahead_rad(self.t)
        bias_x, bias_y = (v * URAD for v in params.initial_error_urad)
        # The beacon's true direction differs from the prediction by the attitude bias
        # and by the prediction's timing error; the prediction is what the firmware has.
        drift_x, drift_y = (v * URAD for v in params.prediction_drift_urad_s)
        self.los_x = self.los_x + bias_x + drift_x * self.t
        self.los_y = self.los_y + bias_y + drift_y * self.t
        vib = dict(
            rolloff_order=params.vibration_rolloff_order,
            wheel_lines=params.wheel_lines,
            floor_urad_rthz=params.vibration_floor_urad_rthz,
        )
        self.vib_x = vibration_series(
            rng, n, params.loop_rate_hz, params.vibration_rms_urad, params.vibration_tones_hz,
            **vib,
        )  # fmt: skip
        self.vib_y = vibration_series(
            rng, n, params.loop_rate_hz, params.vibration_rms_urad, params.vibration_tones_hz,
            **vib,
        )  # fmt: skip
        self.intensity = scintillation_series(
            rng, n, params.loop_rate_hz, params.scintillation_index,
            params.scintillation_correlation_ms,
        )  # fmt: skip
        self.qpd_noise = rng.standard_normal((n, 4))
        self.cam_noise = rng.standard_normal((n, 3))
        # drawn after everything above, so the other series are those of earlier plants
        self.ars_x = ars_series(rng, self.vib_x, params.loop_rate_hz, params.ars_highpass_hz,
                                params.ars_noise_urad_s_rthz)  # fmt: skip
        self.ars_y = ars_series(rng, self.vib_y, params.loop_rate_hz, params.ars_highpass_hz,
                                params.ars_noise_urad_s_rthz)  # fmt: skip
        self.beacon_on = np.ones(n, dtype=bool)
        for start_s, duration in params.dropouts:
            end_s = start_s + duration
            self.beacon_on &= ~((self.t >= start_s) & (self.t < end_s))
        # Coarse axis state (rad, rad/s) starts where the prediction says at t=0, at rest.
        pred0 = prediction_table(params, 1.0)[0]
        self.coarse = np.array([pred0[0] * NRAD, pred0[1] * NRAD])
        self.coarse_rate = np.zeros(2)
        # FSM: x' = A x + B u per axis, state (angle, angular rate); exact ZOH step.
        wn = 2 * math.pi * params.fsm_natural_hz
        a = np.array([[0.0, 1.0], [-wn * wn, -2 * params.fsm_damping * wn]])
        b = np.array([[0.0], [wn * wn]])
        m = np.zeros((3, 3))
        m[:2, :2], m[:2, 2:] = a * self.dt, b * self.dt
        e = expm(m)
        self.fsm_ad, self.fsm_bd = e[:2, :2], e[:2, 2]
        self.fsm = np.zeros((2, 2))  # [axis][angle, rate]
        # Commands in flight: the mirror acts on the one `latency_samples` periods old.
        self.fsm_pipeline = [(0, 0)] * params.latency_samples
        if params.coarse_bandwidth_hz > 0:
            self.coarse_lag = 1.0 - math.exp(-2 * math.pi * params.coarse_bandwidth_hz * self.dt)
        else:
            self.coarse_lag = 1.0  # ideal rate follower
        self.k = 0
        self.cam = (0, 0, 0)  # latest camera frame: centroid x, y (nrad), signal
        self.err_x = np.zeros(n)
        self.err_y = np.zeros(n)
        self.downlink_x = np.zeros(n)
        self.downlink_y = np.zeros(n)
        self.states = np.zeros(n, dtype=np.int8)
        self.fsm_cmd_log = np.zeros((n, 2))

    # ------------------------------------------------------------------ sensors
    def pointing_error_rad(self) -> tuple[float, float]:
        k = self.k
        ex = self.los_x[k] + self.vib_x[k] - self.coarse[0] - self.fsm[0, 0]
        ey = self.los_y[k] + self.vib_y[k] - self.coarse[1] - self.fsm[1, 0]
        return ex, ey

    def measure(self) -> tuple:
        """Sensor readings at the current step: QPD quadrants A,B,C,D (ADC counts),
        camera (new-frame flag, centroid x/y nrad, signal counts), coarse encoder (nrad)."""
        p, k = self.p, self.k
        ex, ey = self.pointing_error_rad()
        self.err_x[k], self.err_y[k] = ex, ey
        signal = 0.0
        if self.beacon_on[k]:
            signal = p.qpd_signal_e_per_ms * (p.range_ref_km / self.range_km[k]) ** 2
            signal *= 1000.0 / p.loop_rate_hz * self.intensity[k]
            if max(abs(ex), abs(ey)) > p.qpd_field_urad * URAD:
                signal = 0.0
        w = p.qpd_spot_radius_urad * URAD
        fx = 0.5 * (1.0 + erf(math.sqrt(2.0) * ex / w))
        fy = 0.5 * (1.0 + erf(math.sqrt(2.0) * ey / w))
        # A: -x,+y  B: +x,+y  C: -x,-y  D: +x,-y  (X = ((B+D)-(A+C))/S, Y = ((A+B)-(C+D))/S)
        means = (
            signal * (1 - fx) * fy,
            signal * fx * fy,
            signal * (1 - fx) * (1 - fy),
            signal * fx * (1 - fy),
        )
        quads = []
        for i, mean in enumerate(means):
            mean = mean * p.qpd_quadrant_gains[i]
            mean += p.qpd_background_e_per_ms * 1000.0 / p.loop_rate_hz
            noisy = mean + math.sqrt(mean + p.qpd_read_noise_e**2) * self.qpd_noise[k, i]
            quads.append(min(65535, max(0, int(round(noisy)))))
        frame_steps = max(1, p.loop_rate_hz // p.camera_rate_hz)
        cam_new = 1 if k % frame_steps == 0 else 0
        if cam_new:
            cx = self.los_x[k] + self.vib_x[k] - self.coarse[0]
            cy = self.los_y[k] + self.vib_y[k] - self.coarse[1]
            field_rad = p.camera_field_urad * URAD
            sig = p.camera_background_counts
            if self.beacon_on[k] and abs(cx) < field_rad and abs(cy) < field_rad:
                # the frame integrates the scintillating beacon over its exposure
                seen = float(np.mean(self.intensity[max(0, k - frame_steps + 1) : k + 1]))
                sig += p.camera_signal_counts * (p.range_ref_km / self.range_km[k]) ** 2 * seen
                nx = cx + p.camera_centroid_noise_urad * URAD * self.cam_noise[k, 0]
                ny = cy + p.camera_centroid_noise_urad * URAD * self.cam_noise[k, 1]
            else:  # no spot: the centroid of the background is noise around the centre
                nx = field_rad * 0.3 * self.cam_noise[k, 0]
                ny = field_rad * 0.3 * self.cam_noise[k, 1]
            sig += math.sqrt(sig) * self.cam_noise[k, 2]
            self.cam = (int(round(nx / NRAD)), int(round(ny / NRAD)), int(max(0.0, sig)))
        cam_x, cam_y, cam_sig = self.cam
        q = p.encoder_resolution_nrad
        enc_x = int(round(round(self.coarse[0] / NRAD / q) * q))
        enc_y = int(round(round(self.coarse[1] / NRAD / q) * q))
        ars = (int(self.ars_x[k]), int(self.ars_y[k]))
        return (*quads, cam_new, cam_x, cam_y, cam_sig, enc_x, enc_y, *ars)

    # ------------------------------------------------------------------ actuators
    def apply(self, fsm_nrad, coarse_rate_urad_s, pa_nrad, state: int) -> None:
        """Hold the commands for one loop period and advance time by one step."""
        p, k, dt = self.p, self.k, self.dt
        self.states[k] = state
        self.fsm_cmd_log[k] = fsm_nrad
        ex, ey = self.err_x[k], self.err_y[k]
        # Downlink pointing error: the transmitter leads the beacon by the commanded point-
        # ahead; whatever differs from the true point-ahead adds to the tracking error.
        self.downlink_x[k] = ex + (pa_nrad[0] * NRAD - self.pa_x[k])
        self.downlink_y[k] = ey + (pa_nrad[1] * NRAD - self.pa_y[k])
        limit = p.fsm_range_urad * URAD
        rate_max = p.coarse_rate_max_urad_s * URAD
        accel_step = p.coarse_accel_max_urad_s2 * URAD * dt
        if self.fsm_pipeline:
            self.fsm_pipeline.append(tuple(fsm_nrad))
            fsm_nrad = self.fsm_pipeline.pop(0)
            coarse_pipeline = getattr(self, "_coarse_pipeline", None)
            if coarse_pipeline is None:
                coarse_pipeline = self._coarse_pipeline = [(0, 0)] * p.latency_samples
            coarse_pipeline.append(tuple(coarse_rate_urad_s))
            coarse_rate_urad_s = coarse_pipeline.pop(0)
        for axis in range(2):
            target = min(limit, max(-limit, fsm_nrad[axis] * NRAD))
            state_vec = self.fsm_ad @ self.fsm[axis] + self.fsm_bd * target
            if abs(state_vec[0]) > limit:  # mechanical stop: no bounce
                state_vec[0] = math.copysign(limit, state_vec[0])
                state_vec[1] = 0.0
            self.fsm[axis] = state_vec
            want = min(rate_max, max(-rate_max, coarse_rate_urad_s[axis] * URAD))
            if abs(want) < p.coarse_stiction_urad_s * URAD:
                want = 0.0  # below the breakaway torque the axis sticks
            old = self.coarse_rate[axis]
            change = (want - old) * self.coarse_lag  # rate servo of finite bandwidth
            new = old + min(accel_step, max(-accel_step, change))
            self.coarse[axis] += 0.5 * (old + new) * dt
            self.coarse_rate[axis] = new
        self.k += 1

    # ------------------------------------------------------------------ undo
    _LOGS = ("err_x", "err_y", "downlink_x", "downlink_y", "states", "fsm_cmd_log")

    def checkpoint(self) -> tuple:
        """What a period's apply() and the next measure() change: the dynamic state and
        the log rows at k and k + 1, for restore() (a refused TRACK has no effect)."""
        rows = slice(self.k, self.k + 2)
        coarse_pipeline = getattr(self, "_coarse_pipeline", None)
        return (
            self.k, self.coarse.copy(), self.coarse_rate.copy(), self.fsm.copy(),
            list(self.fsm_pipeline), None if coarse_pipeline is None else list(coarse_pipeline),
            self.cam, {name: getattr(self, name)[rows].copy() for name in self._LOGS},
        )  # fmt: skip

    def restore(self, saved: tuple) -> None:
        k, coarse, coarse_rate, fsm, fsm_pipeline, coarse_pipeline, cam, logs = saved
        self.k, self.coarse, self.coarse_rate, self.fsm = k, coarse, coarse_rate, fsm
        self.fsm_pipeline, self.cam = fsm_pipeline, cam
        if coarse_pipeline is None:
            self.__dict__.pop("_coarse_pipeline", None)
        else:
            self._coarse_pipeline = coarse_pipeline
        for name, rows in logs.items():
            getattr(self, name)[k : k + len(rows)] = rows

    # ------------------------------------------------------------------ lockstep link
    def on_bus_body(self, body: bytes) -> bytes:
        """Payload-bus handler: a command body in, the next measurement body out."""
        if body[:1] == b"S":
            return self.measurement_body()
        if body[:1] != b"C" or len(body) != COMMAND_BYTES:
            raise ValueError(f"plant: unexpected bus body {body[:16]!r} ({len(body)} bytes)")
        _, step, fx, fy, rx, ry, pax, pay, state, _flags = struct.unpack(COMMAND_FORMAT, body)
        if step != self.k:
            raise ValueError(f"plant: command for step {step} while at step {self.k}")
        self.apply((fx, fy), (rx, ry), (pax, pay), state)
        return self.measurement_body()

    def measurement_body(self) -> bytes:
        return struct.pack(MEASUREMENT_FORMAT, b"M", self.k, *self.measure())
