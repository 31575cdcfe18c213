# Beacon acquisition, pointing and tracking (docs/tracking.md).
#
# One step function, `Tracker.step()`, runs the whole loop for one sample: it reads the
# sensor words in `tracker.io`, runs the state machine and the controllers, and leaves the
# actuator commands in `tracker.io`. It is a viper kernel over preallocated int32 arrays:
# integer arithmetic only (the Cortex-M3 has no FPU), no allocation (tested under
# micropython.heap_lock()), so a hardware timer can call it on a board and the scheduler
# (or the lockstep link to the emulated plant) calls it in emulation.
#
# States: IDLE -> OPEN_LOOP (pointing on the uplinked prediction, with point-ahead)
#   -> SCAN (spiral over the uncertainty cone) -> COARSE (acquisition camera closes the
#   coarse axis) -> FINE (quadrant detector closes the fast-steering mirror; its mean
#   deflection is offloaded to the coarse axis) -> HOLD (beacon lost: the predictor
#   carries the pointing) -> FINE again, or REACQ (small spiral around the last known
#   direction) -> LOST (open loop on the prediction, camera still watched).
# Every transition is decided on measured signal (QPD sum, camera signal) or on an
# exhausted scan/hold budget, and is logged with its step and reason.
#
# Units: angles in nanoradians (int32), rates in nrad/ms (= urad/s), gains in fixed point
# (Q12 or Q16, noted per field). All intermediate products are bounded below 2**31 so the
# 64-bit unix build and the 32-bit MCU compute the same bits (docs/tracking.md).
import array

import micropython
from micropython import const

from payload._sin_q14 import SIN_Q14

# ---------------------------------------------------------------- states and reasons
IDLE = const(0)
OPEN_LOOP = const(1)
SCAN = const(2)
COARSE = const(3)
FINE = const(4)
HOLD = const(5)
REACQ = const(6)
LOST = const(7)
STATE_NAMES = ("IDLE", "OPEN_LOOP", "SCAN", "COARSE", "FINE", "HOLD", "REACQ", "LOST")

# (Reasons and io words that no other module names are underscored: a public const is an
# entry in the module's globals, and 25 fewer made that dict ~0.4 kB smaller in the STM32
# board's heap; the numbers are the interface, docs/tracking.md.)
_R_COMMAND_START = const(1)
R_COMMAND_STOP = const(2)
_R_ON_PREDICTION = const(3)  # coarse axis settled on the predicted direction
_R_CAMERA_SIGNAL = const(4)  # camera signal above threshold for N frames
_R_FINE_SIGNAL = const(5)  # QPD sum above threshold and camera error small for N samples
_R_SIGNAL_LOST = const(6)  # QPD sum below threshold for N samples
_R_SIGNAL_BACK = const(7)  # QPD sum back above threshold during HOLD
_R_HOLD_TIMEOUT = const(8)
_R_SCAN_EXHAUSTED = const(9)
_R_CAMERA_LOST = const(10)
REASON_NAMES = (
    "",
    "command start",
    "command stop",
    "on prediction",
    "camera signal",
    "fine signal",
    "signal lost",
    "signal back",
    "hold timeout",
    "scan exhausted",
    "camera lost",
)

# ---------------------------------------------------------------- io words (int32)
_IO_QA = const(0)  # quadrant A..D, ADC counts (A: -x+y, B: +x+y, C: -x-y, D: +x-y)
_IO_QB = const(1)
_IO_QC = const(2)
_IO_QD = const(3)
_IO_CAM_NEW = const(4)  # 1 when the camera delivered a new frame this step
_IO_CAM_X = const(5)  # camera centroid, nrad
_IO_CAM_Y = const(6)
_IO_CAM_SIGNAL = const(7)  # camera spot signal, counts
_IO_ENC_X = const(8)  # coarse axis position, nrad
_IO_ENC_Y = const(9)
IO_ARS_X = const(10)  # angular-rate sensor, platform jitter integrated to angle, nrad
IO_ARS_Y = const(11)
IO_FSM_X = const(12)  # out: mirror command, nrad
IO_FSM_Y = const(13)
IO_RATE_X = const(14)  # out: coarse axis rate command, nrad/ms (urad/s)
_IO_RATE_Y = const(15)
_IO_PA_X = const(16)  # out: point-ahead command, nrad
_IO_PA_Y = const(17)
_IO_STATE = const(18)  # out
IO_ERR_X = const(19)  # out: measured fine error, nrad (0 without signal)
IO_ERR_Y = const(20)
_IO_SIGNAL = const(21)  # out: QPD sum above background, counts
IO_PRED_X = const(22)  # out: predicted line of sight (uplinked prediction, no bias), nrad
IO_PRED_Y = const(23)
_IO_WORDS = const(24)

# ---------------------------------------------------------------- config words (int32)
_K_PERIOD_US = const(0)
_K_KP = const(1)  # fine PID, Q12
_K_KI = const(2)
_K_KD = const(3)
_K_FSM_LIMIT = const(4)  # nrad
_K_QPD_GAIN = const(5)  # nrad per Q12 unit of normalised difference, Q8
_K_QPD_BG = const(6)  # background per quadrant, counts
_K_QPD_THR = const(7)  # counts above background
_K_QPD_CONFIRM = const(8)  # samples
_K_LOSS_SAMPLES = const(9)
_K_CAM_THR = const(10)
_K_CAM_CONFIRM = const(11)  # frames
_K_CAM_LOSS = const(12)  # frames
_K_KC = const(13)  # camera -> coarse rate, (nrad/ms) per nrad, Q16
_K_KOL = const(14)  # open-loop position -> coarse rate, Q16
_K_KO = const(15)  # mirror offload -> coarse rate, Q16
_K_SETTLE = const(16)  # nrad
_K_SCAN_RADIUS = const(17)  # nrad
_K_SCAN_PITCH = const(18)  # nrad per turn
_K_SCAN_K = const(19)  # phase speed constant: dphase(Q16 turns) = K // r
_K_SCAN_RMIN = const(20)  # nrad
_K_REACQ_RADIUS = const(21)
_K_MAX_SCANS = const(22)
_K_MAX_REACQ = const(23)
_K_HOLD_STEPS = const(24)
_K_ALPHA = const(25)  # predictor, Q16
_K_BETA = const(26)  # Q16
_K_RATE_LIMIT = const(27)  # nrad/ms
_K_HANDOVER = const(28)  # camera error below which the QPD may take over, nrad
_K_TELEM_DECIM = const(29)  # steps per telemetry sample
_K_SPM = const(30)  # steps per ms, Q16 (per-step -> per-ms conversion)
_K_KII = const(31)  # fine double-integral gain, Q12
_K_RES = const(32)  # wheel-line resonators, per line: a1, a2, b0, b1 (Q12, signed)
_K_ARS = const(40)  # angular-rate sensor feed-forward taps on ARS(k), ..., ARS(k-3), Q12
_K_WORDS = const(44)
_ARS_TAPS = const(4)
_ARS_CLAMP = const(65536)  # 2**16 nrad: |tap| <= 1 (Q12 4096) keeps 4 products < 2**30
_WHEEL_LINES = const(2)
_RES_MAX_NRAD = const(131072)  # 2**17: resonator state bound (a1 * r < 2**30)

# ---------------------------------------------------------------- state words (int32)
_S_STATE = const(0)
_S_STEP = const(1)
_S_NODE_US = const(2)  # us since the current prediction node (wrap-safe pass time)
_S_CMD = const(3)  # pending command: 1 start, 2 stop
_S_IN_STATE = const(4)  # steps in the current state
_S_QPD_RUN = const(5)
_S_QPD_MISS = const(6)
_S_CAM_RUN = const(7)
_S_CAM_MISS = const(8)
_S_IX = const(9)  # PID integrators, nrad Q8
_S_IY = const(10)
_S_EPX = const(11)  # previous error, nrad
_S_EPY = const(12)
_S_BX = const(13)  # predictor bias (LOS - prediction), nrad Q6
_S_BY = const(14)
_S_BDX = const(15)  # predictor bias rate, nrad/step Q16
_S_BDY = const(16)
_S_PHASE = const(17)  # spiral phase, turns Q16
_S_SCANS = const(18)  # completed spirals in this scan/reacq
_S_OFFX = const(19)  # spiral offset of the previous step, nrad
_S_OFFY = const(20)
_S_CRX = const(21)  # camera rate correction held between frames, nrad/ms
_S_CRY = const(22)
_S_TR_COUNT = const(23)  # transitions logged
_S_TM_HEAD = const(24)  # telemetry samples written
_S_TM_TAIL = const(25)  # telemetry samples drained
_S_TM_LOST = const(26)  # telemetry samples dropped (ring full), never silent
_S_JX = const(27)  # running sum of the fine error, nrad (feeds the second integrator)
_S_JY = const(28)
_S_I2X = const(29)  # second (double) integrator, nrad Q8
_S_I2Y = const(30)
_S_NODE = const(31)  # current prediction node (time = node s + _S_NODE_US us)
_S_START_MS = const(32)  # pass time at which the next start begins, ms
_S_TM_COUNTDOWN = const(33)  # steps to the next telemetry sample
_S_RES = const(34)  # resonator states, nrad: [axis x, y][line 0, 1][r(k-1), r(k-2)]
_S_ARS = const(44)  # angular-rate sensor history, nrad: [axis x, y][ARS(k-1), (k-2), (k-3)]
_S_WORDS = const(50)

# All int32 state lives in one array (fewer kernel arguments: each costs ~200 instructions
# per call on the Cortex-M3): [state | config | io | nodes | prediction window | transition
# ring | telemetry].
_OFF_CFG = const(50)  # _S_WORDS
_OFF_IO = const(94)  # _OFF_CFG + _K_WORDS
_OFF_NODES = const(118)  # _OFF_IO + _IO_WORDS
_OFF_TM_MASK = const(119)  # the telemetry ring's slots - 1 (a power of two, set per board)
# The prediction window (Tracker.table): a ring of a power of two of nodes, node n in slot
# n & mask. The main loop's pager (Tracker.page) writes slots, then publishes the last node
# they hold in _OFF_WIN_LAST (one word: the single writer); the kernel reads no node past
# it, and the pager overwrites only nodes before the kernel's (docs/tracking.md).
_OFF_WIN_MASK = const(120)  # the window's slots - 1
_OFF_WIN_LAST = const(121)  # the last node resident in the window (-1: none)
_OFF_WIN_LATE = const(122)  # steps the pass time waited for the window (saturating)
_OFF_LOG = const(123)
_OFF_TM = const(251)  # _OFF_LOG + 2 * _TR_SLOTS
# transition ring: step, then from | to << 8 | reason << 16 (two words a transition, not
# four: 512 bytes of the STM32 board's heap)
_TR_SLOTS = const(64)
TM_SAMPLE_WORDS = const(7)  # telemetry sample: step, state, signal, ex, ey, fsm x, fsm y
_TM_SLOTS = const(256)  # the telemetry ring's default slots (Tracker's telemetry_slots)
_TABLE_WORDS = const(8)  # per prediction node: x, y, vx, vy, ax, ay, pa x, pa y
NODE_BYTES = const(32)  # 8 little-endian int32 per node, the table's own layout
# The nodes of an uploaded prediction kept resident (Tracker.load_table): 16 s ahead of
# the loop, 512 bytes, however long the pass (board.TRACKING_PREDICTION_WINDOW_NODES)
WINDOW_NODES = const(16)
_SIN_SIZE = const(1024)
_SIN_BIAS = const(16384)  # sin table stored unsigned (Q14 + bias): same load on all targets
_E_CLAMP = const(131072)  # 2**17 nrad: bound on fine errors so Q12 products fit int32
_J_CLAMP = const(262144)  # 2**18 nrad: bound on the error sum (kii < 0.5 keeps kii*J < 2**30)
# Ranges that keep every intermediate below 2**31 (docs/tracking.md "Fixed-point ranges"):
# (Literals above 2**30 - 1 are not small ints on 32-bit ports, and viper refuses them:
# such bounds are formed at run time in the kernel from the constants below.)
_ANGLE_MAX_NRAD = 1500000000  # absolute angles (prediction, encoder): 85.9 deg
_ANGLE_MAX_KNRAD = const(1500000)  # the same, formed as * 1000 in the kernel
_LOS_DIFF_HALF_NRAD = const(536870912)  # 2**29: prediction - encoder saturates at 2**30
_BIAS_MAX_NRAD = const(16777216)  # 2**24 (16.8 mrad): predictor bias; Q6 stays < 2**30
_BIAS_RATE_MAX_Q16 = const(134217727)  # 2**27 - 1: bias rate, nrad/step Q16
_RATE_MAX_TABLE = const(65536)  # |vx|, |vy| in the table, nrad/ms (65 mrad/s)
_ACCEL_MAX_TABLE = const(131072)  # |ax|, |ay| in the table, nrad/ms^2 Q16 (2 mrad/s^2)
_PA_MAX_TABLE = const(131072)  # |point-ahead| in the table, nrad (131 urad)
_NODE_US = const(1000000)  # one prediction node per second
_EXTRAPOLATE_MS = const(10000)  # past the last node the prediction extrapolates 10 s, then holds
_SEGMENT_US_MAX = const(11000000)  # last segment (1 s) + the extrapolation
_COUNT_MAX = const(536870912)  # run/miss/in-state counters saturate here (never wrap)
_SCAN_OFF_STEP_MAX = const(16384)  # nrad per step of spiral motion fed forward

