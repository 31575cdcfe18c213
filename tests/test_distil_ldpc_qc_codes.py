"""Quasi-cyclic LDPC codes (issue 17, ldpc.construct_qc, the default): the code is
exactly the expansion of its QC description (the contract the QC decoder relies on,
docs/distillation.md "Quasi-cyclic codes"), its staircase is dual-diagonal, its shifts
keep lifted 4-cycles away from the light columns (shifts "6" also 6-cycles, counted by
ldpc.qc_six_cycles), the cache restores the description, and a block reconciles with it
end to end."""

import itertools

import numpy as np
import pytest
import scipy.sparse as sp

from host.distil import ldpc, ldpc_qc, reconcile
from tests.test_distil_reconcile import _noisy_pair, _run_pair

# A 2 % QBER plan's mother code at 2^16 (rate 0.8375, design 0.84: check degree ~50,
# degree-80 columns) and a low-rate one whose greedy shifts leave no lifted 4-cycle.
N = 1 << 16
RATE = 0.8375


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QKDSAT_CACHE", str(tmp_path))
    monkeypatch.setattr(ldpc, "_CODES", {})


def _csr_matrix(code: ldpc.Code) -> sp.csr_matrix:
    data = np.ones(code.edges, dtype=np.int64)
    return sp.csr_matrix((data, code.check_var, code.check_ptr), shape=(code.m, code.n))


