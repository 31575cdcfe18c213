"""What Alice sent: a pattern log (`satellite/patterns.qrec`, from a controller-driven
payload or a short simulation), a pattern source (`satellite/pattern_source.json`,
full-scale simulation), or, for a head-generated pass, the optical head's pattern memory
on board (host/link/pattern_memory.py), which never reaches satellite/. Each answers
`symbols(slot_indices) -> nibbles` and `covers(slot_indices)` (docs/formats.md);
`symbols_by_slots` is what Alice calls on any of them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from host.distil.durable import write_atomic
from host.errors import BadInput
from host.formats.qrec import Kind, PatternFrame, read_records
from host.protocol.symbols import (
    SymbolMapping,
    insecure_test_pattern_words,
    keyed_run_high_halves,
    keyed_slot_words,
    unpack_nibbles,
)

PATTERN_SOURCE_VERSION = 1
PATTERN_LOG_NAME = "patterns.qrec"
PATTERN_SOURCE_NAME = "pattern_source.json"
INSECURE_TEST_PATTERN_KIND = "insecure-test-pattern"
KEYED_PATTERN_KIND = "aes256-ctr"


class _SlotRangeSource:
    """What both pattern sources share: a mapping and a range of slots
    [first_slot, first_slot + slot_count) they answer for."""

    def covers(self, slot_indices) -> np.ndarray:
        slots = np.asarray(slot_indices, dtype=np.int64)
        return (slots >= self.first_slot) & (slots < self.first_slot + self.slot_count)

    def _slots_in_range(self, slot_indices) -> np.ndarray:
        slots = np.asarray(slot_indices, dtype=np.int64)
        if not np.all(self.covers(slots)):
            raise IndexError("slot outside the pattern source's range")
        return slots

    def _mapping_and_range_json(self) -> dict:
        out = {
            "basis_threshold": self.mapping.basis_threshold,
            "intensity_thresholds": list(self.mapping.intensity_thresholds),
            "first_slot": self.first_slot,
            "slot_count": self.slot_count,
        }
        if self.intensities is not None:
            out["intensities"] = dict(self.intensities)
        return out


@dataclass(frozen=True)
class InsecureTestPatternSource(_SlotRangeSource):
    """Symbols from splitmix64 of the slot index (host.protocol.symbols.
    insecure_test_pattern_words): reproducible from its seed, and recoverable from a few
    dozen published symbols. For simulations and tests only: it never makes a secret key
    (the emulated head uses emulator/head_qrng.py, real hardware its QRNG)."""

    seed: int
    mapping: SymbolMapping
    first_slot: int
    slot_count: int
    # {class: mean photon number} the source's laser was set to (Alice's record, checked
    # against pass.json by the distillation); None when not recorded
    intensities: dict | None = None

    def symbols(self, slot_indices: np.ndarray) -> np.ndarray:
        slots = self._slots_in_range(slot_indices)
        return self.mapping.symbols(insecure_test_pattern_words(self.seed, slots))

    def to_json(self) -> dict:
        return {
            "format_version": PATTERN_SOURCE_VERSION,
            "kind": INSECURE_TEST_PATTERN_KIND,
            "generator": "splitmix64-high32",
            "seed": self.seed,
            **self._mapping_and_range_json(),
        }


@dataclass(frozen=True)
class KeyedPatternSource(_SlotRangeSource):
    """Symbols from AES-256-CTR under a secret 32-byte key (host.protocol.symbols.
    keyed_slot_words, the same stream the emulated head's QRNG stand-in gives): only the
    key's holder can compute them, so a simulation that keeps the key in satellite/ (and
    truth/) and nowhere else gives Bob nothing to recover. Computationally random, as the
    emulated head; real hardware uses its QRNG's bits."""

    key: bytes = field(repr=False)
    mapping: SymbolMapping
    first_slot: int
    slot_count: int
    intensities: dict | None = None  # as InsecureTestPatternSource.intensities

    def __post_init__(self):
        if len(self.key) != 32:
            raise ValueError(f"pattern key of {len(self.key)} bytes: 32 needed")

    seed = None  # there is no seed (truth summaries record this field)

    def symbols(self, slot_indices: np.ndarray) -> np.ndarray:
        slots = self._slots_in_range(slot_indices)
        return self.mapping.symbols(keyed_slot_words(self.key, slots))

    def intensity_run(self, first: int, count: int) -> np.ndarray:
        """The intensity codes of the slots first .. first + count - 1, all in the range:
        symbols()'s intensity field without the slots' index, words and nibbles (Alice's
        answer to a sync window of millions of slots, ~3x faster)."""
        if first < self.first_slot or first + count > self.first_slot + self.slot_count:
            raise IndexError("slot outside the pattern source's range")
        return self.mapping.intensity_codes(keyed_run_high_halves(self.key, first, count))

    def to_json(self) -> dict:
        return {
            "format_version": PATTERN_SOURCE_VERSION,
            "kind": KEYED_PATTERN_KIND,
            "key": self.key.hex(),
            **self._mapping_and_range_json(),
        }


