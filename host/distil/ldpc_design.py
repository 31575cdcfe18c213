"""Degree distributions of the LDPC mother codes, designed in the project for syndrome
decoding on the binary symmetric channel.

Method: density evolution under a semi-Gaussian approximation, then linear programming.
- Channel messages are exact: +-ln((1-q)/q) with probabilities 1-q and q.
- The check-node update is exact in the statistic E[tanh(L/2)]. It is multiplicative
  for independent messages.
- Only the check-to-variable message is taken as Gaussian N(m, 2m). Chung, Richardson
  and Urbanke (2001) take every message as Gaussian; this is their method, with the
  BSC channel kept exact.
- With the check degrees concentrated on two neighbours (floor(dc), floor(dc)+1), the
  condition that decoding converges from every check mean m on a grid is linear in the
  edge fractions lambda_i. The rate is maximised by an LP:
  - subject to the BSC stability condition lambda_2 rho'(1) 2 sqrt(q(1-q)) < 1;
  - with at most m - 1 degree-2 variables, so that they fit the cycle-free staircase.
- The threshold q*(R) is the largest q at which rate R is still reachable; from rate 0.84
  on, every iteration must raise the check mean by GROWTH_MARGIN (10 %), not merely
  raise it.

The approximation is optimistic at high rates: with degrees up to 80 it puts R >= 0.8
slightly beyond capacity (f* 0.997 at R = 0.8).
So the table in ldpc.py is judged by finite-length simulation (benchmarks/bench_distil.py,
docs/distillation.md), not by q*. `threshold_f` checks a design by density evolution with
no approximation (population dynamics): the designs the 1 M-bit plans use come to f*
1.02-1.04 at 1-5 % QBER, so f's distance from 1 at 2^16 bits is mostly finite length
(docs/distillation.md, "Threshold analysis, session 10"). Exact discretised density
evolution (ldpc_de) showed the approximate design's entry at rate 0.84 short of what exact
density evolution can reach: `design_exact` re-optimises the rates of EXACT_DESIGNS by an
iterative LP on exact densities (below; docs/distillation.md, "Exact density evolution").
The table was regenerated with

    python -m host.distil.ldpc_design   # about 10 min on one core, plus ~9 min for 0.84

Deterministic, with no randomness.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from scipy.optimize import brentq, linprog

import host.distil.numba_cache  # noqa: F401 - numba's cache index locked among processes

DEGREES = np.array([2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 15, 20, 25, 30, 40, 50, 60, 80])
# Highest variable degree. A few degree-80 nodes converge first and anchor the rest.
# Measured per frame (16 frames of 2^16 bits, the same noise for every design, retries of
# 0.005 in f): at 1 % QBER f went from 1.119 with 30 to 1.095 with 80 (12: 1.159,
# 20: 1.139, 45: 1.111, 60: 1.101; 120 left one frame stuck at 1.78); at 2, 3 and 5 % it
# fell by 0.018, 0.015 and 0.010. Again on the QC codes (session 14, 64 frames per design,
# docs/distillation.md "Degree distributions for finite length"): 20 / 30 / 40 / 60 cost
# +0.033 / +0.015 / +0.007 / +0.004 in the frames' mean threshold at 1 %, 30 / 40 / 60
# +0.017 / +0.008 / +0.008 at 2 %; 100-150 were within +-0.004 for more work.
MAX_DEGREE = 80
_GH_X, _GH_W = np.polynomial.hermite_e.hermegauss(80)
_GH_W = _GH_W / _GH_W.sum()
# check means at which convergence is required: fine near 0, where decoding starts
_GRID = np.concatenate([np.geomspace(1e-4, 1.0, 30), np.linspace(1.0, 40.0, 120)[1:]])


def tanh_mean(shift, mean):
    """E[tanh((shift + Y)/2)] for Y ~ N(mean, 2 mean) (a symmetric Gaussian LLR)."""
    shift = np.asarray(shift, float)[..., None]
    mean = np.asarray(mean, float)[..., None]
    y = mean + np.sqrt(2 * mean) * _GH_X
    return np.sum(_GH_W * np.tanh(0.5 * (shift + y)), axis=-1)


def _variable_tanh(check_mean, q: float, degrees) -> np.ndarray:
    """E[tanh(L/2)] of the variable-to-check message of each degree: exact BSC channel
    message plus (degree - 1) Gaussian check messages of mean check_mean."""
    llr = math.log((1 - q) / q)
    mean = np.outer(np.asarray(check_mean, float), degrees - 1)
    return (1 - q) * tanh_mean(llr, mean) + q * tanh_mean(-llr, mean)


def check_distribution(dc: float) -> dict[int, float]:
    """Edge-perspective rho for an average check degree dc on two neighbouring degrees."""
    low = int(math.floor(dc))
    high_nodes = dc - low
    edges_low, edges_high = (1 - high_nodes) * low, high_nodes * (low + 1)
    total = edges_low + edges_high
    return {low: edges_low / total, low + 1: edges_high / total}


def _rho_inverse(rho: dict[int, float], y: np.ndarray) -> np.ndarray:
    """t with sum_j rho_j t^(j-1) = y, by bisection (the left side increases in t)."""
    lo, hi = np.zeros_like(y), np.ones_like(y)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        below = sum(p * mid ** (j - 1) for j, p in rho.items()) < y
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return hi


# From rate HIGH_RATE on, convergence is required with a margin: each iteration must raise
# the check mean by this factor, not merely raise it. There the approximation is most
# optimistic and exact-threshold designs decode worse at 2^16 bits. Measured with the
# blind retry path on 1 M bits (benchmarks/bench_distil.py, maximum degree 30 then): f at
# 1 % QBER 1.129 without, 1.117 with 0.1, 1.141 with 0.25; at 2 % 1.103 / 1.100; but at
# 3 % 1.089 / 1.105 and at 5 % 1.094 / 1.144, so lower rates keep the exact-threshold
# design.
GROWTH_MARGIN = 0.1
HIGH_RATE = 0.84


def growth_margin(rate: float) -> float:
    return GROWTH_MARGIN if rate >= HIGH_RATE - 1e-9 else 0.0


def best_lambda(q: float, dc: float, rate_target: float, max_degree: int = MAX_DEGREE):
    """(rate, edge-perspective lambda) of highest rate converging at q with checks dc."""
    rho = check_distribution(dc)
    degrees = DEGREES[DEGREES <= max_degree]
    needed = _rho_inverse(rho, tanh_mean(0.0, _GRID * (1 + growth_margin(rate_target))))
    rows, bounds = [-_variable_tanh(_GRID, q, degrees)], [-needed]
    stability = np.zeros(degrees.size)
    stability[0] = sum(p * (j - 1) for j, p in rho.items()) * 2 * math.sqrt(q * (1 - q))
    staircase = -(1 - rate_target) / degrees  # degree-2 nodes <= m
    staircase[0] += 0.5
    rows += [stability[None], staircase[None]]
    bounds += [[0.95], [0.0]]
    result = linprog(
        -1.0 / degrees,
        A_ub=np.vstack(rows),
        b_ub=np.concatenate(bounds),
        A_eq=np.ones((1, degrees.size)),
        b_eq=[1.0],
        bounds=[(0, 1)] * degrees.size,
        method="highs",
    )
    if not result.success:
        return None
    lam = result.x
    rate = 1 - sum(p / j for j, p in rho.items()) / float(np.sum(lam / degrees))
    return rate, dict(zip(degrees.tolist(), lam.tolist(), strict=True))


def max_rate(q: float, rate_target: float, max_degree: int = MAX_DEGREE):
    """(rate, lambda, dc) of the best check degree for channel q."""
    best = None
    for dc in np.arange(5.0, 120.0, 0.5):
        found = best_lambda(q, dc, rate_target, max_degree)
        if found is None:
            continue
        if best is None or found[0] > best[0]:
            best = (found[0], found[1], float(dc))
        elif found[0] < best[0] - 0.01:
            break
    return best


def design(rate: float, max_degree: int = MAX_DEGREE) -> tuple[float, float, dict[int, float]]:
    """(threshold q*, check degree dc, node-perspective variable distribution)."""

    def gap(q):
        found = max_rate(q, rate, max_degree)
        return (found[0] if found else 0.0) - rate

    q_star = brentq(gap, 1e-3, 0.15, xtol=1e-5)
    _, lam, dc = max_rate(q_star, rate, max_degree)
    per_node = sum(v / d for d, v in lam.items())
    nodes = {d: round(v / d / per_node, 5) for d, v in lam.items() if v > 1e-5}
    return q_star, dc, nodes


# Density evolution by population dynamics (Monte Carlo DE, Richardson and Urbanke, Modern
# Coding Theory 4.5): no Gaussian assumption anywhere, so it checks the design above,
# whose approximation is optimistic at high rates. By the BSC's symmetry the all-zero
# word is sent; a population of variable-to-check LLRs is pushed through the exact check
# update (product of tanh) and variable update (sum), each node's other edges drawn from
# the population by edge degree. The regular (3, 6) code's threshold comes out in
# (0.083, 0.085), the known 0.0840 (test_distil_reconcile).
DE_POPULATION = 20_000
DE_ITERATIONS = 300


@numba.njit(cache=True)
def _population_dynamics(q, variable_edges, check_edges, population, iterations, seed):
    """Bit error rate of the variable-to-check messages after `iterations` rounds (or the
    round at which it fell under one message in the population), and the rounds run."""
    np.random.seed(seed)
    llr = math.log((1 - q) / q)
    v = np.empty(population)
    c = np.empty(population)
    for i in range(population):
        v[i] = llr if np.random.random() > q else -llr
    error_rate = 1.0
    for it in range(iterations):
        for i in range(population):
            d = check_edges[np.random.randint(check_edges.size)]
            log_t = 0.0
            sign = 1.0
            for _ in range(d - 1):
                x = v[np.random.randint(population)]
                if x < 0:
                    sign = -sign
                    x = -x
                log_t += math.log(math.tanh(0.5 * min(x, 40.0)) + 1e-300)
            t = min(math.exp(log_t), 1 - 1e-16)
            c[i] = sign * 2 * math.atanh(t)
        bad = 0.0
        for i in range(population):
            d = variable_edges[np.random.randint(variable_edges.size)]
            x = llr if np.random.random() > q else -llr
            for _ in range(d - 1):
                x += c[np.random.randint(population)]
            v[i] = x
            if x < 0:
                bad += 1.0
            elif x == 0:
                bad += 0.5
        error_rate = bad / population
        if error_rate < 1.0 / population:
            return error_rate, it + 1
    return error_rate, iterations


def _edge_degrees(edge_fractions: dict[int, float], size: int = 100_000) -> np.ndarray:
    degrees = sorted(edge_fractions)
    counts = [round(edge_fractions[d] * size) for d in degrees]
    return np.repeat(np.array(degrees, dtype=np.int64), counts)


def converges(nodes: dict[int, float], rate: float, q: float, seed: int = 1) -> bool:
    """Whether BP density evolution converges on the BSC q for the node-perspective
    variable distribution `nodes` at `rate`, checks concentrated on two neighbouring
    degrees (as ldpc.construct makes them)."""
    per_node = sum(d * f for d, f in nodes.items())
    variable = {d: d * f / per_node for d, f in nodes.items()}
    check = check_distribution(per_node / (1 - rate))
    error_rate, _ = _population_dynamics(
        q, _edge_degrees(variable), _edge_degrees(check), DE_POPULATION, DE_ITERATIONS, seed
    )
    return error_rate < 1.0 / DE_POPULATION


def threshold_f(nodes: dict[int, float], rate: float, low=1.0, high=1.1, tol=0.004) -> float:
    """The efficiency f = (1 - rate) / h(q) at the DE threshold, by bisection: an upper
    end within tol (f* lies in (returned - tol, returned])."""
    from host.distil.finite_key import binary_entropy

    def q_at(f: float) -> float:
        return brentq(lambda q: binary_entropy(q) - (1 - rate) / f, 1e-6, 0.5)

    while high - low > tol:
        mid = 0.5 * (low + high)
        if converges(nodes, rate, q_at(mid)):
            high = mid
        else:
            low = mid
    return high


def _wrapped(items: list[str], width: int = 99, indent: int = 8) -> str:
    lines = [" " * indent + items[0]]
    for item in items[1:]:
        if len(lines[-1]) + 1 + len(item) > width:
            lines.append(" " * indent + item)
        else:
            lines[-1] += " " + item
    return "\n".join(lines)


def main() -> None:
    """Print the DISTRIBUTIONS table of ldpc.py."""
    from host.distil.ldpc import DESIGN_RATES

    for rate in DESIGN_RATES:
        if rate in EXACT_DESIGNS:
            q_star, dc, nodes = design_exact(rate, log=lambda *_: None)
            print(f"    # mean check degree {dc:g}, exact density evolution q* {q_star:.5f}")
        else:
            q_star, dc, nodes = design(rate)
            print(f"    # mean check degree {dc:g}, q* {q_star:.5f}")
        entry = f"    {rate}: {nodes},"
        if len(entry) > 99:  # the project's line length
            entry = (
                f"    {rate}: {{\n{_wrapped([f'{d}: {v},' for d, v in nodes.items()])}\n    }},"
            )
        print(entry, flush=True)


# Re-optimisation under exact discretised density evolution (ldpc_de), for the rates where
# the semi-Gaussian design above is optimistic. Iterative LP in the manner of Ardakani and
# Kschischang (2004) with exact densities: density evolution of the current distribution at
# q records, per iteration, the error rate p of the variable messages going in and the error
# rate e_i of each degree's message coming out; a new lambda that keeps
# sum_i lambda_i e_i <= t p on every iteration with t < 1 decodes at least as fast on those
# densities. The LP minimises t at the design's rate and check degree (so the rate and the
# staircase's degree-2 bound stay), in a trust region around the current lambda; then q is
# raised while exact density evolution still converges.
EXACT_TRUST = 0.03
EXACT_ROUNDS = 12
# The rates whose table entry is design_exact's, each with a crossover at which that entry
# converges by exact density evolution and the semi-Gaussian design it started from does
# not (tests/test_distil_ldpc_de.py). Only where it measurably lowered the frames' decoding
# thresholds (docs/distillation.md, "Exact density evolution"): at 0.91 it did not.
EXACT_DESIGNS = {0.84: 0.02245}


def _lp_exact(q, lam, rho, rate, trust):
    from host.distil import ldpc_de

    degrees = DEGREES[DEGREES <= MAX_DEGREE]
    current = np.array([lam.get(int(d), 0.0) for d in degrees])
    ok, _, _, trace = ldpc_de.run(
        q, lam, rho, record=True, step=EXACT_STEP, report_degrees=degrees.tolist()
    )
    if not ok:
        return None
    # Rows are scaled by the input error rate. The first iteration is left out: there the
    # grid's rounding of many-input checks can raise the error rate over the channel's,
    # for every lambda alike. Rows past an input error rate of 1e-9 are left out too:
    # there the FFT's rounding noise (~1e-15) is a large part of the outputs.
    index = {int(d): i for i, d in enumerate(degrees)}
    kept = [(p, e) for p, e in trace[1:] if p > 1e-9]
    errors = np.array([e / p for p, e in kept])
    per_edge = sum(p / j for j, p in rho.items()) / (1 - rate)  # sum lambda_i / i
    stability = np.zeros(degrees.size + 1)
    stability[index[2]] = sum(p * (j - 1) for j, p in rho.items()) * 2 * math.sqrt(q * (1 - q))
    staircase = np.zeros(degrees.size + 1)
    staircase[index[2]] = 0.5  # degree-2 nodes <= m: lambda_2 / 2 <= (1 - R) sum lambda_i / i
    rows = np.hstack([errors, -np.ones((len(kept), 1))])
    a_ub = np.vstack([rows, stability[None], staircase[None]])
    b_ub = np.concatenate([np.zeros(len(kept)), [0.95], [(1 - rate) * per_edge]])
    a_eq = np.vstack([np.append(np.ones(degrees.size), 0), np.append(1.0 / degrees, 0)])
    bounds = [(max(0.0, c - trust), min(1.0, c + trust)) for c in current] + [(0, None)]
    result = linprog(
        np.append(np.zeros(degrees.size), 1.0),
        A_ub=a_ub,
        b_ub=b_ub,
        A_eq=a_eq,
        b_eq=[1.0, per_edge],
        bounds=bounds,
        method="highs",
    )
    if not result.success:
        return None
    new = {int(d): float(v) for d, v in zip(degrees, result.x[:-1], strict=True) if v > 1e-7}
    return result.x[-1], new


EXACT_STEP = 0.16  # grid step of the optimisation's density evolution (thresholds: 0.08)


def design_at(rate: float, dc: float, max_degree: int = MAX_DEGREE):
    """design(rate) with the mean check degree fixed at dc: (q*, dc, nodes)."""

    def gap(q):
        found = best_lambda(q, dc, rate, max_degree)
        return (found[0] if found else 0.0) - rate

    q_star = brentq(gap, 1e-3, 0.15, xtol=1e-5)
    _, lam = best_lambda(q_star, dc, rate, max_degree)
    per_node = sum(v / d for d, v in lam.items())
    return q_star, dc, {d: v / d / per_node for d, v in lam.items() if v > 1e-5}


def design_exact(rate: float, dc=None, rounds: int = EXACT_ROUNDS, log=print):
    """(q*, dc, node-perspective distribution) improved from design(rate) (or design_at(rate,
    dc)) by the iterative LP on exact density evolution; q* is the last q at which it
    converged (grid step EXACT_STEP)."""
    from host.distil import ldpc_de

    _, dc, nodes = design(rate) if dc is None else design_at(rate, dc)
    lam, rho = ldpc_de.edge_perspective(nodes, rate)
    q = ldpc_de.threshold_q(lam, rho, low=1e-3, high=0.5, tol=1e-5, step=EXACT_STEP)
    log(f"rate {rate}: start q* {q:.5f} dc {dc}")
    dq = 0.01 * q
    for round_ in range(rounds):
        found = _lp_exact(q, lam, rho, rate, EXACT_TRUST)
        if found is None:
            break
        t, new = found
        log(f"  round {round_}: q {q:.5f} t {t:.4f}")
        moved = max(abs(new.get(d, 0.0) - lam.get(d, 0.0)) for d in set(new) | set(lam))
        if t > 1 - 1e-4 or moved < 1e-6:  # no faster lambda, or the same one again
            break
        lam = new
        while ldpc_de.run(q + dq, lam, rho, step=EXACT_STEP)[0]:
            q += dq
            log(f"    converges at {q:.5f}")
        dq = max(dq / 2, 1e-3 * q)
    per_node = sum(v / d for d, v in lam.items())
    nodes = {d: v / d / per_node for d, v in sorted(lam.items())}
    return q, dc, {d: round(v, 5) for d, v in nodes.items() if v > 1e-5}


if __name__ == "__main__":
    main()
