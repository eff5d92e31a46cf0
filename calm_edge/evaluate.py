"""BrierLM of a CALM or AR model on evaluation text: in PyTorch (the reference) or through a package.

Positions. Each document is tokenized; a position is a token offset t with t = offset (mod K),
t >= K, stepping by `stride` tokens (a multiple of K), up to `max_positions` over the whole
set. The model sees the `context` tokens before t (fewer at a document's start) and the outcome
is the next 4 tokens, doc[t:t+4]. CALM and AR are scored at the very same positions.

Samples. At each position both models draw two independent 4-token continuations at T = 1 with
the reference generator (`calm_edge.generate`), each from its own random stream; Brier-1..4
use their first n tokens (`calm_edge.brierlm`). With `offset` = 0 every CALM prompt is a whole
number of chunks; other offsets exercise the eos left-fill of a partial chunk, and comparing
them shows what that costs.

Models. `evaluate_checkpoint` scores a training checkpoint with the PyTorch modules;
`evaluate_package` scores a model package through its ONNX graphs (`calm_edge.runtime.Model`),
which is what a device runs, quantized or not. Both drive the one generation loop
(`calm_edge.runtime.generator`) at the same positions with the same random streams, so for an
fp32 package the two agree up to the graphs' float rounding. This module imports no torch
unless it is given a PyTorch model.
"""
import time

from tqdm import tqdm

from calm_edge.brierlm import BrierAccumulator
from calm_edge.errors import CalmEdgeError
from calm_edge.runtime.generator import GeneratorParams, generate_tokens

CONTINUATION = 4  # Brier-1..4 need 4 tokens


def eval_positions(token_docs, chunk_size, context, stride, max_positions, offset=0):
    """(prefix, target) pairs: up to `context` tokens before each position, and the next 4 tokens."""
    if stride % chunk_size:
        raise CalmEdgeError(f"stride {stride} must be a multiple of K={chunk_size}")
    if not 0 <= offset < chunk_size:
        raise CalmEdgeError(f"offset {offset} must be in [0, K={chunk_size})")
    pairs = []
    for ids in token_docs:
        for t in range(chunk_size + offset, len(ids) - CONTINUATION + 1, stride):
            pairs.append((ids[max(0, t - context):t], ids[t:t + CONTINUATION]))
            if len(pairs) == max_positions:
                return pairs
    if not pairs:
        raise CalmEdgeError(f"the evaluation text has no position with {CONTINUATION} tokens after it; give longer documents")
    return pairs


def _new_backend(model):
    """A fresh generation backend: a runtime `Model`'s own state, or a PyTorch module's wrapper."""
    if hasattr(model, "new_state"):
        return model.new_state()
    from calm_edge.generate import TorchBackend

    return TorchBackend(model)


def context_limit(max_context, chunk_size, kind):
    """The longest context (tokens, a multiple of K) that leaves room for the continuation.

    Room for the 4-token continuation and for a partial chunk's eos fill.
    """
    return max_context * (chunk_size if kind == "calm" else 1) - CONTINUATION - chunk_size


def evaluate_brierlm(model, pairs, seed=0, batch_size=32, progress=True, samples=None):
    """Brier-1..4 and BrierLM over `pairs` from `eval_positions`.

    `model`: a CalmModel / ARModel (PyTorch) or a runtime `Model` (ONNX graphs). `samples`, a
    list, receives each position's two sampled continuations and its target, (sample1, sample2,
    target), to compare two models' draws (`calm_edge.brierlm.paired_difference`).
    """
    accumulator = BrierAccumulator()
    started = time.perf_counter()
    bar = tqdm(total=len(pairs), desc="BrierLM", unit=" pos", disable=not progress)
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        prompts = [prefix for prefix, _ in batch for _ in range(2)]
        # Stream ids are unique per (position, sample) across the whole evaluation.
        streams = [2 * (start + i) + s for i in range(len(batch)) for s in range(2)]
        settings = GeneratorParams(max_new_tokens=CONTINUATION, temperature=1.0, seed=seed,
                                   stop_at_eos=False, streams=streams)
        continuations = generate_tokens(_new_backend(model), [list(p) for p in prompts], settings)
        for i, (_, target) in enumerate(batch):
            accumulator.add_samples(continuations[2 * i], continuations[2 * i + 1], target)
            if samples is not None:
                samples.append((continuations[2 * i], continuations[2 * i + 1], list(target)))
        bar.update(len(batch))
    bar.close()
    report = accumulator.report()
    report["seconds"] = round(time.perf_counter() - started, 2)
    return report


