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

CODE_VERSION = 2
FRAME_BITS = 65536
RATE_STEP = 0.01
MOTHER_RATES = tuple(round(0.5 + RATE_STEP * i, 2) for i in range(46))  # 0.50 .. 0.95
RESERVE_FRACTION = 0.01  # punctured bits kept for the retry path, fraction of n
LLR_KNOWN = 40.0

# Variable-node degree distributions (node perspective) per mother rate, found by
# simulation at n = 16384 (docs/distillation.md). Check degrees are as equal as possible.
# Degrees of the variables outside the degree-2 staircase.
DISTRIBUTIONS: dict[float, dict[int, float]] = {
    rate: {3: 0.4, 4: 0.3, 15: 0.3} for rate in MOTHER_RATES
}


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
def _build(ev, ec, fixed, n, m, seed, passes):
    """Break 4-cycles and double edges by swapping the checks of random (non-fixed) edges;
    swaps keep every variable and check degree."""
    np.random.seed(seed)
    E = ev.size
    free = np.nonzero(~fixed)[0]
    vptr = np.zeros(n + 1, dtype=np.int64)
    for e in range(E):
        vptr[ev[e] + 1] += 1
    for v in range(n):
        vptr[v + 1] += vptr[v]
    vedges = np.empty(E, dtype=np.int64)
    fill = vptr[:-1].copy()
    for e in range(E):
        vedges[fill[ev[e]]] = e
        fill[ev[e]] += 1
    mark = np.full(n, -1, dtype=np.int64)
    for _ in range(passes):
        cptr = np.zeros(m + 1, dtype=np.int64)
        for e in range(E):
            cptr[ec[e] + 1] += 1
        for c in range(m):
            cptr[c + 1] += cptr[c]
        cfill = cptr[:-1].copy()
        cvars = np.empty(E, dtype=np.int64)
        for e in range(E):
            cvars[cfill[ec[e]]] = ev[e]
            cfill[ec[e]] += 1
        bad = 0
        for v in range(n):
            # Mark each variable two steps away by the check it was reached through;
            # reaching it again through another check closes a 4-cycle.
            hit_edge = -1
            for a in range(vptr[v], vptr[v + 1]):
                c1 = ec[vedges[a]]
                seen = 0
                for t in range(cptr[c1], cptr[c1 + 1]):
                    u = cvars[t]
                    if u == v:
                        seen += 1
                        continue
                    if mark[u] >= 0 and mark[u] != c1:
                        if not fixed[vedges[a]]:
                            hit_edge = vedges[a]
                        else:
                            bad += 1
                    mark[u] = c1
                if seen > 1 and not fixed[vedges[a]]:
                    hit_edge = vedges[a]
            for a in range(vptr[v], vptr[v + 1]):
                c1 = ec[vedges[a]]
                for t in range(cptr[c1], cptr[c1 + 1]):
                    mark[cvars[t]] = -1
            if hit_edge >= 0:
                bad += 1
                o = free[np.random.randint(free.size)]
                tmp = ec[hit_edge]
                ec[hit_edge] = ec[o]
                ec[o] = tmp
        if bad == 0:
            break
    return ec


def _graph(n: int, rate: float, distribution: dict[int, float], seed: int):
    """Edges (variable, check, fixed): m - 1 degree-2 variables in a staircase (no cycles
    among degree-2 nodes, the usual error-floor culprit), the rest random by degree."""
    m = int(round(n * (1 - rate)))
    if 2 in distribution:
        # a full distribution (node perspective): its degree-2 nodes form the staircase
        stairs = min(m - 1, int(round(distribution[2] * n)))
        others = {d: f for d, f in distribution.items() if d != 2}
        total = sum(others.values())
        others = {d: f / total for d, f in others.items()}
    else:
        stairs, others = m - 1, distribution
    rest = n - stairs
    degrees = sorted(others)
    counts = [int(math.floor(others[d] * rest)) for d in degrees]
    counts[0] += rest - sum(counts)
    rng = np.random.default_rng(seed)
    var_degrees = np.repeat(np.array(degrees, dtype=np.int64), counts)
    stair_v = np.repeat(np.arange(stairs), 2)
    stair_c = (np.arange(2 * stairs) + 1) // 2  # variable i sits on checks i and i+1
    rand_v = np.repeat(np.arange(stairs, n), var_degrees)
    edges_rand = rand_v.size
    check_load = np.bincount(stair_c, minlength=m)
    total = 2 * (m - 1) + edges_rand
    target = np.full(m, total // m)
    target[: total - target.sum()] += 1
    need = np.maximum(target - check_load, 0)
    while need.sum() < edges_rand:  # rounding: top up the lightest checks
        need[np.argmin(need + check_load)] += 1
    sockets = np.repeat(np.arange(m), need)[:edges_rand]
    rand_c = sockets[rng.permutation(edges_rand)]
    ev = np.concatenate([stair_v, rand_v]).astype(np.int64)
    ec = np.concatenate([stair_c, rand_c]).astype(np.int64)
    fixed = np.zeros(ev.size, dtype=np.bool_)
    fixed[: stair_v.size] = True
    return ev, ec, fixed, m


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
    distribution = distribution or DISTRIBUTIONS[rate]
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
    ev, ec, fixed, m = _graph(n, rate, distribution, seed)
    ec = _build(ev, ec, fixed, n, m, seed, 40)
    # Column order is shuffled so the staircase is not contiguous in the frame.
    column = np.random.default_rng(seed + 1).permutation(n)
    # A double edge that survived would cancel in GF(2): keep one copy.
    pairs = np.unique(np.stack([ec, column[ev]], 1), axis=0)
    check_ptr = np.zeros(m + 1, dtype=np.int32)
    np.add.at(check_ptr, pairs[:, 0] + 1, 1)
    check_ptr = np.cumsum(check_ptr).astype(np.int32)
    check_var = pairs[:, 1].astype(np.int32)
    stairs = int(np.sum(np.bincount(ev, minlength=n) == 2)) if 2 in distribution else m - 1
    order = _public_order(n, min(stairs, m - 1), column, seed)
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

    The mother code is the highest grid rate leaving at least RESERVE_FRACTION n punctured
    bits (so 1-2 grid steps): the reserve the retry path reveals first (a revealed punctured
    bit is worth one syndrome bit, a revealed key bit only 1 - R of one). Positions that
    are neither key nor punctured are shortened (known zeros: no leak, only capacity)."""
    from host.distil.finite_key import binary_entropy

    n = n or FRAME_BITS
    per_bit = efficiency * binary_entropy(min(max(qber, 1e-4), 0.5))
    if key_bits is None:
        key_bits = max_key_bits(qber, efficiency, n)
    need = per_bit * key_bits + RESERVE_FRACTION * n
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
    per_bit = efficiency * binary_entropy(min(max(qber, 1e-4), 0.5))
    lowest_m = round(n * (1 - MOTHER_RATES[0]))
    fit = (lowest_m - RESERVE_FRACTION * n) / max(per_bit, 1e-9)
    return int(min(n * (1 - 2 * RESERVE_FRACTION - RATE_STEP), fit))


def channel_llr(bits: np.ndarray, qber: float) -> np.ndarray:
    q = min(max(qber, 1e-6), 0.5 - 1e-6)
    magnitude = math.log((1 - q) / q)
    return np.where(np.asarray(bits, dtype=np.uint8) == 1, -magnitude, magnitude)
