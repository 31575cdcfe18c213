"""Finite-key length written out again from the papers, independently of
host/distil/finite_key.py, for known-answer tests (unit, end to end, benchmarks).

Lim et al., PRA 89, 022307 (2014), eqs. (1)-(5); Rusca et al., APL 112, 171104 (2018),
eqs. (1)-(4). Z is the key basis here (the papers' letters swapped where needed). The
Chernoff variant is not inverted in closed form here: each interval end is found by
bisection on the multiplicative Chernoff tails themselves,
  P[X <= (1 - d) E] <= exp(-d^2 E / 2),  P[X >= (1 + d) E] <= exp(-d^2 E / (2 + d)).
"""

from __future__ import annotations

import math


def h2(p: float) -> float:
    return 0.0 if p <= 0 or p >= 1 else -p * math.log2(p) - (1 - p) * math.log2(1 - p)


def _bisect(f, lo: float, hi: float) -> float:
    """Root of an increasing f on [lo, hi]."""
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if f(mid) < 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def chernoff_interval(x: float, eps: float) -> tuple[float, float]:
    """(lower, upper) on the expectation E of a sum of independent Bernoulli trials observed
    as x, each end failing with probability eps."""
    log_eps = math.log(eps)

    # upper E: the largest E for which x is still not eps-unlikely in the lower tail
    def lower_tail_log(e):  # log P-bound of X <= x given E = e (e > x), decreasing in e
        d = (e - x) / e
        return -(d * d) * e / 2.0

    hi = x + 10.0 + 10.0 * math.sqrt(x + 1.0) * math.sqrt(-log_eps) + 10 * -log_eps
    upper = _bisect(lambda e: log_eps - lower_tail_log(e), x, hi)
    if x <= 0:
        return 0.0, upper

    def upper_tail_log(e):  # log P-bound of X >= x given E = e (e < x), increasing in e
        d = (x - e) / e
        return -(d * d) * e / (2.0 + d)

    if upper_tail_log(1e-300) > log_eps:
        return 0.0, upper
    lower = _bisect(lambda e: upper_tail_log(e) - log_eps, 1e-300, x)
    return lower, upper


def interval(x: float, total: float, eps: float, tail: str) -> tuple[float, float]:
    if tail == "hoeffding":
        delta = math.sqrt(total / 2.0 * math.log(1.0 / eps))
        return max(x - delta, 0.0), x + delta
    return chernoff_interval(x, eps)


def tau(n: int, intens: dict, probs: dict) -> float:
    return sum(
        probs[k] * math.exp(-intens[k]) * intens[k] ** n / math.factorial(n) for k in intens
    )


