"""Layered sum-product decoder for quasi-cyclic LDPC codes (issue 17; docs/distillation.md,
"Quasi-cyclic decoder").

A quasi-cyclic code (`ldpc.Code.qc` = (lift Z, row_ptr, column, shift)) has Z checks per
base row that share no variable: check r Z + z holds, for each base entry t of row r,
variable column[t] Z + (z + shift[t]) mod Z. decode_qc_rows updates those Z checks at once
as vector lanes: the posteriors of an entry are a contiguous run of the frame's
posteriors (two pieces: the circulant wraps once), a check's sum over its edges is a
vertical add over the row's entries, so of the per-edge random accesses of
ldpc.decode_phi_rows only the two phi-table lookups stay gathers.

The arithmetic per edge is decode_phi_rows's (the same table, the same fixed-point sum,
the same order of the float operations on every value), and the checks of a row are
independent, so the result is bit-identical to decode_phi_rows on the code's expanded
CSR (check_ptr/check_var). Only the messages' layout differs: the message of entry t,
lane z is at t Z + z (qc_message_order maps it to the CSR's).
"""

from __future__ import annotations

import numba
import numpy as np

from host.distil import ldpc
from host.distil.ldpc import _hard_decision_satisfies, _phi

PHI_FIXED_HALF = ldpc.PHI_FIXED_HALF
PHI_FIXED_SHIFT = ldpc.PHI_FIXED_SHIFT
PHI_LAST = ldpc.PHI_LAST
PHI_FIXED_MAX_DEGREE = ldpc.PHI_FIXED_MAX_DEGREE
PROGRESS_UNIT = ldpc.PROGRESS_UNIT
PHI_TABLE = ldpc.PHI_TABLE
PHI_TABLE_FIXED = ldpc.PHI_TABLE_FIXED


