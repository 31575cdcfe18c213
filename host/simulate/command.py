"""`qkdsat simulate --profile P [--tle FILE --station NAME --start UTC] [--seed N] --out DIR`:
a pass simulated from physics alone (no firmware), written as a pass directory
(docs/formats.md; the models are described in docs/simulator.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from host.errors import BadInput


def add_arguments(parser) -> None:
    parser.add_argument("--profile", required=True, help="profile name or path of a .json")
    parser.add_argument("--tle", help="TLE file (2 or 3 lines); default: synthetic pass")
    parser.add_argument("--station", help="ground station (default: the profile's)")
    parser.add_argument(
        "--start", help="UTC: search start for the TLE pass, or the synthetic pass's start"
    )
    parser.add_argument("--seed", type=int, default=1, help="simulation seed (default 1)")
    parser.add_argument(
        "--duration-s",
        type=float,
        help="simulate only this many seconds around culmination (short runs)",
    )
    parser.add_argument(
        "--pattern",
        choices=("auto", "log", "source"),
        default="auto",
        help="satellite patterns as a pattern log (short runs) or a pattern source",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a profile parameter, e.g. --set detectors.misalignment_error=0.12"
        " or --set 'detectors.background_hz=[0,0,0,0]' (repeatable; recorded in pass.json)",
    )
    parser.add_argument("--out", required=True, help="pass directory to write")
    parser.add_argument(
        "--headline",
        action="store_true",
        help="also count the pass with the truth and compare with the profile's published"
        " numbers (docs/simulator.md)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def run(args) -> int:
    from host.simulate import passgen, profiles

    overrides = dict(profiles.parse_override(text) for text in args.set)
    profile = profiles.load(args.profile, overrides)
    tle_text = None
    if args.tle:
        try:
            tle_text = Path(args.tle).read_text()
        except (OSError, UnicodeDecodeError) as error:
            raise BadInput(f"--tle {args.tle}: cannot read ({error})") from None
    if args.seed < 0:
        raise BadInput(f"--seed {args.seed}: must be >= 0")
    scenario = passgen.build_scenario(
        profile,
        station_name=args.station,
        tle_text=tle_text,
        tle_origin=args.tle or "TLE",
        start_utc=args.start,
        seed=args.seed,
        duration_s=args.duration_s,
    )
    progress = not args.quiet and sys.stderr.isatty()
    truth = passgen.run(scenario, args.out, pattern_mode=args.pattern, progress=progress)
    if not args.quiet:
        summary = {
            "out": str(args.out),
            "geometry": truth["geometry"],
            "slots": truth["slot_count"],
            "detections": truth["detections"],
            "link_loss_db": {k: v["link_loss_db"] for k, v in truth["events"].items()},
            "wall_seconds": truth["wall_seconds"],
        }
        if args.headline:
            from host.simulate.headline import compare_with_published, headline

            result = headline(args.out)
            summary["headline"] = {
                k: result[k] for k in ("detections", "sifted_bits", "qber_signal", "qber_all")
            }
            if args.duration_s is None and args.tle is None:  # the published pass only
                summary["vs_published"] = compare_with_published(
                    result, profile.get("published", {})
                )
        print(json.dumps(summary, indent=1))
    return 0
