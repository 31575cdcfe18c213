"""`make bench`: Bob's first time-sync anchor (host/distil/timesync.py) searched around the
public orbit prediction (pass.json's predicted_geometry, timesync.DelayPrior) against the
whole 12 ms x +-2.5e-5 lag and drift ranges, on the same detections, alternately, in the
same run (docs/streaming.md, "The first anchor around the orbit prediction"). Alice
answers from her pattern source in process. Printed: Alice's window (slots), CPU and wall
seconds of each, their ratio, and that both give the same anchor."""

from __future__ import annotations

import time

import numpy as np
import pytest

from host.cli import main as qkdsat
from host.distil import timesync
from host.distil.protocol import Alice, Config
from host.formats.passdir import read_pass_json
from host.formats.qdet import read_detections

PATTERN_SECRET = "5eed" * 8  # a benchmark's pattern: not secret
DETECTIONS = 60_000  # the first ones of the stress segment (~0.1 s at 10x jinan-1)
ROUNDS = 2


class _AliceAnswers:
    """Alice in process: her answer to each sync_request is Alice._serve_sync's
    (Alice._sync_answer), counting the slots asked for."""

    def __init__(self, alice):
        self.alice, self.asked = alice, 0

    def send(self, kind, **fields):
        self.request = fields

    def recv(self, kind):
        starts = np.asarray(self.request["starts"]).reshape(-1)
        self.asked += starts.size * int(self.request["length"])
        answer, fields = self.alice._sync_answer(self.request)
        assert answer == kind, (answer, kind)
        return fields


@pytest.fixture(scope="module")
def stress_5s(tmp_path_factory):
    out = tmp_path_factory.mktemp("stress") / "pass"
    argv = ["simulate", "--profile", "jinan-1-stress10x", "--duration-s", "5", "--seed", "1"]
    assert qkdsat(argv + ["--pattern-secret", PATTERN_SECRET, "--out", str(out), "--quiet"]) == 0
    return out


@pytest.mark.parametrize("window_s", [0.005, 0.02])
def test_first_anchor_around_the_prediction(stress_5s, window_s):
    out = stress_5s
    pass_json = read_pass_json(out / "pass.json")
    alice = Alice(out, Config())
    time_ps, channels, _ = read_detections(out / "ground" / "detections.qdet")
    pps = read_detections(out / "ground" / "pps.qdet")[0]
    t = timesync._true_seconds(time_ps, pps, pass_json)
    t = t[np.isin(channels, (0, 1, 2, 3))][:DETECTIONS]
    figures = {False: [], True: []}
    anchors = set()
    for _ in range(ROUNDS):
        for use_prior in (False, True):
            answers = _AliceAnswers(alice)
            sync = timesync.Synchroniser(pass_json, answers)
            sync.use_prior = use_prior
            cpu0, wall0 = time.process_time(), time.perf_counter()
            sync.first_anchor(t, window_s)
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            figures[use_prior].append((answers.asked, cpu, wall))
            anchors.add((sync.anchors_off[0], sync.first_slope))
            assert sync.first_search == ("predicted" if use_prior else "full")
    for use_prior, rows in figures.items():
        name = "predicted" if use_prior else "full     "
        for asked, cpu, wall in rows:
            print(f"first anchor {window_s * 1e3:.0f} ms {name}: Alice's window {asked:,} "
                  f"slots, CPU {cpu:.2f} s, wall {wall:.2f} s")  # fmt: skip
    full_wall = sum(w for _, _, w in figures[False])
    near_wall = sum(w for _, _, w in figures[True])
    ratio = full_wall / near_wall
    print(f"first anchor {window_s * 1e3:.0f} ms: full / predicted wall x{ratio:.1f}")
    assert len(anchors) == 1, anchors  # the same anchor from both searches
    assert near_wall < full_wall
