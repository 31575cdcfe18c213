"""`qkdsat payload --port PORT ACTION`: talk to a payload controller (real or emulated)
over the ground link (docs/ground-link.md).

    qkdsat payload --port /dev/ttyUSB0 --key payload.key status
    qkdsat payload --port /dev/ttyUSB0 --key payload.key download PASS_DIR

Exit codes: 0 done; 1 the payload rejected the command, or the answer cannot be used
(a sealed product without --product-key, a corrupt download): the reason is printed;
2 bad input (key file, arguments, port); 4 the link failed (no answer within --timeout,
the port went away): nothing is wrong with the command, check the line. An internal error
(a bug) is exit 1 with "internal error" in the message (host/cli.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import sys
from pathlib import Path

import serial

from host.console import print_result, to_json
from host.errors import BadInput
from host.link.client import LinkError, LinkFailed, PayloadClient, read_counter_state
from host.link.framed_serial import LinkLost, LinkTimeout
from host.protocol import ccsds

EXIT_REJECTED = 1
EXIT_LINK_FAILED = 4

ACTIONS = (
    "status",
    "ping",
    "config",
    "start",
    "stop",
    "list",
    "download",
    "delete",
    "time",
    "reboot",
    "maintenance",
    "rekey",
)


def _link_options(parser: argparse.ArgumentParser, after_action: bool) -> None:
    """The link options, accepted before the action and after it (`payload status --port
    X`); after the action they default to SUPPRESS so they do not undo what came before."""

    def default(value):
        return argparse.SUPPRESS if after_action else value

    parser.add_argument(
        "--port", default=default(None), help="serial port of the payload's ground link"
    )
    parser.add_argument("--baud", type=int, default=default(115200), help="baud rate of the port")
    parser.add_argument(
        "--key",
        type=Path,
        metavar="FILE",
        default=default(os.environ.get("QKDSAT_LINK_KEY")),
        help="FILE holding the payload's link key (16..64 raw bytes, or their hex digits); "
        "default: the file named by $QKDSAT_LINK_KEY (the payload has no built-in key)",
    )
    parser.add_argument(
        "--product-key",
        type=Path,
        metavar="FILE",
        default=default(os.environ.get("QKDSAT_PRODUCT_KEY")),
        help="FILE holding the payload's product key (AES-256-GCM: 32 raw bytes or their 64 "
        "hex digits); default: the file named by $QKDSAT_PRODUCT_KEY. It opens pattern "
        "products, which are served only sealed",
    )
    parser.add_argument(
        "--counter-file",
        type=Path,
        default=default(None),
        help="where this station keeps its telecommand counter "
        "(default ~/.local/state/qkdsat/tc-counter-<key id>)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=default(3.0),
        help="seconds to wait for each reply",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from host.cli import HelpFormatter, common_options

    _link_options(parser, after_action=False)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(
            name,
            help=help_text,
            description=help_text,
            parents=[common_options(json_output=True, nested=True)],
            formatter_class=HelpFormatter,
        )
        _link_options(sub, after_action=True)
        return sub

    action("status", "housekeeping report (firmware, key, link counters)")
    action("ping", "are-you-alive test: prints the firmware version")
    config = action("config", "configure the pass (JSON object)")
    config.add_argument("json", nargs="?", help="a JSON object, or @FILE")
    config.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="one setting"
    )
    action("start", "start pass mode")
    action("stop", "stop pass mode")
    action("list", "list the products with size and CRC-32")
    download = action("download", "download products into PASS_DIR/satellite/")
    download.add_argument("pass_dir", type=Path, help="the pass directory")
    download.add_argument("names", nargs="*", help="products to fetch (default: all)")
    download.add_argument(
        "--chunk",
        type=int,
        default=ccsds.MAX_CHUNK_BYTES,
        help=f"bytes per chunk request, 1..{ccsds.MAX_CHUNK_BYTES}",
    )
    download.add_argument("--window", type=int, default=4, help="chunk requests in flight")
    delete = action("delete", "delete a product on the payload")
    delete.add_argument("name", help="product name (see 'list')")
    time_parser = action("time", "set the payload's UTC clock")
    time_parser.add_argument("utc", nargs="?", default="now", help="ISO 8601 UTC or 'now'")
    action("reboot", "restart the payload controller")
    action(
        "maintenance",
        "open the payload's code-update session (no REPL: 'qkdsat flash --key' deploys over it)",
    )
    rekey = action("rekey", "install the next link key (wrapped by the current one)")
    rekey.add_argument("next_key", type=Path, help="file with the next key (32 bytes or hex)")


def load_key(path: Path | None, option: str = "--key") -> bytes:
    """The link key from a file. The file's name is not echoed in errors when the file does
    not exist: a user who passed the key itself instead of a file would see it printed."""
    if path is None:
        raise BadInput(f"{option}: needed (or $QKDSAT_LINK_KEY): the payload has no built-in key")
    path = Path(path)
    if not path.is_file():
        raise BadInput(
            f"{option} (or $QKDSAT_LINK_KEY): not a readable file; it takes the name of a "
            "FILE holding the key, never the key itself (the value is not shown)"
        )
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise BadInput(f"key file {path}: {error.strerror}") from None
    text = raw.strip()
    if len(text) in (32, 64, 128) and all(c in b"0123456789abcdefABCDEF" for c in text):
        raw = bytes.fromhex(text.decode())
    if not 16 <= len(raw) <= 64:
        raise BadInput(f"key file {path}: {len(raw)} bytes; a link key is 16..64 bytes")
    return raw


def load_product_key(path: Path | None) -> bytes | None:
    """Like load_key: a FILE; its name is not echoed when it is not a file."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise BadInput(
            "--product-key (or $QKDSAT_PRODUCT_KEY): not a readable file; it takes the name "
            "of a FILE holding the key, never the key itself (the value is not shown)"
        )
    try:
        raw = Path(path).read_bytes()
    except OSError as error:
        raise BadInput(f"product key file {path}: {error.strerror}") from None
    text = raw.strip()
    if len(text) == 64 and all(c in b"0123456789abcdefABCDEF" for c in text):
        raw = bytes.fromhex(text.decode())
    if len(raw) != 32:
        raise BadInput(f"product key file {path}: {len(raw)} bytes; an AES-256 key is 32")
    return raw


