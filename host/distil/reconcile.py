"""Error correction as two-party exchanges: LDPC syndromes (Alice -> Bob) with a retry path,
and the Cascade baseline. Each side calls its half with the same public parameters.

Leak accounting (bits an eavesdropper learns about the key string):
- LDPC: per frame m - rank(H_punctured) syndrome bits, plus every bit revealed on a retry,
  plus the check after decoding: a BLOCK_TAG_BITS tag of all decoded frames, and only if
  it differs a FRAME_TAG_BITS tag per decoded frame. Frames that are discarded (never
  decoded, or decoded to a word whose tag differs from Alice's) leave the key block, but
  what was sent about them still counts (conservative). Their bits are then disclosed in
  full, and the key length charges them one bit each (protocol._key_lengths,
  docs/distillation.md).
- Cascade: every parity Alice sends, and every parity Bob sends (counted both ways).
"""

from __future__ import annotations

import functools
import hmac
import math
import threading
import time
from dataclasses import dataclass

import numba
import numpy as np

import host.distil.numba_cache  # noqa: F401 - numba's cache index locked among processes
from host.distil import ldpc, ldpc_qc, noise_model
from host.distil.bitcodec import pack_bits, unpack_bits
from host.distil.finite_key import binary_entropy
from host.distil.gf64 import bits_hash
from host.errors import ProtocolAborted

LDPC_MAX_ITERATIONS = 100  # first attempt
# Each retry's cap, resuming from the previous attempt's messages. The stall rule, not
# the cap, ends a retry that makes no progress; a cap of 40 also cut retries still
# reaching new lows, each then paying one more reveal step (issue 17, session 14: 100
# took 0.001-0.002 off f at 1-5 % for the same decoder work, "Decoder budget and the
# frames' thresholds" in docs/distillation.md; the first attempt's cap never binds).
LDPC_RETRY_ITERATIONS = 100
LDPC_RETRIES = 40
# Bits revealed per retry, as a fraction of the frame's n h(QBER estimate): each retry
# raises the frame's efficiency f by about this much, so the retry path ends close to the
# frame's own decoding threshold instead of a worst-case margin chosen up front.
LDPC_REVEAL_STEP_F = 0.01
LDPC_STEP_GROWTH = 8  # retries per unit of step growth (see _retry_step)
LDPC_STEP_LINEAR = 24  # retries of linear growth before doubling
TAIL_SHARE_INV = 2  # see _retry_step: a tail round costs at most a half-block round
# A retry round after which every frame of a block of two or more still fails reveals
# this many steps: Bob's top-up fell short of every frame, which on a small block means
# his QBER measured from the syndromes ran low (it is +-6 % on 3 frames); doubled steps
# halve the climb (30 s micius passes: worst EC 7.1 -> 5.0 s, f unchanged within the
# runs' spread; docs/distillation.md, "Every frame failed").
ALL_FAILED_WIDENING = 2
# Sizing from the QBER sample: the first syndromes are sized for the low end of the
# sample's confidence interval (estimate - QBER_SIGMAS_LOW standard errors), the punctured
# reserve reaches its high end (+ QBER_SIGMAS_HIGH). Bob then measures the QBER from the
# syndromes themselves (_syndrome_qber: every check whose parity differs from Alice's
# counts, ~100x the sample) and asks, in one round, for the punctured bits that bring
# every frame to LDPC_FIRST_F h(measured QBER); the fine retries follow only for the
# frames that still fail. A sample that ran high costs at most the gap to the low end,
# one that ran low costs nothing but that round.
QBER_SIGMAS_LOW = 2.0
QBER_SIGMAS_HIGH = 4.0
# Measured on 1 M bits, one noise seed, same load (docs/distillation.md): top-up to 1.06
# -> 1.08 gave f 1.0899 -> 1.0901 and 38 -> 25 s at 2 % QBER, 1.072 -> 1.085 and 17 -> 7 s
# at 5 %; at 1 % 1.06 -> 1.09 gave 1.107 -> 1.113 and 31 -> 15 s. Most frames' thresholds
# lie above 1.06, so a lower top-up only moves them to the retries (a decoding pass each).
LDPC_FIRST_F = 1.08
# Frames longer than ldpc.FRAME_BITS (ldpc.frame_bits_for) decode closer to the codes'
# threshold, and a top-up to 1.08 left them there: the jinan-1 pass's 22 frames of 2^18
# (seed 1, fixed secret) 17 of 22 decoded at once, block f 1.101. Their top-up aims lower
# and the fine retries take each frame the rest of the way: 1.05 gave f 1.083 and +11,414
# key bits for ~2x the decoder's iterations, 1.03 only +817 more for 1.5x again
# (docs/distillation.md, "Frame length").
LDPC_FIRST_F_LONG = 1.05


def _first_f(frame_bits: int) -> float:
    """The f Bob's top-up brings every frame of this length to (at most LDPC_FIRST_F)."""
    if frame_bits <= ldpc.FRAME_BITS:
        return LDPC_FIRST_F
    return min(LDPC_FIRST_F, LDPC_FIRST_F_LONG)


# Bob's top-up is sized for the low end of his syndrome QBER measurement's interval, this
# many standard errors below his estimate (_syndrome_qber; the standard error is the
# measurement's real spread about the block's error rate, ~5 % of the QBER on 3 frames of
# 2^16 at 1.1 %, ~2 % on 8 frames of 2^17). Until session 12 it was 1 standard error of a
# likelihood that claimed about half the real spread; 0.5 real ones is about where that
# sat. The level trades f for decoding rounds (docs/distillation.md, "Bob's measurement,
# session 12"): 1.0 took f -0.0026 on the second block of a 30 s micius pass for 1.2x
# the decoder iterations, +0.002 on the first, so 0.5.
TOP_UP_SIGMAS = 0.5


# Sizing on the bits' own entropies (docs/distillation.md, "Alice sizes on the bits'
# entropies", session 20). Bob's prior (noise_model.BitErrorModel) gives the syndrome a
# part's bits need at the Shannon limit, the mean of h(p_i), which lies below h(q) when
# the block mixes cleaner and noisier detections (0.94 h(q) on a full micius-2017 pass).
# Alice's first syndromes were sized on efficiency h(q) and so set f there, above where
# most frames decode; Bob now announces the ratio (ec_sizing, before the syndromes) and
# both plan on efficiency x ratio. The ratio is a function of public values only: the
# shares come from the detection rates of each announced intensity class, and the QBER
# it is taken at is the part's public sizing estimate (not Bob's syndrome measurement),
# so it tells nothing about the key and is not in the leak. It crosses as an integer in
# 1/ENTROPY_RATIO_ONE, rounded up (both sides compute the same plan from the same
# integer). A wrong ratio costs top-ups, retries and leak, never a wrong key (the frames'
# tags). But the punctured reserve's reach falls with it (_plan: efficiency x ratio +
# RETRY_RESERVE_F of h(q)), and past the reserve a frame reveals key bits, each worth
# only 1 - R of a syndrome bit (a block whose bits' entropies average 0.82 h(q), sized at
# efficiency 0.9 x 0.82: f 1.07-1.56, against 0.93 sized at 0.9). So the ratio is at
# least _entropy_ratio_floor(efficiency), where the reserve still reaches the whole
# h(q), should a receiver differ from the model: 0.81 at the default efficiency 1.05
# (a micius-2017 pass's bits give 0.94-0.96, jinan-1's 0.985). Alice refuses a ratio
# outside [floor, ENTROPY_RATIO_ONE].
ENTROPY_RATIO_ONE = 1 << 16


def _entropy_ratio_floor(efficiency: float) -> int:
    """The lowest ratio (in 1 / ENTROPY_RATIO_ONE) whose plan's reserve reaches h(q):
    efficiency x ratio + RETRY_RESERVE_F >= 1."""
    floor = math.ceil(ENTROPY_RATIO_ONE * (1 - ldpc.RETRY_RESERVE_F) / efficiency)
    return min(floor, ENTROPY_RATIO_ONE)


def entropy_ratio(
    channel_model: noise_model.BitErrorModel, qber_low: float, efficiency: float
) -> int:
    """Bob's ec_sizing: the model's mean entropy over h(q) at the plan's low end, in
    1 / ENTROPY_RATIO_ONE, rounded up, within [_entropy_ratio_floor(efficiency),
    ENTROPY_RATIO_ONE] (ENTROPY_RATIO_ONE for a binary symmetric channel)."""
    q = min(max(qber_low, 1e-4), 0.5)
    ratio = math.ceil(channel_model.entropy(q) / binary_entropy(q) * ENTROPY_RATIO_ONE)
    return min(max(ratio, _entropy_ratio_floor(efficiency)), ENTROPY_RATIO_ONE)


