"""Rate-adaptive LDPC syndrome reconciliation: code construction, cache, BP decoder.

Codes: irregular, built in the project from a designed degree distribution
(ldpc_design.py): quasi-cyclic for the protocol's frames of 2^16-2^18 bits (construct_qc:
progressive edge growth on a base graph of QC_BASE_COLUMNS columns with a degree-2
staircase, lifted by circulants whose shifts avoid lifted 4-cycles; docs/distillation.md
"Quasi-cyclic codes"), PEG on the whole frame otherwise or under QKDSAT_LDPC_QC=0 (no
4-cycles below the maximum degree); seeded, so deterministic; cached as .npz under the
cache directory keyed by (n, rate, distribution, seed, version).
Rate adaptation (Elkouss et al. 2010): a frame of n code bits holds n - p - s key bits,
p punctured bits (Alice's private random bits, unknown to Bob: LLR 0) and s shortened
bits (value known to both: LLR +-inf); the effective rate is (R0 n - s)/(n - p - s).
Leak of a frame: the m syndrome bits minus rank(H_punctured) (the punctured bits are
uniform and independent, so they hide exactly that many syndrome bits), plus every bit
revealed on a retry.
Decoder: layered (check-serial) sum-product on float32 LLRs with the check update in the
log domain from a table (decode_phi), many frames in parallel (numba prange over frames:
both cores), resuming from its messages on a retry, stopping a frame at the syndrome or
when it stalls. decode_frames (tanh/atanh, float64) is the reference it is measured
against.
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

import host.distil.numba_cache  # noqa: F401 - numba's cache index locked among processes

CODE_VERSION = 5
FRAME_BITS = 65536  # the shortest frame: small blocks, and the stream's chunks at low rates
# Longer frames for a block that fills at least LONG_FRAME_MIN_FRAMES of them (a post-pass
# key block, a bright stream's chunk): BP's finite-length gap above the codes' asymptotic
# threshold shrinks with the frame (docs/distillation.md, "Frame length"). At least 4 frames
# of the longest length taken, so that both cores have frames to decode and the block's f
# averages several frames' thresholds; smaller post-pass blocks take 2^17 from 3 frames
# (MID_FRAME_MIN_FRAMES) or one long frame (SMALL_BLOCK_MIN_FILL), below. The length is a
# function of the block's size and its sizing QBER interval only (frame_bits_for), which
# both sides know: it is agreed without a message, and the code's digest in ec_syndromes
# checks it.
LONG_FRAME_BITS = (1 << 17, 1 << 18)
LONG_FRAME_MIN_FRAMES = 4
# A small block, more than one frame of FRAME_BITS and fewer than LONG_FRAME_MIN_FRAMES
# (a 15-30 s pass's, ~60-240 kbit), takes instead one frame of the shortest longer length
# that holds it, the rest of that frame shortened, if the block fills at least this share
# of the frame's key bits (session 15): its f is one long frame's threshold, not the mean of
# 2-3 short ones' with the worst of them weighing a third. 30 s micius-2017 passes, 10
# simulation seeds x 2 endpoint seeds, paired: f worst 1.162 -> 1.137, median 1.131 / 1.124
# -> 1.111 / 1.105 (endpoint seeds 7 / 8), key longer in 17 of 20 (median +1.8 / +2.8 %);
# ~2x the decoder's CPU, on one core (docs/distillation.md, "Frame length"). Less filled,
# the frame is mostly shortened bits and its mother rate runs off the grid's top.
SMALL_BLOCK_MIN_FILL = 0.5
# A block that fills fewer than LONG_FRAME_MIN_FRAMES frames of any longer length, but
# makes at least this many frames of the shortest longer one (more than MID - 1 frames'
# key bits: 4-8 frames of 2^16, a 45-90 s pass's), takes that one (session 15): 60 s
# micius-2017 passes, 8 simulation seeds, paired, each block's 5 frames of 2^16 (the
# first's after its probe) as 3 of 2^17: EC f median 1.124 -> 1.103, lower in 8 of 8
# (2^18, 2 frames: 1.110), keys +0.4-2.2 %, CPU +0-46 %; 2 frames of 2^17 for 4 of 2^16
# (45 s passes) were not better (f -0.016 .. +0.005, median -0.004), hence 3
# (docs/distillation.md, "Frame length").
MID_FRAME_MIN_FRAMES = 3
# ... and only at a sizing QBER (the interval's low end) of at least this: lower, the
# long frame's mother rate sits at the grid's top (0.9475-0.95 against 0.93 for 2^16) and
# it leaked more than 3 short frames, 2.5 frames' worth of key sampled from 10,000 bits:
# 8 of 9 noise seeds at 0.5 % (low end 0.3 %, median +266 bits), 6 of 7 at 0.1-0.2 %;
# at 0.75 % (low end 0.55 %) it leaked less in 4 of 6 (median -205), at 1-1.5 % in 6 of 6
# (review of session 15, docs/distillation.md "Frame length"). The mid-sized blocks' rule
# too: 5.5 frames of 2^16 sampled from 8,192 bits (a probe, then 3 frames of 2^17 against 5
# of 2^16), 6 noise seeds: f +0.019 (median) at 0.5 %, lower in 0 of 6; -0.001 at 1 %, 4
# of 6; -0.009 / -0.012 at 2 / 5 %, 6 / 5 of 6 (the same blocks sized from the exact QBER:
# lower in 27 of 30 at 0.5-5 %, median -0.009 .. -0.028).
SMALL_BLOCK_MIN_QBER = 0.005
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
# host/distil/ldpc_design.py (semi-Gaussian density evolution + LP; the rates of
# ldpc_design.EXACT_DESIGNS then re-optimised on exact density evolution; regenerate with
# `python -m host.distil.ldpc_design`); the degree-2 share forms the staircase. q* is
# the approximation's threshold, optimistic at high rates (there it exceeds capacity), or
# exact density evolution's: the measured efficiency is in docs/distillation.md.
# fmt: off
DISTRIBUTIONS: dict[float, dict[int, float]] = {
    # mean check degree 12, q* 0.10686
    0.5: {2: 0.41932, 3: 0.31861, 7: 0.11496, 8: 0.06847, 20: 0.04994, 25: 0.00803, 80: 0.02067},
    # mean check degree 12, q* 0.10386
    0.51: {2: 0.41613, 3: 0.32297, 7: 0.08013, 8: 0.10774, 20: 0.02291, 25: 0.03293, 80: 0.01718},
    # mean check degree 12.5, q* 0.10077
    0.52: {2: 0.41092, 3: 0.32439, 7: 0.08819, 8: 0.10045, 20: 0.03061, 25: 0.0266, 80: 0.01884},
    # mean check degree 13, q* 0.09780
    0.53: {2: 0.40711, 3: 0.32516, 7: 0.10844, 8: 0.07891, 20: 0.04574, 25: 0.01374, 80: 0.0209},
    # mean check degree 13, q* 0.09488
    0.54: {2: 0.40386, 3: 0.32962, 7: 0.07525, 8: 0.11629, 20: 0.0204, 25: 0.03725, 80: 0.01734},
    # mean check degree 13.5, q* 0.09195
    0.55: {2: 0.39886, 3: 0.33155, 7: 0.07616, 8: 0.11661, 20: 0.02327, 25: 0.03515, 80: 0.01841},
    # mean check degree 14, q* 0.08911
    0.56: {2: 0.395, 3: 0.33322, 7: 0.08391, 8: 0.10876, 20: 0.03082, 25: 0.02848, 80: 0.0198},
    # mean check degree 14.5, q* 0.08626
    0.57: {2: 0.3902, 3: 0.33484, 7: 0.09001, 8: 0.10361, 20: 0.03477, 25: 0.02601, 80: 0.02057},
    # mean check degree 15, q* 0.08350
    0.58: {2: 0.38633, 3: 0.33654, 7: 0.09779, 8: 0.09583, 20: 0.04092, 25: 0.02107, 80: 0.02152},
    # mean check degree 15, q* 0.08076
    0.59: {
        2: 0.38292, 3: 0.34108, 7: 0.0675, 8: 0.13011, 20: 0.01722, 25: 0.0432, 60: 0.0007,
        80: 0.01726,
    },
    # mean check degree 16, q* 0.07806
    0.6: {2: 0.37773, 3: 0.3409, 7: 0.09832, 8: 0.09732, 20: 0.04286, 25: 0.02057, 80: 0.02229},
    # mean check degree 16, q* 0.07539
    0.61: {
        2: 0.37421, 3: 0.34571, 7: 0.06516, 8: 0.13477, 20: 0.01718, 25: 0.04448, 60: 0.00076,
        80: 0.01774,
    },
    # mean check degree 17, q* 0.07278
    0.62: {2: 0.36913, 3: 0.34613, 7: 0.08792, 8: 0.11078, 20: 0.03709, 25: 0.02684, 80: 0.02211},
    # mean check degree 17.5, q* 0.07019
    0.63: {2: 0.36452, 3: 0.34963, 7: 0.07037, 8: 0.13086, 20: 0.02791, 25: 0.03523, 80: 0.02148},
    # mean check degree 18, q* 0.06765
    0.64: {2: 0.36, 3: 0.35319, 7: 0.06229, 8: 0.14027, 20: 0.02298, 25: 0.04034, 80: 0.02093},
    # mean check degree 19, q* 0.06508
    0.65: {2: 0.35, 3: 0.36189, 7: 0.07042, 8: 0.12844, 20: 0.04178, 25: 0.02346, 80: 0.02402},
    # mean check degree 19.5, q* 0.06257
    0.66: {2: 0.34, 3: 0.37386, 7: 0.03447, 8: 0.16539, 20: 0.026, 25: 0.03778, 80: 0.02249},
    # mean check degree 20, q* 0.06010
    0.67: {2: 0.33, 3: 0.38729, 8: 0.18433, 9: 0.01718, 20: 0.00695, 25: 0.05327, 80: 0.02098},
    # mean check degree 21, q* 0.05766
    0.68: {2: 0.32, 3: 0.39656, 8: 0.17905, 9: 0.02031, 20: 0.01593, 25: 0.04538, 80: 0.02278},
    # mean check degree 22, q* 0.05525
    0.69: {2: 0.31, 3: 0.40673, 8: 0.15768, 9: 0.04115, 20: 0.01827, 25: 0.04202, 80: 0.02415},
    # mean check degree 23, q* 0.05288
    0.7: {2: 0.3, 3: 0.41695, 8: 0.13432, 9: 0.06465, 20: 0.01731, 25: 0.04173, 80: 0.02504},
    # mean check degree 24, q* 0.05056
    0.71: {2: 0.29, 3: 0.42718, 8: 0.10895, 9: 0.09087, 20: 0.01293, 25: 0.04463, 80: 0.02543},
    # mean check degree 25, q* 0.04827
    0.72: {2: 0.28, 3: 0.43742, 8: 0.08157, 9: 0.11985, 20: 0.00503, 25: 0.05082, 80: 0.02532},
    # mean check degree 26, q* 0.04601
    0.73: {2: 0.27, 3: 0.44755, 8: 0.05555, 9: 0.14734, 25: 0.05018, 30: 0.00476, 80: 0.02462},
    # mean check degree 27, q* 0.04380
    0.74: {2: 0.26, 3: 0.45754, 8: 0.03213, 9: 0.17182, 25: 0.03938, 30: 0.01581, 80: 0.02331},
    # mean check degree 28.5, q* 0.04161
    0.75: {2: 0.25, 3: 0.46669, 8: 0.01645, 9: 0.18771, 25: 0.04124, 30: 0.0132, 80: 0.02471},
    # mean check degree 30, q* 0.03947
    0.76: {2: 0.24, 3: 0.47614, 9: 0.20394, 10: 0.00061, 25: 0.04014, 30: 0.01375, 80: 0.02543},
    # mean check degree 31.5, q* 0.03735
    0.77: {2: 0.23, 3: 0.485, 9: 0.18374, 10: 0.02275, 25: 0.03276, 30: 0.02059, 80: 0.02515},
    # mean check degree 33, q* 0.03528
    0.78: {2: 0.22, 3: 0.49406, 9: 0.16297, 10: 0.04571, 25: 0.02272, 30: 0.03035, 80: 0.02419},
    # mean check degree 35, q* 0.03324
    0.79: {2: 0.21, 3: 0.50244, 9: 0.149, 10: 0.06101, 25: 0.0217, 30: 0.03078, 80: 0.02507},
    # mean check degree 37, q* 0.03124
    0.8: {2: 0.2, 3: 0.51078, 9: 0.1352, 10: 0.07664, 25: 0.017, 30: 0.03542, 80: 0.02496},
    # mean check degree 39.5, q* 0.02928
    0.81: {2: 0.19, 3: 0.51856, 9: 0.12699, 10: 0.08606, 25: 0.01897, 30: 0.03325, 80: 0.02618},
    # mean check degree 42, q* 0.02735
    0.82: {2: 0.18, 3: 0.52639, 9: 0.1179, 10: 0.09698, 25: 0.0155, 30: 0.03714, 80: 0.02611},
    # mean check degree 45, q* 0.02546
    0.83: {2: 0.17, 3: 0.53373, 9: 0.11381, 10: 0.10249, 25: 0.01699, 30: 0.03607, 80: 0.02691},
    # mean check degree 51, exact density evolution q* 0.02264
    0.84: {2: 0.16, 3: 0.51706, 9: 0.2216, 20: 0.0315, 25: 0.03496, 80: 0.03488},
    # mean check degree 55, q* 0.02021
    0.85: {2: 0.13393, 3: 0.52465, 8: 0.09746, 9: 0.13746, 20: 0.00523, 25: 0.06936, 80: 0.03191},
    # mean check degree 59.5, q* 0.01861
    0.86: {2: 0.14, 3: 0.50872, 8: 0.16155, 9: 0.07589, 20: 0.01956, 25: 0.06154, 80: 0.03274},
    # mean check degree 64.5, q* 0.01700
    0.87: {2: 0.13, 3: 0.51542, 8: 0.15232, 9: 0.08841, 20: 0.01285, 25: 0.06858, 80: 0.03241},
    # mean check degree 71, q* 0.01542
    0.88: {2: 0.12, 3: 0.52112, 8: 0.15729, 9: 0.08426, 20: 0.01956, 25: 0.06387, 80: 0.0339},
    # mean check degree 78, q* 0.01388
    0.89: {2: 0.11, 3: 0.52674, 8: 0.15408, 9: 0.09117, 20: 0.0139, 25: 0.07054, 80: 0.03356},
    # mean check degree 87, q* 0.01237
    0.9: {2: 0.1, 3: 0.53541, 8: 0.09765, 9: 0.15317, 25: 0.07943, 80: 0.03434},
    # mean check degree 98.5, q* 0.01091
    0.91: {2: 0.09, 3: 0.53784, 8: 0.13407, 9: 0.11666, 20: 0.0163, 25: 0.06883, 80: 0.03629},
    # mean check degree 112.5, q* 0.00948
    0.92: {2: 0.08, 3: 0.54328, 8: 0.11326, 9: 0.14179, 20: 0.0122, 25: 0.07226, 80: 0.03722},
    # mean check degree 119.5, q* 0.00805
    0.93: {
        2: 0.07, 3: 0.548, 8: 0.12874, 9: 0.13434, 20: 0.00962, 25: 0.07278, 60: 0.02954,
        80: 0.00697,
    },
    # mean check degree 119.5, q* 0.00659
    0.94: {2: 0.06, 3: 0.55805, 8: 0.15343, 9: 0.12295, 25: 0.06461, 30: 0.02119, 40: 0.01977},
    # mean check degree 119.5, q* 0.00509
    0.95: {2: 0.05, 3: 0.57566, 7: 0.01501, 8: 0.25478, 15: 0.01741, 20: 0.08714},
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
    # Quasi-cyclic structure, when the code has one (docs/distillation.md, "Quasi-cyclic
    # codes"): (lift Z, row_ptr int32 (m/Z + 1), column int32, shift int32). Check r Z + z
    # holds, for each base entry t of row r in order, variable column[t] Z + (z + shift[t])
    # mod Z; check_ptr/check_var are exactly that expansion. None: no structure.
    qc: tuple | None = None

    @property
    def edges(self) -> int:
        return int(self.check_var.size)

    def syndrome(self, bits: np.ndarray) -> np.ndarray:
        """H x for one frame (uint8 n) or many (uint8 frames x n)."""
        bits = np.atleast_2d(bits)
        out = np.empty((bits.shape[0], self.m), dtype=np.uint8)
        _syndromes(bits, self.check_ptr, self.check_var, out)
        return out

    def narrow_check_var(self) -> np.ndarray:
        """check_var as uint16 when n <= 2^16 (the short frames; longer ones, frame_bits_for,
        keep int32), else as is:
        the decoder streams it every iteration and gathers through it, and the narrow
        copy measured 1.09-1.13x per edge update (rates 0.90 and 0.66, /tmp
        micro-benchmark). Made once per code."""
        cached = self.__dict__.get("_narrow_check_var")
        if cached is None:
            cached = self.check_var
            if self.n <= 1 << 16:
                cached = self.check_var.astype(np.uint16)
            self.__dict__["_narrow_check_var"] = cached
        return cached

    def digest(self) -> str:
        """The code's identity (its arrays' hash), computed once: the arrays are never
        changed, and a 2^16 code's hash takes tens of ms."""
        cached = self.__dict__.get("_digest")
        if cached is None:
            h = hashlib.sha256()
            h.update(self.check_ptr.tobytes())
            h.update(self.check_var.tobytes())
            h.update(self.order.tobytes())
            cached = self.__dict__["_digest"] = h.hexdigest()[:16]
        return cached


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
    """Edges (variable, check) of a graph avoiding 4-cycles: `stairs` degree-2 variables in
    a staircase (variable i on checks i and i + 1), then the variables of `degrees`
    (ascending) placed edge by edge on a lowest-degree check that is not within distance
    2 of the variable (progressive edge growth to depth 1, Hu et al. 2005), at random
    among equals, so the check degrees stay concentrated. Returns (ev, ec). An edge with
    no such check left (the heaviest variables of a dense high-rate code: rate 0.9 puts
    2250 x 80 edges on 6554 checks) takes any check not yet on its variable, i.e. it
    closes a 4-cycle."""
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