def write_pattern_source(
    path: str | Path, source: InsecureTestPatternSource | KeyedPatternSource
) -> None:
    # the seed or key is Alice's raw key material: a fresh temporary created 0600 (a
    # symlink planted under its name is removed, never written through), then renamed
    data = (json.dumps(source.to_json(), indent=1) + "\n").encode()
    write_atomic(Path(path), data, 0o600)


def read_pattern_source(path: str | Path) -> InsecureTestPatternSource | KeyedPatternSource:
    """Errors name the field, never its value: the seed and the key are Alice's key
    material."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not valid JSON"
        raise BadInput(f"{path}: unreadable pattern source ({reason})") from None
    if not isinstance(data, dict):
        raise BadInput(f"{path}: a pattern source is a JSON object")
    if data.get("format_version") != PATTERN_SOURCE_VERSION:
        raise BadInput(f"{path}: format_version {data.get('format_version')!r} unsupported")
    kind = data.get("kind")
    if kind not in (KEYED_PATTERN_KIND, INSECURE_TEST_PATTERN_KIND):
        expected = f"{KEYED_PATTERN_KIND!r} or {INSECURE_TEST_PATTERN_KIND!r}"
        raise BadInput(f"{path}: kind {str(kind)[:40]!r}: expected {expected}")
    if kind == INSECURE_TEST_PATTERN_KIND and data.get("generator") != "splitmix64-high32":
        generator = data.get("generator")
        found = "missing" if generator is None else f"{str(generator)[:40]!r}"
        raise BadInput(f"{path}: generator {found}: expected 'splitmix64-high32'")

    def integer(field: str) -> int:
        value = data.get(field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise BadInput(f"{path}: {field} missing or not a non-negative integer")
        return value

    thresholds = data.get("intensity_thresholds")
    if not isinstance(thresholds, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in thresholds
    ):
        raise BadInput(f"{path}: intensity_thresholds missing or not a list of integers")
    try:
        mapping = SymbolMapping(integer("basis_threshold"), tuple(thresholds))
    except ValueError as error:
        raise BadInput(f"{path}: symbol mapping: {error}") from None
    intensities = recorded_intensities(path, data.get("intensities"))
    if kind == KEYED_PATTERN_KIND:
        try:
            key = bytes.fromhex(data["key"])
        except (KeyError, TypeError, ValueError):
            raise BadInput(f"{path}: key missing or not hex digits") from None
        if len(key) != 32:
            raise BadInput(f"{path}: key of {len(key)} bytes; a pattern key is 32 bytes")
        return KeyedPatternSource(
            key, mapping, integer("first_slot"), integer("slot_count"), intensities
        )
    return InsecureTestPatternSource(
        integer("seed"), mapping, integer("first_slot"), integer("slot_count"), intensities
    )


def recorded_intensities(path, value) -> dict | None:
    """The optional `intensities` of a pattern source or PATTERN_CONFIG record: {class:
    mean photon number}, each finite and >= 0; None when absent."""
    if value is None:
        return None
    if not isinstance(value, dict) or not value:
        raise BadInput(f"{path}: intensities must be an object {{class: mean photon number}}")
    out = {}
    for name, mu in value.items():
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not 0 <= mu < 1e3:
            raise BadInput(f"{path}: intensities.{name} = {mu!r}: not a mean photon number")
        out[str(name)] = float(mu)
    return out


class PatternLog:
    """The payload's pattern log: frames of consecutive slots, possibly with gaps."""

    def __init__(self, path: str | Path):
        log = read_records(path)
        # A torn or corrupt frame record is skipped by the reader (docs/storage.md): its
        # slots are a gap, as are frames never logged; the rest of the log stands.
        self.skipped = log.skipped
        starts, nibbles = [], []
        thresholds, intensities = set(), set()
        for record in log.records:
            if record.kind == Kind.PATTERN_CONFIG:
                thresholds.add(_config_thresholds(path, record.payload))
                recorded = _config_intensities(path, record.payload)
                if recorded is not None:
                    intensities.add(tuple(sorted(recorded.items())))
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
        if len(thresholds) > 1:
            raise BadInput(
                f"{path}: PATTERN_CONFIG records with different thresholds "
                f"{sorted(thresholds)}: one pass, one symbol mapping"
            )
        # The thresholds the sequencer programmed (PATTERN_CONFIG), which the distillation
        # checks pass.json against; None for a log without one (checked statistically).
        self.mapping = mapping_from_thresholds(*thresholds.pop()) if thresholds else None
        if len(intensities) > 1:
            raise BadInput(f"{path}: PATTERN_CONFIG records with different intensities")
        # the mean photon numbers the sequencer was configured with, when it logged them
        self.intensities = dict(intensities.pop()) if intensities else None

    def symbol_counts(self) -> tuple[int, int, np.ndarray]:
        """(slots, Z-basis slots, slots per intensity code) over every logged symbol: what
        Alice actually sent, to check pass.json against when no thresholds were logged."""
        basis_x = (self._nibbles >> 1) & 1
        codes = self._nibbles >> 2
        return (
            int(self._nibbles.size),
            int(self._nibbles.size - np.count_nonzero(basis_x)),
            np.bincount(codes, minlength=4),
        )

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


