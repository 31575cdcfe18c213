"""TLE path of `qkdsat simulate`: the pass found from a TLE agrees with skyfield's own
`find_events`, and bad TLEs or stations that never see the satellite are clear errors."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from skyfield.api import EarthSatellite, load, wgs84

from emulator.pass_model.geometry import parse_tle, tle_pass, with_iau2000b_nutation
from host.cli import main as qkdsat
from host.errors import BadInput
from host.formats.passdir import read_pass_json

TLE_PATH = Path(__file__).parent / "data" / "micius-like.tle"
XINGLONG = {"name": "Xinglong", "lat_deg": 40.3958, "lon_deg": 117.5750, "alt_m": 900}
START = datetime(2016, 12, 19, 12, 0, tzinfo=UTC)


def test_tle_pass_agrees_with_skyfield_find_events():
    mask = 10.0
    geometry = tle_pass(TLE_PATH.read_text(), XINGLONG, START, mask)
    _, line1, line2 = parse_tle(TLE_PATH.read_text())
    ts = load.timescale(builtin=True)
    satellite = EarthSatellite(line1, line2, "s", ts)
    topos = wgs84.latlon(XINGLONG["lat_deg"], XINGLONG["lon_deg"], elevation_m=XINGLONG["alt_m"])
    times, kinds = satellite.find_events(
        topos, ts.from_datetime(START), ts.from_datetime(START + timedelta(hours=24)),
        altitude_degrees=mask,
    )  # fmt: skip
    first_rise = int(np.flatnonzero(kinds == 0)[0])
    assert list(kinds[first_rise : first_rise + 3]) == [0, 1, 2]
    rise, culmination, set_ = (t.utc_datetime() for t in times[first_rise : first_rise + 3])
    assert abs((geometry.utc_start - rise).total_seconds()) < 0.05
    assert abs((geometry.utc_end - set_).total_seconds()) < 0.05
    t_culm = geometry.events["culmination"]
    assert abs((geometry.utc_start + timedelta(seconds=t_culm) - culmination).total_seconds()) < 1
    # Elevation and range at skyfield's culmination from our sampled geometry.
    alt, _, distance = (satellite - topos).at(times[first_rise + 1]).altaz()
    t_sky = (culmination - geometry.utc_start).total_seconds()
    assert float(geometry.elevation_at(t_sky)) == pytest.approx(alt.degrees, abs=1e-3)
    assert float(geometry.range_at(t_sky)) == pytest.approx(distance.km, abs=1e-2)
    assert geometry.elevation_deg[0] == pytest.approx(mask, abs=1e-3)


def test_the_searches_take_the_short_nutation_series_within_a_milliarcsecond(monkeypatch):
    """The pass and schedule searches take IAU 2000B (77 terms) for skyfield's 2000A
    (1,365 terms, ~13 ms a call whatever the array): 2000A is evaluated once for a TLE
    pass (its own samples) and never for a schedule, and 2000B moves what it shows in
    within 1 mas. For a TLE satellite nutation cancels (TEME to GCRS to ITRS take the same
    angles); the Sun of the schedule's daylight check is where it shows."""
    import skyfield.timelib

    from host.network.schedule import _ephemeris, make_schedule
    from host.network.stations import load_catalogue

    full_series_calls = []
    full_series = skyfield.timelib.iau2000a_radians

    def counted(t):
        full_series_calls.append(t)
        return full_series(t)

    monkeypatch.setattr(skyfield.timelib, "iau2000a_radians", counted)
    tle_pass(TLE_PATH.read_text(), XINGLONG, START, 10.0)
    assert len(full_series_calls) == 1  # the pass's samples, not the ~11 search steps
    make_schedule(TLE_PATH.read_text(), [load_catalogue()["Beijing"]], START, 1.0)
    assert len(full_series_calls) == 1  # ~140 sky evaluations, none with 2000A

    ts = load.timescale(builtin=True)
    station = wgs84.latlon(XINGLONG["lat_deg"], XINGLONG["lon_deg"], elevation_m=900)
    eph = _ephemeris()
    days = np.linspace(0.0, 3.0, 500)  # the 13.7-day terms move within the window too
    sky = {}
    for series in ("2000A", "2000B"):
        times = ts.from_datetime(START) + days
        if series == "2000B":
            times = with_iau2000b_nutation(times)
        sun = (eph["earth"] + station).at(times).observe(eph["sun"]).apparent()
        sky[series] = sun.altaz()
    milliarcsecond_deg = 1e-3 / 3600.0
    for angle in (0, 1):  # altitude, azimuth (wrapped)
        moved = (sky["2000B"][angle].degrees - sky["2000A"][angle].degrees + 180) % 360 - 180
        # above 0.01 mas: 2000B taken (nothing else moves it); below 1 mas: its accuracy
        assert 0.01 * milliarcsecond_deg < np.max(np.abs(moved)) < milliarcsecond_deg, angle


def test_simulate_from_tle_writes_the_tle_pass(tmp_path):
    code = qkdsat(["simulate", "--profile", "micius-2017", "--tle", str(TLE_PATH),
                   "--start", "2016-12-19T12:00:00Z", "--duration-s", "2",
                   "--out", str(tmp_path / "p"), "--quiet"])  # fmt: skip
    assert code == 0
    scenario = read_pass_json(tmp_path / "p")
    assert scenario["orbit"]["kind"] == "tle"
    assert scenario["orbit"]["line1"].startswith("1 41731U")


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda l1, l2: f"{l1}\n", "a TLE has 2"),
        (
            lambda l1, l2: f"{l1[:-1]}0\n{l2}\n" if l1[-1] != "0" else f"{l1[:-1]}1\n{l2}\n",
            "line 1 checksum",
        ),
        (lambda l1, l2: f"{l1}\n{l2[:40]}\n", "line 2 must be 69 characters"),
        (lambda l1, l2: f"{l1}\n2 99999{l2[7:]}\n", "checksum|catalog numbers differ"),
    ],
)
def test_malformed_tle_is_bad_input(tmp_path, capsys, mangle, message):
    _, line1, line2 = parse_tle(TLE_PATH.read_text())
    path = tmp_path / "bad.tle"
    path.write_text(mangle(line1, line2))
    code = qkdsat(["simulate", "--profile", "micius-2017", "--tle", str(path),
                   "--out", str(tmp_path / "p")])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert str(path) in err
    assert any(part in err for part in message.split("|"))


def test_station_that_never_sees_the_satellite_is_bad_input():
    # Nothing passes within 0.1 deg of the zenith of a given station in two hours.
    with pytest.raises(BadInput, match="never sees"):
        tle_pass(TLE_PATH.read_text(), XINGLONG, START, 89.9, search_hours=2)
