"""In-flight batching (`runtime.engine.Engine`): every request's tokens are those it gets alone."""
import numpy as np
import pytest

from calm_edge.errors import CalmEdgeError
from calm_edge.runtime.engine import Engine
from calm_edge.runtime.generator import GeneratorParams, generate_tokens
from calm_edge.runtime.model import Model

PROMPTS = ("In the beginning", "And he said unto them,", "The", "And God saw the light, that it was good: and God",
           "Blessed are", "For God so loved the world")

# (arrival step, prompt, max_new_tokens, temperature, seed, cancel at step or None)
REQUESTS = [
    (0, 0, 24, 1.0, 1, None),
    (0, 1, 9, 0.5, 2, None),
    (1, 2, 40, 1.0, 3, None),
    (3, 3, 17, 0.5, 4, 6),    # cancelled while it runs
    (3, 4, 30, 1.0, 5, None),  # waits: the batch of 3 is full until a row leaves
    (4, 5, 12, 1.0, 6, 4),    # cancelled the step it arrives, before it gets a row
    (9, 0, 21, 1.0, 7, None),  # the same prompt again, another seed
]


def _params(max_new_tokens, temperature, seed):
    return GeneratorParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, stop_at_eos=False)


def _drive(engine, model, requests):
    """Run the arrivals and cancellations of `requests`; returns ({id: tokens}, {id: stop reason}, steps)."""
    tokens, reasons, step = {}, {}, 0
    while step < 500:
        for index, (arrive, prompt, n, t, seed, _) in enumerate(requests):
            if arrive == step:
                engine.add_request(model.tokenizer.encode(PROMPTS[prompt]), _params(n, t, seed), request_id=index)
        for index, (*_, cancel) in enumerate(requests):
            if cancel == step:
                engine.cancel(index)
        if not engine.has_work and step > max(r[0] for r in requests):
            break
        for output in engine.step():
            tokens.setdefault(output.request_id, []).extend(output.new_ids)
            assert output.request_id not in reasons, "a request was reported after it ended"
            if output.finished:
                reasons[output.request_id] = output.stop_reason
        assert engine.running <= engine.max_batch
        step += 1
    return tokens, reasons, step


@pytest.mark.parametrize("kind", ["calm", "ar"])
@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_every_request_gets_the_tokens_it_gets_alone(packages, kind, batching):
    model = Model(packages[kind])
    engine = Engine(model, max_batch=3, batching=batching)
    tokens, reasons, _ = _drive(engine, model, REQUESTS)
    for index, (_, prompt, n, t, seed, cancel) in enumerate(REQUESTS):
        alone = generate_tokens(model, [model.tokenizer.encode(PROMPTS[prompt])], _params(n, t, seed))[0]
        if cancel is None:
            assert reasons[index] == "max_new_tokens" and tokens[index] == alone, index
        else:
            assert reasons[index] == "cancelled" and tokens.get(index, []) == alone[:len(tokens.get(index, []))]
    assert not engine.has_work and engine.running == 0 and engine.cache.rows == 0


def test_continuous_batching_admits_between_steps_and_static_waits(packages):
    model = Model(packages["calm"])
    finished_at = {}
    for batching in ("continuous", "static"):
        engine = Engine(model, max_batch=2, batching=batching)
        long = engine.add_request(model.tokenizer.encode("In the beginning"), _params(64, 1.0, 1))
        engine.add_request(model.tokenizer.encode("The"), _params(4, 1.0, 2))
        engine.step()  # the short one ends at its first step; its row is free at once
        short = engine.add_request(model.tokenizer.encode("And"), _params(4, 1.0, 3))
        steps = 1
        while True:
            outputs = {o.request_id: o for o in engine.step()}
            steps += 1
            if short in outputs and outputs[short].finished:
                break
        finished_at[batching] = steps
        # Continuous: the long request still runs beside it. Static: it had to end first.
        assert [r.id for r in engine.rows] == ([long] if batching == "continuous" else [])
    assert finished_at == {"continuous": 2, "static": 17}  # static: after the long row's 16 steps, plus its own


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_the_cache_stays_within_its_capacity_as_rows_come_and_go(packages, batching):
    """Old columns no running row attends are dropped, so a stream of requests never outgrows the context."""
    model = Model(packages["ar"])  # max_context positions
    engine = Engine(model, max_batch=2, batching=batching)
    prompt = model.tokenizer.encode("In the beginning")
    short = model.tokenizer.encode("The")
    for i in range(6):  # prompts of two lengths: the shorter row of a static batch outlives the longer
        engine.add_request(prompt if i % 2 else short, _params(model.max_context, 1.0, i))
    lengths, reasons = [], []
    while engine.has_work:
        reasons += [o.stop_reason for o in engine.step() if o.finished]
        lengths.append(engine.cache.length)
    assert reasons == ["context"] * 6
    assert max(lengths) <= engine.cache.capacity == model.max_context + 1  # SlotCache raises beyond it
    assert engine.mask.shape == (0, 0)


def test_requests_are_checked_before_they_are_queued(packages):
    model = Model(packages["calm"])
    engine = Engine(model, max_batch=2)
    with pytest.raises(CalmEdgeError, match="temperature 0.7 is not 1/n"):
        engine.add_request([5, 6], GeneratorParams(temperature=0.7))
    with pytest.raises(CalmEdgeError, match="context holds"):
        engine.add_request([5] * (model.max_context * model.chunk_size), GeneratorParams())
    with pytest.raises(CalmEdgeError, match="is empty"):
        engine.add_request([], GeneratorParams())
    engine.add_request([5, 6], request_id="a")
    with pytest.raises(CalmEdgeError, match="already in use"):
        engine.add_request([5, 6], request_id="a")
    assert engine.waiting == 1 and not engine.cancel("nobody")
    with pytest.raises(CalmEdgeError, match="max_batch"):
        Engine(model, max_batch=0)
    with pytest.raises(CalmEdgeError, match="batching"):
        Engine(model, batching="dynamic")
    assert np.isfinite(engine.timings["backbone"])
