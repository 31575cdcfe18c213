"""The quasi-cyclic decoder (ldpc_qc.decode_qc_rows, issue 17) against the decoder it
replaces on QC codes (ldpc.decode_phi_rows on the expanded CSR): bit for bit."""

import numba
import numpy as np
import pytest

from host.distil import ldpc, ldpc_qc, reconcile
from tests.ldpc_qc_codes import random_qc_code


def test_the_expansion_puts_each_check_s_variables_in_entry_order():
    """Check r Z + z holds column[t] Z + (z + shift[t]) mod Z for the entries t of base row
    r in order (docs/distillation.md "Quasi-cyclic codes"), and the QC message index
    t Z + w (entry t, variable lane w) maps to that edge's CSR index."""
    lift = 5
    row_ptr = np.array([0, 2, 5], np.int32)
    column = np.array([0, 3, 1, 2, 3], np.int32)
    shift = np.array([0, 4, 1, 0, 2], np.int32)
    check_ptr, check_var = ldpc_qc.expand(lift, row_ptr, column, shift)
    assert check_ptr.tolist() == [0, 2, 4, 6, 8, 10, 13, 16, 19, 22, 25]
    # check 1 (row 0, lane 1): column 0 lane 1, column 3 lane (1 + 4) % 5 = 0
    assert check_var[2:4].tolist() == [1, 15]
    # check 9 (row 1, lane 4): column 1 lane 0, column 2 lane 4, column 3 lane 1
    assert check_var[22:25].tolist() == [5, 14, 16]
    order = ldpc_qc.qc_message_order(lift, row_ptr, shift)
    # entry 3 (row 1, second entry, shift 0), lane 4: check lane 4, CSR 2*5 + 4*3 + 1
    assert order[3 * lift + 4] == 23 and np.array_equal(np.sort(order), np.arange(25))
    # entry 1 (row 0, second entry, shift 4), variable lane 0: check lane 1, CSR 0 + 1*2 + 1
    assert order[1 * lift + 0] == 3
    qc_var = np.repeat(column.astype(np.int64) * lift, lift) + np.tile(np.arange(lift), 5)
    assert np.array_equal(check_var[order], qc_var)


def _frames(code, rng, q_true, q_assumed, punctured, known):
    """Alice's random words, Bob's LLRs at q_assumed from a noisy copy at q_true (one per
    frame); the first `punctured` positions of the code's order at LLR 0, the next `known`
    at +-LLR_KNOWN (shortened)."""
    frames = q_true.size
    x = rng.integers(0, 2, (frames, code.n), dtype=np.uint8)
    y = x ^ (rng.random((frames, code.n)) < q_true[:, None]).astype(np.uint8)
    llr = np.stack([ldpc.channel_llr(row, q_assumed) for row in y]).astype(np.float32)
    llr[:, code.order[:punctured]] = 0
    shortened = code.order[punctured : punctured + known]
    llr[:, shortened] = np.where(x[:, shortened] == 1, -1, 1) * ldpc.LLR_KNOWN
    return x, llr, code.syndrome(x)


def _both(code, rows, llr, syndromes, iterations, qc_messages, csr_messages, stall, progress,
          qc_decoder=None):  # fmt: skip
    """decode_qc_rows (qc_decoder, default decoder_for the code's lift) and decode_phi_rows
    on the same frames; each its flags, bits, iteration counts (accumulated on 3 each) and
    messages (updated in place)."""
    lift, row_ptr, column, shift = code.qc
    results = []
    for decode in ("qc", "csr"):
        out = np.full(llr.shape, 2, np.uint8)
        iters = np.full(llr.shape[0], 3, np.int64)
        if decode == "qc":
            ok = (qc_decoder or ldpc_qc.decoder_for(lift))(
                rows, llr, syndromes, lift, row_ptr, column, shift, code.check_ptr,
                code.narrow_check_var(), iterations, qc_messages, out, iters, stall, progress,
            )  # fmt: skip
        else:
            ok = ldpc.decode_phi_rows(
                rows, llr, syndromes, code.check_ptr, code.narrow_check_var(), iterations,
                csr_messages, out, iters, stall, progress,
            )  # fmt: skip
        results.append((ok, out, iters))
    return results


