"""Pass schedule over the station network: agrees with skyfield's own `find_events`,
night filtering included; conflicts resolved; bad input refused."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from skyfield.api import EarthSatellite, load, wgs84

from emulator.pass_model.geometry import parse_tle
from host.cli import main as qkdsat
from host.network.schedule import (
    CONFLICT,
    DAYLIGHT,
    HANDOVER_S,
    SCHEDULED,
    _ephemeris,
    make_schedule,
)
from host.network.stations import load_catalogue, select_stations

TLE_PATH = Path(__file__).parent / "data" / "sso-500km.tle"
START = datetime(2024, 3, 1, tzinfo=UTC)
DAYS = 3
NAMES = ["Jinan", "Hefei", "Beijing", "Stellenbosch", "Wuhan"]


@pytest.fixture(scope="module")
def schedule():
    stations = select_stations(NAMES, load_catalogue())
    return make_schedule(TLE_PATH.read_text(), stations, START, DAYS)


def _skyfield_passes(station):
    """Complete passes by skyfield's find_events, day or night by the sun at the station
    at rise, culmination and set (computed here, apart from the schedule's sampling)."""
    _, line1, line2 = parse_tle(TLE_PATH.read_text())
    ts = load.timescale(builtin=True)
    satellite = EarthSatellite(line1, line2, "s", ts)
    topos = wgs84.latlon(station.lat_deg, station.lon_deg, elevation_m=station.alt_m)
    times, kinds = satellite.find_events(
        topos, ts.from_datetime(START), ts.from_datetime(START + timedelta(days=DAYS)),
        altitude_degrees=station.elevation_mask_deg,
    )  # fmt: skip
    eph = _ephemeris()
    observer = eph["earth"] + topos
    passes = []
    for k in range(len(kinds) - 2):
        if list(kinds[k : k + 3]) == [0, 1, 2]:
            rise, culmination, set_ = times[k : k + 3]
            sun = max(
                observer.at(t).observe(eph["sun"]).apparent().altaz()[0].degrees
                for t in (rise, culmination, set_)
            )
            passes.append((rise.utc_datetime(), culmination.utc_datetime(),
                           set_.utc_datetime(), sun < -12.0))  # fmt: skip
    return passes


def test_schedule_agrees_with_skyfield_find_events_night_filter_included(schedule):
    catalogue = load_catalogue()
    night_total = 0
    for name in NAMES:
        expected = _skyfield_passes(catalogue[name])
        ours = [p for p in schedule["passes"] if p["station"] == name]
        assert len(ours) == len(expected), name
        for item, (rise, culmination, set_, night) in zip(ours, expected, strict=True):
            # find_events refines its crossings to half a second (its epsilon); ours are
            # on the mask to 1e-3 deg (test_horizon_profile_raises_the_mask).
            assert abs((START + timedelta(seconds=item["rise_s"]) - rise).total_seconds()) < 0.5
            assert abs((START + timedelta(seconds=item["set_s"]) - set_).total_seconds()) < 0.5
            got_culmination = START + timedelta(seconds=item["culmination_s"])
            assert abs((got_culmination - culmination).total_seconds()) < 1.0
            assert (item["status"] != DAYLIGHT) == night, (name, item["rise_utc"])
            night_total += night
    statuses = [p["status"] for p in schedule["passes"]]
    # The window holds both kinds, so the night filter is exercised both ways.
    assert DAYLIGHT in statuses and night_total >= 8
    assert {p["station"] for p in schedule["passes"] if p["status"] == SCHEDULED} >= {
        "Stellenbosch",
        "Beijing",
    }


def test_conflicts_leave_one_station_at_a_time(schedule):
    taken = sorted(
        (p for p in schedule["passes"] if p["status"] == SCHEDULED), key=lambda p: p["rise_s"]
    )
    for first, second in zip(taken, taken[1:], strict=False):
        assert first["set_s"] + HANDOVER_S <= second["rise_s"]
    lost = [p for p in schedule["passes"] if p["status"] == CONFLICT]
    assert lost, "the Chinese stations see the same passes: some must conflict"
    by_key = {f"{p['station']} {p['rise_utc']}": p for p in taken}
    for item in lost:
        winner = by_key[item["lost_to"]]
        assert item["rise_s"] - HANDOVER_S < winner["set_s"]
        assert winner["rise_s"] < item["set_s"] + HANDOVER_S


def test_horizon_profile_raises_the_mask(tmp_path):
    """Nanshan's southern ridge: every pass starts and ends on the horizon profile, not
    on the flat mask, where the profile is higher."""
    station = load_catalogue()["Nanshan"]
    schedule = make_schedule(TLE_PATH.read_text(), [station], START, DAYS)
    _, line1, line2 = parse_tle(TLE_PATH.read_text())
    ts = load.timescale(builtin=True)
    relative = EarthSatellite(line1, line2, "s", ts) - wgs84.latlon(
        station.lat_deg, station.lon_deg, elevation_m=station.alt_m
    )
    raised = 0
    for item in schedule["passes"]:
        for key in ("rise_s", "set_s"):
            moment = ts.from_datetime(START + timedelta(seconds=item[key]))
            alt, az, _ = relative.at(moment).altaz()
            assert alt.degrees == pytest.approx(float(station.mask_deg(az.degrees)), abs=1e-3)
            raised += float(station.mask_deg(az.degrees)) > station.elevation_mask_deg
    assert raised >= 1


def _tle_line(text: str) -> str:
    checksum = sum(int(c) if c.isdigit() else (c == "-") for c in text[:68]) % 10
    return text[:68] + str(checksum)


def test_bad_input_unknown_station_and_a_satellite_that_never_rises(tmp_path, capsys):
    code = qkdsat(["schedule", "--tle", str(TLE_PATH), "--stations", "Jinan,Atlantis",
                   "--start", "2024-03-01T00:00:00Z", "--days", "1"])  # fmt: skip
    assert code == 2
    assert "unknown station Atlantis" in capsys.readouterr().err
    # An equatorial 500 km orbit never rises 15 deg over Beijing (40 deg north).
    equatorial = TLE_PATH.read_text().splitlines()
    equatorial[2] = _tle_line(equatorial[2][:8] + "  0.1000" + equatorial[2][16:])
    tle = tmp_path / "equatorial.tle"
    tle.write_text("\n".join(equatorial) + "\n")
    code = qkdsat(["schedule", "--tle", str(tle), "--stations", "Beijing",
                   "--start", "2024-03-01T00:00:00Z", "--days", "1"])  # fmt: skip
    assert code == 2
    assert "never rises above station Beijing's mask" in capsys.readouterr().err


def test_schedule_command_writes_the_schedule(tmp_path, capsys):
    out = tmp_path / "schedule.json"
    code = qkdsat(["schedule", "--tle", str(TLE_PATH), "--stations", "Stellenbosch",
                   "--start", "2024-03-01T00:00:00Z", "--days", "1",
                   "--out", str(out)])  # fmt: skip
    assert code == 0
    schedule = json.loads(out.read_text())
    scheduled = [p for p in schedule["passes"] if p["status"] == SCHEDULED]
    assert scheduled and all(p["station"] == "Stellenbosch" for p in scheduled)
    assert scheduled[0]["rise_utc"] in capsys.readouterr().out
    assert np.all([p["sun_max_elevation_deg"] < -12 for p in scheduled])
    # --json: the same schedule on stdout as one JSON document, nothing else
    code = qkdsat(["schedule", "--tle", str(TLE_PATH), "--stations", "Stellenbosch",
                   "--start", "2024-03-01T00:00:00Z", "--days", "1", "--json"])  # fmt: skip
    assert code == 0
    assert json.loads(capsys.readouterr().out)["passes"] == schedule["passes"]
