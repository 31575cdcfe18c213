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

from host.console import print_result, progress_for
from host.errors import BadInput, EnvironmentFailure, ProtocolAborted
from host.outdir import check_output_dir

MAX_OFFSET_URAD = 100_000.0  # 0.1 rad: far beyond any prediction the scan could search
MAX_SEED = 2**63 - 1
# The firmware's rates (firmware/payload/tracking.py checks them too): the plant is built at
# this rate before the firmware sees the configuration, so it is checked here first.
LOOP_RATES_HZ = (500, 1000, 2000, 4000)
PROGRESS_INTERVAL_S = 5.0  # a 600 s loop runs ~15 min here: a line every few seconds


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument(
        "--target", choices=("unix", "qemu"), default="unix", help="where the firmware runs"
    )
    parser.add_argument(
        "--seed", type=int, default=1, help="seed of the plant's noise and vibration (>= 0)"
    )
    parser.add_argument(
        "--duration-s", type=float, default=10.0, help="seconds of loop time, 0.5..600"
    )
    parser.add_argument(
        "--offset-urad",
        type=float,
        nargs=2,
        metavar=("X", "Y"),
        default=(3500.0, -3000.0),
        help="where the beacon really is against the prediction (the uncertainty), "
        f"each within +-{MAX_OFFSET_URAD:.0f} urad",
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


def check_arguments(args) -> list[tuple[float, float]]:
    """Every number finite and in range, with its unit in the message; the dropouts."""
    duration = args.duration_s
    if not (math.isfinite(duration) and 0.5 <= duration <= 600):
        raise BadInput(f"--duration-s {duration}: must be between 0.5 and 600 s")
    if not 0 <= args.seed <= MAX_SEED:
        raise BadInput(f"--seed {args.seed}: must be an integer >= 0")
    for axis, value in zip("XY", args.offset_urad, strict=True):
        if not (math.isfinite(value) and abs(value) <= MAX_OFFSET_URAD):
            raise BadInput(
                f"--offset-urad {axis} {value}: must be a finite number of urad within "
                f"+-{MAX_OFFSET_URAD:.0f} urad"
            )
    dropouts = []
    for start_text, duration_text in args.dropout:
        try:
            start = float(start_text)
            length = math.inf if duration_text == "inf" else float(duration_text)
        except ValueError:
            raise BadInput(f"--dropout {start_text} {duration_text}: expected seconds") from None
        if not (math.isfinite(start) and 0 <= start <= duration):
            raise BadInput(
                f"--dropout START_S {start_text}: must be between 0 and --duration-s "
                f"({duration:g} s)"
            )
        if math.isnan(length) or length <= 0 or (length == math.inf and duration_text != "inf"):
            raise BadInput(
                f"--dropout DURATION_S {duration_text}: must be a positive number of seconds "
                "or 'inf'"
            )
        dropouts.append((start, length))
    return dropouts


def _parse_settings(items: list[str]) -> dict:
    config = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[a-z_0-9]+", name):
            raise BadInput(f"--set {item!r}: expected NAME=VALUE, e.g. fine_ki=0.6")
        try:
            number = json.loads(value)
        except json.JSONDecodeError:
            number = None
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise BadInput(f"--set {item!r}: VALUE must be a number")
        if not math.isfinite(number):
            raise BadInput(f"--set {item!r}: VALUE must be finite")
        config[name] = number
    return config


def run(args) -> int:
    from emulator.optical_plant import PlantParams
    from emulator.tracking_lockstep import LockstepError, run_lockstep

    dropouts = check_arguments(args)
    check_output_dir(Path(args.out))
    config = _parse_settings(args.set)
    rate = config.get("loop_rate_hz", 2000)
    if rate not in LOOP_RATES_HZ:
        raise BadInput(
            f"--set loop_rate_hz={rate:g}: must be "
            + ", ".join(f"{r}" for r in LOOP_RATES_HZ[:-1])
            + f" or {LOOP_RATES_HZ[-1]} Hz"
        )
    rate = int(rate)
    params = PlantParams(
        seed=args.seed,
        loop_rate_hz=rate,
        initial_error_urad=tuple(args.offset_urad),
        dropouts=tuple(dropouts),
    )
    progress = progress_for(args, "qkdsat track")
    progress(f"firmware starting on {args.target}: {args.duration_s:g} s of loop time")
    try:
        result = run_lockstep(
            params,
            args.duration_s,
            target=args.target,
            config=config,
            progress=progress if progress.enabled else None,
            progress_interval_s=PROGRESS_INTERVAL_S,
        )
    except LockstepError as error:
        refused = re.search(r"ConfigError: (.*)", str(error))
        if refused:
            raise BadInput(
                f"tracking configuration refused by the firmware: {refused[1]}"
            ) from None
        raise
    out = Path(args.out)
    progress(f"loop done; writing the products to {out}")
    try:
        (out / "truth").mkdir(parents=True, exist_ok=True)
        (out / "satellite").mkdir(parents=True, exist_ok=True)
        result.write_pointing_log(out / "truth" / "pointing.qrec")
        result.write_telemetry_log(out / "satellite" / "tracking.qrec")
    except OSError as error:
        raise EnvironmentFailure(
            f"--out {out}: {error.strerror or error} while writing the tracking logs"
        ) from None
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
    acq = report["acquisition_s"]
    human = {
        "transitions": report["transitions"],
        "acquisition_s": "never" if acq is None else f"{acq:.3f}",
    }
    if fine_steps:
        human["fine_rms_urad"] = f"x {rms_x:.3f}, y {rms_y:.3f}"
    human["wrote"] = f"{out / 'truth' / 'pointing.qrec'}, {out / 'satellite' / 'tracking.qrec'}"
    if not getattr(args, "json", False) and not getattr(args, "quiet", False):
        for line in report["transitions"]:
            print(line)
        del human["transitions"]
    print_result(args, report, human)
    if acq is None:
        raise ProtocolAborted(
            f"the loop never reached FINE in {args.duration_s:g} s (see {out / 'tracking.json'})"
        )
    return 0