# The actuator/sensor facts of the optical head (the plant's datasheet). Configurations
# are validated against them.
HARDWARE = {
    "fsm_range_urad": 1000.0,
    "coarse_rate_max_urad_s": 50000.0,
    "coarse_accel_max_urad_s2": 200000.0,
    "camera_field_urad": 1000.0,  # half width
    "camera_rate_hz": 100,
    "qpd_field_urad": 150.0,
    "los_rate_max_urad_s": 15500.0,  # 500 km overhead pass, v/h
    "fsm_natural_hz": 700.0,  # mirror resonance (the loop's stability check models it)
    "fsm_damping": 0.1,
    "latency_samples": 1,  # sensor-to-actuator latency beyond the zero-order hold
}

DEFAULTS = {
    "loop_rate_hz": 2000,
    # Tuned on a frequency-domain model of the honest plant with the angular-rate sensor's
    # feed-forward (docs/tracking.md "Tuning"), robust to a QPD slope of 0.5-1.5x and to one
    # more sample of latency (every closed-loop pole inside 0.9985 in those cases). Without
    # the sensor (taps all 0) use the QPD-only set: kp 0.108, ki 0.287, kii 0.084, kd 0.002,
    # line gains (0.031, 0.0128), phases (-70.0, 37.7).
    "fine_kp": 0.0078,
    "fine_ki": 0.1923,
    "fine_kii": 0.0133,
    "fine_kd": 0.0,
    # Resonant terms at the reaction-wheel lines (0 Hz: off), from the wheel speed. Pole
    # radius 0.998: a peak of loop gain +-0.64 Hz wide at 2 kHz (the wheel speed must be
    # known to ~+-20 rpm at 5700 rpm; 0.995 rejected the lines 2x less).
    "wheel_lines_hz": (95.0, 190.0),
    "wheel_line_gains": (0.0275, 0.0355),
    "wheel_line_phases_deg": (-54.2, 2.2),
    "wheel_line_pole_radius": 0.998,
    # Angular-rate sensor feed-forward (docs/tracking.md "Angular-rate sensor"): taps on
    # the sensor's angle at k, k-1, k-2, k-3, Q12 (all 0: off; then the QPD-only gains).
    "ars_feedforward_taps": (0.9606, -0.0931, 0.5414, -0.4554),
    "fsm_limit_urad": 900.0,
    "qpd_spot_radius_urad": 25.0,
    "qpd_background_counts": 25,
    # 150 counts above background: ~10 sigma of the background sum's noise (4 x 25 counts
    # and read noise), 12 % of a 15 deg beacon's mean. At 300, scintillation fades held
    # the loop (mirror and resonators frozen) ~2 % of the time at 20 deg, and each hold
    # left the resonators out of phase with the wheel lines: 1.0 -> 0.8 urad RMS there.
    "qpd_threshold_counts": 150,
    "qpd_confirm_samples": 5,
    "loss_samples": 20,
    "camera_threshold_counts": 200,
    "camera_confirm_frames": 2,
    "camera_loss_frames": 5,
    "camera_gain_per_s": 15.0,
    "open_loop_gain_per_s": 15.0,
    "offload_gain_per_s": 5.0,
    "settle_urad": 100.0,
    "scan_radius_urad": 5000.0,
    "scan_pitch_urad": 1500.0,
    "scan_speed_urad_s": 10000.0,
    "reacq_radius_urad": 1500.0,
    "max_scans": 2,
    "max_reacq_scans": 2,
    "hold_ms": 1500,
    "predictor_alpha": 0.01,
    "predictor_beta": 0.00002,
    "handover_urad": 60.0,
    "telemetry_decimation": 10,
    "stability_margin": 0.998,
}


# The gain set of each loop rate (changes to DEFAULTS, the 2 kHz set): gains, resonators and
# the sensor's taps are per rate, and the 2 kHz set is unstable at 1 kHz (pole radius
# 1.015). A pass configures the set of the rate its loop really runs at (mission.py): the
# application's paced loop on a 25 MHz Cortex-M3 sustains 1 kHz, not 2 (docs/tracking.md
# "Loop rate in pass mode"). The 1 kHz set: the same model and search as the default at
# 1 kHz (docs/tracking.md "Tuning"), every pole inside 0.9985 at 0.5x / 1.5x QPD slope and
# one more sample of latency; loss_samples 10 keeps the 10 ms fade hold.
RATE_SETS = {
    2000: {"loop_rate_hz": 2000},  # DEFAULTS
    1000: {
        "loop_rate_hz": 1000,
        "fine_kp": 0.015,
        "fine_ki": 0.36,
        "fine_kii": 0.0057,
        "fine_kd": 0.1023,
        "wheel_line_gains": (0.0271, 0.0247),
        "wheel_line_phases_deg": (-0.785, 147.6),
        "ars_feedforward_taps": (1.0, -0.2302, 0.4789, -0.3594),
        "loss_samples": 10,
    },
}


def parameters_for_rate(changes, rate_limit_hz=0):
    """The parameters a pass configures: the gain set of the loop's rate (the rate in
    `changes`, else `rate_limit_hz`, else DEFAULTS' 2 kHz) with `changes` over it. A rate
    above `rate_limit_hz` (the rate the controller's loop sustains; 0: no limit) is refused:
    the loop would run slower than its gains were tuned for."""
    rate = changes.get("loop_rate_hz", rate_limit_hz or DEFAULTS["loop_rate_hz"])
    if rate_limit_hz and isinstance(rate, int) and rate > rate_limit_hz:
        raise ConfigError(
            "loop_rate_hz=%r: above the %d Hz this controller's pass-mode loop sustains"
            " (docs/tracking.md 'Loop rate in pass mode')" % (rate, rate_limit_hz)
        )
    out = dict(RATE_SETS.get(rate, {}))
    out.update(changes)
    return out


# Per prediction-table field: the bound the kernel's fixed point is proven for.
_TABLE_FIELDS = ("x nrad", "y nrad", "vx nrad/ms", "vy nrad/ms", "ax nrad/ms^2 Q16",
                 "ay nrad/ms^2 Q16", "pa x nrad", "pa y nrad")  # fmt: skip
_TABLE_LIMITS = (_ANGLE_MAX_NRAD, _ANGLE_MAX_NRAD, _RATE_MAX_TABLE, _RATE_MAX_TABLE,
                 _ACCEL_MAX_TABLE, _ACCEL_MAX_TABLE, _PA_MAX_TABLE, _PA_MAX_TABLE)  # fmt: skip


class ConfigError(ValueError):
    """A tracking configuration was refused; the message names the field and why."""


def _poly_max_root_ok(coeffs, radius):
    """True if every root of the polynomial (highest power first) lies strictly inside
    |z| < radius: the Schur-Cohn test on the coefficients scaled to the unit circle."""
    n = len(coeffs) - 1
    a = [coeffs[i] * radius ** (n - i) for i in range(n + 1)]  # p(radius * w)
    a = [c / a[0] for c in a]
    while len(a) > 1:
        last = a[-1]
        if abs(last) >= 1.0:
            return False
        # reduced polynomial: (a(z) - last * reversed(a)(z)) / (1 - last^2), drop degree
        rev = a[::-1]
        a = [(a[i] - last * rev[i]) / (1.0 - last * last) for i in range(len(a) - 1)]
    return True


def _pole_radius(coeffs):
    """Largest root modulus, by bisection on the Schur-Cohn test (good to 1e-4)."""
    lo, hi = 0.0, 4.0
    if not _poly_max_root_ok(coeffs, hi):
        return hi
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if _poly_max_root_ok(coeffs, mid):
            hi = mid
        else:
            lo = mid
    return hi


def _poly_mul(a, b):
    out = [0.0] * (len(a) + len(b) - 1)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            out[i + j] += x * y
    return out


def _poly_add(a, b):
    n = max(len(a), len(b))
    a = a + [0.0] * (n - len(a))
    b = b + [0.0] * (n - len(b))
    return [a[i] + b[i] for i in range(n)]


def mirror_zoh(natural_hz, damping, period_s):
    """The mirror (second order, underdamped) under a zero-order hold: (num, den) in
    ascending powers of q = z^-1, num = [0, b1, b2], den = [1, a1, a2] (closed form)."""
    import math

    wn = 2.0 * math.pi * natural_hz
    wd = wn * math.sqrt(1.0 - damping * damping)
    decay = math.exp(-damping * wn * period_s)
    cos_d = math.cos(wd * period_s)
    sin_d = math.sin(wd * period_s) * damping * wn / wd
    a1 = -2.0 * decay * cos_d
    a2 = decay * decay
    b1 = 1.0 - decay * (cos_d + sin_d)
    b2 = a2 + decay * (sin_d - cos_d)
    return [0.0, b1, b2], [1.0, a1, a2]


def wheel_resonator(line_hz, gain, phase_deg, rate_hz, pole_radius=0.995):
    """A resonant term at a reaction-wheel line (internal model: high loop gain there):
    (num, den) in q, num = g [cos p, -r cos(w - p)], den = [1, -2 r cos w, r^2]."""
    import math

    w = 2.0 * math.pi * line_hz / rate_hz
    p = math.radians(phase_deg)
    num = [gain * math.cos(p), -gain * pole_radius * math.cos(w - p)]
    den = [1.0, -2.0 * pole_radius * math.cos(w), pole_radius * pole_radius]
    return num, den


