"""`qkdsat pool fill|status`: the network's key pools (docs/network.md)."""

from __future__ import annotations

import json
from pathlib import Path

from host.errors import BadInput
from host.network.pool import add_network_option, check_name, fill_pair, network_levels


def add_arguments(parser) -> None:
    parser.add_argument("action", choices=("fill", "status"), help="what to do")
    add_network_option(parser)
    parser.add_argument("--station", help="fill: the station the pass was made with")
    parser.add_argument(
        "--keys", help="fill: `qkdsat distil --out` directory (alice.key, bob.key, report.json)"
    )
    parser.add_argument(
        "--bob-keys", help="fill: Bob's output directory when distilled in split mode"
    )
    parser.add_argument("--json", action="store_true", help="status as JSON")


def run(args) -> int:
    if args.action == "fill":
        if not args.station or not args.keys:
            raise BadInput("pool fill needs --station and --keys")
        result = fill_pair(args.network, check_name(args.station), args.keys, args.bob_keys)
        print(
            f"{result['station']}: {8 * result['bytes']} bits added at byte {result['offset']} "
            f"to the satellite's pool and the station's ({result['source']})"
        )
        return 0
    if not Path(args.network).is_dir():  # a typo must not read as "no keys anywhere"
        raise BadInput(f"--network {args.network}: not a directory (no pool was filled there)")
    levels = network_levels(args.network)
    if args.json:
        print(json.dumps(levels, indent=1))
        return 0
    print(
        f"{'holder':<13} {'peer':<13} {'available':>12} {'for holder':>12} {'for peer':>12} "
        f"{'used':>12} {'lost':>8}  (bits; each end's takes use its own share)"
    )
    for level in levels:
        shares = level["available_bytes_by_initiator"]
        print(
            f"{level['holder']:<13} {level['peer']:<13} {8 * level['available_bytes']:>12} "
            f"{8 * shares[level['holder']]:>12} {8 * shares[level['peer']]:>12} "
            f"{8 * level['used_bytes']:>12} {8 * level['lost_bytes']:>8}"
        )
    return 0
