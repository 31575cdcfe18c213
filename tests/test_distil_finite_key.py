"""Decoy-state finite-key bounds against cases with known answers."""

import math

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
    assert est.key_length(0) >= 0


def test_unknown_tail_is_bad_input():
    with pytest.raises(BadInput, match="unknown tail"):
        _key_rate(1e10, tail="gaussian")
