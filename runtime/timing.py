"""What a generation's time is made of, and the one definition of every speed figure calm-edge reports.

A `Trace` records one generation of a batch: the time to the first new tokens, the prompt's
forward pass (prefill), the wall time of every later step, and the seconds each graph spent in
those later steps. `Generator.trace()` makes one; the benchmark's peer runners (optimum,
onnxruntime-genai) make theirs the same way. From traces:

- decode tokens/s: the tokens after the first step over the time they took, batch rows
  included (`decode_tokens_per_second`). The first step holds the prefill, so this is the
  steady rate a user sees while text streams;
- time to first token: from the call (checks, allocation and prefill included) to the first
  new tokens (`Trace.ttft_s`);
- the per-step split: the mean milliseconds per decode step in each graph, and what the graphs
  do not account for, the loop's own overhead (sampling, bookkeeping, Python) (`step_split_ms`).

The quickstart, `calm-edge eval compare`, `calm-edge bench` and the benchmark scripts all use
these functions, so a figure means the same wherever it appears.
"""
from dataclasses import dataclass, field


@dataclass
class Trace:
    """The timings of one generation of a batch (seconds)."""

    total_s: float
    ttft_s: float  # from the call to the first new tokens
    prefill_s: float  # the prompt's forward pass alone
    step_s: list  # each step after the first new tokens
    tokens_per_step: int  # new tokens per sequence per step (K for CALM, 1 for AR)
    new_tokens: int  # per sequence
    graphs_s: dict = field(default_factory=dict)  # seconds per graph in the steps after the first


def decode_tokens(trace, batch=1):
    """The tokens the decode phase produced: those after the first step, over every row."""
    return batch * (trace.new_tokens - trace.tokens_per_step)


def decode_tokens_per_second(trace, batch=1):
    """Tokens after the first step over their time (NaN for a generation of one step)."""
    seconds = sum(trace.step_s)
    return decode_tokens(trace, batch) / seconds if seconds > 0 else float("nan")


def end_to_end_tokens_per_second(trace, batch=1):
    """Every new token over the whole generation, prefill included."""
    return batch * trace.new_tokens / trace.total_s


def step_split_ms(traces):
    """{graph: mean ms per decode step, "loop_overhead": the rest}, over the decode steps of `traces`.

    The parts add up to the mean decode step; an empty dict for traces without graph timings.
    """
    steps = [s for t in traces for s in t.step_s]
    count = max(len(steps), 1)
    split = {name: 1e3 * sum(t.graphs_s.get(name, 0.0) for t in traces) / count for name in traces[0].graphs_s}
    if split:
        split["loop_overhead"] = 1e3 * sum(steps) / count - sum(split.values())
    return split