def check_counter_file(path: Path) -> None:
    """The counter file must be readable as one (client.read_counter_state), and
    writable."""
    if path.exists():
        if not path.is_file():
            raise BadInput(f"--counter-file {path}: not a file")
        try:
            read_counter_state(path)
        except (OSError, UnicodeDecodeError) as error:
            raise BadInput(f"--counter-file {path}: cannot read ({error})") from None
        except ValueError as error:
            raise BadInput(f"--counter-file {path}: {error}") from None
        if not os.access(path, os.W_OK):
            raise BadInput(f"--counter-file {path}: not writable")
    else:
        probe = path.parent
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
            raise BadInput(f"--counter-file {path}: {probe} is not a writable directory")


def default_counter_file(key: bytes) -> Path:
    state = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state"))
    key_id = hashlib.sha256(b"qkdsat key id" + key).hexdigest()[:12]
    return state / "qkdsat" / f"tc-counter-{key_id}"


def parse_config(args: argparse.Namespace) -> dict:
    config: dict = {}
    if args.json:
        text = args.json
        if text.startswith("@"):
            try:
                text = Path(text[1:]).read_text()
            except OSError as error:
                raise BadInput(f"config file {text[1:]}: {error.strerror}") from None
        try:
            config = json.loads(text)
        except ValueError as error:
            raise BadInput(f"configuration is not JSON: {error}") from None
        if not isinstance(config, dict):
            raise BadInput("configuration must be a JSON object")
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise BadInput(f"--set {item!r}: expected NAME=VALUE")
        try:
            config[name] = json.loads(value)
        except ValueError:
            config[name] = value
    if not config:
        raise BadInput("config: give a JSON object or --set NAME=VALUE")
    return config


def parse_utc(text: str) -> int | None:
    if text == "now":
        return None
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BadInput(f"time {text!r}: expected ISO 8601 UTC or 'now'") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1_000_000)


def check_link_options(args: argparse.Namespace) -> None:
    if not args.port:
        raise BadInput("--port: required (the serial port of the payload's ground link)")
    if not 50 <= args.baud <= 12_000_000:
        raise BadInput(f"--baud {args.baud}: must be between 50 and 12000000")
    if not (math.isfinite(args.timeout) and 0 < args.timeout <= 3600):
        raise BadInput(f"--timeout {args.timeout}: must be between 0 and 3600 s")


def run(args: argparse.Namespace) -> int:
    check_link_options(args)
    if args.counter_file is not None:
        check_counter_file(args.counter_file)
    key = load_key(args.key)
    counter_file = args.counter_file or default_counter_file(key)
    check_counter_file(counter_file)
    product_key = load_product_key(args.product_key)
    config = parse_config(args) if args.action == "config" else None
    try:
        client = PayloadClient(
            args.port,
            key,
            product_key=product_key,
            counter_file=counter_file,
            baudrate=args.baud,
            timeout_s=args.timeout,
        )
    except (serial.SerialException, OSError, ValueError) as error:
        raise BadInput(f"--port {args.port}: {error}") from None
    try:
        with client:
            return _act(client, args, config)
    except (LinkFailed, LinkLost, LinkTimeout) as error:
        print(f"qkdsat payload {args.action}: link failed: {error}", file=sys.stderr)
        return EXIT_LINK_FAILED
    except LinkError as error:  # rejected, or refused here (a sealed product without key)
        print(f"qkdsat payload {args.action}: {error}", file=sys.stderr)
        return EXIT_REJECTED


def _done(args: argparse.Namespace, result: dict, text: str) -> None:
    """An action's result: one line of text, or JSON with --json."""
    print(to_json(result) if args.json else text)


