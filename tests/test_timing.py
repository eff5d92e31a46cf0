"""The one definition of each speed figure (runtime/timing.py), on traces made by hand."""
import math

import pytest

from calm_edge.runtime.timing import (Trace, decode_tokens, decode_tokens_per_second, end_to_end_tokens_per_second,
                                      step_split_ms)


def trace(steps, tokens_per_step=4, new_tokens=None, graphs=None):
    step_s = list(steps)
    return Trace(total_s=0.5 + sum(step_s), ttft_s=0.5, prefill_s=0.3, step_s=step_s, tokens_per_step=tokens_per_step,
                 new_tokens=new_tokens if new_tokens is not None else tokens_per_step * (len(step_s) + 1),
                 graphs_s=graphs or {})


def test_decode_rate_counts_the_tokens_after_the_first_step_over_their_time():
    t = trace([0.1, 0.1, 0.2], tokens_per_step=4)  # 16 tokens, 12 of them after the first step
    assert decode_tokens(t) == 12 and decode_tokens(t, batch=3) == 36
    assert decode_tokens_per_second(t) == pytest.approx(12 / 0.4)
    assert decode_tokens_per_second(t, batch=3) == pytest.approx(36 / 0.4)
    assert end_to_end_tokens_per_second(t) == pytest.approx(16 / 0.9)
    # A last step cut short by max_new_tokens counts only the tokens it gave.
    assert decode_tokens_per_second(trace([0.1, 0.1], new_tokens=10)) == pytest.approx(6 / 0.2)
    assert math.isnan(decode_tokens_per_second(trace([])))  # one step only: nothing to decode


def test_the_split_adds_up_to_the_mean_decode_step():
    traces = [trace([0.010, 0.012], graphs={"backbone": 0.014, "decoder": 0.004}),
              trace([0.011, 0.009], graphs={"backbone": 0.012, "decoder": 0.004})]
    split = step_split_ms(traces)
    assert split["backbone"] == pytest.approx(1e3 * 0.026 / 4) and split["decoder"] == pytest.approx(2.0)
    assert sum(split.values()) == pytest.approx(1e3 * 0.042 / 4)
    assert split["loop_overhead"] == pytest.approx(1e3 * (0.042 - 0.034) / 4)
    assert step_split_ms([trace([0.1])]) == {}  # a peer without graph timings has no split
