"""What Alice sent: a pattern log (`satellite/patterns.qrec`, from the payload or a short
simulation) or a pattern source (`satellite/pattern_source.json`, full-scale simulation).
Both answer `symbols(slot_indices) -> nibbles` (docs/formats.md)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from host.errors import BadInput
from host.formats.qrec import Kind, PatternFrame, read_records
from host.protocol.symbols import SymbolMapping, counter_words, unpack_nibbles

PATTERN_SOURCE_VERSION = 1
PATTERN_LOG_NAME = "patterns.qrec"
PATTERN_SOURCE_NAME = "pattern_source.json"


@dataclass(frozen=True)
class CounterPatternSource:
    """Symbols from the counter-based QRNG (host.protocol.symbols.counter_words)."""

    seed: int
    mapping: SymbolMapping
    first_slot: int
    slot_count: int

    def symbols(self, slot_indices: np.ndarray) -> np.ndarray:
        slots = np.asarray(slot_indices, dtype=np.int64)
        if slots.size and (
            slots.min() < self.first_slot or slots.max() >= self.first_slot + self.slot_count
        ):
            raise IndexError("slot outside the pattern source's range")
        return self.mapping.symbols(counter_words(self.seed, slots))

    def to_json(self) -> dict:
        return {
            "format_version": PATTERN_SOURCE_VERSION,
            "kind": "counter-hash",
            "generator": "splitmix64-high32",
            "seed": self.seed,
            "basis_threshold": self.mapping.basis_threshold,
            "intensity_thresholds": list(self.mapping.intensity_thresholds),
            "first_slot": self.first_slot,
            "slot_count": self.slot_count,
        }


def write_pattern_source(path: str | Path, source: CounterPatternSource) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(source.to_json(), indent=1) + "\n")
    os.chmod(tmp, 0o600)  # the seed is Alice's raw key material
    os.replace(tmp, path)


def read_pattern_source(path: str | Path) -> CounterPatternSource:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        if data.get("format_version") != PATTERN_SOURCE_VERSION:
            raise BadInput(f"{path}: format_version {data.get('format_version')!r} unsupported")
        if data.get("kind") != "counter-hash" or data.get("generator") != "splitmix64-high32":
            raise BadInput(f"{path}: unknown pattern source {data.get('kind')!r}")
        mapping = SymbolMapping(int(data["basis_threshold"]), tuple(data["intensity_thresholds"]))
        return CounterPatternSource(
            int(data["seed"]), mapping, int(data["first_slot"]), int(data["slot_count"])
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise BadInput(f"{path}: unreadable pattern source ({error!r})") from None


class PatternLog:
    """The payload's pattern log: frames of consecutive slots, possibly with gaps."""

    def __init__(self, path: str | Path):
        log = read_records(path)
        if log.problem:
            raise BadInput(f"{path}: {log.problem} (after {len(log.records)} good records)")
        starts, nibbles = [], []
        for record in log.records:
            if record.kind != Kind.PATTERN_FRAME:
                continue
            frame = PatternFrame.decode(record.payload)
            starts.append((frame.first_slot, frame.slot_count))
            nibbles.append(unpack_nibbles(frame.packed_symbols, frame.slot_count))
        if not starts:
            raise BadInput(f"{path}: no pattern frames")
        order = np.argsort([s for s, _ in starts])
        self.frame_first_slot = np.array([starts[i][0] for i in order], dtype=np.int64)
        self.frame_slot_count = np.array([starts[i][1] for i in order], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(self.frame_slot_count)])
        self._nibbles = np.concatenate([nibbles[i] for i in order])
        ends = self.frame_first_slot + self.frame_slot_count
        if np.any(ends[:-1] > self.frame_first_slot[1:]):
            raise BadInput(f"{path}: pattern frames overlap")

    @property
    def slot_count(self) -> int:
        return int(self.frame_slot_count.sum())

    def covers(self, slot_indices: np.ndarray) -> np.ndarray:
        slots = np.asarray(slot_indices, dtype=np.int64)
        frame = np.searchsorted(self.frame_first_slot, slots, side="right") - 1
        ok = frame >= 0
        frame = np.clip(frame, 0, None)
        return ok & (slots < self.frame_first_slot[frame] + self.frame_slot_count[frame])

    def symbols(self, slot_indices: np.ndarray) -> np.ndarray:
        slots = np.asarray(slot_indices, dtype=np.int64)
        if not np.all(self.covers(slots)):
            raise IndexError("slot not in the pattern log")
        frame = np.searchsorted(self.frame_first_slot, slots, side="right") - 1
        return self._nibbles[self._offsets[frame] + slots - self.frame_first_slot[frame]]


def open_patterns(satellite_dir: str | Path):
    """Alice's patterns from satellite/: the pattern log if present, else the source."""
    satellite_dir = Path(satellite_dir)
    if (satellite_dir / PATTERN_LOG_NAME).exists():
        return PatternLog(satellite_dir / PATTERN_LOG_NAME)
    if (satellite_dir / PATTERN_SOURCE_NAME).exists():
        return read_pattern_source(satellite_dir / PATTERN_SOURCE_NAME)
    raise BadInput(f"{satellite_dir}: neither {PATTERN_LOG_NAME} nor {PATTERN_SOURCE_NAME}")
