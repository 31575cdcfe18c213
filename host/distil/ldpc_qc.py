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
CSR (check_ptr/check_var). Only the messages' layout differs: the message of entry t to
its variable in lane w (the edge of check lane (w - shift[t]) mod Z) is at t Z + w
(qc_message_order maps it to the CSR's).
"""

from __future__ import annotations

import numba
import numpy as np

from host.distil import ldpc
from host.distil.ldpc import _hard_decision_out, _hard_decision_satisfies, _stalled

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


def qc_message_order(lift: int, row_ptr, shift) -> np.ndarray:
    """For each QC message index t Z + w (entry t, variable lane w: the edge of check
    r Z + (w - shift[t]) mod Z), the CSR edge index of the same edge:
    row_ptr[r] Z + z d_r + (t - row_ptr[r]), z = (w - shift[t]) mod Z, d_r the degree of
    base row r."""
    lift = int(lift)
    row_ptr = np.asarray(row_ptr, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    order = np.empty(int(row_ptr[-1]) * lift, dtype=np.int64)
    lanes = np.arange(lift, dtype=np.int64)
    for r in range(row_ptr.size - 1):
        first, last = row_ptr[r], row_ptr[r + 1]
        t = np.arange(first, last)
        check_lane = (lanes[None, :] - shift[t][:, None]) % lift
        order[first * lift : last * lift] = (
            first * lift + check_lane * (last - first) + (t - first)[:, None]
        ).ravel()
    return order


def decode_qc(code: ldpc.Code, rows, llr, syndromes, max_iterations, messages, out_bits,
              out_iters, stall, stall_progress=0):  # fmt: skip
    """decode_qc_rows on a Code with a quasi-cyclic description."""
    lift, row_ptr, column, shift = code.qc
    return decoder_for(lift)(
        rows, llr, syndromes, lift, row_ptr, column, shift, code.check_ptr,
        code.narrow_check_var(), max_iterations, messages, out_bits, out_iters, stall,
        stall_progress,
    )  # fmt: skip


@numba.njit(cache=True, inline="always")
def _phi_fixed(fixed, x):
    """ldpc._phi(fixed, x) with the table index as a non-negative int32 (the value is the
    same: x >= 0), which LLVM gathers through with 32-bit indices (ldpc._phi's signed
    index takes numba's negative-index wrap-around and 64-bit gathers)."""
    index = np.int32(min(x, ldpc.PHI_MAX) * ldpc.PHI_SCALE + np.float32(0.5))
    return fixed[np.uint32(index & np.int32(0x7FFFFFFF))]


# decode_phi_rows's table index of the others' sum, min((total - p + half) >> shift, last),
# in uint32: total - p is in [0, 2^31) (PHI_FIXED_MAX_DEGREE), so + half cannot wrap and
# the logical shift equals the arithmetic one; 8 lanes of int32 where int64 (numba's
# promotion) took 8 lanes of 64 bits and 64-bit gathers.
HALF_U = np.uint32(ldpc.PHI_FIXED_HALF)
SHIFT_U = np.uint32(ldpc.PHI_FIXED_SHIFT)
LAST_U = np.uint32(ldpc.PHI_LAST)
SIGN_BIT = np.uint32(31)
SUM_MASK = np.uint32(0x7FFFFFFF)


def _decoder(constant_lift: int):
    """decode_qc_rows compiled for codes of lift `constant_lift` only (0: any lift). A lift
    known at compile time lets LLVM drop the loops' remainders and trip-count checks
    (at lift 32 ~10 % of the time: its loops are 4 vector steps long). A closure: numba
    caches each lift's machine code under its value."""

    @numba.njit(cache=True, parallel=True, fastmath=ldpc.DECODER_FASTMATH)
    def decode_qc_rows(
        rows, llr, syndromes, lift, row_ptr, column, shift, check_ptr, check_var, max_iterations,
        messages, out_bits, out_iters, stall, stall_progress=0,
    ):  # fmt: skip
        """ldpc.decode_phi_rows on a quasi-cyclic code, its messages in the QC layout (entry t,
        variable lane w at t * lift + w: the edge of check lane (w - shift[t]) mod lift): the
        same stop rules, flags, out_bits and out_iters, and the same values bit for bit.
        check_ptr/check_var (the expansion) serve only the full syndrome check when the
        running count of unsatisfied checks reaches zero.
        A base row's lift checks are lanes. Everything of an entry is kept in its variables'
        order (posteriors, messages, phi(|q|)): one contiguous run of lift values. The
        per-check sums are in check order, rotated by the entry's shift: they sit in an array
        of 2 lift read at lift - shift + w, so that run is contiguous too; the halves are
        folded after the row's first pass (integer additions: any order gives the same). A
        check's sum of phi and the parity of its negative signs share one uint32 (the sum is
        below 2^31, PHI_FIXED_MAX_DEGREE, so bit 31 holds the parity: adding never carries
        into it, and adding two halves adds their parities mod 2): one array fewer to
        accumulate, check for aliasing and read. q is not stored but recomputed in the second
        pass (the row's posteriors and messages are unchanged until then: the same float
        subtraction, the same bits). Every inner loop is over lift contiguous lanes (LLVM
        vectorises them, 8 lanes of AVX2/AVX-512VL; the table lookups are gathers with 32-bit
        indices).
        """
        table = PHI_TABLE
        fixed = PHI_TABLE_FIXED
        n = llr.shape[1]
        # a plain constant when specialised (numba prunes the other branch, and passes a
        # constant into the frames' parallel loop as a constant, not an argument)
        if constant_lift == 0:
            Z = lift
        else:
            Z = constant_lift
        mb = row_ptr.size - 1
        m = mb * Z
        ok = np.zeros(rows.size, dtype=np.bool_)
        maxdeg = 0
        for b in range(mb):
            maxdeg = max(maxdeg, row_ptr[b + 1] - row_ptr[b])
        if maxdeg > PHI_FIXED_MAX_DEGREE:
            raise ValueError("check degree beyond PHI_FIXED_MAX_DEGREE: the phi sum overflows")
        if constant_lift != 0 and lift != constant_lift:
            raise ValueError("a code of another lift than this decoder was compiled for")
        for row in numba.prange(rows.size):
            f = rows[row]
            r = messages[f]
            post = np.empty(n, dtype=np.float32)
            for v in range(n):
                post[v] = llr[f, v]
            # the messages added in the CSR's edge order: a variable's edges by check, i.e. by
            # base row (a row holds a column at most once)
            for t in range(row_ptr[mb]):
                base = np.int64(column[t]) * Z
                for w in range(Z):
                    post[base + w] += r[t * Z + w]
            p = np.empty((maxdeg, Z), dtype=np.uint32)
            acc = np.empty(2 * Z, dtype=np.uint32)
            hard = np.empty(2 * Z, dtype=np.int32)
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
                    for z in range(2 * Z):
                        acc[z] = 0
                    for i in range(deg):
                        t = t0 + i
                        pv_run = post[np.int64(column[t]) * Z :]
                        rt = r[t * Z : t * Z + Z]
                        pi = p[i]
                        k = Z - np.int64(shift[t])
                        ak = acc[k : k + Z]
                        for w in range(Z):
                            x = pv_run[w] - rt[w]
                            y = np.uint32(_phi_fixed(fixed, abs(x)))
                            pi[w] = y
                            ak[w] = np.uint32(ak[w] + y) ^ (np.uint32(x < 0) << SIGN_BIT)
                    for z in range(Z):
                        a = np.uint32(acc[z] + acc[z + Z]) ^ (
                            np.uint32(syndromes[f, b * Z + z]) << SIGN_BIT
                        )
                        acc[z] = a
                        acc[z + Z] = a
                        hard[z] = np.int32(syndromes[f, b * Z + z])
                        hard[z + Z] = 0
                    for i in range(deg):
                        t = t0 + i
                        pv_run = post[np.int64(column[t]) * Z :]
                        rt = r[t * Z : t * Z + Z]
                        pi = p[i]
                        k = Z - np.int64(shift[t])
                        ak = acc[k : k + Z]
                        hk = hard[k : k + Z]
                        for w in range(Z):
                            x = pv_run[w] - rt[w]
                            a = ak[w]
                            index = min(
                                np.uint32(np.uint32((a & SUM_MASK) - pi[w]) + HALF_U) >> SHIFT_U,
                                LAST_U,
                            )
                            sign = np.float32(-1.0) if a > SUM_MASK else np.float32(1.0)
                            message = (sign if x >= 0 else -sign) * table[index]
                            rt[w] = message
                            pv = x + message
                            pv_run[w] = pv
                            hk[w] += np.int32(pv < 0)
                    for z in range(Z):
                        unsatisfied += (hard[z] + hard[z + Z]) & 1
                if unsatisfied == 0:
                    done = _hard_decision_satisfies(post, syndromes, f, m, check_ptr, check_var)
                if _stalled(best, it, unsatisfied, stall, keep):
                    break
            _hard_decision_out(post, f, it, out_bits, out_iters)
            ok[row] = done
        return ok

    return decode_qc_rows


decode_qc_rows = _decoder(0)
# the lifts of the QC construction (ldpc.QC_BASE_COLUMNS columns: n / 2048)
_LIFT_DECODERS = {lift: _decoder(lift) for lift in (32, 64)}


def decoder_for(lift: int):
    """decode_qc_rows, compiled for `lift` where it has its own machine code."""
    return _LIFT_DECODERS.get(int(lift), decode_qc_rows)