# Check after decoding, under a hash key Alice draws after Bob has finished decoding (so
# the wrong words cannot depend on it), with the polynomial hash gf64.bits_hash:
# - first one BLOCK_TAG_BITS tag of all decoded frames together: in the usual case, every
#   frame right, that is the whole check (its leak does not grow with the frame count);
# - only if it differs, one FRAME_TAG_BITS tag per decoded frame, to find the wrong ones.
#   A wrong word passes with probability <= (L + 1) / 2^32, L = 64-bit blocks of the frame
#   (2.4e-7 for 2^16-bit frames).
# Neither is part of eps_cor: the block-level verification (protocol.py) still guards
# every kept bit; these tags only decide which frames to drop so that one bad frame costs
# a frame, not the pass. (One 32-bit tag per frame, always sent, cost 0.006 in f at 1 %
# QBER.)
BLOCK_TAG_BITS = 64
FRAME_TAG_BITS = 32


def _retry_step(base_step: int, attempt: int, pending: int = 1, frames: int = 1) -> int:
    """Bits revealed per pending frame on retry `attempt` (0-based). Fine steps first,
    growing linearly (one more base step every LDPC_STEP_GROWTH retries): frames end close
    to their own threshold (doubling from the start overshot: a frame done on retry 20
    paid up to 0.08 in f for its last step). After LDPC_STEP_LINEAR retries the step
    doubles every 3, so that a small block whose sampled QBER was far too low, or a frame
    past the punctured reserve (key bits are worth only 1 - R syndrome bits each), still
    decodes within LDPC_RETRIES.
    While every frame of a block of two or more fails, the step is multiplied by
    ALL_FAILED_WIDENING (the first attempt fell short of all of them).
    Tail widening: when few of the block's frames are left (pending of frames, both
    public: Bob's ec_status lists them), the step is multiplied by
    frames // (TAIL_SHARE_INV * pending), so a round's reveal costs the block at most what
    a round with 1 / TAIL_SHARE_INV of the frames pending costs: the last one or two frames
    of a 16-frame chunk (a frame's threshold lies up to ~0.06 above the mean) take a few
    coarse rounds instead of many fine ones (docs/distillation.md, "Retry rounds")."""
    widen = _tail_widening(pending, frames)
    if attempt < LDPC_STEP_LINEAR:
        return base_step * (1 + attempt // LDPC_STEP_GROWTH) * widen
    linear_end = 1 + (LDPC_STEP_LINEAR - 1) // LDPC_STEP_GROWTH
    return (base_step * linear_end << (1 + (attempt - LDPC_STEP_LINEAR) // 3)) * widen


def _tail_widening(pending: int, frames: int) -> int:
    """_retry_step's multiplier for `pending` of `frames` frames still to decode:
    ALL_FAILED_WIDENING while every frame of a multi-frame block fails, then the tail's."""
    if pending == frames >= 2:
        return ALL_FAILED_WIDENING
    return max(1, frames // (TAIL_SHARE_INV * max(pending, 1)))


# Frames should reach the decoder's threads one at a time, not in equal halves: a frame's
# iterations vary 5-20x within a call (one that stalls stops after 5, one that decodes runs
# 20-100), and static halves keep both cores busy for only part of a round. This asks
# numba's prange for chunks of DECODER_CHUNK_FRAMES (session 10), but its OpenMP layer (the
# one this machine's numba runs) splits the loop in static halves whatever the chunk
# (session 21: a row 7x heavier than the 7 others held its half, 328 ms either way). The
# quasi-cyclic decoder, the protocol's, hands frames out itself (ldpc_qc._claim); this
# setting remains for the CSR decoder (ldpc.decode_phi_rows: other frame lengths). Each
# frame's result is the same either way (frames are independent): the schedule changes
# only which core decodes it.
DECODER_CHUNK_FRAMES = 1
# (stall, progress): the decoder gives an attempt up once its fewest unsatisfied checks
# fell by less than progress / ldpc.PROGRESS_UNIT over its last `stall` iterations. By
# default (ldpc.STALL_ITERATIONS, 0): no new low in 8. LDPC_EARLY_STALL (None: off): less
# than 5 % lower in 4, while at least EARLY_STALL_PENDING_SHARE of a block of
# EARLY_STALL_MIN_FRAMES or more are pending, on mother codes of rate <= EARLY_STALL_MAX_RATE.
# Failed attempts were 55-65 % of the decoder's edge updates at 1-3 % QBER, each run until
# it stalled (15-35 iterations on average); one that will not decode rarely lowers its
# count by 5 % in 4 iterations. An attempt that would have decoded and is given up early
# costs its frame one more retry step (0.01 of its f), so the early rule is kept off where
# that step is more than a base step (_decode_round). And a retry resumes from the messages
# of the attempt before, so a failed attempt's slow progress is not all lost: at 1 % QBER
# (rate 0.9075, 2^17 frames) frames climbed over 5 rounds on it, and every early rule
# measured cost f ~0.005 there (1.0904 -> 1.0929-1.0969, 4 seeds), hence the rate bound.
# Measured on 1 M-bit blocks (8 frames of 2^17), 4 noise seeds (docs/distillation.md,
# "Decoder work per key bit"): edge updates per key bit at 2 / 3 / 5 % 635 / 724 / 586 ->
# 442 / 582 / 427, f +0.0016 / -0.0013 / -0.0004.
LDPC_EARLY_STALL: tuple[int, int] | None = (4, 51)
EARLY_STALL_MIN_FRAMES = 4
EARLY_STALL_PENDING_SHARE = 0.5


EARLY_STALL_MAX_RATE = 0.85


def _stall_rule(pending: int, frames: int, rate: float = 0.0) -> tuple[int, int]:
    """The decoder's (stall, progress) for a round decoding `pending` of `frames` frames of
    a mother code of this rate."""
    early = LDPC_EARLY_STALL is not None and frames >= EARLY_STALL_MIN_FRAMES
    early = early and rate <= EARLY_STALL_MAX_RATE
    if early and pending >= EARLY_STALL_PENDING_SHARE * frames:
        return LDPC_EARLY_STALL
    return (ldpc.STALL_ITERATIONS, 0)


def _decode_round(
    pending, llr, syndromes, code, iterations, messages, out, iters, frames, attempt
):  # fmt: skip
    """Decoding round `attempt` (0: the first) of the `pending` frames (of `frames`): their
    success flags. Under the early stall rule, when the frames left failing would take
    more than a base retry step next (_retry_step: its growth after LDPC_STEP_GROWTH
    retries, the tail's widening, or every frame failing), those frames continue under
    the default rule first, resuming from their messages: a frame given up early there
    would cost several base steps, not one. (Without it one 1 M-bit block at 1 % QBER,
    8 frames of 2^17, took f 1.096 -> 1.105: three frames stopped at 5 iterations in the
    ninth round, one of which the default rule decoded in 35.)"""
    rule = _stall_rule(pending.size, frames, code.rate)
    ok = _decode(pending, llr, syndromes, code, iterations, messages, out, iters, rule)
    failed = pending[~ok]
    widened = failed.size and _retry_step(1, attempt, failed.size, frames) > 1
    if rule != _stall_rule(0, frames) and widened:
        ok[~ok] = _decode(
            failed, llr, syndromes, code, LDPC_RETRY_ITERATIONS, messages, out, iters
        )
    return ok


def _decode(rows, llr, syndromes, code, iterations, messages, out, iters, stall_rule=None):
    """Decode the frames `rows` in place (ldpc.decode_phi_rows, or ldpc_qc.decode_qc_rows
    on a quasi-cyclic code); their success flags. The
    frames run on numba's threads (numba.set_num_threads of the calling thread: a caller
    that decodes several blocks at once can give each fewer). stall_rule: (stall,
    progress) of decode_phi_rows, default (ldpc.STALL_ITERATIONS, 0)."""
    # The decoders assume finite values (ldpc.DECODER_FASTMATH: nnan, ninf) and index the
    # phi table with them unchecked: a NaN LLR read out of bounds (decode_phi_rows
    # crashed the process). The LLRs built here are finite (a clamped QBER, LLR_KNOWN, 0);
    # this keeps it so for any caller (0.5 ms for 16 frames of 2^17).
    if not np.isfinite(llr[rows]).all():
        raise ValueError("an LLR that is not finite: the decoders assume finite values")
    stall, progress = stall_rule or (ldpc.STALL_ITERATIONS, 0)
    with numba.parallel_chunksize(DECODER_CHUNK_FRAMES):
        if code.qc is not None:
            # the same results bit for bit, the messages in the QC layout (opaque here)
            return ldpc_qc.decode_qc(
                code, rows, llr, syndromes, iterations, messages, out, iters, stall, progress
            )
        return ldpc.decode_phi_rows(
            rows,
            llr,
            syndromes,
            code.check_ptr,
            code.narrow_check_var(),
            iterations,
            messages,
            out,
            iters,
            stall,
            progress,
        )


class ReconciliationFailed(ProtocolAborted):
    pass


def _frame_tags(frame_bits: list[np.ndarray], hash_key: int) -> list[bytes]:
    size = FRAME_TAG_BITS // 8
    return [bits_hash(bits, (hash_key,))[:size] for bits in frame_bits]


def _frame_slice(frames, f: int) -> slice:
    """Frame f's span of the interleaved key string."""
    start, used = frames[f]
    return slice(start, start + used)


def _check_bits(decoded: np.ndarray, frame_tags_sent: bool) -> int:
    """Bits of the post-decoding check: the block tag, and the per-frame tags if sent."""
    return BLOCK_TAG_BITS + (FRAME_TAG_BITS * decoded.size if frame_tags_sent else 0)


def _bob_messages_bits(
    frame_count: int, code_n: int, status_messages: int, top_up_messages: int, discard: bool
) -> int:
    """What Bob's own EC messages can tell about his string, counted conservatively (each is
    computed from it, his QBER measured on the syndromes included): every ec_status names
    a subset of the frames (frame_count bits, whatever its encoding), every ec_top_up a
    step in [0, n], ec_check one bit, and ec_discard, when sent, another subset. The retry
    steps are one step in [0, n]: retry k reveals _retry_step(base, k, pending, frames),
    pending the frames of its (public) list, base from the first
    retry's step (Alice refuses any other), so the rounds after the first add only their
    frame lists. About 0.1-0.3 kbit a block; docs/distillation.md."""
    step_bits = math.ceil(math.log2(code_n + 1))
    retried = status_messages > 1  # the last ec_status carries no step
    return (
        frame_count * (status_messages + int(discard))
        + step_bits * (top_up_messages + int(retried))
        + 1
    )


def _ldpc_leak(plan: ldpc.FramePlan, frames, revealed: np.ndarray, check_bits: int) -> int:
    """What an eavesdropper learns, the same count on both sides: every frame's syndrome
    (less the punctured rank) and revealed bits, kept or discarded, and the check tags."""
    return len(frames) * plan.leak_bits() + int(revealed.sum()) + check_bits


def _block_tag(frame_bits: list[np.ndarray], hash_key: int) -> bytes:
    joined = np.concatenate(frame_bits) if frame_bits else np.zeros(0, dtype=np.uint8)
    return bits_hash(joined, (hash_key,))[: BLOCK_TAG_BITS // 8]


def _kept_mask(count: int, frames, interleave: np.ndarray, discarded: np.ndarray) -> np.ndarray:
    """Positions of the (un-interleaved) key block that are in frames both sides keep."""
    kept = np.ones(count, dtype=bool)
    for f in discarded:
        kept[interleave[_frame_slice(frames, f)]] = False
    return kept


def _refuse_if_nothing_kept(frames: int, undecoded: np.ndarray, discarded: np.ndarray) -> None:
    """Both sides reach this verdict from the same public lists, with the same reason."""
    if discarded.size == frames:
        raise ReconciliationFailed(
            f"every LDPC frame was discarded, no key: {undecoded.size} of {frames} never "
            f"decoded after {LDPC_RETRIES} retries, {discarded.size - undecoded.size} decoded "
            "to a word whose hash differs from Alice's"
        )


def _frame_list(values, frames: int, what: str) -> np.ndarray:
    """A frame index list from the peer: strictly increasing, in range (else an abort)."""
    out = np.asarray(values, dtype=np.int64).reshape(-1)
    if out.size and (out[0] < 0 or out[-1] >= frames or np.any(np.diff(out) <= 0)):
        raise ReconciliationFailed(f"{what}: not a sorted list of frame indices < {frames}")
    return out


def qber_interval(
    qber_estimate: float, sample_bits: int, sigmas: tuple[float, float] | None = None
) -> tuple[float, float]:
    """(low, high) QBER the first attempt and the punctured reserve are sized for: the
    estimate -QBER_SIGMAS_LOW / +QBER_SIGMAS_HIGH binomial standard errors (or `sigmas`) of
    a sample of sample_bits (0: the estimate is taken as exact). The spread uses at least
    1 % QBER, so a small sample with no error still reserves for a few percent."""
    sigmas_low, sigmas_high = sigmas or (QBER_SIGMAS_LOW, QBER_SIGMAS_HIGH)
    q = min(max(qber_estimate, 1e-4), 0.5)
    if sample_bits <= 0:
        return q, q
    spread = math.sqrt(max(q, 0.01) * (1 - q) / sample_bits)
    low = max(q - sigmas_low * spread, 0.5 * q, 1e-3)
    return min(low, q), min(q + sigmas_high * spread, 0.2)


def _plan(
    count: int,
    qber_estimate: float,
    efficiency: float,
    sample_bits: int = 0,
    sigmas=None,
    frame_bits: int | None = None,
    ratio: int = ENTROPY_RATIO_ONE,
) -> ldpc.FramePlan:
    """Equal frames: as few as fit the block, each sized to it, so no frame is mostly
    padding (the syndrome length is the code's whatever the frame holds). Frames of
    `frame_bits`, default the block's (ldpc.frame_bits_for: longer for a larger block).
    ratio (entropy_ratio, in 1 / ENTROPY_RATIO_ONE): the frames are sized on
    efficiency x ratio, so the first syndromes leak that times h(q) per key bit, on the
    mother code that leak and the punctured reserve take (a higher rate than at
    efficiency: the same leak kept punctured on the lower-rate code decoded worse, f
    +0.005-0.013 on full micius-2017 passes; docs/distillation.md, "Alice sizes on the
    bits' entropies"). The reserve's reach falls with it: efficiency x ratio +
    RETRY_RESERVE_F of h(q), which _entropy_ratio_floor bounds."""
    efficiency = efficiency * ratio / ENTROPY_RATIO_ONE  # the same float on both sides
    low, high = qber_interval(qber_estimate, sample_bits, sigmas)
    n = frame_bits or ldpc.frame_bits_for(count, low, efficiency, high)
    most = ldpc.max_key_bits(low, efficiency, n, qber_high=high)
    frames = max(1, math.ceil(count / most))
    return ldpc.plan_for(
        low, efficiency, n=n, key_bits=max(1, math.ceil(count / frames)), qber_high=high
    )


def _parity_groups(code: ldpc.Code, punctured_now: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Checks whose combined parity does not involve a punctured bit: (singles, pairs).
    singles: the checks with no punctured neighbour; pairs (k x 2): the two checks of a
    punctured degree-2 bit when it is their only punctured neighbour (the untainted
    puncturing of the staircase gives every check exactly one once p >= m / 2, so
    singles alone can run out). In a graph without 4-cycles the two checks share no
    other bit."""
    punctured = np.zeros(code.n, dtype=bool)
    punctured[punctured_now] = True
    checks = _edge_checks(code)
    edges = np.nonzero(punctured[code.check_var])[0]
    per_check = np.bincount(checks[edges], minlength=code.m)
    variable, check = code.check_var[edges], checks[edges]
    two = np.bincount(variable, minlength=code.n)[variable] == 2
    order = np.argsort(variable[two], kind="stable")
    pairs = check[two][order].reshape(-1, 2)
    pairs = pairs[(per_check[pairs[:, 0]] == 1) & (per_check[pairs[:, 1]] == 1)]
    return np.nonzero(per_check == 0)[0], pairs


def _kept(store: dict, name, limit: int, make):
    """store[name], made by make() the first time and kept (arrays a part reuses: made
    read-only by make); the store emptied once it holds `limit` names."""
    out = store.get(name)
    if out is None:
        out = make()
        if len(store) >= limit:
            store.clear()
        store[name] = out
    return out


def _read_only(*arrays: np.ndarray) -> None:
    for array in arrays:
        array.flags.writeable = False


def _layout_name(plan: ldpc.FramePlan, used: int) -> tuple:
    """What a frame's layout depends on: the code, p and s apart (shortened from the end,
    p + s does not fix it), which side of ldpc.SHORTEN_FROM_END_BELOW_RATE the plan takes
    (a bound moved at run time) and the frame's key bits."""
    return (
        plan.code.digest(),
        plan._shortened_from_end(),
        plan.punctured,
        plan.shortened,
        int(used),
    )


_EDGE_CHECKS: dict[str, np.ndarray] = {}


def _edge_checks(code: ldpc.Code) -> np.ndarray:
    """The check of every edge (read-only), made once per code: Bob measures the QBER two
    or three times a block, and the repeat over 0.3-0.6 M edges was ~45 ms each."""

    def make():
        out = np.repeat(np.arange(code.m), np.diff(code.check_ptr))
        _read_only(out)
        return out

    return _kept(_EDGE_CHECKS, code.digest(), 16, make)


@dataclass(frozen=True)
class _KeyEdges:
    """A frame layout's key bits on the code's graph (read-only): per check its number of
    key bits, and the edges that touch a key bit (their variables and checks, in edge
    order). What Bob's QBER measurement recomputed from the 0.5-1.1 M edges at every
    call (two to five a block, each ~30 ms of it); they depend on the code, the plan's
    punctured and shortened counts and the frame's key bits only."""

    per_check: np.ndarray
    variables: np.ndarray
    checks: np.ndarray


_KEY_EDGES: dict[tuple, _KeyEdges] = {}


def _key_edges(plan: ldpc.FramePlan, used: int) -> _KeyEdges:
    code = plan.code

    def make():
        key_pos, _ = _frame_layout(plan, used)
        is_key = np.zeros(code.n, dtype=np.int64)
        is_key[key_pos] = 1
        on_edges = is_key[code.check_var]
        per_check = np.add.reduceat(on_edges, code.check_ptr[:-1])
        edge_key = on_edges == 1
        variables = code.check_var[edge_key].astype(np.int64)  # one kernel signature
        out = _KeyEdges(per_check, variables, _edge_checks(code)[edge_key])
        _read_only(out.per_check, out.variables, out.checks)
        return out

    # a block's one or two frame lengths, ~18 MB each
    return _kept(_KEY_EDGES, _layout_name(plan, used), 4, make)


def _syndrome_qber(
    plan: ldpc.FramePlan,
    frames,
    syndromes,
    words,
    punctured_now,
    sample_qber=0.0,
    sample_bits=0,
) -> tuple[float, float]:
    """(Bob's estimate of the block's QBER, the lower end of its TOP_UP_SIGMAS interval)
    from the syndromes and the disclosed sample together. A parity over d of the frame's
    key bits (a check, or two checks whose punctured bit cancels: _parity_groups) differs
    from Alice's with probability (1 - (1 - 2q)^d) / 2; the maximum-likelihood q of all
    of them is the syndromes' estimate. words: Bob's frames, his key bits and every bit
    he knows exactly (zeros, revealed bits), which carry no error.
    Its spread is not what that likelihood says: the parities are not independent (a
    check holds ~27 degree-80 bits, each on 80 checks), so the estimate weighs every
    erroneous bit by its degree, and few of the errors decide it (_syndrome_spread: +-4.8 %
    at 1.08 % QBER on 3 frames of 2^16, where the likelihood claims +-2.7 %). The spread
    is taken from the code instead, against the block's own error rate (what the top-up
    is for), and the likelihood's curvature is scaled to it (a composite likelihood); the
    sample's, to its spread about the block's rate. Bob computes it from what he has;
    nothing of it is sent (only the top-up steps chosen from it)."""
    code = plan.code
    singles, pairs = _parity_groups(code, punctured_now)
    layouts = {}
    for _, used in frames:
        if used not in layouts:
            key_edges = _key_edges(plan, used)
            per_check = key_edges.per_check
            degree = np.concatenate(
                [per_check[singles], per_check[pairs[:, 0]] + per_check[pairs[:, 1]]]
            )
            layouts[used] = (key_edges, degree)
    differ_all = code.syndrome(words) ^ syndromes
    size = 1 + max(int(d.max(initial=0)) for _, d in layouts.values())
    groups = np.zeros(size, dtype=np.int64)
    differ = np.zeros(size, dtype=np.int64)
    for f, (_, used) in enumerate(frames):
        d = layouts[used][1]
        z = np.concatenate(
            [differ_all[f, singles], differ_all[f, pairs[:, 0]] ^ differ_all[f, pairs[:, 1]]]
        )
        groups += np.bincount(d, minlength=size)
        differ += np.bincount(d, weights=z, minlength=size).astype(np.int64)
    key_bits = sum(used for _, used in frames)
    d = np.nonzero(groups[1:])[0] + 1
    grid = np.linspace(1e-4, 0.3, 3000)
    p = np.clip(0.5 * (1 - (1 - 2 * grid[:, None]) ** d[None, :]), 1e-12, 1 - 1e-12)
    loglik = (differ[d] * np.log(p) + (groups[d] - differ[d]) * np.log(1 - p)).sum(axis=1)
    errors = sample_qber * sample_bits
    sample_loglik = errors * np.log(grid) + (sample_bits - errors) * np.log(1 - grid)
    # the likelihood takes the parities as independent; they are not (the docstring), so
    # its curvature is scaled to the spread the code gives (_syndrome_spread, taken at the
    # joint maximum), as a composite likelihood is; the sample's, to its spread about the
    # block's own rate (its bits are not the block's)
    pilot = float(grid[np.argmax(loglik + sample_loglik)])
    if d.size:
        variance, info = _syndrome_spread(code, singles, pairs, layouts, frames, pilot, key_bits)
        loglik = loglik / (info * variance)
    if sample_bits:
        loglik = loglik + sample_loglik * key_bits / (key_bits + sample_bits)
    return _maximum_and_low_end(grid, loglik)


def _maximum_and_low_end(grid: np.ndarray, loglik: np.ndarray) -> tuple[float, float]:
    """The likelihood's maximum and the lower end of its TOP_UP_SIGMAS interval (where it
    has fallen by TOP_UP_SIGMAS^2 / 2; it is unimodal in q), both between grid points: the
    grid's step, 1e-4, is a fifth of the interval on 3 frames at 1 %, and rounding to it
    narrowed the interval by ~15 %."""
    top = int(np.argmax(loglik))
    best = float(grid[top])
    if 0 < top < grid.size - 1:  # the parabola through the maximum and its neighbours
        left, mid, right = loglik[top - 1 : top + 2]
        curvature = left - 2 * mid + right
        if curvature < 0:
            best += 0.5 * (left - right) / curvature * (grid[1] - grid[0])
    threshold = loglik[top] - 0.5 * TOP_UP_SIGMAS**2
    i = int(np.nonzero(loglik >= threshold)[0][0])
    if i == 0:
        return float(best), float(grid[0])
    rise = (threshold - loglik[i - 1]) / (loglik[i] - loglik[i - 1])
    return float(best), float(grid[i - 1] + rise * (grid[i] - grid[i - 1]))


@numba.njit(cache=True)
def _key_edge_weight_sums(variables, checks, weight, n):
    """Per variable, the sum over its key edges of their checks' weights, and of their
    squares: np.bincount(variables, weights=weight[checks]) and the same of the squared
    weights, the same additions in the same (edge) order, in one pass over the ~1 M key
    edges without their three temporaries (~3x faster)."""
    per_var = np.zeros(n)
    per_var_sq = np.zeros(n)
    for e in range(variables.size):
        w = weight[checks[e]]
        per_var[variables[e]] += w
        per_var_sq[variables[e]] += w * w
    return per_var, per_var_sq


def _syndrome_spread(code, singles, pairs, layouts, frames, q, key_bits):
    """(variance, the likelihood's information I) at q. The variance is that of the
    syndromes' maximum-likelihood QBER minus the block's own error rate, linearised at q
    (delta method) with the parities' covariances. The score is
    U = sum_g a_g (z_g - p_g), a_g = p_g' / (p_g (1 - p_g)), p_g = (1 - b_g) / 2,
    b_g = (1 - 2q)^d_g; the likelihood's information I = sum_g a_g p_g'. Two parities
    sharing a key bit have covariance b_g b_h ((1 - 2q)^-2 - 1) / 4 (one bit shared; j bits
    count j times, right to first order in q), so the pairs' sum is, per key bit v,
    (sum_{g on v} a_g b_g)^2 - sum_{g on v} (a_g b_g)^2. A parity and one of its key bits
    covary by q (1 - q) (1 - 2q)^(d - 1). Then var(q^ - rate) = var(U) / I^2
    - 2 cov(U, rate) / I + var(rate), rate = errors / key_bits."""
    t = 1 - 2 * q
    kappa = (t**-2 - 1) / 4
    info = var_u = cov = 0.0
    # frames of the same length have the same sums: each length once, times its frames
    lengths, counts = np.unique([used for _, used in frames], return_counts=True)
    for used, times in zip(lengths.tolist(), counts.tolist(), strict=True):
        key_edges, degree = layouts[used]
        b = t ** degree.astype(np.float64)
        p = np.clip((1 - b) / 2, 1e-12, 0.5)
        dp = degree * t ** np.maximum(degree - 1, 0)
        a = dp / (p * (1 - p))
        info += times * float(np.sum(a * dp))
        var_u += times * float(np.sum(a * a * p * (1 - p)))
        cov += times * float(np.sum(a * degree * b)) * q * (1 - q) / t
        # each check's weight a_g b_g (a pair's on both of its checks: they share no key bit)
        weight = np.zeros(code.m)
        ab = a * b
        weight[singles] = ab[: singles.size]
        weight[pairs[:, 0]] = ab[singles.size :]
        weight[pairs[:, 1]] = ab[singles.size :]
        per_var, per_var_sq = _key_edge_weight_sums(
            key_edges.variables, key_edges.checks, weight, code.n
        )
        var_u += times * kappa * float(np.sum(per_var * per_var - per_var_sq))
    if info <= 0:
        return 1.0, 1.0
    cov /= key_bits
    variance = var_u / info**2 - 2 * cov / info + q * (1 - q) / key_bits
    return max(variance, 1e-3 * q * q), info


def _interleave(count: int) -> np.ndarray:
    """Public permutation applied to the key string before it is cut into frames. The QBER
    drifts over a pass (it rises at low elevation, where the signal falls towards the
    background), so contiguous frames would each see a different error rate than the
    one the code is sized for; interleaved frames all see the block's average.
    Read-only, and kept for the next block of the same size (_public_permutation)."""
    return _shared_permutation(0x1EAF, count)


_PERMUTATION_LOCK = threading.Lock()


def _shared_permutation(seed: int, count: int) -> np.ndarray:
    """_public_permutation, drawn once when both endpoints of one process ask for it at
    the same moment (they do, at each block's start): the second waits for the first's
    instead of drawing it too (lru_cache alone let both draw: ~45 ms of CPU each for the
    30 s jinan-1 pass's 1 M bits, twice or three times a pass)."""
    with _PERMUTATION_LOCK:
        return _public_permutation(seed, count)


@functools.lru_cache(maxsize=4)
def _public_permutation(seed: int, count: int) -> np.ndarray:
    """np.random.default_rng(seed).permutation(count), made once per (seed, count): a 1 M
    permutation is 45-90 ms of one core, and both endpoints drew it for every block
    (0.2-0.5 s of a block's wall time with the two in one process under load), while the
    streaming pipeline's chunks, and a pass's blocks, repeat their sizes."""
    out = np.random.default_rng(seed).permutation(count)
    _read_only(out)
    return out


def _frames(count: int, plan: ldpc.FramePlan) -> list[tuple[int, int]]:
    per = plan.key_bits
    return [(start, min(per, count - start)) for start in range(0, count, per)]


def _reveal_order(plan: ldpc.FramePlan, used: int) -> np.ndarray:
    """Positions revealed on the top-up and the retries: Alice's punctured random bits
    first (each costs at most one bit of leak and tells Bob the most), the last punctured
    first, so that what stays punctured is the untainted part (every other staircase bit,
    ldpc._public_order), which decodes best; then key positions."""
    return np.concatenate([plan.punctured_positions[::-1], plan.key_order[:used]])


_FRAME_LAYOUTS: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def _frame_layout(plan: ldpc.FramePlan, used: int) -> tuple[np.ndarray, np.ndarray]:
    """(key positions used by this frame, ascending; positions known to be zero), both
    read-only. Made once per (plan, used): a block's frames take one or two values of
    used, and each side lays every frame out several times a part (24 layouts, ~12 ms of
    Bob's ~530 ms on a 1 M-bit block at 2 %)."""

    def make():
        key_order = plan.key_order
        key_pos = ldpc.ascending(key_order[:used], plan.code.n)
        zero_pos = np.concatenate([plan.shortened_positions, key_order[used:]])
        _read_only(key_pos, zero_pos)
        return key_pos, zero_pos

    # ~1 MB each at 2^17; a part needs one or two
    return _kept(_FRAME_LAYOUTS, _layout_name(plan, used), 16, make)


def _ldpc_alice_part(
    channel,
    key: np.ndarray,
    qber_estimate: float,
    efficiency: float,
    rng,
    sample_bits: int = 0,
    sigmas: tuple[float, float] | None = None,
    frame_bits: int | None = None,
) -> tuple:
    """Alice's half of one part (see ldpc_alice): (kept, stats), kept a mask over `key` of
    the bits in frames both sides keep (Bob announces the discarded frames; dropping a
    frame only shrinks the key, so Alice can follow him, after checking he dropped at
    least the frames he gave up on).
    The discarded frames' bits are then disclosed: they are no longer key.
    sample_bits: the size of the sample behind qber_estimate (0: exact), sigmas the
    interval's width in its standard errors (default QBER_SIGMAS_LOW / HIGH), see _plan;
    frame_bits the frames' length (default: the block's, ldpc.frame_bits_for).
    efficiency is scaled by Bob's announced entropy ratio (ec_sizing, entropy_ratio)."""
    # an integer, checked before any syndrome: no rounding of a float or a string (which
    # would plan on a ratio Bob did not name), no exception other than a refusal
    ratio = channel.recv("ec_sizing").get("entropy_ratio")
    floor = _entropy_ratio_floor(efficiency)
    if type(ratio) is not int or not floor <= ratio <= ENTROPY_RATIO_ONE:
        raise ReconciliationFailed(
            f"ec_sizing: entropy ratio {ratio!r} / {ENTROPY_RATIO_ONE}, not an integer in "
            f"[{floor}, {ENTROPY_RATIO_ONE}]"
        )
    plan = _plan(key.size, qber_estimate, efficiency, sample_bits, sigmas, frame_bits, ratio)
    code = plan.code
    frames = _frames(key.size, plan)
    interleave = _interleave(key.size)
    count = key.size
    key = key[interleave]
    words = np.zeros((len(frames), code.n), dtype=np.uint8)
    for f, (start, used) in enumerate(frames):
        key_pos, _ = _frame_layout(plan, used)
        words[f, key_pos] = key[start : start + used]
        words[f, plan.punctured_positions] = rng.integers(0, 2, plan.punctured, dtype=np.uint8)
    syndromes = code.syndrome(words)
    channel.send(
        "ec_syndromes",
        frames=len(frames),
        code=code.digest(),
        syndromes=pack_bits(syndromes.reshape(-1)),
    )
    revealed = np.zeros(len(frames), dtype=np.int64)

    def reveal(pending: np.ndarray, step: int) -> None:
        values = []
        for f in pending:
            order = _reveal_order(plan, frames[f][1])
            pos = order[revealed[f] : revealed[f] + step]
            # a short last frame can run out of positions: pad (the leak counts full steps)
            values.append(np.pad(words[f, pos], (0, step - pos.size)))
            revealed[f] += step
        channel.send("ec_reveal", values=pack_bits(np.concatenate(values)))

    # Bob's top-ups before his first decoding: the same step for every frame, up to two,
    # ended by a step of 0
    first_step = 0
    top_up_messages = 0
    for top_ups in range(3):
        step = int(channel.recv("ec_top_up")["step"])
        top_up_messages += 1
        if not 0 <= step <= code.n:
            raise ReconciliationFailed(f"ec_top_up: step {step} out of range")
        if not step:
            break
        if top_ups == 2:  # refused before anything of it is revealed
            raise ReconciliationFailed("ec_top_up: more than two top-ups")
        reveal(np.arange(len(frames)), step)
        first_step += step
    status_messages = 0
    base_step = None
    while True:
        msg = channel.recv("ec_status")
        status_messages += 1
        failed = _frame_list(msg["failed"], len(frames), "ec_status")
        if failed.size == 0:
            break
        step = int(msg["step"])
        if not 0 < step <= code.n:
            raise ReconciliationFailed(f"ec_status: step {step} out of range")
        if base_step is None:  # the first retry may already be widened (_retry_step)
            base_step = max(1, step // _tail_widening(failed.size, len(frames)))
        # the leak counts one step for all retries (_bob_messages_bits): they must follow
        if step != _retry_step(base_step, status_messages - 1, failed.size, len(frames)):
            raise ReconciliationFailed(f"ec_status: step {step} off the retry schedule")
        reveal(failed, step)
    # Check of the frames Bob decoded, under a key drawn only now (after Bob's decoder has
    # fixed its output, so the wrong words cannot depend on it): one tag of them all, and
    # per-frame tags only if Bob finds that it differs.
    undecoded = _frame_list(msg["undecoded"], len(frames), "ec_status undecoded")
    decoded = np.setdiff1d(np.arange(len(frames)), undecoded)
    hash_key = int(rng.integers(0, 2**64, dtype=np.uint64))
    decoded_bits = [key[_frame_slice(frames, f)] for f in decoded]
    channel.send(
        "ec_verify",
        key=np.array([hash_key], dtype=np.uint64),
        tag=_block_tag(decoded_bits, hash_key),
    )
    frame_tags_sent = not bool(channel.recv("ec_check")["match"])
    if frame_tags_sent:
        tags = _frame_tags(decoded_bits, hash_key)
        channel.send("ec_frame_tags", tags=b"".join(tags))
        discarded = _frame_list(channel.recv("ec_discard")["frames"], len(frames), "ec_discard")
        if np.setdiff1d(undecoded, discarded).size:
            raise ReconciliationFailed("Bob keeps LDPC frames he reported as not decoded")
    else:
        discarded = undecoded
    bob_bits = _bob_messages_bits(
        len(frames), code.n, status_messages, top_up_messages, frame_tags_sent
    )
    leak = _ldpc_leak(plan, frames, revealed, _check_bits(decoded, frame_tags_sent)) + bob_bits
    _refuse_if_nothing_kept(len(frames), undecoded, discarded)
    if discarded.size:
        # Out of the key now: disclosed like the estimation sample, so that Bob knows every
        # error of the block and the error counts are not biased by which frames failed.
        dropped = [key[_frame_slice(frames, f)] for f in discarded]
        channel.send("ec_discarded_bits", bits=pack_bits(np.concatenate(dropped)))
    kept = _kept_mask(count, frames, interleave, discarded)
    return kept, {
        "leak_bits": leak,
        "frames": len(frames),
        "frame_bits": code.n,
        "frame_errors": int(np.sum(revealed > first_step)),
        "frames_discarded": int(discarded.size),
        "bits_discarded": int(count - kept.sum()),
        "sizing_entropy_ratio": ratio / ENTROPY_RATIO_ONE,
    }


def _ldpc_bob_part(
    channel,
    bits: np.ndarray,
    qber_estimate: float,
    efficiency: float,
    sample_bits: int = 0,
    sigmas: tuple[float, float] | None = None,
    top_up_f: float | None = None,
    frame_bits: int | None = None,
    noise_share: np.ndarray | None = None,
) -> tuple:
    """Bob's half of one part (see ldpc_bob): (corrected, kept, stats). Frames that do not
    decode within the retries, or whose decoded key bits hash differently from Alice's,
    are discarded: `kept` masks them out of the key. Alice then discloses their bits, so
    `corrected` is her whole string (the kept part verified by the check tags, and later
    the block hash).
    First Bob measures the QBER from the syndromes and asks for what the frames need
    (LDPC_FIRST_F), then decodes, then retries in fine steps the frames that failed."""
    interleave = _interleave(bits.size)
    bits = bits[interleave]
    channel_model = noise_model.BitErrorModel(
        None if noise_share is None else noise_share[interleave]
    )
    # the first syndromes sized on the bits' mean entropy (entropy_ratio), announced first
    low = qber_interval(qber_estimate, sample_bits, sigmas)[0]
    ratio = entropy_ratio(channel_model, low, efficiency)
    channel.send("ec_sizing", entropy_ratio=ratio)
    plan = _plan(bits.size, qber_estimate, efficiency, sample_bits, sigmas, frame_bits, ratio)
    code = plan.code
    frames = _frames(bits.size, plan)
    msg = channel.recv("ec_syndromes")
    if msg["code"] != code.digest() or int(msg["frames"]) != len(frames):
        raise ReconciliationFailed("LDPC code or frame count differs between Alice and Bob")
    syndromes = unpack_bits(msg["syndromes"], len(frames) * code.m).reshape(len(frames), code.m)
    words = np.zeros((len(frames), code.n), dtype=np.uint8)  # every bit Bob knows
    for f, (start, used) in enumerate(frames):
        words[f, _frame_layout(plan, used)[0]] = bits[start : start + used]
    llr = np.zeros((len(frames), code.n), dtype=np.float32)
    out = np.zeros((len(frames), code.n), dtype=np.uint8)
    iters = np.zeros(len(frames), dtype=np.int64)
    revealed = np.zeros(len(frames), dtype=np.int64)
    punctured_order = _reveal_order(plan, 0)  # the punctured part, in reveal order

    def request(pending: np.ndarray, step: int) -> None:
        values = unpack_bits(channel.recv("ec_reveal")["values"], pending.size * step)
        for i, f in enumerate(pending):
            order = _reveal_order(plan, frames[f][1])
            pos = order[revealed[f] : revealed[f] + step]
            v = values[i * step : i * step + pos.size]
            llr[f, pos] = np.where(v == 1, -ldpc.LLR_KNOWN, ldpc.LLR_KNOWN)
            words[f, pos] = v
            revealed[f] += step

    def measure() -> tuple[float, float]:
        q, low = _syndrome_qber(
            plan,
            frames,
            syndromes,
            words,
            punctured_order[revealed[0] :],
            qber_estimate,
            sample_bits,
        )
        return min(max(q, 1e-3), 0.25), min(max(low, 1e-3), 0.25)

    pending = np.arange(len(frames))
    retries = 0
    decoder_seconds = 0.0
    # Top-up before decoding: the first syndromes were sized for the low end of the
    # sample's QBER interval; bring every frame to LDPC_FIRST_F h(measured), in whole base
    # steps (so the steps Bob chooses from his data take few values), at most the
    # punctured reserve (beyond it a revealed key bit is worth less than a syndrome bit;
    # the fine retries decide how far each frame really needs to go). The first round
    # reveals at most the punctured bits beyond the untainted ones (a small block's reserve
    # can exceed them): each revealed bit frees checks from punctured neighbours, so the
    # second measurement, on many more parities, decides the rest. The top-up is sized for
    # the low end of the measurement's likelihood interval (TOP_UP_SIGMAS): on a small
    # block few parities are free of punctured bits and the estimate ran 15 % high,
    # which the top-up then leaked (f 1.19 on 80 k bits at 1.3 %).
    measured, measured_low = measure()
    untainted = plan.untainted_punctured()
    first_step = 0
    top_up_messages = 0
    for top_up in range(2):
        h = channel_model.entropy(measured)
        base_step = max(4, math.ceil(LDPC_REVEAL_STEP_F * plan.key_bits * h))
        cap = plan.punctured - first_step
        if top_up == 0 and plan.punctured > untainted:
            cap = plan.punctured - untainted
        first_f = _first_f(code.n) if top_up_f is None else top_up_f
        target = first_f * channel_model.entropy(measured_low) * plan.key_bits
        missing = min(target - plan.leak_bits() - first_step, cap)
        step = base_step * math.ceil(missing / base_step) if missing > 0 else 0
        channel.send("ec_top_up", step=step)
        top_up_messages += 1
        if not step:
            break
        request(pending, step)
        first_step += step
        measured, measured_low = measure()
    else:
        channel.send("ec_top_up", step=0)
        top_up_messages += 1
    h = channel_model.entropy(measured)
    base_step = max(4, math.ceil(LDPC_REVEAL_STEP_F * plan.key_bits * h))
    magnitude = channel_model.llr_magnitudes(measured)
    for f, (start, used) in enumerate(frames):
        key_pos, zero_pos = _frame_layout(plan, used)
        m = magnitude if np.ndim(magnitude) == 0 else magnitude[start : start + used]
        llr[f, key_pos] = np.where(bits[start : start + used] == 1, -m, m)
        llr[f, zero_pos] = ldpc.LLR_KNOWN
    buffers = ldpc.MESSAGE_BUFFERS  # given back to the pool it came from
    messages = buffers.take(len(frames), code.edges)
    try:
        for attempt in range(LDPC_RETRIES + 1):
            started = time.perf_counter()
            ok = _decode_round(
                pending,
                llr,
                syndromes,
                code,
                LDPC_MAX_ITERATIONS if attempt == 0 else LDPC_RETRY_ITERATIONS,
                messages,
                out,
                iters,
                len(frames),
                attempt,
            )
            decoder_seconds += time.perf_counter() - started
            pending = pending[~ok]
            if pending.size == 0 or attempt == LDPC_RETRIES:
                break
            retries += 1
            step = _retry_step(base_step, attempt, pending.size, len(frames))
            channel.send("ec_status", failed=pending.astype(np.int32), step=step)
            request(pending, step)
    finally:
        buffers.give(messages)  # wiped, also when the part aborts
        del messages
    undecoded = pending
    channel.send(
        "ec_status",
        failed=np.zeros(0, dtype=np.int32),
        step=0,
        undecoded=undecoded.astype(np.int32),
    )
    corrected = np.empty_like(bits)
    for f, (_, used) in enumerate(frames):
        key_pos, _ = _frame_layout(plan, used)
        corrected[interleave[_frame_slice(frames, f)]] = out[f, key_pos]
    decoded = np.setdiff1d(np.arange(len(frames)), undecoded)
    msg = channel.recv("ec_verify")
    hash_key = np.asarray(msg["key"], dtype=np.uint64).reshape(-1)
    if hash_key.size != 1:
        raise ReconciliationFailed("ec_verify: expected one hash key")
    hash_key = int(hash_key[0])
    decoded_bits = [corrected[interleave[_frame_slice(frames, f)]] for f in decoded]
    # tags are compared in constant time (hmac.compare_digest), as every tag in host/distil
    match = hmac.compare_digest(bytes(msg["tag"]), _block_tag(decoded_bits, hash_key))
    channel.send("ec_check", match=int(match))
    differ, discarded = [], undecoded
    if not match:
        theirs = bytes(channel.recv("ec_frame_tags")["tags"])
        tag_bytes = FRAME_TAG_BITS // 8
        if len(theirs) != tag_bytes * decoded.size:
            raise ReconciliationFailed("ec_frame_tags: wrong number of frame tags")
        mine = _frame_tags(decoded_bits, hash_key)
        differ = [
            f
            for i, f in enumerate(decoded)
            if not hmac.compare_digest(mine[i], theirs[i * tag_bytes : (i + 1) * tag_bytes])
        ]
        discarded = np.union1d(undecoded, np.asarray(differ, dtype=np.int64)).astype(np.int64)
        channel.send("ec_discard", frames=discarded.astype(np.int32))
    _refuse_if_nothing_kept(len(frames), undecoded, discarded)
    if discarded.size:
        sizes = [frames[f][1] for f in discarded]
        alice = unpack_bits(channel.recv("ec_discarded_bits")["bits"], sum(sizes))
        for f, part in zip(discarded, np.split(alice, np.cumsum(sizes)[:-1]), strict=True):
            corrected[interleave[_frame_slice(frames, f)]] = part
    kept = _kept_mask(bits.size, frames, interleave, discarded)
    check_bits = _check_bits(decoded, not match)
    # ec_status: one per retry, and the final one with the undecoded frames
    bob_bits = _bob_messages_bits(len(frames), code.n, retries + 1, top_up_messages, not match)
    leak = _ldpc_leak(plan, frames, revealed, check_bits) + bob_bits
    stats = {
        "leak_bits": leak,
        "leak_bob_messages_bits": bob_bits,
        "top_up_messages": top_up_messages,
        "frames": len(frames),
        "frame_errors": int(np.sum(revealed > first_step)),
        "frames_discarded": int(discarded.size),
        "frames_undecoded": int(undecoded.size),
        "frames_hash_mismatch": len(differ),
        "bits_discarded": int(bits.size - kept.sum()),
        "leak_ec_check_bits": check_bits,
        "frame_tags_sent": not match,
        "frame_bits": code.n,
        "mother_rate": code.rate,
        "punctured": plan.punctured,
        "shortened": plan.shortened,
        "mean_iterations": float(iters.mean()) if iters.size else 0.0,
        "retry_rounds": retries,
        "decoder_seconds": decoder_seconds,
        "qber_measured": measured,
        # the syndrome the bits need at the Shannon limit under Bob's prior, against h(q)
        # (1 without noise shares): f / this ratio is f against that limit
        "noise_entropy_ratio": channel_model.entropy(measured) / binary_entropy(measured),
        "sizing_entropy_ratio": ratio / ENTROPY_RATIO_ONE,
        "first_request_bits": first_step,
        "revealed_bits": int(revealed.sum()),
    }
    return corrected, kept, stats


# A key block sized from a QBER sample (the first block of a pass: 8192 bits, +-10 % at
# 1.3 % QBER) needs a punctured reserve up to the sample interval's high end, and a
# heavily punctured code decodes worse and slower: on a 783,000-bit block at 1.28 % QBER
# the sample-sized block gave f 1.108-1.159 (sample off by -3 .. +3 standard errors) and
# 1.7-2.6x the decoder work of the same block sized from its exact QBER (f 1.10; micius,
# docs/distillation.md). So such a block is reconciled in two parts: first a probe, one
# frame of key bits at public random positions, sized from the sample; Bob then knows
# the probe's exact error count and announces it (ec_probe_errors, counted in the leak),
# and the rest of the block is sized from the probe and the sample together (~8x the
# sample's bits). Only blocks of at least PROBE_MIN_FRAMES frames: the second part's
# check tag and messages cost ~100 bits, too much on a small block. And only when the
# estimate comes from fewer bits than the probe holds: one from a previous block's or
# chunk's exact count (protocol, stream) is already as good as the probe would make it.
PROBE_MIN_FRAMES = 4
PROBE_QBER_FLOOR = 0.004  # as protocol._ec_sizing floors an estimate
# The rest's interval, in standard errors of the pooled estimate (~3.5 % of the QBER at
# 1.3 %): a narrower one than the sample's, since a frame that needs more than it still
# has the retry reserve (RETRY_RESERVE_F h, ~15 % in f) before key bits are revealed.
PROBE_SIGMAS = (1.0, 2.0)


def _probe_split(count: int, qber_estimate: float, efficiency: float, sample_bits: int):
    """The probe's positions in the block and the rest's (both sorted), or None when the
    block is reconciled whole: sized from an exact rate or from at least as many bits as
    the probe would add, or too few frames."""
    if not 0 < sample_bits < count:
        return None
    # one frame of the shortest length, whatever frames the block would take: its exact
    # error count is what the probe is for, and a 2^16 frame's (~8x an 8192-bit sample's)
    # already sizes the rest well; a long frame would reconcile more of the block on the
    # sample's poorer estimate
    plan = _plan(count, qber_estimate, efficiency, sample_bits, frame_bits=ldpc.FRAME_BITS)
    if math.ceil(count / plan.key_bits) < PROBE_MIN_FRAMES or sample_bits >= plan.key_bits:
        return None
    order = _shared_permutation(0x9B0BE, count)
    return np.sort(order[: plan.key_bits]), np.sort(order[plan.key_bits :])


def _after_probe(errors: int, probe_bits: int, qber_estimate: float, sample_bits: int):
    """(estimate, bits behind it) for the rest of the block: the probe's exact count
    pooled with the sample's."""
    pooled = (errors + qber_estimate * sample_bits) / (probe_bits + sample_bits)
    return min(max(pooled, PROBE_QBER_FLOOR), 0.2), probe_bits + sample_bits


def _probe_errors_bits(probe_bits: int) -> int:
    """Leak of Bob's ec_probe_errors: a count in [0, probe_bits]."""
    return math.ceil(math.log2(probe_bits + 1))


_SUMMED = (
    "leak_bits",
    "leak_bob_messages_bits",
    "top_up_messages",
    "frames",
    "frame_errors",
    "frames_discarded",
    "frames_undecoded",
    "frames_hash_mismatch",
    "bits_discarded",
    "leak_ec_check_bits",
    "retry_rounds",
    "decoder_seconds",
    "first_request_bits",
    "revealed_bits",
)


def _merged(probe: dict, rest: dict, probe_bits: int) -> dict:
    """One block's stats from its two parts: counts summed, the code and QBER of the rest
    (the bulk), each part's own stats under "parts"."""
    out = dict(rest)
    for name in _SUMMED:
        if name in rest:
            out[name] = probe[name] + rest[name]
    extra = _probe_errors_bits(probe_bits)
    out["leak_bits"] += extra
    if "leak_bob_messages_bits" in out:
        out["leak_bob_messages_bits"] += extra
        frames = out["frames"]
        out["mean_iterations"] = (
            probe["mean_iterations"] * probe["frames"] + rest["mean_iterations"] * rest["frames"]
        ) / max(frames, 1)
        out["frame_tags_sent"] = probe["frame_tags_sent"] or rest["frame_tags_sent"]
    out["probe_bits"] = probe_bits
    out["parts"] = [probe, rest]
    return out


def ldpc_alice(
    channel,
    key: np.ndarray,
    qber_estimate: float,
    efficiency: float,
    rng,
    sample_bits: int = 0,
    frame_bits: int | None = None,
) -> tuple:
    """Alice's half: (kept, stats), kept a mask over `key` of the bits in frames both sides
    keep. A block sized from a sample goes in two parts, a probe first (_probe_split).
    frame_bits: the frames' length (the probe's stays ldpc.FRAME_BITS; default the block's,
    ldpc.frame_bits_for); both sides must pass the same (the stream's request names it)."""
    split = _probe_split(key.size, qber_estimate, efficiency, sample_bits)
    if split is None:
        return _ldpc_alice_part(
            channel, key, qber_estimate, efficiency, rng, sample_bits, frame_bits=frame_bits
        )
    probe, rest = split
    kept = np.empty(key.size, dtype=bool)
    kept[probe], probe_stats = _ldpc_alice_part(
        channel, key[probe], qber_estimate, efficiency, rng, sample_bits
    )
    msg = channel.recv("ec_probe_errors")
    errors = int(msg["errors"])
    if int(msg["bits"]) != probe.size or not 0 <= errors <= probe.size:
        raise ReconciliationFailed(
            f"ec_probe_errors: {errors} of {int(msg['bits'])} bits for a {probe.size}-bit probe"
        )
    estimate, bits = _after_probe(errors, probe.size, qber_estimate, sample_bits)
    kept[rest], rest_stats = _ldpc_alice_part(
        channel, key[rest], estimate, efficiency, rng, bits, PROBE_SIGMAS, frame_bits
    )
    return kept, _merged(probe_stats, rest_stats, probe.size)


def ldpc_bob(
    channel,
    bits: np.ndarray,
    qber_estimate: float,
    efficiency: float,
    sample_bits: int = 0,
    top_up_f: float | None = None,
    frame_bits: int | None = None,
    noise_share: np.ndarray | None = None,
) -> tuple:
    """Bob's half: (corrected, kept, stats); see _ldpc_bob_part. A block sized from a
    sample goes in two parts (_probe_split): after the probe Bob announces its exact error
    count, and the rest is sized from it. top_up_f: the f Bob's top-up brings every frame
    to before the first decoding (default _first_f: lower for long frames, less leak for
    more decoding; the stream, whose latency is the decoder's, passes LDPC_FIRST_F). Bob's
    choice alone: Alice accepts any top-up step, and the leak counts what is revealed.
    frame_bits: as ldpc_alice's (the same on both sides)."""
    split = _probe_split(bits.size, qber_estimate, efficiency, sample_bits)
    if split is None:
        return _ldpc_bob_part(
            channel,
            bits,
            qber_estimate,
            efficiency,
            sample_bits,
            top_up_f=top_up_f,
            frame_bits=frame_bits,
            noise_share=noise_share,
        )
    probe, rest = split
    corrected = np.empty_like(bits)
    kept = np.empty(bits.size, dtype=bool)
    corrected[probe], kept[probe], probe_stats = _ldpc_bob_part(
        channel,
        bits[probe],
        qber_estimate,
        efficiency,
        sample_bits,
        top_up_f=top_up_f,
        noise_share=None if noise_share is None else noise_share[probe],
    )
    # every error of the probe is known: its discarded frames' bits were disclosed
    errors = int(np.count_nonzero(corrected[probe] != bits[probe]))
    channel.send("ec_probe_errors", errors=errors, bits=int(probe.size))
    estimate, sized_bits = _after_probe(errors, probe.size, qber_estimate, sample_bits)
    corrected[rest], kept[rest], rest_stats = _ldpc_bob_part(
        channel,
        bits[rest],
        estimate,
        efficiency,
        sized_bits,
        PROBE_SIGMAS,
        top_up_f,
        frame_bits,
        noise_share=None if noise_share is None else noise_share[rest],
    )
    stats = _merged(probe_stats, rest_stats, probe.size)
    stats["probe_errors"] = errors
    return corrected, kept, stats


# ------------------------------------------------------------------ Cascade

CASCADE_PASSES = 4


def _cascade_layout(count: int, qber: float, seed: int):
    """Per pass: a public permutation and the block size (Martinez-Mateo 2015: k1 = 0.73/q,
    doubling each pass)."""
    rng = np.random.default_rng(seed)
    k1 = max(4, int(0.73 / max(qber, 1e-3)))
    layout = []
    for p in range(CASCADE_PASSES):
        perm = np.arange(count) if p == 0 else rng.permutation(count)
        layout.append((perm, min(count, k1 << p)))
    return layout


def _block_parities(bits_perm: np.ndarray, size: int) -> np.ndarray:
    pad = (-bits_perm.size) % size
    padded = np.concatenate([bits_perm, np.zeros(pad, dtype=np.uint8)])
    return np.bitwise_xor.reduce(padded.reshape(-1, size), axis=1)


def cascade_alice(channel, key: np.ndarray, qber_estimate: float, seed: int) -> dict:
    """Alice answers parity queries: ranges [start, stop) in a pass's permuted order."""
    layout = _cascade_layout(key.size, qber_estimate, seed)
    permuted = [key[perm] for perm, _ in layout]
    prefix = [np.concatenate([[0], np.cumsum(b, dtype=np.int64)]) & 1 for b in permuted]
    sent = 0
    while True:
        msg = channel.recv("cascade_query")
        if int(msg["done"]):
            break
        passes, starts, stops = msg["passes"], msg["starts"], msg["stops"]
        parities = np.empty(passes.size, dtype=np.uint8)
        for p in np.unique(passes):
            sel = passes == p
            parities[sel] = (prefix[p][stops[sel]] ^ prefix[p][starts[sel]]).astype(np.uint8)
        sent += passes.size
        channel.send("cascade_parities", parities=pack_bits(parities))
    return {"leak_bits": sent, "frames": 0, "frame_errors": 0}


def cascade_bob(channel, bits: np.ndarray, qber_estimate: float, seed: int) -> tuple:
    """Bob drives Cascade; every query round is one message each way. Bob's own parities are
    never sent (he compares locally), but the ranges he asks about depend on where his
    parities differ, so each query also discloses one of Bob's parities: counted too."""
    count = bits.size
    layout = _cascade_layout(count, qber_estimate, seed)
    work = bits.copy()
    inverse = [np.argsort(perm) for perm, _ in layout]
    asked = 0
    rounds = 0

    def query(passes, starts, stops):
        nonlocal asked, rounds
        channel.send(
            "cascade_query",
            done=0,
            passes=passes.astype(np.int8),
            starts=starts.astype(np.int64),
            stops=stops.astype(np.int64),
        )
        asked += passes.size
        rounds += 1
        return unpack_bits(channel.recv("cascade_parities")["parities"], passes.size)

    def local_parity(p, starts, stops):
        permuted = work[layout[p][0]]
        prefix = np.concatenate([[0], np.cumsum(permuted, dtype=np.int64)]) & 1
        return (prefix[stops] ^ prefix[starts]).astype(np.uint8)

    def binary_search(p_arr, lo, hi):
        """Find one error in each odd-parity range; flip it. Returns flipped positions."""
        while True:
            active = hi - lo > 1
            if not active.any():
                break
            mid = (lo + hi) // 2
            idx = np.nonzero(active)[0]
            alice = query(p_arr[idx], lo[idx], mid[idx])
            mine = np.empty(idx.size, dtype=np.uint8)
            for p in np.unique(p_arr[idx]):
                sel = p_arr[idx] == p
                mine[sel] = local_parity(p, lo[idx][sel], mid[idx][sel])
            left = alice != mine
            hi[idx[left]] = mid[idx[left]]
            lo[idx[~left]] = mid[idx[~left]]
        positions = np.array(
            [layout[p][0][i] for p, i in zip(p_arr, lo, strict=True)], dtype=np.int64
        )  # typed: a pass with no odd block gives an empty list, which must still index
        work[positions] ^= 1
        return positions

    alice_blocks = []  # per pass done: Alice's parity of each of its blocks (kept: public)
    for p, (_perm, size) in enumerate(layout):
        starts = np.arange(0, count, size)
        stops = np.minimum(starts + size, count)
        alice_blocks.append(query(np.full(starts.size, p), starts, stops))
        odd = alice_blocks[p] != local_parity(p, starts, stops)
        flipped = binary_search(np.full(int(odd.sum()), p), starts[odd].copy(), stops[odd].copy())
        # Cascade: each flip makes the blocks containing it odd again in every pass done,
        # this one included (a block of this pass that held two errors, even when it was
        # checked, is odd once a search in an earlier pass fixed one of them; skipping it
        # left the other error in the key). Alice's block parities are known already:
        # compared, not asked again.
        while flipped.size and p > 0:
            ps, los, his = [], [], []
            for q in range(p + 1):
                size_q = layout[q][1]
                pos_q = np.unique(inverse[q][flipped] // size_q)
                st = pos_q * size_q
                sp = np.minimum(st + size_q, count)
                bad = alice_blocks[q][pos_q] != local_parity(q, st, sp)
                ps.append(np.full(int(bad.sum()), q))
                los.append(st[bad])
                his.append(sp[bad])
            p_arr = np.concatenate(ps)
            if p_arr.size == 0:
                break
            flipped = binary_search(p_arr, np.concatenate(los), np.concatenate(his))
    channel.send(
        "cascade_query",
        done=1,
        passes=np.zeros(0, np.int8),
        starts=np.zeros(0, np.int64),
        stops=np.zeros(0, np.int64),
    )
    # Alice's answers and the parity of Bob's that each query reveals: both directions.
    stats = {
        "leak_bits": 2 * asked,
        "leak_bits_alice_to_bob": asked,
        "leak_bits_bob_to_alice": asked,
        "frames": 0,
        "frame_errors": 0,
        "rounds": rounds,
    }
    return work, stats


# ------------------------------------------------------------------ warm-up

WARM_UP_QBER = 0.015  # a typical pass's (micius-2017 1.1-1.6 %, jinan-1 ~1-4 %)
WARM_UP_SAMPLE_BITS = 8192


class _PipeChannel:
    """One end of an in-process message pipe for the warm-up (no authentication: nothing
    crosses it but public throw-away bits)."""

    def __init__(self, transport):
        self.transport = transport

    def send(self, kind: str, **fields) -> None:
        from host.distil.channel import encode

        self.transport.send_bytes(encode(kind, fields))

    def recv(self, kind: str) -> dict:
        from host.distil.channel import decode

        got, fields = decode(self.transport.recv_bytes())
        if got != kind:
            raise ProtocolAborted(f"warm-up: expected {kind!r}, received {got!r}")
        return fields


def warm_up(efficiency: float) -> float:
    """LDPC error correction of one frame of throw-away bits (a public numpy generator: no
    key material) at WARM_UP_QBER, Alice's and Bob's halves in two threads of this process,
    twice. The first loads the decoders' machine code (numba's cache, or compiles it) and
    the code of that rate before the pass, not in the first chunk (1.3 s against 0.2 s for
    the second, measured at load ~8); the second's wall seconds are returned: a first
    measure of this machine under its present load (docs/streaming.md, "The link's
    end")."""
    _correct_throwaway_frame(efficiency)
    return _correct_throwaway_frame(efficiency)


def _correct_throwaway_frame(efficiency: float, frame_bits: int | None = None) -> float:
    """One block of throw-away bits through ldpc_alice / ldpc_bob: one frame of
    ldpc.FRAME_BITS, or with frame_bits (a longer length) the fewest key bits that take
    frames of it (ldpc.frame_bits_for: LONG_FRAME_MIN_FRAMES of them after the probe,
    sized from the probe's narrower interval, so one more). Its wall seconds."""
    import threading

    from host.distil.channel import queue_pair

    throwaway = np.random.default_rng(20261205)
    low, high = qber_interval(WARM_UP_QBER, WARM_UP_SAMPLE_BITS)
    if frame_bits is None:
        count = ldpc.max_key_bits(low, efficiency, qber_high=high)
    else:
        per_frame = ldpc.max_key_bits(low, efficiency, frame_bits, qber_high=high)
        count = (ldpc.LONG_FRAME_MIN_FRAMES + 1) * per_frame + ldpc.FRAME_BITS
    alice_bits = throwaway.integers(0, 2, count, dtype=np.uint8)
    flips = throwaway.random(count) < WARM_UP_QBER
    bob_bits = alice_bits ^ flips.astype(np.uint8)
    a_end, b_end = queue_pair(timeout_s=120.0)
    failed = []

    def alice():
        try:
            ldpc_alice(
                _PipeChannel(a_end), alice_bits, WARM_UP_QBER, efficiency, throwaway,
                WARM_UP_SAMPLE_BITS,
            )  # fmt: skip
        except Exception as error:  # reported below; Bob's side stops on the closed pipe
            failed.append(error)
        finally:
            a_end.close()

    t0 = time.perf_counter()
    thread = threading.Thread(target=alice, name="ec-warm-up", daemon=True)
    thread.start()
    try:
        ldpc_bob(_PipeChannel(b_end), bob_bits, WARM_UP_QBER, efficiency, WARM_UP_SAMPLE_BITS)
    finally:
        b_end.close()
        thread.join()
    if failed:
        raise failed[0]
    return time.perf_counter() - t0
