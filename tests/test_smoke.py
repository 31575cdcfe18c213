"""The frozen firmware boots on each target, answers an authenticated ping (TC 17,1) with
its version on the ground link (UART0) and loops a frame through the payload bus (UART1)
to an emulated endpoint."""

import pytest

from emulator.targets import firmware_version
from host.smoke import run_smoke


@pytest.mark.parametrize("target", ["unix", "qemu", "netduino2"])
def test_firmware_boots_answers_version_and_echoes_over_the_payload_bus(target):
    payload = b"\x00frame with zeros\x00 and \xff bytes"
    result = run_smoke(target, echo_payload=payload)
    assert result["version"] == f"qkdsat-fw {firmware_version()} {target}"
    assert result["bus_echo"] == payload
    assert result["endpoint_frames"] == 1