def key_length(
    key_counts: dict,
    test_counts: dict,
    intens: dict,
    probs: dict,
    *,
    analysis: str,
    tail: str,
    eps_sec: float,
    eps_cor: float,
    leak: float,
) -> dict:
    """{s0, s1, s1_test, v1, phi, length}; counts are {intensity: (n, m)}."""
    order = sorted(intens, key=lambda k: -intens[k])
    c = 21 if analysis == "lim2014" else 19
    eps = eps_sec / c
    t0, t1 = tau(0, intens, probs), tau(1, intens, probs)

    def bound(counts, k, idx, upper):
        total = sum(v[idx] for v in counts.values())
        lo, hi = interval(counts[k][idx], total, eps, tail)
        return math.exp(intens[k]) / probs[k] * (hi if upper else lo)

    def lim_s0_s1(counts):
        k1, k2, k3 = order
        u1, u2, u3 = intens[k1], intens[k2], intens[k3]
        s0 = t0 * (u2 * bound(counts, k3, 0, False) - u3 * bound(counts, k2, 0, True)) / (u2 - u3)
        s0 = max(s0, 0.0)
        s1 = (
            t1
            * u1
            / (u1 * (u2 - u3) - (u2**2 - u3**2))
            * (
                bound(counts, k2, 0, False)
                - bound(counts, k3, 0, True)
                - (u2**2 - u3**2) / u1**2 * (bound(counts, k1, 0, True) - s0 / t0)
            )
        )
        return s0, s1

    def rusca_s0_s1(counts):
        k1, k2 = order[0], order[1]
        u1, u2 = intens[k1], intens[k2]
        n_basis = sum(v[0] for v in counts.values())
        s0_l = (
            t0 / (u1 - u2) * (u1 * bound(counts, k2, 0, False) - u2 * bound(counts, k1, 0, True))
        )
        # eq. (2): s0 <= 2 (tau0 e^mu2 / p_mu2 m+_mu2 + delta(n_Z, eps)); the Chernoff case
        # takes the same step with the Chernoff upper end instead of + delta
        expected_vacuum_errors = t0 * bound(counts, k2, 1, True)
        s0_u = 2.0 * interval(expected_vacuum_errors, n_basis, eps, tail)[1]
        s1 = (
            t1
            * u1
            / (u2 * (u1 - u2))
            * (
                bound(counts, k2, 0, False)
                - u2**2 / u1**2 * bound(counts, k1, 0, True)
                - (u1**2 - u2**2) / u1**2 * s0_u / t0
            )
        )
        return max(s0_l, 0.0), s1

    s0_s1 = lim_s0_s1 if analysis == "lim2014" else rusca_s0_s1
    s0, s1 = s0_s1(key_counts)
    _, s1x = s0_s1(test_counts)
    if analysis == "lim2014":
        k2, k3 = order[1], order[2]
        v1 = t1 * (bound(test_counts, k2, 1, True) - bound(test_counts, k3, 1, False))
        v1 /= intens[k2] - intens[k3]
    else:
        k1, k2 = order[0], order[1]
        v1 = t1 * (bound(test_counts, k1, 1, True) - bound(test_counts, k2, 1, False))
        v1 /= intens[k1] - intens[k2]
    v1 = max(v1, 0.0)
    if s1 <= 0 or s1x <= 0:
        return {"s0": s0, "s1": s1, "s1_test": s1x, "v1": v1, "phi": 0.5, "length": 0}
    b = min(v1 / s1x, 0.5)
    # Lim eq. (5): gamma(eps_sec, b, s1, s1x) with its 21^2 (Rusca reuses it as printed)
    inner = (s1 + s1x) / (s1 * s1x * (1 - b) * b) * 21**2 / eps_sec**2 if 0 < b < 0.5 else 0
    gamma = (
        math.sqrt((s1 + s1x) * (1 - b) * b / (s1 * s1x * math.log(2)) * math.log2(inner))
        if inner > 1
        else (0.0 if 0 < b < 0.5 else 0.5)
    )
    phi = min(b + gamma, 0.5)
    if phi >= 0.5:
        return {"s0": s0, "s1": s1, "s1_test": s1x, "v1": v1, "phi": phi, "length": 0}
    length = s0 + s1 * (1 - h2(phi)) - leak - 6 * math.log2(c / eps_sec) - math.log2(2 / eps_cor)
    return {
        "s0": s0,
        "s1": s1,
        "s1_test": s1x,
        "v1": v1,
        "phi": phi,
        "length": max(math.floor(length), 0),
    }


def recomputed_key_bits(report: dict, bob_counts_bits: dict | None = None) -> int:
    """The key length recomputed from a distillation report's counts (the report's analysis
    and tail, epsilons split over the key blocks). The leak: the EC leak, the verification
    tags, the discarded frames' disclosed bits (the counts are the whole key block's) and
    Bob's error counts (bob_counts_bits, from the wire when the caller recorded it)."""
    prof = report["profile"]
    blocks = report["blocks"]
    total = 0
    for block in blocks:
        key_b, test_b = block["basis"], block["test_basis"]
        key_counts = {k: tuple(v) for k, v in report["counts_key_blocks"][key_b].items()}
        test_counts = {k: (v["n"], v["m"]) for k, v in report["counts"][test_b].items()}
        counts_bits = (bob_counts_bits or {}).get(key_b, block["leak_bob_counts_bits"])
        leak = block["leak_ec_bits"] + block["leak_verification_bits"] + block["bits_discarded"]
        total += key_length(
            key_counts,
            test_counts,
            prof["intensities"],
            prof["intensity_probabilities"],
            analysis=report["analysis"],
            tail=report["tail"],
            eps_sec=report["epsilon"]["sec"] / len(blocks),
            eps_cor=report["epsilon"]["cor"] / len(blocks),
            leak=leak + counts_bits,
        )["length"]
    return total
