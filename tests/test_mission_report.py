"""mission.png's QBER panel: the ~1 % bars that matter are readable, the vacuum classes
(a handful of dark counts at ~50-100 %) are stated beside them instead of setting the
scale."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from host.mission.report import draw_qber_panel  # noqa: E402

COUNTS = {  # a short segment: two vacuum events, both errors
    "Z": {"mu": {"n": 12000, "m": 130}, "nu": {"n": 900, "m": 14}, "vac": {"n": 2, "m": 2}},
    "X": {"mu": {"n": 11800, "m": 150}, "nu": {"n": 880, "m": 12}, "vac": {"n": 1, "m": 0}},
}
INTENSITIES = {"mu": 0.8, "nu": 0.1, "vac": 0.0}


def test_qber_panel_scales_to_the_signal_and_states_the_vacuum_rates():
    fig, ax = plt.subplots()
    try:
        draw_qber_panel(ax, COUNTS, INTENSITIES, "no key (aborted)")
        labels = [tick.get_text() for tick in ax.get_xticklabels()]
        assert labels == ["Z mu", "Z nu", "X mu", "X nu"]
        top = ax.get_ylim()[1]
        assert 1.6 < top < 5.0  # percent: the largest bar (1.6 % + 1 sigma) fills the panel
        notes = " ".join(text.get_text() for text in ax.texts)
        assert "Z vac: 2/2 (100 %)" in notes and "X vac: 0/1 (0 %)" in notes
    finally:
        plt.close(fig)
