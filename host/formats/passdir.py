"""The pass directory (DESIGN.md, docs/formats.md): paths and pass.json."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from host.errors import BadInput

PASS_FORMAT_VERSION = 1


@dataclass(frozen=True)
class PassDir:
    root: Path

    @property
    def pass_json(self) -> Path:
        return self.root / "pass.json"

    @property
    def satellite(self) -> Path:
        return self.root / "satellite"

    @property
    def ground(self) -> Path:
        return self.root / "ground"

    @property
    def truth(self) -> Path:
        return self.root / "truth"

    def create(self) -> PassDir:
        for folder in (self.satellite, self.ground, self.truth):
            folder.mkdir(parents=True, exist_ok=True)
        return self


def write_pass_json(path: str | Path, scenario: dict) -> None:
    data = dict(scenario)
    data.setdefault("format_version", PASS_FORMAT_VERSION)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_pass_json(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "pass.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadInput(f"{path}: missing (is {path.parent} a pass directory?)") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise BadInput(f"{path}: not valid JSON ({error})") from None
    except OSError as error:
        raise BadInput(f"{path}: cannot read ({error.strerror})") from None
    if not isinstance(data, dict):
        raise BadInput(f"{path}: expected a JSON object, found {type(data).__name__}")
    version = data.get("format_version")
    if version != PASS_FORMAT_VERSION:
        raise BadInput(f"{path}: format_version {version!r}, expected {PASS_FORMAT_VERSION}")
    _check_link_parameters(path, data)
    return data


def _number(path: Path, field: str, value, low: float, high: float, unit: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadInput(f"{path}: {field} must be a number, found {json.dumps(value)}")
    if not (math.isfinite(value) and low <= value <= high):
        raise BadInput(f"{path}: {field} {value!r}{unit} out of range [{low:g}, {high:g}]{unit}")
    return float(value)


def _check_link_parameters(path: Path, data: dict) -> None:
    """The fields both endpoints compute with: present-and-sane or bad input, so a typo is
    reported as the field it is and never as a protocol outcome (time sync failing, a key
    length changing)."""
    if "slot_rate_hz" in data:
        _number(path, "slot_rate_hz", data["slot_rate_hz"], 1.0, 1e12, " Hz")
    if "basis_probability_z" in data:
        _number(path, "basis_probability_z", data["basis_probability_z"], 0.0, 1.0)
    intensities = data.get("intensities")
    probabilities = data.get("intensity_probabilities")
    if intensities is not None:
        if not isinstance(intensities, dict) or not intensities:
            raise BadInput(f"{path}: intensities must be an object {{class: mean photon number}}")
        for name, mu in intensities.items():
            _number(path, f"intensities.{name}", mu, 0.0, 100.0, " photons")
    if probabilities is not None:
        if not isinstance(probabilities, dict):
            raise BadInput(f"{path}: intensity_probabilities must be an object {{class: p}}")
        for name, p in probabilities.items():
            _number(path, f"intensity_probabilities.{name}", p, 0.0, 1.0)
        if intensities is not None and set(probabilities) != set(intensities):
            raise BadInput(
                f"{path}: intensity_probabilities names {sorted(probabilities)} differ from"
                f" intensities {sorted(intensities)}"
            )
        total = sum(probabilities.values())
        if abs(total - 1.0) > 1e-6:
            raise BadInput(f"{path}: intensity_probabilities sum to {total:g}, not 1")


DISTILLATION_FIELDS = (
    "slot_rate_hz",
    "basis_probability_z",
    "intensities",
    "intensity_probabilities",
)


def require_fields(path: str | Path, data: dict, fields=DISTILLATION_FIELDS) -> None:
    missing = [name for name in fields if name not in data]
    if missing:
        raise BadInput(f"{path}: missing {', '.join(missing)}")
