"""benchmarks/low_temperature.py's BatchedExactSampler: the exact sampler's choices and draws, fewer calls.

The prototype is a proposal for runtime/sampling.py; this test is the evidence that it changes
nothing a user can see: for every seed, the same chunk and the same random counter afterwards
(so every later step is unchanged too), including the max-rounds fallback.
"""
import sys
from pathlib import Path

import numpy as np
import pytest

from calm_edge.runtime.rng import RandomStream
from calm_edge.runtime.sampling import TemperatureSampler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from low_temperature import BatchedExactSampler  # noqa: E402

NOISE = 3  # random values per drawn chunk, as the energy head's noise_size


def toy_draw(rng, p, calls):
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
    (0.5, 4, [1 / 40] * 40, 7),  # flat: many steps end in the max-rounds fallback; 7 = 4 + 3 trials
])
def test_same_chunk_and_counter_as_the_exact_sampler(temperature, trials, p, max_rounds):
    reference = TemperatureSampler(temperature, method="exact", max_rounds=max_rounds)
    prototype = BatchedExactSampler(temperature, trials=trials, max_rounds=max_rounds)
    calls_reference, calls_prototype = [], []
    for stream in range(400):
        a, b = RandomStream(5, stream), RandomStream(5, stream)
        chunk_a = reference.sample(toy_draw(a, p, calls_reference), a)
        chunk_b = prototype.sample(toy_draw(b, p, calls_prototype), b)
        assert chunk_a == chunk_b and a.counter == b.counter, stream
    assert len(calls_prototype) < len(calls_reference)
