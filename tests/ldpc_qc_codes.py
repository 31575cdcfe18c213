"""Random quasi-cyclic LDPC codes for the QC decoder's tests and benchmark (issue 17):
a base matrix with a degree-2 staircase (dual diagonal, shift 0) and random entries with
random shifts, the variable degrees from ldpc.DISTRIBUTIONS, expanded per
docs/distillation.md "Quasi-cyclic codes". Not the protocol's construction (no cycle
avoidance, no public order design): only a structure to decode."""

from __future__ import annotations

import numpy as np

from host.distil import ldpc, ldpc_qc


def random_qc_code(n: int, rate: float, lift: int, seed: int = 1) -> ldpc.Code:
    """A QC code of n bits, m = round(n (1 - rate) / lift) lift checks, degrees of the
    design nearest `rate` (each base column at most mb rows)."""
    rng = np.random.default_rng(seed)
    nb = n // lift
    mb = int(round(nb * (1 - rate)))
    distribution = ldpc._design_for(rate)
    stairs = mb - 1
    others = {d: share for d, share in distribution.items() if d != 2}
    rest = nb - stairs
    total = sum(others.values())
    degrees = sorted(others)
    counts = [int(np.floor(others[d] / total * rest)) for d in degrees]
    counts[0] += rest - sum(counts)
    column_degrees = np.repeat(np.array(degrees), counts)
    entries: list[list[tuple[int, int]]] = [[] for _ in range(mb)]  # per row (column, shift)
    columns = rng.permutation(nb)  # the staircase spread over the frame, as in ldpc
    for k in range(stairs):
        entries[k].append((int(columns[k]), 0))
        entries[k + 1].append((int(columns[k]), 0))
    for j, degree in enumerate(column_degrees):
        c = int(columns[stairs + j])
        for b in rng.choice(mb, size=min(int(degree), mb), replace=False):
            entries[int(b)].append((c, int(rng.integers(lift))))
    row_ptr = np.zeros(mb + 1, dtype=np.int32)
    column, shift = [], []
    for b in range(mb):
        row = sorted(entries[b])
        row_ptr[b + 1] = row_ptr[b] + len(row)
        column += [c for c, _ in row]
        shift += [s for _, s in row]
    column = np.array(column, dtype=np.int32)
    shift = np.array(shift, dtype=np.int32)
    check_ptr, check_var = ldpc_qc.expand(lift, row_ptr, column, shift)
    order = rng.permutation(n).astype(np.int32)
    return ldpc.Code(
        n, mb * lift, check_ptr, check_var, seed, rate, order, qc=(lift, row_ptr, column, shift)
    )
