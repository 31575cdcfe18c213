"""`qkdsat track`: close the real firmware tracking loop against the emulated optical plant
and write the pointing products (docs/tracking.md).

    qkdsat track --out DIR [--target unix|qemu] [--seed N] [--duration-s S]
                 [--offset-urad X Y] [--dropout START_S DURATION_S|inf] [--set NAME=VALUE]

Writes DIR/truth/pointing.qrec (true downlink pointing error per loop step: the pass
simulator's pointing-loss input), DIR/satellite/tracking.qrec (the firmware's telemetry)
and DIR/tracking.json (transitions and figures). A configuration the firmware refuses is
bad input (exit 2) with the firmware's reason.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from host.errors import BadInput


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--target", choices=("unix", "qemu"), default="unix")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument(
        "--offset-urad",
        type=float,
        nargs=2,
        metavar=("X", "Y"),
        default=(3500.0, -3000.0),
        help="where the beacon really is against the prediction (the uncertainty)",
    )
    parser.add_argument(
        "--dropout",
        nargs=2,
        action="append",
        default=[],
        metavar=("START_S", "DURATION_S"),
        help="beacon outage; DURATION_S may be 'inf' (never returns); repeatable",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="tracking parameter (docs/tracking.md), e.g. fine_ki=0.6; repeatable",
    )


def _parse_settings(items: list[str]) -> dict:
    config = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[a-z_0-9]+", name):
            raise BadInput(f"--set {item!r}: expected NAME=VALUE, e.g. fine_ki=0.6")
        try:
            config[name] = json.loads(value)
        except json.JSONDecodeError:
            raise BadInput(f"--set {item!r}: VALUE must be a number") from None
    return config


def run(args) -> int:
    from emulator.optical_plant import PlantParams
    from emulator.tracking_lockstep import LockstepError, run_lockstep

    if not 0.5 <= args.duration_s <= 600:
        raise BadInput(f"--duration-s {args.duration_s}: must be between 0.5 and 600 s")
    dropouts = []
    for start, duration in args.dropout:
        try:
            dropouts.append((float(start), math.inf if duration == "inf" else float(duration)))
        except ValueError:
            raise BadInput(f"--dropout {start} {duration}: expected seconds") from None
    config = _parse_settings(args.set)
    rate = config.get("loop_rate_hz", 2000)
    params = PlantParams(
        seed=args.seed,
        loop_rate_hz=rate,
        initial_error_urad=tuple(args.offset_urad),
        dropouts=tuple(dropouts),
    )
    try:
        result = run_lockstep(params, args.duration_s, target=args.target, config=config)
    except LockstepError as error:
        refused = re.search(r"ConfigError: (.*)", str(error))
        if refused:
            raise BadInput(
                f"tracking configuration refused by the firmware: {refused[1]}"
            ) from None
        raise
    out = Path(args.out)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    (out / "satellite").mkdir(parents=True, exist_ok=True)
    result.write_pointing_log(out / "truth" / "pointing.qrec")
    result.write_telemetry_log(out / "satellite" / "tracking.qrec")
    rms_x, rms_y, fine_steps = result.fine_rms_urad(settle_s=0.5)
    report = {
        "target": args.target,
        "seed": args.seed,
        "loop_rate_hz": rate,
        "duration_s": args.duration_s,
        "acquisition_s": result.first_entry_s("FINE"),
        "fine_rms_urad": {"x": rms_x, "y": rms_y},
        "fine_steps": fine_steps,
        "telemetry_lost": result.telemetry_lost,
        "transitions": [t.describe(result.period_us).strip() for t in result.transitions],
    }
    (out / "tracking.json").write_text(json.dumps(report, indent=1) + "\n")
    for line in report["transitions"]:
        print(line)
    acq = report["acquisition_s"]
    print(
        f"acquisition {acq:.3f} s" if acq is not None else "no acquisition",
        f"| fine RMS x {rms_x:.3f} urad, y {rms_y:.3f} urad" if fine_steps else "",
    )
    print(f"wrote {out / 'truth' / 'pointing.qrec'}, {out / 'satellite' / 'tracking.qrec'}")
    return 0
