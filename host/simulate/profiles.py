"""Simulation profiles: JSON data files (host/simulate/profiles/NAME.json, or any path).

A parameter is either a plain value or {"value": ..., "status": "published" | "assumed" |
"calibrated", "reason": "..."}: the profile says where each number comes from. `load`
returns the values with the annotations stripped, and validates what the simulator needs,
naming the file and the parameter on any fault (docs/simulator.md lists every key).
"""

from __future__ import annotations

import json
from pathlib import Path

from host.errors import BadInput

PROFILE_DIR = Path(__file__).parent / "profiles"
STATUSES = {"published", "assumed", "calibrated"}

# path -> (type check, description); "stations.*" keys are checked per station.
_REQUIRED = {
    "source.slot_rate_hz": (float, "> 0, dividing 1e12 (integer-picosecond slots)"),
    "source.intensities": (dict, "{class: mean photon number}"),
    "source.intensity_probabilities": (dict, "{class: probability}, same classes"),
    "source.basis_probability_z": (float, "in [0, 1]"),
    "orbit.synthetic.altitude_km": (float, "km"),
    "orbit.synthetic.min_range_km": (float, "km"),
    "orbit.synthetic.start_range_km": (float, "km"),
    "orbit.synthetic.end_range_km": (float, "km"),
    "orbit.utc_start": (str, "ISO-8601 UTC"),
    "orbit.prediction_along_track_error_s": (float, "s"),
    "station": (str, "default station name"),
    "link.divergence_full_urad": (float, "urad"),
    "link.zenith_transmittance": (float, "in (0, 1]"),
    "link.optics_efficiency": (float, "in (0, 1]"),
    "link.pointing_jitter_urad_rms_per_axis": (float, "urad"),
    "link.pointing_correlation_s": (float, "s"),
    "link.pointing_bias_urad": (float, "urad"),
    "detectors.efficiency": (list, "4 efficiencies (H, V, D, A)"),
    "detectors.dark_count_hz": (list, "4 rates"),
    "detectors.background_hz": (list, "4 rates"),
    "detectors.dead_time_ns": (float, "ns"),
    "detectors.afterpulse_probability": (float, "in [0, 1)"),
    "detectors.afterpulse_time_constant_ns": (float, "ns"),
    "detectors.jitter_ps_rms": (float, "ps"),
    "detectors.misalignment_error": (float, "in [0, 0.5]"),
    "detectors.z_split": (float, "in [0, 1]"),
    "sync.rate_hz": (float, "Hz"),
    "sync.ground_detection_probability": (float, "in [0, 1]"),
    "sync.jitter_ps_rms": (float, "ps"),
    "protocol.coincidence_window_ps": (float, "ps"),
}
_CLOCK_KEYS = ("offset_s", "drift", "aging_per_s", "pps_jitter_ps_rms")
_STATION_KEYS = ("lat_deg", "lon_deg", "alt_m", "aperture_diameter_m", "elevation_mask_deg")


