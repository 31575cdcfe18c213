"""`qkdsat codes build`: provision the LDPC codes a pass can pick, before the pass.

Each code (frame length n, mother rate, public seed) is built by progressive edge growth
the first time a side uses it (ldpc.construct) and kept in the disk cache (ldpc.cache_dir).
Built during a pass, it costs seconds to tens of seconds (2^18 frames ~27 s at load ~8.5),
which the key latency after loss of signal (5 s) and the link's end reserve do not hold.
So a payload processor or ground station builds them once at installation, with this
command, and each streaming endpoint counts at its warm-up the ones still missing
(docs/streaming.md, "Provisioning the codes").

Which codes: reconcile._plan picks the frame length from ldpc.frame_bits_for and the mother
rate from ldpc.mother_rate_for, given the block's size, the QBER estimate and its sample
(reconcile.qber_interval) and the efficiency. codes_for() sweeps every QBER estimate up to
the abort threshold, every sample size and every block size through those same functions,
without building anything.
"""

from __future__ import annotations

import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from host.errors import EXIT_ENVIRONMENT, BadInput

PROVISION_COMMAND = "qkdsat codes build"


def frame_lengths() -> tuple[int, ...]:
    from host.distil import ldpc

    return tuple(sorted({ldpc.FRAME_BITS, *ldpc.LONG_FRAME_BITS}))


def codes_for(
    qber_min: float,
    qber_max: float,
    efficiencies: tuple[float, ...],
    lengths: tuple[int, ...] | None = None,
) -> list[tuple[int, float]]:
    """Every (n, mother rate) reconcile._plan can pick for a QBER estimate in
    [qber_min, qber_max],
    any sample size and any block size, at any of `efficiencies`; longest frames first.

    For one (QBER interval, n) the rate falls as the frame's key bits grow (the leak and
    the reserve grow with them) by less than a grid step per key bit, so every grid rate
    between the rate at the fewest key bits a frame of n can hold in _plan and the rate at
    the most is picked by some block. Those bounds move continuously with the estimate and
    its sample, so the union over the sweep is one interval of the grid per n: it is taken
    whole (a finite sweep could step over a rate)."""
    from host.distil import ldpc, reconcile

    lengths = tuple(sorted(lengths or frame_lengths()))
    shortest = lengths[0]
    span: dict[int, tuple[int, int]] = {}
    grid = ldpc.MOTHER_RATES
    long_min = ldpc.LONG_FRAME_MIN_FRAMES
    # the least a longer frame is filled: in a block of LONG_FRAME_MIN_FRAMES or of
    # MID_FRAME_MIN_FRAMES frames or more, or alone at SMALL_BLOCK_MIN_FILL
    mid_min = ldpc.MID_FRAME_MIN_FRAMES
    fill = min((long_min - 1) / long_min, (mid_min - 1) / mid_min, ldpc.SMALL_BLOCK_MIN_FILL)
    estimates = [qber_min + (qber_max - qber_min) * (i / 64) ** 2 for i in range(65)]
    samples = [0] + [int(10 ** (k / 4)) for k in range(0, 37)]  # 1 .. 10^9 sampled bits
    for efficiency in efficiencies:
        for q in estimates:
            for sample_bits in samples:
                low, high = reconcile.qber_interval(q, sample_bits)
                for n in lengths:
                    most = ldpc.max_key_bits(low, efficiency, n, qber_high=high)
                    # the shortest frame takes a block of any size (down to one bit); a
                    # longer one a block of at least LONG_FRAME_MIN_FRAMES frames, so its
                    # frames hold more than (min - 1) / min of the most, or one of at least
                    # MID_FRAME_MIN_FRAMES (the same bound with mid), or a small block alone
                    # in one frame, at least SMALL_BLOCK_MIN_FILL of the most
                    fewest = 1
                    if n != shortest:
                        fewest = math.floor(most * fill)
                    top = ldpc.mother_rate_for(low, efficiency, n, max(fewest, 1), high)
                    bottom = ldpc.mother_rate_for(low, efficiency, n, most, high)
                    i, j = grid.index(bottom), grid.index(top)
                    old = span.get(n, (i, j))
                    span[n] = (min(old[0], i), max(old[1], j))
    out = []
    for n in sorted(span, reverse=True):  # the longest builds first: the pool ends level
        lowest, highest = span[n]
        out += [(n, grid[k]) for k in range(lowest, highest + 1)]
    return out


