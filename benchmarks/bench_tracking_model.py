"""The frequency-domain model the fine loop's gains and the angular-rate sensor's taps were
tuned on, and the lower bound of a QPD-only loop (docs/tracking.md "Tuning"). Prints the
model's residuals; the lockstep runs (bench_tracking.py) are the measurement."""

from __future__ import annotations

import importlib.util
import math
import sys
import types
from pathlib import Path

import numpy as np
from scipy.signal import welch

from emulator.optical_plant import PlantParams, vibration_series

FS = 2000.0
TRACKING_PY = Path(__file__).parents[1] / "firmware" / "payload" / "tracking.py"
QPD_ONLY = dict(fine_kp=0.108, fine_ki=0.287, fine_kii=0.084, fine_kd=0.002,
                wheel_line_gains=(0.031, 0.0128), wheel_line_phases_deg=(-70.0, 37.7),
                ars_feedforward_taps=(0.0, 0.0, 0.0, 0.0))  # fmt: skip


def _firmware_tracking():
    """firmware/payload/tracking.py under CPython, for its validator and loop polynomials
    (one implementation): `micropython` is given as a module whose decorators do nothing."""
    shim = types.ModuleType("micropython")
    shim.const = lambda v: v
    shim.viper = shim.native = lambda f: f
    saved = sys.modules.get("micropython")
    sys.modules["micropython"] = shim
    import builtins

    for name in ("ptr8", "ptr16", "ptr32"):
        setattr(builtins, name, int)
    # tracking.py imports its constants from the payload package (payload._sin_q14)
    firmware_dir = str(TRACKING_PY.parents[1])
    sys.path.insert(0, firmware_dir)
    modules_before = set(sys.modules)
    try:
        spec = importlib.util.spec_from_file_location("tracking_cpython", TRACKING_PY)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(firmware_dir)
        for name in set(sys.modules) - modules_before:
            if name == "payload" or name.startswith("payload."):
                del sys.modules[name]
        if saved is None:
            del sys.modules["micropython"]
        for name in ("ptr8", "ptr16", "ptr32"):
            delattr(builtins, name)
    return module


def _vibration(seed, n, fs=FS):
    p = PlantParams()
    return vibration_series(np.random.default_rng(seed), n, fs, p.vibration_rms_urad,
                            p.vibration_tones_hz, rolloff_order=p.vibration_rolloff_order,
                            wheel_lines=p.wheel_lines,
                            floor_urad_rthz=p.vibration_floor_urad_rthz) / 1e-6  # fmt: skip


def _residual(trk, config, f, psd, ars_noise, qpd_noise_urad=0.2):
    c = dict(trk.DEFAULTS)
    c.update(config)
    fs = float(c["loop_rate_hz"])
    # QPD noise per sample at 2 kHz; a longer sample collects more photons (same density)
    qpd_noise_urad *= math.sqrt(fs / FS)
    q = np.exp(-2j * np.pi * f / fs)
    trk.validate(c)  # the firmware's own stability and robustness checks
    poly = lambda coeffs: sum(v * q**i for i, v in enumerate(coeffs))  # noqa: E731
    p_num, p_den = trk.mirror_zoh(700.0, 0.1, 1.0 / fs)
    plant = q * poly(p_num) / poly(p_den)  # one sample of latency
    d = [1.0, -1.0]
    d2 = trk._poly_mul(d, d)
    num = trk._poly_add(
        trk._poly_add([c["fine_kp"] * v for v in d2], [c["fine_ki"] * v for v in d]),
        [c["fine_kii"]],
    )
    num = trk._poly_add(num, [c["fine_kd"] * v for v in trk._poly_mul(d2, d)])  # fmt: skip
    den = d2
    for hz, g, ph in zip(
        c["wheel_lines_hz"], c["wheel_line_gains"], c["wheel_line_phases_deg"], strict=True
    ):
        r_num, r_den = trk.wheel_resonator(hz, g, ph, fs, c["wheel_line_pole_radius"])
        num = trk._poly_add(trk._poly_mul(num, r_den), trk._poly_mul(r_num, den))
        den = trk._poly_mul(den, r_den)
    ctrl = poly(num) / poly(den)
    s_fn = 1.0 / (1.0 + plant * ctrl)
    taps = [round(t * 4096) / 4096 for t in c["ars_feedforward_taps"]]
    ff = poly(taps)
    jw = 2j * np.pi * f
    highpass = jw / (jw + 2 * np.pi * 2.0)  # the sensor's 2 Hz high-pass
    ars_psd = ars_noise**2 / np.maximum(2 * np.pi * f, 1.0) ** 2 * np.abs(highpass) ** 2
    total = (np.abs(s_fn * (1 - plant * ff * highpass)) ** 2 * psd
             + np.abs(s_fn * plant * ff) ** 2 * ars_psd
             + np.abs(plant * ctrl * s_fn) ** 2 * 2 * qpd_noise_urad**2 / fs)  # fmt: skip
    band = f >= 0.5
    return math.sqrt(float(np.sum(total[band]) * (f[1] - f[0])))


