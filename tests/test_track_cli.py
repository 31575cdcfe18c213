"""`qkdsat track`: the pointing products a pass simulation consumes, and refused input."""

from __future__ import annotations

import json
import os
import select
import sys

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
    captured = capsys.readouterr()
    assert "COARSE -> FINE" in captured.out
    assert "qkdsat track: [" not in captured.err  # stderr is no terminal: no progress lines


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


def test_track_progress_lines_on_a_terminal(tmp_path, monkeypatch, capsys):
    """A long loop (600 s of loop time runs ~15 min here) is never silent on a terminal:
    a stage line when the firmware starts, the loop time done every few seconds, and one
    when the products are written; all on stderr, none on stdout."""
    import host.track

    monkeypatch.setattr(host.track, "PROGRESS_INTERVAL_S", 0.2)
    master, slave = os.openpty()
    try:
        with open(slave, "w", closefd=False) as terminal:
            monkeypatch.setattr(sys, "stderr", terminal)
            code = main(["track", "--out", str(tmp_path), "--duration-s", "1.0",
                         "--offset-urad", "500", "-300"])  # fmt: skip
        shown = b""
        while select.select([master], [], [], 0.05)[0]:
            shown += os.read(master, 65536)
    finally:
        os.close(master)
        os.close(slave)
    assert code == 0, shown
    lines = shown.decode().splitlines()
    assert lines[0].startswith("qkdsat track: [") and "firmware starting on unix" in lines[0]
    beats = [
        float(line.split("] loop time ")[1].split()[0]) for line in lines if "] loop time " in line
    ]
    assert beats and beats == sorted(beats) and all(0 <= b <= 1.0 for b in beats)
    assert "writing the products" in lines[-1]
    assert "qkdsat track: [" not in capsys.readouterr().out
