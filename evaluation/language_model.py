"""BrierLM of a CALM or AR model on evaluation text: in PyTorch (the reference) or through a package.

Positions: `settings.EvalSettings` and `eval_positions`. Samples: at each position the model
draws two independent 4-token continuations at T = 1 through the runtime's generation loop, each
from its own random stream; Brier-1..4 use their first n tokens (`brierlm.py`).

Models. `evaluate_checkpoint` scores a training checkpoint with the PyTorch modules (the
reference, `calm_edge.export.reference.TorchModel`); `evaluate_package` scores a model package
through its ONNX graphs (`calm_edge.runtime.Model`), which is what a device runs, quantized or
not. Both drive the one `Generator` at the same positions with the same random streams, so for
an fp32 package the two agree up to the graphs' float rounding. Evaluating a package needs no
torch: the reference is imported only to evaluate a checkpoint.
"""
import time

from tqdm import tqdm

from calm_edge.evaluation.brierlm import BrierAccumulator
from calm_edge.evaluation.official import evaluate_official
from calm_edge.evaluation.settings import (CONTINUATION, EvalSettings, context_limit, eval_positions,
                                           other_context_pairs)
from calm_edge.runtime.generator import GeneratorParams, generate_tokens


def evaluate_brierlm(model, pairs, seed=0, batch_size=32, progress=True, samples=None):
    """Brier-1..4 and BrierLM over `pairs` from `eval_positions`.

    `model`: a runtime `Model` or the reference's `TorchModel`. `samples`, a list, receives each
    position's two sampled continuations and its target, (sample1, sample2, target), to compare
    two models' draws (`brierlm.paired_difference`).
    """
    accumulator = BrierAccumulator()
    started = time.perf_counter()
    bar = tqdm(total=len(pairs), desc="BrierLM", unit=" pos", disable=not progress)
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        prompts = [list(prefix) for prefix, _ in batch for _ in range(2)]
        # Stream ids are unique per (position, sample) across the whole evaluation.
        streams = [2 * (start + i) + s for i in range(len(batch)) for s in range(2)]
        params = GeneratorParams(max_new_tokens=CONTINUATION, temperature=1.0, seed=seed, stop_at_eos=False,
                                 streams=streams)
        continuations = generate_tokens(model, prompts, params)
        for i, (_, target) in enumerate(batch):
            accumulator.add_samples(continuations[2 * i], continuations[2 * i + 1], target)
            if samples is not None:
                samples.append((continuations[2 * i], continuations[2 * i + 1], list(target)))
        bar.update(len(batch))
    bar.close()
    report = accumulator.report()
    report["seconds"] = round(time.perf_counter() - started, 2)
    return report


def evaluate_checkpoint(path, text, settings=EvalSettings(), progress=True, samples=None):
    """BrierLM of a trained CALM or AR checkpoint on `text` (a TextSource), at each offset of `settings`.

    `samples`: see `evaluate_brierlm` (all offsets' draws, in order).
    """
    from calm_edge.export.reference import TorchModel  # torch: only the reference needs it

    model = TorchModel.load(path)
    saved_config = model.module.config
    K = saved_config.autoencoder.chunk_size  # an AR model is evaluated at the positions of its CALM pairing
    result = _evaluate_offsets(model, K, text, settings, progress, samples)
    checkpoint = model.checkpoint
    return {"kind": model.kind, "checkpoint": str(checkpoint.folder), "step": checkpoint.trainer.get("step"), **result}


def evaluate_package(model, text, settings=EvalSettings(), progress=True, samples=None):
    """BrierLM of a model package, opened as a runtime `Model`, through its ONNX graphs (`samples`: as above)."""
    return _evaluate_offsets(model, model.manifest.position_chunk_size, text, settings, progress, samples)


def _evaluate_offsets(model, K, text, settings, progress, samples=None):
    if settings.protocol == "official":
        return evaluate_official(model, text, settings, progress=progress, samples=samples)
    tokens, described = text.load_tokens(model.tokenizer, progress=progress)
    context = min(settings.context, context_limit(model.max_context, K, model.kind))
    context -= context % K
    results = {}
    for offset in settings.offsets:
        pairs = eval_positions([tokens.tolist()], K, context, settings.stride, settings.max_positions, offset=offset)
        results[str(offset)] = evaluate_brierlm(model, pairs, seed=settings.seed, batch_size=settings.batch_size,
                                                progress=progress, samples=samples)
        if settings.other_context and len(pairs) > 1:
            results[str(offset)]["other_context"] = evaluate_brierlm(
                model, other_context_pairs(pairs), seed=settings.seed, batch_size=settings.batch_size, progress=progress)
    main = results[str(settings.offsets[0])]
    headline = ("brier_1", "brier_2", "brier_3", "brier_4", "brierlm")
    report = {"data": described, "positions": settings.describe(context), **{k: main[k] for k in headline}}
    if "other_context" in main:
        report["other_context"] = {k: main["other_context"][k] for k in (*headline, "brier_1_stderr")}
        report["brier_1_stderr"] = main["brier_1_stderr"]
    return {**report, "by_offset": results}
