"""Exact discretised density evolution of belief propagation on the binary symmetric
channel (Richardson and Urbanke, Modern Coding Theory 4.5; Chung, Forney, Richardson and
Urbanke 2001, "On the design of low-density parity-check codes within 0.0045 dB of the
Shannon limit"), for the LDPC degree distributions of ldpc.py.

- Messages are LLRs quantised to a uniform grid k * step, |k| <= K. The step is chosen so
  that the channel's LLR ln((1 - q) / q) lies on the grid, so the channel density is
  exact: mass 1 - q at +ln((1 - q) / q) and q at its negative (the all-zero word is sent;
  BP on the BSC is symmetric).
- Check node: the exact tanh rule of two quantised messages, rounded to the grid, as a
  table (Chung et al.'s 2-D table method); a check of degree d applies it d - 2 times,
  by repeated squaring. Mass is added only, never approximated by a Gaussian.
- Variable node: the channel density convolved with (d - 1) check-to-variable densities,
  by FFT, then saturated at +-K.
- The bit error rate of the variable-to-check messages is P(L < 0) + P(L = 0) / 2.

Converges or not is deterministic (no sampling, unlike ldpc_design's population
dynamics). The quantisation makes it the density evolution of a slightly coarser decoder
than float BP: `threshold_q` of the regular (3, 6) code comes out within 0.001 of the known
0.0840 (test_distil_reconcile).
"""

from __future__ import annotations

import math

import numba
import numpy as np

import host.distil.numba_cache  # noqa: F401 - numba's cache index locked among processes

STEP = 0.08  # target grid step in LLR units (the exact one puts the channel LLR on the grid)
SATURATION = 30.0  # |LLR| beyond which messages are clipped
SUCCESS_ERROR_RATE = 1e-10
MAX_ITERATIONS = 3000
STALL_ITERATIONS = 20


@numba.njit(cache=True)
def _check_table(step, half):
    """out[i, j]: grid index (0 .. 2 half) of the tanh rule of grid messages i and j."""
    size = 2 * half + 1
    t = np.empty(size)
    for i in range(size):
        t[i] = math.tanh(0.5 * (i - half) * step)
    out = np.empty((size, size), np.int32)
    for i in range(size):
        for j in range(size):
            p = t[i] * t[j]
            if p >= 1.0:
                p = 1.0 - 1e-16
            elif p <= -1.0:
                p = -1.0 + 1e-16
            k = int(round(2.0 * math.atanh(p) / step))
            if k > half:
                k = half
            elif k < -half:
                k = -half
            out[i, j] = k + half
    return out


@numba.njit(cache=True)
def _check_pair(a, b, table):
    """Density of the tanh rule of independent messages with densities a and b."""
    size = a.size
    out = np.zeros(size)
    for i in range(size):
        ai = a[i]
        if ai < 1e-300:
            continue
        for j in range(size):
            bj = b[j]
            if bj > 0.0:
                out[table[i, j]] += ai * bj
    return out


class Grid:
    """The quantisation for channel q: grid step, half-width K, channel index c."""

    def __init__(self, q: float, step: float = STEP, saturation: float = SATURATION):
        llr = math.log((1 - q) / q)
        self.channel_index = max(1, round(llr / step))
        self.step = llr / self.channel_index
        self.half = int(round(saturation / self.step))
        self.size = 2 * self.half + 1
        self.q = q
        self.table = _check_table(self.step, self.half)
        self.channel = np.zeros(self.size)
        self.channel[self.half + self.channel_index] = 1 - q
        self.channel[self.half - self.channel_index] = q

    def error_rate(self, density: np.ndarray) -> float:
        return float(density[: self.half].sum() + 0.5 * density[self.half])


def _check_power(density, exponent, table):
    """The check rule applied over `exponent` independent copies of `density`."""
    result, base = None, density
    while exponent:
        if exponent & 1:
            result = base if result is None else _check_pair(result, base, table)
        exponent >>= 1
        if exponent:
            base = _check_pair(base, base, table)
    return result


def check_output(grid: Grid, variable_density, rho: dict[int, float]) -> np.ndarray:
    """Check-to-variable density for edge-perspective check distribution rho."""
    degrees = sorted(rho)
    out = np.zeros(grid.size)
    low = _check_power(variable_density, degrees[0] - 1, grid.table)
    out += rho[degrees[0]] * low
    previous, power = degrees[0], low
    for d in degrees[1:]:
        power = _check_pair(
            power, _check_power(variable_density, d - previous, grid.table), grid.table
        )
        out += rho[d] * power
        previous = d
    return out


