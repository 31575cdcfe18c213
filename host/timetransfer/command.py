"""`qkdsat timetransfer PASS_DIR --keys KEYS --out DIR`: two-way time transfer from a pass
directory, its time messages sealed with the pass's distilled key (KEYS: the `qkdsat
distil --out` directory; alice.key for the satellite endpoint, bob.key for the ground's).

The satellite endpoint (reading only satellite/) and the ground endpoint (reading only
ground/) run in two threads over the distillation's authenticated channel
(host/timetransfer/endpoints.py); the ground endpoint's report is the result.

Writes DIR/report.json (the figures; `aborted`/`abort_reason` as distil's report),
DIR/offset.csv (the offset series with its uncertainty and the range error per bin) and
DIR/timetransfer.png (offset, range check, TDEV).
Exit 0 with a result, 2 for bad input, 3 when no time transfer can be vouched for (too
few events, no overlap of the two directions, timing QBER too high, range check failed,
a time message that fails authentication, not enough key).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np

from host.console import to_json
from host.distil import channel as ch
from host.errors import BadInput, ProtocolAborted
from host.outdir import check_output_dir
from host.timetransfer import endpoints, estimate, files

TDEV_TAUS_S = (0.1, 1.0, 10.0)
ENDPOINT_TIMEOUT_S = 600.0


def add_arguments(parser) -> None:
    parser.add_argument("pass_dir", metavar="PASS_DIR", help="pass directory with two-way data")
    parser.add_argument(
        "--keys",
        required=True,
        metavar="KEYS",
        help="`qkdsat distil --out` directory of the pass: alice.key (satellite) and bob.key "
        "(ground) seal the time messages; their use is recorded in KEY.used",
    )
    parser.add_argument(
        "--satellite-keys",
        metavar="DIR",
        help="the satellite's distillation output when it is not KEYS (split mode: the "
        "payload processor's key store pass directory, holding alice.key)",
    )
    parser.add_argument(
        "--role",
        choices=("satellite", "ground"),
        help="split mode: run one endpoint (satellite: on the payload processor, reading "
        "satellite/ and alice.key; ground: at the station, ground/ and bob.key, writes the "
        "time-transfer outputs) over TCP with --listen or --connect",
    )
    parser.add_argument("--listen", metavar="HOST:PORT", help="split mode: listen here")
    parser.add_argument("--connect", metavar="HOST:PORT", help="split mode: connect here")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument(
        "--during-pass",
        action="store_true",
        help="stream the time data block by block as the pass goes by (offsets of each bin "
        "known ~one block later), over the emulated optical link at the pass's pace "
        "(docs/time-transfer.md, 'During the pass')",
    )
    parser.add_argument(
        "--block-s", type=float, default=1.0, help="--during-pass: pass seconds per block"
    )
    parser.add_argument(
        "--speedup",
        type=float,
        help="--during-pass: replay at this many pass seconds per wall second, in process "
        "(no optical link, which runs on the wall clock); with --role, the pace of the "
        "split endpoints over TCP (default 1; give both the same)",
    )


def stability(t_s: np.ndarray, offset_ps: np.ndarray, bin_s: float) -> dict:
    """TDEV and ADEV (allantools) of an offset series on a regular grid; gaps of missing
    bins are filled by linear interpolation (their count is reported)."""
    import allantools

    index = np.rint((t_s - t_s[0]) / bin_s).astype(np.int64)
    grid = np.arange(index[-1] + 1)
    phase_s = np.interp(grid, index, offset_ps) * 1e-12
    rate_hz = 1.0 / bin_s
    taus = [tau for tau in TDEV_TAUS_S if tau >= bin_s and tau * rate_hz * 3 <= grid.size]
    result = {"gaps_filled": int(grid.size - index.size), "tdev_ps": {}, "adev": {}}
    if not taus:
        return result
    t_tau, tdev, _, _ = allantools.tdev(phase_s, rate=rate_hz, data_type="phase", taus=taus)
    a_tau, adev, _, _ = allantools.adev(phase_s, rate=rate_hz, data_type="phase", taus=taus)
    result["tdev_ps"] = {f"{tau:g}": float(v) * 1e12 for tau, v in zip(t_tau, tdev, strict=True)}
    result["adev"] = {f"{tau:g}": float(v) for tau, v in zip(a_tau, adev, strict=True)}
    return result


def offset_error_ps(report: dict, series: dict, truth: dict) -> np.ndarray:
    """Each bin's measured offset less the simulator's true one (truth/: for figures and
    tests, never for the estimate), both relative to the report's offset reference."""
    reference = int(truth["offset_base_ps"]) - report["offset_reference_ps"]
    true_ps = reference + np.interp(series["t_s"], truth["t_s"], truth["offset_residual_ps"])
    return series["offset_ps"] - true_ps