class FrameTooShort(ValueError):
    """A frame with fewer checks than its design's heaviest variables have edges."""


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
    highest = max((d for d, count in zip(degrees, counts, strict=True) if count), default=2)
    if highest > m:  # its edges need as many distinct checks: the growth would never end
        raise FrameTooShort(
            f"a frame of {n} bits at rate {rate} has {m} checks, fewer than the degree "
            f"{highest} of its design's heaviest variables"
        )
    return stairs, np.repeat(np.array(degrees, dtype=np.int64), counts), m


def _public_order(n: int, untainted: np.ndarray, seed: int) -> np.ndarray:
    """Order in which positions are punctured (then shortened): first the `untainted`
    positions, every other staircase variable (no check then has two punctured
    neighbours, so each punctured bit is recovered in one decoding step: "untainted"
    puncturing, Elkouss et al. 2012), in random order, then all other positions in random
    order."""
    rng = np.random.default_rng(seed + 2)
    if os.environ.get("QKDSAT_LDPC_RANDOM_ORDER"):
        return rng.permutation(n).astype(np.int32)
    first = untainted[rng.permutation(untainted.size)]
    rest = np.setdiff1d(np.arange(n), first)
    return np.concatenate([first, rest[rng.permutation(rest.size)]]).astype(np.int32)


