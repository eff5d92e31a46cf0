"""Export validation: the ONNX graphs must compute what the PyTorch modules compute.

Two checks, as optimum's exporters do, and the export fails loudly when either fails:

1. Per graph: ONNX Runtime against the torch module on random inputs and on real ones (a real
   prompt's prefill and decode step, the hidden states and latents it really produces), with
   the largest absolute difference per output. Float outputs must agree within
   `TOLERANCE * max(1, max |reference|)`; token ids must be identical.
2. End to end: the runtime's `Generator` over the graphs against a `Generator` over the torch
   modules, step by step in lockstep, for `e2e_prompts` prompts x `e2e_tokens` tokens at T = 1
   and T = 1/2 with a fixed seed: at every step the step graph's outputs (hidden states or
   logits) must agree within the tolerance above, and the tokens must be identical. One
   exception, recorded in the report: a row whose tokens part where the two outputs still agree
   within the tolerance drew a sampling tie (the uniform fell within float rounding of the
   boundary between two tokens, or two decoded chunks); it is followed no further. A wrong
   cache, position or mask shows as outputs that disagree, and fails.
"""
import numpy as np
import torch

from calm_edge.errors import CalmEdgeError
from calm_edge.export import graphs
from calm_edge.export.reference import TorchModel
from calm_edge.runtime.generator import Generator, GeneratorParams
from calm_edge.runtime.model import Model

TOLERANCE = 1e-4
PROMPTS = [
    "The history of the city begins",
    "In 1912, the company",
    "She said that the river was",
    "Scientists have long studied how",
    "After the war ended, many",
]


def _compare(name, reference, actual):
    reference, actual = np.asarray(reference), np.asarray(actual)
    if reference.shape != actual.shape:
        raise CalmEdgeError(f"export validation failed: {name} has shape {actual.shape} in ONNX but {reference.shape} in PyTorch")
    if reference.dtype.kind in "iu":
        mismatches = int((reference != actual).sum())
        return {"mismatches": mismatches, "ok": mismatches == 0}
    diff = float(np.abs(reference.astype(np.float64) - actual).max()) if reference.size else 0.0
    scale = max(1.0, float(np.abs(reference).max()) if reference.size else 1.0)
    return {"max_abs_diff": diff, "ok": diff <= TOLERANCE * scale}


def _check_graph(session, module, spec, inputs):
    """Run one graph both ways on `inputs` (torch tensors); per-output comparison, paired by name.

    The torch wrapper returns its outputs in the spec's order (graphs.py), and ONNX Runtime is
    asked for the spec's output names, so each output is compared with the one of its name.
    """
    feeds = {io["name"]: t.numpy() for io, t in zip(spec["inputs"], inputs)}
    names = [io["name"] for io in spec["outputs"]]
    onnx_outputs = dict(zip(names, session.run(names, feeds)))
    with torch.no_grad():
        torch_outputs = module(*inputs)
    if isinstance(torch_outputs, torch.Tensor):
        torch_outputs = (torch_outputs,)
    if len(torch_outputs) != len(names):
        raise CalmEdgeError(f"export validation failed: the PyTorch graph gives {len(torch_outputs)} outputs, "
                            f"the package's spec names {len(names)}")
    return {name: _compare(name, reference.numpy(), onnx_outputs[name]) for name, reference in zip(names, torch_outputs)}


def _summarise(results):
    """Collapse the many present.* outputs into one entry: the worst of them."""
    summary = {name: r for name, r in results.items() if not name.startswith("present.")}
    presents = [r for name, r in results.items() if name.startswith("present.")]
    if presents:
        summary["present.*"] = {"max_abs_diff": max(r["max_abs_diff"] for r in presents),
                                "ok": all(r["ok"] for r in presents)}
    return summary