def _config_thresholds(path, payload: bytes) -> tuple[int, int, int]:
    """[z, c_0, c_1] of a PATTERN_CONFIG record (docs/formats.md)."""
    try:
        values = json.loads(payload.decode())["thresholds"]
        z, c0, c1 = (int(v) for v in values)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise BadInput(
            f"{path}: PATTERN_CONFIG record without valid thresholds ({error})"
        ) from None
    if not (0 <= z <= 1 << 15 and 0 <= c0 <= c1 <= 65536):
        raise BadInput(f"{path}: PATTERN_CONFIG thresholds {[z, c0, c1]} out of range")
    return z, c0, c1


def _config_intensities(path, payload: bytes) -> dict | None:
    """The optional `intensities` of a PATTERN_CONFIG record (docs/formats.md)."""
    return recorded_intensities(
        f"{path} PATTERN_CONFIG", json.loads(payload.decode()).get("intensities")
    )


GENERATOR_HEAD_QRNG = 2  # 1 was the retired splitmix64 seed expansion (kind 6 records)
PATTERN_RUN_RECORD_BYTES = 28


def mapping_from_thresholds(basis: int, c0: int, c1: int) -> SymbolMapping:
    """The mapping from the thresholds the firmware programs ([round(p_Z 2^15), c_0, c_1],
    c_1 = 65536 with two intensity classes; docs/sequencer.md)."""
    cut = (c0, 65536) if c1 >= 65536 else (c0, c1, 65536)
    return SymbolMapping(basis, cut)


