"""Rate-adaptive LDPC syndrome reconciliation: code construction, cache, BP decoder.

Codes: irregular, built in the project from a degree distribution by random socket
matching (seeded, so deterministic) with short (4-)cycles removed by edge swaps; cached as
.npz under the cache directory keyed by (n, rate, distribution, seed, version).
Rate adaptation (Elkouss et al. 2010): a frame of n code bits holds n - p - s key bits,
p punctured bits (Alice's private random bits, unknown to Bob: LLR 0) and s shortened
bits (value known to both: LLR +-inf); the effective rate is (R0 n - s)/(n - p - s).
Leak of a frame: the m syndrome bits minus rank(H_punctured) (the punctured bits are
uniform and independent, so they hide exactly that many syndrome bits), plus every bit
revealed on a retry.
Decoder: layered (check-serial) sum-product on LLRs, many frames in parallel
(numba prange over frames: both cores).
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np

CODE_VERSION = 5
FRAME_BITS = 65536
DESIGN_RATES = tuple(round(0.5 + 0.01 * i, 2) for i in range(46))  # 0.50 .. 0.95
# Mother codes on a finer grid than the designs (each uses the nearest design): a frame
# must puncture whatever the code's m exceeds the target leak by, and puncturing beyond the
# retry reserve costs efficiency (0.0025 n is ~0.02 in f at 2 % QBER; 0.01 n was ~0.07).
RATE_STEP = 0.0025
MOTHER_RATES = tuple(round(0.5 + RATE_STEP * i, 4) for i in range(181))  # 0.50 .. 0.95
# Punctured bits kept for the retry path, in units of the efficiency f: the retries can
# raise a frame's f by this much revealing punctured bits (each worth a syndrome bit)
# before they must reveal key bits (worth only 1 - R of one).
# At low QBER a bit is worth more f, and high-rate codes vary more from frame to frame, so
# the reserve is at least RETRY_RESERVE_MIN of the frame.
RETRY_RESERVE_F = 0.15
RETRY_RESERVE_MIN = 0.0095
LLR_KNOWN = 40.0

# Variable-node degree distributions (node perspective) per mother rate, from
# host/distil/ldpc_design.py (semi-Gaussian density evolution + LP, regenerate with
# `python -m host.distil.ldpc_design`); the degree-2 share forms the staircase. q* is
# the approximation's threshold, optimistic at high rates (there it exceeds capacity):
# the measured efficiency is in docs/distillation.md.
# fmt: off
DISTRIBUTIONS: dict[float, dict[int, float]] = {
    # mean check degree 10, q* 0.10616
    0.5: {2: 0.42835, 3: 0.3256, 7: 0.06385, 8: 0.12484, 30: 0.05736},
    # mean check degree 10, q* 0.10313
    0.51: {2: 0.42517, 3: 0.33097, 7: 0.0173, 8: 0.17351, 15: 0.00292, 30: 0.05013},
    # mean check degree 10.5, q* 0.10000
    0.52: {2: 0.41895, 3: 0.33105, 7: 0.04537, 8: 0.14762, 30: 0.05701},
    # mean check degree 10.5, q* 0.09697
    0.53: {2: 0.41588, 3: 0.33469, 7: 0.0304, 8: 0.16392, 25: 0.01565, 30: 0.03946},
    # mean check degree 11, q* 0.09415
    0.54: {2: 0.41151, 3: 0.33647, 7: 0.03093, 8: 0.16462, 30: 0.05647},
    # mean check degree 11.5, q* 0.09115
    0.55: {2: 0.40586, 3: 0.33683, 7: 0.05944, 8: 0.13634, 30: 0.06153},
    # mean check degree 11.5, q* 0.08832
    0.56: {2: 0.40252, 3: 0.34155, 7: 0.0247, 8: 0.17365, 20: 0.00266, 25: 0.00656, 30: 0.04837},
    # mean check degree 12, q* 0.08556
    0.57: {2: 0.3983, 3: 0.3434, 7: 0.02857, 8: 0.17086, 30: 0.05888},
    # mean check degree 12.5, q* 0.08272
    0.58: {2: 0.39294, 3: 0.3444, 7: 0.04798, 8: 0.15207, 30: 0.06262},
    # mean check degree 12.5, q* 0.07995
    0.59: {2: 0.38956, 3: 0.3489, 7: 0.02112, 8: 0.18113, 25: 0.01526, 30: 0.04403},
    # mean check degree 13, q* 0.07735
    0.6: {2: 0.38523, 3: 0.35219, 7: 0.00244, 8: 0.20107, 15: 0.00167, 30: 0.05741},
    # mean check degree 13.5, q* 0.07468
    0.61: {2: 0.37998, 3: 0.35392, 7: 0.00733, 8: 0.19868, 30: 0.06008},
    # mean check degree 14, q* 0.07208
    0.62: {2: 0.37582, 3: 0.3556, 7: 0.02004, 8: 0.18613, 30: 0.06241},
    # mean check degree 14.5, q* 0.06946
    0.63: {2: 0.37, 3: 0.3591, 7: 0.01819, 8: 0.18914, 30: 0.06358},
    # mean check degree 15, q* 0.06690
    0.64: {2: 0.36, 3: 0.37072, 7: 0.00401, 8: 0.20084, 30: 0.06444},
    # mean check degree 15.5, q* 0.06434
    0.65: {2: 0.35, 3: 0.3808, 8: 0.18753, 9: 0.0175, 30: 0.06416},
    # mean check degree 16, q* 0.06185
    0.66: {2: 0.34, 3: 0.39184, 8: 0.16563, 9: 0.03888, 30: 0.06365},
    # mean check degree 16.5, q* 0.05936
    0.67: {2: 0.33, 3: 0.40222, 8: 0.13716, 9: 0.06846, 30: 0.06216},
    # mean check degree 17, q* 0.05692
    0.68: {2: 0.32, 3: 0.41364, 8: 0.11126, 9: 0.09447, 30: 0.06062},
    # mean check degree 18, q* 0.05452
    0.69: {2: 0.31, 3: 0.42032, 8: 0.13959, 9: 0.06288, 30: 0.06721},
    # mean check degree 18.5, q* 0.05217
    0.7: {2: 0.3, 3: 0.43119, 8: 0.10065, 9: 0.10447, 30: 0.0637},
    # mean check degree 19.5, q* 0.04983
    0.71: {2: 0.29, 3: 0.43905, 8: 0.11374, 9: 0.08896, 30: 0.06824},
    # mean check degree 20, q* 0.04757
    0.72: {2: 0.28, 3: 0.45075, 8: 0.07186, 9: 0.13377, 30: 0.06363},
    # mean check degree 21, q* 0.04533
    0.73: {2: 0.27, 3: 0.45917, 8: 0.06992, 9: 0.13497, 30: 0.06595},
    # mean check degree 22, q* 0.04313
    0.74: {2: 0.26, 3: 0.46798, 8: 0.06256, 9: 0.14229, 30: 0.06716},
    # mean check degree 23, q* 0.04096
    0.75: {2: 0.25, 3: 0.47713, 8: 0.04997, 9: 0.15562, 30: 0.06727},
    # mean check degree 24, q* 0.03882
    0.76: {2: 0.24, 3: 0.48661, 8: 0.03194, 9: 0.1752, 30: 0.06625},
    # mean check degree 25.5, q* 0.03674
    0.77: {2: 0.23, 3: 0.49359, 8: 0.04153, 9: 0.16451, 30: 0.07038},
    # mean check degree 27, q* 0.03469
    0.78: {2: 0.22, 3: 0.50144, 8: 0.04535, 9: 0.16016, 30: 0.07306},
    # mean check degree 28.5, q* 0.03267
    0.79: {2: 0.21, 3: 0.50948, 8: 0.03769, 9: 0.16904, 30: 0.0738},
    # mean check degree 30, q* 0.03069
    0.8: {2: 0.2, 3: 0.51824, 8: 0.02255, 9: 0.18626, 30: 0.07295},
    # mean check degree 32, q* 0.02875
    0.81: {2: 0.19, 3: 0.52524, 8: 0.02768, 9: 0.1814, 30: 0.07567},
    # mean check degree 34, q* 0.02685
    0.82: {2: 0.18, 3: 0.53293, 8: 0.02122, 9: 0.18972, 30: 0.07613},
    # mean check degree 36.5, q* 0.02498
    0.83: {2: 0.17, 3: 0.53933, 8: 0.02992, 9: 0.18165, 30: 0.0791},
    # mean check degree 40.5, q* 0.02148
    0.84: {2: 0.14569, 3: 0.52764, 8: 0.09684, 9: 0.14589, 30: 0.08393},
    # mean check degree 44, q* 0.01981
    0.85: {2: 0.13461, 3: 0.53433, 8: 0.11445, 9: 0.12792, 30: 0.08869},
    # mean check degree 47.5, q* 0.01825
    0.86: {2: 0.14, 3: 0.52127, 8: 0.14178, 9: 0.10651, 30: 0.09045},
    # mean check degree 51.5, q* 0.01665
    0.87: {2: 0.13, 3: 0.5281, 8: 0.13355, 9: 0.11754, 30: 0.09082},
    # mean check degree 56, q* 0.01510
    0.88: {2: 0.12, 3: 0.53552, 8: 0.11409, 9: 0.14053, 30: 0.08986},
    # mean check degree 62, q* 0.01358
    0.89: {2: 0.11, 3: 0.54002, 8: 0.12844, 9: 0.12827, 30: 0.09327},
    # mean check degree 69, q* 0.01210
    0.9: {2: 0.1, 3: 0.54481, 8: 0.13342, 9: 0.12638, 30: 0.0954},
    # mean check degree 77, q* 0.01066
    0.91: {2: 0.09, 3: 0.55076, 8: 0.11272, 9: 0.15232, 30: 0.0942},
    # mean check degree 87.5, q* 0.00926
    0.92: {2: 0.08, 3: 0.55498, 8: 0.10826, 9: 0.16161, 30: 0.09515},
    # mean check degree 101, q* 0.00791
    0.93: {2: 0.07, 3: 0.55865, 8: 0.10066, 9: 0.17484, 30: 0.09585},
    # mean check degree 119.5, q* 0.00659
    0.94: {2: 0.06, 3: 0.56059, 8: 0.10181, 9: 0.17971, 30: 0.09789},
    # mean check degree 119.5, q* 0.00509
    0.95: {2: 0.05, 3: 0.57566, 7: 0.01503, 8: 0.25475, 15: 0.01743, 20: 0.08712},
}
# fmt: on


def cache_dir() -> Path:
    base = os.environ.get("QKDSAT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "qkdsat"
    )
    path = Path(base) / "ldpc"
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class Code:
    """Parity-check matrix as edges sorted by check (CSR) plus the variable view."""

    n: int
    m: int
    check_ptr: np.ndarray  # int32 (m+1)
    check_var: np.ndarray  # int32 (E): the variable of each edge
    seed: int
    rate: float
    order: np.ndarray  # int32 (n): public order in which positions get punctured/shortened

    @property
    def edges(self) -> int:
        return int(self.check_var.size)

    def syndrome(self, bits: np.ndarray) -> np.ndarray:
        """H x for one frame (uint8 n) or many (uint8 frames x n)."""
        bits = np.atleast_2d(bits)
        out = np.empty((bits.shape[0], self.m), dtype=np.uint8)
        _syndromes(bits, self.check_ptr, self.check_var, out)
        return out

    def digest(self) -> str:
        h = hashlib.sha256()
        h.update(self.check_ptr.tobytes())
        h.update(self.check_var.tobytes())
        h.update(self.order.tobytes())
        return h.hexdigest()[:16]


@numba.njit(cache=True, parallel=True)
def _syndromes(bits, check_ptr, check_var, out):
    frames = bits.shape[0]
    m = check_ptr.size - 1
    for f in numba.prange(frames):
        for j in range(m):
            acc = 0
            for e in range(check_ptr[j], check_ptr[j + 1]):
                acc ^= bits[f, check_var[e]]
            out[f, j] = acc


@numba.njit(cache=True)
def _attach(v, c, check_vars, check_deg, var_checks, var_deg, slots, where, start):
    """Add edge (v, c); c moves from its degree bucket to the next one (checks are kept
    sorted by degree in `slots`, bucket d being slots[start[d]:start[d + 1]])."""
    check_vars[c, check_deg[c]] = v
    var_checks[v, var_deg[v]] = c
    var_deg[v] += 1
    d = check_deg[c]
    last = start[d + 1] - 1
    other = slots[last]
    slots[where[c]] = other
    where[other] = where[c]
    slots[last] = c
    where[c] = last
    start[d + 1] -= 1
    check_deg[c] += 1


@numba.njit(cache=True)
def _peg_edges(stairs, degrees, m, seed):
    """Edges (variable, check) of a graph without 4-cycles: `stairs` degree-2 variables in
    a staircase (variable i on checks i and i + 1), then the variables of `degrees`
    (ascending) placed edge by edge on a lowest-degree check that is not within distance
    2 of the variable (progressive edge growth to depth 1, Hu et al. 2005), at random
    among equals, so the check degrees stay concentrated. Returns (ev, ec). An edge with
    no such check left (a dense high-rate code on a small frame) takes any check not yet
    on its variable, i.e. it closes a 4-cycle."""
    np.random.seed(seed)
    nv = stairs + degrees.size
    edges = 2 * stairs + degrees.sum()
    cap = edges // m + 24
    check_vars = np.full((m, cap), -1, np.int64)
    check_deg = np.zeros(m, np.int64)
    var_checks = np.full((nv, max(2, degrees.max() if degrees.size else 2)), -1, np.int64)
    var_deg = np.zeros(nv, np.int64)
    slots = np.arange(m)
    where = np.arange(m)
    start = np.full(cap + 2, m, np.int64)
    start[0] = 0
    ev = np.empty(edges, np.int64)
    ec = np.empty(edges, np.int64)
    e = 0
    for i in range(stairs):
        for c in (i, i + 1):
            ev[e], ec[e] = i, c
            e += 1
            _attach(i, c, check_vars, check_deg, var_checks, var_deg, slots, where, start)
    mark = np.zeros(m, np.int64)
    for k in range(degrees.size):
        v = stairs + k
        stamp = k + 1
        for _ in range(degrees[k]):
            chosen = -1
            d = 0
            while d < cap - 1 and chosen < 0:
                lo, size = start[d], start[d + 1] - start[d]
                # Random probes first: a scan through the bucket would pick checks next to
                # each other in the staircase, and two variables sharing a check whose other
                # checks are staircase neighbours form a codeword of weight 4.
                for _ in range(min(size, 64)):
                    c = slots[lo + np.random.randint(size)]
                    if mark[c] != stamp:
                        chosen = c
                        break
                if chosen < 0 and size > 0:
                    off = np.random.randint(size)
                    for s in range(size):
                        c = slots[lo + (off + s) % size]
                        if mark[c] != stamp:
                            chosen = c
                            break
                d += 1
            while chosen < 0:  # no 4-cycle-free check left: any check not yet on v
                c = np.random.randint(m)
                if check_deg[c] < cap:
                    chosen = c
                    for a in range(var_deg[v]):
                        if var_checks[v, a] == c:
                            chosen = -1
            ev[e], ec[e] = v, chosen
            e += 1
            # mark the check and every check of the variables already on it
            mark[chosen] = stamp
            for a in range(check_deg[chosen]):
                u = check_vars[chosen, a]
                for b in range(var_deg[u]):
                    mark[var_checks[u, b]] = stamp
            _attach(v, chosen, check_vars, check_deg, var_checks, var_deg, slots, where, start)
    return ev, ec


def _degrees(n: int, rate: float, distribution: dict[int, float]):
    """(staircase length, ascending degrees of the other variables, m): m - 1 degree-2
    variables in a staircase (no cycles among degree-2 nodes, the usual error-floor
    culprit), or the distribution's degree-2 share if smaller; the rest by degree."""
    m = int(round(n * (1 - rate)))
    if 2 in distribution:
        stairs = min(m - 1, int(round(distribution[2] * n)))
        others = {d: f for d, f in distribution.items() if d != 2}
    else:
        stairs, others = m - 1, distribution
    total = sum(others.values())
    rest = n - stairs
    degrees = sorted(others)
    counts = [int(math.floor(others[d] / total * rest)) for d in degrees]
    counts[0] += rest - sum(counts)
    return stairs, np.repeat(np.array(degrees, dtype=np.int64), counts), m


