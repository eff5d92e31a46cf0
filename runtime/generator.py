"""The autoregressive loop, shared by every backend: ONNX Runtime graphs or the PyTorch modules.

One loop, so the PyTorch reference and the deployed graphs can only differ in the numbers the
graphs compute, never in the logic around them. A backend (see `Backend`) runs the model's
pieces and keeps the key/value cache; this module owns prompts, sampling, randomness and
stopping.

CALM, one step per K tokens:
  1. A prompt whose length is not a multiple of K is left-filled with eos ids to the next
     multiple: in training a document starts after an eos at any offset within a chunk, so
     "eos, then the prompt" is what the model has seen. Prompts of a batch are then left-padded
     (attention mask 0, positions counted from each prompt's first real chunk).
  2. Prefill: one backbone call over all prompt chunks.
  3. Each step: the energy head turns noise into latent samples, the decoder maps them to
     chunks, temperature sampling picks one (`sampling.py`), one backbone call extends the cache.
  4. A sequence stops at eos (tokens from it on are dropped), at a stop sequence, after
     `max_new_tokens`, or when the context is full.

AR (the baseline, K = 1): softmax of logits * n (p^(1/T) for T = 1/n), then the token at the
sequence's next uniform by inverse CDF over float64 probabilities.

Randomness: sequence `row` of a batch draws from `RandomStream(seed, streams[row])` (default
stream = row), per step noise first, then sampling choices, as `sampling.py` documents.
"""
from dataclasses import dataclass, field

import numpy as np

from calm_edge.errors import CalmEdgeError
from calm_edge.runtime.rng import RandomStream
from calm_edge.runtime.sampling import TemperatureSampler


@dataclass
class GeneratorParams:
    """What to generate: the nouns of onnxruntime-genai's GeneratorParams, plus CALM's sampler."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    method: str = "batch"  # CALM temperature sampling: "batch" (approximation) or "exact"
    candidates: int = 16  # N chunks drawn per step by the batch approximation (T < 1)
    seed: int = 0
    stop_sequences: tuple = ()  # strings; generation stops before the first one (needs a tokenizer)
    stop_at_eos: bool = True
    streams: list = field(default=None)  # random stream per prompt; default 0, 1, 2, ...

    def check(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise CalmEdgeError(f"max_new_tokens={self.max_new_tokens!r} must be a positive whole number")
        return TemperatureSampler(self.temperature, self.method, self.candidates)


def fill_to_chunks(ids, chunk_size, eos_id):
    """Left-fill a prompt with eos ids to a multiple of K (see the module docstring)."""
    missing = (-len(ids)) % chunk_size
    return [eos_id] * missing + list(ids)


def left_pad(rows, chunk_size, pad_id):
    """(input_ids [B, S*K], attention_mask [B, S], position_ids [B, S]) for whole-chunk rows."""
    width = max(len(r) for r in rows) // chunk_size
    ids = np.full((len(rows), width * chunk_size), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, ids.shape[1] - len(row):] = row
        mask[i, width - len(row) // chunk_size:] = 1
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    return ids, mask, positions


def sample_from_probs(probs, u):
    """The index at uniform `u` by inverse CDF over float64 probabilities."""
    cdf = np.cumsum(np.asarray(probs, dtype=np.float64))
    return int(min(np.searchsorted(cdf, u * cdf[-1], side="right"), len(cdf) - 1))


def softmax_power(logits, n):
    """p^n normalised, from logits: the distribution of temperature 1/n."""
    z = np.asarray(logits, dtype=np.float64) * n
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class Backend:
    """What the loop needs from a model; `calm_edge.runtime.model` and `calm_edge.generate` implement it.

    Attributes: kind ("calm" or "ar"), chunk_size (1 for AR), eos_id, pad_id, noise_size (CALM),
    max_context (positions: vectors for CALM, tokens for AR).
    """

    def start(self, input_ids, attention_mask, position_ids):
        """Prefill; keep the cache. Returns the last position's hidden [B, H] (CALM) or logits [B, V] (AR)."""
        raise NotImplementedError

    def advance(self, input_ids, position_ids):
        """One step on [B, K] new tokens, extending mask and cache. Returns like `start`."""
        raise NotImplementedError

    def sample_latents(self, hidden, noise):
        """hidden [b, H], noise [b, N, noise_size] -> latents [b, N, latent]."""
        raise NotImplementedError

    def decode(self, latents):
        """latents [M, latent] -> token ids [M, K]."""
        raise NotImplementedError