def compare_with_truth(report: dict, series: dict, truth: dict) -> dict:
    """Figures against the simulator's truth: bias, 1 s precision, TDEV of the error."""
    error = offset_error_ps(report, series, truth)
    bin_s = report["bin_s"]
    per_second = np.floor(series["t_s"]).astype(np.int64)
    seconds, inverse, counts = np.unique(per_second, return_inverse=True, return_counts=True)
    mean_error_1s = np.bincount(inverse, error) / counts
    full = counts >= max(1, int(round(0.8 / bin_s)))
    return {
        "offset_bias_ps": float(np.mean(error)),
        "precision_1s_ps": float(np.std(mean_error_1s[full])) if full.sum() > 1 else None,
        "error_std_per_bin_ps": float(np.std(error)),
        "tdev_error_ps": stability(series["t_s"], error, bin_s)["tdev_ps"],
        "one_way_delay_ps_injected": float(truth["one_way_delay_ps"]),
        "delay_ramp_ps_injected": float(truth["delay_ramp_ps"])
        if "delay_ramp_ps" in truth
        else 0.0,
        "intercept_resend_injected": float(truth["intercept_resend"]),
    }


OFFSET_NAME = "offset.csv"
REJECTED_NAME = "offset.rejected.csv"  # an aborted run's series: diagnosis, not time


def write_outputs(out_dir: Path, report: dict, series: dict | None) -> None:
    """report.json, and the series as offset.csv, or as offset.rejected.csv when the run
    aborted: a range check that flags a delay attack (or a QBER one) still has the
    attacked offsets, which must not sit where a user takes the time from; an offset.csv
    of an earlier run in the same directory is removed for the same reason."""
    out_dir.mkdir(parents=True, exist_ok=True)
    aborted = bool(report.get("aborted"))
    (out_dir / (OFFSET_NAME if aborted else REJECTED_NAME)).unlink(missing_ok=True)
    if series is not None:
        rows = ["t_s,offset_ps,offset_sigma_ps,range_error_mm,events_up,events_down"]
        known = series.get("known_at_s")
        if known is not None:  # streamed: the pass time the ground knew the offset at
            rows[0] += ",known_at_s"
        for i, (t, x, s, e, nu, nd) in enumerate(zip(
            series["t_s"], series["offset_ps"], series["offset_sigma_ps"],
            series["range_error_ps"], series["events_up"], series["events_down"], strict=True,
        )):  # fmt: skip
            row = f"{t:.3f},{x:.3f},{s:.3f},{e * estimate.MM_PER_PS:.4f},{nu},{nd}"
            rows.append(row + (f",{known[i]:.3f}" if known is not None else ""))
        name = REJECTED_NAME if aborted else OFFSET_NAME
        temporary = out_dir / f"{name}.tmp"
        temporary.write_text("\n".join(rows) + "\n")
        os.replace(temporary, out_dir / name)
    temporary = out_dir / "report.json.tmp"
    temporary.write_text(json.dumps(report, indent=1, default=_json_default) + "\n")
    os.replace(temporary, out_dir / "report.json")


