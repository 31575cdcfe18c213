"""Layered min-sum check updates on the quasi-cyclic codes, for the bench only (issue 17,
session 18; docs/distillation.md "Min-sum check updates"): not used by reconcile.

decode_min_sum_rows is ldpc_qc.decode_qc_rows with the check update of the min-sum
family instead of the phi tables: per check the smallest and second smallest |q| over
its edges and the parity of their signs; the message to an edge is the others' smallest
magnitude (the second smallest for the edge that holds the smallest: equal magnitudes
make the two the same, so no index is kept), normalised (times `scale`) and offset
(minus `offset`, not below 0), with the others' sign. No table, so no gather: every
inner loop is a contiguous run of lift lanes (min, max, compare, select), which LLVM
vectorises itself. The layout, the order of the layers, the stop rules (running count of
unsatisfied checks, full syndrome check, stall rule) and the messages' layout are
decode_qc_rows's, so either decoder resumes from the other's messages (the hybrid:
min-sum for the first iterations of an attempt, then sum-product).
"""

from __future__ import annotations

import numba
import numpy as np

from host.distil import ldpc
from host.distil.ldpc import _hard_decision_out, _hard_decision_satisfies, _stalled

PROGRESS_UNIT = ldpc.PROGRESS_UNIT
# above any |q| (channel LLRs, LLR_KNOWN, sums of messages) and finite (fastmath: ninf)
NO_MAGNITUDE = np.float32(1e30)


def _min_sum_decoder(constant_lift: int):
    """decode_min_sum_rows compiled for one lift (0: any), as ldpc_qc._decoder."""

    @numba.njit(cache=True, parallel=True, fastmath=ldpc.DECODER_FASTMATH)
    def decode_min_sum_rows(
        rows, llr, syndromes, lift, row_ptr, column, shift, check_ptr, check_var, max_iterations,
        messages, out_bits, out_iters, stall, stall_progress, scale, scale_step, scale_max,
        offset,
    ):  # fmt: skip
        """Layered normalised / offset min-sum on a QC code, decode_qc_rows's arguments
        and layout plus the message's scale and offset: message = max(s m - offset, 0),
        m the others' smallest |q|, s = min(scale + scale_step (i - 1), scale_max) in the
        frame's iteration i, counted from its first attempt (out_iters before the call
        plus this call's: a retry continues the schedule where the attempt before left
        it; scale_step 0: a constant scale)."""
        n = llr.shape[1]
        if constant_lift == 0:
            Z = lift
        else:
            Z = constant_lift
        mb = row_ptr.size - 1
        m = mb * Z
        ok = np.zeros(rows.size, dtype=np.bool_)
        offset = np.float32(offset)
        zero = np.float32(0.0)
        if constant_lift != 0 and lift != constant_lift:
            raise ValueError("a code of another lift than this decoder was compiled for")
        for row in numba.prange(rows.size):
            f = rows[row]
            r = messages[f]
            post = np.empty(n, dtype=np.float32)
            for v in range(n):
                post[v] = llr[f, v]
            for t in range(row_ptr[mb]):
                base = np.int64(column[t]) * Z
                for w in range(Z):
                    post[base + w] += r[t * Z + w]
            # per check lane, doubled as decode_qc_rows's sums (an entry's lanes start at
            # lift - shift): smallest and second smallest |q|, parity of the negative q
            first = np.empty(2 * Z, dtype=np.float32)
            second = np.empty(2 * Z, dtype=np.float32)
            parity = np.empty(2 * Z, dtype=np.int32)
            hard = np.empty(2 * Z, dtype=np.int32)
            it = 0
            done = False
            best = np.empty(max_iterations + 1, dtype=np.int64)
            best[0] = m + 1
            keep = np.int64(PROGRESS_UNIT - stall_progress)
            before = out_iters[f]
            while it < max_iterations and not done:
                it += 1
                unsatisfied = 0
                scale_now = np.float32(min(scale + scale_step * (before + it - 1), scale_max))
                for b in range(mb):
                    t0 = row_ptr[b]
                    deg = row_ptr[b + 1] - t0
                    for z in range(2 * Z):
                        first[z] = NO_MAGNITUDE
                        second[z] = NO_MAGNITUDE
                        parity[z] = 0
                    for i in range(deg):
                        t = t0 + i
                        pv_run = post[np.int64(column[t]) * Z :]
                        rt = r[t * Z : t * Z + Z]
                        k = Z - np.int64(shift[t])
                        f1 = first[k : k + Z]
                        f2 = second[k : k + Z]
                        pk = parity[k : k + Z]
                        for w in range(Z):
                            x = pv_run[w] - rt[w]
                            magnitude = abs(x)
                            f2[w] = min(f2[w], max(f1[w], magnitude))
                            f1[w] = min(f1[w], magnitude)
                            pk[w] ^= np.int32(x < 0)
                    for z in range(Z):
                        a1, b1 = first[z], first[z + Z]
                        low = min(a1, b1)
                        high = min(max(a1, b1), min(second[z], second[z + Z]))
                        s = parity[z] ^ parity[z + Z] ^ np.int32(syndromes[f, b * Z + z])
                        first[z] = low
                        first[z + Z] = low
                        second[z] = high
                        second[z + Z] = high
                        parity[z] = s
                        parity[z + Z] = s
                        hard[z] = np.int32(syndromes[f, b * Z + z])
                        hard[z + Z] = 0
                    for i in range(deg):
                        t = t0 + i
                        pv_run = post[np.int64(column[t]) * Z :]
                        rt = r[t * Z : t * Z + Z]
                        k = Z - np.int64(shift[t])
                        f1 = first[k : k + Z]
                        f2 = second[k : k + Z]
                        pk = parity[k : k + Z]
                        hk = hard[k : k + Z]
                        for w in range(Z):
                            x = pv_run[w] - rt[w]
                            magnitude = abs(x)
                            others = f2[w] if magnitude == f1[w] else f1[w]
                            others = max(others * scale_now - offset, zero)
                            negative = (pk[w] ^ np.int32(x < 0)) != 0
                            message = -others if negative else others
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

    return decode_min_sum_rows


_DECODERS = {lift: _min_sum_decoder(lift) for lift in (0, 32, 64)}


def decode_min_sum(code: ldpc.Code, rows, llr, syndromes, max_iterations, messages, out_bits,
                   out_iters, stall, stall_progress, scale, offset, scale_step=0.0,
                   scale_max=1.0):  # fmt: skip
    """decode_min_sum_rows on a Code with a quasi-cyclic description (ldpc_qc.decode_qc's
    arguments plus the scale (its schedule) and offset)."""
    lift, row_ptr, column, shift = code.qc
    decoder = _DECODERS.get(int(lift), _DECODERS[0])
    return decoder(
        rows, llr, syndromes, lift, row_ptr, column, shift, code.check_ptr,
        code.narrow_check_var(), max_iterations, messages, out_bits, out_iters, stall,
        stall_progress, scale, scale_step, max(scale_max, scale), offset,
    )  # fmt: skip
