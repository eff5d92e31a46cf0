"""Export validation's end-to-end check: lockstep generations, a sampling tie told apart from a real mismatch."""
import math

import numpy as np
import pytest

from calm_edge.errors import CalmEdgeError
from calm_edge.export.validate import compare_generation
from calm_edge.runtime.generator import GeneratorParams
from calm_edge.runtime.rng import RandomStream


class LogitsModel:
    """A stand-in AR model over two tokens whose logits a function of (row, step) gives."""

    kind, chunk_size, eos_id, pad_id, noise_size, max_context = "ar", 1, 0, 0, 0, 64

    def __init__(self, logits):
        self.logits = logits

    def new_state(self, batch, capacity):
        model, state = self, type("State", (), {})()
        state.timings, state.step = {"ar": 0.0}, 0

        def run(*_):
            state.step += 1
            return np.array([model.logits(row, state.step) for row in range(batch)], dtype=np.float32)

        state.start = run
        state.advance = run
        return state


def tie_logits(offset):
    """Logits whose first token's probability is row 0's first uniform plus `offset`: a draw next to the boundary."""
    u = RandomStream(PARAMS.seed, 0).draw_one()

    def logits(row, step):
        p = u + offset if (row, step) == (0, 1) else 0.5
        return [math.log(p), math.log(1 - p)]
    return logits


PARAMS = GeneratorParams(max_new_tokens=6, seed=1, stop_at_eos=False)


def test_identical_generations_pass_with_their_figures():
    report = compare_generation(LogitsModel(tie_logits(0.1)), LogitsModel(tie_logits(0.1)), [[1], [1]], PARAMS)
    assert report["equal"] and report["identical_tokens"] == report["tokens"] == 12 and report["sampling_ties"] == []


def test_a_draw_on_a_boundary_within_rounding_is_a_recorded_tie_not_a_failure():
    reference, deployed = LogitsModel(tie_logits(-1e-6)), LogitsModel(tie_logits(1e-6))
    report = compare_generation(reference, deployed, [[1], [1]], PARAMS)
    assert not report["equal"] and report["sampling_ties"][0]["prompt"] == 0 and report["sampling_ties"][0]["step"] == 1
    assert len(report["sampling_ties"]) == 1  # row 1 stayed identical and was followed to the end


def test_outputs_that_disagree_fail_even_when_the_tokens_agree():
    far = LogitsModel(lambda row, step: [0.0, 10.0] if step == 3 else [0.0, 0.0])
    near = LogitsModel(lambda row, step: [0.0, 10.1] if step == 3 else [0.0, 0.0])
    with pytest.raises(CalmEdgeError, match="step 3 of prompt 0, the step graph's output differs"):
        compare_generation(far, near, [[1]], PARAMS)
