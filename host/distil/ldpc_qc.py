"""Layered sum-product decoder for quasi-cyclic LDPC codes (issue 17; docs/distillation.md,
"Quasi-cyclic decoder").

A quasi-cyclic code (`ldpc.Code.qc` = (lift Z, row_ptr, column, shift)) has Z checks per
base row that share no variable: check r Z + z holds, for each base entry t of row r,
variable column[t] Z + (z + shift[t]) mod Z. decode_qc_rows updates those Z checks at once
as vector lanes: the posteriors of an entry are a contiguous run of the frame's
posteriors (two pieces: the circulant wraps once), a check's sum over its edges is a
vertical add over the row's entries, so of the per-edge random accesses of
ldpc.decode_phi_rows only the two phi-table lookups stay (gathers, or scalar loads on the
targets where LLVM would not gather in hardware: SCALAR_LOOKUPS).

The arithmetic per edge is decode_phi_rows's (the same table, the same fixed-point sum,
the same order of the float operations on every value), and the checks of a row are
independent, so the result is bit-identical to decode_phi_rows on the code's expanded
CSR (check_ptr/check_var). Only the messages' layout differs: the message of entry t to
its variable in lane w (the edge of check lane (w - shift[t]) mod Z) is at t Z + w
(qc_message_order maps it to the CSR's). The two passes over a base row are LLVM vector
code of LANES lanes (row_first_pass, row_second_pass; session 14: 1.2-1.4x the numba
loops' speed per edge update, docs/distillation.md "Decoder kernel, session 14").
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from pathlib import Path

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

import host.distil.numba_cache  # noqa: F401 - numba's cache index locked among processes
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


# An 8-lane gather of int32 through 32-bit indices, as the vector passes emit it
_GATHER_PROBE_IR = """
define <8 x i32> @gather_probe(ptr %base, <8 x i32> %index) {
  %p = getelementptr inbounds i32, ptr %base, <8 x i32> %index
  %v = call <8 x i32> @llvm.masked.gather.v8i32.v8p0(<8 x ptr> %p, i32 4,
      <8 x i1> <i1 1, i1 1, i1 1, i1 1, i1 1, i1 1, i1 1, i1 1>, <8 x i32> undef)
  ret <8 x i32> %v
}
declare <8 x i32> @llvm.masked.gather.v8i32.v8p0(<8 x ptr>, i32, <8 x i1>, <8 x i32>)
"""


def gathers_in_hardware(target_machine) -> bool:
    """Whether LLVM compiles the vector passes' 8-lane gather to a gather instruction for
    target_machine (an llvmlite TargetMachine). Where it does not (this LLVM on AMD Zen 1-3,
    and on Zen 4 without AVX-512; CPUs without AVX2), it splits the gather into 8 scalar
    loads through a vector of 64-bit pointers (sign extension, shift, add, extraction per
    lane), and the vector passes' own scalar loads from the 32-bit indices skip that
    arithmetic: docs/distillation.md, "Table lookups without gathers"."""
    import llvmlite.binding

    module = llvmlite.binding.parse_assembly(_GATHER_PROBE_IR)
    module.verify()
    assembly = target_machine.emit_assembly(module)
    # vpgatherdd (AVX2), vpgatherdd / vgatherdps (AVX-512), in AT&T or Intel syntax
    return re.search(r"\bv(p)?gather", assembly) is not None


def _scalar_lookups_pay() -> bool:
    """Scalar loads where numba's code generator (its target CPU and features:
    NUMBA_CPU_NAME / NUMBA_CPU_FEATURES, else the host's) has no hardware gather; gathers
    where it has one (Intel from Skylake, AVX-512 CPUs: scalar loads were not measured
    there). numba's cache keys machine code by CPU name and features, so a kernel cached
    for one choice never runs on a CPU of the other."""
    from numba.core.registry import cpu_target

    try:
        return not gathers_in_hardware(cpu_target.target_context.codegen()._tm)
    except Exception:  # noqa: BLE001 (no probe: scalar loads are right on every CPU)
        return True


SCALAR_LOOKUPS = _scalar_lookups_pay()


# The two passes over one base row as LLVM vectors (session 14; docs/distillation.md
# "Decoder kernel, session 14"). numba intrinsics: each emits, in the kernel that calls it,
# a loop over the row's entries and, per entry, over its lift lanes in vectors of LANES.
# The arithmetic is the numba loops' they replace (kept below for other lifts), operation
# for operation, so the kernel stays bit-identical to ldpc.decode_phi_rows. Why not numba
# loops: LLVM's loop vectoriser picked 16-lane (zmm) gathers on this CPU (znver4), slower
# than two 8-lane ones, and every entry paid slice normalisation and runtime alias checks.
# Here the width is ours: 8 lanes, one ymm gather on AVX2 and AVX-512; a CPU without
# gathers gets LLVM's scalar expansion of llvm.masked.gather (the same values). numba's
# cache keys machine code by CPU name and features, so no build is served to another CPU.
# They live in this file because numba's cache is invalidated by the stamp (mtime, size) of
# the kernel's own source file: an edit here recompiles the kernels; for ldpc.py, see
# LDPC_SOURCE_DIGEST.
# lanes per vector: a lift that is a multiple of it takes these passes (32, 64, 128: the
# construction's 2^16-2^18 frames); 8 x 32 bits is one ymm register
LANES = 8

_I1 = ir.IntType(1)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_F32 = ir.FloatType()
_VF = ir.VectorType(_F32, LANES)
_VI = ir.VectorType(_I32, LANES)
_VB = ir.VectorType(_I1, LANES)

_PHI_MAX = float(ldpc.PHI_MAX)
_PHI_SCALE = float(ldpc.PHI_SCALE)
_SUM_MASK = int(SUM_MASK)
_SIGN_BIT = int(SIGN_BIT)
_HALF = int(ldpc.PHI_FIXED_HALF)
_SHIFT = int(ldpc.PHI_FIXED_SHIFT)
_LAST = int(ldpc.PHI_LAST)


class _VectorGEP(ir.Instruction):
    """getelementptr elem, ptr base, <LANES x i32> index: a vector of LANES pointers, the
    operand of llvm.masked.gather (llvmlite's GEPInstr takes scalar indices only). The
    i32 index is sign-extended; every index here is in [0, PHI_LAST]."""

    def __init__(self, parent, base, index, elem_type):
        super().__init__(
            parent, ir.VectorType(base.type, LANES), "getelementptr", [base, index], name=""
        )
        self.elem_type = elem_type

    def descr(self, buf):
        base, index = self.operands
        buf.append(
            f"getelementptr inbounds {self.elem_type}, {base.type} {base.get_reference()}, "
            f"{index.type} {index.get_reference()}\n"
        )


def _splat(value, vector_type):
    return ir.Constant(vector_type, [value] * LANES)


def _lookup(builder, base, index, vector_type, scalar_loads):
    """base[index] for the LANES indices: a gather, or LANES scalar loads put into the
    vector (scalar_loads; the same values: SCALAR_LOOKUPS)."""
    if not scalar_loads:
        return _gather(builder, base, index, vector_type)
    vector = ir.Constant(vector_type, None)
    for lane in range(LANES):
        at = builder.extract_element(index, ir.Constant(_I32, lane))
        value = builder.load(builder.gep(base, [at], inbounds=True), align=4)
        vector = builder.insert_element(vector, value, ir.Constant(_I32, lane))
    return vector


def _gather(builder, base, index, vector_type):
    """base[index] for the LANES indices (llvm.masked.gather, every lane on)."""
    pointers = _VectorGEP(builder.block, base, index, vector_type.element)
    builder._insert(pointers)
    element = "i32" if vector_type.element == _I32 else "f32"
    gather = cgutils.get_or_insert_function(
        builder.module,
        ir.FunctionType(vector_type, [pointers.type, _I32, _VB, vector_type]),
        f"llvm.masked.gather.v{LANES}{element}.v{LANES}p0",
    )
    every_lane = _splat(1, _VB)
    return builder.call(
        gather, [pointers, ir.Constant(_I32, 4), every_lane, ir.Constant(vector_type, None)]
    )


def _vector_at(builder, data, offset, vector_type):
    """A pointer to the LANES values data[offset ...]."""
    return builder.bitcast(builder.gep(data, [offset], inbounds=True), vector_type.as_pointer())


def _load(builder, pointer):
    return builder.load(pointer, align=4)


def _store(builder, value, pointer):
    builder.store(value, pointer, align=4)


def _fabs(builder, x):
    """|x| in every lane of a float vector (llvm.fabs)."""
    fabs = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_VF, [_VF]), f"llvm.fabs.v{LANES}f32"
    )
    return builder.call(fabs, [x])


def _below_zero(builder, x):
    """1 in each lane where the float vector x is negative, else 0 (int32 lanes)."""
    return builder.zext(builder.fcmp_ordered("<", x, _splat(0.0, _VF)), _VI)


def _store_message(builder, x, message, r_p, post_p, hard_d, acc_o):
    """A second pass's outputs for one vector of an entry: the check's message at r_p, the
    posterior x + message at post_p, and the count of negative posteriors of its checks
    (hard, at the checks' offset acc_o) raised where that posterior is below zero."""
    _store(builder, message, r_p)
    posterior = builder.fadd(x, message)
    _store(builder, posterior, post_p)
    hard_p = _vector_at(builder, hard_d, acc_o, _VI)
    _store(builder, builder.add(_load(builder, hard_p), _below_zero(builder, posterior)), hard_p)


def _contiguous(array, dtype) -> bool:
    return isinstance(array, types.Array) and array.layout == "C" and array.dtype == dtype


def _row_entries(context, builder, signature, args, first):
    """(the data pointers of the array arguments, _row_vectors's entries): the arguments end
    with column, shift, t0, degree, lift, t0 the argument at `first`; entries are column's
    and shift's (type, data pointer) and t0, degree and lift cast to int64."""
    arrays = [
        context.make_array(ty)(context, builder, value).data if isinstance(ty, types.Array)
        else None
        for ty, value in zip(signature.args, args, strict=True)
    ]  # fmt: skip
    column, shift = ((signature.args[k], arrays[k]) for k in (first - 2, first - 1))
    t0, degree, lift = (
        context.cast(builder, args[k], signature.args[k], types.int64)
        for k in range(first, first + 3)
    )
    return arrays, (column, shift, t0, degree, lift)


def _entry(context, builder, column, shift, t0, i, lift):
    """(t, column[t] lift, lift - shift[t]) of entry t = t0 + i, int64."""
    t = builder.add(t0, i)
    values = []
    for array_type, data in (column, shift):
        value = builder.load(builder.gep(data, [t], inbounds=True))
        values.append(context.cast(builder, value, array_type.dtype, types.int64))
    return t, builder.mul(values[0], lift), builder.sub(lift, values[1])


@contextlib.contextmanager
def _row_vectors(context, builder, column, shift, t0, degree, lift):
    """The vector passes' loops: over the row's entries t0 .. t0 + degree - 1 and each
    entry's lift / LANES vectors; yields the current vector's element offsets into post, r,
    p and the accumulators (column[t] lift, t lift, i lift, lift - shift[t]; + LANES v)."""
    vectors = builder.udiv(lift, ir.Constant(_I64, LANES))
    with cgutils.for_range(builder, degree) as entry:
        t, post_at, acc_at = _entry(context, builder, column, shift, t0, entry.index, lift)
        starts = (post_at, builder.mul(t, lift), builder.mul(entry.index, lift), acc_at)
        with cgutils.for_range(builder, vectors) as vector:
            step = builder.mul(vector.index, ir.Constant(_I64, LANES))
            yield tuple(builder.add(start, step) for start in starts)


def _first_pass(scalar_loads: bool):
    @intrinsic
    def row_first_pass(typingctx, post, r, p, acc, fixed, column, shift, t0, degree, lift):
        """decode_qc_rows's first pass over base row entries t0 .. t0 + degree - 1 (lift a
        multiple of LANES), for each entry i, t = t0 + i, and lane w < lift:
        x = post[column[t] lift + w] - r[t lift + w];
        y = fixed[int32(min(|x|, PHI_MAX) PHI_SCALE + 0.5)]; p[i lift + w] = y;
        acc[lift - shift[t] + w] = (acc[...] + y) ^ ((x < 0) << 31)."""
        if not (
            all(_contiguous(a, types.float32) for a in (post, r))
            and all(_contiguous(a, types.uint32) for a in (p, acc))
            and _contiguous(fixed, types.int32)
            and all(isinstance(a, types.Array) and a.layout == "C" for a in (column, shift))
            and all(isinstance(a, types.Integer) for a in (t0, degree, lift))
        ):
            return None
        signature = types.void(post, r, p, acc, fixed, column, shift, t0, degree, lift)

        def codegen(context, builder, signature, args):
            arrays, entries = _row_entries(context, builder, signature, args, 7)
            post_d, r_d, p_d, acc_d, fixed_d = arrays[:5]
            with _row_vectors(context, builder, *entries) as (post_o, r_o, p_o, acc_o):
                x = builder.fsub(
                    _load(builder, _vector_at(builder, post_d, post_o, _VF)),
                    _load(builder, _vector_at(builder, r_d, r_o, _VF)),
                )
                magnitude = _fabs(builder, x)
                top = _splat(_PHI_MAX, _VF)
                magnitude = builder.select(
                    builder.fcmp_ordered("<", magnitude, top), magnitude, top
                )
                scaled = builder.fadd(
                    builder.fmul(magnitude, _splat(_PHI_SCALE, _VF)), _splat(0.5, _VF)
                )
                y = _lookup(builder, fixed_d, builder.fptosi(scaled, _VI), _VI, scalar_loads)
                _store(builder, y, _vector_at(builder, p_d, p_o, _VI))
                acc_p = _vector_at(builder, acc_d, acc_o, _VI)
                sign = builder.shl(_below_zero(builder, x), _splat(_SIGN_BIT, _VI))
                _store(builder, builder.xor(builder.add(_load(builder, acc_p), y), sign), acc_p)
            return context.get_dummy_value()

        return signature, codegen

    return row_first_pass


def _second_pass(scalar_loads: bool):
    @intrinsic
    def row_second_pass(typingctx, post, r, p, acc, hard, table, column, shift, t0, degree, lift):
        """decode_qc_rows's second pass over the same entries (acc folded: a check's phi sum
        and sign parity at lift - shift[t] + w), for each entry and lane: x as in the first
        pass; a = acc[lift - shift[t] + w];
        index = min(((a & SUM_MASK) - p[i lift + w] + HALF) >> SHIFT, LAST) (uint32);
        message = table[index], negated iff a's bit 31 differs from (x < 0) (the float product
        (+-1) table[index] of the numba loop: the same bits); r[t lift + w] = message;
        post[column[t] lift + w] = x + message; hard[lift - shift[t] + w] += (that < 0)."""
        if not (
            all(_contiguous(a, types.float32) for a in (post, r))
            and all(_contiguous(a, types.uint32) for a in (p, acc))
            and _contiguous(hard, types.int32)
            and _contiguous(table, types.float32)
            and all(isinstance(a, types.Array) and a.layout == "C" for a in (column, shift))
            and all(isinstance(a, types.Integer) for a in (t0, degree, lift))
        ):
            return None
        signature = types.void(post, r, p, acc, hard, table, column, shift, t0, degree, lift)

        def codegen(context, builder, signature, args):
            arrays, entries = _row_entries(context, builder, signature, args, 8)
            post_d, r_d, p_d, acc_d, hard_d, table_d = arrays[:6]
            with _row_vectors(context, builder, *entries) as (post_o, r_o, p_o, acc_o):
                post_p = _vector_at(builder, post_d, post_o, _VF)
                r_p = _vector_at(builder, r_d, r_o, _VF)
                x = builder.fsub(_load(builder, post_p), _load(builder, r_p))
                a = _load(builder, _vector_at(builder, acc_d, acc_o, _VI))
                own = _load(builder, _vector_at(builder, p_d, p_o, _VI))
                others = builder.sub(builder.and_(a, _splat(_SUM_MASK, _VI)), own)
                index = builder.lshr(builder.add(others, _splat(_HALF, _VI)), _splat(_SHIFT, _VI))
                last = _splat(_LAST, _VI)
                index = builder.select(builder.icmp_unsigned("<", index, last), index, last)
                magnitude = builder.bitcast(
                    _lookup(builder, table_d, index, _VF, scalar_loads), _VI
                )
                flip = builder.xor(
                    builder.and_(a, _splat(1 << _SIGN_BIT, _VI)),
                    builder.shl(_below_zero(builder, x), _splat(_SIGN_BIT, _VI)),
                )
                message = builder.bitcast(builder.xor(magnitude, flip), _VF)
                _store_message(builder, x, message, r_p, post_p, hard_d, acc_o)
            return context.get_dummy_value()

        return signature, codegen

    return row_second_pass


# the two vector passes, their table lookups gathers or scalar loads (_lookup); module
# globals, which the decoder picks between by its closure's bool: numba's cache key is
# made of the closure's values, and plain values keep it the same from process to process
row_first_pass, row_second_pass = _first_pass(False), _second_pass(False)
row_first_pass_scalar, row_second_pass_scalar = _first_pass(True), _second_pass(True)


# numba keys a cached kernel by its own file's stamp, its bytecode and its closure's values,
# not by the modules it calls into. The decoder inlines ldpc's _stalled and _hard_decision_*
# and bakes in ldpc's tables and constants (the vector passes' too): after an edit of
# ldpc.py alone numba served the machine code built against the old one. The digest of
# ldpc.py is a closure value of the decoder, so another ldpc.py is another cache key.
LDPC_SOURCE_DIGEST = hashlib.sha256(Path(ldpc.__file__).read_bytes()).hexdigest()


@numba.njit(cache=True, inline="always")
def _entry_lanes(post, r, p, column, shift, t0, i, lift):
    """The numba loops' views of entry t = t0 + i (what _entry gives the vector passes):
    the posteriors from its column's first lane, its lift messages and phi values, and
    k = lift - shift[t], where its lanes start in the doubled accumulators."""
    t = t0 + i
    posteriors = post[np.int64(column[t]) * lift :]
    messages = r[t * lift : t * lift + lift]
    return posteriors, messages, p[i], lift - np.int64(shift[t])


@intrinsic
def _claim(typingctx, counter):
    """counter[0], then counter[0] + 1, in one atomic step: the index of the next frame a
    decoding worker takes (decode_qc_rows). Every index is handed out once, whichever
    thread asks; the order between threads is the only thing left to the machine."""
    sig = types.int64(counter)

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        first = cgutils.get_item_pointer(
            context, builder, signature.args[0], array, [context.get_constant(types.intp, 0)]
        )
        return builder.atomic_rmw("add", first, context.get_constant(types.int64, 1), "monotonic")

    return sig, codegen


def _decoder(constant_lift: int, scalar_lookups: bool | None = None):
    """decode_qc_rows compiled for codes of lift `constant_lift` only (0: any lift). A lift
    known at compile time lets LLVM drop the loops' remainders and trip-count checks
    (at lift 32 ~10 % of the time: its loops are 4 vector steps long). Its vector passes'
    table lookups are scalar loads if scalar_lookups (default SCALAR_LOOKUPS), else
    gathers: the same values. A closure: numba caches each lift's machine code under its
    value, the lookups' and ldpc.py's (LDPC_SOURCE_DIGEST)."""
    ldpc_source_digest = LDPC_SOURCE_DIGEST
    if scalar_lookups is None:
        scalar_lookups = SCALAR_LOOKUPS
    scalar_lookups = bool(scalar_lookups)

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
        subtraction, the same bits). Every inner loop is over lift contiguous lanes: for a
        lift that is a multiple of LANES, row_first_pass / row_second_pass (LLVM vectors of
        8 lanes, the table lookups 8-lane gathers with 32-bit indices); for another lift the
        numba loops they replace (LLVM vectorises them itself).
        """
        # only to be in the closure, hence in numba's cache key (LDPC_SOURCE_DIGEST)
        _ = ldpc_source_digest
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
        # Each thread takes the next frame (_claim) as it finishes one. A round's frames take
        # 5 to 100 iterations, and numba's prange split them into static halves whatever
        # parallel_chunksize said (its OpenMP loop has no dynamic schedule): a round lasted
        # as long as the slower half (docs/distillation.md, "Frames handed to the threads as
        # they finish"). The prange is over the frames: each thread's first iteration takes
        # frames until none is left, its others find none. (Over numba.get_num_threads()
        # workers the kernel could not be cached: numba calls that through a pointer.)
        claimed = np.zeros(1, dtype=np.int64)
        keep = np.int64(PROGRESS_UNIT - stall_progress)
        for _worker in numba.prange(rows.size):
            row = _claim(claimed)
            if row >= rows.size:
                continue
            post = np.empty(n, dtype=np.float32)
            p = np.empty((maxdeg, Z), dtype=np.uint32)
            acc = np.empty(2 * Z, dtype=np.uint32)
            hard = np.empty(2 * Z, dtype=np.int32)
            best = np.empty(max_iterations + 1, dtype=np.int64)
            while row < rows.size:
                f = rows[row]
                r = messages[f]
                for v in range(n):
                    post[v] = llr[f, v]
                # the messages added in the CSR's edge order: a variable's edges by check, i.e.
                # by base row (a row holds a column at most once)
                for t in range(row_ptr[mb]):
                    base = np.int64(column[t]) * Z
                    for w in range(Z):
                        post[base + w] += r[t * Z + w]
                it = 0
                done = False
                best[0] = m + 1
                while it < max_iterations and not done:
                    it += 1
                    unsatisfied = 0
                    for b in range(mb):
                        t0 = row_ptr[b]
                        deg = row_ptr[b + 1] - t0
                        for z in range(2 * Z):
                            acc[z] = 0
                        if Z % LANES == 0 and scalar_lookups:
                            row_first_pass_scalar(
                                post, r, p, acc, fixed, column, shift, t0, deg, Z
                            )
                        elif Z % LANES == 0:
                            row_first_pass(post, r, p, acc, fixed, column, shift, t0, deg, Z)
                        else:
                            for i in range(deg):
                                pv_run, rt, pi, k = _entry_lanes(
                                    post, r, p, column, shift, t0, i, Z
                                )
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
                        if Z % LANES == 0 and scalar_lookups:
                            row_second_pass_scalar(
                                post, r, p, acc, hard, table, column, shift, t0, deg, Z
                            )
                        elif Z % LANES == 0:
                            row_second_pass(
                                post, r, p, acc, hard, table, column, shift, t0, deg, Z
                            )
                        else:
                            for i in range(deg):
                                pv_run, rt, pi, k = _entry_lanes(
                                    post, r, p, column, shift, t0, i, Z
                                )
                                ak = acc[k : k + Z]
                                hk = hard[k : k + Z]
                                for w in range(Z):
                                    x = pv_run[w] - rt[w]
                                    a = ak[w]
                                    index = min(
                                        np.uint32(np.uint32((a & SUM_MASK) - pi[w]) + HALF_U)
                                        >> SHIFT_U,
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
                        done = _hard_decision_satisfies(
                            post, syndromes, f, m, check_ptr, check_var
                        )
                    if _stalled(best, it, unsatisfied, stall, keep):
                        break
                _hard_decision_out(post, f, it, out_bits, out_iters)
                ok[row] = done
                row = _claim(claimed)
        return ok

    return decode_qc_rows


decode_qc_rows = _decoder(0)
# the lifts of the QC construction (ldpc.QC_BASE_COLUMNS columns: n / 2048)
_LIFT_DECODERS = {lift: _decoder(lift) for lift in (32, 64)}


def decoder_for(lift: int):
    """decode_qc_rows, compiled for `lift` where it has its own machine code."""
    return _LIFT_DECODERS.get(int(lift), decode_qc_rows)
