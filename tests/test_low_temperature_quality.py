"""benchmarks/low_temperature_quality.py: its vectorised batch rule is runtime.sampling's, and its figures behave.

Fast (a few seconds): small toys only, no model.
"""
import importlib.util
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

from calm_edge.runtime.sampling import batch_choice

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "low_temperature_quality.py"
spec = importlib.util.spec_from_file_location("low_temperature_quality", SCRIPT)
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)

SIX = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])  # tests/test_sampling.py's toy
TOLERANCE = study.TEST_TOLERANCE  # the frequency test's bar on total variation


@pytest.mark.parametrize("N, n", [(4, 2), (16, 2), (16, 3), (64, 3), (200, 2)])
def test_vectorised_rule_chooses_what_batch_choice_chooses(N, n):
    rng = np.random.default_rng(N * 10 + n)
    # repeats (six chunks), few repeats (40 labels: the fallbacks to n - 1 and to 1 run), and u = 0
    candidates = np.concatenate([rng.choice(6, size=(150, N), p=SIX), rng.integers(40, size=(150, N))])
    u = rng.random(len(candidates))
    u[:5] = 0.0
    chosen = study.batch_choice_vectorised(candidates, n, u)
    expected = [batch_choice(row.tolist(), n, float(x)) for row, x in zip(candidates, u)]
    assert chosen.tolist() == expected


def test_choice_probabilities_are_the_weights_of_batch_choice():
    candidates = np.array([[5, 7, 5, 9, 5, 7], [1, 2, 3, 4, 5, 6], [2, 2, 2, 2, 3, 3]])
    probabilities, largest = study.choice_probabilities(candidates, 2)
    # row 0: counts 5:3, 7:2, 9:1 -> C(3,2)=3 and C(2,2)=1 at first positions; row 1: all distinct, m = 1
    np.testing.assert_allclose(probabilities[0], [0.75, 0.25, 0, 0, 0, 0])
    np.testing.assert_allclose(probabilities[1], np.full(6, 1 / 6))
    np.testing.assert_allclose(probabilities[2], [6 / 7, 0, 0, 0, 1 / 7, 0])
    assert largest.tolist() == [3, 1, 4]


def test_total_variation_shrinks_with_candidates():
    target = study.tempered(SIX, 2)
    tv = [study.total_variation(study.exact_output(SIX, 2, N, 10**6)["q"], target) for N in (4, 8, 16, 32)]
    assert all(a > b for a, b in zip(tv, tv[1:])), tv
    assert tv[0] > 0.08 and tv[2] < TOLERANCE, tv  # N = 16 passes the frequency test's bar, N = 4 does not
    # Monte Carlo on a Zipf over 100 outcomes: the drop from N = 8 to N = 64 is far beyond its noise
    zipf = 1 / np.arange(1, 101)
    zipf /= zipf.sum()
    cdf = np.cumsum(zipf)
    rows = {}
    for N in (8, 64):
        sim = study.simulate_output(lambda g, shape: np.searchsorted(cdf, g.random(shape), side="right"), 100, 2, N,
                                    20000, np.random.default_rng(N))
        rows[N] = (study.total_variation(sim["halves"].mean(axis=0), study.tempered(zipf, 2)),
                   0.5 * study.total_variation(*sim["halves"]))
    assert rows[8][0] > 2 * rows[64][0] and rows[8][0] - rows[64][0] > 10 * (rows[8][1] + rows[64][1]), rows


def test_monte_carlo_agrees_with_enumeration():
    cdf = np.cumsum(SIX)
    sim = study.simulate_output(lambda g, shape: np.searchsorted(cdf, g.random(shape), side="right"), 6, 3, 8, 40000,
                                np.random.default_rng(1))
    exact = study.exact_output(SIX, 3, 8, 10**6)
    assert exact["total_probability"] == pytest.approx(1.0)
    assert study.total_variation(sim["halves"].mean(axis=0), exact["q"]) < 0.01
    # and the generating function's fallback share is the enumeration's
    counts_fallback = study.prob_no_chunk_reaches(SIX, 3, 8)[8]
    assert sim["below_n"] == pytest.approx(counts_fallback, abs=0.01)


def test_fallback_shares_by_generating_function():
    # P(no repeat among j draws) from p, against the birthday product for a uniform p
    p = np.full(30, 1 / 30)
    shares = study.prob_no_chunk_reaches(p, 2, 10)
    assert shares[10] == pytest.approx(np.prod(1 - np.arange(10) / 30))
    # The U-statistic from counts: every j-subset of the draws, checked by brute force
    draws = [0, 0, 0, 1, 1, 2, 3, 4, 5]
    counts = np.bincount(draws)
    for m in (2, 3):
        computed = study.u_statistic_no_chunk_reaches(counts, m, 5)
        for j in (2, 3, 5):
            subsets = list(combinations(draws, j))
            brute = sum(max(np.bincount(s)) < m for s in subsets) / len(subsets)
            assert computed[j] == pytest.approx(brute), (m, j)


def test_power_sum_estimate_is_the_unbiased_one():
    counts = np.array([3, 2, 1, 1, 1])  # D = 8
    assert study.power_sum_estimate(counts, 2) == pytest.approx((6 + 2) / (8 * 7))
    assert study.power_sum_estimate(counts, 3) == pytest.approx(6 / (8 * 7 * 6))
    assert study.exact_sampler_cost(0.25, 2)["expected_draws"] == pytest.approx(8.0)


def test_pooling_equal_probabilities_keeps_the_mean():
    p = np.array([0.1, 0.1, 0.3, 0.5])
    q = np.array([0.05, 0.15, 0.3, 0.5])
    np.testing.assert_allclose(study.pool_equal(q, p), [0.1, 0.1, 0.3, 0.5])
