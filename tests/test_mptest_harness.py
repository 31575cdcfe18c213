"""The firmware test harness (tests/mptest.py) on the STM32 board: a file's tests keep
room in the 96 KiB heap, so a layout that differs by a few KiB cannot fail a whole file."""

from __future__ import annotations

from pathlib import Path

import mptest

TRACKING = Path(__file__).parent / "firmware" / "mptest_tracking.py"


def test_netduino2_tracking_file_passes_with_9_KiB_more_program_text():
    # The raw REPL keeps the program text (and its compiled code) in the heap while the
    # tests run. With all 16 tracking tests in one session, 8.5 KiB more text left a
    # Tracker's 8.6 KiB of words no contiguous block; the CI saw the whole file fail once
    # in 6 runs. Comment lines at the end change neither the tests nor their line numbers.
    spec = mptest.parse_spec(TRACKING)
    spec.source += "\n" + ("#" * 71 + "\n") * 120
    result = mptest.run_file(spec, "netduino2")
    failed = {name: text for name, (status, text) in result.outcomes.items() if status != "pass"}
    assert result.fatal is None and not failed, mptest.dumps_for_debug(result)
    assert sorted(result.outcomes) == sorted(spec.test_names)