def fine_loop_polynomial(kp, ki, kii, kd, latency=0, mirror=None, resonators=()):
    """Closed-loop characteristic polynomial (ascending powers of q = z^-1, i.e. the z
    polynomial highest power first) of the fine loop: controller
    u = kp e + ki sum(e) + kii sum(sum(e)) + kd diff(e) + resonators, plant
    q^latency * mirror (ZOH, `mirror_zoh`) or q (a mirror following within one period).
    With D = 1 - q: den_P D^2 R_den + num_P (kp D^2 + ki D + kii + kd D^3) R_den + ..."""
    d = [1.0, -1.0]
    d2 = _poly_mul(d, d)
    c_num = _poly_add(_poly_add([kp * c for c in d2], [ki * c for c in d]), [kii])
    c_num = _poly_add(c_num, [kd * c for c in _poly_mul(d2, d)])
    c_den = d2
    if kii == 0.0 and not resonators:  # no second integrator: divide the common D out
        c_num = _poly_add(_poly_add([kp * c for c in d], [ki]), [kd * c for c in d2])
        c_den = d
    for r_num, r_den in resonators:
        c_num = _poly_add(_poly_mul(c_num, r_den), _poly_mul(r_num, c_den))
        c_den = _poly_mul(c_den, r_den)
    p_num, p_den = mirror if mirror else ([0.0, 1.0], [1.0])
    p_num = [0.0] * latency + list(p_num)
    in_q = _poly_add(_poly_mul(p_den, c_den), _poly_mul(p_num, c_num))
    while len(in_q) > 1 and in_q[-1] == 0.0:
        in_q.pop()
    return in_q


def validate(config, hardware=None):
    """Check a complete configuration; return the integer config words (array 'i').

    Raises ConfigError naming the first field that would make the loop unstable, exceed
    an actuator or sensor limit, or not fit the fixed-point arithmetic."""
    hw = HARDWARE if hardware is None else hardware
    c = config
    for name in DEFAULTS:
        if name not in c:
            raise ConfigError("%s: missing" % name)
    for name in c:
        if name not in DEFAULTS:
            raise ConfigError("%s: unknown tracking parameter" % name)

    def need(ok, name, why):
        if not ok:
            raise ConfigError("%s=%r: %s" % (name, c[name], why))

    rate = c["loop_rate_hz"]
    need(rate in (500, 1000, 2000, 4000), "loop_rate_hz", "must be 500, 1000, 2000 or 4000")
    period_us = 1000000 // rate
    kp, ki, kii, kd = c["fine_kp"], c["fine_ki"], c["fine_kii"], c["fine_kd"]
    for name in ("fine_kp", "fine_ki", "fine_kd"):
        need(0.0 <= c[name] < 2.0, name, "gain outside [0, 2): does not fit Q12 fixed point")
    need(0.0 <= kii < 0.5, "fine_kii", "gain outside [0, 0.5): does not fit Q12 fixed point")
    need(ki > 0.0, "fine_ki", "the fine loop needs integral action (type 1) to null bias")
    margin = c["stability_margin"]
    need(0.5 <= margin < 1.0, "stability_margin", "must be in [0.5, 1)")
    lines = c["wheel_lines_hz"]
    gains = c["wheel_line_gains"]
    phases = c["wheel_line_phases_deg"]
    for name in ("wheel_lines_hz", "wheel_line_gains", "wheel_line_phases_deg"):
        need(len(c[name]) == _WHEEL_LINES, name, "must list %d values" % _WHEEL_LINES)
    resonators = []
    for i in range(_WHEEL_LINES):
        need(0.0 <= lines[i] < 0.45 * rate, "wheel_lines_hz",
             "line %d: must be 0 (off) or below 0.45 x the loop rate" % i)  # fmt: skip
        need(0.0 <= gains[i] <= 0.1, "wheel_line_gains",
             "line %d: must be in [0, 0.1] (Q12 fixed point)" % i)  # fmt: skip
        need(-180.0 <= phases[i] <= 180.0, "wheel_line_phases_deg",
             "line %d: must be in [-180, 180]" % i)  # fmt: skip
    rho = c["wheel_line_pole_radius"]
    # Q12 coefficients: a2 = rho^2 needs rho <= 0.999 to keep the line frequency within
    # ~0.1 Hz after rounding; below 0.99 the peak is too wide to be a line.
    need(0.99 <= rho <= 0.999, "wheel_line_pole_radius", "must be in [0.99, 0.999]")
    for i in range(_WHEEL_LINES):
        if lines[i] > 0.0 and gains[i] > 0.0:
            resonators.append(wheel_resonator(lines[i], gains[i], phases[i], rate, rho))
    taps = c["ars_feedforward_taps"]
    need(len(taps) == _ARS_TAPS, "ars_feedforward_taps", "must list %d values" % _ARS_TAPS)
    for i in range(_ARS_TAPS):
        need(-1.0 <= taps[i] <= 1.0, "ars_feedforward_taps",
             "tap %d: must be in [-1, 1] (Q12 fixed point)" % i)  # fmt: skip
    latency = hw["latency_samples"]
    mirror = mirror_zoh(hw["fsm_natural_hz"], hw["fsm_damping"], 1.0 / rate)

    def loop(gain, extra_latency=0):
        res = [([gain * v for v in num], den) for num, den in resonators]
        return fine_loop_polynomial(kp * gain, ki * gain, kii * gain, kd * gain,
                                    latency + extra_latency, mirror, res)  # fmt: skip

    radius = _pole_radius(loop(1.0))
    if radius >= margin:
        raise ConfigError(
            "fine_kp=%r fine_ki=%r fine_kii=%r fine_kd=%r: fine loop %s (closed-loop pole"
            " radius %.3f, margin requires < %.3f)"
            % (kp, ki, kii, kd, "unstable" if radius >= 1.0 else "too close to instability",
               radius, margin)
        )  # fmt: skip
    # The QPD's slope (urad per unit of X) depends on the spot size, known to maybe +-50%
    # (focus, temperature, atmosphere): the loop must stay stable over that range.
    # One more period of latency than the datasheet (the plant's 1-2 samples) must not
    # make it unstable either, at any of these gains.
    for extra in (0, 1):
        for gain in (0.5, 1.0, 1.5):
            off = _pole_radius(loop(gain, extra))
            if off >= 1.0:
                raise ConfigError(
                    "fine_kp=%r fine_ki=%r fine_kii=%r fine_kd=%r: fine loop unstable if the"
                    " QPD gain is %.1fx the nominal (spot size error) with %d sample(s) of"
                    " latency (pole radius %.3f)" % (kp, ki, kii, kd, gain, latency + extra, off)
                )
    need(
        0.0 < c["fsm_limit_urad"] <= hw["fsm_range_urad"],
        "fsm_limit_urad",
        "exceeds the mirror's range of %r urad" % hw["fsm_range_urad"],
    )
    need(
        5.0 <= c["qpd_spot_radius_urad"] <= hw["qpd_field_urad"],
        "qpd_spot_radius_urad",
        "must be between 5 urad and the QPD field",
    )
    need(c["qpd_threshold_counts"] > 0, "qpd_threshold_counts", "must be positive")
    need(c["camera_threshold_counts"] > 0, "camera_threshold_counts", "must be positive")
    for name in ("qpd_confirm_samples", "loss_samples", "camera_confirm_frames",
                 "camera_loss_frames", "max_scans", "max_reacq_scans",
                 "telemetry_decimation"):  # fmt: skip
        need(1 <= c[name] <= 10000, name, "must be an integer in 1..10000")
    frame_s = 1.0 / hw["camera_rate_hz"]
    kc = c["camera_gain_per_s"]
    # Camera loop: one frame of latency, x[n+1] = x[n] - kc T x[n-1]; poles of
    # z^2 - z + kc T must stay within radius 0.9 (a slow loop: a fixed margin suffices).
    need(kc > 0.0, "camera_gain_per_s", "must be positive")
    cam_radius = _pole_radius([1.0, -1.0, kc * frame_s])
    need(
        cam_radius < 0.9,
        "camera_gain_per_s",
        "camera loop unstable or under-damped at %r frames/s (pole radius %.3f)"
        % (hw["camera_rate_hz"], cam_radius),
    )
    need(kc <= 30.0, "camera_gain_per_s", "above 30/s: does not fit the Q16 fixed point")
    fine_bw_hz = ki * rate / 6.283
    ko = c["offload_gain_per_s"]
    need(
        0.0 < ko / 6.283 <= fine_bw_hz / 10.0,
        "offload_gain_per_s",
        "offload bandwidth must be positive and at most a tenth of the fine loop's"
        " (%.1f Hz)" % fine_bw_hz,
    )
    need(ko <= 15.0, "offload_gain_per_s", "above 15/s: does not fit the Q16 fixed point")
    need(
        0.0 < c["open_loop_gain_per_s"] <= 30.0,
        "open_loop_gain_per_s",
        "must be in (0, 30]: above 30/s does not fit the Q16 fixed point",
    )
    need(
        0.0 < c["settle_urad"] < c["scan_pitch_urad"],
        "settle_urad",
        "must be below the scan pitch",
    )
    pitch = c["scan_pitch_urad"]
    need(
        0.0 < pitch <= 1.8 * hw["camera_field_urad"],
        "scan_pitch_urad",
        "must be below 90%% of the camera field (%r urad): the spiral would leave gaps"
        % (2 * hw["camera_field_urad"]),
    )
    for name in ("scan_radius_urad", "reacq_radius_urad"):
        need(
            pitch <= c[name] <= 15000.0,
            name,
            "must be between the scan pitch and 15 mrad (the bias range is 16.8 mrad)",
        )
    speed = c["scan_speed_urad_s"]
    need(speed > 0.0, "scan_speed_urad_s", "must be positive")
    need(
        speed + hw["los_rate_max_urad_s"] <= hw["coarse_rate_max_urad_s"],
        "scan_speed_urad_s",
        "scan plus line-of-sight rate (%r urad/s) exceed the coarse axis rate limit %r urad/s"
        % (hw["los_rate_max_urad_s"], hw["coarse_rate_max_urad_s"]),
    )
    r_min = pitch / 2.0
    need(
        speed * speed / r_min <= 0.8 * hw["coarse_accel_max_urad_s2"],
        "scan_speed_urad_s",
        "spiral needs %.0f urad/s^2 at its centre, above 80%% of the coarse axis limit %r"
        % (speed * speed / r_min, hw["coarse_accel_max_urad_s2"]),
    )
    need(speed * frame_s <= 0.5 * hw["camera_field_urad"], "scan_speed_urad_s",
         "the spot would cross more than half the camera field in one frame")  # fmt: skip
    alpha, beta = c["predictor_alpha"], c["predictor_beta"]
    need(0.0 < alpha <= 0.125, "predictor_alpha", "must be in (0, 0.125] (Q16 fixed point)")
    need(
        1.0 / 65536 <= beta < alpha * alpha / (2.0 - alpha) * 4.0,
        "predictor_beta",
        "alpha-beta filter needs 2**-16 <= beta < 4 alpha^2/(2-alpha) (stable, not ringing)",
    )
    need(0 <= c["hold_ms"] <= 60000, "hold_ms", "must be in 0..60000")
    need(
        0.0 < c["handover_urad"] < hw["qpd_field_urad"],
        "handover_urad",
        "must be inside the QPD field (%r urad)" % hw["qpd_field_urad"],
    )
    need(0 <= c["qpd_background_counts"] < 65536, "qpd_background_counts", "must be 0..65535")

    words = array.array("i", bytes(4 * _K_WORDS))
    words[_K_PERIOD_US] = period_us
    words[_K_KP] = int(kp * 4096 + 0.5)
    words[_K_KI] = int(ki * 4096 + 0.5)
    words[_K_KD] = int(kd * 4096 + 0.5)
    words[_K_KII] = int(kii * 4096 + 0.5)
    words[_K_FSM_LIMIT] = int(c["fsm_limit_urad"] * 1000)
    # Small-signal inverse of X = erf(sqrt(2) x / w): x = w/sqrt(2) * sqrt(pi)/2 * X (the
    # cubic and quintic terms are applied in the kernel).
    w_nrad = c["qpd_spot_radius_urad"] * 1000.0
    words[_K_QPD_GAIN] = int(w_nrad / 1.41421356 * 0.88622693 / 4096 * 256 + 0.5)
    words[_K_QPD_BG] = c["qpd_background_counts"]
    words[_K_QPD_THR] = c["qpd_threshold_counts"]
    words[_K_QPD_CONFIRM] = c["qpd_confirm_samples"]
    words[_K_LOSS_SAMPLES] = c["loss_samples"]
    words[_K_CAM_THR] = c["camera_threshold_counts"]
    words[_K_CAM_CONFIRM] = c["camera_confirm_frames"]
    words[_K_CAM_LOSS] = c["camera_loss_frames"]
    words[_K_KC] = int(kc / 1000.0 * 65536 + 0.5)
    words[_K_KOL] = int(c["open_loop_gain_per_s"] / 1000.0 * 65536 + 0.5)
    words[_K_KO] = int(ko / 1000.0 * 65536 + 0.5)
    words[_K_SETTLE] = int(c["settle_urad"] * 1000)
    words[_K_SCAN_RADIUS] = int(c["scan_radius_urad"] * 1000)
    words[_K_SCAN_PITCH] = int(pitch * 1000)
    step_nrad = speed * period_us / 1000.0  # nrad per step along the spiral
    words[_K_SCAN_K] = int(step_nrad * 65536 / 6.2831853 + 0.5)
    words[_K_SCAN_RMIN] = int(r_min * 1000)
    words[_K_REACQ_RADIUS] = int(c["reacq_radius_urad"] * 1000)
    words[_K_MAX_SCANS] = c["max_scans"]
    words[_K_MAX_REACQ] = c["max_reacq_scans"]
    words[_K_HOLD_STEPS] = c["hold_ms"] * 1000 // period_us
    words[_K_ALPHA] = int(alpha * 65536 + 0.5)
    words[_K_BETA] = max(1, int(beta * 65536 + 0.5))
    words[_K_RATE_LIMIT] = int(hw["coarse_rate_max_urad_s"])
    words[_K_HANDOVER] = int(c["handover_urad"] * 1000)
    words[_K_TELEM_DECIM] = c["telemetry_decimation"]
    words[_K_SPM] = 65536 * 1000 // period_us
    for i, (num, den) in enumerate(resonators):
        for j, value in enumerate((-den[1], den[2], num[0], num[1])):
            words[_K_RES + 4 * i + j] = int(value * 4096 + (0.5 if value >= 0 else -0.5))
    for i, value in enumerate(taps):
        words[_K_ARS + i] = int(value * 4096 + (0.5 if value >= 0 else -0.5))
    return words


