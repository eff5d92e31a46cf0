"""Timing generations through the runtime's loop: the measurements behind the speed figures.

`trace_generation` runs one generation and returns its `timing.Trace`; `measure` repeats a
batch-1 generation and reports the median run by the definitions of `timing.py`. Used by the
quickstart's benchmark stage, `calm-edge eval compare` and the benchmark scripts.
"""
import statistics

from calm_edge.runtime.generator import Generator
from calm_edge.runtime.timing import decode_tokens_per_second, step_split_ms


def trace_generation(model, prompts, params, sampler=None):
    """(new token ids per prompt, Trace) of one generation through the runtime's loop."""
    generator = Generator(model, prompts, params, sampler)
    for _ in generator:
        pass
    return generator.tokens, generator.trace()


def measure(model, prompt, params, repeats):
    """Decode figures of one prompt (token ids) at batch 1: the median of `repeats` generations.

    Returns the keys of benchmarks/results/runtime_*.json: new_tokens, steps, prefill_ms,
    decode_tokens_per_second, step_ms (mean decode step), per_step_ms (the split), loop_share
    and every run's total seconds.
    """
    traces = [trace_generation(model, [prompt], params)[1] for _ in range(repeats)]
    rates = [decode_tokens_per_second(t) for t in traces]
    median = sorted(zip(rates, range(len(traces))))[len(traces) // 2][1]  # the median run, whole
    trace = traces[median]
    split = step_split_ms([trace])
    step_ms = 1e3 * statistics.fmean(trace.step_s)
    return {
        "new_tokens": trace.new_tokens,
        "steps": len(trace.step_s) + 1,
        "prefill_ms": round(1e3 * trace.prefill_s, 2),
        "decode_tokens_per_second": round(rates[median], 1),
        "step_ms": round(step_ms, 3),
        "per_step_ms": {k: round(v, 3) for k, v in split.items()},
        "loop_share": round(split.get("loop_overhead", 0.0) / step_ms, 4),
        "all_runs_seconds": [round(t.total_s, 4) for t in traces],
    }
