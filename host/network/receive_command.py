"""`qkdsat receive --at B MESSAGE --out FILE`: check and decrypt a message from another
station (docs/network.md). An altered message is rejected (exit 3), nothing written."""

from __future__ import annotations

from host.network.messaging import receive
from host.network.pool import add_network_option


def add_arguments(parser) -> None:
    parser.add_argument("message", help="the message file (from qkdsat send)")
    parser.add_argument("--at", dest="receiver", required=True, help="this station")
    parser.add_argument("--out", required=True, help="where to write the decrypted file")
    add_network_option(parser)


def run(args) -> int:
    header = receive(args.network, args.receiver, args.message, args.out)
    print(
        f"{args.out}: {header['plaintext_bytes']} bytes from {header['from']}, authenticated "
        f"({header['cipher']}, {header['security']} security)"
    )
    return 0
