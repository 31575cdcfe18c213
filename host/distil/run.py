"""`qkdsat distil`: run Alice and Bob (local mode: both, in-process channel; split mode:
one role over TCP), write the keys (only when every check passed) and report.json.

The output directory is touched only after every input was read and checked, and after
the protocol ended: a typo, a bad pass directory or Ctrl-C leave it as it was. Then, in
this order (docs/cli.md, "Outputs"):

1. the previous report.json is removed (and the removal made durable), so no report can
   describe keys that are not this run's;
2. on success the keys are written to temporary files (created 0600, fsync) and renamed
   over the previous ones; on an abort the previous keys are removed;
3. report.json is written last (temporary file, fsync, rename, fsync of the directory).

A crash or a full disk between the steps leaves no report.json: the directory is then
marked incomplete by its missing report, never by a report that claims a key. When the
keys cannot be written (disk full) an aborted report is written if the disk allows, and
the command exits 1. Keys are never logged.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

from host.console import print_result, progress_for, to_json
from host.distil import channel as ch
from host.distil import keystore
from host.distil.durable import fsync_directory, write_atomic, write_temporary
from host.distil.protocol import (
    BASES,
    PHASE_ERROR_TOLERANCE,
    VERIFY_KEYS,
    Alice,
    Bob,
    Config,
    pass_json_sha256,
)
from host.errors import BadInput, EnvironmentFailure, ProtocolAborted
from host.formats.passdir import read_pass_json, require_fields
from host.memory import without_huge_page_advice
from host.outdir import check_output_dir as check_outputs

REPORT_NAME = "report.json"
REPORT_FORMAT_VERSION = 2  # 2: format_version, tool, inputs, key_files, created_utc
# Keys made with replayed endpoint randomness are not secret: named so nothing takes them
# for alice.key / bob.key.
INSECURE_KEY_SUFFIX = ".INSECURE-TEST-ONLY"
# How long an interrupted run waits for the endpoints to end: an endpoint inside a long
# computation (a decoder sweep) notices its closed channel only at its next message, and
# Ctrl-C must end the run within a second; nothing is left to write after an interrupt.
STOP_GRACE_S = 0.25
HEARTBEAT_S = 10.0  # progress line interval while the protocol runs


def key_names(insecure_deterministic: bool) -> dict:
    """{role: file stem} of the key files."""
    suffix = INSECURE_KEY_SUFFIX if insecure_deterministic else ""
    return {role: role + suffix for role in ("alice", "bob")}


def key_files_of(roles) -> list[str]:
    """Every key file name (secure or not) the given roles could have left."""
    return [f"{key_names(insecure)[role]}.key" for role in roles for insecure in (False, True)]


def add_arguments(parser) -> None:
    parser.add_argument(
        "pass_dir", nargs="?", help="pass directory (pass.json, satellite/, ground/)"
    )
    parser.add_argument(
        "--out", required=True, help="output directory: alice.key, bob.key, report.json"
    )
    parser.add_argument(
        "--ec", default="ldpc", choices=("ldpc", "cascade"), help="error-correction method"
    )
    parser.add_argument(
        "--analysis",
        default="lim2014",
        choices=("lim2014", "rusca2018"),
        help="finite-key decoy-state analysis",
    )
    parser.add_argument(
        "--tail",
        default="hoeffding",
        choices=("hoeffding", "chernoff"),
        help="concentration bound of the finite-key analysis",
    )
    parser.add_argument("--eps-sec", type=float, default=1e-9, help="secrecy parameter, in (0, 1)")
    parser.add_argument(
        "--eps-cor", type=float, default=1e-15, help="correctness parameter, in (0, 1)"
    )
    parser.add_argument(
        "--qber-threshold",
        type=float,
        default=0.11,
        help="abort above this estimated QBER, in (0, 0.5)",
    )
    parser.add_argument(
        "--phase-error-tolerance",
        type=float,
        default=PHASE_ERROR_TOLERANCE,
        metavar="PHI",
        help="abort (exit 3) when a key block's phase-error upper bound exceeds PHI, the "
        f"phi_tol of Lim 2014 / Rusca 2018, in (0, 0.5] (default {PHASE_ERROR_TOLERANCE})",
    )
    parser.add_argument(
        "--key-bases",
        default="auto",
        choices=("auto", "Z", "ZX"),
        help="bases that carry key (auto: both when the basis choice is symmetric)",
    )
    parser.add_argument(
        "--auth-pool",
        help="pre-shared authentication key pool file (consumption recorded in POOL.used); "
        "local mode without it uses a fresh random pool shared in memory",
    )
    parser.add_argument(
        "--new-auth-pool",
        action="store_true",
        help="the --auth-pool file was never used: create its usage record POOL.used "
        "(without this flag a missing POOL.used is an error, never a silent restart at 0)",
    )
    parser.add_argument("--role", choices=("alice", "bob"), help="split mode: run one endpoint")
    parser.add_argument("--listen", help="split mode (with --role): HOST:PORT to listen on")
    parser.add_argument("--connect", help="split mode (with --role): HOST:PORT to connect to")
    parser.add_argument(
        "--raw-data-ledger",
        metavar="DIR",
        help="Alice: her record of the raw data she has used, named by its bits, so that no "
        "directory, copy or edited pass.json gives a second key from them (this user's, 0700; "
        "the payload processor gives its key store's). Without it only the pass directory "
        "records the use",
    )
    parser.add_argument(
        "--key-store",
        metavar="DIR",
        help="split mode: this side's keys for this peer (earlier runs' --out directories, "
        "searched at any depth; default: --out). Their pending keys are settled with the "
        "peer, as `qkdsat keys confirm` does, before this run makes any key",
    )
    parser.add_argument(
        "--insecure-deterministic-seed",
        type=int,
        metavar="N",
        help="TESTS ONLY, NOT SECURE: replay the endpoints' randomness (hash keys, PA seed, "
        "samples) from N instead of the OS CSPRNG; the report says insecure_deterministic "
        f"and the keys are written as ROLE{INSECURE_KEY_SUFFIX}",
    )
    parser.add_argument(
        "--stream",
        action="store_true",
        help="distil DURING the pass: Bob reads ground/detections.qdet as the tagger appends "
        "it (a complete file is replayed at the pass's pace, see --stream-speedup), sync, "
        "sifting and error correction keep up, PA at loss of signal (docs/streaming.md)",
    )
    parser.add_argument(
        "--stream-speedup",
        type=float,
        default=1.0,
        metavar="X",
        help="with --stream: pass seconds replayed per wall second (1: real time)",
    )
    parser.add_argument(
        "--stream-block-s",
        type=float,
        default=1.0,
        metavar="S",
        help="with --stream: pass seconds of detections per block Bob sends (at most 1)",
    )
    parser.add_argument(
        "--stream-chunk-frames",
        type=int,
        default=2,
        metavar="N",
        help="with --stream: LDPC frames per error-correction chunk",
    )
    parser.add_argument(
        "--stream-frame-bits",
        type=int,
        default=None,
        metavar="N",
        help="with --stream: the chunks' LDPC frame length, 65536, 131072 (the default) or "
        "262144 (docs/streaming.md, 'Frame length and top-up')",
    )
    parser.add_argument(
        "--stream-idle-s",
        type=float,
        default=10.0,
        metavar="S",
        help="with --stream on a live tagger's file: the pass ends when the tagger wrote "
        "nothing (no detection, no PPS mark) for S wall seconds and no end-of-pass record "
        "came (docs/streaming.md)",
    )
    parser.add_argument(
        "--stream-link-end-s",
        type=float,
        default=None,
        metavar="S",
        help="with --stream: the optical link's predicted end (the satellite sets), in wall "
        "seconds after the first detection, from the pass geometry; Bob closes the pass "
        "early enough that the keys exist before it (docs/streaming.md, 'The link's end')",
    )


# ------------------------------------------------------------------ checks before any output


def check_qber_threshold(value: float) -> None:
    if not (math.isfinite(value) and 0 < value < 0.5):
        raise BadInput(f"--qber-threshold {value}: must be a number in (0, 0.5)")


def config_from_args(args) -> Config:
    check_qber_threshold(args.qber_threshold)
    cfg = Config(
        ec=args.ec,
        analysis=args.analysis,
        tail=args.tail,
        eps_sec=args.eps_sec,
        eps_cor=args.eps_cor,
        qber_threshold=args.qber_threshold,
        key_bases=args.key_bases,
        phase_error_tolerance=args.phase_error_tolerance,
    )
    cfg.validate()
    return cfg


def stream_from_args(args):
    """StreamOptions for --stream, or None (post-pass)."""
    given = (
        args.stream_speedup != 1.0
        or args.stream_block_s != 1.0
        or args.stream_chunk_frames != 2
        or args.stream_frame_bits is not None
        or args.stream_idle_s != 10.0
        or args.stream_link_end_s is not None
    )
    if not args.stream:
        if given:
            raise BadInput(
                "--stream-speedup/--stream-block-s/--stream-chunk-frames/--stream-frame-bits/"
                "--stream-idle-s/--stream-link-end-s need --stream"
            )
        return None
    from host.distil.stream import STREAM_FRAME_BITS, StreamOptions

    options = StreamOptions(
        args.stream_block_s,
        args.stream_speedup,
        args.stream_chunk_frames,
        # `is None`, not `or`: 0 is a length to refuse (validate), not "not given"
        frame_bits=STREAM_FRAME_BITS if args.stream_frame_bits is None else args.stream_frame_bits,
        idle_s=args.stream_idle_s,
        link_end_s=args.stream_link_end_s,
    )
    options.validate()
    return options


def _endpoints(
    pass_dir, bob_pass_dir, cfg, seed, alice_patterns, stream, roles, raw_data_ledger=None
):
    """{role: endpoint}: post-pass (protocol.Alice/Bob) or streaming (stream.StreamAlice/
    StreamBob). raw_data_ledger: Alice's (host/distil/raw_data_record.py), or None."""
    without_huge_page_advice()
    if stream is None:
        kinds = {"alice": Alice, "bob": Bob}
        extra = {}
    else:
        from host.distil.stream import StreamAlice, StreamBob

        kinds = {"alice": StreamAlice, "bob": StreamBob}
        extra = {"stream": stream}
    out = {}
    if "alice" in roles:
        out["alice"] = kinds["alice"](
            pass_dir,
            cfg,
            insecure_deterministic_seed=seed,
            patterns=alice_patterns,
            raw_data_ledger=raw_data_ledger,
            **extra,
        )
    if "bob" in roles:
        out["bob"] = kinds["bob"](
            bob_pass_dir or pass_dir,
            cfg,
            insecure_deterministic_seed=None if seed is None else seed + 1,
            **extra,
        )
    return out


