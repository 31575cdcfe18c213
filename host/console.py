"""What every `qkdsat` command prints, one convention for all (docs/cli.md):

- a result as aligned human-readable text on stdout by default, or as one JSON document
  with --json (for scripts); --quiet prints no result and no progress, errors only;
- progress as stage lines on stderr while a run takes more than a few seconds: shown when
  stderr is a terminal (or with --verbose), never mixed into stdout;
- errors as one line on stderr (host/cli.py), a traceback only with --debug.
"""

from __future__ import annotations

import json
import math
import sys
import time

import numpy as np


def _json_default(value):
    if isinstance(value, np.integer | np.floating | np.bool_):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def to_json(data) -> str:
    return json.dumps(data, indent=1, sort_keys=True, default=_json_default)


def _format_value(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower() if value is not None else "-"
    if isinstance(value, float | np.floating):
        value = float(value)
        if not math.isfinite(value) or value == 0:
            return str(value)
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ", ".join(_format_value(v) for v in value)
    return str(value)


def _flatten(data: dict, prefix: str = "") -> list[tuple[str, str]]:
    rows = []
    for name, value in data.items():
        label = f"{prefix}{name}"
        if isinstance(value, dict) and value:
            rows.extend(_flatten(value, label + "."))
        else:
            rows.append((label, _format_value(value)))
    return rows


def format_table(data: dict) -> str:
    """Nested dict -> 'name.sub  value' lines with the values aligned."""
    rows = _flatten(data)
    width = max((len(label) for label, _ in rows), default=0)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def print_result(args, result: dict, human: dict | None = None) -> None:
    """The command's result: JSON of `result` with --json, else an aligned table of `human`
    (default: `result`); nothing with --quiet."""
    if getattr(args, "json", False):
        print(to_json(result))
    elif not getattr(args, "quiet", False):
        print(format_table(result if human is None else human))


def wants_progress(args) -> bool:
    """Progress on a terminal, or when asked for (--verbose); never with --quiet."""
    verbose = bool(getattr(args, "verbose", False))
    if getattr(args, "quiet", False):
        return False
    return verbose or sys.stderr.isatty()


class Progress:
    """Stage lines on stderr ('distil: sync ... 12.3 s'), or nothing when not wanted."""

    def __init__(self, command: str, enabled: bool):
        self.command, self.enabled = command, enabled
        self._t0 = time.monotonic()

    def __call__(self, message: str) -> None:
        if self.enabled:
            elapsed = time.monotonic() - self._t0
            print(f"{self.command}: [{elapsed:6.1f} s] {message}", file=sys.stderr, flush=True)


def progress_for(args, command: str) -> Progress:
    return Progress(command, wants_progress(args))
