"""Lazy decoding (runtime/sampling.py `lazy_batch_choice`, split packages): the same tokens as decoding everything.

The batch approximation's choice depends only on which candidates' chunks are equal; the lazy
choice decodes each candidate's first token and as few others as settle that. These tests hold it
to the plain choice: on random candidate sets with every pattern of shared prefixes, and end to
end on split packages against the whole decoder of the same model, in Python (the C++ runtime's
are in test_cpp_runtime.py).
"""
import itertools
import random

import pytest

from calm_edge.runtime.sampling import batch_choice, lazy_batch_choice


def run_lazy(chunks, n, u):
    """(chosen chunk, rounds, positions decoded) of the lazy choice over fully known `chunks`."""
    choice = lazy_batch_choice(len(chunks), len(chunks[0]), n, u)
    requests, rounds, decoded = next(choice), 0, set()
    while True:
        rounds += 1
        assert requests and not decoded & set(requests), "a round asks for nothing, or for a token it has"
        decoded |= set(requests)
        try:
            requests = choice.send([chunks[j][p] for j, p in requests])
        except StopIteration as finished:
            return finished.value, rounds, decoded


def random_chunks(rng, count, K, vocab):
    """Candidates drawn from a few prototypes with random edits, so that prefixes are shared at every depth."""
    prototypes = [tuple(rng.randrange(vocab) for _ in range(K)) for _ in range(rng.randint(1, 4))]
    chunks = []
    for _ in range(count):
        chunk = list(rng.choice(prototypes))
        if rng.random() < 0.5:
            chunk[rng.randrange(K)] = rng.randrange(vocab)
        chunks.append(tuple(chunk))
    return chunks


@pytest.mark.parametrize("n", [2, 3])
def test_lazy_choice_equals_the_batch_choice(n):
    rng = random.Random(n)
    for case in range(3000):
        count, K = rng.choice([n, 4, 16, 33]), rng.choice([1, 2, 4])
        chunks = random_chunks(rng, max(count, n), K, vocab=rng.choice([2, 3, 50]))
        u = rng.random()
        chosen, rounds, decoded = run_lazy(chunks, n, u)
        assert chosen == chunks[batch_choice(chunks, n, u)], (case, chunks, u)
        assert rounds <= 3


def test_distinct_first_tokens_cost_one_round_and_one_chunk():
    """All first tokens differ: one round, each candidate's first token and one chunk's others."""
    chunks = [(j, 7, 7, 7) for j in range(16)]
    for u in (0.0, 0.3, 0.999):
        chosen, rounds, decoded = run_lazy(chunks, 2, u)
        assert chosen == chunks[batch_choice(chunks, 2, u)]
        assert rounds == 1 and len(decoded) == 16 + 3


def test_identical_candidates_need_every_token():
    chunks = [(5, 6, 7, 8)] * 16
    chosen, rounds, decoded = run_lazy(chunks, 2, 0.5)
    assert chosen == (5, 6, 7, 8) and len(decoded) == 64 and rounds == 2


def test_every_small_case_exhaustively():
    """Every chunk set of 4 candidates, K = 2, over 3 tokens, at several uniforms."""
    pieces = list(itertools.product(range(3), repeat=2))
    for chunks in itertools.product(pieces, repeat=4):
        for u in (0.0, 0.26, 0.51, 0.76, 0.9999):
            assert run_lazy(list(chunks), 2, u)[0] == chunks[batch_choice(list(chunks), 2, u)]