def missing(codes: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The codes whose file is not in the disk cache (a torn file is rebuilt when used, so
    it counts as present here)."""
    from host.distil import ldpc

    return [(n, rate) for n, rate in codes if not ldpc.cached_path(n, rate).exists()]


def sizing_efficiencies(config) -> tuple[float, ...]:
    """The efficiencies reconcile._plan sizes a part on under `config`: its ec_efficiency
    times any entropy ratio Bob may announce (ec_sizing, reconcile.entropy_ratio: from
    _entropy_ratio_floor to 1; codes_for's interval per length spans the rates between),
    and the first attempt's."""
    from host.distil import reconcile

    efficiency = config.ec_efficiency
    lowest = efficiency * reconcile._entropy_ratio_floor(efficiency) / reconcile.ENTROPY_RATIO_ONE
    return tuple(sorted({efficiency, lowest, reconcile.LDPC_FIRST_F}))


def default_codes(
    lengths: tuple[int, ...] | None = None,
    qber_max: float | None = None,
    qber_min: float = 0.0,
):
    """The codes of the default distillation configuration (protocol.Config): its abort
    threshold and efficiency (times any announced entropy ratio), and the first
    attempt's."""
    from host.distil.protocol import Config

    cfg = Config()
    return codes_for(
        qber_min,
        cfg.qber_threshold if qber_max is None else qber_max,
        sizing_efficiencies(cfg),
        lengths,
    )


_MISSING_AT_WARM_UP: dict = {}


def count_missing_for_stream(config) -> dict:
    """At a streaming endpoint's warm-up: how many of the codes this pass may pick are not
    in the cache (report field `ldpc_codes_missing`), with one warning line on stderr
    naming the provisioning command. Nothing is built here: a build belongs before the
    pass, not in its first chunks."""
    efficiencies = sizing_efficiencies(config)
    key = (config.qber_threshold, efficiencies, frame_lengths())
    if key not in _MISSING_AT_WARM_UP:
        _MISSING_AT_WARM_UP[key] = codes_for(0.0, config.qber_threshold, efficiencies)
    codes = _MISSING_AT_WARM_UP[key]
    absent = missing(codes)
    if absent:
        print(
            f"warning: {len(absent)} of the {len(codes)} LDPC codes this pass may pick are not "
            f"built; a chunk that needs one builds it during the pass (seconds to tens of "
            f"seconds each): run '{PROVISION_COMMAND}' before the pass",
            file=sys.stderr,
        )
    return {"missing": len(absent), "of": len(codes)}


def warm_up_machine_code() -> float:
    """Put into numba's cache (host/distil/__pycache__) the machine code of every kernel a
    pass runs, compiled if it is not there: the decoder for frames of 2^16, 2^17 and 2^18
    (a quasi-cyclic decoder each, ldpc_qc.decoder_for), the syndromes, the message
    authentication's hash (both layouts of its blocks), the Rice coding of the slots and
    the privacy amplification. With an empty cache a pass compiles them inside its own
    timed stages: the first full micius-2017 pass of a fresh tree took 27.4 s against
    ~9 s (docs/distillation.md, "Distillation time of a full pass"). Throw-away bits
    only. Run by `make setup` after the codes (it decodes with them); returns its wall
    seconds."""
    from host.distil import bitcodec, gf64, ldpc, pa, reconcile
    from host.distil.protocol import Config

    started = time.perf_counter()
    efficiency = Config().ec_efficiency
    reconcile._correct_throwaway_frame(efficiency)
    # every frame length: each has its own QC decoder (lifts 32, 64: their own machine
    # code; 128: the generic kernel), ldpc_qc.decoder_for
    for frame_bits in ldpc.LONG_FRAME_BITS:
        reconcile._correct_throwaway_frame(efficiency, frame_bits)
    gf64.poly_hash(b"8 bytes.", 1)  # a whole number of blocks: a read-only view of them
    gf64.poly_hash(b"padded", 1)  # padded: a copy
    k, packed = bitcodec.rice_encode_sorted(np.arange(1, 1000, 7, dtype=np.int64))
    bitcodec.rice_decode_sorted(k, packed, 143)
    pa.warm_up()
    return time.perf_counter() - started


def _build_one(job: tuple[int, float, str]) -> float:
    n, rate, cache_root = job
    os.environ["QKDSAT_CACHE"] = cache_root
    from host.distil import ldpc

    started = time.perf_counter()
    ldpc.construct(n, rate)
    return time.perf_counter() - started


def add_arguments(parser) -> None:
    parser.add_argument("action", choices=["build"], help="build the codes (or --check them)")
    parser.add_argument(
        "--check",
        action="store_true",
        help="build nothing: list the missing codes, exit 1 if any",
    )
    parser.add_argument(
        "--cache",
        metavar="DIR",
        help="cache root, codes go to DIR/ldpc (default: $QKDSAT_CACHE or ~/.cache/qkdsat)",
    )
    parser.add_argument(
        "--qber-max",
        type=float,
        help="the highest QBER estimate to provision for (default: the abort threshold, 0.11)",
    )
    parser.add_argument(
        "--qber-min",
        type=float,
        default=0.0,
        help="the lowest QBER estimate to provision for (default 0)",
    )
    parser.add_argument(
        "--frame-bits",
        type=int,
        nargs="+",
        metavar="N",
        help="frame lengths (default: every length reconciliation picks, 2^16 2^17 2^18)",
    )
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="parallel builds (default: cores)"
    )


def run(args) -> int:
    if args.qber_max is not None and not 0 < args.qber_max <= 0.5:
        raise BadInput(f"--qber-max: {args.qber_max} is not in (0, 0.5]")
    if not 0 <= args.qber_min <= (args.qber_max or 0.5):
        raise BadInput(f"--qber-min: {args.qber_min} is not in [0, --qber-max]")
    if args.jobs < 1:
        raise BadInput(f"--jobs: {args.jobs} is not a positive number")
    if args.frame_bits and any(n < 64 or n & (n - 1) for n in args.frame_bits):
        raise BadInput(f"--frame-bits: {args.frame_bits} are not all powers of two >= 64")
    if args.cache:
        os.environ["QKDSAT_CACHE"] = os.path.abspath(args.cache)
    from host.distil import ldpc

    cache = ldpc.cache_dir()
    codes = default_codes(
        tuple(args.frame_bits) if args.frame_bits else None, args.qber_max, args.qber_min
    )
    try:
        ldpc.qc_mode()  # the construction switch, read by every code below
    except ValueError as error:
        raise BadInput(str(error)) from None
    for n, rate in codes:
        try:
            ldpc.buildable(n, rate)
        except ldpc.FrameTooShort as error:
            raise BadInput(f"--frame-bits {n}: {error}") from None
    absent = missing(codes)
    say = (lambda *a, **k: None) if args.quiet else print
    if args.check:
        for n, rate in absent:
            print(f"missing: n={n} rate={rate} {ldpc.cached_path(n, rate)}")
        say(f"{len(codes) - len(absent)} of {len(codes)} codes in {cache}, {len(absent)} missing")
        return EXIT_ENVIRONMENT if absent else 0
    started = time.perf_counter()
    jobs = [(n, rate, str(cache.parent)) for n, rate in absent]
    built_s = 0.0
    if jobs:
        with ProcessPoolExecutor(max_workers=min(args.jobs, len(jobs))) as pool:
            for done, seconds in enumerate(pool.map(_build_one, jobs), 1):
                built_s += seconds
                if args.verbose:
                    print(f"built {done}/{len(jobs)} in {seconds:.1f} s", flush=True)
    wall_s = time.perf_counter() - started
    say(
        f"built {len(jobs)}, skipped {len(codes) - len(jobs)} (already in {cache}); "
        f"{wall_s:.1f} s wall, {built_s:.1f} s of builds on {args.jobs} workers"
    )
    return 0