class Tracker:
    """The tracking loop. Sensor words go in `io`, commands come out of `io`; `step()`
    is allocation-free and may be called from a timer interrupt."""

    def __init__(self, config=None, hardware=None, telemetry_slots=_TM_SLOTS):
        """telemetry_slots: the decimated telemetry ring's samples (a power of two of at
        least 64: the product drains 40 at a time). The default 256 makes the tracker's words
        8.2 KB (8.7 KB before the transition ring was packed), more than the STM32 board's
        heap had in one block once the application was up; it runs 64
        (board.TRACKING_TELEMETRY_SLOTS: words 2.8 KB; docs/targets.md)."""
        if telemetry_slots < 64 or telemetry_slots & (telemetry_slots - 1):
            raise ConfigError("telemetry_slots=%r: a power of two >= 64" % (telemetry_slots,))
        # (HARDWARE itself when not given: a copy is 80 bytes of the STM32 board's heap)
        self.hardware = HARDWARE if hardware is None else dict(hardware)
        # only the changes to DEFAULTS are kept (`config` merges them when asked): a merged
        # copy is ~0.3 kB of the STM32 board's heap for the whole pass
        self._changes = dict(config) if config else {}
        # one block, from a range, then zeroed: array("i", bytes(n)) needs a second
        # n-byte block for the zeros, which a fragmented heap may not have (docs/targets.md)
        all_words = _OFF_TM + TM_SAMPLE_WORDS * telemetry_slots
        self.words = array.array("i", range(all_words))
        for i in range(all_words):
            self.words[i] = 0
        self.words[_OFF_TM_MASK] = telemetry_slots - 1
        self._tm_mask = telemetry_slots - 1
        view = memoryview(self.words)
        self.st = view[:_S_WORDS]
        self.cfg = view[_OFF_CFG : _OFF_CFG + _K_WORDS]
        self.io = view[_OFF_IO : _OFF_IO + _IO_WORDS]
        self._nodes = view[_OFF_NODES : _OFF_NODES + 1]
        self.transition_log = view[_OFF_LOG : _OFF_LOG + 2 * _TR_SLOTS]
        self.telemetry = view[_OFF_TM : _OFF_TM + TM_SAMPLE_WORDS * telemetry_slots]
        self.cfg[:] = validate(self.config, self.hardware)
        # the prediction window: two nodes of zeros until a prediction is loaded
        self.table = bytearray(NODE_BYTES * 2)
        self.words[_OFF_WIN_MASK] = 1
        self.words[_OFF_WIN_LAST] = 1
        self._nodes[0] = 2
        self._source = None  # the stored prediction the pager reads (load_table), or None
        self._window_first = -1  # the node the window was last filled from (start)
        self.page_faults = 0  # reads of the stored prediction that failed or were refused
        self._paging = False  # the pager runs (a fault stops it until the next start)
        # a frozen constant: flash on the MCU, the same table on every target (_sin_q14.py)
        self._sin = SIN_Q14
        self.sin_table = SIN_Q14  # step_kernel's third argument

    # -------------------------------------------------------------- telecommands
    def configure(self, changes):
        """Apply parameter changes atomically, or raise ConfigError and change nothing.

        Refused while the loop is running: gains must not change under a closed loop."""
        if self.st[_S_STATE] != IDLE:
            raise ConfigError("configure: refused while tracking (state %s); stop first"
                              % STATE_NAMES[self.st[_S_STATE]])  # fmt: skip
        merged = dict(self._changes)
        merged.update(changes)
        full = dict(DEFAULTS)
        full.update(merged)
        words = validate(full, self.hardware)
        self._changes = merged
        self.cfg[:] = words

    @property
    def config(self):
        """The whole configuration: DEFAULTS with this tracker's changes (a new dict)."""
        out = dict(DEFAULTS)
        out.update(self._changes)
        return out

    def load_predictions(self, rows):
        """Store the uplinked pass prediction: one row per second from loop time 0,
        [x, y nrad, vx, vy nrad/ms, ax, ay nrad/ms^2 Q16, pa_x, pa_y nrad]. The whole
        table is resident (a window of a power of two of nodes that holds all of them):
        for the configure telecommand's few nodes and the lockstep runs; a whole pass is
        uploaded to storage and paged (load_table)."""
        import struct

        if self.st[_S_STATE] != IDLE:
            raise ConfigError("load_predictions: refused while tracking; stop first")
        if len(rows) < 2:
            raise ConfigError("load_predictions: need at least 2 nodes, got %d" % len(rows))
        slots = 2
        while slots < len(rows):
            slots <<= 1
        table = bytearray(NODE_BYTES * slots)
        for i, row in enumerate(rows):
            if len(row) != _TABLE_WORDS:
                raise ConfigError("load_predictions: row %d has %d values, expected %d"
                                  % (i, len(row), _TABLE_WORDS))  # fmt: skip
            for j in range(_TABLE_WORDS):
                value = row[j]
                limit = _TABLE_LIMITS[j]
                if not -limit <= value <= limit:
                    raise ConfigError(
                        "load_predictions: row %d value %d (%s) = %r outside +-%d"
                        % (i, j, _TABLE_FIELDS[j], value, limit)
                    )
            struct.pack_into("<8i", table, i * NODE_BYTES, *row)
        self.release_predictions()
        self.table = table
        self.words[_OFF_WIN_MASK] = slots - 1
        self.words[_OFF_WIN_LAST] = len(rows) - 1
        self._nodes[0] = len(rows)

    def load_table(self, upload, window_nodes=WINDOW_NODES):
        """Use a complete PredictionUpload from storage: its file is read back and its
        CRC-32 checked against the upload's (what storage holds is what was uploaded);
        then a window of window_nodes (a power of two; fewer for a shorter pass) is kept
        resident and refilled ahead of the loop by `page()`, a main-loop duty."""
        if self.st[_S_STATE] != IDLE:
            raise ConfigError("load_table: refused while tracking; stop first")
        if upload.received != upload.total or upload.total < 2:
            raise ConfigError("tracking predictions: %d of %d nodes uploaded"
                              % (upload.received, upload.total))  # fmt: skip
        if window_nodes < 2 or window_nodes & (window_nodes - 1):
            raise ConfigError("window_nodes=%r: a power of two >= 2" % (window_nodes,))
        total = upload.total
        slots = 2
        while slots < total and slots < window_nodes:
            slots <<= 1
        self.release_predictions()
        table = bytearray(NODE_BYTES * slots)
        from payload.framing import Crc32

        crc = Crc32()
        try:
            f = open(upload.path, "rb")
        except OSError as error:
            raise ConfigError("tracking predictions: %s: %s" % (upload.path, error)) from None
        try:
            view = memoryview(table)
            remaining = total * NODE_BYTES
            while remaining:
                n = f.readinto(view[: min(remaining, len(table))])
                if not n:
                    raise ConfigError("tracking predictions: %s holds %d of %d bytes"
                                      % (upload.path, total * NODE_BYTES - remaining,
                                         total * NODE_BYTES))  # fmt: skip
                crc.update(table, n)
                remaining -= n
            if crc.value() != upload.crc32():
                raise ConfigError("tracking predictions: %s: CRC-32 0x%08x, uploaded 0x%08x"
                                  % (upload.path, crc.value(), upload.crc32()))  # fmt: skip
        except BaseException:
            f.close()
            raise
        self.table = table
        self.words[_OFF_WIN_MASK] = slots - 1
        self.words[_OFF_WIN_LAST] = -1
        self._nodes[0] = total
        self._source = f
        self._window_first = -1
        self.fill_window(0)

    def release_predictions(self):
        """Close the stored prediction (a new upload overwrites its file): the loop keeps
        the nodes its window holds, and start refuses until a prediction is loaded."""
        f = self._source
        if f is not None:
            self._source = None
            self._window_first = -2  # released: fill_window refuses
            f.close()

    def fill_window(self, at_ms=0):
        """Fill the window from the node at pass time at_ms (main loop, while idle: the
        start's window). Raises ConfigError if the stored prediction was released or
        cannot be read (a start refused, rather than a loop on nodes it does not have)."""
        if self._window_first == -2:
            # (short: the link's rejection reason carries 64 characters)
            raise ConfigError("tracking: prediction replaced by an upload; configure again")
        if self._source is None:
            return  # the whole table is resident
        if self.st[_S_STATE] != IDLE:
            raise ConfigError("fill_window: refused while tracking")
        nodes = self._nodes[0]
        first = at_ms // 1000
        if first > nodes - 2:
            first = nodes - 2
        if first == self._window_first:
            return
        self._window_first = -1
        self._paging = True
        self.words[_OFF_WIN_LAST] = first - 1  # nothing from first on is resident yet
        count = self.words[_OFF_WIN_MASK] + 1
        if first + count > nodes:
            count = nodes - first
        if not self._page_in(first, count):
            raise ConfigError("tracking: the stored prediction could not be read (node %d)"
                              % first)  # fmt: skip
        self._window_first = first

    def page(self):
        """The pager, a main-loop duty (never the interrupt): bring the nodes after the
        window's last in, up to the loop's node + the window's slots - 1. The slot a node
        goes to held one before the loop's node, which the loop never reads again (its
        node only advances while it runs), and the new nodes are published after they are
        written (single writer). True if it read nodes."""
        if self._source is None or not self._paging:
            return False
        w = self.words
        if w[_S_STATE] == IDLE or w[_S_CMD] != 0:
            return False  # idle, or a start pending: the start filled the window
        last = w[_OFF_WIN_LAST]
        want = w[_S_NODE] + w[_OFF_WIN_MASK]
        if want > self._nodes[0] - 1:
            want = self._nodes[0] - 1
        if last >= want:
            return False
        self._window_first = -1  # the window moved on: a start refills it
        return self._page_in(last + 1, want - last)

    def _page_in(self, first, count):
        """Read nodes first..first+count-1 into their slots, check them against the
        fixed-point ranges and publish them (_OFF_WIN_LAST), piece by piece. A read that
        fails or a node out of range is counted (page_faults) and not published: the loop
        then extrapolates from its last node and holds (the kernel, _OFF_WIN_LATE)."""
        f = self._source
        w = self.words
        slots = w[_OFF_WIN_MASK] + 1
        view = memoryview(self.table)
        try:
            f.seek(first * NODE_BYTES)
            while count > 0:
                slot = first & (slots - 1)
                n = slots - slot
                if n > count:
                    n = count
                got = f.readinto(view[slot * NODE_BYTES : (slot + n) * NODE_BYTES])
                whole = got // NODE_BYTES if got else 0
                bad = _nodes_out_of_range(self.table, slot, whole)
                if bad:
                    whole = (bad - 1) // _TABLE_WORDS
                if whole:
                    w[_OFF_WIN_LAST] = first + whole - 1  # publish: one word store
                if whole != n:
                    return self._page_fault()
                first += n
                count -= n
        except OSError:
            return self._page_fault()
        return True

    def _page_fault(self):
        # counted once; the pager stops until the next start (a flipped bit stays flipped:
        # retrying would read the flash every scheduler pass for nothing)
        self.page_faults += 1
        self._paging = False
        return False

    def window_late(self):
        """Loop steps whose pass time waited for the window (the pager was late)."""
        return self.words[_OFF_WIN_LATE]

    def start(self, at_ms=0):
        """Start tracking at pass time `at_ms` (ms after the first prediction node): a loop
        started late in a pass begins on the right node (its window filled from there)."""
        if not 0 <= at_ms < 1 << 31:
            raise ConfigError("start: at_ms=%r outside 0..2**31-1" % (at_ms,))
        if self.st[_S_STATE] == IDLE:
            self.fill_window(at_ms)
        self.st[_S_START_MS] = at_ms
        self.st[_S_CMD] = 1

    def idle(self):
        """True in IDLE with no command pending: stepping would do nothing."""
        return self.st[_S_STATE] == IDLE and self.st[_S_CMD] == 0

    def stop(self):
        self.st[_S_CMD] = 2

    # -------------------------------------------------------------- the loop
    def step(self):
        """One loop sample: sensors in self.io -> commands in self.io; returns the state."""
        return _step(self.words, self.table, self._sin)

    # -------------------------------------------------------------- reading back (allocates)
    @property
    def state(self):
        return self.st[_S_STATE]

    @property
    def step_count(self):
        return self.st[_S_STEP]

    def transitions(self):
        """Logged transitions, oldest first: (step, from_state, to_state, reason)."""
        count = self.st[_S_TR_COUNT]
        first = max(0, count - _TR_SLOTS)
        out = []
        log = self.transition_log
        for n in range(first, count):
            i = 2 * (n % _TR_SLOTS)
            states = log[i + 1]
            out.append((log[i], states & 0xFF, (states >> 8) & 0xFF, states >> 16))
        return out

    def bias_nrad(self):
        """The predictor's learned bias (line of sight - prediction), nrad per axis."""
        return self.st[_S_BX] >> 6, self.st[_S_BY] >> 6

    def pass_time_ms(self):
        """The loop's pass time (ms after the first node; held past the extrapolation)."""
        return self.st[_S_NODE] * 1000 + self.st[_S_NODE_US] // 1000

    def transition_count(self):
        return self.st[_S_TR_COUNT]

    def telemetry_pending(self):
        return self.st[_S_TM_HEAD] - self.st[_S_TM_TAIL]

    def telemetry_lost(self):
        return self.st[_S_TM_LOST]

    def pack_telemetry_into(self, out, max_samples):
        """Pack up to max_samples pending samples straight from the ring into a TRACKING
        samples payload in `out` (no copy of them: 1.1 kB of the STM32 board's heap);
        returns (samples, payload bytes)."""
        count = min(max_samples, self.telemetry_pending())
        tail = self.st[_S_TM_TAIL]
        length = pack_samples_into(out, self.telemetry, count, self.cfg[0],
                                   self.cfg[_K_TELEM_DECIM], tail,
                                   self._tm_mask)  # fmt: skip
        self.st[_S_TM_TAIL] = tail + count
        return count, length

    def drain_telemetry(self, out, max_samples):
        """Copy up to max_samples pending samples into array 'i' out; return how many."""
        count = min(max_samples, self.telemetry_pending())
        tail = self.st[_S_TM_TAIL]
        for n in range(count):
            src = TM_SAMPLE_WORDS * ((tail + n) & self._tm_mask)
            dst = TM_SAMPLE_WORDS * n
            for j in range(TM_SAMPLE_WORDS):
                out[dst + j] = self.telemetry[src + j]
        self.st[_S_TM_TAIL] = tail + count
        return count