_BUILD_LOCK = threading.Lock()
_CODES: dict[str, Code] = {}


def construct(n: int, rate: float, seed: int = 1, distribution=None) -> Code:
    """The code for (n, rate, seed, distribution): from memory, the disk cache, or built.
    Quasi-cyclic (construct_qc) for a frame of whole base columns lifted at least
    QC_MIN_LIFT times (every frame length the protocol uses), unless QKDSAT_LDPC_QC=0."""
    distribution = distribution or _design_for(rate)
    shifts = _qc_shifts_for(n)
    with _BUILD_LOCK:
        if shifts:
            return _construct_qc(n, rate, seed, distribution, shifts)
        return _construct(n, rate, seed, distribution)


def buildable(n: int, rate: float) -> None:
    """FrameTooShort naming why construct(n, rate) cannot be built (too few checks for
    the design's heaviest variables), else nothing."""
    base = QC_BASE_COLUMNS if _qc_shifts_for(n) else n
    _degrees(base, rate, _design_for(rate))


def _design_for(rate: float) -> dict:
    return DISTRIBUTIONS[min(DESIGN_RATES, key=lambda r: abs(r - rate))]


def _cache_key(n: int, rate: float, seed: int, distribution) -> str:
    return (
        f"v{CODE_VERSION}-n{n}-r{rate}-s{seed}-"
        + hashlib.sha256(repr(sorted(distribution.items())).encode()).hexdigest()[:10]
    )


def cached_path(n: int, rate: float, seed: int = 1) -> Path:
    """Where construct(n, rate, seed) keeps its code on disk (it may not exist yet)."""
    key = _cache_key(n, rate, seed, _design_for(rate))
    shifts = _qc_shifts_for(n)
    if shifts:
        key = _qc_cache_key(n, key, shifts)
    return cache_dir() / f"{key}.npz"


def _load_cached(path, key, n, rate, seed, quasi_cyclic=False) -> Code | None:
    """The code cached at path (kept in memory under key), or None when there is none or
    the file is torn, or (quasi_cyclic) its QC description does not expand to its code:
    the caller builds it again."""
    if not path.exists():
        return None
    try:
        z = np.load(path)
        qc = None
        if quasi_cyclic:
            qc = (int(z["lift"]), z["row_ptr"], z["column"], z["shift"])
        code = Code(n, int(z["m"]), z["check_ptr"], z["check_var"], seed, rate, z["order"], qc)
        if quasi_cyclic:
            _check_qc_description(code)
    except (OSError, ValueError, KeyError):
        return None
    _CODES[key] = code
    return code


