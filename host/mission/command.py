"""`qkdsat mission [--target unix|qemu] [--profile P] [--seed N] [--segment-s S]
[--distil link|local] [--generation head|controller [--budget-s S]] --out DIR`: the main
job, an emulated pass end to end (orbit -> firmware -> download -> ground -> distil over
the optical link, Alice on the payload processor -> report; docs/mission.md).

Exit 0 when every stage worked and a key was made; 3 when every stage worked but the
distillation made no key (an abort, say for too few events: the reason is in mission.json
and report.json, like `qkdsat distil`); 1 when a stage failed (firmware, link, download);
2 on bad input."""

from __future__ import annotations

import sys
from pathlib import Path

from host.console import progress_for, to_json
from host.errors import EXIT_ABORTED, BadInput, ProtocolAborted


def add_arguments(parser) -> None:
    from host.mission.run import DEFAULT_BUDGET_S

    parser.add_argument(
        "--target",
        choices=("unix", "qemu"),
        default="unix",
        help="where the firmware runs: MicroPython unix port or bare metal in QEMU",
    )
    parser.add_argument(
        "--profile", default="micius-2017", help="micius-2017, jinan-1 or a profile's path"
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of every random draw")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=DEFAULT_BUDGET_S,
        help="--generation controller: wall seconds for boot + pass mode + download; the"
        f" segment holds as many slots as fit (default {DEFAULT_BUDGET_S:g})",
    )
    parser.add_argument(
        "--generation",
        choices=("controller", "head"),
        default="head",
        help="head (default): the head maps its QRNG at the slot clock and keeps the pattern"
        " in its memory, read on board; emits the whole pass (docs/sequencer.md 'Faster"
        " sources'); controller: the sequencer maps QRNG bytes frame by frame (bus-bound, a"
        " short segment, its pattern downloaded sealed and distilled post-pass on the ground)",
    )
    parser.add_argument(
        "--distil",
        choices=("link", "local"),
        help="link (default with head generation): Alice on the payload processor and Bob"
        " at the ground station, separate processes over the emulated optical link; local:"
        " both endpoints in this process (the reference; the controller segment's mode)",
    )
    parser.add_argument(
        "--post-pass",
        action="store_true",
        help="with the optical link: distil after the pass (starts at loss of signal, must"
        " end before the satellite sets) instead of streaming during it",
    )
    parser.add_argument(
        "--stream-speedup",
        type=float,
        default=1.0,
        help="streaming: pass seconds replayed per wall second (default 1: real time)",
    )
    parser.add_argument(
        "--segment-s",
        type=float,
        help="head generation: emit only this many seconds around culmination (default:"
        " the whole pass)",
    )
    parser.add_argument(
        "--timetransfer",
        action="store_true",
        help="after the distillation, two-way time transfer sealed with the pass's key"
        " (OUT/timetransfer/; docs/time-transfer.md)",
    )
    parser.add_argument(
        "--timetransfer-keys",
        metavar="DIR",
        help="with --timetransfer over the streaming optical link: also stream the time "
        "transfer during the pass on the link's second stream, sealed with this earlier "
        "distillation's key (OUT/timetransfer-during-pass/); on the unix target the pass "
        "then goes by at its pace and the satellite reads the controller's TDC log as it "
        "is written",
    )
    parser.add_argument(
        "--tail",
        choices=("hoeffding", "chernoff"),
        help="concentration bound of the finite-key analysis (default: the profile's"
        " distillation.tail, hoeffding if it names none; jinan-1: chernoff)",
    )
    parser.add_argument("--out", default="build/mission", help="output directory")


def run(args) -> int:
    from host.mission.report import print_summary
    from host.mission.run import StageFailed, run_mission

    if args.seed < 0:
        raise BadInput(f"--seed {args.seed}: must be an integer >= 0")

    try:
        summary = run_mission(
            Path(args.out),
            target=args.target,
            profile_name=args.profile,
            seed=args.seed,
            budget_s=args.budget_s,
            generation=args.generation,
            segment_s=args.segment_s,
            distil=args.distil,
            stream_speedup=None if args.post_pass else args.stream_speedup,
            timetransfer=args.timetransfer,
            timetransfer_keys=Path(args.timetransfer_keys) if args.timetransfer_keys else None,
            tail=args.tail,
            progress=progress_for(args, "qkdsat mission"),
        )
    except StageFailed as error:
        print(f"qkdsat mission: stage failed: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(to_json(summary))
    else:
        print_summary(summary)
        print(f"report: {Path(args.out) / 'mission.json'}, {Path(args.out) / 'mission.png'}")
    if summary["exit_code"] == EXIT_ABORTED:
        distil = summary["stages"]["distil"]
        if distil["aborted"]:
            raise ProtocolAborted(f"no key: {distil['abort_reason']}")
        reason = summary["stages"]["timetransfer"]["abort_reason"]
        raise ProtocolAborted(f"time transfer: {reason}")
    return 0