def _public_order(n: int, stairs: int, column: np.ndarray, seed: int) -> np.ndarray:
    """Order in which positions are punctured (then shortened): first every other staircase
    variable (no check then has two punctured neighbours, so each punctured bit is
    recovered in one decoding step: "untainted" puncturing, Elkouss et al. 2012), in random
    order, then all other positions in random order."""
    rng = np.random.default_rng(seed + 2)
    if os.environ.get("QKDSAT_LDPC_RANDOM_ORDER"):
        return rng.permutation(n).astype(np.int32)
    first = column[np.arange(0, stairs, 2)]
    first = first[rng.permutation(first.size)]
    rest = np.setdiff1d(np.arange(n), first)
    return np.concatenate([first, rest[rng.permutation(rest.size)]]).astype(np.int32)


_BUILD_LOCK = threading.Lock()
_CODES: dict[str, Code] = {}


def construct(n: int, rate: float, seed: int = 1, distribution=None) -> Code:
    """The code for (n, rate, seed, distribution): from memory, the disk cache, or built."""
    distribution = distribution or DISTRIBUTIONS[min(DESIGN_RATES, key=lambda r: abs(r - rate))]
    with _BUILD_LOCK:
        return _construct(n, rate, seed, distribution)


def _construct(n: int, rate: float, seed: int, distribution) -> Code:
    key = (
        f"v{CODE_VERSION}-n{n}-r{rate}-s{seed}-"
        + hashlib.sha256(repr(sorted(distribution.items())).encode()).hexdigest()[:10]
    )
    if key in _CODES:
        return _CODES[key]
    path = cache_dir() / f"{key}.npz"
    if path.exists():
        try:
            z = np.load(path)
            code = Code(n, int(z["m"]), z["check_ptr"], z["check_var"], seed, rate, z["order"])
            _CODES[key] = code
            return code
        except (OSError, ValueError, KeyError):
            pass  # a torn cache file is rebuilt below
    stairs, var_degrees, m = _degrees(n, rate, distribution)
    ev, ec = _peg_edges(stairs, var_degrees, m, seed)
    # Column order is shuffled so the staircase is not contiguous in the frame.
    column = np.random.default_rng(seed + 1).permutation(n)
    pairs = np.unique(np.stack([ec, column[ev]], 1), axis=0)  # sorted by check
    check_ptr = np.zeros(m + 1, dtype=np.int32)
    np.add.at(check_ptr, pairs[:, 0] + 1, 1)
    check_ptr = np.cumsum(check_ptr).astype(np.int32)
    check_var = pairs[:, 1].astype(np.int32)
    order = _public_order(n, stairs, column, seed)
    code = Code(n, m, check_ptr, check_var, seed, rate, order)
    tmp = path.with_name(f".{key}.{os.getpid()}.{threading.get_ident()}.npz")
    np.savez(tmp, m=m, check_ptr=check_ptr, check_var=check_var, order=order)
    os.replace(tmp, path)
    _CODES[key] = code
    return code