def _store(path, key, code: Code) -> Code:
    """Write code to the cache at path (atomically: a temporary file, then a rename, so a
    reader never sees half a file; with its QC description if it has one) and keep it in
    memory under key: _load_cached's format."""
    arrays = dict(m=code.m, check_ptr=code.check_ptr, check_var=code.check_var, order=code.order)
    if code.qc is not None:
        lift, row_ptr, column, shift = code.qc
        arrays.update(lift=lift, row_ptr=row_ptr, column=column, shift=shift)
    tmp = path.with_name(f".{key}.{os.getpid()}.{threading.get_ident()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    _CODES[key] = code
    return code


def _construct(n: int, rate: float, seed: int, distribution) -> Code:
    key = _cache_key(n, rate, seed, distribution)
    if key in _CODES:
        return _CODES[key]
    path = cache_dir() / f"{key}.npz"
    code = _load_cached(path, key, n, rate, seed)
    if code is not None:
        return code
    stairs, var_degrees, m = _degrees(n, rate, distribution)
    ev, ec = _peg_edges(stairs, var_degrees, m, seed)
    # Column order is shuffled so the staircase is not contiguous in the frame.
    column = np.random.default_rng(seed + 1).permutation(n)
    pairs = np.unique(np.stack([ec, column[ev]], 1), axis=0)  # sorted by check
    check_ptr = np.zeros(m + 1, dtype=np.int32)
    np.add.at(check_ptr, pairs[:, 0] + 1, 1)
    check_ptr = np.cumsum(check_ptr).astype(np.int32)
    check_var = pairs[:, 1].astype(np.int32)
    order = _public_order(n, column[np.arange(0, stairs, 2)], seed)
    return _store(path, key, Code(n, m, check_ptr, check_var, seed, rate, order))


# Quasi-cyclic codes (issue 17, docs/distillation.md "Quasi-cyclic codes"): the same degree
# distributions and the same PEG on a base graph of QC_BASE_COLUMNS columns, each base edge
# lifted to a Z x Z circulant (Z = n / QC_BASE_COLUMNS: 32 at 2^16, 64 at 2^17, 128 at
# 2^18), so that a decoder can update the Z checks of a base row as SIMD lanes on
# contiguous posteriors (ldpc_qc: 1.6-3.1x less CPU per edge update), and decode as well as
# the PEG codes (frame thresholds within 0.0025 in the mean at 1-5 %, 2^16-2^18). The
# production codes since session 13; QKDSAT_LDPC_QC=0 builds the PEG codes ("random":
# uniform shifts, a baseline for the benches).
QC_BASE_COLUMNS = 2048
# A smaller lift (a frame under 2^16: only tests' frames of 2^12-2^13) fills too few vector
# lanes to pay, and leaves a base graph with too few rows for the heaviest columns: those
# frames keep PEG codes.
QC_MIN_LIFT = 32
QC_MODES = ("1", "random", "6")
# Shift modes "1" and "6" choose greedily ("6" also against lifted 6-cycles among light
# columns, QC_LIGHT_DEGREE: docs/distillation.md "QC shifts against 6-cycles");
# "random" draws uniform shifts.
QC_GREEDY = {"1": 1, "random": 0, "6": 2}
# Columns of at most this degree (the staircase's 2 and the designs' 3) are the light
# ones: the stuck sets of docs/distillation.md are made of them.
QC_LIGHT_DEGREE = 3
# In the cache key of a QC code: bump it when the base graph, the shifts or the public
# order of a QC code change (CODE_VERSION would also rename the production codes).
QC_VERSION = 2


def qc_mode() -> str | None:
    """The QKDSAT_LDPC_QC switch: "1" (unset or empty: the default, greedy shifts),
    "random", "6" (greedy, also against light 6-cycles) or None ("0": PEG codes)."""
    value = os.environ.get("QKDSAT_LDPC_QC", "") or "1"
    if value == "0":
        return None
    if value not in QC_MODES:
        raise ValueError(f"QKDSAT_LDPC_QC={value!r}: expected one of 0, 1, random, 6")
    return value


def _qc_shifts_for(n: int) -> str | None:
    """qc_mode() for a frame of n bits that QC codes cover (whole base columns, a lift of
    at least QC_MIN_LIFT), else None (a PEG code)."""
    if n % QC_BASE_COLUMNS or n // QC_BASE_COLUMNS < QC_MIN_LIFT:
        return None
    return qc_mode()


def _qc_cache_key(n: int, key: str, shifts: str) -> str:
    tag = {"1": "", "random": "r", "6": "s6"}[shifts]
    return f"qc{n // QC_BASE_COLUMNS}{tag}.{QC_VERSION}-{key}"


def construct_qc(n: int, rate: float, seed: int = 1, distribution=None, shifts: str = "1"):
    """The quasi-cyclic code for (n, rate, seed, distribution), whatever QKDSAT_LDPC_QC
    says: from memory, the disk cache, or built (shifts "1": greedy, "random", "6")."""
    if n % QC_BASE_COLUMNS or shifts not in QC_MODES:
        raise ValueError(f"no QC code for n={n} (a multiple of {QC_BASE_COLUMNS}), {shifts=}")
    distribution = distribution or _design_for(rate)
    with _BUILD_LOCK:
        return _construct_qc(n, rate, seed, distribution, shifts)


@numba.njit(cache=True)
def _qc_shifts(ev, ec, stairs, nb, mb, lift, greedy, seed, light):
    """Circulant shifts of the base edges (ev, ec) in their order: 0 on the staircase
    (variables < stairs: Z parallel staircases, still no cycle among degree-2 nodes), else
    (greedy) the shift closing the fewest lifted 4-cycles with the edges before it, then
    the fewest staircase cycles, at random among equals; or uniform (not greedy).
    A base 4-cycle over rows r, r' and columns c, c' lifts to Z 4-cycles iff
    s(r,c) - s(r',c) + s(r',c') - s(r,c') = 0 mod Z, else to none: for the new edge (r, c)
    each base cycle it closes forbids one shift value. Staircase cycles: lane z of the
    staircase joins check (r, z) to (r', z) for any two rows r, r' <= stairs, so a
    variable of column c closes a cycle of length 2 |r - r'| + 2 through it iff
    s(r,c) = s(r',c) (the low-ACE cycles of docs/distillation.md "ACE / deeper PEG"; a
    PEG code has one for every pair of a variable's checks). Distinct shifts within a
    column (possible up to degree Z) leave none.
    greedy 2 (shifts "6") then ranks, on an edge of a light column (light[c]), the base
    6-cycles it closes through two more light columns, then those through one more: rows
    r, r2, r3 and columns c, u, w lift to Z 6-cycles iff
    s(r,c) - s(r2,c) + s(r2,u) - s(r3,u) + s(r3,w) - s(r,w) = 0 mod Z. Heavy columns
    come first, so the last edge placed on such a cycle is a light column's.
    Returns (shifts, closed): closed[e] the base cycles edge e closed at zero sum."""
    np.random.seed(seed)
    edges = ev.size
    base = np.full((mb, nb), -1, np.int64)  # shift of each base edge placed so far
    row_deg = np.zeros(mb, np.int64)
    col_deg = np.zeros(nb, np.int64)
    row_cols = np.full((mb, nb), -1, np.int64)
    col_rows = np.full((nb, mb), -1, np.int64)
    shifts = np.zeros(edges, np.int64)
    closed = np.zeros(edges, np.int64)
    count = np.zeros(lift, np.int64)
    cost = np.zeros(lift, np.int64)
    six = np.zeros(lift, np.int64)
    six_all = 1 << 16  # all-light 6-cycles rank before the two-light ones
    for e in range(edges):
        c, r = ev[e], ec[e]
        count[:] = 0
        for a in range(row_deg[r]):
            u = row_cols[r, a]
            for b in range(col_deg[c]):
                r2 = col_rows[c, b]
                s2u = base[r2, u]
                if s2u >= 0:  # base cycle r-c-r2-u: zero sum iff s(r,c) = below
                    count[(base[r2, c] - s2u + base[r, u]) % lift] += 1
        if c < stairs:
            s = 0
        elif greedy:
            # 4-cycles first (weight above any staircase count: a column has < mb + 1
            # rows), then staircase cycles
            for k in range(lift):
                cost[k] = count[k] * (mb + 1)
            stair_weight = 1
            if greedy >= 2 and light[c]:
                # light 6-cycles closed per shift: all three columns light (weight
                # six_all), or two of them (weight 1)
                six[:] = 0
                for b in range(col_deg[c]):
                    r2 = col_rows[c, b]
                    s2c = base[r2, c]
                    for a in range(row_deg[r2]):  # u light, w any
                        u = row_cols[r2, a]
                        if u == c or not light[u]:
                            continue
                        via_u = s2c - base[r2, u]
                        for b3 in range(col_deg[u]):
                            r3 = col_rows[u, b3]
                            if r3 == r2 or r3 == r:
                                continue
                            via_r3 = via_u + base[r3, u]
                            for a3 in range(row_deg[r3]):
                                w = row_cols[r3, a3]
                                if w == u or base[r, w] < 0:
                                    continue
                                weight = six_all if light[w] else 1
                                six[(via_r3 - base[r3, w] + base[r, w]) % lift] += weight
                    for a in range(row_deg[r]):  # w light, u heavy
                        w = row_cols[r, a]
                        if not light[w]:
                            continue
                        for b3 in range(col_deg[w]):
                            r3 = col_rows[w, b3]
                            if r3 == r2 or r3 == r:
                                continue
                            for a3 in range(row_deg[r3]):
                                u = row_cols[r3, a3]
                                if light[u] or base[r2, u] < 0:
                                    continue
                                total = s2c - base[r2, u] + base[r3, u] - base[r3, w]
                                six[(total + base[r, w]) % lift] += 1
                # ranks apart: per shift, a light column's edge closes far fewer than
                # 2^10 4-cycles, staircase cycles or all-light 6-cycles, and than 2^16
                # two-light ones
                stair_weight = 1 << 30
                for k in range(lift):
                    cost[k] = (count[k] << 40) + six[k]
            if r <= stairs:
                for b in range(col_deg[c]):
                    r2 = col_rows[c, b]
                    if r2 <= stairs:
                        cost[base[r2, c]] += stair_weight
            fewest = cost.min()
            ties = 0
            for k in range(lift):
                ties += cost[k] == fewest
            pick = np.random.randint(ties)
            s = -1
            for k in range(lift):
                if cost[k] == fewest:
                    if pick == 0:
                        s = k
                        break
                    pick -= 1
        else:
            s = np.random.randint(lift)
        shifts[e] = s
        closed[e] = count[s]
        base[r, c] = s
        row_cols[r, row_deg[r]] = c
        row_deg[r] += 1
        col_rows[c, col_deg[c]] = r
        col_deg[c] += 1
    return shifts, closed


@numba.njit(cache=True)
def _qc_base_cycles(lift, row_ptr, column, shift, nb):
    """Per base column, the base 4-cycles through it whose shift sum is 0 mod Z (each
    lifts to Z 4-cycles of the code); enumerated over pairs of base rows, independently of
    the construction's bookkeeping."""
    mb = row_ptr.size - 1
    per_column = np.zeros(nb, np.int64)
    at = np.full(nb, -1, np.int64)  # entry of column c in row r, or -1
    for r in range(mb):
        for t in range(row_ptr[r], row_ptr[r + 1]):
            at[column[t]] = t
        for r2 in range(r + 1, mb):
            for t2 in range(row_ptr[r2], row_ptr[r2 + 1]):
                c = column[t2]
                if at[c] < 0:
                    continue
                for u2 in range(t2 + 1, row_ptr[r2 + 1]):
                    d = column[u2]
                    if at[d] < 0:
                        continue
                    total = shift[at[c]] - shift[t2] + shift[u2] - shift[at[d]]
                    if total % lift == 0:
                        per_column[c] += 1
                        per_column[d] += 1
        for t in range(row_ptr[r], row_ptr[r + 1]):
            at[column[t]] = -1
    return per_column


def qc_four_cycles(code: Code) -> np.ndarray:
    """Per base column of a QC code, its base 4-cycles that lift to 4-cycles (Z each)."""
    lift, row_ptr, column, shift = code.qc
    return _qc_base_cycles(lift, row_ptr, column, shift, code.n // lift)


@numba.njit(cache=True)
def _qc_base_six_cycles(lift, row_ptr, column, shift, nb, light):
    """Base 6-cycles through at least one light column whose shift sum is 0 mod Z (each
    lifts to Z 6-cycles of the code), by how many of their three columns are light
    (index 1-3); enumerated from each light column c over pairs of its rows, independently
    of the construction's bookkeeping, each cycle once (at its lowest light column)."""
    mb = row_ptr.size - 1
    entries = row_ptr[mb]
    col_ptr = np.zeros(nb + 1, np.int64)
    for t in range(entries):
        col_ptr[column[t] + 1] += 1
    for c in range(nb):
        col_ptr[c + 1] += col_ptr[c]
    fill = col_ptr[:-1].copy()
    col_entry = np.empty(entries, np.int64)
    row_of = np.empty(entries, np.int64)
    for r in range(mb):
        for t in range(row_ptr[r], row_ptr[r + 1]):
            row_of[t] = r
            col_entry[fill[column[t]]] = t
            fill[column[t]] += 1
    at = np.full(nb, -1, np.int64)  # entry of column w in row r1, or -1
    counts = np.zeros(4, np.int64)
    for c in range(nb):
        if not light[c]:
            continue
        for i in range(col_ptr[c], col_ptr[c + 1]):
            t1 = col_entry[i]
            r1 = row_of[t1]
            for t in range(row_ptr[r1], row_ptr[r1 + 1]):
                at[column[t]] = t
            for j in range(i + 1, col_ptr[c + 1]):
                t2 = col_entry[j]
                r2 = row_of[t2]
                # the cycle c - r2 - u - r3 - w - r1 - c
                for tu in range(row_ptr[r2], row_ptr[r2 + 1]):
                    u = column[tu]
                    if u == c or (light[u] and u < c):
                        continue
                    for k in range(col_ptr[u], col_ptr[u + 1]):
                        t3 = col_entry[k]
                        r3 = row_of[t3]
                        if r3 == r1 or r3 == r2:
                            continue
                        partial = shift[t1] - shift[t2] + shift[tu] - shift[t3]
                        for tw in range(row_ptr[r3], row_ptr[r3 + 1]):
                            w = column[tw]
                            if w == u or w == c or at[w] < 0 or (light[w] and w < c):
                                continue
                            if (partial + shift[tw] - shift[at[w]]) % lift == 0:
                                counts[1 + light[u] + light[w]] += 1
            for t in range(row_ptr[r1], row_ptr[r1 + 1]):
                at[column[t]] = -1
    return counts


def qc_six_cycles(code: Code, light_degree: int = QC_LIGHT_DEGREE) -> np.ndarray:
    """Lifted 6-cycles of a QC code through light columns (degree <= light_degree), by how
    many of their three variables are light: [0, one, two, three] (0: not counted)."""
    lift, row_ptr, column, shift = code.qc
    nb = code.n // lift
    light = np.bincount(column, minlength=nb) <= light_degree
    return _qc_base_six_cycles(lift, row_ptr, column, shift, nb, light) * lift


def _check_qc_description(code: Code) -> None:
    """ValueError unless code.qc is a description that expands to exactly the code's CSR:
    the QC decoder indexes its buffers by the shifts and columns without bounds checks, so
    a cache file whose description disagrees (altered, or written by another version)
    must not reach it. ~7 ms for a 2^17 code."""
    from host.distil import ldpc_qc  # it imports this module

    lift, row_ptr, column, shift = code.qc
    if (
        lift != code.n // QC_BASE_COLUMNS
        or code.n % QC_BASE_COLUMNS
        or code.m != (row_ptr.size - 1) * lift
        or row_ptr[0] != 0
        or np.any(np.diff(row_ptr) < 0)
        or row_ptr[-1] != column.size
        or column.size != shift.size
        or np.any((column < 0) | (column >= QC_BASE_COLUMNS))
        or np.any((shift < 0) | (shift >= lift))
    ):
        raise ValueError("QC description out of range")
    check_ptr, check_var = ldpc_qc.expand(lift, row_ptr, column, shift)
    if not (
        np.array_equal(check_ptr, code.check_ptr) and np.array_equal(check_var, code.check_var)
    ):
        raise ValueError("QC description does not expand to the code")


def _construct_qc(n: int, rate: float, seed: int, distribution, shifts: str) -> Code:
    lift = n // QC_BASE_COLUMNS
    key = _qc_cache_key(n, _cache_key(n, rate, seed, distribution), shifts)
    if key in _CODES:
        return _CODES[key]
    path = cache_dir() / f"{key}.npz"
    code = _load_cached(path, key, n, rate, seed, quasi_cyclic=True)
    if code is not None:
        return code
    stairs, var_degrees, mb = _degrees(QC_BASE_COLUMNS, rate, distribution)
    ev, ec = _peg_edges(stairs, var_degrees, mb, seed)
    # Shifts of the staircase first (fixed), then of the heaviest columns: a light column's
    # edges come last, when every base cycle through them is known, and can each take one
    # of the Z shifts none of them forbids (PEG's order, lightest first, left the
    # heavy columns' later edges closing lifted 4-cycles through light ones).
    degree = np.bincount(ev, minlength=QC_BASE_COLUMNS)
    place = np.lexsort((-degree[ev], ev >= stairs))
    shift = np.empty_like(ev)
    light = degree <= QC_LIGHT_DEGREE
    shift[place], _ = _qc_shifts(
        ev[place],
        ec[place],
        stairs,
        QC_BASE_COLUMNS,
        mb,
        lift,
        QC_GREEDY[shifts],
        seed + 3,
        light,
    )
    order = np.lexsort((ev, ec))  # by base row, columns ascending within it
    ev, ec, shift = ev[order], ec[order], shift[order]
    if np.any((np.diff(ec) == 0) & (np.diff(ev) == 0)):
        raise ValueError(f"rate {rate}: a repeated base edge")  # _peg_edges never makes one
    row_ptr = np.zeros(mb + 1, np.int32)
    row_ptr[1:] = np.cumsum(np.bincount(ec, minlength=mb))
    column, shift = ev.astype(np.int32), shift.astype(np.int32)
    from host.distil import ldpc_qc  # it imports this module

    check_ptr, check_var = ldpc_qc.expand(lift, row_ptr, column, shift)
    # columns in place (no shuffle): the untainted positions are the lifts of every other
    # staircase base column (0, 2, 4, ...: a check's two staircase neighbours are the same
    # lane of base columns r - 1 and r, so it has at most one of them)
    untainted = (np.arange(0, stairs, 2)[:, None] * lift + np.arange(lift)[None, :]).ravel()
    order = _public_order(n, untainted, seed)
    m = mb * lift
    qc = (lift, row_ptr, column, shift)
    return _store(path, key, Code(n, m, check_ptr, check_var, seed, rate, order, qc))


# Decoder messages kept for the next part (MessageBuffers), at most this many bytes: the
# 1 M-bit blocks' 8 frames of 2^17 take ~34 MB, a stream chunk's 2 frames ~9 MB; a larger
# part (a jinan-1 pass's 22 frames of 2^18, ~180 MB) is allocated and dropped as before.
MESSAGE_BUFFER_KEEP_BYTES = 128 << 20


class MessageBuffers:
    """Zeroed check messages (float32, frames x edges) for the decoders, from buffers that
    earlier parts gave back. A fresh array of tens of MB is untouched memory: np.zeros left
    its page faults to the kernel, which reads each message before it writes it (a read
    fault onto the zero page, then a copy-on-write fault, on both cores' threads at once),
    and np.empty + fill moves them to the fill. Either way 35-115 ms per 1 M-bit block
    (8 frames of 2^17, 34 MB: 4 KB pages when the kernel has no transparent huge page to
    give), against ~3 ms to zero a buffer already mapped (docs/distillation.md, "Decoder
    messages from kept buffers"). Thread-safe (one process may reconcile several blocks at
    once: reconcile._decode)."""

    def __init__(self, keep_bytes: int = MESSAGE_BUFFER_KEEP_BYTES):
        self.keep_bytes = keep_bytes
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def kept_bytes(self) -> int:
        with self._lock:
            return sum(b.nbytes for b in self._free)

    def take(self, frames: int, edges: int) -> np.ndarray:
        """A zeroed (frames, edges) view of a kept buffer (the smallest that holds it; kept
        buffers are zero, see give) or of a new one; give it back with give() once the
        decoder is done with it."""
        need = frames * edges
        with self._lock:
            # kept sorted by size (give): the first that holds it is the smallest
            fitting = next((i for i, b in enumerate(self._free) if b.size >= need), None)
            buffer = None if fitting is None else self._free.pop(fitting)
        if buffer is None:
            buffer = np.empty(need, dtype=np.float32)
            buffer.fill(0)
        return buffer[:need].reshape(frames, edges)

    def give(self, messages: np.ndarray) -> None:
        """Zero the buffer behind messages (from take) and keep it for a later part, the
        largest dropped first while more than keep_bytes are kept. Zeroed here, not when
        taken: the messages' signs are Bob's corrected bits, and a kept buffer must not hold
        them after its part. The caller must not use messages after."""
        buffer = messages
        while buffer.base is not None:  # the 1-D array take() made
            buffer = buffer.base
        buffer.fill(0)
        with self._lock:
            if any(kept is buffer for kept in self._free):
                # two later take()s would hand it to two parts
                raise RuntimeError("a decoder message buffer given back twice")
            self._free.append(buffer)
            self._free.sort(key=lambda b: b.size)
            while self._free and sum(b.nbytes for b in self._free) > self.keep_bytes:
                self._free.pop()


MESSAGE_BUFFERS = MessageBuffers()


def decode_frames(llr, syndromes, check_ptr, check_var, max_iterations, out_bits, out_iters):
    """Layered sum-product syndrome decoding of many frames from scratch; returns success
    flags (see decode_frames_warm)."""
    messages = np.zeros((llr.shape[0], check_var.size), dtype=np.float32)
    return decode_frames_warm(
        llr, syndromes, check_ptr, check_var, max_iterations, messages, out_bits, out_iters
    )


@numba.njit(cache=True, inline="always")
def _hard_decision_satisfies(post, syndromes, f, m, check_ptr, check_var):
    """Whether the hard decision of the posteriors `post` meets frame f's syndrome.
    Inlined at numba IR level, so each decoder compiles it under its own fastmath flags."""
    for j in range(m):
        acc = syndromes[f, j]
        for e in range(check_ptr[j], check_ptr[j + 1]):
            if post[check_var[e]] < 0:
                acc ^= 1
        if acc:
            return False
    return True


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
            done = _hard_decision_satisfies(post, syndromes, f, m, check_ptr, check_var)
        for v in range(n):
            out_bits[f, v] = 1 if post[v] < 0 else 0
        out_iters[f] += it
        ok[f] = done
    return ok


# The check update of sum-product in the log domain (Gallager): the magnitude of the
# message to edge e is phi(sum over the other edges of phi(|q|)), phi(x) = ln coth(x/2)
# (its own inverse), its sign the product of the other signs and the syndrome bit. phi
# comes from a table (PHI_STEPS_PER_UNIT per unit of LLR up to PHI_MAX_LLR; 64 KB, stays
# in cache): two lookups and two additions per edge instead of a tanh, an atanh and
# three products, with sum-product's decoding performance (normalised min-sum, the usual
# cheap choice, left frames stuck at rate 0.7 where sum-product decoded in 4 iterations:
# the check degrees here reach 80 and min-sum's overestimate grows with the degree).
PHI_STEPS_PER_UNIT = 1024
PHI_MAX_LLR = 16.0
# A frame whose count of unsatisfied checks has not reached a new low for this many
# iterations is given up for this attempt: it will not decode without more information,
# and the retry path (which resumes from its messages) is cheaper than spinning. Measured
# on 1 M bits per QBER, one noise seed (docs/distillation.md): 16 -> 8 left f within
# 0.001 at 1-5 % and cut the decoder's iterations by 23 % (1-2 %) and 13 % (3 %); 4 cost
# up to 0.0025 in f for 10-18 % fewer again.
STALL_ITERATIONS = 8
# decode_phi's stall_progress is in units of 1 / PROGRESS_UNIT of the best count.
PROGRESS_UNIT = 1024


def _phi_table() -> np.ndarray:
    x = np.arange(int(PHI_MAX_LLR * PHI_STEPS_PER_UNIT) + 1, dtype=np.float64)
    x /= PHI_STEPS_PER_UNIT
    x[0] = 0.5 / PHI_STEPS_PER_UNIT  # phi(0) is infinite: take half a step
    return np.log(1.0 / np.tanh(0.5 * x)).astype(np.float32)


PHI_TABLE = _phi_table()


PHI_SCALE = np.float32(PHI_STEPS_PER_UNIT)
PHI_MAX = np.float32(PHI_MAX_LLR)

# A check's sum of phi(|q|) is kept in integers (PHI_FIXED_BITS fractional bits of an LLR),
# not in float32: integer addition gives the same sum in any order, so the decoder's output
# no longer depends on how LLVM vectorises the reduction. With float sums under fastmath
# (reassociation allowed) the same source freshly compiled and loaded from numba's cache
# left bitwise different messages at check degrees >= SEPARATE_GATHER_DEGREE, and the same
# pass distilled in a fresh clone's first process and in later ones gave keys 49-89 bits
# apart (docs/distillation.md, "Keys depend on the process"). 2^-20 of an LLR is finer
# than float32's rounding at phi ~1 and 1000x finer than the table's step; the sum of a
# check of PHI_FIXED_MAX_DEGREE entries of the largest phi (8.32) still fits an int32.
PHI_FIXED_BITS = 20
PHI_TABLE_FIXED = np.round(PHI_TABLE.astype(np.float64) * (1 << PHI_FIXED_BITS)).astype(np.int32)
PHI_FIXED_MAX_DEGREE = int((2**31 - 1) // int(PHI_TABLE_FIXED.max()))
# fixed sum -> table index: round(x * PHI_STEPS_PER_UNIT), PHI_STEPS_PER_UNIT = 2^10
PHI_FIXED_SHIFT = np.int32(PHI_FIXED_BITS - 10)
PHI_FIXED_HALF = np.int32(1 << (PHI_FIXED_SHIFT - 1))
PHI_LAST = np.int32(PHI_TABLE.size - 1)
assert 1 << (PHI_FIXED_BITS - PHI_FIXED_SHIFT) == PHI_STEPS_PER_UNIT


@numba.njit(cache=True, inline="always")
def _phi(table, x):
    """phi(x) for x >= 0 from the table (x beyond PHI_MAX_LLR takes the last entry).
    float32 arithmetic and an int32 index (one vcvttps2dq, and the loops below vectorise
    with gathers from the table)."""
    return table[np.int32(min(x, PHI_MAX) * PHI_SCALE + np.float32(0.5))]


# Checks of at least this degree gather their posteriors in a loop of their own (it
# vectorises: AVX-512/AVX2 gathers); lighter checks gather inside the first pass, where a
# separate loop's entry costs more than it saves. Measured as reconciliation runs it (8
# frames on both cores, uint16 edge variables, CPU per edge update, two alternated runs
# each; `/tmp` A/B, load 5-9), separate / fused: check degree 43 (rate 0.825) 2.86-2.91 /
# 3.42-3.47 ns, 30 (0.7625) 3.37-3.41 / 3.54-3.66, 19 (0.6575) 3.89-4.10 / 3.45-3.85. (One
# thread alone favoured the fused loop up to degree ~50: the two cores' caches change it.)
SEPARATE_GATHER_DEGREE = 24


def decode_phi(
    llr, syndromes, check_ptr, check_var, max_iterations, messages, out_bits, out_iters, stall,
    stall_progress=0,
):  # fmt: skip
    """Layered sum-product syndrome decoding (phi table, see PHI_STEPS_PER_UNIT) of many
    frames (numba prange over frames: both cores), continuing from the check messages of
    an earlier attempt (zeros: a fresh start); the messages (float32, frames x edges) are
    updated in place, out_iters accumulates. Stops a frame when its hard decision
    satisfies the syndrome (checked in full once a running count of the checks left
    unsatisfied by their own update reaches zero), or when it stalls: its fewest
    unsatisfied checks so far fell by less than stall_progress / PROGRESS_UNIT over the
    last `stall` iterations (stall_progress 0: no new low in `stall`, STALL_ITERATIONS;
    reconcile.LDPC_EARLY_STALL gives up sooner). Returns success flags. (decode_phi_rows
    on every row.)"""
    rows = np.arange(llr.shape[0], dtype=np.int64)
    return decode_phi_rows(
        rows, llr, syndromes, check_ptr, check_var, max_iterations, messages, out_bits,
        out_iters, stall, stall_progress,
    )  # fmt: skip


# fastmath without 'reassoc': no float operation of the update can be reordered by LLVM,
# so the result is the source's however numba compiled the kernel (in the process or
# loaded from its cache: docs/distillation.md "Keys depend on the process"); with integer
# sums (PHI_TABLE_FIXED) nothing is left that reassociation would speed up. 'contract' is
# kept: the only products are by a power of two (_phi's index) and by +-1 (the sign), both
# exact, so a fused multiply-add rounds as the separate operations do (without it the
# lighter checks' loop ran ~3 % slower). The others only assume finite values (LLRs are:
# LLR_KNOWN at most) and that the sign of a zero does not matter (every test of a value is
# < 0 or >= 0).
DECODER_FASTMATH = {"nnan", "ninf", "nsz", "contract", "arcp", "afn"}


@numba.njit(cache=True, inline="always")
def _stalled(best, it, unsatisfied, stall, keep):
    """The stall rule of decode_phi_rows and ldpc_qc's decoder: best[it] takes the fewest
    unsatisfied checks so far; stalled when the last `stall` iterations lowered it by less
    than stall_progress / PROGRESS_UNIT of it (keep = PROGRESS_UNIT - stall_progress; 0:
    reached no new low)."""
    best[it] = min(best[it - 1], unsatisfied)
    return it >= stall and best[it] * PROGRESS_UNIT >= keep * best[it - stall]


@numba.njit(cache=True, inline="always")
def _hard_decision_out(post, f, it, out_bits, out_iters):
    """Frame f's hard decision into out_bits, its iterations added to out_iters."""
    for v in range(post.size):
        out_bits[f, v] = 1 if post[v] < 0 else 0
    out_iters[f] += it


@numba.njit(cache=True, parallel=True, fastmath=DECODER_FASTMATH)
def decode_phi_rows(
    rows, llr, syndromes, check_ptr, check_var, max_iterations, messages, out_bits, out_iters,
    stall, stall_progress=0,
):  # fmt: skip
    """decode_phi on the frames `rows` of the arrays, in place: a retry round decodes its
    pending frames where they are (copying them out and back, 36 MB of messages for a
    16-frame block at 1 % QBER, cost 5-6 % of the block's reconciliation). Returns the
    success flags of `rows`, in their order.
    Each check's update is written as loops over its edges that LLVM vectorises (gathers
    of the posteriors and of the table, the sum and the sign count as reductions, the
    sign as a select, no branch on data); only the scatter of the new posteriors is
    scalar. The sum is in integers (PHI_TABLE_FIXED), so that every order of it, however
    LLVM vectorises it, gives the same messages. Signs are counted, not branched on: a
    message's sign is a coin flip to the branch predictor (the branchy form ran 2.5x
    slower)."""
    table = PHI_TABLE
    fixed = PHI_TABLE_FIXED
    n = llr.shape[1]
    m = check_ptr.size - 1
    ok = np.zeros(rows.size, dtype=np.bool_)
    maxdeg = 0
    for j in range(m):
        maxdeg = max(maxdeg, check_ptr[j + 1] - check_ptr[j])
    if maxdeg > PHI_FIXED_MAX_DEGREE:
        raise ValueError("check degree beyond PHI_FIXED_MAX_DEGREE: the phi sum overflows")
    for row in numba.prange(rows.size):
        f = rows[row]
        r = messages[f]
        post = np.empty(n, dtype=np.float32)
        for v in range(n):
            post[v] = llr[f, v]
        for e in range(check_var.size):
            post[check_var[e]] += r[e]
        q = np.empty(maxdeg, dtype=np.float32)
        p = np.empty(maxdeg, dtype=np.int32)
        g = np.empty(maxdeg, dtype=np.float32)
        it = 0
        done = False
        # best[i]: the fewest unsatisfied checks after i iterations (best[0]: more than m)
        best = np.empty(max_iterations + 1, dtype=np.int64)
        best[0] = m + 1
        keep = np.int64(PROGRESS_UNIT - stall_progress)
        while it < max_iterations and not done:
            it += 1
            unsatisfied = 0
            for j in range(m):
                start = check_ptr[j]
                deg = check_ptr[j + 1] - start
                cv = check_var[start : start + deg]
                rj = r[start : start + deg]
                total = np.int32(0)
                negative = np.int32(syndromes[f, j])
                if deg >= SEPARATE_GATHER_DEGREE:
                    for i in range(deg):
                        g[i] = post[cv[i]]
                    for i in range(deg):
                        qi = g[i] - rj[i]
                        q[i] = qi
                        negative += np.int32(qi < 0)
                        pi = _phi(fixed, abs(qi))
                        p[i] = pi
                        total += pi
                else:
                    for i in range(deg):
                        qi = post[cv[i]] - rj[i]
                        q[i] = qi
                        negative += np.int32(qi < 0)
                        pi = _phi(fixed, abs(qi))
                        p[i] = pi
                        total += pi
                # the sign of the product of the others and the syndrome bit, times the
                # edge's own sign (sign * sign = 1)
                sign = np.float32(-1.0) if negative & 1 else np.float32(1.0)
                hard = np.int32(syndromes[f, j])
                for i in range(deg):
                    qi = q[i]
                    # the others' sum, exact (total >= p[i]); its table index rounded
                    index = min((total - p[i] + PHI_FIXED_HALF) >> PHI_FIXED_SHIFT, PHI_LAST)
                    mag = table[index]
                    ri = (sign if qi >= 0 else -sign) * mag
                    rj[i] = ri
                    pv = qi + ri
                    g[i] = pv
                    hard += np.int32(pv < 0)
                for i in range(deg):
                    post[cv[i]] = g[i]
                unsatisfied += hard & 1
            if unsatisfied == 0:
                done = _hard_decision_satisfies(post, syndromes, f, m, check_ptr, check_var)
            if _stalled(best, it, unsatisfied, stall, keep):
                break
        _hard_decision_out(post, f, it, out_bits, out_iters)
        ok[row] = done
    return ok


def punctured_rank(code: Code, p: int) -> int:
    """rank over GF(2) of the columns of H at the first p puncture positions."""
    if p == 0:
        return 0
    cached = _RANKS.get((code.digest(), p))
    if cached is not None:
        return cached
    columns = [0] * p
    position = np.full(code.n, -1, dtype=np.int64)
    position[code.order[:p]] = np.arange(p)
    edge_position = position[code.check_var]
    punctured_edges = np.nonzero(edge_position >= 0)[0]
    edge_check = np.searchsorted(code.check_ptr, punctured_edges, side="right") - 1
    for i, j in zip(edge_position[punctured_edges].tolist(), edge_check.tolist(), strict=True):
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
_UNTAINTED: dict = {}


def untainted_prefix(code: Code) -> int:
    """The longest prefix of code.order in which no check has two members."""
    key = code.digest()
    if key not in _UNTAINTED:
        rank = np.empty(code.n, dtype=np.int64)
        rank[code.order] = np.arange(code.n)
        # for each check its members' ranks in the order; the prefix ends where a check
        # meets its second member
        _UNTAINTED[key] = _earliest_second_member(code.check_ptr, rank[code.check_var], code.n)
    return _UNTAINTED[key]


@numba.njit(cache=True)
def _earliest_second_member(check_ptr, edge_rank, n):
    """min over checks of the second-lowest rank among the check's edges (n if none has
    two): one pass over the edges (a lexsort of them took 0.4 s at 2^16)."""
    earliest = n
    for j in range(check_ptr.size - 1):
        lowest = n
        second = n
        for e in range(check_ptr[j], check_ptr[j + 1]):
            r = edge_rank[e]
            if r < lowest:
                second = lowest
                lowest = r
            elif r < second:
                second = r
        earliest = min(earliest, second)
    return earliest


def ascending(positions: np.ndarray, n: int) -> np.ndarray:
    """np.sort(positions) for distinct positions in [0, n), by marking them: O(n) where the
    sort is O(k log k) (a frame's key positions: ~0.5 ms against ~3 ms at 2^17, and
    reconciliation lays out every frame of every round)."""
    marked = np.zeros(n, dtype=np.bool_)
    marked[positions] = True
    return np.flatnonzero(marked).astype(positions.dtype, copy=False)


# Mother rates below this shorten the last s positions of the public order (random
# positions off the staircase's untainted half) instead of the s after the punctured ones
# (the rest of that half). Frames of 2^17 filled to 0.9 (~13,300 shortened) had mean
# thresholds of 1.073-1.125 from 1.5 to 6 % QBER shortened after the punctured bits,
# 1.065-1.078 shortened from the end; at 1 % (rate ~0.91) the first was 0.007 better, at
# 1.3-1.5 % (0.88-0.89) the two were level (docs/distillation.md, "Shortened positions
# and designs", session 20). And only frames with more than SHORTEN_FROM_END_MIN_SHARE of
# their positions shortened: a few shortened staircase bits cost nothing (the bench's
# 1 M-bit frames at 2 %, 2.5 % shortened: 1.068 against 1.071 from the end; jinan-1's
# full passes, frames filled to 0.96 or more: f 1.049 / 1.051 against 1.053 / 1.057).
SHORTEN_FROM_END_BELOW_RATE = 0.875
SHORTEN_FROM_END_MIN_SHARE = 1 / 16


@dataclass
class FramePlan:
    """How a mother code is adapted to a target rate: the first p positions of the code's
    public order are punctured; s are shortened, the next s after them or, at a mother
    rate under SHORTEN_FROM_END_BELOW_RATE with more than SHORTEN_FROM_END_MIN_SHARE of
    the frame shortened, the last s; the rest carry key bits."""

    code: Code
    punctured: int
    shortened: int

    @property
    def key_bits(self) -> int:
        return self.code.n - self.punctured - self.shortened

    def _shortened_from_end(self) -> bool:
        return (
            self.code.rate < SHORTEN_FROM_END_BELOW_RATE
            and self.shortened > SHORTEN_FROM_END_MIN_SHARE * self.code.n
        )

    @property
    def key_order(self) -> np.ndarray:
        """The key positions in the public order (a short frame fills the first ones, and
        the retries reveal them in this order after the punctured bits)."""
        p, s, n = self.punctured, self.shortened, self.code.n
        if self._shortened_from_end():
            return self.code.order[p : n - s]
        return self.code.order[p + s :]

    @property
    def key_positions(self) -> np.ndarray:
        return ascending(self.key_order, self.code.n)

    @property
    def punctured_positions(self) -> np.ndarray:
        return self.code.order[: self.punctured]

    @property
    def shortened_positions(self) -> np.ndarray:
        p, s, n = self.punctured, self.shortened, self.code.n
        if self._shortened_from_end():
            return self.code.order[n - s :]
        return self.code.order[p : p + s]

    def leak_bits(self) -> int:
        return self.code.m - punctured_rank(self.code, self.punctured)

    def untainted_punctured(self) -> int:
        """How many of the punctured positions, from the start of the public order, have
        no check with two punctured neighbours (ldpc._public_order puts the untainted ones
        first)."""
        return min(self.punctured, untainted_prefix(self.code))


def plan_for(
    qber: float,
    efficiency: float,
    n: int | None = None,
    seed: int = 1,
    key_bits: int | None = None,
    qber_high: float | None = None,
) -> FramePlan:
    """The mother code and (p, s) for frames of key_bits key bits (default: as many as fit)
    leaking efficiency * h(qber) per key bit: leak m - p = efficiency h key_bits.

    The mother code is the highest grid rate leaving at least the punctured reserve
    (reserve_bits: what the retry path can reveal at a syndrome bit's worth each, enough
    to reach qber_high, default qber). Positions that are neither key nor punctured are
    shortened (known zeros: no leak, only capacity)."""
    from host.distil.finite_key import binary_entropy

    n = n or FRAME_BITS
    h = binary_entropy(min(max(qber, 1e-4), 0.5))
    per_bit = efficiency * h
    if key_bits is None:
        key_bits = max_key_bits(qber, efficiency, n, qber_high)
    code = construct(n, mother_rate_for(qber, efficiency, n, key_bits, qber_high), seed)
    p = int(round(code.m - per_bit * key_bits))
    p = min(max(p, 0), code.n - key_bits)
    return FramePlan(code, p, code.n - key_bits - p)


def mother_rate_for(
    qber: float, efficiency: float, n: int, key_bits: int, qber_high: float | None = None
) -> float:
    """The mother code's rate plan_for picks (without building it): the highest grid rate
    whose m holds the frame's leak and the punctured reserve (host/distil/provision.py
    enumerates the codes a pass can pick through it)."""
    from host.distil.finite_key import binary_entropy

    h = binary_entropy(min(max(qber, 1e-4), 0.5))
    need = efficiency * h * key_bits + reserve_bits(qber, efficiency, n, key_bits, qber_high)
    for candidate in reversed(MOTHER_RATES):
        if round(n * (1 - candidate)) >= need:
            return candidate
    return MOTHER_RATES[0]


def _reserve_per_key_bit(qber: float, efficiency: float, qber_high: float | None) -> float:
    """Punctured bits per key bit kept for the retry path: RETRY_RESERVE_F h, plus what it
    takes to go from efficiency h(qber) to efficiency h(qber_high) per key bit (a first
    attempt sized for the low end of the QBER's confidence interval, reserve to its high
    end)."""
    from host.distil.finite_key import binary_entropy

    h = binary_entropy(min(max(qber, 1e-4), 0.5))
    h_high = binary_entropy(min(max(qber_high or qber, qber, 1e-4), 0.5))
    return RETRY_RESERVE_F * h_high + efficiency * (h_high - h)


def reserve_bits(
    qber: float, efficiency: float, n: int, key_bits: int, qber_high: float | None = None
) -> float:
    """The punctured reserve of a frame (see plan_for), at least RETRY_RESERVE_MIN n."""
    a = _reserve_per_key_bit(qber, efficiency, qber_high)
    return max(a * key_bits, RETRY_RESERVE_MIN * n)


def frame_bits_for(
    count: int, qber: float, efficiency: float, qber_high: float | None = None
) -> int:
    """The frame length of a block of `count` key bits sized for (qber, qber_high): the
    longest of FRAME_BITS and LONG_FRAME_BITS of which the block fills at least
    LONG_FRAME_MIN_FRAMES frames; else, sized at a qber of at least SMALL_BLOCK_MIN_QBER,
    the shortest of LONG_FRAME_BITS of which it makes at least MID_FRAME_MIN_FRAMES frames,
    or for a block of 2 to LONG_FRAME_MIN_FRAMES - 1 frames of FRAME_BITS the shortest of
    LONG_FRAME_BITS of which it fills one frame to at least SMALL_BLOCK_MIN_FILL; else
    FRAME_BITS."""
    # key bits of one frame of each length, once
    room = {
        n: max_key_bits(qber, efficiency, n, qber_high) for n in {FRAME_BITS, *LONG_FRAME_BITS}
    }
    n = FRAME_BITS
    for candidate in LONG_FRAME_BITS:
        if candidate > n and count >= LONG_FRAME_MIN_FRAMES * room[candidate]:
            n = candidate
    if n != FRAME_BITS or qber < SMALL_BLOCK_MIN_QBER:
        return n
    longer = sorted(candidate for candidate in LONG_FRAME_BITS if candidate > n)
    if longer and count > (MID_FRAME_MIN_FRAMES - 1) * room[longer[0]]:
        return longer[0]
    if not 1 < math.ceil(count / max(room[n], 1)) < LONG_FRAME_MIN_FRAMES:
        return n
    for candidate in longer:
        if count <= room[candidate]:
            return candidate if count >= SMALL_BLOCK_MIN_FILL * room[candidate] else n
    return n


def max_key_bits(
    qber: float, efficiency: float, n: int | None = None, qber_high: float | None = None
) -> int:
    """Key bits per frame: the frame minus the punctured reserve and one grid step (so the
    rate grid can always be met), fewer where even the lowest mother rate needs it."""
    from host.distil.finite_key import binary_entropy

    n = n or FRAME_BITS
    h = binary_entropy(min(max(qber, 1e-4), 0.5))
    a = _reserve_per_key_bit(qber, efficiency, qber_high)
    lowest_m = round(n * (1 - MOTHER_RATES[0]))
    per_bit = efficiency * h
    fit = min((lowest_m - RETRY_RESERVE_MIN * n) / max(per_bit, 1e-9), lowest_m / (per_bit + a))
    room = n * (1 - RATE_STEP)
    return int(min(room - RETRY_RESERVE_MIN * n, room / (1 + a), fit))


def channel_llr(bits: np.ndarray, qber: float) -> np.ndarray:
    q = min(max(qber, 1e-6), 0.5 - 1e-6)
    magnitude = math.log((1 - q) / q)
    return np.where(np.asarray(bits, dtype=np.uint8) == 1, -magnitude, magnitude)