def decode_pattern_run_record(payload: bytes) -> dict:
    """PATTERN_RUN record (kind 7, docs/formats.md): u32 generator (2 = the head's QRNG),
    u32 basis_threshold, u32 c_0, u32 c_1, u32 first_frame, u32 frame_slots, u32 frames."""
    if len(payload) != PATTERN_RUN_RECORD_BYTES:
        raise BadInput(f"PATTERN_RUN record of {len(payload)} bytes, not 28")
    fields = [int.from_bytes(payload[i : i + 4], "little") for i in range(0, 28, 4)]
    return {
        "generator": fields[0],
        "thresholds": fields[1:4],
        "first_frame": fields[4],
        "frame_slots": fields[5],
        "frames": fields[6],
    }


def pattern_runs_from_log(path: str | Path) -> list[dict] | None:
    """The head-generation runs a pattern product describes (PATTERN_RUN records, in
    order: the one written at start with frames 0, then the one written at stop); None if
    the product holds pattern frames (a controller-driven pattern log)."""
    log = read_records(path)
    if any(r.kind == Kind.RETIRED_PATTERN_SOURCE for r in log.records):
        raise BadInput(
            f"{path}: PATTERN_SOURCE records (a splitmix64 seed): that generator is retired, "
            "its patterns cannot make a secret key"
        )
    runs = [r for r in log.records if r.kind == Kind.PATTERN_RUN]
    if not runs and any(r.kind == Kind.PATTERN_FRAME for r in log.records):
        return None  # a frame log: a skipped frame record is a gap (PatternLog)
    if log.problem:  # a run record (start or stop) may be the one skipped
        raise BadInput(f"{path}: {log.problem} (after {len(log.records)} good records)")
    if not runs:
        return None
    if any(r.kind == Kind.PATTERN_FRAME for r in log.records):
        raise BadInput(f"{path}: both pattern frames and pattern runs: one pass, one mode")
    decoded = [decode_pattern_run_record(r.payload) for r in runs]
    for run in decoded:
        if run["generator"] != GENERATOR_HEAD_QRNG:
            raise BadInput(f"{path}: unknown pattern generator {run['generator']}")
    return decoded


def logged_intensities(path: str | Path) -> dict | None:
    """The mean photon numbers the PATTERN_CONFIG records of a pattern product state (a
    head-generated pass's product holds them beside its PATTERN_RUN records); None when
    no record states them. All records must agree."""
    found = set()
    for record in read_records(path).records:
        if record.kind == Kind.PATTERN_CONFIG:
            recorded = _config_intensities(path, record.payload)
            if recorded is not None:
                found.add(tuple(sorted(recorded.items())))
    if len(found) > 1:
        raise BadInput(f"{path}: PATTERN_CONFIG records with different intensities")
    return dict(found.pop()) if found else None


def open_patterns(satellite_dir: str | Path):
    """Alice's patterns from satellite/: the pattern log if present, else the source. A
    head-generated pass has neither: its pattern is in the head's pattern memory, read on
    board (host.link.pattern_memory.PatternMemoryClient, passed to Alice)."""
    satellite_dir = Path(satellite_dir)
    if (satellite_dir / PATTERN_LOG_NAME).exists():
        if pattern_runs_from_log(satellite_dir / PATTERN_LOG_NAME) is not None:
            raise BadInput(
                f"{satellite_dir / PATTERN_LOG_NAME}: a head-generated pass: the pattern is in "
                "the optical head's pattern memory on board, never in satellite/; Alice reads "
                "it there"
            )
        return PatternLog(satellite_dir / PATTERN_LOG_NAME)
    if (satellite_dir / PATTERN_SOURCE_NAME).exists():
        return read_pattern_source(satellite_dir / PATTERN_SOURCE_NAME)
    raise BadInput(f"{satellite_dir}: neither {PATTERN_LOG_NAME} nor {PATTERN_SOURCE_NAME}")


def symbols_by_slots(patterns, slot_indices) -> tuple[np.ndarray, np.ndarray]:
    """(covered, nibbles): which slots the pattern holds, and the symbol nibbles of those
    (in order). `patterns` is any reader of this module or the pattern memory client."""
    slots = np.asarray(slot_indices, dtype=np.int64)
    covered = np.asarray(patterns.covers(slots), dtype=bool)
    return covered, patterns.symbols(slots[covered])
