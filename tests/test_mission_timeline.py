"""The mission's timeline over the pass (host/mission/timeline.py, docs/mission.md): a
post-pass distillation is drawn as what it is (nothing sifted before loss of signal, the
whole pass waiting, the lag growing with the pass) and the link's down times come from its
schedule."""

import numpy as np

from host.mission.timeline import ROW_FIELDS, lag_figures, link_intervals, post_pass_timeline

PASS_S = 30.0


def _rows(key_latency_s=12.0):
    detections_s = np.sort(np.random.default_rng(1).uniform(0.5, PASS_S, 3000))
    clouds = (10.0, 14.0)
    rows = post_pass_timeline(
        detections_s,
        PASS_S,
        lambda t: not clouds[0] <= t < clouds[1],
        distil_start_s=PASS_S,
        key_latency_s=key_latency_s,
        stage_seconds={"sync": 2.0, "sifting": 1.0, "error_correction": 6.0, "total": 11.0},
        sifted_bits=1500,
        reconciled_bits=700,
    )
    return detections_s, rows


def test_post_pass_rows_sift_nothing_before_loss_of_signal_and_end_with_the_keys():
    detections_s, rows = _rows()
    assert all(tuple(row) == ROW_FIELDS for row in rows)
    during = [r for r in rows if r["t_s"] <= PASS_S]
    assert [r["t_s"] for r in during] == [float(k) for k in range(31)]  # 1 s rows
    for row in during:
        seen = int(np.sum(detections_s <= row["t_s"]))
        assert row["detections"] == row["backlog_bits"] == seen
        assert row["sifted_bits"] == row["reconciled_bits"] == 0
    after = [r for r in rows if r["t_s"] > PASS_S]
    # sifted once sync + sifting (3 s) are over, reconciled after error correction (9 s)
    assert [r["sifted_bits"] for r in after if r["t_s"] < PASS_S + 3] == [0, 0]
    assert all(r["sifted_bits"] == 1500 for r in after if r["t_s"] >= PASS_S + 3)
    assert all(r["reconciled_bits"] == 0 for r in after if r["t_s"] < PASS_S + 9)
    last = rows[-1]
    assert last["t_s"] == round(detections_s[-1] + 12.0, 6)  # both keys, 12 s after LOS
    assert last["backlog_bits"] == 0 and last["lag_s"] == 0 and last["reconciled_bits"] == 700
    # the pipeline lagged the newest detection by the whole pass until the keys existed
    lag = lag_figures(rows)
    assert lag["lag_s_max"] == round(detections_s[-1] - detections_s[0], 3)


def test_link_down_times_come_from_the_schedule():
    _, rows = _rows()
    down = [r["t_s"] for r in rows if not r["link_up"]]
    assert down == [10.0, 11.0, 12.0, 13.0]
    runs = link_intervals(rows)
    assert [(a, b, up) for a, b, up in runs if not up] == [(9.0, 13.0, False)]


def test_without_a_key_the_rows_end_with_the_distillation_and_the_backlog_stays():
    _, rows = _rows(key_latency_s=None)
    assert rows[-1]["t_s"] == PASS_S + 11.0
    assert rows[-1]["backlog_bits"] == 3000 and rows[-1]["lag_s"] > 0
