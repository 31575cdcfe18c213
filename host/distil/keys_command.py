"""`qkdsat keys confirm`: confirm or destroy the pending keys of a split distillation with
the peer at the next contact (host/distil/keystore.py, docs/payload-processor.md)."""

from __future__ import annotations

import sys

from host.console import print_result
from host.distil import channel as ch
from host.distil import keystore
from host.distil.run import check_address
from host.errors import BadInput


def add_arguments(parser) -> None:
    parser.add_argument("action", choices=("confirm",), help="what to do")
    parser.add_argument("--role", required=True, choices=("alice", "bob"), help="this side")
    parser.add_argument(
        "--store",
        required=True,
        help="this side's keys: a `qkdsat distil --out` directory, or the payload "
        "processor's KS/STATION (searched at any depth for report.json)",
    )
    parser.add_argument(
        "--auth-pool", required=True, help="the pre-shared authentication pool (as distil)"
    )
    parser.add_argument(
        "--new-auth-pool", action="store_true", help="the --auth-pool was never used"
    )
    parser.add_argument("--listen", help="HOST:PORT to listen on")
    parser.add_argument("--connect", help="HOST:PORT to connect to")


def confirm_over(transport, pool: ch.KeyPool, role: str, store) -> dict:
    """The confirmation over an open transport (the mission runs it in-process)."""
    try:
        session = ch.exchange_pool_start(transport, pool, role)
    except BaseException:
        transport.close()  # the peer stops waiting (in a mission this process goes on)
        raise
    chan = ch.AuthChannel(transport, pool, role, session=session)
    try:
        return keystore.run_confirm(chan, store, role)
    finally:
        chan.close()


def run(args) -> int:
    if bool(args.listen) == bool(args.connect):
        raise BadInput("keys confirm needs exactly one of --listen or --connect")
    option = "--listen" if args.listen else "--connect"
    address = args.listen or args.connect
    check_address(option, address)
    keystore.held_keys(args.store, args.role)  # a bad --store before any connection
    pool = ch.KeyPool.from_file(args.auth_pool, new=args.new_auth_pool)
    try:
        transport = ch.open_split(
            args.listen,
            args.connect,
            on_listening=lambda: print(
                f"qkdsat keys: {args.role} listening on {address}", file=sys.stderr, flush=True
            ),
        )
        result = confirm_over(transport, pool, args.role, args.store)
    finally:
        pool.close()
    result["role"] = args.role
    print_result(args, result, _human(result))
    return 0


def _human(result: dict) -> dict:
    lines = {
        "confirmed": ", ".join(result["confirmed"]) or "none",
        "kept (confirmed before)": ", ".join(result["kept"]) or "none",
        "destroyed": ", ".join(f"{d['key_id']} ({d['reason']})" for d in result["destroyed"])
        or "none",
    }
    for warning in result.get("warnings", []):
        lines.setdefault("warning", warning)
    return lines


def confirm_in_process(alice_store, alice_pool, bob_store, bob_pool) -> dict:
    """Both sides' confirmation in this process, over a connected pair of TCP sockets,
    each side with its own pool file (the mission: the next contact, right after the
    pass). Returns {role: outcome}; an error of either side is raised."""
    import socket
    import threading

    with socket.create_server(("127.0.0.1", 0)) as server:  # loopback TCP, as the link's
        dialled = socket.create_connection(server.getsockname())
        sockets = (server.accept()[0], dialled)
    results, threads = {}, []
    for role, store, pool_path, sock in (
        (ch.ALICE, alice_store, alice_pool, sockets[0]),
        (ch.BOB, bob_store, bob_pool, sockets[1]),
    ):

        def side(role=role, store=store, pool_path=pool_path, sock=sock):
            try:
                pool = ch.KeyPool.from_file(str(pool_path))
                try:
                    results[role] = confirm_over(ch.SocketTransport(sock), pool, role, store)
                finally:
                    pool.close()
            except BaseException as error:  # re-raised below
                results[f"{role}_error"] = error
                sock.close()  # the peer stops waiting

        threads.append(threading.Thread(target=side, name=f"confirm-{role}", daemon=True))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for role in (ch.ALICE, ch.BOB):
        if f"{role}_error" in results:
            raise results[f"{role}_error"]
    return results
