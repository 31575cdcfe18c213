"""`qkdsat distil`: run Alice and Bob (local mode: both, in-process channel; split mode:
one role over TCP), write report.json and, only when every check passed, the keys.

Keys are written atomically (temporary file created 0600, fsync, rename) and never
logged. An abort leaves report.json with the reason and no key file (exit 3).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np

from host.distil import channel as ch
from host.distil.protocol import BASES, VERIFY_KEYS, Alice, Bob, Config
from host.errors import BadInput, ProtocolAborted
from host.formats.passdir import read_pass_json

REPORT_NAME = "report.json"
# Keys made with replayed endpoint randomness are not secret: named so nothing takes them
# for alice.key / bob.key.
INSECURE_KEY_SUFFIX = ".INSECURE-TEST-ONLY"


def key_names(insecure_deterministic: bool) -> dict:
    """{role: file stem} of the key files."""
    suffix = INSECURE_KEY_SUFFIX if insecure_deterministic else ""
    return {role: role + suffix for role in ("alice", "bob")}


def add_arguments(parser) -> None:
    parser.add_argument(
        "pass_dir", nargs="?", help="pass directory (pass.json, satellite/, ground/)"
    )
    parser.add_argument("--out", required=True, help="output directory (keys, report.json)")
    parser.add_argument("--ec", default="ldpc", choices=("ldpc", "cascade"))
    parser.add_argument("--analysis", default="lim2014", choices=("lim2014", "rusca2018"))
    parser.add_argument("--tail", default="hoeffding", choices=("hoeffding", "chernoff"))
    parser.add_argument("--eps-sec", type=float, default=1e-9)
    parser.add_argument("--eps-cor", type=float, default=1e-15)
    parser.add_argument("--qber-threshold", type=float, default=0.11)
    parser.add_argument("--key-bases", default="auto", choices=("auto", "Z", "ZX"))
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
    parser.add_argument("--listen", help="split mode: HOST:PORT to listen on")
    parser.add_argument("--connect", help="split mode: HOST:PORT to connect to")
    parser.add_argument(
        "--insecure-deterministic-seed",
        type=int,
        metavar="N",
        help="TESTS ONLY, NOT SECURE: replay the endpoints' randomness (hash keys, PA seed, "
        "samples) from N instead of the OS CSPRNG; the report says insecure_deterministic "
        f"and the keys are written as ROLE{INSECURE_KEY_SUFFIX}",
    )


def config_from_args(args) -> Config:
    cfg = Config(
        ec=args.ec,
        analysis=args.analysis,
        tail=args.tail,
        eps_sec=args.eps_sec,
        eps_cor=args.eps_cor,
        qber_threshold=args.qber_threshold,
        key_bases=args.key_bases,
    )
    cfg.validate()
    return cfg


def write_key(path: Path, bits: np.ndarray) -> None:
    """Packed bits (MSB first, zero-padded to a byte), created 0600, renamed into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(np.packbits(bits).tobytes())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, np.integer | np.floating):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")


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
        "pa": a.get("pa"),
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


def run_local(
    pass_dir,
    out_dir,
    cfg: Config,
    pool_path=None,
    insecure_deterministic_seed=None,
    tamper=None,
    bob_pool_path=None,
    bob_pass_dir=None,
    new_pool=False,
    alice_patterns=None,
) -> dict:
    """Both endpoints in one process (two threads, in-process channel). alice_patterns:
    where Alice reads her symbols when not from satellite/ (the head's pattern memory)."""
    pools = open_local_pools(pool_path, bob_pool_path, new_pool)
    try:
        return _run_local(
            pass_dir,
            out_dir,
            cfg,
            pools,
            insecure_deterministic_seed,
            tamper,
            bob_pass_dir,
            alice_patterns,
        )
    finally:
        for pool in pools:
            pool.close()