def variable_outputs(grid: Grid, check_density, degrees) -> np.ndarray:
    """Row i: variable-to-check density of a degree-degrees[i] variable (channel plus
    degrees[i] - 1 check messages), saturated at +-K."""
    degrees = np.asarray(degrees)
    span = 2 * grid.half
    length = int(degrees.max() - 1) * span + 2 * grid.channel_index + 1
    fft_size = 1 << int(math.ceil(math.log2(length)))
    check_f = np.fft.rfft(check_density, fft_size)
    channel = np.zeros(2 * grid.channel_index + 1)
    channel[-1], channel[0] = 1 - grid.q, grid.q
    channel_f = np.fft.rfft(channel, fft_size)
    rows = np.empty((degrees.size, grid.size))
    for row, d in enumerate(degrees):
        full = np.fft.irfft(channel_f * check_f ** int(d - 1), fft_size)
        # index 0 of `full` is the LLR -(d - 1) K - c
        centre = int(d - 1) * grid.half + grid.channel_index
        full = np.maximum(full[: int(d - 1) * span + 2 * grid.channel_index + 1], 0.0)
        lo, hi = centre - grid.half, centre + grid.half
        row_density = np.zeros(grid.size)
        row_density[:] = full[lo : hi + 1] if lo >= 0 else 0.0
        row_density[0] += full[:lo].sum()
        row_density[-1] += full[hi + 1 :].sum()
        rows[row] = row_density / row_density.sum()
    return rows


def run(
    q: float,
    lam: dict[int, float],
    rho: dict[int, float],
    max_iterations: int = MAX_ITERATIONS,
    record: bool = False,
    step: float = STEP,
    report_degrees=None,
):
    """Density evolution at BSC q for edge-perspective lam and rho: (converged, bit error
    rate at the end, iterations, trace). With record, trace is a list of (error rate of
    the variable messages going in, error rates coming out of each of report_degrees,
    default lam's) per iteration: the rows of the design LP (ldpc_design.design_exact)."""
    grid = Grid(q, step)
    degrees = np.array(
        sorted(set(lam) | set(report_degrees if report_degrees is not None else ()))
    )
    if report_degrees is not None:
        reported = np.searchsorted(degrees, np.asarray(report_degrees))
    else:
        reported = np.arange(degrees.size)
    weights = np.array([lam.get(d, 0.0) for d in degrees])
    variable = grid.channel.copy()
    error = best = grid.error_rate(variable)
    best_iteration = 0
    trace = []
    for it in range(max_iterations):
        check = check_output(grid, variable, rho)
        rows = variable_outputs(grid, check, degrees)
        errors = rows[:, : grid.half].sum(axis=1) + 0.5 * rows[:, grid.half]
        if record:
            trace.append((error, errors[reported]))
        variable = weights @ rows
        new_error = float(weights @ errors)
        if new_error < SUCCESS_ERROR_RATE:
            return True, new_error, it + 1, trace
        # The first iterations may raise the error rate (quantisation); a fixed point is
        # STALL_ITERATIONS without a new low.
        if new_error < best * (1 - 1e-7):
            best, best_iteration = new_error, it
        elif it - best_iteration >= STALL_ITERATIONS:
            return False, new_error, it + 1, trace
        error = new_error
    return False, error, max_iterations, trace


def edge_perspective(nodes: dict[int, float], rate: float):
    """(lam, rho) for a node-perspective variable distribution at `rate`, checks on two
    neighbouring degrees as ldpc.construct makes them."""
    from host.distil.ldpc_design import check_distribution

    per_node = sum(d * f for d, f in nodes.items())
    lam = {d: d * f / per_node for d, f in nodes.items() if f > 0}
    return lam, check_distribution(per_node / (1 - rate))


def threshold_q(lam, rho, low=None, high=0.5, tol=1e-5, step: float = STEP) -> float:
    """Largest BSC q (within tol, the returned value converges) at which density evolution
    converges."""
    if low is None:
        low = 1e-4
    assert run(low, lam, rho, step=step)[0], "does not converge at the low end"
    while high - low > tol:
        mid = 0.5 * (low + high)
        if run(mid, lam, rho, step=step)[0]:
            low = mid
        else:
            high = mid
    return low


def threshold_f(nodes: dict[int, float], rate: float, tol=1e-5, step: float = STEP):
    """(q*, f* = (1 - rate) / h(q*)) of a node-perspective distribution at `rate`."""
    from scipy.optimize import brentq

    from host.distil.finite_key import binary_entropy

    lam, rho = edge_perspective(nodes, rate)

    # search q in the band f 0.98 .. 1.3 around capacity
    def q_at(f):
        return brentq(lambda q: binary_entropy(q) - (1 - rate) / f, 1e-6, 0.5)

    q = threshold_q(lam, rho, low=q_at(1.3), high=q_at(0.98), tol=tol, step=step)
    return q, (1 - rate) / binary_entropy(q)
