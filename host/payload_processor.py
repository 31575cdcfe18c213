"""The payload processor: the Linux-class computer in the payload that runs Alice's endpoint
of host/distil (the same code as the ground's, `run_split`, no fork) during the pass, with
its own on-board key store and authentication pool per ground station
(docs/payload-processor.md).

    python -m host.payload_processor PASS_DIR --station Xinglong --keystore KS \\
        --connect 127.0.0.1:PORT [any `qkdsat distil` option: --ec, --analysis, ...]

It connects to the satellite terminal of the optical link (emulator/optical_link.py in
emulation), runs Alice, and leaves in KS/STATION/passes/PASS_ID/:
  alice.key       the key, 0600, written atomically, only when every check passed
  report.json     Alice's report (an abort's reason, never key material)
  processor.json  the processor's budget for the pass: CPU seconds, peak memory, wall time
The pool is KS/STATION/auth.pool (its consumption in auth.pool.used, as for `qkdsat distil`).
Every raw data Alice used is recorded in KS/raw-data-used/ (named by the symbols'
fingerprint, for every station: host/distil/raw_data_record.py); raw data found there is
refused, whatever directory and pass.json it is read with.

The processor is held to one core: the process is pinned to one CPU and every numerical
library is limited to one thread before it is imported.
"""

from __future__ import annotations

import os

for _name in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_name] = "1"  # before numpy/numba load: one core is the budget

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from host.errors import BadInput, ProtocolAborted  # noqa: E402

KEYSTORE_DIR_MODE = 0o700
POOL_NAME = "auth.pool"
LEDGER_NAME = "raw-data-used"  # in the key store: Alice's passes used, all stations


def pass_id(pass_json: dict) -> str:
    """The pass's name in the key store: its UTC start, compact (20161219T160212Z)."""
    start = str(pass_json.get("utc_start", "unknown"))
    return "".join(c for c in start.split(".")[0] if c.isalnum()) + "Z"


def station_dir(keystore: Path, station: str) -> Path:
    if not station or "/" in station or station.startswith("."):
        raise BadInput(f"--station {station!r}: a ground-station name")
    return Path(keystore) / station


def _private_dirs(*paths: Path) -> None:
    for path in paths:
        path.mkdir(mode=KEYSTORE_DIR_MODE, parents=True, exist_ok=True)
        os.chmod(path, KEYSTORE_DIR_MODE)


def pin_to_one_core() -> int | None:
    """Pin this process to one CPU (the last one allowed); None where not supported."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpu = max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return cpu


def peak_rss_mb() -> float:
    """This process's own peak resident memory: VmHWM of /proc/self/status, the high-water
    mark of its address space since its execve. Not ru_maxrss: Linux keeps that across
    execve, so a processor started by a large parent reported the parent's size (the
    micius-2017 mission: 711 MB reported, the processor itself sampled at <= 311 MB).
    ru_maxrss only where /proc is missing."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024.0, 1)  # kB
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def budget(wall_s: float, cpu: int | None) -> dict:
    """CPU seconds (resource.getrusage) and peak memory (peak_rss_mb) of this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
        "cpu_user_s": round(usage.ru_utime, 3),
        "cpu_system_s": round(usage.ru_stime, 3),
        "peak_rss_mb": peak_rss_mb(),
        "wall_s": round(wall_s, 3),
        "cores": 1,
        "pinned_cpu": cpu,
    }


def _pattern_memory(args):
    """The head's pattern memory (host/link/pattern_memory.py), or None: satellite/."""
    if args.pattern_memory is None:
        if args.slot_count is not None:
            raise BadInput("--slot-count goes with --pattern-memory")
        return None
    if args.slot_count is None or args.slot_count <= 0:
        raise BadInput("--pattern-memory needs --slot-count N > 0 (the slots the head emitted)")
    from host.distil.channel import parse_address
    from host.link.pattern_memory import PatternMemoryClient

    try:
        return PatternMemoryClient(parse_address(args.pattern_memory), args.slot_count)
    except OSError as error:
        raise BadInput(f"--pattern-memory {args.pattern_memory}: {error}") from error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m host.payload_processor",
        description="Alice on the payload processor, over the optical link.",
    )
    parser.add_argument("pass_dir", help="the pass directory the payload recorded")
    parser.add_argument("--station", required=True, help="ground station of the pass")
    parser.add_argument("--keystore", required=True, help="the on-board key store")
    parser.add_argument("--connect", required=True, help="HOST:PORT of the link terminal")
    parser.add_argument(
        "--pattern-memory",
        metavar="HOST:PORT",
        help="read Alice's symbols from the optical head's pattern memory on this port (on "
        "board) instead of satellite/",
    )
    parser.add_argument(
        "--slot-count", type=int, help="with --pattern-memory: the slots the head emitted"
    )
    return parser


def run(argv: list[str]) -> int:
    args, distil_options = build_parser().parse_known_args(argv)
    cpu = pin_to_one_core()
    t0 = time.perf_counter()
    from host.distil import run as distil_run
    from host.formats.passdir import read_pass_json

    pass_json = read_pass_json(Path(args.pass_dir) / "pass.json")
    station = station_dir(Path(args.keystore), args.station)
    out = station / "passes" / pass_id(pass_json)
    pool = station / POOL_NAME
    if not pool.is_file():
        raise BadInput(f"{pool}: no authentication key pool for station {args.station!r}")
    _private_dirs(Path(args.keystore), station, station / "passes", out)
    parser = argparse.ArgumentParser(prog="qkdsat distil")
    distil_run.add_arguments(parser)
    distil_args = parser.parse_args(
        [str(args.pass_dir), "--out", str(out), "--role", "alice"]
        + ["--connect", args.connect, "--auth-pool", str(pool)]
        + distil_options
        # the station's store, whatever the options say: its pending keys are settled with
        # this ground station before the pass makes a new one (host/distil/run.py)
        + ["--key-store", str(station)]
        + ["--raw-data-ledger", str(Path(args.keystore) / LEDGER_NAME)]
    )
    cfg = distil_run.config_from_args(distil_args)
    stream = distil_run.stream_from_args(distil_args)  # --stream: during the pass
    memory = _pattern_memory(args)
    try:
        report = distil_run.run_split(distil_args, cfg, alice_patterns=memory, stream=stream)
    finally:
        figures = budget(time.perf_counter() - t0, cpu)
        if memory is not None:
            figures["pattern_memory_reads"] = memory.requests
            memory.close()
        tmp = out / f".processor.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(figures, indent=1) + "\n")
        os.replace(tmp, out / "processor.json")
    if report["aborted"]:
        print(f"payload processor: aborted: {report['abort_reason']}", file=sys.stderr)
        return 3
    print(f"payload processor: key_bits={report['key_bits']} cpu_s={figures['cpu_s']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except BadInput as error:
        print(f"payload processor: {error}", file=sys.stderr)
        return 2
    except ProtocolAborted as error:
        print(f"payload processor: aborted: {error}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
