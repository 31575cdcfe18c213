"""The first second of a pass as the stream's first lock sees it, shared by
test_distil_stream_first_lock.py and benchmarks/count_first_locks.py: the pass's start
simulated, its first block of detections, and a Synchroniser whose Alice answers in
process from her own pattern source (what she serves over the link)."""

from __future__ import annotations

from pathlib import Path


class AliceAnswers:
    """Alice in process: her answer to each sync_request is Alice._sync_answer's."""

    def __init__(self, alice):
        self.alice = alice

    def send(self, kind, **fields):
        self.request = fields

    def recv(self, kind):
        answer, fields = self.alice._sync_answer(self.request)
        assert answer == kind, (answer, kind)
        return fields


def simulate_pass_start(profile: str, seed: int, secret: bytes, out: Path) -> Path:
    """The first 1.5 s of the pass (from its 15-20 deg start) into out."""
    from host.simulate import passgen, profiles

    scenario = passgen.build_scenario(
        profiles.load(profile),
        seed=seed,
        duration_s=1.5,
        window_start_s=0.0,
        pattern_secret=secret,
    )
    passgen.run(scenario, out, pattern_mode="source")
    return out


def first_block_and_synchroniser(out: Path):
    """(t_all, det, block, sync): every ground event's true time, the mask of the
    detections among them, the stream's first block (the detections of the first second
    of pass time) and a Synchroniser with Alice answering in process."""
    import numpy as np

    from host.distil import timesync
    from host.distil.protocol import Alice, Config
    from host.formats.passdir import read_pass_json
    from host.formats.qdet import read_detections

    pass_json = read_pass_json(out / "pass.json")
    time_ps, channels, _ = read_detections(out / "ground" / "detections.qdet")
    pps = read_detections(out / "ground" / "pps.qdet")[0]
    t_all = timesync._true_seconds(time_ps, pps, pass_json)
    det = np.isin(channels, (0, 1, 2, 3))
    t = t_all[det]
    block = t[t < t[0] + 1.0]  # the stream's first block (1 s of pass time)
    sync = timesync.Synchroniser(pass_json, AliceAnswers(Alice(out, Config())))
    return t_all, det, block, sync