def decode_frames(llr, syndromes, check_ptr, check_var, max_iterations, out_bits, out_iters):
    """Layered sum-product syndrome decoding of many frames from scratch; returns success
    flags (see decode_frames_warm)."""
    messages = np.zeros((llr.shape[0], check_var.size), dtype=np.float32)
    return decode_frames_warm(
        llr, syndromes, check_ptr, check_var, max_iterations, messages, out_bits, out_iters
    )


@numba.njit(cache=True, parallel=True, fastmath=False)
def decode_frames_warm(
    llr, syndromes, check_ptr, check_var, max_iterations, messages, out_bits, out_iters
):
    """Layered sum-product syndrome decoding of many frames, continuing from the check
    messages of an earlier attempt (zeros: a fresh start). A retry only changes the LLRs of
    the revealed positions, so resuming saves the iterations already spent; the messages
    are updated in place. out_iters accumulates. Returns success flags."""
    frames, n = llr.shape
    m = check_ptr.size - 1
    ok = np.zeros(frames, dtype=np.bool_)
    maxdeg = 0
    for j in range(m):
        maxdeg = max(maxdeg, check_ptr[j + 1] - check_ptr[j])
    for f in numba.prange(frames):
        r = messages[f]
        post = llr[f].copy()
        for e in range(check_var.size):
            post[check_var[e]] += r[e]
        t = np.empty(maxdeg, dtype=np.float64)
        q = np.empty(maxdeg, dtype=np.float64)
        pre = np.empty(maxdeg + 1, dtype=np.float64)
        it = 0
        done = False
        while it < max_iterations and not done:
            it += 1
            for j in range(m):
                start = check_ptr[j]
                deg = check_ptr[j + 1] - start
                for i in range(deg):
                    e = start + i
                    qi = post[check_var[e]] - r[e]
                    q[i] = qi
                    x = math.tanh(0.5 * qi)
                    if x > 0.999999999999:
                        x = 0.999999999999
                    elif x < -0.999999999999:
                        x = -0.999999999999
                    t[i] = x
                pre[0] = -1.0 if syndromes[f, j] else 1.0
                for i in range(deg):
                    pre[i + 1] = pre[i] * t[i]
                suf = 1.0
                for i in range(deg - 1, -1, -1):
                    e = start + i
                    p = pre[i] * suf
                    ri = 2.0 * math.atanh(p)
                    r[e] = ri
                    post[check_var[e]] = q[i] + ri
                    suf *= t[i]
            # stop as soon as the hard decision satisfies the syndrome
            done = True
            for j in range(m):
                acc = syndromes[f, j]
                for e in range(check_ptr[j], check_ptr[j + 1]):
                    if post[check_var[e]] < 0:
                        acc ^= 1
                if acc:
                    done = False
                    break
        for v in range(n):
            out_bits[f, v] = 1 if post[v] < 0 else 0
        out_iters[f] += it
        ok[f] = done
    return ok


