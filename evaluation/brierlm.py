"""BrierLM: a likelihood-free quality score that CALM and token-by-token models share.

The Brier score of a predictive distribution P for an outcome y is 2 P(y) - sum_x P(x)^2 (higher
is better; 1 for a certain, correct prediction). With only a sampler it is estimated without
bias from two independent samples x1, x2:

    1{x1 = y} + 1{x2 = y} - 1{x1 = x2}

whose expectation is P(y) + P(y) - sum_x P(x)^2. Brier-n scores n-token continuations (the
outcome is the next n tokens as a whole), and

    BrierLM = 100 * (Brier-1 * Brier-2 * Brier-3 * Brier-4) ** (1/4)

with each Brier-n averaged over the evaluated positions (CALM paper, section 4). A model whose
probabilities are at hand (the AR baseline at n = 1) may use the exact score instead of the
two-sample estimate; both have the same expectation.

numpy only: the runtime's evaluation through ONNX graphs uses this module too.
"""
import math

import numpy as np

ORDERS = (1, 2, 3, 4)


def brier_from_samples(sample1, sample2, target):
    """The two-sample estimate for one position: each argument a token sequence (or token)."""
    s1, s2, y = tuple(np.atleast_1d(sample1)), tuple(np.atleast_1d(sample2)), tuple(np.atleast_1d(target))
    return float(s1 == y) + float(s2 == y) - float(s1 == s2)


def brier_from_probs(probs, target):
    """The exact Brier score of a probability vector over the vocabulary for token `target`."""
    probs = np.asarray(probs, dtype=np.float64)
    return float(2.0 * probs[int(target)] - np.dot(probs, probs))


def brierlm(briers):
    """100 x the geometric mean of the mean Brier-n scores, {n: mean}.

    A mean Brier score of 0 or less (a model no better than chance at that length) makes the
    geometric mean 0.
    """
    values = [briers[n] for n in ORDERS]
    if min(values) <= 0:
        return 0.0
    return 100.0 * math.exp(sum(math.log(v) for v in values) / len(values))


class BrierAccumulator:
    """Collects per-position Brier-n estimates and reports their means and BrierLM."""

    def __init__(self):
        self.sums = {n: 0.0 for n in ORDERS}
        self.sums_of_squares = {n: 0.0 for n in ORDERS}
        self.counts = {n: 0 for n in ORDERS}

    def add(self, n, value):
        self.sums[n] += value
        self.sums_of_squares[n] += value * value
        self.counts[n] += 1

    def add_samples(self, sample1, sample2, target):
        """Score two sampled continuations against the true one, for every n they are long enough for."""
        for n in ORDERS:
            if len(sample1) >= n and len(sample2) >= n and len(target) >= n:
                self.add(n, brier_from_samples(sample1[:n], sample2[:n], target[:n]))

    def means(self):
        return {n: self.sums[n] / self.counts[n] if self.counts[n] else float("nan") for n in ORDERS}

    def standard_errors(self):
        """The sampling error of each mean (positions treated as independent)."""
        errors = {}
        for n in ORDERS:
            count = self.counts[n]
            if count < 2:
                errors[n] = float("nan")
                continue
            mean = self.sums[n] / count
            variance = max(self.sums_of_squares[n] / count - mean * mean, 0.0) * count / (count - 1)
            errors[n] = math.sqrt(variance / count)
        return errors

    def report(self):
        means = self.means()
        errors = self.standard_errors()
        return {
            **{f"brier_{n}": means[n] for n in ORDERS},
            **{f"brier_{n}_stderr": errors[n] for n in ORDERS},
            "positions": {str(n): self.counts[n] for n in ORDERS},
            "brierlm": brierlm(means) if all(self.counts.values()) else float("nan"),
        }


def paired_difference(draws, reference_draws):
    """Brier-n of `draws` minus Brier-n of `reference_draws`, position by position.

    Each argument is a list of (sample1, sample2, target) per position, as `evaluate_brierlm`
    records them. When two packages of one model are evaluated with the same seed and random
    streams (common random numbers), they draw the same continuation wherever their
    distributions are close, so the per-position differences are mostly 0 and their mean has a
    smaller error than the difference of the two means (which adds both means' errors).
    Returns, per n, the mean difference and its standard error, and the share of positions
    where both draws were identical.
    """
    if len(draws) != len(reference_draws):
        raise ValueError(f"{len(draws)} positions against {len(reference_draws)}: pair the same positions")
    for (_, _, target), (_, _, reference_target) in zip(draws, reference_draws):
        if list(target) != list(reference_target):
            raise ValueError("the two evaluations scored different positions; evaluate both on the same text and settings")
    result = {"positions": len(draws),
              "identical_draws": float(np.mean([tuple(map(tuple, d[:2])) == tuple(map(tuple, r[:2]))
                                                for d, r in zip(draws, reference_draws)])) if draws else float("nan")}
    for n in ORDERS:
        differences = np.array([brier_from_samples(s1[:n], s2[:n], y[:n]) - brier_from_samples(r1[:n], r2[:n], y[:n])
                                for (s1, s2, y), (r1, r2, _) in zip(draws, reference_draws)], dtype=np.float64)
        count = len(differences)
        result[f"brier_{n}_difference"] = float(differences.mean()) if count else float("nan")
        result[f"brier_{n}_difference_stderr"] = float(differences.std(ddof=1) / math.sqrt(count)) if count > 1 else float("nan")
    return result
