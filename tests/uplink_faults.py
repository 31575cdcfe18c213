"""The satellite's uplink record damaged as a real one can be, for the time-transfer
tests and bench: detections lost at random and in a run (a ring overflow), and dark
counts added that no ground emission made (the uplink's time synchronisation,
timesync.UplinkSlotSync, must match the rest)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from host.timetransfer import files


def lose_and_add_uplink_events(
    pass_dir: Path,
    lost_fraction: float,
    lost_run: Callable[[np.ndarray], slice],
    one_dark_count_per: int,
    seed: int = 7,
) -> tuple[int, int, int]:
    """Rewrite pass_dir's uplink record: each detection lost with lost_fraction, every one
    in lost_run(tags) lost too, and one dark count (uniform over the pass, random basis
    and bit) per `one_dark_count_per` detections added. Returns (detections before, kept,
    dark counts added)."""
    relative = files.EVENT_FILES["uplink_rx"]
    with np.load(pass_dir / relative) as data:
        arrays = {name: data[name] for name in data.files}
    tags = arrays["tag_ps"]
    n = tags.size
    rng = np.random.default_rng(seed)
    keep = rng.random(n) >= lost_fraction
    keep[lost_run(tags)] = False
    extra = rng.integers(tags.min(), tags.max(), n // one_dark_count_per)
    order = np.argsort(np.concatenate([tags[keep], extra]), kind="stable")
    for name in ("tag_ps", "basis", "bit"):
        values = extra if name == "tag_ps" else rng.integers(0, 2, extra.size)
        joined = np.concatenate([arrays[name][keep], values.astype(arrays[name].dtype)])
        arrays[name] = joined[order]
    np.savez(pass_dir / relative, **arrays)
    return n, int(keep.sum()), extra.size
