"""BrierLM estimators against closed-form values on toy distributions."""
import math

import numpy as np
import pytest

from calm_edge.evaluation.brierlm import BrierAccumulator, brier_from_probs, brier_from_samples, brierlm, paired_difference

# A toy model that predicts every token i.i.d. from p, scored on data drawn i.i.d. from q.
# Its Brier-n has a closed form: E[2 P(y_1..n)] - sum_x P(x_1..n)^2 = 2 (q.p)^n - (p.p)^n.
P = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
Q = np.array([0.4, 0.3, 0.1, 0.1, 0.1])


def _closed_form(n):
    return 2 * float(Q @ P) ** n - float(P @ P) ** n


def test_two_sample_estimator_matches_the_closed_form():
    rng = np.random.default_rng(0)
    positions = 60_000
    acc = BrierAccumulator()
    targets = rng.choice(len(Q), size=(positions, 4), p=Q)
    sample1 = rng.choice(len(P), size=(positions, 4), p=P)
    sample2 = rng.choice(len(P), size=(positions, 4), p=P)
    for y, s1, s2 in zip(targets, sample1, sample2):
        acc.add_samples(s1, s2, y)
    report = acc.report()
    for n in (1, 2, 3, 4):
        # Within 4 standard errors of the truth: fails for a biased estimator at this size.
        assert abs(report[f"brier_{n}"] - _closed_form(n)) < 4 * report[f"brier_{n}_stderr"], n
        assert report[f"brier_{n}_stderr"] < 0.01
    expected = 100 * math.prod(_closed_form(n) for n in (1, 2, 3, 4)) ** 0.25
    assert report["brierlm"] == pytest.approx(expected, rel=0.15)


def test_exact_score_from_probabilities():
    # Its mean over q-distributed targets is the same closed form, with no sampling noise.
    exact = sum(Q[y] * brier_from_probs(P, y) for y in range(len(Q)))
    assert exact == pytest.approx(_closed_form(1), abs=1e-12)
    assert brier_from_probs([0, 1, 0], 1) == 1.0  # certain and right
    assert brier_from_probs([0, 1, 0], 0) == -1.0  # certain and wrong


def test_single_estimates():
    assert brier_from_samples([1, 2], [1, 2], [1, 2]) == 1.0
    assert brier_from_samples([1, 2], [1, 3], [1, 2]) == 1.0
    assert brier_from_samples([1, 3], [1, 3], [1, 2]) == -1.0
    assert brier_from_samples(4, 5, 6) == 0.0


def test_brierlm_is_a_scaled_geometric_mean():
    assert brierlm({1: 0.5, 2: 0.5, 3: 0.5, 4: 0.5}) == pytest.approx(50.0)
    assert brierlm({1: 0.8, 2: 0.4, 3: 0.2, 4: 0.1}) == pytest.approx(100 * (0.8 * 0.4 * 0.2 * 0.1) ** 0.25)
    assert brierlm({1: 0.8, 2: 0.4, 3: 0.2, 4: -0.01}) == 0.0


def test_paired_difference_of_two_evaluations():
    """Common random numbers: positions drawn alike contribute 0, so the error comes only from
    where the draws differ."""
    target = [1, 2, 3, 4]
    hit, miss = [1, 2, 3, 4], [9, 9, 9, 9]
    reference = [(hit, miss, target)] * 10 + [(miss, miss, target)] * 10  # Brier-1: +1 on 10, -1 on 10
    same = list(reference)
    result = paired_difference(same, reference)
    assert result["identical_draws"] == 1.0 and result["positions"] == 20
    assert all(result[f"brier_{n}_difference"] == 0.0 and result[f"brier_{n}_difference_stderr"] == 0.0
               for n in (1, 2, 3, 4))
    # One position goes from a hit-and-miss (score 1) to two identical misses (score -1): -2 / 20.
    worse = [(miss, miss, target)] + reference[1:]
    result = paired_difference(worse, reference)
    assert result["identical_draws"] == pytest.approx(19 / 20)
    assert result["brier_1_difference"] == pytest.approx(-2 / 20)
    assert result["brier_1_difference_stderr"] == pytest.approx(np.std([-2] + [0] * 19, ddof=1) / math.sqrt(20))
    with pytest.raises(ValueError, match="different positions"):
        paired_difference([(hit, miss, [5, 5, 5, 5])] + reference[1:], reference)
    with pytest.raises(ValueError, match="20 positions against 19"):
        paired_difference(reference, reference[1:])
