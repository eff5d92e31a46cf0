"""The step-level runtime API: `Generator`, its stop reasons, the caller's loop, the cache rule, the trace."""
import numpy as np
import pytest

from calm_edge.errors import CalmEdgeError
from calm_edge.runtime import timing
from calm_edge.runtime.generator import Generator, GeneratorParams, cache_capacity, generate_tokens
from calm_edge.runtime.model import Model
from calm_edge.runtime.sampling import TemperatureSampler
from calm_edge.runtime.text_generation import generate

PROMPTS = ("In the beginning", "And he said unto them,", "The")


@pytest.mark.parametrize("kind", ["calm", "ar"])
def test_stepping_by_hand_gives_what_generate_tokens_gives(packages, kind):
    model = Model(packages[kind])
    prompts = [model.tokenizer.encode(p) for p in PROMPTS]
    params = GeneratorParams(max_new_tokens=10, temperature=0.5, seed=3, stop_at_eos=False)
    generator = Generator(model, prompts, params)
    steps = []
    while not generator.done:
        steps.append(generator.step())
    assert [sum((s[row] for s in steps), []) for row in range(3)] == generator.tokens
    assert generator.tokens == generate_tokens(model, prompts, params)
    assert generator.stop_reasons == ["max_new_tokens"] * 3
    assert len(steps) == -(-10 // model.chunk_size)
    with pytest.raises(CalmEdgeError, match="generation is finished"):
        generator.step()


def test_the_caller_stops_a_row_and_the_others_run_on(packages):
    model = Model(packages["calm"])
    prompts = [model.tokenizer.encode(p) for p in PROMPTS]
    params = GeneratorParams(max_new_tokens=16, seed=5, stop_at_eos=False)
    generator = Generator(model, prompts, params)
    generator.step()
    generator.stop(1, "stop_sequence")
    rest = [generator.step() for _ in range(3)]
    assert all(step[1] == [] for step in rest) and len(generator.tokens[1]) == model.chunk_size
    assert generator.stop_reasons == ["max_new_tokens", "stop_sequence", "max_new_tokens"]
    # A stopped row is fed pad chunks and masked: the other rows are those of a batch without it.
    alone = generate_tokens(model, [prompts[0], prompts[2]], GeneratorParams(max_new_tokens=16, seed=5,
                                                                             stop_at_eos=False, streams=[0, 2]))
    assert [generator.tokens[0], generator.tokens[2]] == alone


def test_a_short_row_beside_a_long_one_runs_past_the_context_of_the_padded_cache(packages):
    """The cache is sized by one rule (the padded prompt plus the longest row's steps), so a short
    prompt batched with one near the context's end still runs to its own end of context."""
    model = Model(packages["calm"])  # max_context 64 chunks
    long = model.tokenizer.encode("In the beginning God created the heaven and the earth. " * 40)[:60 * 4]
    short = model.tokenizer.encode("The")
    params = GeneratorParams(max_new_tokens=1000, seed=2, stop_at_eos=False, streams=[0, 1])
    generator = Generator(model, [long, short], params)
    assert generator.capacity == cache_capacity([long, [2, 2, 2] + short], 4, 1000, 64) == 60 + 64
    for _ in generator:
        pass
    assert generator.stop_reasons == ["context", "context"]
    # A row of n prompt chunks samples 64 - n + 1 chunks: the last from the hidden state at position 63.
    assert len(generator.tokens[0]) == (64 - 60 + 1) * 4 and len(generator.tokens[1]) == (64 - 1 + 1) * 4
    alone = generate_tokens(model, [short], GeneratorParams(max_new_tokens=1000, seed=2, stop_at_eos=False,
                                                            streams=[1]))
    assert generator.tokens[1] == alone[0]


def test_a_sampler_of_ones_own_replaces_the_one_the_params_describe(packages):
    model = Model(packages["calm"])
    prompts = [model.tokenizer.encode(p) for p in PROMPTS]
    params = GeneratorParams(max_new_tokens=12, temperature=0.5, candidates=8, seed=1, stop_at_eos=False)
    plain = generate_tokens(model, prompts, params)
    own = generate_tokens(model, prompts, GeneratorParams(max_new_tokens=12, temperature=0.5, seed=1, stop_at_eos=False),
                          sampler=TemperatureSampler(0.5, candidates=8))
    assert own == plain


def test_the_trace_accounts_for_the_steps(packages):
    model = Model(packages["calm"])
    generator = Generator(model, [model.tokenizer.encode("Behold")], GeneratorParams(max_new_tokens=24,
                                                                                        stop_at_eos=False))
    for _ in generator:
        pass
    trace = generator.trace()
    assert trace.new_tokens == 24 and trace.tokens_per_step == 4 and len(trace.step_s) == 24 // 4 - 1
    assert 0 < trace.prefill_s <= trace.ttft_s <= trace.total_s
    assert trace.total_s == pytest.approx(trace.ttft_s + sum(trace.step_s))
    assert set(trace.graphs_s) == {"backbone", "energy_head", "decoder"}
    split = timing.step_split_ms([trace])
    assert sum(split.values()) == pytest.approx(1e3 * np.mean(trace.step_s))


def test_stop_reasons_reach_the_text_api(packages):
    model = Model(packages["calm"])
    results = generate(model, ["In the beginning", "The"], GeneratorParams(max_new_tokens=8, seed=0))
    assert all(r.stopped_by in ("max_new_tokens", "eos") for r in results)
    assert all(len(r.token_ids) == 8 for r in results if r.stopped_by == "max_new_tokens")