# ---------------------------------------------------------------- full-pass prediction
MAX_PREDICTION_NODES = 900  # 15 minutes at one node per second: a 28.8 KB file


class PredictionUpload:
    """A whole pass's prediction, uploaded in chunks that each fit a telecommand
    (docs/tracking.md "Full-pass prediction upload"): chunk = (first node, total nodes,
    packed nodes), appended to the file `path` in storage as it arrives (the loop pages it
    in: Tracker.load_table). Chunks arrive in order; a repeated chunk (a retransmission) is
    ignored; a chunk with first == 0 starts a new upload. Every node is checked against
    the kernel's fixed-point ranges as it arrives; the CRC-32 of all packed bytes must
    match the one the configuration names before the table is used."""

    def __init__(self, path, store=None):
        """store: the storage.Storage whose quota the file draws on with the products
        (it counts the file: Storage's counted_files); a chunk that does not fit is
        refused, naming the quota, and leaves the store's state as it was."""
        self.path = path
        self.store = store
        self.total = 0
        self.received = 0
        self._crc = None

    def add(self, first, total, packed):
        if not isinstance(first, int) or not isinstance(total, int):
            raise ConfigError("tracking_predictions: first and total must be integers")
        if len(packed) % NODE_BYTES or not packed:
            raise ConfigError("tracking_predictions: %d bytes is not a whole number of"
                              " %d-byte nodes" % (len(packed), NODE_BYTES))  # fmt: skip
        count = len(packed) // NODE_BYTES
        if first == 0:
            if not 2 <= total <= MAX_PREDICTION_NODES:
                raise ConfigError("tracking_predictions.total=%r: must be 2..%d"
                                  % (total, MAX_PREDICTION_NODES))  # fmt: skip
            from payload.framing import Crc32

            self.total = total
            self.received = 0
            self._crc = Crc32()
        elif self._crc is None or total != self.total:
            raise ConfigError("tracking_predictions: chunk of an upload not begun (first=0)")
        if first != self.received:
            if first + count <= self.received:
                return self.received  # a retransmitted chunk: already stored
            raise ConfigError("tracking_predictions.first=%d: expected %d (chunks in order)"
                              % (first, self.received))  # fmt: skip
        if first + count > total:
            raise ConfigError("tracking_predictions: nodes %d..%d beyond total %d"
                              % (first, first + count - 1, total))  # fmt: skip
        bad = _nodes_out_of_range(packed, 0, count)
        if bad:
            node, field = divmod(bad - 1, _TABLE_WORDS)
            value = array.array("i", packed[(bad - 1) * 4 : bad * 4])[0]  # little-endian
            raise ConfigError(
                "tracking_predictions: node %d value %d (%s) = %d outside +-%d"
                % (first + node, field, _TABLE_FIELDS[field], value, _TABLE_LIMITS[field])
            )
        store = self.store
        if store is not None:
            # (a new upload's first chunk: the old file's bytes are room)
            room = store.room_bytes(self.path if first == 0 else None)
            if len(packed) > room:
                raise ConfigError("tracking_predictions: storage quota: %d bytes left"
                                  % (room if room > 0 else 0))  # fmt: skip
        try:
            with open(self.path, "wb" if first == 0 else "ab") as f:
                written = f.write(packed)
        except OSError as error:
            raise ConfigError("tracking_predictions: %s: %s" % (self.path, error)) from None
        if store is not None:
            store.used_bytes += written
        if written != len(packed):
            raise ConfigError("tracking_predictions: %s: %d of %d bytes written"
                              % (self.path, written, len(packed)))  # fmt: skip
        self._crc.update(packed)
        self.received = first + count
        return self.received

    def crc32(self):
        return self._crc.value() if self._crc is not None else 0


@micropython.viper
def _nodes_out_of_range(buf: ptr32, slot: int, count: int) -> int:
    """0 if the count nodes from slot in buf (packed int32 nodes) are inside the kernel's
    fixed-point ranges (_TABLE_LIMITS), else 1 + the index of the first word that is not
    (counted from slot). Viper: the pager checks what it reads without allocating."""
    m = 1
    m <<= 31
    angle_max = _ANGLE_MAX_KNRAD
    angle_max *= 1000
    base = slot * _TABLE_WORDS
    for i in range(count * _TABLE_WORDS):
        v = (buf[base + i] ^ m) - m
        j = i & (_TABLE_WORDS - 1)
        limit = angle_max
        if j == 2 or j == 3:
            limit = _RATE_MAX_TABLE
        elif j >= 4:
            limit = _ACCEL_MAX_TABLE  # == _PA_MAX_TABLE
        if v > limit or v < 0 - limit:
            return i + 1
    return 0


# ---------------------------------------------------------------- telemetry record
# Record kind 4 (TRACKING) payloads, docs/formats.md and docs/tracking.md.
RECORD_KIND_TRACKING = const(4)
_SUB_SAMPLES = const(1)
_SUB_TRANSITIONS = const(2)


def pack_samples_into(out, samples, count, period_us, decimation, first=0, mask=-1):
    """Write a TRACKING samples payload into `out`; returns its length in bytes. samples:
    count samples in a row, or (mask >= 0) a ring of mask + 1 slots read from slot first."""
    import struct

    struct.pack_into("<BBHII", out, 0, 1, _SUB_SAMPLES, count, period_us, decimation)
    for n in range(count):
        i = TM_SAMPLE_WORDS * ((first + n) & mask if mask >= 0 else n)
        signal = samples[i + 2]
        signal = 0 if signal < 0 else (65535 if signal > 65535 else signal)
        struct.pack_into(
            "<IBBHiiii",
            out,
            12 + 24 * n,
            samples[i],
            samples[i + 1],
            0,
            signal,
            samples[i + 3],
            samples[i + 4],
            samples[i + 5],
            samples[i + 6],
        )
    return 12 + 24 * count


