"""How close the batch approximation gets to p^(1/T) for each number of candidates N, and what the exact sampler costs.

    python benchmarks/low_temperature_quality.py [--package models/calm-small-int4] [--draws 20000]
        [--documents 6] [--sets 100000] [--out benchmarks/results/low_temperature_quality_small.json]

CALM samples at T = 1/n with only a black-box sampler (runtime/sampling.py). The exact rejection
sampler is unbiased and costs n / sum_x p(x)^n draws per step; the batch approximation draws N
candidates and chooses among the chunks seen >= n times with weight C(count, n), falling back to
n - 1, ... 1. This script measures, for N in 4, 8, 16, 32, 64, 200, at T = 1/2 and T = 1/3:

1. Toy distributions (the six chunks of tests/test_sampling.py, three chunks, a Zipf over 1,000
   outcomes, a peaked one and a flat, model-like one over 20,000): the output distribution q_N of
   the batch approximation, exactly (every count vector enumerated, with its multinomial
   probability) where that is at most --enumerate-limit vectors, otherwise by Monte Carlo over
   --sets candidate sets. The Monte Carlo adds each set's choice probabilities (C(c, m) / the sum)
   rather than one sampled choice, and runs in two halves whose difference gives its noise floor
   (about half the total variation between the halves); outcomes of equal probability are pooled
   (the rule treats them alike, so their true q is equal), which leaves the estimate unbiased and
   removes most of its noise on the peaked and flat toys. Reported: the total variation (TV) of
   q_N from p^n normalised, the fraction of steps that find no chunk n times (fall back) and no
   chunk twice (plain T = 1 sampling; both exact, from the multinomial's exponential generating
   function), TV(p, p^n) (what not tempering at all would cost), and the exact sampler's
   acceptance per round (sum p^n), expected draws per step (n / sum p^n), and the draws and cap
   probability with the runtime's 100-round cap. The vectorised batch rule used here is checked against
   `runtime.sampling.batch_choice` on a few thousand sets, chosen index for chosen index.
2. The `small` model's chunk distribution (the committed int4 package): for --documents contexts
   (the first --context-tokens tokens of WikiText-103 test documents; only their indices are
   recorded), --draws chunks each (energy head + decoder on uniform noise). Reported: distinct
   chunks, singletons, the largest count; sum p^2 and sum p^3 estimated without bias from the
   counts (sum c(c-1) / (D(D-1)), ...), with an upper bound when no chunk repeats; the fraction
   of steps with no chunk twice (or thrice) among N candidates, as an unbiased U-statistic (every
   N-subset of the D draws, counted exactly with a generating function); and, by simulation that
   resamples candidates from the empirical p-hat, TV(q_N, p-hat^n). That last figure is about
   p-hat, not the model: p-hat puts at least 1/D on every chunk seen, so with a flat p it is as
   much a property of D as of the model. Each figure is also given for each half of the draws
   (how much it moves with D), and TV(p-hat of half 1, p-hat of half 2), the floor of any TV
   measured from samples of D / 2 draws (near 1 when chunks rarely repeat).
3. Cost: milliseconds of one energy-head + decoder call for N rows at batch 1, and the measured
   decode step (Generator, batch 1) at T = 1, at T = 1/2 with each N, and with the exact sampler
   (which runs to its 200-draw cap on this model), each the fastest of --rounds interleaved
   rounds; with them, each context's uncapped exact sampler in milliseconds per step (expected
   draws x milliseconds per draw in calls of 4 rounds).

The "recommendation" section applies a stated rule to these figures, and "summary_by_N" gathers
one row per N. Runtime: about 3-4 minutes on this shared 2-core machine (the toys a little over
a minute, the model's 120,000 draws about 90 s, the timing about 40 s); --package none runs the
toys alone.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time
from itertools import chain, combinations
from math import comb
from pathlib import Path

import numpy as np

from calm_edge.runtime.sampling import TemperatureSampler, batch_choice

REPO = Path(__file__).resolve().parents[1]
N_VALUES = (4, 8, 16, 32, 64, 200)
EXPONENTS = (2, 3)  # T = 1/2 and T = 1/3
EXACT_MAX_ROUNDS = TemperatureSampler().max_rounds  # the runtime's cap on rejection rounds (100)
TEST_TOLERANCE = 0.05  # the TV that tests/test_sampling.py's frequency test allows


# --- the batch rule, vectorised over candidate sets --------------------------------------------

def _comb_table(largest_count, n):
    """table[c, m] = C(c, m) for c <= largest_count, m <= n (int64)."""
    return np.array([[comb(c, m) for m in range(n + 1)] for c in range(largest_count + 1)], dtype=np.int64)


def batch_weights(candidates, n):
    """The batch approximation's integer weights for each set of candidates (rows of `candidates`).

    Returns (weights [R, N], largest count [R]): a candidate's weight is C(count, m), m = min(n,
    the row's largest count), at the first position where its chunk appears and 0 elsewhere, as
    `batch_choice` weighs the distinct chunks in order of first appearance.
    """
    candidates = np.asarray(candidates)
    rows, N = candidates.shape
    order = np.argsort(candidates, axis=1, kind="stable")  # equal chunks: first appearance first
    ordered = np.take_along_axis(candidates, order, axis=1)
    starts = np.ones((rows, N), dtype=bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    runs = np.cumsum(starts.ravel()) - 1  # every row starts a run, so runs never cross rows
    counts = np.bincount(runs)[runs].reshape(rows, N)
    largest = counts.max(axis=1)
    m = np.minimum(n, largest)
    ordered_weights = np.where(starts, _comb_table(N, n)[counts, m[:, None]], 0)
    weights = np.empty_like(ordered_weights)
    np.put_along_axis(weights, order, ordered_weights, axis=1)
    return weights, largest


def batch_choice_vectorised(candidates, n, u):
    """`batch_choice` for every row of `candidates` [R, N] with its uniform u[R]: the chosen indices [R]."""
    weights, _ = batch_weights(candidates, n)
    running = np.cumsum(weights, axis=1)
    target = np.asarray(u, np.float64) * running[:, -1]
    beyond = running > target[:, None]
    chosen = np.argmax(beyond, axis=1)
    # batch_choice's last resort (rounding): the last weighted chunk
    last = weights.shape[1] - 1 - np.argmax(weights[:, ::-1] > 0, axis=1)
    return np.where(beyond.any(axis=1), chosen, last)


def choice_probabilities(candidates, n):
    """(probability [R, N] of choosing each candidate's chunk, at its first position; largest count [R])."""
    weights, largest = batch_weights(candidates, n)
    return weights / weights.sum(axis=1, keepdims=True), largest


def check_against_batch_choice(sets, seed):
    """Chosen index for chosen index, the vectorised rule against runtime.sampling.batch_choice.

    Candidates come from the six toy chunks (many repeats) and from 50 equally likely labels (few
    repeats, so the fallbacks run), for several N and both exponents.
    """
    rng = np.random.default_rng(seed)
    six = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    checked, mismatches = 0, 0
    for N in (4, 16, 64, 200):
        for n in EXPONENTS:
            half = sets // 2
            candidates = np.concatenate([rng.choice(6, size=(half, N), p=six), rng.integers(50, size=(sets - half, N))])
            u = rng.random(sets)
            u[:8] = 0.0  # the edge of the first weight
            chosen = batch_choice_vectorised(candidates, n, u)
            for row, value, index in zip(candidates, u, chosen):
                checked += 1
                mismatches += batch_choice(row.tolist(), n, float(value)) != int(index)
    if mismatches:
        raise RuntimeError(f"the vectorised batch rule chose differently from batch_choice in {mismatches} of "
                           f"{checked} sets")
    return {"sets_checked": checked, "mismatches": mismatches, "N": [4, 16, 64, 200], "n": list(EXPONENTS)}


# --- distributions and distances -----------------------------------------------------------------

def tempered(p, n):
    q = np.asarray(p, np.float64) ** n
    return q / q.sum()


def total_variation(a, b):
    return 0.5 * float(np.abs(np.asarray(a) - np.asarray(b)).sum())


def pool_equal(q, p):
    """q averaged over the outcomes of equal p: the batch rule treats them alike, so their true q is equal too.

    An unbiased Monte Carlo estimate stays unbiased and loses most of its noise where many
    outcomes share a probability (the peaked and flat toys; chunks of equal count in p-hat).
    """
    _, group = np.unique(p, return_inverse=True)
    group = group.ravel()
    sums = np.bincount(group, weights=q)
    return (sums / np.bincount(group))[group]


def toy_distributions():
    """name -> (probabilities, what it is)."""
    zipf = 1.0 / np.arange(1, 1001)
    peaked = np.concatenate([[0.5], np.full(999, 0.5 / 999)])
    flat = np.exp(np.round(2 * np.random.default_rng(7).normal(0.0, 1.0, 20000)) / 2)
    return {
        "six chunks": (np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]), "tests/test_sampling.py's toy model"),
        "three chunks": (np.array([0.5, 0.3, 0.2]), "benchmarks/low_temperature.py's second toy"),
        "zipf-1000": (zipf / zipf.sum(), "Zipf, p(i) proportional to 1/i, over 1,000 outcomes"),
        "peaked-1000": (peaked, "one outcome of probability 0.5, 999 sharing the rest equally"),
        "flat-20000": (flat / flat.sum(), "log-normal weights (sigma 1, seed 7, the log rounded to steps of 0.5) "
                                          "over 20,000 outcomes: model-like, candidates rarely repeat"),
    }


