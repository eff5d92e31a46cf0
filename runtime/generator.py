"""The autoregressive loop, step by step: `Generator`, shared by every model (ONNX graphs or PyTorch).

    generator = Generator(model, [prompt_ids], GeneratorParams(max_new_tokens=64, seed=1))
    while not generator.done:
        new_ids = generator.step()          # each row's newly accepted token ids
    generator.tokens, generator.stop_reasons, generator.trace()

The caller owns the loop, as with onnxruntime-genai's Generator: it can look at each step's
tokens, stop a row (`stop(row)`, e.g. at a stop sequence), time the steps or count the calls.
`generate_tokens` and the text API (`text_generation.py`) are built on it, and so are the
benchmarks, evaluation and export validation: one loop, so the PyTorch reference and the
deployed graphs can only differ in the numbers the graphs compute, never in the logic around
them.

A model is what the loop needs to know and one method: `kind` ("calm" or "ar"), `chunk_size`
(K; 1 for AR), `eos_id`, `pad_id`, `noise_size` (CALM), `max_context` (positions: vectors for
CALM, tokens for AR), `prompt_fill` ("left-eos" when absent; see 1. below), and
`new_state(batch, capacity)`, which returns the generation's state:
the runtime's `StepState` over ONNX Runtime (`step_state.py`) or the reference's
`TorchStepState` over the PyTorch modules (`calm_edge.export.reference`). A state keeps the
attention mask and the key/value cache and runs the graphs:

    start(input_ids, attention_mask, position_ids)  prefill; returns the last position's hidden
                                                    [B, H] (CALM) or logits [B, V] (AR)
    advance(input_ids, position_ids)                one step on [B, K] new tokens; returns as start
    sample_latents(hidden, noise)                   [b, H], [b, N, noise_size] -> [b, N, latent]
    decode(latents)                                 [M, latent] -> token ids [M, K]
    timings                                         {graph: seconds spent in its runs}

CALM, one step per K tokens:
  1. A prompt whose length is not a multiple of K is filled to the next multiple, as the model
     expects (`prompt_fill`): calm-edge's models with eos ids on the left (in training a document
     starts after an eos at any offset within a chunk, so "eos, then the prompt" is what the
     model has seen), the released CALM models with pad ids on the right, inside the last chunk,
     as their own `generate` does. Prompts of a batch are then left-padded (attention mask 0,
     positions counted from each prompt's first real chunk).
  2. Prefill: one backbone call over all prompt chunks (at the first `step()`).
  3. Each step: the energy head turns noise into latent samples, the decoder maps them to
     chunks, temperature sampling picks one (`sampling.py`); the next step first extends the
     cache with one backbone call on the chosen chunks.
  4. A row stops at eos (tokens from it on are dropped), after `max_new_tokens`, when the
     context is full, or when the caller stops it; `stop_reasons` says which.

AR (the baseline, K = 1): softmax of logits * n (p^(1/T) for T = 1/n), then the token at the
sequence's next uniform by inverse CDF over float64 probabilities.

Randomness: row `r` of a batch draws from `RandomStream(seed, streams[r])` (default stream =
r), per step noise first, then sampling choices, as `sampling.py` documents.

The cache is sized once, by one rule that the C++ runtime shares (`cache_capacity`): the
padded prompt plus one position per step of the row that can run longest.
"""
import time
from dataclasses import dataclass, field

import numpy as np

from calm_edge.errors import CalmEdgeError
from calm_edge.runtime import limits
from calm_edge.runtime.rng import RandomStream
from calm_edge.runtime.sampling import TemperatureSampler, lazy_batch_choice
from calm_edge.runtime.timing import Trace

STOP_REASONS = ("eos", "max_new_tokens", "context", "stop_sequence")


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
        """Check the values; returns the TemperatureSampler they describe."""
        limits.check_whole("max_new_tokens", self.max_new_tokens, 1, limits.MAX_NEW_TOKENS,
                           " (generation also ends when the model's context is full)")
        limits.check_whole("candidates", self.candidates, 1, limits.MAX_CANDIDATES)
        limits.check_seed(self.seed)
        if isinstance(self.stop_sequences, str) or not all(isinstance(s, str) and s for s in self.stop_sequences):
            raise CalmEdgeError(f"stop_sequences (--stop) {self.stop_sequences!r} must be a list of non-empty strings")
        for stream in self.streams or ():
            limits.check_whole("streams", stream, 0, limits.SEED_MAX, is_option=False)
        return TemperatureSampler(self.temperature, self.method, self.candidates)


def fill_to_chunks(ids, chunk_size, eos_id, fill="left-eos", pad_id=None):
    """A prompt filled to a multiple of K: eos ids on the left, or pad ids on the right (see the module docstring)."""
    missing = (-len(ids)) % chunk_size
    if fill == "right-pad":
        return list(ids) + [pad_id] * missing
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


