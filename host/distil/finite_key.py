"""Decoy-state finite-key estimation: Lim et al. 2014 (two decoys) and Rusca et al. 2018
(one decoy), with Hoeffding or Chernoff tail bounds.

Letters follow this project: Z is the key basis, X the test basis (Lim et al. write them
the other way round). Counts come as `{intensity_name: (n_detections, m_errors)}` per basis.

Each tail bound turns an observed count x into an interval for its expectation, failing
with probability at most eps each:
- Hoeffding (Lim 2014, eq. 2): x +- sqrt(n_total/2 ln(1/eps)).
- Chernoff (multiplicative, independent Bernoulli trials), inverted for the mean:
  upper x + b + sqrt(2 b x + b^2), lower x + b/2 - sqrt(2 b x + b^2/4), b = ln(1/eps).
  Tighter than Hoeffding when x is small against n_total (the satellite regime).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from host.errors import BadInput

TAILS = ("hoeffding", "chernoff")
ANALYSES = ("lim2014", "rusca2018")


def binary_entropy(p: float) -> float:
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -p * math.log2(p) - (1 - p) * math.log2(1 - p)


def _bounds(x: float, total: float, eps: float, tail: str) -> tuple[float, float]:
    """(lower, upper) bound on the expectation of an observed count x."""
    if tail == "hoeffding":
        delta = math.sqrt(total / 2.0 * math.log(1.0 / eps))
        return max(x - delta, 0.0), x + delta
    if tail == "chernoff":
        b = math.log(1.0 / eps)
        upper = x + b + math.sqrt(2.0 * b * x + b * b)
        lower = x + b / 2.0 - math.sqrt(2.0 * b * x + b * b / 4.0)
        return max(lower, 0.0), upper
    raise BadInput(f"unknown tail bound {tail!r}; choose one of {', '.join(TAILS)}")


def _gamma(a: float, b: float, c: float, d: float) -> float:
    """Lim 2014 eq. (5): the random-sampling correction to the phase-error rate."""
    if b <= 0.0 or b >= 0.5 or c <= 0 or d <= 0:
        return 0.5
    inner = (c + d) / (c * d * (1 - b) * b) * (21.0**2) / (a * a)
    if inner <= 1.0:
        return 0.0
    return math.sqrt((c + d) * (1 - b) * b / (c * d * math.log(2)) * math.log2(inner))


@dataclass
class BasisEstimate:
    """Bounds for one key block (key basis `basis`, phase errors from `test_basis`)."""

    basis: str
    test_basis: str
    n: int  # detections in the key basis (all intensities)
    s0_lower: float  # vacuum events in the key basis
    s1_lower: float  # single-photon events in the key basis
    s1_test_lower: float  # single-photon events in the test basis
    v1_test_upper: float  # single-photon errors in the test basis
    phase_error_upper: float
    eps_sec: float
    eps_cor: float
    security_terms_bits: float  # 6 log2(c/eps_sec) + log2(2/eps_cor)

    def key_length(self, leak_ec_bits: float) -> int:
        """The final key length for this block once error correction leaked leak_ec_bits."""
        if self.s1_lower <= 0 or self.phase_error_upper >= 0.5:
            return 0
        length = (
            self.s0_lower
            + self.s1_lower * (1.0 - binary_entropy(self.phase_error_upper))
            - leak_ec_bits
            - self.security_terms_bits
        )
        return max(int(math.floor(length)), 0)

    def to_json(self) -> dict:
        return asdict(self)


PROBABILITY_SUM_TOLERANCE = 1e-6


def check_decoy_profile(intensities: dict, probabilities: dict, analysis: str) -> None:
    """The conditions the decoy-state bounds are derived under; violating them turns the
    'lower bound' on single photons into a number above the truth. Lim 2014: mu1 > mu2 +
    mu3 and mu2 > mu3 >= 0; Rusca 2018: mu1 > mu2 >= 0. Probabilities in (0, 1], summing
    to 1, one per intensity."""
    where = "pass.json intensities"
    if set(intensities) != set(probabilities):
        raise BadInput(f"{where} and intensity_probabilities name different intensities")
    for name, p in probabilities.items():
        if not 0 < float(p) <= 1:
            raise BadInput(f"pass.json intensity_probabilities.{name} = {p}: not in (0, 1]")
    total = sum(float(p) for p in probabilities.values())
    if abs(total - 1.0) > PROBABILITY_SUM_TOLERANCE:
        raise BadInput(f"pass.json intensity_probabilities sum to {total:.9g}, not 1")
    mu = sorted((float(v) for v in intensities.values()), reverse=True)
    if any(not math.isfinite(m) or m < 0 for m in mu):
        raise BadInput(f"{where}: every mean photon number must be finite and >= 0 ({mu})")
    if analysis == "lim2014":
        if len(mu) != 3:
            raise BadInput(f"lim2014 needs three intensities, the profile has {len(mu)}")
        if not (mu[0] > mu[1] + mu[2] and mu[1] > mu[2] >= 0):
            raise BadInput(f"{where} {mu}: lim2014 needs mu1 > mu2 + mu3 and mu2 > mu3 >= 0")
    elif analysis == "rusca2018":
        if len(mu) < 2:
            raise BadInput(f"rusca2018 needs two intensities, the profile has {len(mu)}")
        if not mu[0] > mu[1] >= 0:
            raise BadInput(f"{where} {mu}: rusca2018 needs mu1 > mu2 >= 0")


def _sorted_intensities(intensities: dict[str, float]) -> list[str]:
    return sorted(intensities, key=lambda name: -intensities[name])


def _tau(n: int, intensities, probabilities) -> float:
    return sum(
        probabilities[k] * math.exp(-mu) * mu**n / math.factorial(n)
        for k, mu in intensities.items()
    )


def estimate(
    counts: dict[str, dict[str, tuple[int, int]]],
    intensities: dict[str, float],
    probabilities: dict[str, float],
    key_basis: str,
    *,
    analysis: str = "lim2014",
    tail: str = "hoeffding",
    eps_sec: float = 1e-9,
    eps_cor: float = 1e-15,
) -> BasisEstimate:
    """Bounds for a key made from `key_basis`, phase errors estimated from the other basis.

    counts[basis][intensity] = (detections, errors). Probabilities are the intensity
    choice probabilities p_k (basis choice already reflected in the counts).
    """
    if analysis not in ANALYSES:
        raise BadInput(f"unknown analysis {analysis!r}; choose one of {', '.join(ANALYSES)}")
    test_basis = "X" if key_basis == "Z" else "Z"
    order = _sorted_intensities(intensities)
    check_decoy_profile(intensities, probabilities, analysis)
    c = 21.0 if analysis == "lim2014" else 19.0
    eps = eps_sec / c
    tau0 = _tau(0, intensities, probabilities)
    tau1 = _tau(1, intensities, probabilities)

    def scaled(basis: str, index: int) -> dict[str, tuple[float, float]]:
        """{k: (lower, upper)} of e^k/p_k * (count k) for detections (0) or errors (1)."""
        total = sum(v[index] for v in counts[basis].values())
        out = {}
        for k in order:
            x = counts[basis].get(k, (0, 0))[index]
            lo, hi = _bounds(x, total, eps, tail)
            f = math.exp(intensities[k]) / probabilities[k]
            out[k] = (f * lo, f * hi)
        return out

    def single_photon_events(basis: str) -> tuple[float, float]:
        nb = scaled(basis, 0)
        if analysis == "lim2014":
            m1, m2, m3 = (intensities[k] for k in order)
            k1, k2, k3 = order
            s0 = tau0 * (m2 * nb[k3][0] - m3 * nb[k2][1]) / (m2 - m3)
            s0 = max(s0, 0.0)
            s1 = (
                tau1
                * m1
                * (nb[k2][0] - nb[k3][1] - (m2**2 - m3**2) / m1**2 * (nb[k1][1] - s0 / tau0))
                / (m1 * (m2 - m3) - m2**2 + m3**2)
            )
            return s0, s1
        # Rusca 2018 eq. (2): one decoy; vacuum events make errors half the time, so they
        # number at most twice the decoy's vacuum errors, 2 (tau0 e^mu2/p_mu2 m+_mu2 +
        # delta(n_Z, eps)): the bound on the expected count turned into one on the actual
        # count by a further tail term over the basis' n_Z detections (Hoeffding, or the
        # Chernoff upper bound of the expected value under the Chernoff tail).
        m1, m2 = intensities[order[0]], intensities[order[1]]
        k1, k2 = order[0], order[1]
        mb = scaled(basis, 1)
        s0 = tau0 * (m1 * nb[k2][0] - m2 * nb[k1][1]) / (m1 - m2)
        s0 = max(s0, 0.0)
        n_basis = sum(v[0] for v in counts[basis].values())
        s0_upper = 2.0 * _bounds(tau0 * mb[k2][1], n_basis, eps, tail)[1]
        s1 = (
            tau1
            * m1
            / (m2 * (m1 - m2))
            * (nb[k2][0] - m2**2 / m1**2 * nb[k1][1] - (m1**2 - m2**2) / m1**2 * s0_upper / tau0)
        )
        return s0, s1

    s0_key, s1_key = single_photon_events(key_basis)
    _, s1_test = single_photon_events(test_basis)
    mt = scaled(test_basis, 1)
    if analysis == "lim2014":
        _, m2, m3 = (intensities[k] for k in order)
        v1 = tau1 * (mt[order[1]][1] - mt[order[2]][0]) / (m2 - m3)
    else:
        m1, m2 = intensities[order[0]], intensities[order[1]]
        v1 = tau1 * (mt[order[0]][1] - mt[order[1]][0]) / (m1 - m2)
    v1 = max(v1, 0.0)
    if s1_test > 0 and s1_key > 0:
        ratio = min(v1 / s1_test, 0.5)
        phi = min(ratio + _gamma(eps_sec, ratio, s1_key, s1_test), 0.5)
    else:
        phi = 0.5
    n_key = int(sum(v[0] for v in counts[key_basis].values()))
    return BasisEstimate(
        basis=key_basis,
        test_basis=test_basis,
        n=n_key,
        s0_lower=s0_key,
        s1_lower=max(s1_key, 0.0),
        s1_test_lower=max(s1_test, 0.0),
        v1_test_upper=v1,
        phase_error_upper=phi,
        eps_sec=eps_sec,
        eps_cor=eps_cor,
        security_terms_bits=6.0 * math.log2(c / eps_sec) + math.log2(2.0 / eps_cor),
    )


def expected_counts(
    pulses: float,
    transmittance: float,
    background_yield: float,
    misalignment: float,
    intensities: dict[str, float],
    probabilities: dict[str, float],
    basis_probability_z: float,
) -> dict[str, dict[str, tuple[float, float]]]:
    """Mean sifted counts of the standard decoy-state channel model (Lo-Ma-Chen 2005):
    yield Y_k = 1 - (1 - Y0) e^{-eta k}, errors e_k Y_k = Y0/2 + e_d (1 - e^{-eta k})."""
    out = {}
    for basis, pb in (("Z", basis_probability_z), ("X", 1 - basis_probability_z)):
        out[basis] = {}
        for k, mu in intensities.items():
            pulses_k = pulses * probabilities[k] * pb * pb
            yield_k = 1 - (1 - background_yield) * math.exp(-transmittance * mu)
            err_k = background_yield / 2 + misalignment * (1 - math.exp(-transmittance * mu))
            out[basis][k] = (pulses_k * yield_k, pulses_k * err_k)
    return out


def asymptotic_gllp_bits(
    pulses: float,
    transmittance: float,
    background_yield: float,
    misalignment: float,
    intensities: dict[str, float],
    probabilities: dict[str, float],
    basis_probability_z: float,
    leak_ec_bits: float,
) -> float:
    """GLLP key from the Z block with the exact single-photon yield and error rate:
    N_Z [tau0 Y0 + tau1 Y1 (1 - h(e1))] - leak_EC, N_Z = pulses p_Z^2."""
    y1 = background_yield + transmittance - background_yield * transmittance
    e1 = (background_yield / 2 + misalignment * transmittance) / y1
    tau0 = _tau(0, intensities, probabilities)
    tau1 = _tau(1, intensities, probabilities)
    n_z = pulses * basis_probability_z**2
    return n_z * (tau0 * background_yield + tau1 * y1 * (1 - binary_entropy(e1))) - leak_ec_bits