def _real_inputs(model, runtime_model):
    """A real prompt's prefill and one decode step, as each graph's input tuple."""
    manifest = runtime_model.manifest
    kind, K = manifest.kind, manifest.chunk_size
    ids = runtime_model.tokenizer.encode(PROMPTS[0])
    ids = ids[: (len(ids) // K) * K] or ids[:K]
    prompt = torch.tensor([ids])
    mask = torch.ones(1, len(ids) // K, dtype=torch.long)
    positions = torch.arange(len(ids) // K)[None]
    empty = [torch.zeros(1, manifest.num_kv_heads, 0, manifest.head_dim) for _ in manifest.past_names]
    step = graphs.wrappers(kind, model, manifest.decoder_layout)[manifest.step_graph]
    with torch.no_grad():
        outputs = step(prompt, mask, positions, *empty)
    presents = list(outputs[1:])
    next_ids = prompt[:, -K:]
    decode = (next_ids, torch.ones(1, mask.shape[1] + 1, dtype=torch.long), positions[:, -1:] + 1, *presents)
    cases = {"prefill": (prompt, mask, positions, *empty), "decode": decode}
    if kind == "ar":
        return {"ar": cases}
    hidden = outputs[0][:, -1]
    noise = torch.rand(1, 8, manifest.noise_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        latents = model.sample_latents(hidden, noise)[0]
    real = {"backbone": cases, "energy_head": {"real": (hidden, noise)}, "decoder": {"real": (latents,)}}
    if manifest.decoder_layout == "split":
        with torch.no_grad():
            states = model.autoencoder.decode_states(latents)
        real["decoder_head"] = {"real": (states.reshape(-1, states.shape[-1]),)}
    return real


def validate_package(model, folder, e2e_prompts=3, e2e_tokens=64, seed=0, progress=True, fused_attention=False):
    """Validate the package in `folder` against `model`; returns the report, raises on failure."""
    runtime_model = Model(folder, provider="cpu", prepack_weights=False)  # beside the PyTorch model: one copy
    manifest = runtime_model.manifest
    kind, section = manifest.kind, manifest.model_section
    specs = manifest.specs()
    modules = graphs.wrappers(kind, model, manifest.decoder_layout)
    torch.manual_seed(seed)
    real = _real_inputs(model, runtime_model)
    report = {"tolerance": TOLERANCE, "graphs": {}}
    failures = []
    for name, spec in specs.items():
        if fused_attention and name == manifest.step_graph:
            # GroupQueryAttention takes several new positions over a cache only at batch 1.
            cases = {"random": graphs.example_inputs(spec, section, batch=1, sequence=3, past=5, samples=4),
                     "random-batch": graphs.example_inputs(spec, section, batch=2, sequence=1, past=5, samples=4)}
        else:
            cases = {"random": graphs.example_inputs(spec, section, batch=2, sequence=3, past=5, samples=4)}
        cases.update(real[name])
        results = {case: _summarise(_check_graph(runtime_model.sessions[name], modules[name], spec, inputs))
                   for case, inputs in cases.items()}
        report["graphs"][name] = results
        failures += [f"{name} {case} {output}: {r}" for case, outs in results.items() for output, r in outs.items() if not r["ok"]]
    if failures:
        raise CalmEdgeError("export validation failed, the ONNX graphs disagree with PyTorch: " + "; ".join(failures))

    prompts = [runtime_model.tokenizer.encode(p) for p in (PROMPTS * 2)[:e2e_prompts]]
    end_to_end = {}
    for temperature in (1.0, 0.5):
        params = GeneratorParams(max_new_tokens=e2e_tokens, temperature=temperature, seed=seed, stop_at_eos=False)
        end_to_end[f"T={temperature:g}"] = compare_generation(TorchModel(model), runtime_model, prompts, params)
    report["end_to_end"] = end_to_end
    return report


def compare_generation(reference, deployed, prompts, params):
    """Both models' Generators in lockstep (see the module docstring); the report, or an error on a mismatch.

    Output differences are relative to max(1, the largest |reference output|), as the tolerance is.
    """
    expected, actual = Generator(reference, prompts, params), Generator(deployed, prompts, params)
    followed, ties, worst, step = set(range(len(prompts))), [], 0.0, 0
    while not expected.done:
        step += 1
        wanted, got = expected.step(), actual.step()
        for row in sorted(followed):
            reference_out, out = expected.last_output[row], actual.last_output[row]
            diff = float(np.abs(reference_out.astype(np.float64) - out).max())
            scale = max(1.0, float(np.abs(reference_out).max()))
            worst = max(worst, diff / scale)
            if diff > TOLERANCE * scale:
                raise CalmEdgeError(
                    f"export validation failed: at T={params.temperature:g}, step {step} of prompt {row}, the step "
                    f"graph's output differs from PyTorch's by {diff:.3g} (tolerance {TOLERANCE * scale:.3g}): the "
                    "graphs handle the cache, positions or mask differently")
            if wanted[row] != got[row]:
                ties.append({"prompt": row, "step": step, "tokens_before": len(expected.tokens[row]) - len(wanted[row]),
                             "step_output_relative_diff": diff / scale})
                followed.discard(row)
    same = sum(a == b for r, d in zip(expected.tokens, actual.tokens) for a, b in zip(r, d))
    total = sum(len(r) for r in expected.tokens)
    return {"prompts": len(prompts), "tokens": total, "identical_tokens": same, "equal": expected.tokens == actual.tokens,
            "sampling_ties": ties, "max_step_output_relative_diff": worst}