def _four_cycle_variables(code: ldpc.Code) -> tuple[int, np.ndarray]:
    """(4-cycles of the expanded graph, whether each variable lies on one), from H H^T:
    two checks sharing k variables close k (k - 1) / 2 of them, through those k."""
    h = _csr_matrix(code)
    shared = sp.triu(h @ h.T, k=1).tocoo()
    close = shared.data >= 2
    cycles = int((shared.data[close] * (shared.data[close] - 1) // 2).sum())
    closing = np.sort(shared.row[close].astype(np.int64) * code.m + shared.col[close])
    # variable v is on one iff two of its checks a < b are such a pair
    by_variable = h.T.tocsr()
    on_cycle = np.zeros(code.n, dtype=bool)
    if closing.size == 0:
        return cycles, on_cycle
    for degree in np.unique(np.diff(by_variable.indptr)):
        variables = np.nonzero(np.diff(by_variable.indptr) == degree)[0]
        checks = by_variable.indices[by_variable.indptr[variables][:, None] + np.arange(degree)]
        a, b = np.triu_indices(degree, k=1)
        keys = checks[:, a].astype(np.int64) * code.m + checks[:, b]  # indices sorted: a < b
        hit = np.searchsorted(closing, keys).clip(max=closing.size - 1)
        on_cycle[variables] = (closing[hit] == keys).any(axis=1)
    return cycles, on_cycle


def test_qc_code_is_exactly_the_expansion_of_its_description():
    code = ldpc.construct_qc(N, RATE)
    lift, row_ptr, column, shift = code.qc
    assert type(lift) is int and lift == N // ldpc.QC_BASE_COLUMNS == 32
    mb = row_ptr.size - 1
    assert code.m == mb * lift and mb == round(ldpc.QC_BASE_COLUMNS * (1 - RATE))
    assert row_ptr.dtype == column.dtype == shift.dtype == np.int32
    assert row_ptr[0] == 0 and row_ptr[-1] == column.size == shift.size
    assert shift.min() >= 0 and shift.max() < lift
    for r in range(mb):  # columns ascending and unique within a base row
        assert np.all(np.diff(column[row_ptr[r] : row_ptr[r + 1]]) > 0)
    # qc-spec: check r Z + z holds, entry by entry in row order, column Z + (z + shift) % Z
    assert code.check_ptr.size == code.m + 1
    for check in range(code.m):
        r, z = divmod(check, lift)
        entries = slice(row_ptr[r], row_ptr[r + 1])
        expected = column[entries] * lift + (z + shift[entries]) % lift
        assert np.array_equal(
            code.check_var[code.check_ptr[check] : code.check_ptr[check + 1]], expected
        )
    # every column has its designed degree in the expansion too (each circulant a permutation)
    base_degree = np.bincount(column, minlength=ldpc.QC_BASE_COLUMNS)
    assert np.array_equal(np.bincount(code.check_var, minlength=N), np.repeat(base_degree, lift))


def test_qc_staircase_is_dual_diagonal_and_punctured_first_untainted():
    code = ldpc.construct_qc(N, RATE)
    lift, row_ptr, column, shift = code.qc
    stairs, _, mb = ldpc._degrees(ldpc.QC_BASE_COLUMNS, RATE, ldpc._design_for(RATE))
    assert 0 < stairs <= mb - 1  # the design's degree-2 share: 0.16 of the columns here
    row_of_entry = np.repeat(np.arange(mb), np.diff(row_ptr))
    for c in range(stairs):  # base column c on rows c and c + 1, identity circulants
        entries = np.nonzero(column == c)[0]
        assert row_of_entry[entries].tolist() == [c, c + 1]
        assert shift[entries].tolist() == [0, 0]
    # the public order starts with the lifts of staircase columns 0, 2, 4, ...: no check
    # has two of them
    even = (np.arange(0, stairs, 2)[:, None] * lift + np.arange(lift)).ravel()
    assert set(code.order[: even.size].tolist()) == set(even.tolist())
    assert np.array_equal(np.sort(code.order), np.arange(N))
    assert ldpc.untainted_prefix(code) >= even.size


def test_greedy_shifts_keep_lifted_four_cycles_off_the_light_columns():
    """Greedy shifts (QKDSAT_LDPC_QC=1) against uniform ones: the 4-cycles of the
    expanded graph are exactly the lifts (Z each) of the base cycles ldpc.qc_four_cycles
    reports, through exactly the columns it names; at rate 0.5 the greedy leaves none at
    all, and at 0.8375 it keeps them off all but a few of the light (degree <= 3) columns
    (9 of 1,100), where uniform shifts put them on hundreds (395). Seeded: deterministic."""
    low = ldpc.construct_qc(N, 0.5)
    cycles, on_cycle = _four_cycle_variables(low)
    assert cycles == 0 and ldpc.qc_four_cycles(low).sum() == 0
    light_on_cycle = {}
    for shifts in ("1", "random"):
        code = ldpc.construct_qc(N, RATE, shifts=shifts)
        lift, _, column, _ = code.qc
        per_column = ldpc.qc_four_cycles(code)
        cycles, on_cycle = _four_cycle_variables(code)
        assert cycles == per_column.sum() // 2 * lift  # each base cycle has 2 columns counted
        assert np.array_equal(on_cycle, np.repeat(per_column > 0, lift))
        light = np.bincount(column, minlength=per_column.size) <= 3
        light_on_cycle[shifts] = int(np.sum(light & (per_column > 0)))
    assert light_on_cycle["1"] <= 20 < 300 <= light_on_cycle["random"], light_on_cycle


def test_no_light_variable_closes_a_cycle_with_one_staircase():
    """Lane z of the Z staircases joins check (r, z) to (r', z) for any two base rows
    r, r' <= stairs, so a variable with two checks in one lane there closes a cycle of
    length 2 |r - r'| + 2 through the staircase (the low-ACE cycles of a PEG code, which
    has one for every pair of a variable's checks). The greedy shifts leave none on the
    variables of degree <= 9 (distinct shifts within their base columns): checked on the
    expanded graph, every such variable's checks on staircase rows in distinct lanes."""
    code = ldpc.construct_qc(N, RATE)
    lift = code.qc[0]
    stairs, _, _ = ldpc._degrees(ldpc.QC_BASE_COLUMNS, RATE, ldpc._design_for(RATE))
    check_of_edge = np.repeat(np.arange(code.m), np.diff(code.check_ptr))
    row, lane = np.divmod(check_of_edge, lift)
    degree = np.bincount(code.check_var, minlength=N)
    light = (degree[code.check_var] <= 9) & (code.check_var >= stairs * lift) & (row <= stairs)
    pairs = np.unique(np.stack([code.check_var[light], lane[light]]), axis=1)
    assert pairs.shape[1] == light.sum() > 0  # no (variable, lane) twice
    random = ldpc.construct_qc(N, RATE, shifts="random")
    light = (degree[random.check_var] <= 9) & (random.check_var >= stairs * lift) & (row <= stairs)
    lanes = (random.check_var[light], lane[light])  # same base graph: same check_ptr
    assert np.unique(np.stack(lanes), axis=1).shape[1] < light.sum()  # uniform shifts do


def test_qc_cache_round_trip_restores_the_description(tmp_path):
    built = ldpc.construct_qc(N, RATE)
    (path,) = (tmp_path / "ldpc").glob("qc32.*.npz")
    ldpc._CODES.clear()
    loaded = ldpc.construct_qc(N, RATE)
    assert loaded is not built and loaded.digest() == built.digest()
    assert type(loaded.qc[0]) is int and loaded.qc[0] == built.qc[0]
    for a, b in zip(loaded.qc[1:], built.qc[1:], strict=True):
        assert a.dtype == np.int32 and np.array_equal(a, b)
    assert path.name.startswith(f"qc32.{ldpc.QC_VERSION}-v{ldpc.CODE_VERSION}-n{N}-r{RATE}-s1-")


def test_a_cached_qc_description_that_disagrees_with_its_code_is_rebuilt_not_decoded(tmp_path):
    """The QC decoder indexes its buffers by the description's shifts and columns without
    bounds checks: a cache file whose description is out of range or does not expand to
    its parity checks (altered on disk, or another version's) is rebuilt on load, never
    handed to the decoder."""
    built = ldpc.construct_qc(N, RATE)
    (path,) = (tmp_path / "ldpc").glob("qc32.*.npz")
    good = dict(np.load(path))
    for field, alter in (
        ("shift", lambda a: np.where(np.arange(a.size) == 7, 32, a)),  # a shift = Z
        ("shift", lambda a: (a + 1) % 32),  # in range, but not this code's
        ("column", lambda a: np.where(np.arange(a.size) == 3, 2048, a)),
    ):
        altered = dict(good, **{field: alter(good[field]).astype(np.int32)})
        np.savez(path, **altered)
        ldpc._CODES.clear()
        loaded = ldpc.construct_qc(N, RATE)
        assert loaded.digest() == built.digest()
        for a, b in zip(loaded.qc[1:], built.qc[1:], strict=True):
            assert np.array_equal(a, b), field
        assert np.array_equal(np.load(path)[field], good[field])  # the file rewritten


def test_frames_of_the_protocol_take_qc_codes_unless_the_switch_says_peg(monkeypatch):
    """QC codes are the default for every frame length the protocol uses (2^16-2^18: a
    lift of 32-128); QKDSAT_LDPC_QC=0 builds the PEG code instead, a frame under
    QC_MIN_LIFT base-column lifts (tests' 2^13) or of partial base columns keeps PEG, and
    a value the switch does not know is refused, not taken as off."""
    monkeypatch.delenv("QKDSAT_LDPC_QC", raising=False)
    qc = ldpc.construct(N, 0.7, seed=3)
    assert qc.qc is not None and qc.qc[0] == 32
    assert ldpc.cached_path(N, 0.7, seed=3).exists()
    assert ldpc.cached_path(N, 0.7, seed=3).name.startswith("qc32.")
    assert ldpc.construct(8192, 0.7, seed=3).qc is None  # lift 4: PEG
    assert ldpc.construct(N - 1024, 0.7, seed=3).qc is None  # not whole base columns
    monkeypatch.setenv("QKDSAT_LDPC_QC", "0")
    peg = ldpc.construct(N, 0.7, seed=3)
    assert peg.qc is None and peg.digest() != qc.digest()
    assert not ldpc.cached_path(N, 0.7, seed=3).name.startswith("qc")
    monkeypatch.setenv("QKDSAT_LDPC_QC", "yes")
    with pytest.raises(ValueError, match="QKDSAT_LDPC_QC"):
        ldpc.construct(N, 0.7, seed=3)


def test_a_block_reconciles_with_identical_keys_on_qc_codes(monkeypatch):
    monkeypatch.delenv("QKDSAT_LDPC_QC", raising=False)
    q = 0.03
    x, y = _noisy_pair(120_000, q, np.random.default_rng(5))
    corrected, stats, alice_stats = _run_pair("ldpc", x, y, q)
    assert np.array_equal(corrected, x) and stats["kept"].all()
    assert stats["leak_bits"] == alice_stats["leak_bits"]
    code = ldpc.construct(stats["frame_bits"], stats["mother_rate"])
    # 120,000 bits would fill two frames of 2^16: one frame of 2^17 holds them at least
    # half full (ldpc.SMALL_BLOCK_MIN_FILL, 139d904), quasi-cyclic as well
    assert code.qc is not None and code.n == 2 * ldpc.FRAME_BITS
    assert reconcile._plan(x.size, q, 1.1).code is code


def _six_cycles_by_light_variables(code_ptr, code_var, n: int, light: np.ndarray) -> np.ndarray:
    """6-cycles of a small expanded graph by how many of their 3 variables are light,
    brute force: a 6-cycle is 3 variables and, for each pair of them, a check they share,
    the 3 checks distinct."""
    checks_of = [set() for _ in range(n)]
    for check in range(code_ptr.size - 1):
        for v in code_var[code_ptr[check] : code_ptr[check + 1]]:
            checks_of[v].add(check)
    counts = np.zeros(4, dtype=np.int64)
    for v1, v2, v3 in itertools.combinations(range(n), 3):
        closing = sum(
            1
            for a in checks_of[v1] & checks_of[v2]
            for b in checks_of[v2] & checks_of[v3]
            for c in checks_of[v3] & checks_of[v1]
            if len({a, b, c}) == 3
        )
        counts[int(light[v1]) + int(light[v2]) + int(light[v3])] += closing
    return counts


def test_qc_six_cycles_are_the_lifts_of_the_base_cycles_it_counts():
    """ldpc.qc_six_cycles (the measure of docs/distillation.md "QC shifts against
    6-cycles") against a brute-force count on the expanded graph of small random QC
    descriptions (lifts 2-3, so that many base cycles sum to 0), by the number of light
    (degree <= 3) variables on the cycle; cycles with none are not counted."""
    rng = np.random.default_rng(5)
    seen = np.zeros(4, dtype=np.int64)
    for trial in range(6):
        rows, columns, lift = 6, 8, 2 + trial % 2
        base = rng.random((rows, columns)) < 0.4
        base[:2, :4] = True  # a few heavy columns among the light ones
        row_of, column = np.nonzero(base)
        row_ptr = np.zeros(rows + 1, dtype=np.int32)
        row_ptr[1:] = np.cumsum(base.sum(axis=1))
        column = column.astype(np.int32)
        shift = rng.integers(0, lift, column.size).astype(np.int32)
        light = base.sum(axis=0) <= 3
        check_ptr, check_var = ldpc_qc.expand(lift, row_ptr, column, shift)
        code = ldpc.Code(
            columns * lift,
            rows * lift,
            check_ptr,
            check_var,
            1,
            0.5,
            np.arange(columns * lift, dtype=np.int32),
            (lift, row_ptr, column, shift),
        )
        counted = ldpc.qc_six_cycles(code)
        brute = _six_cycles_by_light_variables(
            check_ptr, check_var, columns * lift, np.repeat(light, lift)
        )
        assert counted[0] == 0 and np.array_equal(counted[1:], brute[1:]), (trial, counted, brute)
        seen += counted
    assert np.all(seen[1:] > 0), seen  # every class occurs: the comparison tests something


def test_shifts_six_keep_lifted_six_cycles_off_the_light_columns():
    """Shifts "6" (greedy against lifted 4-cycles, staircase cycles, then 6-cycles among
    light columns; measured, not taken: docs/distillation.md "QC shifts against
    6-cycles") leave no 6-cycle of three light variables and about a third of those of
    two (122,816) left by the production shifts "1" (1,184 and 336,576 at 2 %, 2^16),
    with the same 4-cycles."""
    counts = {}
    for shifts in ("1", "6"):
        code = ldpc.construct_qc(N, RATE, shifts=shifts)
        counts[shifts] = (ldpc.qc_six_cycles(code), ldpc.qc_four_cycles(code).sum())
    (old, old_four), (new, new_four) = counts["1"], counts["6"]
    assert old[3] > 0 and new[3] == 0, counts
    assert new[2] < old[2] // 2, counts
    assert new_four == old_four, counts