def evaluate_checkpoint(path, sources, context=256, stride=32, max_positions=2000, offsets=(0,), seed=0,
                        text_field="text", detokenize="none", batch_size=32, progress=True, samples=None):
    """BrierLM of a trained CALM or AR checkpoint on `sources`, at each partial-chunk offset.

    `samples`: see `evaluate_brierlm` (all offsets' draws, in order).
    """
    from calm_edge.generate import TorchBackend
    from calm_edge.tokenizer import Tokenizer
    from calm_edge.training.language_models import load_language_model

    model, saved = load_language_model(path)
    tokenizer = Tokenizer(saved.tokenizer_path)
    K = saved.config.autoencoder.chunk_size
    limit = context_limit(TorchBackend(model).max_context, K, saved.kind)
    result = _evaluate_offsets(model, tokenizer, K, limit, sources, context, stride, max_positions, offsets, seed,
                               text_field, detokenize, batch_size, progress, samples)
    return {"kind": saved.kind, "checkpoint": str(saved.folder), "step": saved.trainer.get("step"), **result}


def evaluate_package(model, sources, context=256, stride=32, max_positions=2000, offsets=(0,), seed=0,
                     text_field="text", detokenize="none", batch_size=32, progress=True, samples=None):
    """BrierLM of a model package, opened as a runtime `Model`, through its ONNX graphs (`samples`: as above)."""
    K = position_chunk_size(model.manifest)
    limit = context_limit(model.max_context, K, model.kind)
    return _evaluate_offsets(model, model.tokenizer, K, limit, sources, context, stride, max_positions, offsets, seed,
                             text_field, detokenize, batch_size, progress, samples)


def position_chunk_size(manifest):
    """The K that lays out evaluation positions: the autoencoder's, for AR packages too.

    `evaluate_checkpoint` places an AR model's positions with its config's autoencoder K, so
    that CALM and AR are scored at the same positions; a package's training config (in its
    provenance) gives the same K, and a package without one falls back to its own chunk size.
    """
    config = (manifest.get("provenance") or {}).get("config") or {}
    return int((config.get("autoencoder") or {}).get("chunk_size") or manifest["model"]["chunk_size"])


def _evaluate_offsets(model, tokenizer, K, limit, sources, context, stride, max_positions, offsets, seed, text_field,
                      detokenize, batch_size, progress, samples=None):
    from calm_edge.evaldata import load_eval_tokens

    tokens, described = load_eval_tokens(sources, tokenizer, text_field=text_field, detokenize=detokenize,
                                         progress=progress)
    context = min(context, limit)
    context -= context % K
    results = {}
    for offset in offsets:
        pairs = eval_positions([tokens.tolist()], K, context, stride, max_positions, offset=offset)
        results[str(offset)] = evaluate_brierlm(model, pairs, seed=seed, batch_size=batch_size, progress=progress,
                                                samples=samples)
    main = results[str(offsets[0])]
    return {
        "data": described,
        "positions": {"context_tokens": context, "stride": stride, "max_positions": max_positions, "seed": seed},
        **{k: main[k] for k in ("brier_1", "brier_2", "brier_3", "brier_4", "brierlm")},
        "by_offset": results,
    }