def _prediction_bound(seed, delay, taps=256, n=40000, qpd_noise_urad=0.2):
    """RMS error of the least-squares linear predictor of the jitter `delay` samples ahead
    from `taps` noisy QPD samples: no loop on the QPD alone does better."""
    rng = np.random.default_rng(100 + seed)
    jitter = _vibration(seed, n)
    seen = jitter + qpd_noise_urad * rng.standard_normal(n)
    rows = np.lib.stride_tricks.sliding_window_view(seen, taps)[:, ::-1]
    x = rows[: n - taps - delay + 1]
    y = jitter[taps - 1 + delay :][: x.shape[0]]
    w, *_ = np.linalg.lstsq(x, y, rcond=None)
    return float(np.std(y - x @ w))


def test_frequency_domain_model_and_qpd_only_bound():
    trk = _firmware_tracking()
    f, psd = welch(_vibration(1, 80000), FS, nperseg=16384)
    print("\n[tracking model] culmination residual RMS (urad), QPD noise 0.2 urad/sample:")
    rows = (
        ("QPD only, the previous default gains", QPD_ONLY, 2.0),
        ("previous gains + sensor taps", dict(QPD_ONLY, ars_feedforward_taps=trk.DEFAULTS[
            "ars_feedforward_taps"]), 2.0),
        ("default (retuned gains + sensor taps), N 2 urad/s/rtHz", {}, 2.0),
        ("default, sensor noise 3x (N 6)", {}, 6.0),
    )  # fmt: skip
    figures = {}
    for label, config, noise in rows:
        figures[label] = _residual(trk, config, f, psd, noise)
        print(f"[tracking model]  {label:58s} {figures[label]:.3f}")
    f1k, psd1k = welch(_vibration(1, 40000, 1000.0), 1000.0, nperseg=8192)
    # the 1 kHz set, the firmware's own (tracking.RATE_SETS: a pass on the MCU boards gets
    # it): Nelder-Mead over the same 12 parameters on this model at 1 kHz, every pole inside
    # 0.9985 at 0.5x / 1.5x slope and with a second sample of latency
    one_khz = _residual(trk, trk.RATE_SETS[1000], f1k, psd1k, 2.0)
    print(f"[tracking model]  {'1 kHz set at 1 kHz (the application rate), N 2':58s} "
          f"{one_khz:.3f}")  # fmt: skip
    try:  # the 2 kHz default gains at 1 kHz: refused (the set is per rate)
        _residual(trk, {"loop_rate_hz": 1000}, f1k, psd1k, 2.0)
        raise AssertionError("the 2 kHz default set was accepted at 1 kHz")
    except trk.ConfigError as e:
        print(f"[tracking model]  2 kHz default gains at 1 kHz: refused ({e})")
    for delay in (2, 3):
        bounds = [_prediction_bound(seed, delay) for seed in (1, 2)]
        print(f"[tracking model]  QPD-only lower bound, {delay} samples of delay: "
              f"{min(bounds):.3f}-{max(bounds):.3f}")  # fmt: skip
    assert figures["default (retuned gains + sensor taps), N 2 urad/s/rtHz"] < figures[
        "QPD only, the previous default gains"]  # fmt: skip
