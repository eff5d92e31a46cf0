"""Temperature sampling with a black-box sampler: frequencies against p^(1/T), determinism, errors."""
import numpy as np
import pytest

from calm_edge.errors import CalmEdgeError
from calm_edge.runtime.rng import RandomStream
from calm_edge.runtime.sampling import TemperatureSampler, batch_choice, temperature_exponent

# A toy "model": a known distribution over 6 chunks of K = 2 tokens, sampled by inverse CDF from
# the same counter-based generator the energy head's noise comes from.
CHUNKS = [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12)]
P = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])


def _toy_draw(rng):
    cdf = np.cumsum(P)

    def draw_chunks(count):
        u = rng.draw(count)
        return [CHUNKS[min(int(np.searchsorted(cdf, x, side="right")), len(CHUNKS) - 1)] for x in u]

    return draw_chunks


def _frequencies(sampler, draws, seed=0):
    counts = np.zeros(len(CHUNKS))
    for stream in range(draws):
        rng = RandomStream(seed, stream)
        counts[CHUNKS.index(sampler.sample(_toy_draw(rng), rng))] += 1
    return counts / draws


def _tempered(n):
    q = P**n
    return q / q.sum()


@pytest.mark.parametrize("temperature, method, candidates", [
    (1.0, "exact", 1),
    (0.5, "exact", 1),
    (1 / 3, "exact", 1),
    (0.5, "batch", 32),
    (1 / 3, "batch", 48),
])
def test_frequencies_follow_p_to_the_one_over_t(temperature, method, candidates):
    # 8,000 draws over 6 outcomes: the total-variation distance of the empirical frequencies
    # from the truth is about 0.01 by sampling noise alone, so 0.05 is a real check.
    sampler = TemperatureSampler(temperature, method=method, candidates=candidates)
    frequencies = _frequencies(sampler, 8000)
    target = _tempered(temperature_exponent(temperature))
    tv = 0.5 * np.abs(frequencies - target).sum()
    assert tv < 0.05, (frequencies.round(3), target.round(3))
    # ... and it is not just the untempered distribution (which is 0.1+ away at these T).
    if temperature < 1:
        assert 0.5 * np.abs(frequencies - P).sum() > 0.1


def test_sampling_is_deterministic_for_a_seed_and_changes_with_it():
    sampler = TemperatureSampler(0.5, method="batch", candidates=16)
    assert np.array_equal(_frequencies(sampler, 300, seed=1), _frequencies(sampler, 300, seed=1))
    assert not np.array_equal(_frequencies(sampler, 300, seed=1), _frequencies(sampler, 300, seed=2))


def test_draw_order_is_noise_then_one_choice_uniform():
    rng = RandomStream(5)
    sampler = TemperatureSampler(0.5, method="batch", candidates=8)
    sampler.sample(_toy_draw(rng), rng)
    assert rng.counter == 8 + 1
    rng = RandomStream(5)
    TemperatureSampler(1.0).sample(_toy_draw(rng), rng)
    assert rng.counter == 1  # T = 1: one draw, no choice


def test_batch_choice_weights_and_fallback():
    chunks = ["a", "b", "a", "c", "a", "b"]  # counts a=3, b=2, c=1
    # n = 2: weights C(3,2)=3 for a, C(2,2)=1 for b; c is excluded.
    assert batch_choice(chunks, 2, 0.0) == 0 and batch_choice(chunks, 2, 0.74) == 0
    assert batch_choice(chunks, 2, 0.76) == 1
    # n = 4: no chunk seen 4 times, fall back to m = 3: only a.
    assert {batch_choice(chunks, 4, u) for u in np.linspace(0, 0.999, 50)} == {0}
    # All distinct and n = 2: fall back to plain sampling among the candidates.
    assert {batch_choice(["x", "y", "z"], 2, u) for u in (0.1, 0.5, 0.9)} == {0, 1, 2}


def test_exact_sampler_gives_up_after_max_rounds_with_a_batch_choice():
    rng = RandomStream(3)
    distinct = iter(range(10**6))
    sampler = TemperatureSampler(0.25, method="exact", max_rounds=5)
    chunk = sampler.sample(lambda count: [(next(distinct),) for _ in range(count)], rng)
    assert chunk[0] < 5 * 4  # one of the chunks drawn in the 5 rounds
    assert rng.counter == 1  # the fallback's choice uniform


@pytest.mark.parametrize("temperature, words", [
    (0.7, ["0.7 is not 1/n", "n=1", "n=2"]),
    (0.0, ["out of range"]),
    (1.5, ["out of range"]),
    ("warm", ["not a number"]),
])
def test_temperatures_that_cannot_be_honoured(temperature, words):
    with pytest.raises(CalmEdgeError) as error:
        TemperatureSampler(temperature)
    for word in words:
        assert word in str(error.value)


def test_too_few_candidates_and_unknown_method():
    with pytest.raises(CalmEdgeError, match="2 candidates cannot show a chunk 3 times.*--candidates 3"):
        TemperatureSampler(1 / 3, method="batch", candidates=2)
    with pytest.raises(CalmEdgeError, match="method 'greedy' is unknown"):
        TemperatureSampler(0.5, method="greedy")
    assert temperature_exponent(0.25) == 4 and temperature_exponent(1) == 1


NOISE = 3  # random values per drawn chunk, as the energy head's noise_size


def _counting_draw(rng, p, calls):
    chunks = [(i, i + 1) for i in range(len(p))]
    cdf = np.cumsum(p)

    def draw_chunks(count):
        calls.append(count)
        u = rng.draw(count * NOISE).reshape(count, NOISE)[:, 0]
        return [chunks[min(int(np.searchsorted(cdf, x, side="right")), len(chunks) - 1)] for x in u]

    return draw_chunks


@pytest.mark.parametrize("temperature, trials, p, max_rounds", [
    (0.5, 2, [0.4, 0.25, 0.15, 0.1, 0.06, 0.04], 100),
    (0.5, 4, [0.4, 0.25, 0.15, 0.1, 0.06, 0.04], 100),
    (1 / 3, 3, [0.5, 0.3, 0.2], 100),
    (0.5, 4, [1 / 40] * 40, 7),  # flat: many steps end in the max-rounds fallback; 7 = 4 + 3 rounds
])
def test_exact_sampler_rounds_per_call_change_the_calls_not_the_draws(temperature, trials, p, max_rounds):
    """Several rejection rounds per call: the same chunk and the same counter afterwards (so every
    later step is unchanged too) as one round per call, including the max-rounds fallback."""
    one = TemperatureSampler(temperature, method="exact", max_rounds=max_rounds, trials_per_call=1)
    several = TemperatureSampler(temperature, method="exact", max_rounds=max_rounds, trials_per_call=trials)
    calls_one, calls_several = [], []
    for stream in range(400):
        a, b = RandomStream(5, stream), RandomStream(5, stream)
        assert one.sample(_counting_draw(a, p, calls_one), a) == several.sample(_counting_draw(b, p, calls_several), b)
        assert a.counter == b.counter, stream
    assert len(calls_several) < len(calls_one)
