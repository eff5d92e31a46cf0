"""What quantization changed: each quantized graph against its fp32 original, and a generation.

Quantized graphs are not expected to match fp32 exactly, so nothing here has a tolerance to
pass. The figures go into the manifest so a user can see what each graph lost, and two things
fail the quantization outright because the package would be useless:

- a non-finite output (fp16 overflow, a degenerate calibration range) on real inputs;
- a package that ONNX Runtime cannot load or that cannot generate text.

Per graph and output: the largest absolute difference from fp32 and the largest |fp32 value|
beside it (for scale); for token ids, the share of ids that differ. The generation runs the
quantized package and the fp32 package from the same prompts and seed, and records how many
tokens agree (a sampled continuation diverges after the first different token, so this is a
coarse figure) and the text, for a person to read.
"""
import numpy as np

from calm_edge.errors import CalmEdgeError
from calm_edge.runtime.generator import GeneratorParams, generate_tokens

GENERATION_PROMPTS = ["The history of the city begins", "In 1912, the company", "She said that the river was"]
GENERATION_TOKENS = 32


def _compare_output(reference, actual):
    if reference.dtype.kind in "iu":
        return {"mismatch_share": float((reference != actual).mean()) if reference.size else 0.0}
    return {"max_abs_diff": float(np.abs(reference.astype(np.float64) - actual).max()) if reference.size else 0.0,
            "max_abs_reference": float(np.abs(reference).max()) if reference.size else 0.0}


def compare_graph(name, reference_session, session, feeds):
    """Worst differences of each output over `feeds`; present.* outputs summarised as one."""
    names = [o.name for o in session.get_outputs()]
    worst = {}
    for feed in feeds:
        expected = reference_session.run(None, feed)
        actual = session.run(None, feed)
        for output, e, a in zip(names, expected, actual):
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                raise CalmEdgeError(
                    f"quantized {name} graph produces non-finite values in {output} on real inputs; "
                    f"keep it in float32 with --keep-fp32 {name}, or choose another --mode"
                )
            key = "present.*" if output.startswith("present.") else output
            result = _compare_output(e, a)
            previous = worst.get(key)
            worst[key] = result if previous is None else {k: max(v, previous[k]) for k, v in result.items()}
    return worst


def compare_generation(reference_model, model, seed=0):
    """Tokens of the quantized and the fp32 package from the same prompts and seed."""
    prompts = [model.tokenizer.encode(p) for p in GENERATION_PROMPTS]
    params = GeneratorParams(max_new_tokens=GENERATION_TOKENS, seed=seed, stop_at_eos=False)
    try:
        actual = generate_tokens(model, prompts, params)
    except CalmEdgeError:
        raise
    except Exception as e:  # a kernel failure inside onnxruntime
        raise CalmEdgeError(f"the quantized package cannot generate ({e}); choose another --mode or --keep-fp32") from None
    expected = generate_tokens(reference_model, prompts, params)
    same = sum(a == b for x, y in zip(expected, actual) for a, b in zip(x, y))
    return {"prompts": len(prompts), "tokens": sum(len(x) for x in expected), "identical_tokens": same,
            "seed": seed, "sample": GENERATION_PROMPTS[0] + model.tokenizer.decode(actual[0])}
