"""`qkdsat`: the command line of the ground tools.

Each subcommand lives in its own module with `add_arguments(parser)` and `run(args)`;
they are imported only when used, so `qkdsat --help` stays fast. Every error ends here as
one line on stderr with the exit code below; a traceback only with --debug.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import sys
import threading
import traceback

from host.errors import (
    EXIT_ABORTED,
    EXIT_BAD_INPUT,
    EXIT_ENVIRONMENT,
    EXIT_INTERRUPTED,
    BadInput,
    EnvironmentFailure,
    ProtocolAborted,
)
from host.memory import without_huge_page_advice

EXIT_CODES = """exit codes:
  0    success
  1    the environment failed (disk full, device or link lost, internal error)
  2    bad input: the message names the file or option and what is wrong
  3    the protocol aborted by design (e.g. QBER above threshold); reason in the report
  4    payload: the link failed (no answer within --timeout, the port went away)
  130  interrupted (Ctrl-C): outputs are left as they were before the run"""

# name -> (module, one-line help, examples for the epilog)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "smoke": (
        "host.smoke",
        "boot the firmware on an emulated target and check both UARTs",
        "qkdsat smoke --target unix",
    ),
    "simulate": (
        "host.simulate.command",
        "simulate a pass from physics into a pass directory",
        "qkdsat simulate --list-profiles\n"
        "  qkdsat simulate --profile micius-2017 --duration-s 20 --out passes/short\n"
        "  qkdsat simulate --profile jinan-1 --tle sat.tle --start 2026-12-05T00:00Z"
        " --out passes/p1",
    ),
    "timetags": (
        "host.formats.timetags",
        "convert time-tagger files (PTU, quTAG, CSV, qdet)",
        "qkdsat timetags run.ptu --out ground/detections.qdet\n"
        "  qkdsat timetags ground/detections.qdet --to csv --out detections.csv",
    ),
    "payload": (
        "host.link.cli",
        "talk to a payload controller over the ground link",
        "qkdsat payload --port /dev/ttyUSB0 --key payload.key status\n"
        "  qkdsat payload status --port /dev/ttyUSB0 --key payload.key --json\n"
        "  qkdsat payload --port /dev/ttyUSB0 --key payload.key download passes/p1",
    ),
    "flash": (
        "host.deploy.flash",
        "deploy the firmware to a board with mpremote",
        "qkdsat flash --port /dev/ttyACM0\n"
        "  qkdsat flash --port /dev/ttyACM0 --key payload.key --reset",
    ),
    "track": (
        "host.track",
        "close the firmware's tracking loop against the optical plant",
        "qkdsat track --out runs/track --duration-s 5\n"
        "  qkdsat track --out runs/track --offset-urad 1000 -500 --dropout 2 0.5",
    ),
    "distil": (
        "host.distil.run",
        "distil a key from a pass directory (Alice and Bob)",
        "qkdsat distil passes/p1 --out keys/p1\n"
        "  qkdsat distil passes/p1 --out keys/p1 --ec cascade --json\n"
        "  qkdsat distil passes/p1 --out keys/a --role alice --listen 0.0.0.0:7000"
        " --auth-pool pool.bin",
    ),
    "codes": (
        "host.distil.codes",
        "build the LDPC codes a pass can pick, once at installation (or --check them)",
        "qkdsat codes build\n"
        "  qkdsat codes build --check\n"
        "  qkdsat codes build --cache /var/cache/qkdsat --jobs 4",
    ),
    "mission": (
        "host.mission.command",
        "the main job: an emulated pass end to end, orbit to key",
        "qkdsat mission --out build/mission\n"
        "  qkdsat mission --target qemu --generation head --out build/mission-head",
    ),
    "timetransfer": (
        "host.timetransfer.command",
        "two-way quantum-secure time transfer from a pass directory",
        "qkdsat distil passes/p1 --out keys/p1 && "
        "qkdsat timetransfer passes/p1 --keys keys/p1 --out tt/p1",
    ),
    "schedule": (
        "host.network.schedule_command",
        "night QKD passes over the stations from a TLE",
        "qkdsat schedule --tle sat.tle --stations Jinan,Beijing,Stellenbosch"
        " --start 2024-03-01T00:00:00Z --days 3 --out schedule.json",
    ),
    "keys": (
        "host.distil.keys_command",
        "confirm a split distillation's pending keys with the peer at the next contact",
        "qkdsat keys confirm --role alice --store ks/Jinan --auth-pool auth.pool"
        " --listen 0.0.0.0:7001\n"
        "  qkdsat keys confirm --role bob --store keys --auth-pool auth.pool"
        " --connect sat:7001",
    ),
    "pool": (
        "host.network.pool_command",
        "the network's key pools: fill from a distilled pass, show levels",
        "qkdsat pool fill --network net --station Jinan --keys keys/p1\n"
        "  qkdsat pool status --network net",
    ),
    "relay": (
        "host.network.relay_command",
        "a common key for two stations through the satellite (trusted relay)",
        "qkdsat relay --network net --from Beijing --to Stellenbosch --bits 4096",
    ),
    "kms": (
        "host.network.kms_command",
        "ETSI GS QKD 014 key delivery at a station (HTTPS, mutual TLS)",
        "qkdsat kms pki --pki pki --sae sae-a,sae-b\n"
        "  qkdsat kms serve --pki pki --sae sae-a,sae-b --pool net/Beijing/Stellenbosch.pool"
        " --db kms.sqlite --audit kms-audit.jsonl --listen 127.0.0.1:8443",
    ),
    "campaign": (
        "host.network.campaign_command",
        "simulate and distil every scheduled pass on Dask, fill the pools, report",
        "qkdsat campaign --tle sat.tle --stations Jinan,Nanshan,Stellenbosch"
        " --start 2024-03-01T00:00:00Z --days 3 --out campaigns/c1\n"
        "  qkdsat campaign ... --scheduler tcp://10.0.0.5:8786",
    ),
    "send": (
        "host.network.send_command",
        "encrypt a file for another station (one-time pad + Wegman-Carter)",
        "qkdsat send --network net --from Beijing --to Stellenbosch image.png --out image.msg",
    ),
    "receive": (
        "host.network.receive_command",
        "check and decrypt a message from another station",
        "qkdsat receive --network net --at Stellenbosch image.msg --out image.png",
    ),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Epilogs keep their line breaks; every option with a default shows it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        shown = default not in (None, False, [], argparse.SUPPRESS) and action.option_strings
        if shown and "%(default)" not in text and "default" not in text:
            text += " (default: %(default)s)"
        return text


def version() -> str:
    try:
        from importlib.metadata import version as dist_version

        return dist_version("qkdsat")
    except Exception:  # a source tree that was never installed
        return "0+unknown"


# commands whose result can be printed as JSON
JSON_COMMANDS = (
    "simulate", "payload", "track", "distil", "mission", "schedule", "timetransfer", "campaign",
    "keys",
)  # fmt: skip


def common_options(json_output: bool, nested: bool = False) -> argparse.ArgumentParser:
    """Options every command takes after its name. `nested`: the copy a command's own
    subcommands take (`payload status --json`), with defaults that do not undo a value
    given before the subcommand."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("output")
    default = argparse.SUPPRESS if nested else False
    group.add_argument(
        "--debug",
        action="store_true",
        default=default,
        help="show the traceback of an error (for bug reports)",
    )
    if json_output:
        group.add_argument(
            "--json",
            action="store_true",
            default=default,
            help="print the result as JSON (for scripts)",
        )
    loudness = group.add_mutually_exclusive_group()
    loudness.add_argument(
        "-q", "--quiet", action="store_true", default=default, help="print errors only"
    )
    loudness.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default,
        help="progress lines even when not on a terminal",
    )
    return common


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """All commands are listed; only the selected one's module is imported."""
    parser = argparse.ArgumentParser(
        prog="qkdsat",
        description="Ground tools of the qkdsat QKD microsatellite payload.",
        epilog=EXIT_CODES + "\n\nRun 'qkdsat COMMAND --help' for a command's options.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"qkdsat {version()}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text, examples) in COMMANDS.items():
        command_parser = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=f"examples:\n  {examples}\n\n{EXIT_CODES}",
            formatter_class=HelpFormatter,
            parents=[common_options(name in JSON_COMMANDS)],
        )
        command_parser.add_argument("--version", action="version", version=f"qkdsat {version()}")
        if name == selected:
            module = importlib.import_module(module_name)
            module.add_arguments(command_parser)
            command_parser.set_defaults(_run=module.run)
    return parser


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _os_error_message(error: OSError) -> str:
    what = error.strerror or str(error)
    if error.filename:
        return f"{error.filename}: {what}"
    return what


