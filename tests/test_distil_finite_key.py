"""Decoy-state finite-key bounds against cases with known answers."""

import math

import finite_key_reference as reference
import pytest

from host.distil import finite_key as fk
from host.errors import BadInput

MICIUS_I = {"mu": 0.8, "nu": 0.1, "vac": 0.0}
MICIUS_P = {"mu": 0.5, "nu": 0.25, "vac": 0.25}
CHANNEL = dict(transmittance=1e-3, background_yield=1e-6, misalignment=0.01)


def _key_rate(pulses, tail="hoeffding", analysis="lim2014", intens=MICIUS_I, probs=MICIUS_P):
    counts = fk.expected_counts(
        pulses, **CHANNEL, intensities=intens, probabilities=probs, basis_probability_z=0.5
    )
    n = sum(v[0] for v in counts["Z"].values())
    e = sum(v[1] for v in counts["Z"].values())
    leak = 1.1 * n * fk.binary_entropy(e / n)
    est = fk.estimate(counts, intens, probs, "Z", analysis=analysis, tail=tail)
    gllp = fk.asymptotic_gllp_bits(
        pulses,
        **CHANNEL,
        intensities=intens,
        probabilities=probs,
        basis_probability_z=0.5,
        leak_ec_bits=leak,
    )
    return est.key_length(leak) / pulses, gllp / pulses, est


def test_finite_rate_grows_with_block_size_towards_the_asymptotic_decoy_rate():
    rates = [_key_rate(n)[0] for n in (1e10, 1e11, 1e12, 1e14, 1e17)]
    assert all(b > a for a, b in zip(rates, rates[1:], strict=False))
    # the gap between consecutive sizes shrinks like 1/sqrt(N)
    assert rates[-1] - rates[-2] < 0.05 * (rates[1] - rates[0])


def test_weak_decoy_limit_reaches_gllp_with_exact_single_photon_yield():
    """With a vanishing decoy the decoy bounds become exact, so at a huge block the
    finite-key rate must equal GLLP computed from the true Y1 and e1."""
    intens = {"mu": 0.5, "nu": 0.001, "vac": 0.0}
    probs = {"mu": 0.8, "nu": 0.1, "vac": 0.1}
    rate, gllp, est = _key_rate(1e22, intens=intens, probs=probs)
    assert rate == pytest.approx(gllp, rel=0.02)
    y1 = 1e-6 + 1e-3 - 1e-9
    e1 = (0.5e-6 + 0.01 * 1e-3) / y1
    assert est.phase_error_upper == pytest.approx(e1, rel=0.02)


def test_micius_two_decoy_bound_stays_below_gllp():
    rate, gllp, _ = _key_rate(1e17)
    assert 0.85 * gllp < rate < gllp


def test_chernoff_is_tighter_than_hoeffding_for_satellite_sized_blocks():
    hoeffding = _key_rate(3e10, tail="hoeffding")[0]
    chernoff = _key_rate(3e10, tail="chernoff")[0]
    assert chernoff > hoeffding > 0


def test_rusca_one_decoy_gives_a_key_and_needs_two_intensities():
    intens = {"mu": 0.5, "nu": 0.1}
    probs = {"mu": 0.7, "nu": 0.3}
    rate, gllp, est = _key_rate(1e12, analysis="rusca2018", intens=intens, probs=probs)
    assert 0 < rate < gllp
    assert est.security_terms_bits == pytest.approx(
        6 * math.log2(19 / 1e-9) + math.log2(2 / 1e-15)
    )
    with pytest.raises(BadInput, match="lim2014 needs three"):
        fk.estimate({"Z": {}, "X": {}}, intens, probs, "Z", analysis="lim2014")


def test_too_few_events_give_zero_key_not_negative():
    rate, _, est = _key_rate(1e7)
    assert rate == 0.0
    # the bound itself is negative here: the length is clamped to 0, not wrapped or signed
    length = est.s0_lower + est.s1_lower * (1 - fk.binary_entropy(est.phase_error_upper))
    assert length - est.security_terms_bits < 0
    assert est.key_length(0) == 0