def pack_samples(samples, count, period_us, decimation):
    """TRACKING payload with `count` telemetry samples (array 'i', 7 words each)."""
    out = bytearray(12 + 24 * count)
    pack_samples_into(out, samples, count, period_us, decimation)
    return out


def pack_transitions(transitions, period_us):
    """TRACKING payload listing state transitions (step, from, to, reason)."""
    import struct

    out = bytearray(12 + 8 * len(transitions))
    struct.pack_into("<BBHII", out, 0, 1, _SUB_TRANSITIONS, len(transitions), period_us, 0)
    for n, (step, old, new, reason) in enumerate(transitions):
        struct.pack_into("<IBBBB", out, 12 + 8 * n, step, old, new, reason, 0)
    return out


# ---------------------------------------------------------------- kernels
@micropython.viper
def _log_transition(st: ptr32, to: int, reason: int):
    count = st[_S_TR_COUNT]
    i = (count % _TR_SLOTS) * 2
    st[_OFF_LOG + i] = st[_S_STEP]
    st[_OFF_LOG + i + 1] = st[_S_STATE] | (to << 8) | (reason << 16)
    st[_S_TR_COUNT] = count + 1
    st[_S_STATE] = to
    st[_S_IN_STATE] = 0
    st[_S_PHASE] = 0
    st[_S_SCANS] = 0


@micropython.viper
def _clamp(v: int, limit: int) -> int:
    if v > limit:
        return limit
    if v < 0 - limit:
        return 0 - limit
    return v