def expand(lift: int, row_ptr, column, shift) -> tuple[np.ndarray, np.ndarray]:
    """The CSR (check_ptr int32 (m + 1), check_var int32) of a quasi-cyclic description:
    check r Z + z holds, for each entry t of base row r in order, variable
    column[t] Z + (z + shift[t]) mod Z (docs/distillation.md, "Quasi-cyclic codes")."""
    lift = int(lift)
    row_ptr = np.asarray(row_ptr, dtype=np.int64)
    column = np.asarray(column, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    degree = np.diff(row_ptr)
    check_ptr = np.zeros(degree.size * lift + 1, dtype=np.int64)
    check_ptr[1:] = np.cumsum(np.repeat(degree, lift))
    check_var = np.empty(int(row_ptr[-1]) * lift, dtype=np.int32)
    lanes = np.arange(lift, dtype=np.int64)
    for r in range(degree.size):
        t = np.arange(row_ptr[r], row_ptr[r + 1])
        # [lane z, entry]: the edges of check r Z + z, in entry order
        block = column[t] * lift + (lanes[:, None] + shift[t]) % lift
        check_var[row_ptr[r] * lift : row_ptr[r + 1] * lift] = block.ravel()
    return check_ptr.astype(np.int32), check_var


def qc_message_order(lift: int, row_ptr) -> np.ndarray:
    """For each QC message index t Z + z, the CSR edge index of the same edge:
    row_ptr[r] Z + z d_r + (t - row_ptr[r]), d_r the degree of base row r."""
    lift = int(lift)
    row_ptr = np.asarray(row_ptr, dtype=np.int64)
    order = np.empty(int(row_ptr[-1]) * lift, dtype=np.int64)
    lanes = np.arange(lift, dtype=np.int64)
    for r in range(row_ptr.size - 1):
        first, last = row_ptr[r], row_ptr[r + 1]
        t = np.arange(first, last)
        order[first * lift : last * lift] = (
            first * lift + lanes[None, :] * (last - first) + (t - first)[:, None]
        ).ravel()
    return order


def decode_qc(code: ldpc.Code, rows, llr, syndromes, max_iterations, messages, out_bits,
              out_iters, stall, stall_progress=0):  # fmt: skip
    """decode_qc_rows on a Code with a quasi-cyclic description."""
    lift, row_ptr, column, shift = code.qc
    return decode_qc_rows(
        rows, llr, syndromes, lift, row_ptr, column, shift, code.check_ptr,
        code.narrow_check_var(), max_iterations, messages, out_bits, out_iters, stall,
        stall_progress,
    )  # fmt: skip


@numba.njit(cache=True, parallel=True, fastmath=ldpc.DECODER_FASTMATH)
def decode_qc_rows(
    rows, llr, syndromes, lift, row_ptr, column, shift, check_ptr, check_var, max_iterations,
    messages, out_bits, out_iters, stall, stall_progress=0,
):  # fmt: skip
    """ldpc.decode_phi_rows on a quasi-cyclic code, its messages in the QC layout (entry t,
    lane z at t * lift + z): the same stop rules, flags, out_bits and out_iters, and the
    same values bit for bit. check_ptr/check_var (the expansion) serve only the full
    syndrome check when the running count of unsatisfied checks reaches zero.
    Each base row is processed as lift lanes: per entry, loops over the lanes in the two
    contiguous pieces of its circulant (LLVM vectorises them; the table lookups are
    gathers)."""
    table = PHI_TABLE
    fixed = PHI_TABLE_FIXED
    n = llr.shape[1]
    Z = np.int64(lift)
    mb = row_ptr.size - 1
    m = mb * Z
    ok = np.zeros(rows.size, dtype=np.bool_)
    maxdeg = 0
    for b in range(mb):
        maxdeg = max(maxdeg, row_ptr[b + 1] - row_ptr[b])
    if maxdeg > PHI_FIXED_MAX_DEGREE:
        raise ValueError("check degree beyond PHI_FIXED_MAX_DEGREE: the phi sum overflows")
    for row in numba.prange(rows.size):
        f = rows[row]
        r = messages[f]
        post = np.empty(n, dtype=np.float32)
        for v in range(n):
            post[v] = llr[f, v]
        # the messages added in the CSR's edge order: a variable's edges by check, i.e. by
        # base row (a row holds a column at most once)
        for b in range(mb):
            for t in range(row_ptr[b], row_ptr[b + 1]):
                base = np.int64(column[t]) * Z
                s = np.int64(shift[t])
                head = Z - s
                for z in range(head):
                    post[base + s + z] += r[t * Z + z]
                for z in range(head, Z):
                    post[base + s - Z + z] += r[t * Z + z]
        q = np.empty((maxdeg, Z), dtype=np.float32)
        p = np.empty((maxdeg, Z), dtype=np.int32)
        total = np.empty(Z, dtype=np.int32)
        negative = np.empty(Z, dtype=np.int32)
        sign = np.empty(Z, dtype=np.float32)
        hard = np.empty(Z, dtype=np.int32)
        it = 0
        done = False
        best = np.empty(max_iterations + 1, dtype=np.int64)
        best[0] = m + 1
        keep = np.int64(PROGRESS_UNIT - stall_progress)
        while it < max_iterations and not done:
            it += 1
            unsatisfied = 0
            for b in range(mb):
                t0 = row_ptr[b]
                deg = row_ptr[b + 1] - t0
                for z in range(Z):
                    total[z] = 0
                    negative[z] = np.int32(syndromes[f, b * Z + z])
                for i in range(deg):
                    t = t0 + i
                    base = np.int64(column[t]) * Z
                    s = np.int64(shift[t])
                    head = Z - s
                    qi = q[i]
                    pi = p[i]
                    rt = r[t * Z : t * Z + Z]
                    for z in range(head):
                        x = post[base + s + z] - rt[z]
                        qi[z] = x
                        negative[z] += np.int32(x < 0)
                        y = _phi(fixed, abs(x))
                        pi[z] = y
                        total[z] += y
                    for z in range(head, Z):
                        x = post[base + s - Z + z] - rt[z]
                        qi[z] = x
                        negative[z] += np.int32(x < 0)
                        y = _phi(fixed, abs(x))
                        pi[z] = y
                        total[z] += y
                for z in range(Z):
                    sign[z] = np.float32(-1.0) if negative[z] & 1 else np.float32(1.0)
                    hard[z] = np.int32(syndromes[f, b * Z + z])
                for i in range(deg):
                    t = t0 + i
                    base = np.int64(column[t]) * Z
                    s = np.int64(shift[t])
                    head = Z - s
                    qi = q[i]
                    pi = p[i]
                    rt = r[t * Z : t * Z + Z]
                    for z in range(head):
                        x = qi[z]
                        index = min(
                            (total[z] - pi[z] + PHI_FIXED_HALF) >> PHI_FIXED_SHIFT, PHI_LAST
                        )
                        w = (sign[z] if x >= 0 else -sign[z]) * table[index]
                        rt[z] = w
                        pv = x + w
                        post[base + s + z] = pv
                        hard[z] += np.int32(pv < 0)
                    for z in range(head, Z):
                        x = qi[z]
                        index = min(
                            (total[z] - pi[z] + PHI_FIXED_HALF) >> PHI_FIXED_SHIFT, PHI_LAST
                        )
                        w = (sign[z] if x >= 0 else -sign[z]) * table[index]
                        rt[z] = w
                        pv = x + w
                        post[base + s - Z + z] = pv
                        hard[z] += np.int32(pv < 0)
                for z in range(Z):
                    unsatisfied += hard[z] & 1
            if unsatisfied == 0:
                done = _hard_decision_satisfies(post, syndromes, f, m, check_ptr, check_var)
            best[it] = min(best[it - 1], unsatisfied)
            if it >= stall and best[it] * PROGRESS_UNIT >= keep * best[it - stall]:
                break
        for v in range(n):
            out_bits[f, v] = 1 if post[v] < 0 else 0
        out_iters[f] += it
        ok[row] = done
    return ok