def check_prompts(prompts, chunk_size, eos_id, max_context):
    if not prompts:
        raise CalmEdgeError("no prompts given; pass at least one prompt")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise CalmEdgeError(f"prompt {i} is empty; give at least one token of text")
        positions = len(fill_to_chunks(prompt, chunk_size, eos_id)) // chunk_size
        if positions >= max_context:
            unit = "chunks of K tokens" if chunk_size > 1 else "tokens"
            raise CalmEdgeError(
                f"prompt {i} takes {positions} {unit} but the model's context holds {max_context} "
                "(including at least one to generate); shorten the prompt"
            )


def generate_tokens(backend, prompts, params: GeneratorParams, on_step=None):
    """New token ids for each prompt (lists of ids); see `iterate_steps`."""
    outputs = [[] for _ in prompts]
    for new_ids in iterate_steps(backend, prompts, params, on_step):
        for row, ids in enumerate(new_ids):
            outputs[row].extend(ids)
    return outputs


def iterate_steps(backend, prompts, params: GeneratorParams, on_step=None):
    """Generate, yielding after every step the list of each row's newly accepted token ids.

    `on_step(row, new_ids)`, if given, sees each row's new tokens first; returning False stops
    that row (the text layer uses it for stop sequences). All checks run before the first step.
    """
    sampler = params.check()
    K, eos, pad = backend.chunk_size, backend.eos_id, backend.pad_id
    check_prompts(prompts, K, eos, backend.max_context)
    streams = params.streams if params.streams is not None else list(range(len(prompts)))
    if len(streams) != len(prompts):
        raise CalmEdgeError(f"{len(streams)} random streams for {len(prompts)} prompts; give one per prompt")
    rngs = [RandomStream(params.seed, s) for s in streams]

    rows = [fill_to_chunks(p, K, eos) for p in prompts]
    ids, mask, positions = left_pad(rows, K, pad)
    last = backend.start(ids, mask, positions)
    position = positions[:, -1].copy()

    outputs = [[] for _ in prompts]
    done = [False] * len(prompts)
    while True:
        new_ids = [[] for _ in prompts]
        if backend.kind == "calm":
            chunks = _sample_chunks(backend, sampler, last, rngs, done)
        else:
            chunks = _sample_tokens(last, sampler.n, rngs, done, pad)
        for row, chunk in enumerate(chunks):
            if done[row]:
                continue
            kept = chunk[:params.max_new_tokens - len(outputs[row])]
            if params.stop_at_eos and eos in kept:
                kept = kept[:kept.index(eos)]
                done[row] = True
            outputs[row].extend(kept)
            new_ids[row] = kept
            if on_step is not None and kept:
                done[row] = on_step(row, kept) is False or done[row]
            if len(outputs[row]) >= params.max_new_tokens or position[row] + 1 >= backend.max_context:
                done[row] = True
        yield new_ids
        if all(done):
            return
        position = position + 1
        step_ids = np.array([chunk if not d else [pad] * K for chunk, d in zip(chunks, done)], dtype=np.int64)
        last = backend.advance(step_ids, position[:, None])


def _sample_chunks(backend, sampler, hidden, rngs, done):
    """One chunk per row (a pad chunk for finished rows), each row drawing from its own stream."""
    K, noise_size, pad = backend.chunk_size, backend.noise_size, backend.pad_id
    active = [row for row in range(len(rngs)) if not done[row]]
    chunks = [[pad] * K for _ in rngs]
    if sampler.single_round():
        # Every row draws the same number of chunks: one head and one decoder call for the batch.
        count = sampler.draws_per_round()
        noise = np.stack([rngs[row].draw(count * noise_size).reshape(count, noise_size) for row in active])
        latents = backend.sample_latents(hidden[active], noise)
        drawn = backend.decode(latents.reshape(-1, latents.shape[-1])).reshape(len(active), count, K).tolist()
        for row, row_chunks in zip(active, drawn):
            chunks[row] = list(sampler.choose([tuple(c) for c in row_chunks], rngs[row]))
        return chunks
    for row in active:  # the exact sampler: each row until its own acceptance
        def draw_chunks(count, h=hidden[row:row + 1], rng=rngs[row]):
            noise = rng.draw(count * noise_size).reshape(1, count, noise_size)
            latents = backend.sample_latents(h, noise)[0]
            return [tuple(c) for c in backend.decode(latents).tolist()]

        chunks[row] = list(sampler.sample(draw_chunks, rngs[row]))
    return chunks


def _sample_tokens(logits, n, rngs, done, pad):
    probs = softmax_power(logits, n)
    return [[pad] if done[row] else [sample_from_probs(probs[row], rngs[row].draw_one())] for row in range(len(rngs))]