def write_plot(out_dir: Path, report: dict, series: dict) -> None:
    """DIR/timetransfer.png: the offset (minus its quadratic trend, so picoseconds show
    beside the clock's drift), the range error against the orbit with the check's
    threshold, and TDEV over averaging times (Agg backend: no display needed)."""
    import allantools
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, offset = series["t_s"], series["offset_ps"]
    trend = np.polyval(np.polyfit(t - t[0], offset, 2), t - t[0])
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    ax = axes[0]
    ax.fill_between(
        t, offset - trend - series["offset_sigma_ps"], offset - trend + series["offset_sigma_ps"],
        color="tab:blue", alpha=0.25, lw=0,
    )  # fmt: skip
    ax.plot(t, offset - trend, color="tab:blue", lw=0.6)
    ax.set_xlabel("ground time in pass (s)")
    ax.set_ylabel("offset - quadratic trend (ps)")
    ax.set_title(f"satellite - ground clock, {report['bin_s']:g} s bins, 1 sigma band")
    ax = axes[1]
    mm = series["range_error_ps"] * estimate.MM_PER_PS
    limit_mm = report["range_check"]["threshold_ps"] * estimate.MM_PER_PS
    ax.plot(t, mm, color="tab:green", lw=0.6)
    ax.axhspan(-limit_mm, limit_mm, color="tab:green", alpha=0.1)
    ax.axhline(report["range_check"]["mean_one_way_error_mm"], color="k", lw=1)
    ax.set_xlabel("ground time in pass (s)")
    ax.set_ylabel("two-way range - orbit range, one way (mm)")
    ax.set_title("range check (band: flag threshold)")
    ax = axes[2]
    index = np.rint((t - t[0]) / report["bin_s"]).astype(np.int64)
    phase = np.interp(np.arange(index[-1] + 1), index, offset) * 1e-12
    taus, tdev, _, _ = allantools.tdev(
        phase, rate=1.0 / report["bin_s"], data_type="phase", taus="octave"
    )
    ax.loglog(taus, tdev * 1e12, "o-", color="tab:red")
    ax.set_xlabel("averaging time (s)")
    ax.set_ylabel("TDEV (ps)")
    ax.set_title("time deviation of the measured offset")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out_dir / "timetransfer.png", dpi=90)
    plt.close(fig)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(type(value).__name__)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def run_endpoints(
    scenario: dict, pass_dir: Path, keys_dir: Path, tamper=None, satellite_keys_dir=None,
    satellite=None,
) -> dict:  # fmt: skip
    """The satellite endpoint in a thread, the ground endpoint in another, over an
    in-process channel; returns the ground's report with the satellite's outcome, or
    raises ProtocolAborted carrying that report. `tamper`: a test hook on the satellite's
    outgoing bytes (channel.QueueTransport.tamper). `satellite`: the satellite's records
    when they are not satellite/tt_*.npz (a mission: {"uplink_rx": tags the firmware
    downloaded, "downlink_source": its slot clock and the head's pattern memory})."""
    if satellite is None:
        satellite_events = files.read_events(pass_dir, files.SATELLITE_FILES)
        downlink_source = None
    else:
        satellite_events = {"uplink_rx": satellite["uplink_rx"]}
        downlink_source = satellite["downlink_source"]
    ground_events = files.read_ground_records(pass_dir, scenario)
    ground_slots = files.read_downlink_slots(pass_dir)
    satellite_pool, satellite_key = endpoints.open_time_key(
        satellite_keys_dir or keys_dir, "satellite"
    )
    try:
        ground_pool, ground_key = endpoints.open_time_key(keys_dir, "ground")
    except BaseException:
        satellite_pool.close()
        raise
    if satellite_key["source"] != ground_key["source"]:
        satellite_pool.close()
        ground_pool.close()
        raise BadInput(
            f"--keys {keys_dir} and --satellite-keys {satellite_keys_dir}: the two keys come "
            "from different passes"
        )
    satellite = endpoints.SatelliteEndpoint(scenario, satellite_events, satellite_pool,
                                            satellite_key, downlink_source)  # fmt: skip
    ground = endpoints.GroundEndpoint(
        scenario, ground_events, ground_pool, ground_key, downlink_slots=ground_slots
    )
    to_ground, to_satellite = ch.queue_pair(timeout_s=ENDPOINT_TIMEOUT_S)
    to_ground.tamper = tamper
    results = endpoints.run_pair(
        satellite, ground, to_ground, to_satellite, (satellite_pool, ground_pool)
    )
    report = ground.report
    if satellite.sealed is not None:
        report["satellite"] = results.get("satellite", {"key": satellite.sealed.accounting()})
    endpoints.raise_stop_reason(results, report)
    return report


