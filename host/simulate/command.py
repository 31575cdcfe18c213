"""`qkdsat simulate --profile P [--tle FILE --station NAME --start UTC] [--seed N] [--two-way]
--out DIR`: a pass simulated from physics alone (no firmware), written as a pass directory
(docs/formats.md; the models are described in docs/simulator.md). --two-way adds the
uplink and the time-transfer products (docs/time-transfer.md)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from host.console import print_result, progress_for
from host.errors import BadInput, EnvironmentFailure
from host.outdir import check_output_dir

EARTH_EQUATORIAL_RADIUS_KM = 6378.137
EARTH_MU_KM3_S2 = 398_600.4418
# A pattern log holds one 4-bit symbol per slot (docs/formats.md): half a byte per slot.
PATTERN_LOG_BYTES_PER_SLOT = 0.5
PATTERN_LOG_WARN_BYTES = 1 << 30  # above this an explicit --pattern log needs --force
PASS_SUBDIRS = ("satellite", "ground", "truth")


def add_arguments(parser) -> None:
    parser.add_argument(
        "--profile", help="profile name (see --list-profiles) or path of a profile .json"
    )
    parser.add_argument(
        "--list-profiles", action="store_true", help="list the profiles shipped and exit"
    )
    parser.add_argument("--tle", help="TLE file (2 or 3 lines); default: synthetic pass")
    parser.add_argument("--station", help="ground station (default: the profile's)")
    parser.add_argument(
        "--start", help="UTC: search start for the TLE pass, or the synthetic pass's start"
    )
    parser.add_argument("--seed", type=int, default=1, help="simulation seed (>= 0)")
    parser.add_argument(
        "--pattern-secret",
        metavar="HEX",
        help="Alice's pattern secret (32 hex digits) to reproduce a pass exactly; default: "
        "fresh from the OS. Never derived from --seed, which pass.json publishes",
    )
    parser.add_argument(
        "--duration-s",
        type=float,
        help="simulate only this many seconds around culmination (default: the whole pass)",
    )
    parser.add_argument(
        "--pattern",
        choices=("auto", "log", "source"),
        default="auto",
        help="satellite patterns as a pattern log (0.5 byte per slot; auto: short runs) or "
        "a pattern source",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a profile parameter, e.g. --set detectors.misalignment_error=0.12"
        " or --set 'detectors.background_hz=[0,0,0,0]' (repeatable; recorded in pass.json)",
    )
    parser.add_argument("--out", help="pass directory to write")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an existing pass (or an interrupted run's leftovers) in --out, and "
        "write a pattern log larger than 1 GiB",
    )
    parser.add_argument(
        "--two-way",
        action="store_true",
        help="a two-way pass for `qkdsat timetransfer`: the pass flies the two-way profile's"
        " orbit on its clocks (micius-2017 -> micius-qstt, jinan-1 -> qstt-best), its"
        " detections are the downlink events and the uplink is simulated beside it"
        " (timetransfer.json, tt_*.npz; docs/time-transfer.md)",
    )
    parser.add_argument(
        "--headline",
        action="store_true",
        help="also count the pass with the truth and compare with the profile's published"
        " numbers (docs/simulator.md)",
    )


def list_profiles() -> dict:
    from host.simulate import profiles

    listing = {}
    for name in profiles.available():
        data = json.loads(profiles.resolve(name).read_text())
        description = str(data.get("description", ""))
        listing[name] = description.split(". ")[0].rstrip(".")
    return listing


def check_tle_orbit(tle_text: str, origin: str) -> None:
    """An orbit whose perigee lies inside the Earth is bad input, not 'never seen'."""
    from emulator.pass_model.geometry import parse_tle

    _, _, line2 = parse_tle(tle_text, origin)
    try:
        eccentricity = float("0." + line2[26:33].strip())
        revs_per_day = float(line2[52:63])
    except ValueError:
        raise BadInput(f"{origin}: line 2 eccentricity or mean motion is not a number") from None
    if not revs_per_day > 0:
        raise BadInput(f"{origin}: line 2 mean motion {revs_per_day} rev/day must be positive")
    mean_motion_rad_s = revs_per_day * 2 * math.pi / 86400.0
    semi_major_km = (EARTH_MU_KM3_S2 / mean_motion_rad_s**2) ** (1 / 3)
    perigee_km = semi_major_km * (1 - eccentricity) - EARTH_EQUATORIAL_RADIUS_KM
    if perigee_km < 0:
        raise BadInput(
            f"{origin}: line 2 mean motion {revs_per_day} rev/day and eccentricity "
            f"{eccentricity} put the perigee {-perigee_km:.0f} km inside the Earth"
        )


def prepare_out(out: Path, force: bool) -> None:
    """Refuse to overwrite a pass unless --force; name an interrupted run's leftovers."""
    check_output_dir(out)
    if not out.is_dir() or not any(out.iterdir()):
        return
    entries = {p.name for p in out.iterdir()}
    if "pass.json" in entries:
        if not force:
            raise BadInput(f"--out {out}: holds a pass already (pass.json); --force replaces it")
        return
    if entries <= set(PASS_SUBDIRS) | {"pass.json.tmp"}:
        if not force:
            raise BadInput(
                f"--out {out}: leftovers of an interrupted simulation (no pass.json); "
                "--force replaces them"
            )
        for name in entries:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()


