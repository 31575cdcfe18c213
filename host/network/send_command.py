"""`qkdsat send --from A --to B FILE --out MESSAGE`: a file encrypted for another station
with their shared pool (one-time pad + Wegman-Carter; docs/network.md)."""

from __future__ import annotations

from host.network.messaging import AES_GCM, OTP, send
from host.network.pool import add_network_option


def add_arguments(parser) -> None:
    parser.add_argument("file", help="the file to send (an image, say)")
    parser.add_argument("--from", dest="sender", required=True, help="this station")
    parser.add_argument("--to", dest="receiver", required=True, help="the receiving station")
    parser.add_argument("--out", required=True, help="the encrypted message file to write")
    parser.add_argument(
        "--cipher", default=OTP, choices=(OTP, AES_GCM),
        help=f"{OTP}: information-theoretic; {AES_GCM}: computationally secure only",
    )  # fmt: skip
    add_network_option(parser)


def run(args) -> int:
    header = send(args.network, args.sender, args.receiver, args.file, args.out, args.cipher)
    print(
        f"{args.out}: {header['plaintext_bytes']} bytes for {header['to']}, {header['cipher']} "
        f"({header['security']} security), {8 * header['pool_bytes']} pool bits used"
    )
    return 0
