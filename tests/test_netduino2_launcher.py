"""The STM32 board's launcher line (emulator/targets.py Netduino2Target): what the board
reads with SYS_GET_CMDLINE must fit its buffer, or QEMU hands it nothing and the board
boots as from no line at all (the app, flight timeouts, no tracking link)."""

import re
from pathlib import Path

import pytest

from emulator import targets

BOARD_PY = Path(__file__).resolve().parent.parent / "firmware/boards/netduino2/board.py"


def test_the_launchers_line_limit_is_the_boards_buffer():
    found = re.findall(r"^_LAUNCHER_LINE_BYTES = const\((\d+)\)", BOARD_PY.read_text(), re.M)
    assert found == [str(targets.NETDUINO2_LAUNCHER_LINE_BYTES)], found


def test_the_longest_default_line_fits_and_a_longer_one_is_refused():
    target = targets.Netduino2Target(
        ("127.0.0.1", 1), boot="maintenance", track_address=("127.0.0.1", 2)
    )
    words = target.launcher_words()
    assert words == [
        "qkdsat",
        "maintenance",
        "track",
        "bus_timeout_us=10000000",
        "ground_rx_wait_us=200000",
    ]
    assert len(" ".join(words)) + 1 <= targets.NETDUINO2_LAUNCHER_LINE_BYTES
    # (on main at fed232e such a line went to QEMU, which gave the board nothing: without
    # the track word, 98 bytes, it booted the app, not the maintenance boot asked for)
    target.ground_rx_wait_us = 10**40
    with pytest.raises(ValueError, match="launcher line of 109 bytes"):
        target.launcher_words()
    with pytest.raises(ValueError):
        target.command()