def punctured_rank(code: Code, p: int) -> int:
    """rank over GF(2) of the columns of H at the first p puncture positions."""
    if p == 0:
        return 0
    cached = _RANKS.get((code.digest(), p))
    if cached is not None:
        return cached
    columns = [0] * p
    position = {int(v): i for i, v in enumerate(code.order[:p])}
    for j in range(code.m):
        for e in range(code.check_ptr[j], code.check_ptr[j + 1]):
            i = position.get(int(code.check_var[e]))
            if i is not None:
                columns[i] ^= 1 << j
    basis: dict[int, int] = {}
    for col in columns:
        while col:
            top = col.bit_length() - 1
            if top in basis:
                col ^= basis[top]
            else:
                basis[top] = col
                break
    _RANKS[(code.digest(), p)] = len(basis)
    return len(basis)


_RANKS: dict = {}


@dataclass
class FramePlan:
    """How a mother code is adapted to a target rate: the first p positions of the code's
    public order are punctured, the next s shortened, the rest carry key bits."""

    code: Code
    punctured: int
    shortened: int

    @property
    def key_bits(self) -> int:
        return self.code.n - self.punctured - self.shortened

    @property
    def key_positions(self) -> np.ndarray:
        return np.sort(self.code.order[self.punctured + self.shortened :])

    @property
    def punctured_positions(self) -> np.ndarray:
        return self.code.order[: self.punctured]

    @property
    def shortened_positions(self) -> np.ndarray:
        return self.code.order[self.punctured : self.punctured + self.shortened]

    def leak_bits(self) -> int:
        return self.code.m - punctured_rank(self.code, self.punctured)


