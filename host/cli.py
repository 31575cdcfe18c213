"""`qkdsat`: the command line of the ground tools (DESIGN.md, "Command line").

Each subcommand lives in its own module with `add_arguments(parser)` and `run(args)`;
they are imported only when used, so `qkdsat --help` stays fast.

Exit codes: 0 success; 2 bad input (the message names the file and what is wrong);
3 the protocol aborted by design (the reason is in report.json).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from host.errors import BadInput, ProtocolAborted

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "smoke": ("host.smoke", "boot the firmware on an emulated target and check both UARTs"),
    "simulate": ("host.simulate.command", "simulate a pass from physics into a pass directory"),
    "timetags": ("host.formats.timetags", "convert time-tagger files (PTU, quTAG, CSV, qdet)"),
    "payload": ("host.link.cli", "talk to a payload controller over the ground link"),
    "flash": ("host.deploy.flash", "deploy the firmware to a board with mpremote"),
    "track": ("host.track", "close the firmware's tracking loop against the optical plant"),
    "distil": ("host.distil.run", "distil a key from a pass directory (Alice and Bob)"),
    "mission": ("host.mission.command", "the main job: an emulated pass end to end, orbit to key"),
}


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """All commands are listed; only the selected one's module is imported."""
    parser = argparse.ArgumentParser(prog="qkdsat", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == selected:
            module = importlib.import_module(module_name)
            module.add_arguments(command_parser)
            command_parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    selected = next((arg for arg in argv if not arg.startswith("-")), None)
    parser = build_parser(selected)
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except BadInput as error:
        print(f"qkdsat {args.command}: error: {error}", file=sys.stderr)
        return 2
    except ProtocolAborted as error:
        print(f"qkdsat {args.command}: aborted: {error}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"qkdsat {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
