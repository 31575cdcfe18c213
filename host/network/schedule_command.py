"""`qkdsat schedule`: the QKD-capable night passes of a satellite (TLE) over the network's
stations for N days, conflicts resolved (docs/network.md)."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

from host.console import to_json
from host.errors import BadInput
from host.network.schedule import CONFLICT, SCHEDULED, make_schedule
from host.network.stations import load_catalogue, select_stations


def add_window_arguments(parser) -> None:
    """The satellite, the stations and the window, as `qkdsat schedule` and `qkdsat
    campaign` take them."""
    parser.add_argument("--tle", required=True, help="TLE file (2 or 3 lines)")
    parser.add_argument("--stations", required=True, help="comma-separated station names")
    parser.add_argument("--days", type=float, default=3.0, help="length of the window")
    parser.add_argument("--start", required=True, help="window start, UTC (ISO 8601, ...Z)")
    parser.add_argument("--catalogue", help="station catalogue (default: the built-in one)")


def add_arguments(parser) -> None:
    add_window_arguments(parser)
    parser.add_argument("--out", help="write the schedule here as JSON")


def parse_utc(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as error:
        raise BadInput(f"--start {text!r}: not an ISO 8601 time") from error
    if moment.tzinfo is None:
        raise BadInput(f"--start {text!r}: give the time zone (Z for UTC)")
    return moment


def run(args) -> int:
    try:
        tle_text = Path(args.tle).read_text()
    except OSError as error:
        raise BadInput(f"--tle {args.tle}: {error.strerror}") from error
    stations = select_stations(args.stations, load_catalogue(args.catalogue))
    schedule = make_schedule(tle_text, stations, parse_utc(args.start), args.days, args.tle)
    if getattr(args, "json", False):
        print(to_json(schedule))
    else:
        for item in schedule["passes"]:
            if item["status"] in (SCHEDULED, CONFLICT):
                note = f" (lost to {item['lost_to']})" if item["status"] == CONFLICT else ""
                print(
                    f"{item['rise_utc']}  {item['station']:<13} {item['duration_s']:6.0f} s  "
                    f"max {item['max_elevation_deg']:5.1f} deg  {item['status']}{note}"
                )
    if args.out:
        tmp = f"{args.out}.{os.getpid()}.tmp"
        with open(tmp, "w") as handle:
            json.dump(schedule, handle, indent=1)
        os.replace(tmp, args.out)
    return 0
