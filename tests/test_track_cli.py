"""`qkdsat track`: the pointing products a pass simulation consumes, and refused input."""

from __future__ import annotations

import json

from host.cli import main
from host.protocol import tracking as trk


def test_track_writes_pointing_products(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["track", "--out", str(out), "--duration-s", "1.0",
                 "--offset-urad", "500", "-300"])  # fmt: skip
    assert code == 0
    report = json.loads((out / "tracking.json").read_text())
    # Beacon inside the camera field: acquired in 0.14 s; the residual is the default
    # (honest) plant's, docs/tracking.md "Figures".
    assert report["acquisition_s"] < 0.5 and report["fine_rms_urad"]["x"] < 1.0
    samples, transitions, period_us, decimation = trk.read_tracking_log(
        out / "truth" / "pointing.qrec"
    )
    assert (period_us, decimation, len(samples)) == (500, 1, 2000)
    assert [trk.STATE_NAMES[t.new] for t in transitions][-1] == "FINE"
    telemetry, _, _, decimation = trk.read_tracking_log(out / "satellite" / "tracking.qrec")
    assert decimation == 10 and len(telemetry) == 200
    assert "COARSE -> FINE" in capsys.readouterr().out


def test_track_refuses_unstable_configuration_with_the_firmware_reason(tmp_path, capsys):
    code = main(["track", "--out", str(tmp_path), "--duration-s", "1.0",
                 "--set", "fine_ki=1.9", "--set", "fine_kii=0.4"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "refused by the firmware" in err and "unstable" in err and "fine_ki=1.9" in err
    assert not (tmp_path / "truth").exists()


def test_track_bad_arguments_are_named(tmp_path, capsys):
    assert main(["track", "--out", str(tmp_path), "--set", "fine_ki"]) == 2
    assert "NAME=VALUE" in capsys.readouterr().err
    assert main(["track", "--out", str(tmp_path), "--duration-s", "0.1"]) == 2
    assert "--duration-s" in capsys.readouterr().err
