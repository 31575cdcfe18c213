"""The satellite's uplink record damaged as a real one can be, for the time-transfer
tests and bench: detections lost at random and in a run (a ring overflow), and dark
counts added that no ground emission made (the uplink's time synchronisation,
timesync.UplinkSlotSync, must match the rest), or with bits flipped (errors the uplink's
QBER must count and its fit leave out: the tags it fits on are recorded)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from host.timetransfer import estimate, files


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


def flip_uplink_bits(pass_dir: Path, fraction: float, seed: int = 11):
    """Rewrite pass_dir's uplink record with the bit of each detection flipped with
    `fraction` (errors the QBER must count). Returns the satellite's tags and, from the
    truth (truth/tt_uplink_tx.npz, index for index), which detections are sifted (the
    bases agree) and which of those err (the bits differ)."""
    relative = files.EVENT_FILES["uplink_rx"]
    with np.load(pass_dir / relative) as data:
        arrays = {name: data[name] for name in data.files}
    flip = np.random.default_rng(seed).random(arrays["bit"].size) < fraction
    arrays["bit"] = arrays["bit"] ^ flip.astype(arrays["bit"].dtype)
    np.savez(pass_dir / relative, **arrays)
    _, sent_basis, sent_bit = files.read_events(pass_dir, ("uplink_tx",))["uplink_tx"]
    sifted = sent_basis == arrays["basis"]
    return arrays["tag_ps"], sifted, sifted & (sent_bit != arrays["bit"])


def recorded_uplink_timing(monkeypatch) -> list:
    """The reception tags the satellite fits its uplink on (estimate.uplink_samples's),
    appended as it calls it: which sifted events it kept for timing."""
    fitted, uplink_samples = [], estimate.uplink_samples

    def recording(scenario, orbit, emission_ps, received_ps, base):
        fitted.append(np.asarray(received_ps))
        return uplink_samples(scenario, orbit, emission_ps, received_ps, base)

    monkeypatch.setattr(estimate, "uplink_samples", recording)
    return fitted


def check_every_erring_uplink_event_counted_and_dropped(report, fitted, tags, sifted, erring):
    """The uplink QBER is on every sifted event and each erring one is left out of the
    satellite's fit, the rest kept (bar the +-1.5 ns gate's few: at most 5)."""
    timing = np.concatenate(fitted)
    assert erring.sum() > 0.01 * sifted.sum()  # the flipped bits: over 1 % of the sifted
    assert not np.isin(tags[erring], timing).any()
    kept = tags[sifted & ~erring]
    assert np.isin(timing, kept).all() and timing.size >= kept.size - 5
    sample = report["qber_sample"]["uplink"]
    assert sample["n"] == report["sifted_events"]["uplink"] >= sifted.sum() - 5
    assert erring.sum() - 5 <= sample["errors"] <= erring.sum()