def time_transfer(
    pass_dir: Path, out_dir: Path, keys_dir: Path, tamper=None, satellite_keys_dir=None,
    satellite=None,
) -> dict:  # fmt: skip
    """Run both endpoints and write the outputs; returns the report (raises
    ProtocolAborted after writing the report when the protocol stops by design).
    `satellite`: as run_endpoints."""
    check_output_dir(out_dir, files=("report.json", "offset.csv"))
    started = time.process_time()
    pass_dir = Path(pass_dir)
    scenario = files.read_scenario(pass_dir)
    try:
        report = run_endpoints(
            scenario, pass_dir, Path(keys_dir), tamper, satellite_keys_dir, satellite
        )
    except ProtocolAborted as error:
        return finish(out_dir, pass_dir, scenario, started, error=error)
    return finish(out_dir, pass_dir, scenario, started, report=report)


def time_transfer_split(
    pass_dir: Path, out_dir: Path, keys_dir: Path, role: str, listen=None, connect=None,
    block_s: float | None = None, speedup: float | None = None,
) -> dict:  # fmt: skip
    """One endpoint over TCP (split mode), post-pass, or streamed during the pass with
    `block_s` (host/timetransfer/stream.py, at `speedup` pass seconds per wall second, 1
    by default: the pass's pace; each side's pass clock starts when the connection is
    made). The ground writes the time-transfer outputs; the satellite writes its own
    report.json: the offset the ground measured (sealed to it), its key accounting, or
    why it stopped."""
    if bool(listen) == bool(connect):
        raise BadInput("split mode (--role) needs exactly one of --listen or --connect")
    during_pass = block_s is not None
    if during_pass:
        from host.distil.stream import PassClock
        from host.timetransfer import stream

        stream.check_block_s(block_s)
        speedup = check_speedup(speedup) or 1.0
    check_output_dir(out_dir, files=("report.json", "offset.csv"))
    started = time.process_time()
    pass_dir = Path(pass_dir)
    scenario = files.read_scenario(pass_dir)
    if role == "satellite":
        events = files.read_events(pass_dir, files.SATELLITE_FILES)
    else:
        events = files.read_ground_records(pass_dir, scenario)
    pool, key = endpoints.open_time_key(keys_dir, role)
    try:
        transport = ch.open_split(listen, connect)
        if during_pass:
            clock = PassClock(speedup)
            if role == "satellite":
                endpoint = stream.StreamSatellite(scenario, events, pool, key, clock, block_s)
            else:
                endpoint = stream.StreamGround(
                    scenario, events, pool, key, clock, block_s,
                    downlink_slots=files.read_downlink_slots(pass_dir),
                )  # fmt: skip
        elif role == "satellite":
            endpoint = endpoints.SatelliteEndpoint(scenario, events, pool, key)
        else:
            endpoint = endpoints.GroundEndpoint(scenario, events, pool, key)
        try:
            result = endpoint.run(transport)
        except ProtocolAborted as error:
            if role == "ground":
                return finish(out_dir, pass_dir, scenario, started, error=error)
            result, failure = {"aborted": True, "abort_reason": str(error)}, error
        else:
            if role == "ground":
                return finish(out_dir, pass_dir, scenario, started, report=result)
            result, failure = {"aborted": False, "abort_reason": None, **result}, None
        finally:
            transport.close()
    finally:
        pool.close()
    if endpoint.sealed is not None:
        result.setdefault("key", endpoint.sealed.accounting())
    result.update(role="satellite", cpu_seconds=time.process_time() - started)
    write_outputs(Path(out_dir), _finite(result), None)
    if failure is not None:
        raise failure
    return result


def finish(out_dir, pass_dir, scenario, started, report=None, error=None) -> dict:
    """The ground's outputs from its report (or from an abort's): stability, truth,
    report.json, offset.csv and the plot; re-raises the abort after writing."""
    if error is not None:
        report = getattr(error, "report", None) or {"aborted": True, "abort_reason": str(error)}
    truth = files.read_truth(pass_dir)
    series = report.pop("series", None)
    if series is not None:
        report["stability"] = stability(series["t_s"], series["offset_ps"], report["bin_s"])
        if truth is not None:
            report["truth"] = compare_with_truth(report, series, truth)
    report["pass_duration_s"] = float(scenario.get("duration_s", math.nan))
    report["cpu_seconds"] = time.process_time() - started
    report["cpu_fraction_of_pass"] = report["cpu_seconds"] / report["pass_duration_s"]
    report["profile"] = scenario.get("profile")
    if "key" in report:
        report["time_data_security"] = endpoints.describe_security(report["key"])
    report = _finite(report)
    write_outputs(Path(out_dir), report, series)
    if series is not None:
        write_plot(Path(out_dir), report, series)
    if error is not None:
        raise error
    return report


