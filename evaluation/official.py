"""The official CALM evaluation protocol (the official code's `eval_brier`): teacher-forced Brier-1..4.

    report = evaluate_official(model, text, EvalSettings(protocol="official", block_tokens=8192))

Text: the documents, each encoded as the model was trained on them (the released models: bos first,
no eos; calm-edge's: eos after), are concatenated and cut into blocks of `block_tokens` (8192 in the
official evaluation, whole chunks; the remainder is dropped, and the blocks cross documents). Per
block, one backbone call over the whole block, causal from position 0, gives every chunk's hidden
state; chunk i's predicts chunk i + 1, so the first chunk of a block is never scored. Two energy-head
samples per position, each decoded to a chunk, P1 and P2, against the true chunk y:

    Brier-n = mean over positions of  1{P1[:n] = y[:n]} + 1{P2[:n] = y[:n]} - 1{P1[:n] = P2[:n]}

the first n tokens of each chunk (n = 1..4: needs K >= 4), so only n-grams that start at chunk
boundaries count. All blocks have one length, so the official mean over blocks is this mean over
positions. BrierLM = 100 x the geometric mean of Brier-1..4 (the code reports it in [0, 1], the
paper x 100).

The noise is the shared generator's (not torch's, as in the official code): position p of the whole
evaluation draws its two samples from stream p, so the PyTorch reference, the Python runtime and the
C++ runtime score the very same draws. `model` is a runtime `Model` or the reference's `TorchModel`:
what is used is `hidden_states(ids)`, `sample_latents` and `decode`.
"""
import time

import numpy as np
from tqdm import tqdm

from calm_edge.errors import CalmEdgeError
from calm_edge.evaluation.brierlm import BrierAccumulator
from calm_edge.runtime.rng import RandomStream

SAMPLES = 2  # the official estimator uses the first two of its head samples
BATCH = 256  # positions per energy-head and decoder call


def blocks_of(tokens, block_tokens, chunk_size, max_context):
    """Whole blocks of `block_tokens` (a whole number of chunks, at most the model's context); the rest dropped."""
    block = min(block_tokens, chunk_size * max_context)
    block -= block % chunk_size
    if block < 2 * chunk_size:
        raise CalmEdgeError(f"--block-tokens {block_tokens} leaves no position to score at K={chunk_size}; "
                            f"give at least {2 * chunk_size}")
    count = len(tokens) // block
    if count == 0:
        raise CalmEdgeError(f"the evaluation text has {len(tokens)} tokens, fewer than one block of {block}; "
                            "give more text or a smaller --block-tokens")
    return [np.asarray(tokens[i * block:(i + 1) * block], dtype=np.int64) for i in range(count)], block


def evaluate_official(model, text, settings, progress=True, samples=None):
    """Brier-1..4 and BrierLM of `model` by the official protocol on `text` (a TextSource)."""
    K = model.chunk_size
    if model.kind != "calm":
        raise CalmEdgeError("the official protocol scores CALM models (chunk by chunk); evaluate an AR model with "
                            "--protocol calm-edge")
    if K < 4:
        raise CalmEdgeError(f"the official protocol scores the first 4 tokens of each chunk; this model has K={K}")
    started = time.perf_counter()
    tokens, described = text.load_tokens(model.tokenizer, progress=progress)
    blocks, block = blocks_of(tokens, settings.block_tokens, K, model.max_context)
    accumulator = BrierAccumulator()
    position = 0  # across every block: the random stream of the position's draws
    bar = tqdm(total=min(settings.max_positions, len(blocks) * (block // K - 1)), desc="BrierLM (official)",
               unit=" pos", disable=not progress)
    for ids in blocks:
        if position >= settings.max_positions:
            break
        hidden = model.hidden_states(ids)  # [chunks, hidden]
        targets = ids.reshape(-1, K)
        scored = min(len(targets) - 1, settings.max_positions - position)
        for start in range(0, scored, BATCH):
            count = min(BATCH, scored - start)
            noise = np.stack([RandomStream(settings.seed, position + start + i).draw(SAMPLES * model.noise_size)
                              .reshape(SAMPLES, model.noise_size) for i in range(count)])
            latents = model.sample_latents(hidden[start:start + count], noise)
            chunks = model.decode(latents.reshape(count * SAMPLES, -1)).reshape(count, SAMPLES, K)
            for i in range(count):
                first, second, target = chunks[i, 0].tolist(), chunks[i, 1].tolist(), targets[start + i + 1].tolist()
                accumulator.add_samples(first[:4], second[:4], target[:4])
                if samples is not None:
                    samples.append((first, second, target))
            bar.update(count)
        position += scored
    bar.close()
    report = accumulator.report()
    return {"protocol": "official", "data": described,
            "positions": {"block_tokens": block, "blocks": len(blocks), "scored": position, "seed": settings.seed},
            **{k: report[k] for k in ("brier_1", "brier_2", "brier_3", "brier_4", "brierlm")},
            "by_offset": {"0": {**report, "seconds": round(time.perf_counter() - started, 2)}}}