def plan_for(
    qber: float,
    efficiency: float,
    n: int | None = None,
    seed: int = 1,
    key_bits: int | None = None,
) -> FramePlan:
    """The mother code and (p, s) for frames of key_bits key bits (default: as many as fit)
    leaking efficiency * h(qber) per key bit: leak m - p = efficiency h key_bits.

    The mother code is the highest grid rate leaving at least
    max(RETRY_RESERVE_F h key_bits, RETRY_RESERVE_MIN n) punctured bits: the reserve the
    retry path reveals first. Positions that are neither key nor punctured are shortened
    (known zeros: no leak, only capacity)."""
    from host.distil.finite_key import binary_entropy

    n = n or FRAME_BITS
    h = binary_entropy(min(max(qber, 1e-4), 0.5))
    per_bit = efficiency * h
    if key_bits is None:
        key_bits = max_key_bits(qber, efficiency, n)
    need = per_bit * key_bits + max(RETRY_RESERVE_F * h * key_bits, RETRY_RESERVE_MIN * n)
    rate = MOTHER_RATES[0]
    for candidate in reversed(MOTHER_RATES):
        if round(n * (1 - candidate)) >= need:
            rate = candidate
            break
    code = construct(n, rate, seed)
    p = int(round(code.m - per_bit * key_bits))
    p = min(max(p, 0), code.n - key_bits)
    return FramePlan(code, p, code.n - key_bits - p)


def max_key_bits(qber: float, efficiency: float, n: int | None = None) -> int:
    """Key bits per frame: the frame minus the punctured reserve and one grid step (so the
    rate grid can always be met), fewer where even the lowest mother rate needs it."""
    from host.distil.finite_key import binary_entropy

    n = n or FRAME_BITS
    h = binary_entropy(min(max(qber, 1e-4), 0.5))
    per_bit = (efficiency + RETRY_RESERVE_F) * h
    lowest_m = round(n * (1 - MOTHER_RATES[0]))
    fit = (lowest_m - RETRY_RESERVE_MIN * n) / max(per_bit, 1e-9)
    return int(min(n * (1 - RATE_STEP - RETRY_RESERVE_MIN) / (1 + RETRY_RESERVE_F * h), fit))


def channel_llr(bits: np.ndarray, qber: float) -> np.ndarray:
    q = min(max(qber, 1e-6), 0.5 - 1e-6)
    magnitude = math.log((1 - q) / q)
    return np.where(np.asarray(bits, dtype=np.uint8) == 1, -magnitude, magnitude)