def _stamp_key_latency(out_dir: Path, report: dict, last_detection_unix_s) -> None:
    """Streaming: the wall time from the last detection's arrival to the keys written (they
    are, when finish() returns), added to report.json (rewritten atomically)."""
    if report["aborted"] or last_detection_unix_s is None:
        report["key_latency_s"] = None
    else:
        report["key_latency_s"] = round(time.time() - float(last_detection_unix_s), 3)
    write_json_atomic(Path(out_dir) / REPORT_NAME, report)


def _stream_fields(report: dict, outcome) -> None:
    """The streaming figures of one endpoint's outcome, and the bytes each way named by
    the optical link's directions (down: satellite to ground)."""
    for name in (
        "timeline", "lag_s_max", "lag_s_median", "stream", "end_of_pass", "after_loss_of_signal_s",
        "stream_cut",
    ):  # fmt: skip
        if name in outcome.report:
            report[name] = outcome.report[name]
    report["classical_bytes"]["down"] = report["classical_bytes"]["alice_to_bob"]
    report["classical_bytes"]["up"] = report["classical_bytes"]["bob_to_alice"]


def check_address(option: str, text: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not sep or not 0 < port < 65536:
        raise BadInput(f"{option} {text!r}: expected HOST:PORT with a port in 1..65535")
    return host or "127.0.0.1", port


def check_output_dir(out_dir: Path) -> None:
    check_outputs(out_dir, "--out", (*key_files_of(("alice", "bob")), REPORT_NAME))


def read_pass(pass_dir: Path, role: str | None) -> dict:
    """pass.json with the fields both endpoints need, and the files of the role(s) run."""
    pass_json = read_pass_json(pass_dir / "pass.json")
    require_fields(pass_dir / "pass.json", pass_json)
    if role in (None, "bob"):
        for name in ("detections.qdet", "pps.qdet"):
            if not (pass_dir / "ground" / name).is_file():
                raise BadInput(f"{pass_dir / 'ground' / name}: missing (Bob's {name})")
    return pass_json


# ------------------------------------------------------------------ writing the outputs


def key_bytes(bits: np.ndarray) -> bytes:
    """Packed bits, MSB first, the last byte zero-padded; the bit length is in report.json
    (key_files) and the padding bits are not key."""
    return np.packbits(bits).tobytes()


def write_key(path: Path, bits: np.ndarray) -> None:
    """Created 0600, fsync'd, renamed into place (host/distil/durable.py)."""
    write_atomic(path, key_bytes(bits), 0o600)


def write_json_atomic(path: Path, data: dict) -> None:
    write_atomic(path, (to_json(data) + "\n").encode(), 0o644)


def finish(out_dir: Path, report: dict, keys: dict, pending: bool = False) -> None:
    """Replace the previous outputs by this run's: report.json removed first, the keys made
    durable, report.json written last (module docstring). pending: one endpoint of a split
    run; each key gets its pending marker (KEY.pending, host/distil/keystore.py) before it
    is renamed into place, and nothing uses it until `qkdsat keys confirm`."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BadInput(f"--out {out_dir}: cannot create ({error.strerror})") from None
    report_path = out_dir / REPORT_NAME
    report_path.unlink(missing_ok=True)
    _remove_key_temporaries(out_dir, keys)
    fsync_directory(out_dir)
    key_files = {}
    if not report["aborted"]:
        temporary = {}
        try:
            for stem, bits in keys.items():
                if bits is not None:
                    path = out_dir / f"{stem}.key"
                    temporary[path] = write_temporary(path, key_bytes(bits), 0o600)
                    key_files[stem.split(".")[0]] = {"file": path.name, "bits": int(bits.size)}
        except OSError as error:
            for tmp in temporary.values():
                tmp.unlink(missing_ok=True)
            report.update(
                aborted=True,
                abort_reason=f"the keys could not be written: {error.strerror}",
                key_bits=0,
            )
            _remove_keys(out_dir, keys)
            try:
                write_json_atomic(report_path, {**report, "key_files": {}})
            except OSError:
                pass  # no report at all: the directory is marked incomplete
            raise EnvironmentFailure(
                f"{out_dir}: the keys could not be written ({error.strerror}); no key kept"
            ) from None
        for path, tmp in temporary.items():
            if pending:
                key_id = "pass-sha256:" + report["inputs"]["pass_json_sha256"]
                keystore.write_pending_marker(path, key_id)
                key_files[path.name.split(".")[0]]["pending"] = True
            else:  # a marker of the key this one replaces is not its
                keystore.pending_marker(path).unlink(missing_ok=True)
            os.replace(tmp, path)
            # the usage record of the key this one replaced (time transfer) is not its
            Path(f"{path}.used").unlink(missing_ok=True)
        fsync_directory(out_dir)
    else:
        _remove_keys(out_dir, keys)
    report["key_files"] = key_files
    try:
        write_json_atomic(report_path, report)
    except OSError as error:
        _remove_keys(out_dir, keys)  # a key without its report cannot be vouched for
        raise EnvironmentFailure(
            f"{report_path}: could not be written ({error.strerror}); no key kept"
        ) from None


def _remove_key_temporaries(out_dir: Path, keys: dict) -> None:
    """Key material a killed run left in its temporary files (durable.temporary_name,
    any pid) for the roles this run stands for: no report vouches for it, and a pid that
    never comes round again would leave it there for good."""
    for name in key_files_of({stem.split(".")[0] for stem in keys}):
        for leftover in out_dir.glob(f".{name}.*.tmp"):
            if leftover.name[len(name) + 2 : -len(".tmp")].isdigit():  # .NAME.PID.tmp
                leftover.unlink(missing_ok=True)


def _remove_keys(out_dir: Path, keys: dict) -> None:
    """The previous keys (secure or not) of the roles this run stands for: they must not
    look like its."""
    for name in key_files_of({stem.split(".")[0] for stem in keys}):
        (out_dir / name).unlink(missing_ok=True)
        (out_dir / f"{name}.used").unlink(missing_ok=True)
        keystore.pending_marker(out_dir / name).unlink(missing_ok=True)
    fsync_directory(out_dir)


# ------------------------------------------------------------------ the report


def _profile(pass_json: dict) -> dict:
    keep = ("intensities", "intensity_probabilities", "basis_probability_z", "slot_rate_hz")
    prof = {k: pass_json[k] for k in keep if k in pass_json}
    prof["name"] = pass_json.get("profile")
    return prof


def epsilon_figures(cfg: Config, chan) -> dict:
    """The security statement: secrecy and correctness as asked for, plus the probability
    that any authenticated message of this session was forged, sum (L_i + 1) / 2^64 over
    both directions' messages at the size limit (channel.py); total is their sum."""
    auth = chan.forgery_bound
    return {
        "sec": cfg.eps_sec,
        "cor": cfg.eps_cor,
        "auth": auth,
        "total": cfg.eps_sec + cfg.eps_cor + auth,
    }


def _tool_version() -> str:
    from host.cli import version

    return version()


def run_metadata(pass_dir: Path, cfg: Config, seed: int | None) -> dict:
    """What a reader needs to tell which run, which inputs and which settings made a
    report: merged into report.json by both modes."""
    return {
        "format_version": REPORT_FORMAT_VERSION,
        "tool": {"name": "qkdsat", "version": _tool_version()},
        "created_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "inputs": {"pass_dir": str(pass_dir), "pass_json_sha256": pass_json_sha256(pass_dir)},
        "qber_threshold": cfg.qber_threshold,
        "phase_error_tolerance": cfg.phase_error_tolerance,
        "ec_method": cfg.ec,
        "deterministic_randomness": seed is not None,  # also insecure_deterministic
    }


def _pa_figures(alice_pa: dict | None, bob_pa: dict | None) -> dict | None:
    """Alice's privacy amplification figures, check_failures counting both endpoints'
    carry-less products that failed their check (each recomputed by the FFT)."""
    if alice_pa is None:
        return None
    bob_failures = (bob_pa or {}).get("check_failures", 0)
    return {**alice_pa, "check_failures": alice_pa.get("check_failures", 0) + bob_failures}


def build_report(pass_json, cfg, alice_out, bob_out, a_chan, b_chan, pool_bits, wall_s) -> dict:
    aborted = alice_out.key is None or bob_out.key is None
    reason = bob_out.report.get("abort_reason") or alice_out.report.get("abort_reason")
    if not aborted and not np.array_equal(alice_out.key, bob_out.key):
        aborted, reason = True, "keys differ after privacy amplification"
    if aborted and not reason:
        reason = "the peer aborted"
    a, b = alice_out.report, bob_out.report
    stages = {}
    for name in set(alice_out.stage_seconds) | set(bob_out.stage_seconds):
        stages[name] = max(
            alice_out.stage_seconds.get(name, 0.0), bob_out.stage_seconds.get(name, 0.0)
        )
    stages["total"] = wall_s
    report = {
        "aborted": aborted,
        "abort_reason": reason if aborted else None,
        "key_bits": 0 if aborted else int(alice_out.key.size),
        "qber": b.get("qber"),
        "counts": a.get("counts"),
        "sifted_bits": a.get("sifted_bits"),
        "ec": b.get("ec"),
        "epsilon": epsilon_figures(cfg, a_chan),
        "analysis": cfg.analysis,
        "tail": cfg.tail,
        "key_bases": a.get("key_bases"),
        "pa": _pa_figures(a.get("pa"), b.get("pa")),
        "blocks": a.get("blocks"),
        "counts_key_blocks": a.get("counts_key_blocks"),
        "sync": b.get("sync"),
        "auth_key_bits_used": pool_bits,
        "classical_bytes": {"alice_to_bob": a_chan.bytes_sent, "bob_to_alice": b_chan.bytes_sent},
        "messages": {"alice_to_bob": a_chan.sent, "bob_to_alice": b_chan.sent},
        "stage_seconds": stages,
        "profile": _profile(pass_json),
    }
    if report["ec"] and report["ec"].get("leak_bits") is not None and report.get("qber"):
        report["ec"]["leak_bits_verification"] = 64 * VERIFY_KEYS * len(report["key_bases"] or [])
    report["bases"] = list(BASES)
    return report


# ------------------------------------------------------------------ running the endpoints


def _wait_for(threads: list[threading.Thread], channels, progress) -> None:
    """Join the endpoint threads from the main thread, which stays free to take Ctrl-C.
    On an interrupt both channels are closed, so each endpoint's next receive ends it, and
    the threads (daemons) get STOP_GRACE_S before the interrupt goes on."""
    next_beat = time.monotonic() + HEARTBEAT_S
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(0.1)
                if progress is not None and time.monotonic() > next_beat:
                    next_beat += HEARTBEAT_S
                    sent = sum(c.bytes_sent for c in channels)
                    messages = sum(c.sent for c in channels)
                    progress(f"running: {messages} messages, {sent / 1e6:.2f} MB exchanged")
    except BaseException:
        for chan in channels:
            chan.close()
        deadline = time.monotonic() + STOP_GRACE_S
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        raise


def _stage_lines(progress):
    def on_stage(name: str) -> None:
        progress(f"stage: {name.replace('_', ' ')}")

    return on_stage


def run_local(
    pass_dir,
    out_dir,
    cfg: Config,
    pool_path=None,
    insecure_deterministic_seed=None,
    tamper=None,
    bob_pool_path=None,
    tamper_bob=None,
    bob_pass_dir=None,
    new_pool=False,
    alice_patterns=None,
    progress=None,
    stream=None,
    raw_data_ledger=None,
) -> dict:
    """Both endpoints in one process (two threads, in-process channel). alice_patterns:
    where Alice reads her symbols when not from satellite/ (the head's pattern memory).
    raw_data_ledger: Alice's record of the passes she used (raw_data_record), or None.
    Every input is read and checked before the pools are opened and the output touched."""
    pass_dir, out_dir = Path(pass_dir), Path(out_dir)
    check_output_dir(out_dir)
    pass_json = read_pass(pass_dir, None if bob_pass_dir is None else "alice")
    if bob_pass_dir is not None:
        read_pass(Path(bob_pass_dir), "bob")
    pools = open_local_pools(pool_path, bob_pool_path, new_pool)
    try:
        return _run_local(
            pass_dir,
            out_dir,
            cfg,
            pools,
            insecure_deterministic_seed,
            (tamper, tamper_bob),
            bob_pass_dir,
            alice_patterns,
            pass_json,
            progress,
            stream,
            raw_data_ledger,
        )
    finally:
        for pool in pools:
            pool.close()


def _run_local(
    pass_dir,
    out_dir,
    cfg: Config,
    pools,
    seed,
    tamper,
    bob_pass_dir,
    alice_patterns,
    pass_json,
    progress,
    stream=None,
    raw_data_ledger=None,
) -> dict:
    pool_a, pool_b = pools
    insecure = seed is not None
    endpoints = _endpoints(
        pass_dir,
        bob_pass_dir,
        cfg,
        seed,
        alice_patterns,
        stream,
        ("alice", "bob"),
        raw_data_ledger,
    )
    alice, bob = endpoints["alice"], endpoints["bob"]
    metadata = run_metadata(pass_dir, cfg, seed)
    if progress is not None:  # Bob's stages stand for both: they run in lockstep
        bob.on_stage = _stage_lines(progress)
    t_a, t_b = ch.queue_pair()
    t_a.tamper, t_b.tamper = tamper  # test hooks on the wire: Alice's sends, Bob's sends
    a_chan = ch.AuthChannel(t_a, pool_a, ch.ALICE)
    b_chan = ch.AuthChannel(t_b, pool_b, ch.BOB)
    result = {}
    t0 = time.perf_counter()
    threads = [
        ch.endpoint_thread("alice", alice, a_chan, result),
        ch.endpoint_thread("bob", bob, b_chan, result),
    ]
    if progress is not None:
        progress(f"Alice and Bob started on {pass_dir}")
    for thread in threads:
        thread.start()
    _wait_for(threads, (a_chan, b_chan), progress)
    names = key_names(insecure)
    for role in ("bob", "alice"):
        if f"{role}_error" in result:
            _fail(out_dir, pass_json, metadata, role, result[f"{role}_error"], names.values())
    wall = time.perf_counter() - t0
    pool_bits = max(pool_a.used_bits, pool_b.used_bits)
    report = build_report(
        pass_json, cfg, result["alice"], result["bob"], a_chan, b_chan, pool_bits, wall
    )
    report.update(metadata)
    if insecure:
        report["insecure_deterministic"] = True
    if stream is not None:
        _stream_fields(report, result["bob"])  # the ground's view; Alice's is the same pass
        report["ldpc_codes_missing"] = {
            **result["alice"].report.get("ldpc_codes_missing", {}),
            **result["bob"].report.get("ldpc_codes_missing", {}),
        }
    finish(out_dir, report, {names["alice"]: result["alice"].key, names["bob"]: result["bob"].key})
    if stream is not None:
        _stamp_key_latency(out_dir, report, result["bob"].report.get("last_detection_unix_s"))
    return report


def open_local_pools(pool_path, bob_pool_path=None, new_pool=False):
    """Local mode's pools: one file shared by both endpoints (one lock, one record), two
    files (Alice's and Bob's copies, both locked and recorded), or, without a file, fresh
    random bytes in memory. Both begin at the later of the two records."""
    if not pool_path:
        pool = ch.KeyPool(os.urandom(1 << 20))
        return pool, pool
    pool_a = ch.KeyPool.from_file(str(pool_path), new=new_pool)
    if not bob_pool_path or os.path.samefile(bob_pool_path, pool_path):
        return pool_a, pool_a
    try:
        pool_b = ch.KeyPool.from_file(str(bob_pool_path), new=new_pool)
    except BaseException:
        pool_a.close()
        raise
    start = max(pool_a.start_byte, pool_b.start_byte)
    pool_a.agree_start(start)
    pool_b.agree_start(start)
    return pool_a, pool_b


def _fail(out_dir: Path, pass_json: dict, metadata: dict, role: str, error, roles) -> None:
    """An endpoint stopped on an error, not by the protocol's design: bad input found late
    (a damaged file) or a bug. The previous outputs are replaced by an aborted report that
    says so; then the error goes on to the command line (exit 2 or 1)."""
    if isinstance(error, Exception):
        if isinstance(error, BadInput):
            reason = f"bad input ({role}): {error}"
        else:
            reason = f"internal error in {role}: {type(error).__name__}: {error}"
        report = {
            "aborted": True,
            "abort_reason": reason,
            "key_bits": 0,
            "profile": _profile(pass_json),
            **metadata,
        }
        try:
            finish(out_dir, report, dict.fromkeys(roles))
        except (OSError, EnvironmentFailure, BadInput):
            pass  # the error below is what the user needs to see
    raise error


def run_split(args, cfg: Config, progress=None, alice_patterns=None, stream=None) -> dict:
    """One endpoint over TCP. The report holds this endpoint's view. alice_patterns: where
    Alice reads her symbols when not from satellite/ (the payload processor: the head's
    pattern memory)."""
    if not args.auth_pool:
        raise BadInput("split mode needs --auth-pool (the pre-shared authentication key)")
    if args.raw_data_ledger and args.role != "alice":
        raise BadInput("--raw-data-ledger is Alice's record: not for --role bob")
    if bool(args.listen) == bool(args.connect):
        raise BadInput("split mode needs exactly one of --listen or --connect")
    address = args.listen or args.connect
    option = "--listen" if args.listen else "--connect"
    check_address(option, address)
    pass_dir, out_dir = Path(args.pass_dir), Path(args.out)
    check_output_dir(out_dir)
    pass_json = read_pass(pass_dir, args.role)
    key_store_of(args, out_dir)  # a bad store (two keys of one pass) before any connection
    pool = ch.KeyPool.from_file(args.auth_pool, new=args.new_auth_pool)
    try:
        return _run_split(
            args, cfg, pass_dir, out_dir, pass_json, pool, progress, alice_patterns, stream
        )
    finally:
        pool.close()


def key_store_of(args, out_dir: Path) -> Path:
    """The store whose pending keys a split run settles first (--key-store, or --out),
    checked: its keys are listed (keystore.held_keys) without a connection."""
    store = Path(args.key_store) if getattr(args, "key_store", None) else Path(out_dir)
    if getattr(args, "key_store", None) and not store.is_dir():
        raise BadInput(f"--key-store {store}: not a directory")
    if store.is_dir():
        keystore.held_keys(store, args.role)
    if Path(out_dir).is_dir():
        # A split run replaces --out's key at its end (or removes it on an abort): one of
        # an earlier split run may be held by the peer too, confirmed now by the settling
        # below or earlier, and replacing it would leave the peer's copy one-sided.
        for key in keystore.held_keys(out_dir, args.role).values():
            if key.report_path.parent == Path(out_dir):
                raise BadInput(
                    f"--out {out_dir}: holds {args.role}'s key of an earlier split run "
                    f"({key.path.name}, {key.key_id}); a split run never replaces or "
                    "removes it (the peer may hold its copy): give each pass its own --out"
                )
    return store


class SettlePendingFirst:
    """A split run's endpoint, preceded on the same authenticated channel by the settling
    of the pending keys this side holds for the peer (host/distil/keystore.py, what `qkdsat
    keys confirm` does): a pending key left by an earlier contact (Bob's final `done` lost
    with the link) is kept on both sides or destroyed on both before any new key material
    is made, so none lingers from one contact to the next. The outcome is in the report
    (key_confirmation); a settling that fails aborts the run before the protocol begins
    (exit 3, no key; this side's pending keys unchanged, the next contact decides)."""

    def __init__(self, endpoint, store: Path, role: str, store_named: bool = True):
        self.endpoint, self.store, self.role = endpoint, Path(store), role
        self.store_named = store_named

    @property
    def on_stage(self):
        return self.endpoint.on_stage

    @on_stage.setter
    def on_stage(self, callback) -> None:
        self.endpoint.on_stage = callback

    def run(self, chan):
        from host.distil.channel import PeerAborted
        from host.distil.protocol import Outcome

        try:
            # a first run into a new --out holds nothing: its list says so
            store = self.store if self.store.is_dir() else None
            settled = keystore.run_confirm(chan, store, self.role, self.store_named)
        except ProtocolAborted as error:
            if not isinstance(error, PeerAborted):
                chan.abort(f"settling the pending keys: {error}")
            reason = f"settling the pending keys before the run: {error}"
            return Outcome(self.role, None, {"aborted": True, "abort_reason": reason})
        outcome = self.endpoint.run(chan)
        outcome.report["key_confirmation"] = settled
        return outcome


def _run_split(
    args,
    cfg: Config,
    pass_dir,
    out_dir,
    pass_json,
    pool,
    progress,
    alice_patterns=None,
    stream=None,
) -> dict:
    seed = args.insecure_deterministic_seed
    ledger = getattr(args, "raw_data_ledger", None)
    endpoint = _endpoints(pass_dir, None, cfg, seed, alice_patterns, stream, (args.role,), ledger)[
        args.role
    ]
    endpoint = SettlePendingFirst(
        endpoint, key_store_of(args, out_dir), args.role, bool(getattr(args, "key_store", None))
    )
    metadata = run_metadata(pass_dir, cfg, seed)
    if progress is not None:
        endpoint.on_stage = _stage_lines(progress)
    address = args.listen or args.connect

    def say_listening() -> None:
        # always said (not only as progress): the peer's operator needs the address
        if not getattr(args, "quiet", False):
            print(
                f"qkdsat distil: {args.role} listening on {address}", file=sys.stderr, flush=True
            )

    if args.connect and progress is not None:
        progress(f"{args.role}: connecting to {address}")
    transport = ch.open_split(args.listen, args.connect, on_listening=say_listening)
    session = ch.exchange_pool_start(transport, pool, args.role)
    chan = ch.AuthChannel(transport, pool, args.role, session=session)
    if progress is not None:
        progress(f"{args.role}: connected; running the protocol")
    t0 = time.perf_counter()
    result = {}
    thread = ch.endpoint_thread(args.role, endpoint, chan, result)
    thread.start()
    _wait_for([thread], (chan,), progress)
    stem = key_names(seed is not None)[args.role]
    if f"{args.role}_error" in result:
        _fail(out_dir, pass_json, metadata, args.role, result[f"{args.role}_error"], [stem])
    outcome = result[args.role]
    wall = time.perf_counter() - t0
    aborted = outcome.key is None
    report = dict(outcome.report)
    report.update(
        {
            "role": args.role,
            "aborted": aborted,
            "abort_reason": outcome.report.get("abort_reason") if aborted else None,
            "key_bits": 0 if aborted else int(outcome.key.size),
            "epsilon": epsilon_figures(cfg, chan),
            "analysis": cfg.analysis,
            "tail": cfg.tail,
            "auth_key_bits_used": pool.used_bits,
            "classical_bytes": {
                "alice_to_bob": chan.bytes_sent if args.role == "alice" else chan.bytes_received,
                "bob_to_alice": chan.bytes_received if args.role == "alice" else chan.bytes_sent,
            },
            "stage_seconds": {**outcome.stage_seconds, "total": wall},
            "profile": _profile(pass_json),
        }
    )
    report.update(metadata)
    if seed is not None:
        report["insecure_deterministic"] = True
    if stream is not None:
        _stream_fields(report, outcome)
    finish(out_dir, report, {stem: outcome.key}, pending=True)
    if stream is not None:
        _stamp_key_latency(out_dir, report, outcome.report.get("last_detection_unix_s"))
    return report


def summary(report: dict, out_dir: Path) -> dict:
    """The human-readable lines of a result (the whole report goes to --json)."""
    qber = report.get("qber") or {}
    lines = {
        "result": "aborted" if report["aborted"] else "key made",
        "key_bits": report["key_bits"],
    }
    if report["aborted"]:
        lines["reason"] = report["abort_reason"]
    for basis, value in qber.items():
        if value is not None:
            lines[f"qber_{basis}"] = f"{100 * value:.2f} %"
    lines["sifted_bits"] = report.get("sifted_bits")
    ec = report.get("ec") or {}
    if ec.get("leak_bits") is not None:
        lines["ec_leak_bits"] = ec["leak_bits"]
    lines["seconds"] = f"{report['stage_seconds']['total']:.1f}"
    key_files = report.get("key_files") or {}
    lines["keys"] = (
        ", ".join(f"{Path(out_dir) / f['file']} ({f['bits']} bits)" for f in key_files.values())
        or "none"
    )
    lines["report"] = str(Path(out_dir) / REPORT_NAME)
    return lines


def run(args) -> int:
    if (args.listen or args.connect) and not args.role:
        raise BadInput("--listen/--connect run one endpoint: give --role alice or --role bob")
    if not args.pass_dir:
        raise BadInput("give the pass directory: qkdsat distil PASS_DIR --out DIR")
    seed = args.insecure_deterministic_seed
    if args.raw_data_ledger is not None and not args.raw_data_ledger.strip():
        raise BadInput("--raw-data-ledger: an empty path (give Alice's ledger directory)")
    if seed is not None and not 0 <= seed < 2**63:
        raise BadInput(f"--insecure-deterministic-seed {seed}: must be an integer in 0..2**63-1")
    cfg = config_from_args(args)
    stream = stream_from_args(args)
    progress = progress_for(args, "qkdsat distil")
    if args.role:
        report = run_split(args, cfg, progress, stream=stream)
    else:
        report = run_local(
            args.pass_dir,
            args.out,
            cfg,
            args.auth_pool,
            args.insecure_deterministic_seed,
            new_pool=args.new_auth_pool,
            progress=progress,
            stream=stream,
            raw_data_ledger=args.raw_data_ledger,
        )
    progress("done")
    print_result(args, report, summary(report, args.out))
    if report["aborted"]:
        raise ProtocolAborted(report["abort_reason"])
    return 0
