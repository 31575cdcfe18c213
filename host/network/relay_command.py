"""`qkdsat relay --from A --to B --bits N`: a common key for two stations through the
satellite as trusted relay (docs/network.md; the satellite learns the key)."""

from __future__ import annotations

from host.network.pool import add_network_option
from host.network.relay import relay


def add_arguments(parser) -> None:
    parser.add_argument("--from", dest="source", required=True, help="station A")
    parser.add_argument("--to", dest="target", required=True, help="station B")
    parser.add_argument("--bits", type=int, required=True, help="key length (multiple of 8)")
    add_network_option(parser)


def run(args) -> int:
    result = relay(args.network, args.source, args.target, args.bits)
    print(
        f"relayed {result['bits']} bits {result['from']} -> {result['to']} "
        f"(relay {result['relay_id']}): {result['consumed_bits_per_pool']} bits consumed from "
        f"each of the four pools; the key is in {result['from']}/{result['to']}.pool and "
        f"{result['to']}/{result['from']}.pool at byte {result['offset']}"
    )
    return 0