# --- the batch approximation's output distribution -----------------------------------------------

def exact_output(p, n, N, limit):
    """q_N by enumerating every count vector of N draws (None when there are more than `limit`)."""
    k = len(p)
    vectors = comb(N + k - 1, k - 1)
    if vectors > limit:
        return None
    bars = np.fromiter(chain.from_iterable(combinations(range(N + k - 1), k - 1)), dtype=np.int64,
                       count=vectors * (k - 1)).reshape(vectors, k - 1)
    edges = np.concatenate([np.full((vectors, 1), -1), bars, np.full((vectors, 1), N + k - 1)], axis=1)
    counts = np.diff(edges, axis=1) - 1
    log_factorial = np.array([math.lgamma(c + 1) for c in range(N + 1)])
    pmf = np.exp(log_factorial[N] - log_factorial[counts].sum(axis=1) + counts @ np.log(p))
    largest = counts.max(axis=1)
    weights = _comb_table(N, n)[counts, np.minimum(n, largest)[:, None]].astype(np.float64)
    q = (pmf[:, None] * weights / weights.sum(axis=1, keepdims=True)).sum(axis=0)
    return {"q": q, "total_probability": float(pmf.sum()), "vectors": vectors}


def simulate_output(draw, k, n, N, sets, rng, block_elements=2_000_000):
    """q_N by Monte Carlo: `sets` candidate sets from `draw(rng, shape) -> labels in [0, k)`, in two halves.

    Each set adds its choice probabilities (not one sampled choice: the same mean, less noise).
    Returns the two halves' estimates and the fractions of sets without a chunk seen n times and
    without any repeat.
    """
    halves = np.zeros((2, k))
    below_n = no_repeat = 0
    rows = max(1, block_elements // N)
    for h in range(2):
        done = 0
        while done < sets // 2:
            r = min(rows, sets // 2 - done)
            candidates = draw(rng, (r, N))
            probabilities, largest = choice_probabilities(candidates, n)
            halves[h] += np.bincount(candidates.ravel(), weights=probabilities.ravel(), minlength=k)
            below_n += int((largest < n).sum())
            no_repeat += int((largest < 2).sum())
            done += r
    halves /= sets // 2
    total = 2 * (sets // 2)
    return {"halves": halves, "below_n": below_n / total, "no_repeat": no_repeat / total, "sets": total}


# --- how often no chunk reaches m copies among N candidates: exact, by generating functions -------

def _binomial_columns(N, degree):
    j = np.arange(N + 1)
    return [np.array([comb(int(x), d) for x in j], np.float64) for d in range(degree + 1)]


def _multiply(a, factor, binomials):
    """Binomial convolution of scaled coefficients a with one low-degree factor: c_j = sum_d C(j, d) f_d a_{j-d}."""
    c = a * factor[0]
    for d in range(1, len(factor)):
        c[d:] += binomials[d][d:] * factor[d] * a[:-d]
    return c


def prob_no_chunk_reaches(p, m, N):
    """P(no outcome drawn m or more times among j i.i.d. draws from p), for j = 0..N.

    j! [x^j] prod_i sum_{l<m} (p_i x)^l / l!: b_j = j! [x^j] multiply by binomial convolution.
    """
    binomials = _binomial_columns(N, m - 1)
    b = np.zeros(N + 1)
    b[0] = 1.0
    for value in np.asarray(p, np.float64):
        b = _multiply(b, value ** np.arange(m), binomials)
    return b


def u_statistic_no_chunk_reaches(counts, m, N):
    """The same probability estimated without bias from D draws with these chunk counts, for j = 0..N.

    The share of the C(D, j) j-subsets of the draws in which no chunk appears m times:
    [x^j] prod_chunks sum_{l<m} C(c, l) x^l / C(D, j), computed as b_j = j! [x^j] / D^j (every
    term positive, no overflow), divided by D(D-1)...(D-j+1) / D^j at the end.
    """
    counts = np.asarray(counts)
    D = int(counts.sum())
    binomials = _binomial_columns(N, m - 1)
    b = np.zeros(N + 1)
    b[0] = 1.0
    values, multiplicities = np.unique(counts, return_counts=True)
    for value, multiplicity in zip(values.tolist(), multiplicities.tolist()):
        factor = np.array([math.perm(value, l) / D ** l for l in range(m)])
        for _ in range(multiplicity):
            b = _multiply(b, factor, binomials)
    falling = np.cumprod(np.concatenate([[1.0], 1.0 - np.arange(N) / D]))
    return b / falling


# --- the exact sampler ---------------------------------------------------------------------------

def exact_sampler_cost(power_sum, n, max_rounds=EXACT_MAX_ROUNDS):
    """Acceptance per round (sum p^n), expected draws per step uncapped and with the runtime's cap."""
    if power_sum <= 0:
        return {"acceptance_per_round": 0.0, "expected_draws": None, "draws_with_cap": n * max_rounds,
                "cap_probability": 1.0}
    miss = (1.0 - power_sum) ** max_rounds
    return {"acceptance_per_round": power_sum, "expected_draws": n / power_sum,
            "draws_with_cap": n * (1.0 - miss) / power_sum, "cap_probability": miss}


# --- part 1: toys ---------------------------------------------------------------------------------

def toy_study(sets, enumerate_limit, seed, log):
    rows = []
    rng = np.random.default_rng(seed)
    for name, (p, _) in toy_distributions().items():
        cdf = np.cumsum(p)
        cdf[-1] = 1.0

        def draw(generator, shape, cdf=cdf):
            return np.searchsorted(cdf, generator.random(shape), side="right")

        for n in EXPONENTS:
            target = tempered(p, n)
            untempered_tv = total_variation(p, target)
            cost = exact_sampler_cost(float((p ** n).sum()), n)
            no_n = prob_no_chunk_reaches(p, n, max(N_VALUES))
            no_two = prob_no_chunk_reaches(p, 2, max(N_VALUES))
            for N in N_VALUES:
                started = time.perf_counter()
                exact = exact_output(p, n, N, enumerate_limit)
                row = {"distribution": name, "temperature": f"1/{n}", "N": N}
                if exact is not None:
                    row.update(method="exact enumeration", tv=total_variation(exact["q"], target),
                               count_vectors=exact["vectors"])
                else:
                    sim = simulate_output(draw, len(p), n, N, sets, rng)
                    halves = [pool_equal(h, p) for h in sim["halves"]]
                    q = 0.5 * (halves[0] + halves[1])
                    row.update(method=f"Monte Carlo, {sim['sets']} sets", tv=total_variation(q, target),
                               monte_carlo_noise=0.5 * total_variation(*halves),
                               monte_carlo_fallback=sim["below_n"])
                row.update(fallback_share=float(no_n[N]), plain_t1_share=float(no_two[N]),
                           tv_without_tempering=untempered_tv,
                           fallback_times_untempered_tv=float(no_n[N]) * untempered_tv)
                rows.append(row)
                log(f"  {name:13s} T=1/{n} N={N:3d}: TV {row['tv']:.4f}"
                    + (f" (MC noise {row['monte_carlo_noise']:.4f})" if "monte_carlo_noise" in row else " (exact)")
                    + f"  falls back {row['fallback_share']:.3f}  T=1 {row['plain_t1_share']:.3f}"
                    f"  [{time.perf_counter() - started:.1f} s]")
            rows.append({"distribution": name, "temperature": f"1/{n}", "exact_sampler": cost,
                         "tv_without_tempering": untempered_tv})
    return rows


def monte_carlo_check(sets, seed):
    """Monte Carlo against enumeration on one case where both run: how far apart, against the noise floor."""
    p = toy_distributions()["six chunks"][0]
    cdf = np.cumsum(p)
    cdf[-1] = 1.0
    sim = simulate_output(lambda g, shape: np.searchsorted(cdf, g.random(shape), side="right"), len(p), 2, 16, sets,
                          np.random.default_rng(seed))
    exact = exact_output(p, 2, 16, 10**7)
    return {"distribution": "six chunks", "temperature": "1/2", "N": 16, "sets": sim["sets"],
            "tv_exact": total_variation(exact["q"], tempered(p, 2)),
            "tv_monte_carlo": total_variation(sim["halves"].mean(axis=0), tempered(p, 2)),
            "tv_between_monte_carlo_and_exact": total_variation(sim["halves"].mean(axis=0), exact["q"]),
            "monte_carlo_noise": 0.5 * total_variation(*sim["halves"]),
            "fallback_monte_carlo": sim["below_n"],
            "fallback_generating_function": float(prob_no_chunk_reaches(p, 2, 16)[16])}


# --- part 2: the model ----------------------------------------------------------------------------

def load_contexts(model, text, documents, context_tokens):
    """(document index, token ids) of the first `documents` documents with at least `context_tokens` tokens."""
    length = context_tokens - context_tokens % model.chunk_size
    contexts = []
    with open(text, encoding="utf-8") as f:
        for index, line in enumerate(f):
            if not line.strip():
                continue
            ids = model.tokenizer.encode(json.loads(line)["text"])
            if len(ids) >= length:
                contexts.append((index, ids[:length]))
            if len(contexts) == documents:
                break
    return contexts


def draw_chunks(model, hidden, draws, rows, rng):
    """`draws` chunks [D, K] for one context's hidden state: energy head then decoder, `rows` at a time."""
    out = []
    for start in range(0, draws, rows):
        count = min(rows, draws - start)
        noise = rng.random((1, count, model.noise_size), dtype=np.float32)
        out.append(model.decode(model.sample_latents(hidden[None], noise)[0]))
    return np.concatenate(out)


def power_sum_estimate(counts, n):
    """sum_x p(x)^n without bias: sum_x c(c-1)...(c-n+1) / (D(D-1)...(D-n+1))."""
    D = int(counts.sum())
    return float(sum(math.perm(int(c), n) for c in counts if c >= n) / math.perm(D, n))


def chunk_statistics(labels, n_values, sets, rng, bound_events=3.0):
    """What the draws of one context say: counts, sum p^n, fallback shares, the resampled p-hat study."""
    _, counts = np.unique(labels, return_counts=True)
    D = len(labels)
    out = {"draws": D, "distinct": len(counts), "singletons": int((counts == 1).sum()),
           "largest_count": int(counts.max()), "repeated_pairs": int(sum(comb(int(c), 2) for c in counts))}
    for n in EXPONENTS:
        estimate = power_sum_estimate(counts, n)
        entry = {"estimate": estimate}
        if estimate == 0:
            # no chunk seen n times: C(D, n) * sum p^n n-tuples of equal draws are expected, and seeing
            # none puts that below about 3 (95 %, Poisson)
            entry["upper_95"] = bound_events / comb(D, n)
        out[f"sum_p{n}"] = entry
        cost = exact_sampler_cost(estimate, n)
        if estimate == 0:
            cost["expected_draws_at_least"] = n / entry["upper_95"]
        out[f"exact_sampler_T1/{n}"] = cost
    N_max = max(n_values)
    shares = {m: u_statistic_no_chunk_reaches(counts, m, N_max) for m in (2, 3)}
    out["plain_t1_share"] = {str(N): float(shares[2][N]) for N in n_values}  # no chunk twice
    out["no_chunk_thrice_share"] = {str(N): float(shares[3][N]) for N in n_values}
    # The plug-in simulation: the batch approximation if the model's distribution were p-hat.
    index_of = np.unique(labels, return_inverse=True)[1].ravel()
    plug_in = {}
    for n in EXPONENTS:
        p_hat = counts / D
        target = tempered(p_hat, n)
        rows = {}
        for N in n_values:
            sim = simulate_output(lambda g, shape: index_of[g.integers(D, size=shape)], len(counts), n, N, sets, rng)
            halves = [pool_equal(h, counts) for h in sim["halves"]]
            rows[str(N)] = {"tv": total_variation(0.5 * (halves[0] + halves[1]), target),
                            "monte_carlo_noise": 0.5 * total_variation(*halves),
                            "fallback_share": sim["below_n"]}
        plug_in[f"1/{n}"] = {"tv_without_tempering": total_variation(p_hat, target), "by_N": rows}
    out["plug_in_p_hat"] = plug_in
    return out


def halves_statistics(labels, n_values, sets, rng):
    """The estimates again from each half of the draws: how much they move with D."""
    D = len(labels) // 2
    first, second = labels[:D], labels[D:2 * D]
    halves = [chunk_statistics(h, n_values, sets, rng) for h in (first, second)]
    joint = np.unique(np.concatenate([first, second]), return_inverse=True)[1].ravel()
    k = joint.max() + 1
    p_first = np.bincount(joint[:D], minlength=k) / D
    p_second = np.bincount(joint[D:], minlength=k) / D
    keep = ("draws", "distinct", "singletons", "largest_count", "sum_p2", "sum_p3", "plain_t1_share")
    summary = [{key: h[key] for key in keep}
               | {"plug_in_tv_T1/2": {N: v["tv"] for N, v in h["plug_in_p_hat"]["1/2"]["by_N"].items()}}
               for h in halves]
    return {"halves": summary, "tv_between_halves_p_hat": total_variation(p_first, p_second)}


def model_study(model, contexts, draws, rows, sets, seed, log):
    results = []
    rng = np.random.default_rng(seed)
    for index, ids in contexts:
        started = time.perf_counter()
        hidden = model.hidden_states(ids)[-1]
        chunks = draw_chunks(model, hidden, draws, rows, rng)
        drawn_s = time.perf_counter() - started
        labels = np.unique(chunks, axis=0, return_inverse=True)[1].ravel()
        stats = chunk_statistics(labels, N_VALUES, sets, rng)
        stats.update(halves_statistics(labels, N_VALUES, sets, rng))
        stats.update(document=index, context_tokens=len(ids), draw_seconds=round(drawn_s, 2))
        results.append(stats)
        log(f"  document {index}: {stats['distinct']} distinct of {draws} ({stats['singletons']} singletons, largest "
            f"count {stats['largest_count']}), sum p^2 {stats['sum_p2']['estimate']:.3g}, no repeat among 16: "
            f"{stats['plain_t1_share']['16']:.3f}, among 200: {stats['plain_t1_share']['200']:.3f}  [{drawn_s:.0f} s draws]")
    return results


# --- part 3: cost ---------------------------------------------------------------------------------

def _sampling_seconds(model, hidden, noise):
    started = time.perf_counter()
    model.decode(model.sample_latents(hidden[None], noise)[0])
    return time.perf_counter() - started


def _step_seconds(model, prompt, params):
    """Median decode-step seconds of one batch-1 generation (prefill excluded)."""
    from calm_edge.runtime.generator import Generator
    marks = [time.perf_counter() for _ in Generator(model, [prompt], params)]
    return statistics.median(b - a for a, b in zip(marks, marks[1:]))


def cost_study(model, prompt, rounds, new_tokens, seed, log):
    """Milliseconds of the energy head + decoder over N rows, and of decode steps, at batch 1.

    Every variant is timed once per round, the rounds one after the other, so a burst of load
    from elsewhere on the machine falls on all variants alike; the headline is each variant's
    fastest round (the least disturbed), and the median over rounds is kept beside it.
    """
    from calm_edge.runtime.generator import GeneratorParams
    rng = np.random.default_rng(seed)
    hidden = model.hidden_states(prompt)[-1]
    # 1 row: a T = 1 step; 8 and 12: one call of the exact sampler at T = 1/2 and 1/3 (4 rounds of n)
    noise = {N: rng.random((1, N, model.noise_size), dtype=np.float32) for N in sorted({1, 8, 12, *N_VALUES})}
    common = dict(max_new_tokens=new_tokens, stop_at_eos=False, seed=seed)
    variants = {"T=1": GeneratorParams(temperature=1.0, **common)}
    for N in N_VALUES:
        variants[f"T=1/2 batch N={N}"] = GeneratorParams(temperature=0.5, candidates=N, **common)
    variants["T=1/2 exact (runtime cap)"] = GeneratorParams(temperature=0.5, method="exact", **common)
    for N, x in noise.items():  # warm-up
        _sampling_seconds(model, hidden, x)
    for params in variants.values():
        _step_seconds(model, prompt, params)
    head, steps = {N: [] for N in noise}, {label: [] for label in variants}
    for _ in range(rounds):
        for N, x in noise.items():
            head[N].append(_sampling_seconds(model, hidden, x))
        for label, params in variants.items():
            steps[label].append(_step_seconds(model, prompt, params))
    head_ms = {str(N): 1e3 * min(t) for N, t in head.items()}
    step_ms = {label: 1e3 * min(t) for label, t in steps.items()}
    for label, ms in step_ms.items():
        log(f"  {label:26s} {ms:8.2f} ms per step  ({ms / step_ms['T=1']:.2f}x T=1)")
    return {"rounds": rounds, "new_tokens": new_tokens,
            "head_decoder_ms_by_rows": head_ms,
            "head_decoder_ms_per_draw_by_rows": {k: v / int(k) for k, v in head_ms.items()},
            "head_decoder_ms_by_rows_median": {str(N): 1e3 * statistics.median(t) for N, t in head.items()},
            "step_ms": step_ms, "step_vs_t1": {k: v / step_ms["T=1"] for k, v in step_ms.items()},
            "step_ms_median": {label: 1e3 * statistics.median(t) for label, t in steps.items()}}


# --- recommendation -------------------------------------------------------------------------------

def recommend(toys, model_rows, cost, default_N=16):
    """The default N the figures support, by a stated rule, with the figures the rule used.

    Rule: the smallest N whose worst TV over the toy distributions with repeats (all but the
    model-like flat-20000, where no affordable N helps) is within the frequency test's 0.05.
    """
    repeats = [name for name in toy_distributions() if name != "flat-20000"]
    by_case = {(r["distribution"], r["temperature"], r["N"]): r for r in toys if "N" in r}
    exact = {(r["distribution"], r["temperature"]): r["exact_sampler"] for r in toys if "exact_sampler" in r}
    quality, smallest, supported = {}, {}, {}
    for n in EXPONENTS:
        T = f"1/{n}"
        for N in N_VALUES:
            tvs = {name: by_case[name, T, N]["tv"] for name in repeats}
            worst = max(tvs, key=tvs.get)
            quality.setdefault(T, {})[str(N)] = {"worst_tv": tvs[worst], "worst_distribution": worst}
        for name in repeats:
            meeting = [N for N in N_VALUES if by_case[name, T, N]["tv"] <= TEST_TOLERANCE]
            smallest.setdefault(T, {})[name] = meeting[0] if meeting else None
        meeting = [N for N in N_VALUES if quality[T][str(N)]["worst_tv"] <= TEST_TOLERANCE]
        supported[T] = meeting[0] if meeting else None
    chosen = supported["1/2"] or max(N_VALUES)
    half, third = quality["1/2"], quality["1/3"]
    # once no step falls back, TV falls about as 1/N: N x TV stays about constant
    n_times_tv = {name: {str(N): N * by_case[name, "1/2", N]["tv"] for N in N_VALUES if N >= 16}
                  for name in ("six chunks", "zipf-1000")}
    reasons = [
        f"Rule: the smallest N whose worst total variation (TV) from p^2 over the toy distributions whose "
        f"candidates repeat (all but flat-20000) is within {TEST_TOLERANCE}, the tolerance of tests/test_sampling.py's "
        f"frequency test. That is N = {supported['1/2']} at T = 1/2 "
        f"(T = 1/3: {supported['1/3'] or 'more than ' + str(max(N_VALUES))}); the default is {default_N}.",
        "Worst toy TV per N at T = 1/2: " + ", ".join(f"{N}: {half[str(N)]['worst_tv']:.3f}" for N in N_VALUES)
        + "; at T = 1/3: " + ", ".join(f"{N}: {third[str(N)]['worst_tv']:.3f}" for N in N_VALUES)
        + f". The worst is {half[str(default_N)]['worst_distribution']} at N = {default_N}; the smallest N within "
        "the bar per distribution at T = 1/2: " + ", ".join(f"{k} {v}" for k, v in smallest["1/2"].items()) + ".",
        "Once no step falls back, the bias falls about as 1/N, so each halving costs a doubling of N: N x TV at "
        "T = 1/2 for N = 16..200 is " + "; ".join(
            f"{name} " + ", ".join(f"{v:.2f}" for v in row.values()) for name, row in n_times_tv.items()) + ".",
        "The exact sampler is unbiased and costs n / sum p^n draws: at T = 1/2 " + ", ".join(
            f"{name} {exact[name, '1/2']['expected_draws']:.1f}" for name in repeats)
        + f" draws per step (fewer than N = {chosen} on the concentrated toys), but "
        f"{exact['flat-20000', '1/2']['expected_draws']:.0f} on flat-20000, where the runtime's 100-round cap ends "
        f"{exact['flat-20000', '1/2']['cap_probability']:.0%} of steps with the batch choice over 200 draws.",
    ]
    if cost:
        steps, ms = cost["step_vs_t1"], cost["head_decoder_ms_by_rows"]
        reasons.append(
            "Cost grows about linearly in N: one energy-head + decoder call over N rows takes " + ", ".join(
                f"{ms[str(N)]:.1f} ms at N = {N}" for N in N_VALUES) + "; a batch-1 decode step costs " + ", ".join(
                f"{steps[f'T=1/2 batch N={N}']:.2f}x" for N in N_VALUES) + " a T = 1 step. N = "
            + f"{chosen} costs {steps[f'T=1/2 batch N={chosen}'] / steps[f'T=1/2 batch N={default_N}']:.1f}x an "
            f"N = {default_N} step; the exact sampler's capped step {steps['T=1/2 exact (runtime cap)']:.1f}x a "
            "T = 1 step.")
    model_t1 = None
    if model_rows:
        model_t1 = {str(N): statistics.mean(r["plain_t1_share"][str(N)] for r in model_rows) for N in N_VALUES}
        reasons.append(
            "On the committed small model, no N up to 200 makes T = 1/2 sampling real: the share of steps whose N candidates "
            "hold no chunk twice (plain T = 1 sampling), averaged over the contexts, is " + ", ".join(
                f"{model_t1[str(N)]:.3f} at N = {N}" for N in N_VALUES)
            + ". On a flat distribution TV is about that share x TV(p, p^2) (flat-20000: "
            + ", ".join(f"{by_case['flat-20000', '1/2', N]['tv']:.3f} against "
                        f"{by_case['flat-20000', '1/2', N]['fallback_times_untempered_tv']:.3f}" for N in (16, 64, 200))
            + " at N = 16, 64, 200), so there N changes the cost, not the output; the exact sampler needs about "
            "2 / sum p^2 draws (model.contexts) and runs to its cap at every step.")
    reasons.append(
        f"So: for models whose chunks repeat, the figures support N = {chosen} at T = 1/2 (N = "
        f"{supported['1/3'] or 'more than ' + str(max(N_VALUES))} at T = 1/3): it cuts the worst toy TV from "
        f"{half[str(default_N)]['worst_tv']:.3f} (N = {default_N}) to {half[str(chosen)]['worst_tv']:.3f}, for "
        f"{chosen // default_N}x the draws. N = {default_N} is within the bar only for distributions as concentrated "
        "as the test's six chunks. On the committed small model nearly every step is plain T = 1 sampling at any N "
        "up to 200, so there the default changes the cost far more than the output. The runtime's default is left "
        "as it is.")
    return {"rule": reasons[0], "supported_default_N": chosen, "supported_N_by_temperature": supported,
            "current_default_N": default_N, "current_default_meets_rule": chosen <= default_N,
            "worst_tv_by_N": quality, "smallest_N_within_bar": smallest, "n_times_tv_T1/2": n_times_tv,
            "model_plain_t1_share_mean": model_t1, "reasons": reasons}


def summary_by_N(toys, model_rows, cost):
    """One row per N: the figures a user choosing N needs, gathered from the sections above."""
    by_case = {(r["distribution"], r["temperature"], r["N"]): r for r in toys if "N" in r}
    repeats = [name for name in toy_distributions() if name != "flat-20000"]
    rows = []
    for N in N_VALUES:
        row = {"N": N}
        for T in ("1/2", "1/3"):
            row[f"worst_toy_tv_T{T}"] = max(by_case[name, T, N]["tv"] for name in repeats)
            for name in ("six chunks", "zipf-1000", "flat-20000"):
                row[f"tv_{name.replace(' ', '_')}_T{T}"] = by_case[name, T, N]["tv"]
        if model_rows:
            row["small_model_plain_t1_share_mean"] = statistics.mean(r["plain_t1_share"][str(N)] for r in model_rows)
            row["small_model_plain_t1_share_min"] = min(r["plain_t1_share"][str(N)] for r in model_rows)
        if cost:
            row["head_decoder_ms"] = cost["head_decoder_ms_by_rows"][str(N)]
            row["step_vs_t1"] = cost["step_vs_t1"][f"T=1/2 batch N={N}"]
        rows.append(row)
    return rows


# --- plot -----------------------------------------------------------------------------------------

def plot(report, path):
    import matplotlib
    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    panels = 3 if report.get("cost") else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2))
    ax = axes[0]
    colours = dict(zip(toy_distributions(), plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for name, colour in colours.items():
        for n, style in zip(EXPONENTS, ("-", "--")):
            rows = [r for r in report["toys"]["rows"] if r["distribution"] == name and r.get("N")
                    and r["temperature"] == f"1/{n}"]
            ax.plot([r["N"] for r in rows], [r["tv"] for r in rows], style, marker="o", ms=3, color=colour,
                    label=f"{name}, T=1/{n}")
    ax.axhline(TEST_TOLERANCE, color="grey", lw=0.8, ls=":")
    ax.text(N_VALUES[0], TEST_TOLERANCE * 1.08, "frequency test's bar", fontsize=6, color="grey")
    ax.set(xscale="log", yscale="log", ylim=(1e-3, 1.0), xlabel="candidates N",
           ylabel="TV(batch output, p^n normalised)", title="toys: the batch approximation's bias (below 1e-3 cut)")
    ax.set_xticks(N_VALUES, [str(N) for N in N_VALUES])
    ax.legend(fontsize=6, ncol=2)

    ax = axes[1]
    contexts = report.get("model", {}).get("contexts", [])
    for c in contexts:
        ax.plot(N_VALUES, [c["plain_t1_share"][str(N)] for N in N_VALUES], color="grey", lw=0.8, marker=".")
    if contexts:
        ax.plot(N_VALUES, [statistics.mean(c["plain_t1_share"][str(N)] for c in contexts) for N in N_VALUES],
                color="black", lw=2, label="small model: mean of contexts (grey: each)")
    for name in ("flat-20000", "zipf-1000"):
        rows = [r for r in report["toys"]["rows"] if r["distribution"] == name and r.get("N") and r["temperature"] == "1/2"]
        ax.plot([r["N"] for r in rows], [r["plain_t1_share"] for r in rows], color=colours[name], label=name)
    ax.set(xscale="log", ylim=(-0.02, 1.02), xlabel="candidates N", ylabel="share of steps with no chunk twice",
           title="T = 1/2: steps that fall back to T = 1")
    ax.set_xticks(N_VALUES, [str(N) for N in N_VALUES])
    ax.legend(fontsize=7)

    if panels == 3:
        ax = axes[2]
        cost = report["cost"]
        ax.plot(N_VALUES, [cost["step_ms"][f"T=1/2 batch N={N}"] for N in N_VALUES], marker="o",
                label="T = 1/2 batch step (measured)")
        ax.plot(N_VALUES, [cost["head_decoder_ms_by_rows"][str(N)] for N in N_VALUES], marker="s",
                label="energy head + decoder, N rows")
        ax.axhline(cost["step_ms"]["T=1"], color="grey", ls=":", label="T = 1 step")
        ax.axhline(cost["step_ms"]["T=1/2 exact (runtime cap)"], color="red", ls="--",
                   label="T = 1/2 exact step (200-draw cap)")
        ax.set(xscale="log", yscale="log", xlabel="candidates N", ylabel="ms (batch 1)",
               title="cost, small int4 package")
        ax.set_xticks(N_VALUES, [str(N) for N in N_VALUES])
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main -----------------------------------------------------------------------------------------

def _rounded(value, digits=6):
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else value
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v, digits) for v in value]
    return value


def package_name(path):
    """The package's path relative to the repository when it lies inside it (the JSON names no home folders)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", default=str(REPO / "models" / "calm-small-int4"),
                        help="CALM package whose chunk distributions are measured; 'none' for the toys only.")
    parser.add_argument("--text", default=str(REPO.parent / "shared" / "data" / "wikitext103-test-doc.jsonl"),
                        help="JSONL documents (field 'text') whose openings are the contexts.")
    parser.add_argument("--documents", type=int, default=6, help="Contexts: one per document.")
    parser.add_argument("--context-tokens", type=int, default=128, help="Tokens of each document's opening.")
    parser.add_argument("--draws", type=int, default=20000, help="Chunks drawn per context.")
    parser.add_argument("--rows", type=int, default=2048, help="Samples per energy-head and decoder call.")
    parser.add_argument("--sets", type=int, default=100000, help="Monte Carlo candidate sets per toy case.")
    parser.add_argument("--model-sets", type=int, default=20000, help="Resampled candidate sets per model case.")
    parser.add_argument("--enumerate-limit", type=int, default=1_000_000,
                        help="Count vectors up to which a toy's output is enumerated exactly.")
    parser.add_argument("--check-sets", type=int, default=2000,
                        help="Sets per (N, n) on which the vectorised rule is checked against batch_choice.")
    parser.add_argument("--threads", type=int, default=1,
                        help="ONNX Runtime threads: on this shared 2-core machine 1 was faster and steadier than 2.")
    parser.add_argument("--rounds", type=int, default=5, help="Timing rounds (each variant once per round).")
    parser.add_argument("--new-tokens", type=int, default=48, help="Tokens per timed generation.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "low_temperature_quality_small.json"))
    parser.add_argument("--plot", default=None, help="PNG path (default: --out with .png).")
    args = parser.parse_args(argv)

    def log(message):
        print(message, flush=True)

    started, load_before = time.perf_counter(), os.getloadavg()
    log("vectorised batch rule against runtime.sampling.batch_choice")
    check = check_against_batch_choice(args.check_sets, args.seed)
    log(f"  {check['sets_checked']} sets, {check['mismatches']} mismatches")
    log("toy distributions")
    toys = toy_study(args.sets, args.enumerate_limit, args.seed, log)
    mc_check = monte_carlo_check(args.sets, args.seed + 1)
    log("  Monte Carlo against enumeration (six chunks, N=16): TV between them "
        f"{mc_check['tv_between_monte_carlo_and_exact']:.4f}, "
        f"noise floor {mc_check['monte_carlo_noise']:.4f}")
    report = {
        "benchmark": "low_temperature_quality",
        "command": " ".join(["python benchmarks/low_temperature_quality.py", *(sys.argv[1:] if argv is None else argv)]),
        "N_values": list(N_VALUES),
        "definitions": {
            "tv": "total variation 0.5 * sum_x |q_N(x) - p(x)^n / sum_y p(y)^n| of the batch approximation's output q_N",
            "fallback_share": "share of steps whose N candidates hold no chunk n times (the rule falls back to n - 1)",
            "plain_t1_share": "share of steps whose N candidates are all distinct chunks: the choice is then plain T = 1 "
                              "sampling among them",
            "monte_carlo_noise": "half the TV between the two Monte Carlo halves: about the TV a perfect sampler would "
                                 "show from Monte Carlo noise alone",
            "exact_sampler": "acceptance per round = sum p^n; expected draws = n / sum p^n; draws_with_cap and "
                             "cap_probability with the runtime's 100 rounds, after which it makes the batch choice over "
                             "its 100 n draws",
        },
        "vectorised_rule_check": check,
        "toys": {"distributions": {k: d for k, (_, d) in toy_distributions().items()}, "sets": args.sets,
                 "enumerate_limit": args.enumerate_limit, "rows": toys, "monte_carlo_check": mc_check},
    }
    cost = None
    model_rows = []
    if args.package != "none":
        from calm_edge.runtime import Model
        model = Model(args.package, threads=args.threads)
        contexts = load_contexts(model, args.text, args.documents, args.context_tokens)
        log(f"model {package_name(args.package)}: {len(contexts)} contexts of {args.context_tokens} tokens, {args.draws} draws each")
        model_rows = model_study(model, contexts, args.draws, args.rows, args.model_sets, args.seed, log)
        log(f"cost (batch 1, {args.threads} thread(s), {args.rounds} rounds)")
        cost = cost_study(model, contexts[0][1], args.rounds, args.new_tokens, args.seed, log)
        report["model"] = {
            "package": package_name(args.package),
            "text": Path(args.text).name, "context": f"the first {args.context_tokens} tokens of each document "
            "(document = line index in the JSONL; the text is not recorded)", "draws_per_context": args.draws,
            "resampled_sets": args.model_sets, "threads": args.threads,
            "note": ("plain_t1_share and no_chunk_thrice_share are unbiased (U-statistics over every N-subset of the "
                     "draws) and sum_p2 / sum_p3 are unbiased; plug_in_p_hat resamples candidates from the empirical "
                     "p-hat with replacement, so its TV is the batch approximation's against p-hat^n for a "
                     "distribution that gives each seen chunk at least 1/D: a property of D as much as of the model "
                     "when chunks rarely repeat (compare the halves, and tv_between_halves_p_hat, the floor of any "
                     "sample-based TV at D/2 draws)"),
            "contexts": model_rows,
        }
        for row in model_rows:  # the uncapped exact sampler's step, at the measured cost of its calls
            for n in EXPONENTS:
                sampler = row[f"exact_sampler_T1/{n}"]
                draws = sampler["expected_draws"] or sampler["expected_draws_at_least"]
                key = "uncapped_ms_per_step" if sampler["expected_draws"] else "uncapped_ms_per_step_at_least"
                sampler[key] = draws * cost["head_decoder_ms_per_draw_by_rows"][str(4 * n)]
        report["cost"] = cost
        report["cost"]["threads"] = args.threads
        report["cost"]["note"] = ("one energy-head + decoder call over N rows at batch 1, and the Generator's median "
                                  "decode step at batch 1 on the first context (backbone included); each the fastest "
                                  "of the rounds, the medians over rounds beside them")
    report["recommendation"] = recommend(toys, model_rows, cost)
    report["summary_by_N"] = summary_by_N(toys, model_rows, cost)
    report["seconds"] = time.perf_counter() - started
    report["machine"] = {"cpus": os.cpu_count(), "load_average_1min_before": load_before[0],
                         "load_average_1min_after": os.getloadavg()[0],
                         "note": "a shared machine: timings are each variant's fastest of several rounds, which a "
                                 "load above the CPU count still inflates"}
    for line in report["recommendation"]["reasons"]:
        log(line)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_rounded(report), indent=1) + "\n")
    plot_path = Path(args.plot) if args.plot else out.with_suffix(".png")
    plot(report, plot_path)
    log(f"-> {out}, {plot_path} ({report['seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
