"""The STM32 board's launcher line (emulator/targets.py Netduino2Target): what the board
reads with SYS_GET_CMDLINE must fit its buffer, or QEMU hands it nothing and the board
boots as from no line at all (the app, flight timeouts, no tracking link). And the board
with no line at all: QEMU without semihosting, as the part with no debugger attached."""

import re
import stat
import time
from pathlib import Path

import pytest

from emulator import payload_run, targets
from host.link.client import CommandRejected, PayloadClient
from host.smoke import ping_until_up

FIRMWARE = Path(__file__).resolve().parent.parent / "firmware"
BOARD_PY = FIRMWARE / "boards/netduino2/board.py"
# the flight value of the ground poll's wait for the rest of a frame
FLIGHT_GROUND_RX_WAIT_US = int(
    re.findall(
        r"^GROUND_RX_WAIT_US = const\((\d+)\)", (FIRMWARE / "payload/waits.py").read_text(), re.M
    )[0]
)


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


def test_the_launchers_flash_region_is_the_boards():
    board_py = BOARD_PY.read_text()

    def const(name):
        return int(re.findall(rf"^{name} = const\((\w+)\)", board_py, re.M)[0], 0)

    assert targets.NETDUINO2_FLASH_DISK_ADDR == const("_FLASH_DISK_ADDR")
    blocks = const("_FLASH_BLOCK_BYTES") * const("_FLASH_BLOCKS")
    assert targets.NETDUINO2_FLASH_DISK_BYTES == blocks


def test_without_semihosting_there_is_no_command_line_to_give(tmp_path):
    target = targets.Netduino2Target(semihosting=False)
    assert (target.bus_timeout_us, target.ground_rx_wait_us) == (None, None)
    assert not any("semihosting" in arg for arg in target.command())
    with pytest.raises(ValueError, match="no command line"):
        targets.Netduino2Target(semihosting=False, boot="maintenance")
    with pytest.raises(ValueError, match="no command line"):
        targets.Netduino2Target(semihosting=False, track_address=("127.0.0.1", 2))
    short = tmp_path / "short.img"
    short.write_bytes(bytes(100))
    with pytest.raises(ValueError, match="flash region"):
        targets.Netduino2Target(semihosting=False, storage_image=short).command()


@pytest.mark.netduino2
def test_the_image_boots_with_no_debugger_and_answers_with_the_flight_values(tmp_path):
    # QEMU without -semihosting takes a BKPT as the part with no debugger attached does:
    # a HardFault. Main's image at 793d087 took one in the port's startup (SYS_OPEN) and
    # never answered; the semihosting guard (firmware/cmodules/semihosting_guard) answers
    # each call as refused, so the board boots the app with its flight values
    # (docs/targets.md "Booting with no debugger"). Provisioned as a board on the bench:
    # its flash region programmed with the key before reset. Under -icount (8 ns an
    # instruction, near the part's 120 MHz) the board's clock counts instructions, so the
    # durations below do not grow with the host's load.
    storage = payload_run.netduino2_storage_image(tmp_path / "flash.img")
    # the link key in the clear: readable by its owner only
    assert stat.S_IMODE(storage.stat().st_mode) == 0o600
    board = targets.Netduino2Target(semihosting=False, storage_image=storage, icount_shift=3)
    with board as target:
        with PayloadClient(target.ground_port, payload_run.KEY, timeout_s=0.5) as payload:
            version = ping_until_up(payload, timeout_s=20.0)
            assert version == f"qkdsat-fw {targets.firmware_version()} netduino2"
            payload.timeout_s = 60.0
            # The ground poll's wait for the rest of a frame: a frame begun and never
            # ended holds the poll that long, the ground duty's worst time (the flight
            # 5 ms; the launcher's 200 ms made it 204 ms). The rest of that duty's worst
            # is a telecommand's handling.
            payload.link.write(b"\x00\x05ab")
            time.sleep(1.0)
            worst_us = payload.housekeeping()["mission"]["worst_us"]["ground"]
            emulated_us = targets.NETDUINO2_EMULATED_GROUND_RX_WAIT_US
            assert FLIGHT_GROUND_RX_WAIT_US < worst_us < emulated_us // 2, worst_us
            # The bus timeout: a head that never answers (the bus wired to nothing) costs
            # a configuration 4 tries of 500 ms (2 s; 40 s with the launcher's 10 s)
            before_s = payload.housekeeping()["uptime_s"]
            with pytest.raises(CommandRejected, match="does not answer on the payload bus"):
                payload.configure({"tdc": {}})
            configure_s = payload.housekeeping()["uptime_s"] - before_s
            assert 1 <= configure_s <= 4, configure_s
            # machine.reset() asks the host to exit (SYS_EXIT): with none, the guard
            # resets the part (AIRCR SYSRESETREQ), which boots again, its time unset
            payload.set_time()
            assert payload.housekeeping()["time_set"]
            payload.reboot()
            payload.timeout_s = 0.5
            ping_until_up(payload, timeout_s=20.0)
            payload.timeout_s = 60.0
            assert not payload.housekeeping()["time_set"]
            assert target.running()