def run(args) -> int:
    from host.simulate import passgen, profiles

    if args.list_profiles:
        listing = list_profiles()
        print_result(args, listing)
        return 0
    if not args.profile or not args.out:
        raise BadInput("give --profile P and --out DIR (profiles: --list-profiles)")
    if args.seed < 0:
        raise BadInput(f"--seed {args.seed}: must be >= 0")
    if args.duration_s is not None and not (
        math.isfinite(args.duration_s) and args.duration_s > 0
    ):
        raise BadInput(f"--duration-s {args.duration_s}: must be a positive number of seconds")
    overrides = dict(profiles.parse_override(text) for text in args.set)
    profile = profiles.load(args.profile, overrides)
    tle_text = None
    if args.tle:
        try:
            tle_text = Path(args.tle).read_text()
        except (OSError, UnicodeDecodeError) as error:
            raise BadInput(f"--tle {args.tle}: cannot read ({error})") from None
        check_tle_orbit(tle_text, args.tle)
    pattern_secret = None
    if args.pattern_secret is not None:
        try:
            pattern_secret = bytes.fromhex(args.pattern_secret)
        except ValueError:
            # the value is a secret (or a typo of one): never echoed
            raise BadInput(
                f"--pattern-secret: expected {2 * passgen.PATTERN_SECRET_BYTES} hex digits "
                "(the value is not shown)"
            ) from None
        if len(pattern_secret) != passgen.PATTERN_SECRET_BYTES:
            raise BadInput(f"--pattern-secret: {2 * passgen.PATTERN_SECRET_BYTES} hex digits")
    out = Path(args.out)
    prepare_out(out, args.force)
    two_way_pass = None
    if args.two_way:
        from host.simulate.profiles import station as pick_station
        from host.timetransfer import simulate as two_way

        if tle_text is not None:
            raise BadInput(
                "--two-way with --tle: the two-way pass flies the two-way profile's circular "
                "orbit (docs/time-transfer.md); drop --tle"
            )
        two_way_profile = two_way.load_profile(two_way.profile_for(profile["name"]))
        two_way_pass = two_way.prepare_beside_qkd(
            two_way_profile, profile, pick_station(profile, args.station), args.seed,
            args.duration_s, args.start or profile["orbit"]["utc_start"],
            uplink_key=None if pattern_secret is None else two_way.uplink_key_from_secret(
                pattern_secret
            ),
        )  # fmt: skip
    scenario = passgen.build_scenario(
        profile,
        station_name=args.station,
        tle_text=tle_text,
        tle_origin=args.tle or "TLE",
        start_utc=args.start,
        seed=args.seed,
        duration_s=args.duration_s,
        pattern_secret=pattern_secret,
        geometry=two_way_pass.geometry if two_way_pass else None,
        clocks=(two_way_pass.satellite, two_way_pass.ground) if two_way_pass else None,
    )
    log_bytes = scenario.slot_count * PATTERN_LOG_BYTES_PER_SLOT
    if args.pattern == "log" and log_bytes > PATTERN_LOG_WARN_BYTES and not args.force:
        raise BadInput(
            f"--pattern log: {scenario.slot_count} slots make a {log_bytes / 1e9:.1f} GB "
            "pattern log; use --pattern source, --duration-s, or --force to write it"
        )
    progress = progress_for(args, "qkdsat simulate")
    try:
        # a replaced pass's two-way scenario must not describe this pass
        (out / "timetransfer.json").unlink(missing_ok=True)
        truth = passgen.run(scenario, out, pattern_mode=args.pattern, progress=progress.enabled)
        if two_way_pass is not None:  # the uplink beside this pass, on its orbit and clocks
            two_way_summary = two_way.write_beside(two_way_pass, out, scenario)
    except OSError as error:  # a full or failing disk: pass.json, written last, is missing
        raise EnvironmentFailure(
            f"--out {out}: {error.strerror or error} while writing the pass; the directory "
            "is incomplete (no pass.json): free space, then run again with --force"
        ) from None
    summary = {
        "out": str(out),
        "geometry": truth["geometry"],
        "slots": truth["slot_count"],
        "detections": truth["detections"],
        "link_loss_db": {k: v["link_loss_db"] for k, v in truth["events"].items()},
        "wall_seconds": truth["wall_seconds"],
    }
    if two_way_pass is not None:
        summary["two_way"] = {"profile": two_way_pass.profile["name"], **two_way_summary}
    if args.headline:
        from host.simulate.headline import compare_with_published, headline

        result = headline(out)
        summary["headline"] = {
            k: result[k] for k in ("detections", "sifted_bits", "qber_signal", "qber_all")
        }
        if args.duration_s is None and args.tle is None:  # the published pass only
            summary["vs_published"] = compare_with_published(result, profile.get("published", {}))
    print_result(args, summary)
    return 0