@micropython.viper
def _step(st: ptr32, table: ptr32, sin: ptr16) -> int:
    # ptr32 loads zero-extend on 64-bit builds: (v ^ m) - m restores the sign there and
    # is the identity on 32-bit targets. Every signed word is loaded through it.
    m = 1
    m <<= 31
    angle_max = _ANGLE_MAX_KNRAD
    angle_max *= 1000
    los_max = _LOS_DIFF_HALF_NRAD
    los_max <<= 1
    bias_max_q6 = _BIAS_MAX_NRAD
    bias_max_q6 <<= 6
    state = st[_S_STATE]
    period = st[_OFF_CFG + _K_PERIOD_US]
    step = st[_S_STEP] + 1  # stored as 32 bits on every target: wraps after 2**32 steps
    st[_S_STEP] = step
    nodes = st[_OFF_NODES]
    # the last node a segment may begin at: the table's last but one, and the window's
    # (a segment reads its node and the next)
    last_seg = nodes - 2
    resident_seg = st[_OFF_WIN_LAST] - 1
    if resident_seg < last_seg:
        last_seg = resident_seg
        if last_seg < 0:
            last_seg = 0
    # Pass time as (node, us since the node): never above 11 s of us, so it cannot wrap
    # however long the loop runs (an int32 us clock went negative after 35.8 min).
    node = st[_S_NODE]
    node_us = st[_S_NODE_US]
    if state != IDLE:
        node_us += period
        if node_us >= _NODE_US and node < nodes - 2:
            if node < last_seg:
                node += 1
                node_us -= _NODE_US
            else:
                # the pager has not brought the next node in: extrapolate from this one,
                # as past the table's end (then hold), and count the step
                late = st[_OFF_WIN_LATE]
                if late < _COUNT_MAX:
                    st[_OFF_WIN_LATE] = late + 1
                if node_us > _SEGMENT_US_MAX:
                    node_us = _SEGMENT_US_MAX
        elif node_us > _SEGMENT_US_MAX:
            node_us = _SEGMENT_US_MAX
    in_state = st[_S_IN_STATE]
    if in_state < _COUNT_MAX:
        in_state += 1
    st[_S_IN_STATE] = in_state

    # -------- commands
    cmd = st[_S_CMD]
    st[_S_CMD] = 0
    if cmd == 2 and state != IDLE:
        _log_transition(st, IDLE, R_COMMAND_STOP)
        state = IDLE
    if cmd == 1 and state == IDLE:
        start_ms = st[_S_START_MS]
        node = start_ms // 1000
        node_us = (start_ms - node * 1000) * 1000
        if node > last_seg:  # started past the table: extrapolate from the last segment
            beyond = node - last_seg
            node = last_seg
            if beyond > 11:
                node_us = _SEGMENT_US_MAX
            else:
                node_us += beyond * _NODE_US
                if node_us > _SEGMENT_US_MAX:
                    node_us = _SEGMENT_US_MAX
        st[_S_BX] = 0
        st[_S_BY] = 0
        st[_S_BDX] = 0
        st[_S_BDY] = 0
        st[_S_TM_COUNTDOWN] = 0
        _log_transition(st, OPEN_LOOP, _R_COMMAND_START)
        state = OPEN_LOOP
    if node > last_seg:  # a table reloaded shorter while idle: never read past its end
        node = last_seg
    st[_S_NODE] = node
    st[_S_NODE_US] = node_us

    # -------- prediction: quadratic from the node at or before the pass time. Table
    # fields are bounded on upload (_TABLE_LIMITS), t_ms <= 11000 and acc_ms <= 2000, so
    # |v t| <= 7.2e8, the acceleration term's intermediate <= 2.05e9, and the sum is
    # saturated at +-_ANGLE_MAX_NRAD without forming anything beyond 2**31.
    t_ms = node_us // 1000
    held = node_us >= _SEGMENT_US_MAX  # past the extrapolation: hold, no rate fed forward
    win_mask = st[_OFF_WIN_MASK]
    row = (node & win_mask) * _TABLE_WORDS
    next_row = ((node + 1) & win_mask) * _TABLE_WORDS
    acc_ms = t_ms
    if acc_ms > 2000:
        acc_ms = 2000
    ax = (table[row + 4] ^ m) - m
    ay = (table[row + 5] ^ m) - m
    vx = (table[row + 2] ^ m) - m
    vy = (table[row + 3] ^ m) - m
    x0 = (table[row] ^ m) - m
    dx = vx * t_ms + ((((ax * acc_ms) >> 8) * acc_ms) >> 9)
    if dx > 0 and x0 > angle_max - dx:
        pred_x = angle_max
    elif dx < 0 and x0 < 0 - (angle_max + dx):
        pred_x = 0 - angle_max
    else:
        pred_x = x0 + dx
    x0 = (table[row + 1] ^ m) - m
    dx = vy * t_ms + ((((ay * acc_ms) >> 8) * acc_ms) >> 9)
    if dx > 0 and x0 > angle_max - dx:
        pred_y = angle_max
    elif dx < 0 and x0 < 0 - (angle_max + dx):
        pred_y = 0 - angle_max
    else:
        pred_y = x0 + dx
    vff_x = vx + ((ax * acc_ms) >> 16)  # nrad/ms
    vff_y = vy + ((ay * acc_ms) >> 16)
    if held:
        vff_x = 0
        vff_y = 0
    # Point-ahead: linear between the node and the next, fraction in Q10 of a second.
    frac_q10 = t_ms
    if frac_q10 > 1000:
        frac_q10 = 1000
    frac_q10 = (frac_q10 * 1049) >> 10
    pa0 = (table[row + 6] ^ m) - m
    pa_x = pa0 + ((((table[next_row + 6] ^ m) - m - pa0) * frac_q10) >> 10)
    pa0 = (table[row + 7] ^ m) - m
    pa_y = pa0 + ((((table[next_row + 7] ^ m) - m - pa0) * frac_q10) >> 10)

    # -------- sensors
    qa = st[_OFF_IO + _IO_QA] & 0xFFFF  # 16-bit ADC: a corrupt word cannot overflow S
    qb = st[_OFF_IO + _IO_QB] & 0xFFFF
    qc = st[_OFF_IO + _IO_QC] & 0xFFFF
    qd = st[_OFF_IO + _IO_QD] & 0xFFFF
    signal = qa + qb + qc + qd - 4 * st[_OFF_CFG + _K_QPD_BG]
    fine_ok = signal >= st[_OFF_CFG + _K_QPD_THR]
    ex = 0
    ey = 0
    if fine_ok:
        gain = st[_OFF_CFG + _K_QPD_GAIN]
        # X = ((B+D)-(A+C))/S, Y = ((A+B)-(C+D))/S (Q12, |diff| <= S < 2**18 so diff << 12
        # fits), then x = w/sqrt(2) erfinv(X), erfinv(X) ~ sqrt(pi)/2 (X + pi/12 X^3 +
        # 7 pi^2/480 X^5): the fifth-order inverse of X = erf(sqrt(2) x / w). Inlined for
        # both axes: a viper call costs more than this arithmetic on the MCU.
        dx = (qb + qd) - (qa + qc)
        neg = dx < 0
        if neg:
            dx = 0 - dx
        if dx > signal:
            dx = signal
        x = (dx << 12) // signal
        x3 = ((x * x) >> 12) * x >> 12
        x5 = ((x3 * x) >> 12) * x >> 12
        ex = ((x + ((x3 * 1072) >> 12) + ((x5 * 590) >> 12)) * gain) >> 8
        if neg:
            ex = 0 - ex
        dy = (qa + qb) - (qc + qd)
        neg = dy < 0
        if neg:
            dy = 0 - dy
        if dy > signal:
            dy = signal
        x = (dy << 12) // signal
        x3 = ((x * x) >> 12) * x >> 12
        x5 = ((x3 * x) >> 12) * x >> 12
        ey = ((x + ((x3 * 1072) >> 12) + ((x5 * 590) >> 12)) * gain) >> 8
        if neg:
            ey = 0 - ey
        if ex > _E_CLAMP:
            ex = _E_CLAMP
        elif ex < 0 - _E_CLAMP:
            ex = 0 - _E_CLAMP
        if ey > _E_CLAMP:
            ey = _E_CLAMP
        elif ey < 0 - _E_CLAMP:
            ey = 0 - _E_CLAMP
        if st[_S_QPD_RUN] < _COUNT_MAX:
            st[_S_QPD_RUN] = st[_S_QPD_RUN] + 1
        st[_S_QPD_MISS] = 0
    else:
        if st[_S_QPD_MISS] < _COUNT_MAX:
            st[_S_QPD_MISS] = st[_S_QPD_MISS] + 1
        st[_S_QPD_RUN] = 0
    cam_new = st[_OFF_IO + _IO_CAM_NEW]
    cam_x = (st[_OFF_IO + _IO_CAM_X] ^ m) - m
    cam_y = (st[_OFF_IO + _IO_CAM_Y] ^ m) - m
    cam_ok = ((st[_OFF_IO + _IO_CAM_SIGNAL] ^ m) - m) >= st[_OFF_CFG + _K_CAM_THR]
    if cam_new:
        if cam_ok:
            if st[_S_CAM_RUN] < _COUNT_MAX:
                st[_S_CAM_RUN] = st[_S_CAM_RUN] + 1
            st[_S_CAM_MISS] = 0
        else:
            if st[_S_CAM_MISS] < _COUNT_MAX:
                st[_S_CAM_MISS] = st[_S_CAM_MISS] + 1
            st[_S_CAM_RUN] = 0
    ars_x = (st[_OFF_IO + IO_ARS_X] ^ m) - m
    if ars_x > _ARS_CLAMP:
        ars_x = _ARS_CLAMP
    elif ars_x < 0 - _ARS_CLAMP:
        ars_x = 0 - _ARS_CLAMP
    ars_y = (st[_OFF_IO + IO_ARS_Y] ^ m) - m
    if ars_y > _ARS_CLAMP:
        ars_y = _ARS_CLAMP
    elif ars_y < 0 - _ARS_CLAMP:
        ars_y = 0 - _ARS_CLAMP
    enc_x = (st[_OFF_IO + _IO_ENC_X] ^ m) - m
    if enc_x > angle_max:
        enc_x = angle_max
    elif enc_x < 0 - angle_max:
        enc_x = 0 - angle_max
    enc_y = (st[_OFF_IO + _IO_ENC_Y] ^ m) - m
    if enc_y > angle_max:
        enc_y = angle_max
    elif enc_y < 0 - angle_max:
        enc_y = 0 - angle_max
    # Prediction - encoder, saturated at +-2**30: both are within +-1.5e9, so their halves'
    # difference fits, and the full difference is formed only when it does too.
    los_x = (pred_x >> 1) - (enc_x >> 1)
    if los_x > _LOS_DIFF_HALF_NRAD:
        los_x = los_max
    elif los_x < 0 - _LOS_DIFF_HALF_NRAD:
        los_x = 0 - los_max
    else:
        los_x = pred_x - enc_x
    los_y = (pred_y >> 1) - (enc_y >> 1)
    if los_y > _LOS_DIFF_HALF_NRAD:
        los_y = los_max
    elif los_y < 0 - _LOS_DIFF_HALF_NRAD:
        los_y = 0 - los_max
    else:
        los_y = pred_y - enc_y
    fsm_prev_x = (
        st[_OFF_IO + IO_FSM_X] ^ m
    ) - m  # the command applied while this sample was taken
    fsm_prev_y = (st[_OFF_IO + IO_FSM_Y] ^ m) - m
    limit = st[_OFF_CFG + _K_FSM_LIMIT]
    ilim = limit << 8  # integrator bound, Q8
    bias_x = ((st[_S_BX] ^ m) - m) >> 6
    bias_y = ((st[_S_BY] ^ m) - m) >> 6

    # -------- transitions on measured signal
    cam_seen = cam_new and st[_S_CAM_RUN] >= st[_OFF_CFG + _K_CAM_CONFIRM]
    if state == OPEN_LOOP or state == SCAN or state == REACQ or state == LOST:
        if cam_seen:
            _log_transition(st, COARSE, _R_CAMERA_SIGNAL)
            state = COARSE
            st[_S_CRX] = 0
            st[_S_CRY] = 0
    elif state == COARSE:
        if (
            st[_S_QPD_RUN] >= st[_OFF_CFG + _K_QPD_CONFIRM]
            and int(_clamp(cam_x, st[_OFF_CFG + _K_HANDOVER])) == cam_x
            and int(_clamp(cam_y, st[_OFF_CFG + _K_HANDOVER])) == cam_y
        ):
            _log_transition(st, FINE, _R_FINE_SIGNAL)
            state = FINE
            st[_S_IX] = 0
            st[_S_IY] = 0
            st[_S_I2X] = 0
            st[_S_I2Y] = 0
            st[_S_JX] = 0
            st[_S_JY] = 0
            st[_S_EPX] = ex
            st[_S_EPY] = ey
            st[_S_BDX] = 0
            st[_S_BDY] = 0
            for i in range(4 * _WHEEL_LINES):
                st[_S_RES + i] = 0
        elif cam_new and st[_S_CAM_MISS] >= st[_OFF_CFG + _K_CAM_LOSS]:
            _log_transition(st, REACQ, _R_CAMERA_LOST)
            state = REACQ
    elif state == FINE:
        if st[_S_QPD_MISS] >= st[_OFF_CFG + _K_LOSS_SAMPLES]:
            _log_transition(st, HOLD, _R_SIGNAL_LOST)
            state = HOLD
    elif state == HOLD:
        if st[_S_QPD_RUN] >= st[_OFF_CFG + _K_QPD_CONFIRM]:
            _log_transition(st, FINE, _R_SIGNAL_BACK)
            state = FINE
            st[_S_EPX] = ex
            st[_S_EPY] = ey
        elif cam_seen and (
            int(_clamp(cam_x, st[_OFF_CFG + _K_HANDOVER])) != cam_x
            or int(_clamp(cam_y, st[_OFF_CFG + _K_HANDOVER])) != cam_y
        ):
            # The camera sees the beacon away from the QPD's field: close the coarse loop
            # again. Near the centre the QPD will see it back first (a scintillation fade
            # of the QPD while the camera's 10 ms frame still integrates light).
            _log_transition(st, COARSE, _R_CAMERA_SIGNAL)
            state = COARSE
            st[_S_CRX] = 0
            st[_S_CRY] = 0
        elif st[_S_IN_STATE] >= st[_OFF_CFG + _K_HOLD_STEPS]:
            _log_transition(st, REACQ, _R_HOLD_TIMEOUT)
            state = REACQ

    # -------- controllers per state
    fsm_x = 0
    fsm_y = 0
    rate_x = 0
    rate_y = 0
    spm = st[_OFF_CFG + _K_SPM]
    if state == OPEN_LOOP or state == SCAN or state == REACQ or state == LOST:
        off_x = 0
        off_y = 0
        if state == SCAN or state == REACQ:
            radius_max = st[_OFF_CFG + _K_SCAN_RADIUS]
            max_scans = st[_OFF_CFG + _K_MAX_SCANS]
            if state == REACQ:
                radius_max = st[_OFF_CFG + _K_REACQ_RADIUS]
                max_scans = st[_OFF_CFG + _K_MAX_REACQ]
            phase = st[_S_PHASE]
            r = ((st[_OFF_CFG + _K_SCAN_PITCH] >> 4) * (phase >> 8)) >> 4
            if r > radius_max:
                phase = 0
                r = 0
                st[_S_SCANS] = st[_S_SCANS] + 1
            r_div = r
            if r_div < st[_OFF_CFG + _K_SCAN_RMIN]:
                r_div = st[_OFF_CFG + _K_SCAN_RMIN]
            st[_S_PHASE] = phase + st[_OFF_CFG + _K_SCAN_K] // r_div
            idx = (phase >> 6) & (_SIN_SIZE - 1)
            sin_q14 = int(sin[idx]) - _SIN_BIAS
            cos_q14 = int(sin[(idx + (_SIN_SIZE >> 2)) & (_SIN_SIZE - 1)]) - _SIN_BIAS
            off_x = ((r >> 7) * cos_q14) >> 7
            off_y = ((r >> 7) * sin_q14) >> 7
            if st[_S_SCANS] >= max_scans:
                _log_transition(st, LOST, _R_SCAN_EXHAUSTED)
                state = LOST
                off_x = 0
                off_y = 0
        # Position loop on the encoder toward prediction + learned bias + scan offset,
        # with the prediction's rate and the spiral's rate fed forward.
        dx = los_x + bias_x + off_x  # each term bounded: 2**30 + 2**24 + 2**24
        dy = los_y + bias_y + off_y
        last_x = (st[_S_OFFX] ^ m) - m
        last_y = (st[_S_OFFY] ^ m) - m
        if state != SCAN and state != REACQ or in_state <= 1:
            last_x = off_x
            last_y = off_y
        st[_S_OFFX] = off_x
        st[_S_OFFY] = off_y
        kol = st[_OFF_CFG + _K_KOL]
        spm4 = spm >> 2  # <= 2**16 at 4 kHz: times a step of <= 2**14 nrad fits
        rate_x = vff_x + ((int(_clamp(dx, 1 << 20)) * kol) >> 16)
        rate_x += (int(_clamp(off_x - last_x, _SCAN_OFF_STEP_MAX)) * spm4) >> 14
        rate_y = vff_y + ((int(_clamp(dy, 1 << 20)) * kol) >> 16)
        rate_y += (int(_clamp(off_y - last_y, _SCAN_OFF_STEP_MAX)) * spm4) >> 14
        if state == OPEN_LOOP:
            settle = st[_OFF_CFG + _K_SETTLE]
            if int(_clamp(dx, settle)) == dx and int(_clamp(dy, settle)) == dy:
                _log_transition(st, SCAN, _R_ON_PREDICTION)
                state = SCAN
                st[_S_OFFX] = 0
                st[_S_OFFY] = 0
    elif state == COARSE:
        if cam_new and cam_ok:
            kc = st[_OFF_CFG + _K_KC]
            st[_S_CRX] = (int(_clamp(cam_x, 1 << 20)) * kc) >> 16
            st[_S_CRY] = (int(_clamp(cam_y, 1 << 20)) * kc) >> 16
            # The camera measures where the beacon is: learn the prediction's bias.
            st[_S_BX] = int(_clamp(cam_x - los_x, _BIAS_MAX_NRAD)) << 6
            st[_S_BY] = int(_clamp(cam_y - los_y, _BIAS_MAX_NRAD)) << 6
        rate_x = vff_x + ((st[_S_CRX] ^ m) - m)
        rate_y = vff_y + ((st[_S_CRY] ^ m) - m)
    elif state == FINE or state == HOLD:
        alpha = st[_OFF_CFG + _K_ALPHA]
        beta = st[_OFF_CFG + _K_BETA]
        bx = (st[_S_BX] ^ m) - m
        by = (st[_S_BY] ^ m) - m
        bdx = (st[_S_BDX] ^ m) - m
        bdy = (st[_S_BDY] ^ m) - m
        bx += bdx >> 10  # predictor: bias Q6 advances by its rate (Q16 nrad/step)
        by += bdy >> 10
        if state == FINE and fine_ok:
            # Residual of the measured LOS (encoder + mirror + error) against the
            # predicted one: alpha-beta update of the bias and its rate.
            rx = fsm_prev_x + ex - los_x - (bx >> 6)
            if rx > _E_CLAMP:
                rx = _E_CLAMP
            elif rx < 0 - _E_CLAMP:
                rx = 0 - _E_CLAMP
            ry = fsm_prev_y + ey - los_y - (by >> 6)
            if ry > _E_CLAMP:
                ry = _E_CLAMP
            elif ry < 0 - _E_CLAMP:
                ry = 0 - _E_CLAMP
            bx += (alpha * rx) >> 10
            by += (alpha * ry) >> 10
            bdx = bdx + beta * rx
            if bdx > _BIAS_RATE_MAX_Q16:
                bdx = _BIAS_RATE_MAX_Q16
            elif bdx < 0 - _BIAS_RATE_MAX_Q16:
                bdx = 0 - _BIAS_RATE_MAX_Q16
            bdy = bdy + beta * ry
            if bdy > _BIAS_RATE_MAX_Q16:
                bdy = _BIAS_RATE_MAX_Q16
            elif bdy < 0 - _BIAS_RATE_MAX_Q16:
                bdy = 0 - _BIAS_RATE_MAX_Q16
            # PID plus a second integrator (type 2: rejects the coarse axis' ramp and
            # low-frequency vibration as f^2), conditional integration as anti-windup.
            kp = st[_OFF_CFG + _K_KP]
            ki = st[_OFF_CFG + _K_KI]
            kii = st[_OFF_CFG + _K_KII]
            kd = st[_OFF_CFG + _K_KD]
            ix = (st[_S_IX] ^ m) - m
            iy = (st[_S_IY] ^ m) - m
            i2x = (st[_S_I2X] ^ m) - m
            i2y = (st[_S_I2Y] ^ m) - m
            # the previous errors and the feed-forward taps, each loaded once (every
            # sign-restoring load costs ~10 instructions on the M3; the resonators and
            # both axes read them: docs/scheduling.md "The paced loop")
            epx = (st[_S_EPX] ^ m) - m
            epy = (st[_S_EPY] ^ m) - m
            dex = ex - epx
            if dex > _E_CLAMP:
                dex = _E_CLAMP
            elif dex < 0 - _E_CLAMP:
                dex = 0 - _E_CLAMP
            dey = ey - epy
            if dey > _E_CLAMP:
                dey = _E_CLAMP
            elif dey < 0 - _E_CLAMP:
                dey = 0 - _E_CLAMP
            # Integrate first so u_k contains e_k in every term (the form the validator
            # checks); keep the new integrator values only if the mirror is not driven
            # further into its limit (conditional integration).
            jx = ((st[_S_JX] ^ m) - m) + ex
            if jx > _J_CLAMP:
                jx = _J_CLAMP
            elif jx < 0 - _J_CLAMP:
                jx = 0 - _J_CLAMP
            jy = ((st[_S_JY] ^ m) - m) + ey
            if jy > _J_CLAMP:
                jy = _J_CLAMP
            elif jy < 0 - _J_CLAMP:
                jy = 0 - _J_CLAMP
            nix = ix + ((ki * ex) >> 4)
            if nix > ilim:
                nix = ilim
            elif nix < 0 - ilim:
                nix = 0 - ilim
            niy = iy + ((ki * ey) >> 4)
            if niy > ilim:
                niy = ilim
            elif niy < 0 - ilim:
                niy = 0 - ilim
            ni2x = i2x + ((kii * jx) >> 4)
            if ni2x > ilim:
                ni2x = ilim
            elif ni2x < 0 - ilim:
                ni2x = 0 - ilim
            ni2y = i2y + ((kii * jy) >> 4)
            if ni2y > ilim:
                ni2y = ilim
            elif ni2y < 0 - ilim:
                ni2y = 0 - ilim
            # Resonators at the wheel lines: r = a1 r1 - a2 r2 + b0 e + b1 e_prev, Q12
            # coefficients, |r| <= 2**17 so every product stays below 2**30.
            res_x = 0
            res_y = 0
            for line in range(_WHEEL_LINES):
                c = _OFF_CFG + _K_RES + 4 * line
                a1 = (st[c] ^ m) - m
                a2 = (st[c + 1] ^ m) - m
                b0 = (st[c + 2] ^ m) - m
                b1 = (st[c + 3] ^ m) - m
                i = _S_RES + 2 * line
                r1 = (st[i] ^ m) - m
                r = (a1 * r1 - a2 * ((st[i + 1] ^ m) - m) + b0 * ex
                     + b1 * epx) >> 12  # fmt: skip
                if r > _RES_MAX_NRAD:
                    r = _RES_MAX_NRAD
                elif r < 0 - _RES_MAX_NRAD:
                    r = 0 - _RES_MAX_NRAD
                st[i + 1] = r1
                st[i] = r
                res_x += r
                i = _S_RES + 4 + 2 * line
                r1 = (st[i] ^ m) - m
                r = (a1 * r1 - a2 * ((st[i + 1] ^ m) - m) + b0 * ey
                     + b1 * epy) >> 12  # fmt: skip
                if r > _RES_MAX_NRAD:
                    r = _RES_MAX_NRAD
                elif r < 0 - _RES_MAX_NRAD:
                    r = 0 - _RES_MAX_NRAD
                st[i + 1] = r1
                st[i] = r
                res_y += r
            # Feed-forward of the platform jitter the angular-rate sensor saw: a 4-tap
            # filter on ARS(k)..ARS(k-3) (|tap| <= 1 Q12, |ARS| <= 2**16: sum < 2**30)
            # that predicts it across the loop's latency (docs/tracking.md).
            c = _OFF_CFG + _K_ARS
            tap0 = (st[c] ^ m) - m
            tap1 = (st[c + 1] ^ m) - m
            tap2 = (st[c + 2] ^ m) - m
            tap3 = (st[c + 3] ^ m) - m
            res_x += (tap0 * ars_x
                      + tap1 * ((st[_S_ARS] ^ m) - m)
                      + tap2 * ((st[_S_ARS + 1] ^ m) - m)
                      + tap3 * ((st[_S_ARS + 2] ^ m) - m)) >> 12  # fmt: skip
            res_y += (tap0 * ars_y
                      + tap1 * ((st[_S_ARS + 3] ^ m) - m)
                      + tap2 * ((st[_S_ARS + 4] ^ m) - m)
                      + tap3 * ((st[_S_ARS + 5] ^ m) - m)) >> 12  # fmt: skip
            ux = ((kp * ex) >> 12) + (nix >> 8) + (ni2x >> 8) + ((kd * dex) >> 12) + res_x
            uy = ((kp * ey) >> 12) + (niy >> 8) + (ni2y >> 8) + ((kd * dey) >> 12) + res_y
            if (ux >= limit and ex > 0) or (ux <= 0 - limit and ex < 0):
                ux = ((kp * ex) >> 12) + (ix >> 8) + (i2x >> 8) + ((kd * dex) >> 12) + res_x
            else:
                ix = nix
                i2x = ni2x
                st[_S_JX] = jx
            if (uy >= limit and ey > 0) or (uy <= 0 - limit and ey < 0):
                uy = ((kp * ey) >> 12) + (iy >> 8) + (i2y >> 8) + ((kd * dey) >> 12) + res_y
            else:
                iy = niy
                i2y = ni2y
                st[_S_JY] = jy
            st[_S_IX] = ix
            st[_S_IY] = iy
            st[_S_I2X] = i2x
            st[_S_I2Y] = i2y
            st[_S_EPX] = ex
            st[_S_EPY] = ey
            fsm_x = ux
            if fsm_x > limit:
                fsm_x = limit
            elif fsm_x < 0 - limit:
                fsm_x = 0 - limit
            fsm_y = uy
            if fsm_y > limit:
                fsm_y = limit
            elif fsm_y < 0 - limit:
                fsm_y = 0 - limit
        elif state == FINE:
            # A fade shorter than loss_samples (scintillation): hold the mirror and the
            # integrators where they are; the next lit sample continues bumplessly.
            fsm_x = fsm_prev_x
            fsm_y = fsm_prev_y
        else:
            # No beacon this sample: point the mirror where the predictor says the
            # beacon is, and keep the integrator there so the return is bumpless.
            fsm_x = los_x + (bx >> 6)
            if fsm_x > limit:
                fsm_x = limit
            elif fsm_x < 0 - limit:
                fsm_x = 0 - limit
            fsm_y = los_y + (by >> 6)
            if fsm_y > limit:
                fsm_y = limit
            elif fsm_y < 0 - limit:
                fsm_y = 0 - limit
            st[_S_IX] = fsm_x << 8
            st[_S_IY] = fsm_y << 8
            st[_S_I2X] = 0
            st[_S_I2Y] = 0
            st[_S_JX] = 0
            st[_S_JY] = 0
            st[_S_EPX] = 0
            st[_S_EPY] = 0
            for i in range(4 * _WHEEL_LINES):
                st[_S_RES + i] = 0
        # The bias saturates at +-16.8 mrad (Q6 then stays below 2**30; a Q6 int32 wrapped
        # at 33.5 mrad before).
        if bx > bias_max_q6:
            bx = bias_max_q6
        elif bx < 0 - bias_max_q6:
            bx = 0 - bias_max_q6
        if by > bias_max_q6:
            by = bias_max_q6
        elif by < 0 - bias_max_q6:
            by = 0 - bias_max_q6
        st[_S_BX] = bx
        st[_S_BY] = by
        st[_S_BDX] = bdx
        st[_S_BDY] = bdy
        # Offload the mirror's deflection to the coarse axis, with the prediction's rate
        # and the predictor's bias rate fed forward.
        ko = st[_OFF_CFG + _K_KO]
        # bdx * spm / 2**32 (nrad/ms) with |bdx >> 12| < 2**15 and spm >> 2 <= 2**16.
        bias_rate_x = ((bdx >> 12) * (spm >> 2)) >> 18
        bias_rate_y = ((bdy >> 12) * (spm >> 2)) >> 18
        rate_x = vff_x + bias_rate_x + ((fsm_x * ko) >> 16)
        rate_y = vff_y + bias_rate_y + ((fsm_y * ko) >> 16)

    # the angular-rate sensor's history, kept in every state (FINE starts with it full)
    st[_S_ARS + 2] = st[_S_ARS + 1]
    st[_S_ARS + 1] = st[_S_ARS]
    st[_S_ARS] = ars_x
    st[_S_ARS + 5] = st[_S_ARS + 4]
    st[_S_ARS + 4] = st[_S_ARS + 3]
    st[_S_ARS + 3] = ars_y
    rate_limit = st[_OFF_CFG + _K_RATE_LIMIT]
    st[_OFF_IO + IO_FSM_X] = fsm_x
    st[_OFF_IO + IO_FSM_Y] = fsm_y
    if rate_x > rate_limit:
        rate_x = rate_limit
    elif rate_x < 0 - rate_limit:
        rate_x = 0 - rate_limit
    if rate_y > rate_limit:
        rate_y = rate_limit
    elif rate_y < 0 - rate_limit:
        rate_y = 0 - rate_limit
    st[_OFF_IO + IO_RATE_X] = rate_x
    st[_OFF_IO + _IO_RATE_Y] = rate_y
    if state == IDLE:
        pa_x = 0
        pa_y = 0
    st[_OFF_IO + _IO_PA_X] = pa_x
    st[_OFF_IO + _IO_PA_Y] = pa_y
    st[_OFF_IO + _IO_STATE] = state
    st[_OFF_IO + IO_ERR_X] = ex
    st[_OFF_IO + IO_ERR_Y] = ey
    st[_OFF_IO + _IO_SIGNAL] = signal
    st[_OFF_IO + IO_PRED_X] = pred_x
    st[_OFF_IO + IO_PRED_Y] = pred_y

    # -------- telemetry ring (decimated); a full ring drops the sample and counts it
    countdown = st[_S_TM_COUNTDOWN] - 1
    if state != IDLE and countdown <= 0:
        countdown = st[_OFF_CFG + _K_TELEM_DECIM]
        head = st[_S_TM_HEAD]
        tm_mask = st[_OFF_TM_MASK]  # the ring's slots - 1 (a power of two: no division)
        if head - st[_S_TM_TAIL] > tm_mask:
            st[_S_TM_LOST] = st[_S_TM_LOST] + 1
        else:
            i = (head & tm_mask) * TM_SAMPLE_WORDS
            st[_OFF_TM + i] = step
            st[_OFF_TM + i + 1] = state
            st[_OFF_TM + i + 2] = signal
            st[_OFF_TM + i + 3] = ex
            st[_OFF_TM + i + 4] = ey
            st[_OFF_TM + i + 5] = fsm_x
            st[_OFF_TM + i + 6] = fsm_y
            st[_S_TM_HEAD] = head + 1
    if countdown < 0:
        countdown = 0
    st[_S_TM_COUNTDOWN] = countdown
    return state


@micropython.viper
def words_idle(words: ptr32) -> bool:
    """Tracker.idle() from the tracker's words, in one native call (a method call in
    bytecode costs ~1.5k instructions on the M3: the tracking duty asks every period)."""
    return words[_S_STATE] == IDLE and words[_S_CMD] == 0


# The kernel itself, for a caller that steps every period without the method call:
# step_kernel(tracker.words, tracker.table, tracker.sin_table) is Tracker.step().
step_kernel = _step
