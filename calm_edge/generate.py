"""Reference generation in PyTorch: the loop that the ONNX runtimes must reproduce token for token.

Both model kinds generate a batch of prompts at once, left-padded, with an explicit key/value
cache; every sequence draws its randomness from its own `RandomStream(seed, stream=row)`.

CALM, one step per K tokens:
  1. Prompts are token lists of any length. A prompt whose length is not a multiple of K is
     left-filled with eos ids up to the next multiple: in training, a document starts after an
     eos at any offset within a chunk, so "eos, then the prompt" is what the model has seen.
     `benchmarks`/BrierLM at shifted offsets measure what this costs.
  2. Prefill: one backbone call over all prompt chunks.
  3. Each step: the energy head turns noise (from the row's stream) into latent samples, the
     autoencoder's decoder maps them to chunks, temperature sampling picks one chunk
     (`calm_edge.runtime.sampling`), and one backbone call on that chunk extends the cache.
  4. A sequence stops at eos (tokens after it are dropped), after `max_new_tokens`, or when the
     context (`calm.backbone.max_positions` vectors) is full.

AR, one step per token: softmax of logits * n (that is p^(1/T) for T = 1/n), then the token at
the row's next uniform by inverse CDF (float64 cumulative sum), one uniform per token.
"""
from dataclasses import dataclass, field

import numpy as np
import torch

from calm_edge.errors import CalmEdgeError
from calm_edge.runtime.rng import RandomStream
from calm_edge.runtime.sampling import TemperatureSampler


@dataclass
class GenerationSettings:
    max_new_tokens: int = 64
    temperature: float = 1.0
    method: str = "batch"  # temperature sampling for CALM: "exact" or "batch"
    candidates: int = 16  # N for the batch approximation
    seed: int = 0
    stop_at_eos: bool = True
    streams: list = field(default=None)  # one stream id per prompt; default 0, 1, 2, ...


def fill_to_chunks(ids, chunk_size, eos_id):
    """Left-fill a prompt with eos ids to a multiple of K (see the module docstring)."""
    missing = (-len(ids)) % chunk_size
    return [eos_id] * missing + list(ids)