@pytest.mark.parametrize(
    "rate,q,lift,other_lookups",
    [(0.9, 0.01, 16, False), (0.84, 0.02, 32, False), (0.78, 0.03, 24, False),
     (0.67, 0.05, 64, False), (0.84, 0.02, 20, False), (0.9, 0.01, 16, True),
     (0.78, 0.03, 24, True)],
)  # fmt: skip
def test_the_qc_decoder_gives_the_csr_decoders_results_bit_for_bit(rate, q, lift, other_lookups):
    """On a QC code, decode_qc_rows leaves the same success flags, hard decisions,
    iteration counts and messages (bit for bit, after the layout permutation) as
    decode_phi_rows on the expanded CSR: on fresh frames at and above the rate's QBER (some
    decode, some stall), with punctured (LLR 0) and shortened (LLR_KNOWN) positions, then
    on a resumed retry of a subset of the rows with revealed bits and the early stall rule,
    the other rows left untouched. Any difference in the per-edge arithmetic or the order
    of the layers would change the messages' bits. Lifts 32 and 64 take the decoders
    compiled for them (decoder_for), 16, 20 and 24 the one for any lift; lift 20 (not a
    multiple of ldpc_qc.LANES) its numba loops, the others the LLVM vector passes.
    other_lookups: the generic decoder with the vector passes' other table lookups
    (gathers where this CPU takes scalar loads, ldpc_qc.SCALAR_LOOKUPS, or the reverse),
    so both kinds are checked whatever CPU runs the tests."""
    decoder = ldpc_qc._decoder(0, not ldpc_qc.SCALAR_LOOKUPS) if other_lookups else None
    code = random_qc_code(4096 // lift * lift, rate, lift, seed=5)
    order = ldpc_qc.qc_message_order(lift, code.qc[1], code.qc[3])
    assert np.array_equal(np.sort(order), np.arange(code.edges))
    rng = np.random.default_rng(int(rate * 100))
    q_true = q * np.array([0.6, 0.8, 1.0, 1.0, 1.3, 1.6, 2.0, 2.5])
    frames = q_true.size
    x, llr, syndromes = _frames(code, rng, q_true, q, punctured=code.n // 50, known=code.n // 40)
    qc_messages = np.zeros((frames, code.edges), np.float32)
    csr_messages = np.zeros((frames, code.edges), np.float32)
    rows = np.arange(frames, dtype=np.int64)
    (ok, out, iters), (ref_ok, ref_out, ref_iters) = _both(
        code,
        rows,
        llr,
        syndromes,
        60,
        qc_messages,
        csr_messages,
        ldpc.STALL_ITERATIONS,
        0,
        decoder,
    )
    assert np.array_equal(ok, ref_ok) and 0 < ok.sum() < frames, ok
    assert np.array_equal(out, ref_out) and np.array_equal(iters, ref_iters)
    assert np.array_equal(out[ok], x[ok])
    assert np.array_equal(qc_messages.view(np.uint32), csr_messages[:, order].view(np.uint32))
    assert np.count_nonzero(qc_messages) > 0.9 * qc_messages.size

    # a retry round: the failed frames with a quarter of their bits revealed, resumed from
    # their messages under the early stall rule; the decoded frames' rows are not touched
    failed = np.nonzero(~ok)[0].astype(np.int64)
    reveal = rng.permutation(code.n)[: code.n // 4]
    llr[np.ix_(failed, reveal)] = np.where(x[np.ix_(failed, reveal)] == 1, -1, 1) * ldpc.LLR_KNOWN
    before = qc_messages.copy()
    (ok, out, iters), (ref_ok, ref_out, ref_iters) = _both(
        code, failed, llr, syndromes, 40, qc_messages, csr_messages, 4, 51, decoder
    )
    assert np.array_equal(ok, ref_ok) and ok.any(), ok
    assert np.array_equal(out, ref_out) and np.array_equal(iters, ref_iters)
    assert np.array_equal(qc_messages.view(np.uint32), csr_messages[:, order].view(np.uint32))
    others = np.setdiff1d(rows, failed)
    assert np.array_equal(qc_messages[others], before[others]) and (out[others] == 2).all()
    assert (iters[others] == 3).all() and (iters[failed] > 3).all()


def test_reconciliation_decodes_a_quasi_cyclic_code_with_the_qc_decoder():
    """reconcile._decode (every decoding round of Bob's) runs decode_qc_rows on a code with
    a QC description: the messages it leaves are in the QC layout (entry t, variable lane w
    at t Z + w), the CSR decoder's permuted, with the same flags and bits."""
    lift = 16
    code = random_qc_code(2048, 0.84, lift, seed=2)
    rng = np.random.default_rng(9)
    x, llr, syndromes = _frames(code, rng, np.full(4, 0.01), 0.01, punctured=0, known=0)
    rows = np.arange(4, dtype=np.int64)
    messages = np.zeros((4, code.edges), np.float32)
    out = np.zeros_like(x)
    ok = reconcile._decode(rows, llr, syndromes, code, 60, messages, out, np.zeros(4, np.int64))
    csr_messages = np.zeros_like(messages)
    ref_out = np.zeros_like(x)
    ref_ok = ldpc.decode_phi_rows(
        rows, llr, syndromes, code.check_ptr, code.narrow_check_var(), 60, csr_messages, ref_out,
        np.zeros(4, np.int64), ldpc.STALL_ITERATIONS, 0,
    )  # fmt: skip
    assert ok.all() and np.array_equal(ok, ref_ok) and np.array_equal(out, x)
    order = ldpc_qc.qc_message_order(lift, code.qc[1], code.qc[3])
    assert np.array_equal(messages.view(np.uint32), csr_messages[:, order].view(np.uint32))
    assert not np.array_equal(messages, csr_messages)


def test_checks_near_the_largest_degree_whose_phi_sum_fits_decode_as_on_the_csr():
    """The QC decoder keeps a check's sum of phi and the parity of its negative signs in one
    uint32 (the sum below 2^31, bit 31 the parity): a check of degree near
    PHI_FIXED_MAX_DEGREE whose edges are nearly all punctured (phi at its largest: the sum
    above 2^30) decodes bit for bit as decode_phi_rows decodes it; one degree more is
    refused, and so is a code of another lift by a decoder compiled for one lift."""
    lift = 8
    degree = ldpc.PHI_FIXED_MAX_DEGREE - 1
    rng = np.random.default_rng(3)
    columns = degree + 10
    row_ptr = np.array([0, degree, degree + 20], np.int32)
    column = np.concatenate([np.arange(degree), np.arange(degree - 10, degree + 10)])
    shift = rng.integers(lift, size=column.size)
    check_ptr, check_var = ldpc_qc.expand(lift, row_ptr, column, shift)
    qc = (lift, row_ptr, column.astype(np.int32), shift.astype(np.int32))
    order = np.arange(columns * lift, dtype=np.int32)
    code = ldpc.Code(columns * lift, 2 * lift, check_ptr, check_var, 1, 0.0, order, qc=qc)
    x = rng.integers(0, 2, (3, code.n), dtype=np.uint8)
    llr = np.where(x == 1, -3.0, 3.0).astype(np.float32)
    llr[:, : (degree - 5) * lift] = 0  # punctured: q = 0, phi at its largest
    syndromes = code.syndrome(x)
    rows = np.arange(3, dtype=np.int64)
    qc_messages = np.zeros((3, code.edges), np.float32)
    csr_messages = np.zeros_like(qc_messages)
    (ok, out, iters), (ref_ok, ref_out, ref_iters) = _both(
        code, rows, llr, syndromes, 4, qc_messages, csr_messages, ldpc.STALL_ITERATIONS, 0
    )
    assert np.array_equal(ok, ref_ok) and np.array_equal(out, ref_out)
    assert np.array_equal(iters, ref_iters)
    order = ldpc_qc.qc_message_order(lift, row_ptr, shift)
    assert np.array_equal(qc_messages.view(np.uint32), csr_messages[:, order].view(np.uint32))
    # the first check's sum of phi on its first iteration: above 2^30, below 2^31
    first_sum = (degree - 5) * int(ldpc.PHI_TABLE_FIXED[0])
    assert 2**30 < first_sum < 2**31
    heavier = np.concatenate([np.arange(degree + 2), np.arange(degree - 10, degree + 10)])
    heavier = heavier.astype(np.int32)
    too_heavy = (lift, np.array([0, degree + 2, degree + 22], np.int32), heavier, heavier * 0)
    with pytest.raises(ValueError, match="another lift"):
        ldpc_qc.decoder_for(32)(
            rows, llr, syndromes, *code.qc, code.check_ptr, code.narrow_check_var(), 4,
            qc_messages, out, iters, ldpc.STALL_ITERATIONS, 0,
        )  # fmt: skip
    with pytest.raises(ValueError, match="PHI_FIXED_MAX_DEGREE"):
        ldpc_qc.decode_qc_rows(
            rows, llr, syndromes, *too_heavy, code.check_ptr, code.narrow_check_var(), 4,
            qc_messages, out, iters, ldpc.STALL_ITERATIONS, 0,
        )  # fmt: skip


def test_an_edit_of_ldpc_py_alone_keys_the_qc_decoders_cache_anew(monkeypatch):
    """numba keys a cached kernel by its own source file's stamp, its bytecode and its
    closure's values, not by the modules it calls into; the QC decoder inlines ldpc's
    _stalled and _hard_decision_* and bakes in ldpc's tables and constants (the vector
    passes' too), so after an edit of ldpc.py alone numba served the machine code built
    against the old ldpc.py. The digest of ldpc.py is in the decoder's cache key: another
    ldpc.py, another key (a cache miss: a fresh compile)."""
    import hashlib
    from pathlib import Path

    digest = hashlib.sha256(Path(ldpc.__file__).read_bytes()).hexdigest()
    assert ldpc_qc.LDPC_SOURCE_DIGEST == digest

    def key(dispatcher):
        return dispatcher._cache._index_key((), dispatcher.targetctx.codegen())

    now = [key(ldpc_qc._decoder(lift)) for lift in (0, 32)]
    assert now == [key(ldpc_qc.decode_qc_rows), key(ldpc_qc.decoder_for(32))]
    monkeypatch.setattr(ldpc_qc, "LDPC_SOURCE_DIGEST", hashlib.sha256(b"edited").hexdigest())
    edited = [key(ldpc_qc._decoder(lift)) for lift in (0, 32)]
    assert all(a != b for a, b in zip(now, edited, strict=True))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_reconciliation_refuses_a_non_finite_llr_before_the_decoder_reads_it(bad):
    """The decoders are compiled with ldpc.DECODER_FASTMATH (nnan, ninf): a NaN or infinite
    LLR is undefined behaviour there, and their phi-table index comes from it unchecked
    (decode_phi_rows read out of bounds and crashed the process on a NaN LLR; the QC
    kernel's index depends on how LLVM lowered the clamp). reconcile._decode refuses it,
    on a QC code and on a CSR one, before either decoder runs; messages and bits are left
    as they were."""
    lift = 16
    code = random_qc_code(2048, 0.84, lift, seed=2)
    rng = np.random.default_rng(9)
    x, llr, syndromes = _frames(code, rng, np.full(2, 0.01), 0.01, punctured=0, known=0)
    llr[1, 77] = bad
    csr_code = ldpc.Code(
        code.n, code.m, code.check_ptr, code.check_var, 1, code.rate, code.order, qc=None
    )
    for c in (code, csr_code):
        messages = np.zeros((2, c.edges), np.float32)
        out = np.full(x.shape, 2, np.uint8)
        rows = np.arange(2, dtype=np.int64)
        with pytest.raises(ValueError, match="finite"):
            reconcile._decode(rows, llr, syndromes, c, 5, messages, out, np.zeros(2, np.int64))
        assert not messages.any() and (out == 2).all()
    # a frame not decoded is not checked: its LLRs are not read
    out = np.zeros_like(x)
    messages = np.zeros((2, code.edges), np.float32)
    rows = np.array([0], dtype=np.int64)
    ok = reconcile._decode(rows, llr, syndromes, code, 60, messages, out, np.zeros(2, np.int64))
    assert ok.all() and np.array_equal(out[0], x[0])


@numba.njit(parallel=True)
def _claim_every_index(counts):
    claimed = np.zeros(1, dtype=np.int64)
    for _ in numba.prange(counts.size):  # as decode_qc_rows: claims until none is left
        index = ldpc_qc._claim(claimed)
        while index < counts.size:
            counts[index] += 1
            index = ldpc_qc._claim(claimed)


def test_the_quasi_cyclic_decoders_claims_hand_every_frame_to_one_thread():
    """decode_qc_rows's threads take frames by _claim (an atomic fetch-and-add) as each
    finishes one: every index goes out exactly once, however the threads race (a frame
    decoded twice at once would corrupt its messages; one never taken, left undecoded)."""
    if numba.get_num_threads() < 2:
        pytest.skip("one numba thread: no race to lose")
    counts = np.zeros(200_000, dtype=np.int64)
    _claim_every_index(counts)
    assert (counts == 1).all()


def test_the_qc_decoders_are_saved_to_numbas_cache():
    """decode_qc_rows (generic, and compiled for a lift) is written to numba's on-disk
    cache: an uncacheable kernel (a dynamic global, such as a prange over
    numba.get_num_threads()) only warns, and every process would compile it anew
    (~1 minute for the three)."""
    for lift in (32, 24):  # decoder_for(32), and the generic decode_qc_rows
        code = random_qc_code(4096 // lift * lift, 0.84, lift, seed=5)
        x, llr, syndromes = _frames(code, np.random.default_rng(1), np.full(2, 0.02), 0.02, 0, 0)
        messages = np.zeros((2, code.edges), np.float32)
        out, iterations = np.zeros_like(x), np.zeros(2, np.int64)
        reconcile._decode(np.arange(2), llr, syndromes, code, 5, messages, out, iterations)
        kernel = ldpc_qc.decoder_for(lift)
        # the whole key (signature, CPU, and this closure's bytecode and values): every
        # closure of _decoder shares one index file, so a signature alone could be another
        # lift's or lookup kind's entry
        saved = set(kernel._cache._cache_file._load_index())
        codegen = kernel.targetctx.codegen()
        keys = [kernel._cache._index_key(s, codegen) for s in kernel.signatures]
        assert keys and all(key in saved for key in keys), lift


def test_scalar_table_lookups_are_taken_where_llvm_would_not_gather_in_hardware():
    """The vector passes' lookups are scalar loads where LLVM has no hardware gather for
    numba's target (there it splits a gather itself, through 64-bit pointers: ~0.85x the
    decoder's CPU time with our loads from the 32-bit indices, measured on a Zen 3), and
    gathers where it has one. And the decoder of the other kind is built with the other
    passes: its closure holds the other choice, and the passes it takes emit a gather
    (llvm.masked.gather) or none."""
    import llvmlite.binding
    from numba.core.registry import cpu_target

    target = llvmlite.binding.Target.from_default_triple()
    for cpu, hardware in (("skylake", True), ("icelake-server", True), ("znver3", False),
                          ("haswell", False), ("generic", False)):  # fmt: skip
        machine = target.create_target_machine(cpu=cpu, features="", opt=2)
        assert ldpc_qc.gathers_in_hardware(machine) is hardware, cpu
    numbas = cpu_target.target_context.codegen()._tm
    assert ldpc_qc.SCALAR_LOOKUPS is not ldpc_qc.gathers_in_hardware(numbas)

    def closure(decoder):
        names, cells = decoder.py_func.__code__.co_freevars, decoder.py_func.__closure__
        return {name: cell.cell_contents for name, cell in zip(names, cells, strict=True)}

    assert closure(ldpc_qc.decode_qc_rows)["scalar_lookups"] is ldpc_qc.SCALAR_LOOKUPS
    assert closure(ldpc_qc.decoder_for(32))["scalar_lookups"] is ldpc_qc.SCALAR_LOOKUPS
    other = ldpc_qc._decoder(0, not ldpc_qc.SCALAR_LOOKUPS)
    assert closure(other)["scalar_lookups"] is not ldpc_qc.SCALAR_LOOKUPS

    lift = 8
    post, r = np.zeros(2 * lift, np.float32), np.zeros(2 * lift, np.float32)
    p, acc = np.zeros((2, lift), np.uint32), np.zeros(2 * lift, np.uint32)
    hard = np.zeros(2 * lift, np.int32)
    column, shift = np.array([0, 1], np.int32), np.array([0, 3], np.int32)
    for first, second, gathers in (
        (ldpc_qc.row_first_pass, ldpc_qc.row_second_pass, True),
        (ldpc_qc.row_first_pass_scalar, ldpc_qc.row_second_pass_scalar, False),
    ):

        def passes(post, r, p, acc, hard, first=first, second=second):
            first(post, r, p, acc, ldpc_qc.PHI_TABLE_FIXED, column, shift, 0, 2, lift)
            second(post, r, p, acc, hard, ldpc_qc.PHI_TABLE, column, shift, 0, 2, lift)

        kernel = numba.njit(passes)
        kernel(post, r, p, acc, hard)
        llvm_ir = kernel.inspect_llvm(kernel.signatures[0])
        assert ("llvm.masked.gather" in llvm_ir) is gathers