def cache_capacity(rows, chunk_size, max_new_tokens, max_context):
    """Cache positions a generation can reach: the padded prompt plus the steps of its longest row.

    `rows` are the filled prompts (whole chunks). A row runs at most ceil(max_new_tokens / K)
    steps, and at most until its own positions fill the context; each step adds one position to
    every row's cache, so rows shorter than the longest can take the cache past `max_context`.
    """
    width = max(len(r) for r in rows) // chunk_size
    steps_for_tokens = -(-max_new_tokens // chunk_size)
    most_steps = max(min(steps_for_tokens, max_context - len(r) // chunk_size + 1) for r in rows)
    return width + most_steps


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


def check_prompts(prompts, chunk_size, max_context):
    if not prompts:
        raise CalmEdgeError("no prompts given; pass at least one prompt")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise CalmEdgeError(f"prompt {i} is empty; give at least one token of text")
        positions = -(-len(prompt) // chunk_size)
        if positions >= max_context:
            unit = "chunks of K tokens" if chunk_size > 1 else "tokens"
            raise CalmEdgeError(
                f"prompt {i} takes {positions} {unit} but the model's context holds {max_context} "
                "(including at least one to generate); shorten the prompt"
            )


def accept_chunk(tokens, chunk, params, model, position):
    """What a row keeps of its new chunk, and why it stops (None while it runs on).

    The chunk is cut at max_new_tokens and before eos; a row also stops when its next position
    would leave the context. Shared by `Generator` and the runtime's `Engine`, so both stop
    rows alike.
    """
    kept = list(chunk[:params.max_new_tokens - len(tokens)])
    if params.stop_at_eos and model.eos_id in kept:
        return kept[:kept.index(model.eos_id)], "eos"
    if len(tokens) + len(kept) >= params.max_new_tokens:
        return kept, "max_new_tokens"
    if position + 1 >= model.max_context:
        return kept, "context"
    return kept, None


class Generator:
    """One batch of prompts (lists of token ids) generated step by step; see the module docstring.

    `sampler` replaces the TemperatureSampler that `params` describes (a study of samplers, say);
    every check runs when the Generator is made, before any graph runs.
    """

    def __init__(self, model, prompts, params: GeneratorParams = None, sampler: TemperatureSampler = None):
        self._began = time.perf_counter()  # the trace's clock: checks, allocation and prefill count
        self.model, self.params = model, params or GeneratorParams()
        checked = self.params.check()
        self.sampler = sampler or checked
        K, eos, pad = model.chunk_size, model.eos_id, model.pad_id
        prompts = [list(p) for p in prompts]
        check_prompts(prompts, K, model.max_context)
        streams = self.params.streams if self.params.streams is not None else list(range(len(prompts)))
        if len(streams) != len(prompts):
            raise CalmEdgeError(f"{len(streams)} random streams for {len(prompts)} prompts; give one per prompt")
        self.rngs = [RandomStream(self.params.seed, s) for s in streams]
        if model.kind == "calm":
            limits.check_draws(model, len(prompts), self.sampler.draws_per_call(),
                               f"candidates={self.params.candidates} at T = 1/{self.sampler.n}")

        fill = getattr(model, "prompt_fill", "left-eos")
        rows = [fill_to_chunks(p, K, eos, fill, pad) for p in prompts]
        self._prompt = left_pad(rows, K, pad)
        self.capacity = cache_capacity(rows, K, self.params.max_new_tokens, model.max_context)
        self.state = model.new_state(len(rows), self.capacity)
        self.position = self._prompt[2][:, -1].copy()  # each row's last position so far
        self.tokens = [[] for _ in rows]  # the tokens accepted so far, per row
        self.stop_reasons = [None] * len(rows)  # one of STOP_REASONS once a row is done
        self._last = None  # the step graph's last output: hidden states (CALM) or logits (AR)
        self._chunks = None  # the chunks the last step chose, fed to the backbone at the next
        self._step_ends, self._prefill_seconds, self._graphs_at_first = [], 0.0, {}

    @property
    def last_output(self):
        """The step graph's output at the latest step: each row's hidden state [B, H] (CALM) or logits [B, V] (AR)."""
        return self._last

    @property
    def done(self):
        """Whether every row has stopped."""
        return all(reason is not None for reason in self.stop_reasons)

    def stop(self, row, reason="stop_sequence"):
        """Stop `row` with `reason`: the caller's reason wins over the generator's for its last step."""
        self.stop_reasons[row] = reason

    def step(self):
        """Run one step; returns each row's newly accepted token ids ([] for a stopped row)."""
        if self.done:
            raise CalmEdgeError("the generation is finished: every row has stopped; make a new Generator")
        K, pad = self.model.chunk_size, self.model.pad_id
        running = [reason is None for reason in self.stop_reasons]
        if self._last is None:
            self._last = self.state.start(*self._prompt)
            self._prefill_seconds = sum(self.state.timings.values())
        else:
            self.position = self.position + 1
            ids = np.array([chunk if run else [pad] * K for chunk, run in zip(self._chunks, running)], dtype=np.int64)
            self._last = self.state.advance(ids, self.position[:, None])
        done = [not run for run in running]
        if self.model.kind == "calm":
            self._chunks = sample_chunks(self.state, self.model, self.sampler, self._last, self.rngs, done)
        else:
            self._chunks = sample_tokens(self._last, self.sampler.n, self.rngs, done, pad)
        new_ids = [[] for _ in self.tokens]
        for row, chunk in enumerate(self._chunks):
            if running[row]:
                new_ids[row] = self._accept(row, chunk)
        self._step_ends.append(time.perf_counter())
        if len(self._step_ends) == 1:
            self._graphs_at_first = dict(self.state.timings)
        return new_ids

    def __iter__(self):
        """Each step's new ids until every row has stopped (`for new_ids in generator`)."""
        while not self.done:
            yield self.step()

    def _accept(self, row, chunk):
        """Append a row's chunk (see `accept_chunk`); set its stop reason when done."""
        kept, reason = accept_chunk(self.tokens[row], chunk, self.params, self.model, self.position[row])
        self.tokens[row].extend(kept)
        if self.stop_reasons[row] is None:
            self.stop_reasons[row] = reason
        return kept

    def trace(self):
        """The timings of the steps so far, as a `timing.Trace` (seconds; the first row's tokens)."""
        if not self._step_ends:
            raise CalmEdgeError("no step has run yet; call step() first")
        graphs = {name: seconds - self._graphs_at_first.get(name, 0.0) for name, seconds in self.state.timings.items()}
        return Trace(total_s=self._step_ends[-1] - self._began, ttft_s=self._step_ends[0] - self._began,
                     prefill_s=self._prefill_seconds, step_s=np.diff(self._step_ends).tolist(),
                     tokens_per_step=self.model.chunk_size, new_tokens=len(self.tokens[0]), graphs_s=graphs)


def generate_tokens(model, prompts, params: GeneratorParams = None, sampler=None):
    """New token ids for each prompt (lists of ids): a Generator run to the end."""
    generator = Generator(model, prompts, params, sampler)
    for _ in generator:
        pass
    return generator.tokens


def sample_chunks(state, model, sampler, hidden, rngs, done):
    """One chunk per row (a pad chunk for finished rows), each row drawing from its own stream."""
    K, noise_size, pad = model.chunk_size, model.noise_size, model.pad_id
    active = [row for row in range(len(rngs)) if not done[row]]
    chunks = [[pad] * K for _ in rngs]
    if sampler.single_round():
        # Every row draws the same number of chunks: one head and one decoder call for the batch.
        count = sampler.draws_per_round()
        noise = np.stack([rngs[row].draw(count * noise_size).reshape(count, noise_size) for row in active])
        latents = state.sample_latents(hidden[active], noise)
        if sampler.n > 1 and getattr(state, "lazy_decoding", False):
            for row, chunk in zip(active, choose_lazily(state, sampler, latents, [rngs[row] for row in active], K)):
                chunks[row] = list(chunk)
            return chunks
        drawn = state.decode(latents.reshape(-1, latents.shape[-1])).reshape(len(active), count, K).tolist()
        for row, row_chunks in zip(active, drawn):
            chunks[row] = list(sampler.choose([tuple(c) for c in row_chunks], rngs[row]))
        return chunks
    for row in active:  # the exact sampler: each row until its own acceptance
        def draw_chunks(count, h=hidden[row:row + 1], rng=rngs[row]):
            noise = rng.draw(count * noise_size).reshape(1, count, noise_size)
            latents = state.sample_latents(h, noise)[0]
            return [tuple(c) for c in state.decode(latents).tolist()]

        chunks[row] = list(sampler.sample(draw_chunks, rngs[row]))
    return chunks


def choose_lazily(state, sampler, latents, rngs, K):
    """Each row's batch-approximation chunk from its candidates' latents [rows, N, latent], lazily.

    The decoder runs once on every candidate; its head then only on the positions that
    `sampling.lazy_batch_choice` asks for, every row's requests of a round in one call (at most
    two calls a step). The choice uniforms are drawn first, in row order: decoding draws no
    randomness, so each row's stream gives the values it gives plain decoding.
    """
    rows, count = latents.shape[:2]
    states = state.decoder_states(latents.reshape(rows * count, -1))
    states = states.reshape(rows * count * K, -1)  # row-major: (row, candidate, position)
    choices = [lazy_batch_choice(count, K, sampler.n, rng.draw_one()) for rng in rngs]
    requests = {row: next(choice) for row, choice in enumerate(choices)}
    chosen = [None] * rows
    while requests:
        wanted = [(row * count + j) * K + p for row, pairs in requests.items() for j, p in pairs]
        token_ids = state.head_tokens(states[wanted]).tolist()
        following, at = {}, 0
        for row, pairs in requests.items():
            try:
                following[row] = choices[row].send(token_ids[at:at + len(pairs)])
            except StopIteration as finished:
                chosen[row] = finished.value
            at += len(pairs)
        requests = following
    return chosen


def sample_tokens(logits, n, rngs, done, pad):
    probs = softmax_power(logits, n)
    return [[pad] if done[row] else [sample_from_probs(probs[row], rngs[row].draw_one())] for row in range(len(rngs))]
