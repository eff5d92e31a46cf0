"""Decode speed of a model package at batch 1: tokens per second after the prompt.

A generation is timed step by step through the runtime's loop (`iterate_steps`): the first step
(prefill and the first sampled chunk or token) is left out, so the figure is the steady decode
rate a user sees while text streams: new tokens / time from the first step's end to the last.
Sampling is at T = 1 without stopping at eos, so every package generates the same number of
tokens. Speeds of several packages are measured round-robin (`measure_round_robin`), so that a
load change on the machine hits all of them alike rather than one.
"""
import statistics
import time

from calm_edge.runtime.generator import GeneratorParams, iterate_steps

SPEED_PROMPT = "The history of the city begins in the early years of the century, when"


def decode_rate(model, new_tokens=128, seed=0, prompt=SPEED_PROMPT):
    """(tokens per second, tokens timed) of one batch-1 generation of about `new_tokens` tokens."""
    ids = model.tokenizer.encode(prompt)
    K = model.chunk_size
    room = (model.max_context - 1 - -(-len(ids) // K)) * K  # positions left after the prompt, in tokens
    params = GeneratorParams(max_new_tokens=max(2 * K, min(new_tokens, room)), seed=seed, stop_at_eos=False)
    first_end, tokens = None, 0
    for step in iterate_steps(model.new_state(), [ids], params):
        if first_end is None:
            first_end = time.perf_counter()
            continue
        tokens += len(step[0])
    elapsed = time.perf_counter() - first_end
    return tokens / elapsed if elapsed > 0 else float("inf"), tokens


def measure_round_robin(models, new_tokens=128, repeats=5, seed=0):
    """{name: {"tokens_per_second" (median), "runs": [...], "tokens"}} for {name: runtime Model}."""
    for model in models.values():
        decode_rate(model, new_tokens=2 * model.chunk_size, seed=seed)  # warm-up: allocations, thread pools
    runs = {name: [] for name in models}
    tokens = {}
    for _ in range(repeats):
        for name, model in models.items():
            rate, tokens[name] = decode_rate(model, new_tokens=new_tokens, seed=seed)
            runs[name].append(rate)
    return {name: {"tokens_per_second": statistics.median(rates), "runs": [round(r, 2) for r in rates],
                   "tokens": tokens[name]} for name, rates in runs.items()}
