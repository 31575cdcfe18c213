"""`qkdsat campaign`: every scheduled pass of N days simulated and distilled on
dask.distributed (a LocalCluster by default, any cluster by --scheduler), the pools filled,
key per station per day, relay capacity and pool levels reported (docs/network.md)."""

from __future__ import annotations

import math
from pathlib import Path

from host.console import print_result, wants_progress
from host.errors import BadInput
from host.network.pool import add_network_option
from host.network.schedule_command import add_window_arguments, parse_utc


def add_arguments(parser) -> None:
    add_window_arguments(parser)
    parser.add_argument("--profile", default="jinan-1", help="simulation profile of every pass")
    parser.add_argument(
        "--duration-s",
        type=float,
        help="simulate only this many seconds around each culmination (default: whole passes)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a profile parameter in every pass (as qkdsat simulate --set)",
    )
    parser.add_argument(
        "--ec", default="ldpc", choices=("ldpc", "cascade"), help="error correction of each pass"
    )
    parser.add_argument(
        "--insecure-deterministic-seed",
        type=int,
        metavar="N",
        help="TESTS ONLY: replay each pass's distillation randomness from N (reproducible "
        "outcomes; such keys are never put in a pool)",
    )
    parser.add_argument("--seed", type=int, default=1, help="campaign seed of the channel noise")
    parser.add_argument("--out", required=True, help="campaign directory (resumed if it exists)")
    add_network_option(parser)
    parser.set_defaults(network=None)
    parser.add_argument(
        "--scheduler", metavar="tcp://HOST:PORT", help="an existing Dask cluster's scheduler"
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="LocalCluster worker processes (no --scheduler)"
    )


def run(args) -> int:
    from host.network.campaign import plan_campaign, run_campaign

    if args.workers < 1:
        raise BadInput(f"--workers {args.workers}: at least 1")
    if args.duration_s is not None and not (
        math.isfinite(args.duration_s) and args.duration_s > 0
    ):
        raise BadInput(f"--duration-s {args.duration_s}: must be a positive number of seconds")
    try:
        tle_text = Path(args.tle).read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise BadInput(f"--tle {args.tle}: cannot read ({error})") from None
    stations = [name.strip() for name in args.stations.split(",") if name.strip()]
    plan = plan_campaign(
        tle_text, args.tle, stations, parse_utc(args.start), args.days, args.profile,
        args.duration_s, args.set, args.catalogue, args.seed, args.ec,
        args.insecure_deterministic_seed,
    )  # fmt: skip
    if not plan["passes"]:
        raise BadInput(
            f"no QKD-capable pass over {', '.join(stations)} in the {args.days:g} days after "
            f"{args.start} (qkdsat schedule lists every pass with its status)"
        )
    out = Path(args.out)
    network = Path(args.network) if args.network else out / "network"
    summary = run_campaign(out, plan, network, args.scheduler, args.workers, wants_progress(args))
    human = {
        "passes": len(summary["passes"]),
        "key_bits_per_day": {
            s: round(v["key_bits_per_day"]) for s, v in summary["stations"].items()
        },
        "passes_with_key": {s: v["passes_with_key"] for s, v in summary["stations"].items()},
        "relay_capacity_bits": summary["relay_capacity_bits"],
        "report": str(out / "report.json"),
        "plots": summary["plots"],
    }
    print_result(args, summary, human)
    return 0
