"""Layered min-sum check updates on the quasi-cyclic codes, for the bench only (issue 17,
session 18; docs/distillation.md "Min-sum check updates"): not used by reconcile.

decode_min_sum_rows is ldpc_qc.decode_qc_rows with the check update of the min-sum
family instead of the phi tables: per check the smallest and second smallest |q| over
its edges and the parity of their signs; the message to an edge is the others' smallest
magnitude (the second smallest for the edge that holds the smallest: equal magnitudes
make the two the same, so no index is kept), normalised (times `scale`) and offset
(minus `offset`, not below 0), with the others' sign. No table, so no gather: every
inner loop is a contiguous run of lift lanes (min, max, compare, select), as LLVM vectors
of ldpc_qc.LANES lanes for a lift that is a multiple of it (min_sum_first_pass /
min_sum_second_pass, ldpc_qc's style), numba loops otherwise. The layout, the order of
the layers, the stop rules (running count of unsatisfied checks, full syndrome check,
stall rule) and the messages' layout are decode_qc_rows's, so either decoder resumes
from the other's messages (the hybrid: min-sum for the first iterations of an attempt,
then sum-product). The vector passes live in this file: numba invalidates a cached kernel
by its own file's stamp only (ldpc_qc.py, "They live in this file"); an edit of ldpc_qc's
IR helpers alone would need NUMBA_CACHE_DIR cleared for this bench.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from host.distil import ldpc
from host.distil.ldpc import _hard_decision_out, _hard_decision_satisfies, _stalled
from host.distil.ldpc_qc import (
    _VF,
    _VI,
    LANES,
    _below_zero,
    _contiguous,
    _fabs,
    _load,
    _row_entries,
    _row_vectors,
    _splat,
    _store,
    _store_message,
    _vector_at,
)

PROGRESS_UNIT = ldpc.PROGRESS_UNIT
# above any |q| (channel LLRs, LLR_KNOWN, sums of messages) and finite (fastmath: ninf)
NO_MAGNITUDE = np.float32(1e30)
_SIGN_BIT = 31


# The two passes over a base row as LLVM vectors of ldpc_qc.LANES lanes, in the style of
# ldpc_qc.row_first_pass / row_second_pass (ldpc_qc's loops and offsets; the numba loops
# below for other lifts). No gather: every load and store is a contiguous vector. The same
# operations as the numba loops on the same values (min / max as compare and select, the
# scale's product and the offset's difference unfused), so both give the same bits where
# the loops' product and difference are not fused (offset 0: checked by the bench).
def _minimum(builder, a, b):
    return builder.select(builder.fcmp_ordered("<", a, b), a, b)


def _maximum(builder, a, b):
    return builder.select(builder.fcmp_ordered(">", a, b), a, b)


def _vector_of(builder, value):
    """value (a float scalar) in every lane."""
    one = builder.insert_element(ir.Constant(_VF, None), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, ir.Constant(_VF, None), ir.Constant(_VI, [0] * LANES))


@intrinsic
def min_sum_first_pass(typingctx, post, r, first, second, parity, column, shift, t0, degree,
                       lift):  # fmt: skip
    """decode_min_sum_rows's first pass over base row entries t0 .. t0 + degree - 1 (lift a
    multiple of LANES), for each entry t and lane w < lift, at a = lift - shift[t] + w:
    x = post[column[t] lift + w] - r[t lift + w]; second[a] = min(second[a],
    max(first[a], |x|)); first[a] = min(first[a], |x|); parity[a] ^= (x < 0)."""
    if not (
        all(_contiguous(a, types.float32) for a in (post, r, first, second))
        and _contiguous(parity, types.int32)
        and all(isinstance(a, types.Array) and a.layout == "C" for a in (column, shift))
        and all(isinstance(a, types.Integer) for a in (t0, degree, lift))
    ):
        return None
    signature = types.void(post, r, first, second, parity, column, shift, t0, degree, lift)

    def codegen(context, builder, signature, args):
        arrays, entries = _row_entries(context, builder, signature, args, 7)
        post_d, r_d, first_d, second_d, parity_d = arrays[:5]
        with _row_vectors(context, builder, *entries) as (post_o, r_o, _, acc_o):
            x = builder.fsub(
                _load(builder, _vector_at(builder, post_d, post_o, _VF)),
                _load(builder, _vector_at(builder, r_d, r_o, _VF)),
            )
            magnitude = _fabs(builder, x)
            first_p = _vector_at(builder, first_d, acc_o, _VF)
            second_p = _vector_at(builder, second_d, acc_o, _VF)
            parity_p = _vector_at(builder, parity_d, acc_o, _VI)
            low = _load(builder, first_p)
            above = _maximum(builder, low, magnitude)
            _store(builder, _minimum(builder, _load(builder, second_p), above), second_p)
            _store(builder, _minimum(builder, low, magnitude), first_p)
            negative = _below_zero(builder, x)
            _store(builder, builder.xor(_load(builder, parity_p), negative), parity_p)
        return context.get_dummy_value()

    return signature, codegen


@intrinsic
def min_sum_second_pass(typingctx, post, r, first, second, parity, hard, scale, offset, column,
                        shift, t0, degree, lift):  # fmt: skip
    """decode_min_sum_rows's second pass (first, second, parity folded): for each entry and
    lane, x as in the first pass; m = second[a] if |x| == first[a] else first[a];
    message = max(m scale - offset, 0), negated iff parity[a] differs from (x < 0);
    r[t lift + w] = message; post[column[t] lift + w] = x + message;
    hard[a] += (that < 0)."""
    if not (
        all(_contiguous(a, types.float32) for a in (post, r, first, second))
        and all(_contiguous(a, types.int32) for a in (parity, hard))
        and all(isinstance(a, types.Float) for a in (scale, offset))
        and all(isinstance(a, types.Array) and a.layout == "C" for a in (column, shift))
        and all(isinstance(a, types.Integer) for a in (t0, degree, lift))
    ):
        return None
    signature = types.void(
        post, r, first, second, parity, hard, scale, offset, column, shift, t0, degree, lift
    )

    def codegen(context, builder, signature, args):
        arrays, entries = _row_entries(context, builder, signature, args, 10)
        post_d, r_d, first_d, second_d, parity_d, hard_d = arrays[:6]
        scale_v, offset_v = (
            _vector_of(builder, context.cast(builder, args[k], signature.args[k], types.float32))
            for k in (6, 7)
        )
        with _row_vectors(context, builder, *entries) as (post_o, r_o, _, acc_o):
            post_p = _vector_at(builder, post_d, post_o, _VF)
            r_p = _vector_at(builder, r_d, r_o, _VF)
            x = builder.fsub(_load(builder, post_p), _load(builder, r_p))
            magnitude = _fabs(builder, x)
            low = _load(builder, _vector_at(builder, first_d, acc_o, _VF))
            next_low = _load(builder, _vector_at(builder, second_d, acc_o, _VF))
            others = builder.select(builder.fcmp_ordered("==", magnitude, low), next_low, low)
            others = builder.fsub(builder.fmul(others, scale_v), offset_v)
            others = _maximum(builder, others, _splat(0.0, _VF))
            parity = _load(builder, _vector_at(builder, parity_d, acc_o, _VI))
            flip = builder.shl(
                builder.xor(parity, _below_zero(builder, x)), _splat(_SIGN_BIT, _VI)
            )
            message = builder.bitcast(builder.xor(builder.bitcast(others, _VI), flip), _VF)
            _store_message(builder, x, message, r_p, post_p, hard_d, acc_o)
        return context.get_dummy_value()

    return signature, codegen


@numba.njit(cache=True, inline="always")
def _entry_check_lanes(post, r, first, second, parity, column, shift, t0, i, lift):
    """The numba loops' views of entry t = t0 + i (ldpc_qc._entry_lanes's, with min-sum's
    per-check arrays for its phi values): the posteriors from its column's first lane, its
    lift messages, the smallest, second smallest and sign parity of its checks from
    k = lift - shift[t], and k (where its lanes start in the doubled per-check arrays)."""
    t = t0 + i
    k = lift - np.int64(shift[t])
    return (
        post[np.int64(column[t]) * lift :],
        r[t * lift : t * lift + lift],
        first[k : k + lift],
        second[k : k + lift],
        parity[k : k + lift],
        k,
    )


def _min_sum_decoder(constant_lift: int, vector_passes: bool = True):
    """decode_min_sum_rows compiled for one lift (0: any), as ldpc_qc._decoder;
    vector_passes False: the numba loops for every lift (for an A/B of the two)."""

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
                    if vector_passes and Z % LANES == 0:
                        min_sum_first_pass(post, r, first, second, parity, column, shift, t0,
                                           deg, Z)  # fmt: skip
                    for i in range(0 if vector_passes and Z % LANES == 0 else deg):
                        pv_run, rt, f1, f2, pk, k = _entry_check_lanes(
                            post, r, first, second, parity, column, shift, t0, i, Z
                        )
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
                    if vector_passes and Z % LANES == 0:
                        min_sum_second_pass(post, r, first, second, parity, hard, scale_now,
                                            offset, column, shift, t0, deg, Z)  # fmt: skip
                    for i in range(0 if vector_passes and Z % LANES == 0 else deg):
                        pv_run, rt, f1, f2, pk, k = _entry_check_lanes(
                            post, r, first, second, parity, column, shift, t0, i, Z
                        )
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
_LOOP_DECODERS = {lift: _min_sum_decoder(lift, vector_passes=False) for lift in (0, 32, 64)}


def decode_min_sum(code: ldpc.Code, rows, llr, syndromes, max_iterations, messages, out_bits,
                   out_iters, stall, stall_progress, scale, offset, scale_step=0.0,
                   scale_max=1.0, vector_passes=True):  # fmt: skip
    """decode_min_sum_rows on a Code with a quasi-cyclic description (ldpc_qc.decode_qc's
    arguments plus the scale (its schedule) and offset)."""
    lift, row_ptr, column, shift = code.qc
    decoders = _DECODERS if vector_passes else _LOOP_DECODERS
    decoder = decoders.get(int(lift), decoders[0])
    return decoder(
        rows, llr, syndromes, lift, row_ptr, column, shift, code.check_ptr,
        code.narrow_check_var(), max_iterations, messages, out_bits, out_iters, stall,
        stall_progress, scale, scale_step, max(scale_max, scale), offset,
    )  # fmt: skip