def available() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def resolve(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise BadInput(f"profile file {path} does not exist")
        return path
    candidate = PROFILE_DIR / f"{name_or_path}.json"
    if not candidate.is_file():
        raise BadInput(
            f"unknown profile {name_or_path!r}: known profiles are {', '.join(available())}"
            " (or give the path of a profile .json file)"
        )
    return candidate


def strip_annotations(node, where: str, origin: str):
    if isinstance(node, dict):
        if "value" in node and set(node) <= {"value", "status", "reason"}:
            status = node.get("status")
            if status is not None and status not in STATUSES:
                raise BadInput(
                    f"{origin}: {where}: status {status!r} is not one of {sorted(STATUSES)}"
                )
            if status in ("assumed", "calibrated") and not node.get("reason"):
                raise BadInput(f"{origin}: {where}: an {status} value needs a reason")
            return strip_annotations(node["value"], where, origin)
        return {
            k: strip_annotations(v, f"{where}.{k}" if where else k, origin)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [strip_annotations(v, f"{where}[{i}]", origin) for i, v in enumerate(node)]
    return node


def _get(tree: dict, dotted: str, origin: str):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise BadInput(f"{origin}: missing parameter {dotted}")
        node = node[part]
    return node


def _check_number(value, dotted: str, origin: str, low=None, high=None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadInput(f"{origin}: {dotted} must be a number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise BadInput(f"{origin}: {dotted} = {value} is outside [{low}, {high}]")
    return float(value)


def parse_override(text: str) -> tuple[str, object]:
    """`dotted.key=JSON` (a bare word that is not JSON is taken as a string)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise BadInput(
            f"--set {text!r}: expected KEY=VALUE, e.g. detectors.misalignment_error=0.1"
        )
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), value


def apply_overrides(profile: dict, overrides: dict, origin: str) -> None:
    for dotted, value in overrides.items():
        node = profile
        parts = dotted.split(".")
        for depth, part in enumerate(parts[:-1]):
            if not isinstance(node, dict) or part not in node:
                raise BadInput(
                    f"--set {dotted}: {origin} has no {part!r} here"
                    + _valid_keys(node, ".".join(parts[:depth]))
                )
            node = node[part]
        if not isinstance(node, dict) or parts[-1] not in node:
            raise BadInput(
                f"--set {dotted}: {origin} has no such parameter"
                + _valid_keys(node, ".".join(parts[:-1]))
            )
        node[parts[-1]] = value


def _valid_keys(node, prefix: str) -> str:
    """'; valid keys here: a.b, a.c' (what --set accepts at this level), or ''."""
    if not isinstance(node, dict):
        return f"; {prefix} is a value, not a group"
    names = sorted(f"{prefix}.{key}" if prefix else key for key in node)
    return f"; valid keys here: {', '.join(names)}"


def load(name_or_path: str, overrides: dict | None = None) -> dict:
    """The profile's values (annotations stripped), with `overrides` ({dotted.key: value})
    applied, validated, with `_path`, `_overrides` and `_annotations` (the raw file)."""
    path = resolve(name_or_path)
    origin = str(path)
    try:
        raw = json.loads(path.read_text())
    except ValueError as error:
        raise BadInput(f"{origin}: not valid JSON ({error})") from None
    if not isinstance(raw, dict):
        raise BadInput(f"{origin}: a profile is a JSON object")
    profile = strip_annotations(raw, "", origin)
    apply_overrides(profile, overrides or {}, origin)
    for dotted, (kind, text) in _REQUIRED.items():
        value = _get(profile, dotted, origin)
        if kind is float:
            _check_number(value, dotted, origin)
        elif not isinstance(value, kind):
            raise BadInput(f"{origin}: {dotted} must be {text}, got {value!r}")
    source = profile["source"]
    rate = source["slot_rate_hz"]
    if rate <= 0 or abs(1e12 / rate - round(1e12 / rate)) > 1e-9:
        raise BadInput(f"{origin}: source.slot_rate_hz {rate} must divide 1e12 (integer ps)")
    classes = list(source["intensities"])
    if classes != list(source["intensity_probabilities"]):
        raise BadInput(
            f"{origin}: source.intensities and source.intensity_probabilities name different "
            f"classes ({classes} vs {list(source['intensity_probabilities'])})"
        )
    if not 1 <= len(classes) <= 4:
        raise BadInput(f"{origin}: 1 to 4 intensity classes supported, got {len(classes)}")
    for name in classes:
        _check_number(source["intensities"][name], f"source.intensities.{name}", origin, 0, 50)
        _check_number(
            source["intensity_probabilities"][name],
            f"source.intensity_probabilities.{name}",
            origin,
            0,
            1,
        )
    if abs(sum(source["intensity_probabilities"].values()) - 1.0) > 1e-9:
        raise BadInput(f"{origin}: source.intensity_probabilities do not sum to 1")
    _check_number(source["basis_probability_z"], "source.basis_probability_z", origin, 0, 1)
    detectors = profile["detectors"]
    for key in ("efficiency", "dark_count_hz", "background_hz"):
        values = detectors[key]
        if len(values) != 4:
            raise BadInput(f"{origin}: detectors.{key} needs 4 values (H, V, D, A)")
        for i, v in enumerate(values):
            _check_number(
                v, f"detectors.{key}[{i}]", origin, 0, 1 if key == "efficiency" else None
            )
    _check_number(detectors["misalignment_error"], "detectors.misalignment_error", origin, 0, 0.5)
    _check_number(
        profile["link"]["zenith_transmittance"], "link.zenith_transmittance", origin, 1e-6, 1
    )
    _check_number(profile["link"]["optics_efficiency"], "link.optics_efficiency", origin, 1e-9, 1)
    for side in ("satellite", "ground"):
        for key in _CLOCK_KEYS:
            _check_number(
                _get(profile, f"clocks.{side}.{key}", origin), f"clocks.{side}.{key}", origin
            )
    stations = _get(profile, "stations", origin)
    if profile["station"] not in stations:
        raise BadInput(f"{origin}: default station {profile['station']!r} not in stations")
    for name in stations:
        for key in _STATION_KEYS:
            _check_number(
                _get(profile, f"stations.{name}.{key}", origin), f"stations.{name}.{key}", origin
            )
    tail = distillation_tail(profile, origin)
    if tail not in TAILS:
        raise BadInput(f"{origin}: distillation.tail {tail!r}: choose {' or '.join(TAILS)}")
    profile["_path"] = str(path)
    profile["_overrides"] = dict(overrides or {})
    profile["_annotations"] = raw
    return profile


TAILS = ("hoeffding", "chernoff")


def distillation_tail(profile: dict, origin: str = "profile") -> str:
    """The finite-key concentration bound the profile's passes are distilled with by the
    mission (`distillation.tail`; hoeffding when the profile says nothing)."""
    section = profile.get("distillation", {})
    if not isinstance(section, dict):
        raise BadInput(f"{origin}: distillation must be a group, got {section!r}")
    return section.get("tail", "hoeffding")


def station(profile: dict, name: str | None) -> dict:
    name = name or profile["station"]
    stations = profile["stations"]
    if name not in stations:
        raise BadInput(
            f"station {name!r} is not in profile {profile['name']!r}: "
            f"known stations are {', '.join(sorted(stations))}"
        )
    return {"name": name, **stations[name]}
