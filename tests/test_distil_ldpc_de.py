"""Exact discretised density evolution (host/distil/ldpc_de.py): what the LDPC degree
distributions' asymptotic thresholds are judged and re-optimised by (docs/distillation.md,
"Exact density evolution")."""

from host.distil import ldpc, ldpc_de, ldpc_design


def test_discretised_density_evolution_finds_the_known_bsc_threshold_of_the_regular_3_6_code():
    """BP on the regular (3, 6) code decodes the BSC up to crossover 0.0840 (Richardson and
    Urbanke, Modern Coding Theory, table 4.24): the discretised density evolution converges
    just below it and not just above (its own threshold on the default grid is 0.08405;
    0.08395 and 0.08408 with half and twice the step). Deterministic: no sampling."""
    regular = ({3: 1.0}, {6: 1.0})
    assert ldpc_de.run(0.0835, *regular)[0]
    assert not ldpc_de.run(0.0846, *regular)[0]


def test_the_exact_density_evolution_designs_decode_a_noisier_channel_than_the_approximate_ones():
    """The table's entries re-optimised on exact density evolution
    (ldpc_design.EXACT_DESIGNS) converge, by exact density evolution, at a crossover where
    the semi-Gaussian design they started from (same rate and check degree) does not: the
    approximate design was optimistic there and the LP gained threshold."""
    for rate, q_between in ldpc_design.EXACT_DESIGNS.items():
        nodes = ldpc.DISTRIBUTIONS[rate]
        dc = round(2 * sum(d * f for d, f in nodes.items()) / (1 - rate)) / 2  # LP kept it
        _, _, approximate = ldpc_design.design_at(rate, dc)
        lam, rho = ldpc_de.edge_perspective(ldpc.DISTRIBUTIONS[rate], rate)
        assert ldpc_de.run(q_between, lam, rho, step=ldpc_design.EXACT_STEP)[0], rate
        lam, rho = ldpc_de.edge_perspective(approximate, rate)
        assert not ldpc_de.run(q_between, lam, rho, step=ldpc_design.EXACT_STEP)[0], rate
