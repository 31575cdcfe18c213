"""The pass directory (DESIGN.md, docs/formats.md): paths and pass.json."""

from __future__ import annotations

import json
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
    except ValueError as error:
        raise BadInput(f"{path}: not valid JSON ({error})") from None
    version = data.get("format_version")
    if version != PASS_FORMAT_VERSION:
        raise BadInput(f"{path}: format_version {version!r}, expected {PASS_FORMAT_VERSION}")
    return data