def test_unknown_tail_is_bad_input():
    with pytest.raises(BadInput, match="unknown tail"):
        _key_rate(1e10, tail="gaussian")


RUSCA_I = {"mu": 0.5, "nu": 0.1}
RUSCA_P = {"mu": 0.7, "nu": 0.3}


@pytest.mark.parametrize("analysis", ["lim2014", "rusca2018"])
@pytest.mark.parametrize("tail", ["hoeffding", "chernoff"])
@pytest.mark.parametrize("pulses", [3e9, 3e10, 1e12])
def test_key_length_matches_an_independent_implementation_of_the_papers(analysis, tail, pulses):
    """Known answers from tests/finite_key_reference.py (written from Lim 2014 and Rusca 2018,
    Chernoff ends found by bisection on the tails, not by the closed forms). On main the
    Rusca bound lacked eq. (2)'s delta(n_Z, eps) term and gave longer keys."""
    intens, probs = (MICIUS_I, MICIUS_P) if analysis == "lim2014" else (RUSCA_I, RUSCA_P)
    counts = fk.expected_counts(
        pulses, **CHANNEL, intensities=intens, probabilities=probs, basis_probability_z=0.5
    )
    counts = {b: {k: (round(n), round(m)) for k, (n, m) in c.items()} for b, c in counts.items()}
    n = sum(v[0] for v in counts["Z"].values())
    e = sum(v[1] for v in counts["Z"].values())
    leak = math.ceil(1.1 * n * fk.binary_entropy(e / n))
    est = fk.estimate(counts, intens, probs, "Z", analysis=analysis, tail=tail)
    ref = reference.key_length(
        counts["Z"],
        counts["X"],
        intens,
        probs,
        analysis=analysis,
        tail=tail,
        eps_sec=1e-9,
        eps_cor=1e-15,
        leak=leak,
    )
    assert est.s0_lower == pytest.approx(ref["s0"], rel=1e-9, abs=1e-6)
    assert est.s1_lower == pytest.approx(max(ref["s1"], 0.0), rel=1e-9, abs=1e-6)
    assert est.v1_test_upper == pytest.approx(ref["v1"], rel=1e-9, abs=1e-6)
    assert est.phase_error_upper == pytest.approx(ref["phi"], rel=1e-9)
    assert abs(est.key_length(leak) - ref["length"]) <= 1  # floor of equal reals
    if pulses >= 3e10:
        assert ref["length"] > 0  # the comparison covers a real key, not two zeros


def test_rusca_vacuum_bound_carries_the_tail_term_on_n_z():
    """The s0 upper bound of Rusca eq. (2) adds 2 delta(n_Z, eps): with no decoy errors at
    all, s1 still cannot exceed the bound from the detections minus that vacuum term."""
    counts = {
        "Z": {"mu": (100_000, 1_000), "nu": (10_000, 0)},
        "X": {"mu": (100_000, 1_000), "nu": (10_000, 100)},
    }
    est = fk.estimate(counts, RUSCA_I, RUSCA_P, "Z", analysis="rusca2018")
    eps = 1e-9 / 19
    delta_nz = math.sqrt(110_000 / 2 * math.log(1 / eps))
    t0, t1 = (fk._tau(i, RUSCA_I, RUSCA_P) for i in (0, 1))
    m_plus = math.exp(0.1) / 0.3 * (0 + math.sqrt(1_000 / 2 * math.log(1 / eps)))
    s0_u = 2 * (t0 * m_plus + delta_nz)
    n_nu = math.exp(0.1) / 0.3 * (10_000 - math.sqrt(110_000 / 2 * math.log(1 / eps)))
    n_mu = math.exp(0.5) / 0.7 * (100_000 + math.sqrt(110_000 / 2 * math.log(1 / eps)))
    s1 = t1 * 0.5 / (0.1 * 0.4) * (n_nu - 0.01 / 0.25 * n_mu - 0.24 / 0.25 * s0_u / t0)
    assert est.s1_lower == pytest.approx(s1, rel=1e-12)