def _act(client: PayloadClient, args: argparse.Namespace, config: dict | None) -> int:
    action = args.action
    if action == "status":
        report = client.housekeeping()
        print_result(args, report)
        if report.get("key") != "provisioned":
            print(f"warning: the payload's key is {report.get('key')}", file=sys.stderr)
    elif action == "ping":
        print_result(args, {"firmware": client.ping()})
    elif action == "config":
        client.configure(config)
        _done(args, {"configured": config}, f"configured: {json.dumps(config, sort_keys=True)}")
    elif action == "start":
        client.start()
        _done(args, {"pass_mode": "started"}, "pass mode started")
    elif action == "stop":
        client.stop()
        _done(args, {"pass_mode": "stopped"}, "pass mode stopped")
    elif action == "list":
        entries = client.list_products()
        if args.json:
            print(to_json([{"name": e.name, "bytes": e.size, "crc32": e.crc32} for e in entries]))
            return 0
        width = max([len(e.name) for e in entries] + [4])
        print(f"{'name':{width}s}  {'bytes':>12s}  crc32")
        for e in entries:
            print(f"{e.name:{width}s}  {e.size:12d}  {e.crc32:08x}")
        print(f"{len(entries)} products, {sum(e.size for e in entries)} bytes")
    elif action == "download":
        return _download(client, args)
    elif action == "delete":
        client.delete(args.name)
        _done(args, {"deleted": args.name}, f"deleted {args.name}")
    elif action == "time":
        utc_us = client.set_time(parse_utc(args.utc))
        when = dt.datetime.fromtimestamp(utc_us / 1e6, dt.UTC)
        _done(args, {"clock_utc": when.isoformat()}, f"payload clock set to {when.isoformat()}")
    elif action == "reboot":
        client.reboot()
        _done(args, {"rebooting": True}, "rebooting")
    elif action == "maintenance":
        client.open_code_session()
        _done(
            args,
            {"code_session_s": ccsds.CODE_SESSION_S},
            f"code-update session open on {args.port} for {ccsds.CODE_SESSION_S} s after each "
            "accepted command; the application keeps running (no REPL: deploy with "
            "'qkdsat flash --key')",
        )
    elif action == "rekey":
        next_key = load_key(args.next_key)
        if len(next_key) != ccsds.REKEY_KEY_BYTES:
            raise BadInput(f"next key {args.next_key}: {len(next_key)} bytes, need 32")
        client.rekey(next_key)
        client.counter_file = default_counter_file(next_key)
        _done(args, {"rekeyed": True}, "next key installed; telecommand counters restart at 1")
    return 0


def _download(client: PayloadClient, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if not 0 < args.chunk <= ccsds.MAX_CHUNK_BYTES:
        raise BadInput(f"--chunk {args.chunk}: 1..{ccsds.MAX_CHUNK_BYTES} bytes")
    if args.window < 1:
        raise BadInput(f"--window {args.window}: at least 1")
    satellite = args.pass_dir / "satellite"
    entries = client.list_products()
    by_name = {e.name: e for e in entries}
    missing = [name for name in args.names if name not in by_name]
    if missing:
        raise BadInput(f"no such product on the payload: {', '.join(missing)}")
    chosen = [by_name[name] for name in args.names] if args.names else entries
    satellite.mkdir(parents=True, exist_ok=True)
    listing = {
        "format_version": 1,
        "products": [{"name": e.name, "bytes": e.size, "crc32": e.crc32} for e in entries],
    }
    (satellite / "products.json").write_text(json.dumps(listing, indent=1) + "\n")
    total = 0
    downloaded = []
    bar_off = True if args.quiet or args.json else None  # None: a bar on a terminal only
    for entry in chosen:
        with tqdm(
            total=entry.size,
            unit="B",
            unit_scale=True,
            desc=entry.name,
            disable=bar_off,
            leave=False,
        ) as bar:
            result = client.download(
                entry, satellite, chunk_bytes=args.chunk, window=args.window, progress=bar.update
            )
        resumed = f", resumed at {result.resumed_from}" if result.resumed_from else ""
        rate = result.size / result.seconds if result.seconds > 0 else 0.0
        check = (
            "sealed (AES-256-GCM), every chunk authenticated"
            if result.sealed
            else f"CRC-32 {entry.crc32:08x} verified"
        )
        downloaded.append(
            {
                "name": entry.name,
                "bytes": entry.size,
                "crc32": entry.crc32,
                "sealed": bool(result.sealed),
                "bytes_per_s": rate,
                "resent": result.retransmissions,
                "resumed_from": result.resumed_from or 0,
            }
        )
        if not args.json:
            print(
                f"{entry.name}: {entry.size} bytes, {check} "
                f"({rate / 1000:.1f} kB/s, {result.retransmissions} resent{resumed})"
            )
        total += entry.size
    _done(
        args,
        {"pass_dir": str(args.pass_dir), "products": downloaded},
        f"{len(chosen)} products, {total} bytes in {satellite}",
    )
    return 0