def time_transfer_during_pass(
    pass_dir: Path, out_dir: Path, keys_dir: Path, block_s: float, speedup: float | None
) -> dict:
    """The streaming endpoints (host/timetransfer/stream.py) over the pass's emulated
    optical link (speedup None) or in process; the outputs as post-pass, with the pass
    time each bin's offset was known (offset.csv `known_at_s`, report `streaming`)."""
    from host.timetransfer import stream

    check_output_dir(out_dir, files=("report.json", "offset.csv"))
    started = time.process_time()
    pass_dir = Path(pass_dir)
    scenario = files.read_scenario(pass_dir)
    check_speedup(speedup)
    link, transports = None, None
    if speedup is None:
        link, satellite, ground = stream.optical_link_transports(pass_dir, scenario)
        transports = (satellite, ground)
    try:
        report, satellite_result = stream.run_streaming(
            pass_dir, Path(keys_dir), block_s, speedup or 1.0, transports
        )
    except ProtocolAborted as error:
        return finish(out_dir, pass_dir, scenario, started, error=error)
    finally:
        if link is not None:
            link_report = link.wait(30.0)
    if link is not None:
        report["optical_link"] = {
            "bytes": link_report["bytes"],
            "frames_retransmitted": {
                d: link_report["directions"][d]["frames_retransmitted"] for d in ("down", "up")
            },
            "lost_for_good": link_report["lost_for_good"],
        }
    report["satellite"] = satellite_result
    return finish(out_dir, pass_dir, scenario, started, report=report)


def check_speedup(speedup: float | None) -> float | None:
    if speedup is not None and not (math.isfinite(speedup) and 0 < speedup <= 1000):
        raise BadInput(f"--speedup {speedup}: must be in (0, 1000]")
    return speedup


def run(args) -> int:
    if args.role:
        if args.satellite_keys:
            raise BadInput("--role runs one endpoint with its key in --keys: no --satellite-keys")
        if not args.during_pass and args.speedup is not None:
            raise BadInput("--speedup needs --during-pass")
        report = time_transfer_split(
            Path(args.pass_dir), Path(args.out), Path(args.keys), args.role, args.listen,
            args.connect, args.block_s if args.during_pass else None, args.speedup,
        )  # fmt: skip
    elif args.during_pass:
        if args.satellite_keys:
            raise BadInput("--during-pass runs both endpoints from --keys: no --satellite-keys")
        if args.listen or args.connect:
            raise BadInput("--listen and --connect need --role satellite or --role ground")
        report = time_transfer_during_pass(
            Path(args.pass_dir), Path(args.out), Path(args.keys), args.block_s, args.speedup
        )
    else:
        if args.listen or args.connect:
            raise BadInput("--listen and --connect need --role satellite or --role ground")
        satellite_keys = Path(args.satellite_keys) if args.satellite_keys else None
        report = time_transfer(
            Path(args.pass_dir), Path(args.out), Path(args.keys), satellite_keys_dir=satellite_keys
        )
    if getattr(args, "json", False):
        print(to_json(report))
        return 0
    if report.get("role") == "satellite":
        print(
            f"time transfer (satellite): offset {report['offset_reference_ps']} + "
            f"{report['offset_at_middle_ps']:.1f} ps at {report['middle_s']:.1f} s, rate "
            f"{report['rate']:.3e}; key {report['key']['pad_bits']} pad + "
            f"{report['key']['auth_bits']} tag bits"
        )
        return 0
    stab = report.get("stability", {}).get("tdev_ps", {})
    print(
        f"time transfer: {report['bins']} bins, time-data rate "
        f"{report['time_data_rate_hz']:.0f} Hz, QBER up {report['qber']['uplink']:.4f} "
        f"down {report['qber']['downlink']:.4f}, TDEV "
        + ", ".join(f"{k} s: {v:.2f} ps" for k, v in stab.items())
    )
    return 0