def _exit_interrupted(from_command_line: bool) -> int:
    """Ctrl-C's exit. Endpoint threads (daemons) may still be inside a C++ library call
    (scipy.fft, ...): the interpreter's shutdown would end them with a forced unwind, which
    C++ answers with "terminate called without an active exception" and SIGABRT (exit
    134, not 130). When we own the process, leave it at once instead: nothing is left to
    write (the outputs were not touched; the pool's usage record is already durable)."""
    others = [t for t in threading.enumerate() if t is not threading.main_thread()]
    if from_command_line and any(t.is_alive() for t in others):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)
    return EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else argv
    selected = next((arg for arg in argv if not arg.startswith("-")), None)
    try:
        parser = build_parser(selected)  # imports the command's module: seconds for some
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print(f"qkdsat {selected or ''}: interrupted".replace(" :", ":"), file=sys.stderr)
        return EXIT_INTERRUPTED
    debug = getattr(args, "debug", False) or "--debug" in argv
    name = f"qkdsat {args.command}"
    without_huge_page_advice()  # for every command's arrays (host/memory.py: measured)
    try:
        if args.quiet:  # results go nowhere; errors still reach stderr
            with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
                return int(args._run(args) or 0)
        return int(args._run(args) or 0)
    except BadInput as error:
        print(f"{name}: error: {_one_line(error)}", file=sys.stderr)
        code, failure = EXIT_BAD_INPUT, error
    except ProtocolAborted as error:
        print(f"{name}: aborted: {_one_line(error)}", file=sys.stderr)
        code, failure = EXIT_ABORTED, error
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return _exit_interrupted(from_command_line)
    except EnvironmentFailure as error:
        print(f"{name}: failed: {_one_line(error)}", file=sys.stderr)
        code, failure = EXIT_ENVIRONMENT, error
    except OSError as error:
        # a disk that fills up, a device that goes away: not the user's input, not a bug
        kind = errno.errorcode.get(error.errno or 0, type(error).__name__)
        print(f"{name}: failed: {_one_line(_os_error_message(error))} ({kind})", file=sys.stderr)
        code, failure = EXIT_ENVIRONMENT, error
    except Exception as error:
        print(
            f"{name}: internal error: {type(error).__name__}: {_one_line(error)}"
            + ("" if debug else " (run with --debug for the traceback and report it)"),
            file=sys.stderr,
        )
        code, failure = EXIT_ENVIRONMENT, error
    if debug:
        traceback.print_exception(failure)
    return code


if __name__ == "__main__":
    sys.exit(main())
