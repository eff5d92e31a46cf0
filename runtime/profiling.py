"""Where a generation's time goes: decode tokens/s, and each step split between graphs and loop.

`one_generation` times one batch-1 generation through the runtime's loop, separating the
prefill (the first call of the step graph, on the whole prompt) from the decode steps, and
using each graph's own accumulated run time (`ModelState.timings`). `measure` repeats it and
reports the median run whole, so the figures of one run add up.

Used by `benchmarks/runtime.py` and by the quickstart's benchmark stage, so both report decode
speed by the same definition: new tokens / (generation time - prefill time).
"""
import time

from calm_edge.runtime.generator import iterate_steps


def one_generation(model, prompt, params):
    """(seconds, prefill seconds, steps, tokens, graph seconds) of one generation of token ids `prompt`."""
    state = model.new_state()
    began = time.perf_counter()
    steps, tokens, prefill = 0, 0, None
    for new_ids in iterate_steps(state, [prompt], params):
        if prefill is None:  # the first step follows the prefill call directly
            prefill = state.timings[model._step_name]
        steps += 1
        tokens += len(new_ids[0])
    seconds = time.perf_counter() - began
    graphs = dict(state.timings)
    graphs[model._step_name] -= prefill
    return {"seconds": seconds, "prefill_seconds": prefill, "steps": steps, "tokens": tokens, "graphs": graphs}


def measure(model, prompt, params, repeats):
    """Decode tokens/s, step time and its split per graph, of the median of `repeats` generations."""
    runs = [one_generation(model, prompt, params) for _ in range(repeats)]
    run = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]  # the median run, whole
    decode_seconds = run["seconds"] - run["prefill_seconds"]
    graph_seconds = sum(run["graphs"].values())
    per_step_ms = {name: 1e3 * s / run["steps"] for name, s in run["graphs"].items()}
    per_step_ms["loop_overhead"] = 1e3 * (decode_seconds - graph_seconds) / run["steps"]
    return {
        "new_tokens": run["tokens"],
        "steps": run["steps"],
        "prefill_ms": round(1e3 * run["prefill_seconds"], 2),
        "decode_tokens_per_second": round(run["tokens"] / decode_seconds, 1),
        "step_ms": round(1e3 * decode_seconds / run["steps"], 3),
        "per_step_ms": {k: round(v, 3) for k, v in per_step_ms.items()},
        "loop_share": round((decode_seconds - graph_seconds) / decode_seconds, 4),
        "all_runs_seconds": [round(r["seconds"], 4) for r in runs],
    }
