"""`qkdsat kms pki|serve`: ETSI GS QKD 014 key delivery at a station (docs/network.md)."""

from __future__ import annotations

import ipaddress
import signal
from pathlib import Path

from host.errors import BadInput
from host.network.pool import check_name


def add_arguments(parser) -> None:
    parser.add_argument("action", choices=("pki", "serve"), help="make the demo PKI, or serve")
    parser.add_argument("--pki", required=True, help="PKI directory (ca.pem, NAME.pem/.key)")
    parser.add_argument("--sae", required=True, help="comma-separated SAE IDs (cert names)")
    parser.add_argument("--server-name", default="localhost", help="the KME's host name")
    parser.add_argument("--pool", help="serve: the key pool to deliver from (NET/A/B.pool)")
    parser.add_argument(
        "--db",
        help="serve: keys awaiting their slave SAE: an SQLite file, or a postgresql:// URL",
    )
    parser.add_argument("--audit", help="serve: audit log (JSON lines, no key material)")
    parser.add_argument("--listen", default="127.0.0.1:8443", help="serve: host:port")
    parser.add_argument(
        "--kme-id",
        default="kme",
        help="serve: this KME's ID (its certificate's name for --peer-url)",
    )
    parser.add_argument(
        "--kme",
        default="",
        help="pki: comma-separated KME IDs to certify as clients (for two KMEs, --peer-url)",
    )
    parser.add_argument(
        "--peer-url",
        help="serve: the slave side's KME (https://HOST:PORT), whose pool is this pool's "
        "pair (B/A.pool for A/B.pool): enc_keys here are served by dec_keys there",
    )
    parser.add_argument(
        "--peer-kme-id",
        help="serve: that KME's ID (with --peer-url); its certificate PKI/ID.pem is pinned: "
        "deliveries from it only; so is its server certificate PKI/HOST.pem (HOST of "
        "--peer-url): deliveries to it only",
    )


def run(args) -> int:
    from host.network.pki import issue, make_ca

    sae_ids = [check_name(name.strip(), "SAE") for name in args.sae.split(",") if name.strip()]
    pki = Path(args.pki)
    if args.action == "pki":
        if pki.exists() and not pki.is_dir():
            raise BadInput(f"--pki {pki}: not a directory")
        if not sae_ids:
            raise BadInput(f"--sae {args.sae!r}: give the SAE names, e.g. --sae sae-a,sae-b")
        if (pki / "ca.pem").exists():
            raise BadInput(f"--pki {pki}: holds a CA already (ca.pem); use another directory")
        kme_ids = [check_name(n.strip(), "KME") for n in args.kme.split(",") if n.strip()]
        check_name(args.server_name, "server")  # a file name in --pki, like the others
        names = [*sae_ids, *kme_ids, args.server_name, "ca"]
        if len(set(names)) < len(names):
            # one CA, told apart by name: an SAE named as a KME would pass as that KME, and
            # one named as the server or the CA would overwrite its certificate
            raise BadInput(
                f"--sae {args.sae} --kme {args.kme}: every name once, SAE or KME, and "
                f"none 'ca' or the server's ({args.server_name})"
            )
        make_ca(pki)
        issue(pki, args.server_name, server=True)
        for name in sae_ids + kme_ids:
            issue(pki, name)
        print(
            f"{pki}: CA, server certificate {args.server_name}, SAEs {', '.join(sae_ids)}"
            + (f", KMEs {', '.join(kme_ids)}" if kme_ids else "")
        )
        return 0
    from host.distil.channel import parse_address
    from host.network.kms import KeyManager, make_server, open_store, tls_context

    if not (args.pool and args.db and args.audit):
        raise BadInput("kms serve needs --pool, --db and --audit")
    for name in ("ca.pem", f"{args.server_name}.pem", f"{args.server_name}.key"):
        if not (pki / name).is_file():
            raise BadInput(f"--pki {pki}: {name} missing (make it with qkdsat kms pki)")
    host, port = parse_address(args.listen)
    peer = None
    if bool(args.peer_url) != bool(args.peer_kme_id):
        raise BadInput("--peer-url and --peer-kme-id go together")
    if args.peer_url:
        from host.network.kms import PeerKME, peer_address

        peer_id = check_name(args.peer_kme_id, "KME")
        peer_host, _ = peer_address(args.peer_url)
        try:
            ipaddress.ip_address(peer_host)  # an address: a file name of its own
        except ValueError:
            check_name(peer_host, "--peer-url host")  # no path in the pin's file name
        for name in (f"{args.kme_id}.pem", f"{args.kme_id}.key", f"{peer_id}.pem"):
            if not (pki / name).is_file():
                raise BadInput(
                    f"--pki {pki}: {name} missing or not a file "
                    f"(qkdsat kms pki --kme {args.kme_id},{peer_id})"
                )
        if not (pki / f"{peer_host}.pem").is_file():
            raise BadInput(
                f"--pki {pki}: {peer_host}.pem missing or not a file: the certificate the "
                f"peer KME serves with, issued by this CA for {peer_host}, is pinned"
            )
        # the peer's own certificates are pinned (PeerKME): deliveries from its client
        # certificate only, and to its server certificate only
        peer = PeerKME(
            args.peer_url, peer_id, pki / "ca.pem",
            pki / f"{args.kme_id}.pem", pki / f"{args.kme_id}.key", pki / f"{peer_id}.pem",
            pki / f"{peer_host}.pem",
        )  # fmt: skip
    manager = KeyManager(
        args.kme_id, args.pool, open_store(args.db), sae_ids, args.audit, peer=peer
    )
    context = tls_context(
        pki / "ca.pem", pki / f"{args.server_name}.pem", pki / f"{args.server_name}.key"
    )
    server = make_server(manager, host, port, context)
    signal.signal(signal.SIGTERM, _stop)
    print(f"ETSI GS QKD 014 on https://{host}:{server.server_address[1]}/api/v1/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM ends the server like Ctrl-C: a clean close