def _left_pad(rows, pad_id):
    """Stack rows of different lengths, left-padded: (ids, attention_mask, position_ids)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
    return ids, mask


def _positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _check_prompts(prompts, context_limit, unit):
    if not prompts:
        raise CalmEdgeError("no prompts given")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise CalmEdgeError(f"prompt {i} is empty; give at least one token of text")
        if len(prompt) > context_limit:
            raise CalmEdgeError(
                f"prompt {i} is {len(prompt)} {unit} long but the model's context holds {context_limit}; "
                "shorten the prompt"
            )


@torch.no_grad()
def generate_calm(model, prompts, settings: GenerationSettings):
    """New token ids for each prompt (lists of ids), by the CALM vector loop."""
    config = model.config
    K, eos, pad = config.autoencoder.chunk_size, config.tokenizer.eos_id, config.tokenizer.pad_id
    limit = config.calm.backbone.max_positions
    sampler = TemperatureSampler(settings.temperature, settings.method, settings.candidates)
    filled = [fill_to_chunks(p, K, eos) for p in prompts]
    _check_prompts([[0] * (len(f) // K) for f in filled], limit, "chunks (K tokens each)")
    streams = settings.streams or list(range(len(prompts)))
    rngs = [RandomStream(settings.seed, s) for s in streams]

    chunk_rows = [[f[i:i + K] for i in range(0, len(f), K)] for f in filled]
    width = max(len(r) for r in chunk_rows)
    ids = torch.full((len(prompts), width * K), pad, dtype=torch.long)
    chunk_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, f in enumerate(filled):
        ids[i, width * K - len(f):] = torch.tensor(f)
        chunk_mask[i, width - len(f) // K:] = 1
    hidden, past = model.hidden_states(ids, chunk_mask, _positions(chunk_mask))
    hidden = hidden[:, -1]
    positions = chunk_mask.sum(-1) - 1

    outputs = [[] for _ in prompts]
    done = [False] * len(prompts)
    while not all(done):
        chunks = _sample_chunks(model, sampler, hidden, rngs, done, pad)
        for row, chunk in enumerate(chunks):
            if done[row]:
                continue
            room = settings.max_new_tokens - len(outputs[row])
            kept = chunk[:room]
            if settings.stop_at_eos and eos in kept:
                kept = kept[:kept.index(eos)]
                done[row] = True
            outputs[row].extend(kept)
            if len(outputs[row]) >= settings.max_new_tokens or positions[row] + 2 > limit:
                done[row] = True
        if all(done):
            break
        chunk_mask = torch.cat([chunk_mask, torch.ones(len(prompts), 1, dtype=torch.long)], dim=1)
        positions = positions + 1
        step_ids = torch.tensor(chunks, dtype=torch.long)
        hidden, past = model.hidden_states(step_ids, chunk_mask, positions[:, None], past)
        hidden = hidden[:, -1]
    return outputs


def _sample_chunks(model, sampler, hidden, rngs, done, pad):
    """One chunk per row (a pad chunk for finished rows), each row drawing from its own stream."""
    K, noise_size = model.chunk_size, model.noise_size
    active = [row for row in range(len(rngs)) if not done[row]]
    chunks = [[pad] * K for _ in rngs]
    if sampler.single_round():
        # Every row draws the same number of chunks: one head and one decoder call for the batch.
        count = sampler.draws_per_round()
        noise = np.stack([rngs[row].draw(count * noise_size).reshape(count, noise_size) for row in active])
        drawn = model.decode_tokens(model.sample_latents(hidden[active], torch.from_numpy(noise))).tolist()
        for row, row_chunks in zip(active, drawn):
            chunks[row] = list(sampler.choose([tuple(c) for c in row_chunks], rngs[row]))
        return chunks
    for row in active:  # the exact sampler: each row until its own acceptance
        def draw_chunks(count, h=hidden[row:row + 1], rng=rngs[row]):
            noise = torch.from_numpy(rng.draw(count * noise_size).reshape(1, count, noise_size))
            return [tuple(c) for c in model.decode_tokens(model.sample_latents(h, noise))[0].tolist()]

        chunks[row] = list(sampler.sample(draw_chunks, rngs[row]))
    return chunks


def sample_from_probs(probs, u):
    """The token at uniform `u` by inverse CDF over float64 probabilities."""
    cdf = np.cumsum(np.asarray(probs, dtype=np.float64))
    return int(min(np.searchsorted(cdf, u * cdf[-1], side="right"), len(cdf) - 1))


@torch.no_grad()
def generate_ar(model, prompts, settings: GenerationSettings):
    """New token ids for each prompt, token by token."""
    config = model.config
    eos, pad = config.tokenizer.eos_id, config.tokenizer.pad_id
    limit = config.ar.backbone.max_positions
    n = TemperatureSampler(settings.temperature, "exact").n  # validates T = 1/n
    _check_prompts(prompts, limit, "tokens")
    streams = settings.streams or list(range(len(prompts)))
    rngs = [RandomStream(settings.seed, s) for s in streams]

    ids, mask = _left_pad([list(p) for p in prompts], pad)
    logits, past = model.logits(ids, mask, _positions(mask))
    last = logits[:, -1]
    positions = mask.sum(-1) - 1
    outputs = [[] for _ in prompts]
    done = [False] * len(prompts)
    while True:
        probs = torch.softmax(last.double() * n, dim=-1).numpy()
        tokens = []
        for row, rng in enumerate(rngs):
            token = pad if done[row] else sample_from_probs(probs[row], rng.draw_one())
            tokens.append(token)
            if done[row]:
                continue
            if settings.stop_at_eos and token == eos:
                done[row] = True
                continue
            outputs[row].append(token)
            if len(outputs[row]) >= settings.max_new_tokens or positions[row] + 2 > limit:
                done[row] = True
        if all(done):
            return outputs
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=torch.long)], dim=1)
        positions = positions + 1
        logits, past = model.logits(torch.tensor(tokens)[:, None], mask, positions[:, None], past)
        last = logits[:, -1]


def generate(model, prompts, settings: GenerationSettings):
    """Dispatch on the model kind."""
    from calm_edge.models.calm import CalmModel

    return (generate_calm if isinstance(model, CalmModel) else generate_ar)(model, prompts, settings)