def _run_local(
    pass_dir, out_dir, cfg: Config, pools, seed, tamper, bob_pass_dir, alice_patterns=None
) -> dict:
    pass_dir, out_dir = Path(pass_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for insecure in (False, True):
        for name in key_names(insecure).values():
            (out_dir / f"{name}.key").unlink(missing_ok=True)  # never taken for this run's
    pass_json = read_pass_json(pass_dir / "pass.json")
    pool_a, pool_b = pools
    insecure = seed is not None
    alice = Alice(pass_dir, cfg, insecure_deterministic_seed=seed, patterns=alice_patterns)
    bob = Bob(
        bob_pass_dir or pass_dir,
        cfg,
        insecure_deterministic_seed=None if seed is None else seed + 1,
    )
    t_a, t_b = ch.queue_pair()
    if tamper is not None:
        t_a.tamper = tamper
    a_chan = ch.AuthChannel(t_a, pool_a, ch.ALICE)
    b_chan = ch.AuthChannel(t_b, pool_b, ch.BOB)
    result = {}
    t0 = time.perf_counter()

    def alice_thread():
        try:
            result["alice"] = alice.run(a_chan)
        except BaseException as error:  # re-raised in the caller's thread below
            result["alice_error"] = error
        finally:
            a_chan.close()

    thread = threading.Thread(target=alice_thread, name="alice")
    thread.start()
    bob_out = bob.run(b_chan)
    b_chan.close()
    thread.join()
    if "alice_error" in result:
        raise result["alice_error"]
    wall = time.perf_counter() - t0
    pool_bits = max(pool_a.used_bits, pool_b.used_bits)
    report = build_report(
        pass_json, cfg, result["alice"], bob_out, a_chan, b_chan, pool_bits, wall
    )
    names = key_names(insecure)
    if insecure:
        report["insecure_deterministic"] = True
    finish(out_dir, report, {names["alice"]: result["alice"].key, names["bob"]: bob_out.key})
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


def finish(out_dir: Path, report: dict, keys: dict) -> None:
    """report.json first; the keys only when nothing aborted."""
    write_json_atomic(out_dir / REPORT_NAME, report)
    if report["aborted"]:
        return
    for role, key in keys.items():
        if key is not None:
            write_key(out_dir / f"{role}.key", key)


def run_split(args, cfg: Config) -> dict:
    """One endpoint over TCP. The report holds this endpoint's view."""
    if not args.auth_pool:
        raise BadInput("split mode needs --auth-pool (the pre-shared authentication key)")
    if bool(args.listen) == bool(args.connect):
        raise BadInput("split mode needs exactly one of --listen or --connect")
    pass_dir, out_dir = Path(args.pass_dir), Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for insecure in (False, True):
        (out_dir / f"{key_names(insecure)[args.role]}.key").unlink(missing_ok=True)
    pass_json = read_pass_json(pass_dir / "pass.json")
    pool = ch.KeyPool.from_file(args.auth_pool, new=args.new_auth_pool)
    try:
        return _run_split(args, cfg, pass_dir, out_dir, pass_json, pool)
    finally:
        pool.close()


def _run_split(args, cfg: Config, pass_dir, out_dir, pass_json, pool) -> dict:
    seed = args.insecure_deterministic_seed
    endpoint = (Alice if args.role == "alice" else Bob)(
        pass_dir,
        cfg,
        insecure_deterministic_seed=None if seed is None else seed + (args.role == "bob"),
    )
    transport = ch.listen(args.listen) if args.listen else ch.connect(args.connect)
    ch.exchange_pool_start(transport, pool)
    chan = ch.AuthChannel(transport, pool, args.role)
    t0 = time.perf_counter()
    try:
        outcome = endpoint.run(chan)
    finally:
        chan.close()
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
            "auth_key_bits_used": pool.used_bits,
            "classical_bytes": {
                "alice_to_bob": chan.bytes_sent if args.role == "alice" else chan.bytes_received,
                "bob_to_alice": chan.bytes_received if args.role == "alice" else chan.bytes_sent,
            },
            "stage_seconds": {**outcome.stage_seconds, "total": wall},
            "profile": _profile(pass_json),
        }
    )
    if seed is not None:
        report["insecure_deterministic"] = True
    finish(out_dir, report, {key_names(seed is not None)[args.role]: outcome.key})
    return report


def run(args) -> int:
    cfg = config_from_args(args)
    if args.role:
        if not args.pass_dir:
            raise BadInput("give the pass directory")
        report = run_split(args, cfg)
    else:
        if not args.pass_dir:
            raise BadInput("give the pass directory: qkdsat distil PASS_DIR --out DIR")
        report = run_local(
            args.pass_dir,
            args.out,
            cfg,
            args.auth_pool,
            args.insecure_deterministic_seed,
            new_pool=args.new_auth_pool,
        )
    if report["aborted"]:
        raise ProtocolAborted(report["abort_reason"])
    print(
        f"key_bits={report['key_bits']} qber={report.get('qber')} "
        f"report={Path(args.out) / REPORT_NAME}"
    )
    return 0
