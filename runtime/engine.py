"""`Engine`: in-flight (continuous) batching over one `Model`, for servers and applications.

    engine = Engine(model, max_batch=16)
    first = engine.add_request(prompt_ids, GeneratorParams(max_new_tokens=64, seed=1))
    while engine.has_work:
        for output in engine.step():          # RequestOutput: request_id, new_ids, stop_reason
            ...                               # a request may join (add_request) or leave (cancel) here

A `Generator` runs one batch from start to end: its rows are padded once and the batch runs
until its longest row ends. An `Engine` keeps one running batch for its whole life instead. A
request joins it between two steps and leaves it at the step it ends, so a short request never
waits for a long one:

- `add_request` checks the request (the same checks as a Generator's) and queues it.
- `step()` does one of two things. When requests are queued and rows are free, it admits
  them: the newcomers' prompts are prefilled together, in one backbone call of their own, each
  newcomer's cache is placed into a row of the batch's cache (`kv_cache.SlotCache`),
  right-aligned with the others, its mask zero where it has no entries and its positions its
  own, and each samples its first chunk; the running rows wait for this one step, so that a
  newcomer's first tokens take one prefill, not a prefill after a decode step of the whole
  batch (prefill first, as vLLM schedules). Otherwise the running rows advance: one backbone
  call on the chunks they chose at the previous step, then each samples its next chunk (CALM)
  or token (AR). A row that ended (eos, max_new_tokens, the context, or `cancel`) leaves the
  batch at once: the last row moves into its place, so the graphs always run on exactly the
  rows that are running.
- `cancel(request_id)` ends a request: a queued one leaves the queue, a running one its row.

Each request draws from its own `RandomStream(seed, stream)` (stream 0 unless the params name
one), in the order the randomness contract fixes, so its tokens are those the same request gives
alone through a Generator, whatever joins or leaves the batch around it (tests check this). Rows
may use different samplers (temperature, method, candidates): rows that share one are sampled
together.

`batching="static"` is the classic static batch, what a `Generator` does, kept as the baseline
that the serving benchmark measures continuous batching against: newcomers are admitted only
into an empty batch, and a row that ended stays in it (fed pad chunks, masked, not sampled)
until the batch's last row ends.

The cache lives in host memory (numpy), where the engine can move rows between steps; with the
cuda or tensorrt provider the step graph then reads it from the host at each step.
"""
import itertools
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from calm_edge.errors import CalmEdgeError
from calm_edge.runtime.generator import (GeneratorParams, accept_chunk, check_prompts, fill_to_chunks, left_pad,
                                         sample_chunks, sample_tokens)
from calm_edge.runtime import limits
from calm_edge.runtime.kv_cache import SlotCache
from calm_edge.runtime.rng import RandomStream
from calm_edge.runtime.step_state import TimedSampling

BATCHING = ("continuous", "static")


@dataclass
class RequestOutput:
    """What one step did for one request: its new token ids, and why it ended once it has."""

    request_id: object
    new_ids: list
    stop_reason: str = None  # None while it runs; one of generator.STOP_REASONS or "cancelled"

    @property
    def finished(self):
        return self.stop_reason is not None


@dataclass
class _Request:
    id: object
    prompt: list  # filled to whole chunks
    params: GeneratorParams
    sampler: object
    rng: RandomStream
    tokens: list = field(default_factory=list)
    stop_reason: str = None
    position: int = 0  # the row's last position so far
    chunk: list = None  # the chunk chosen at the last step, fed to the backbone at the next
    reported: bool = False  # whether an output has told the caller that it ended


class Engine(TimedSampling):
    """One running batch of up to `max_batch` requests over `model`; see the module docstring."""

    def __init__(self, model, max_batch=16, batching="continuous"):
        if batching not in BATCHING:
            raise CalmEdgeError(f"batching={batching!r}: choose one of {', '.join(BATCHING)}")
        if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
            raise CalmEdgeError(f"max_batch={max_batch!r} must be a whole number of at least 1")
        self.model, self.max_batch, self.batching = model, max_batch, batching
        manifest = model.manifest
        limits.check_batch(manifest, max_batch, model.max_context + 1, 1, f"max_batch={max_batch}")
        self._session = model.sessions[manifest.step_graph]
        # A row spans at most max_context positions; one more column is the step being computed.
        self.cache = SlotCache(manifest.past_names, manifest.present_names, max_batch, manifest.num_kv_heads,
                               manifest.head_dim, model.max_context + 1, model.cache_dtype)
        self.mask = np.zeros((0, 0), np.int64)
        self.rows = []  # the running requests, in the cache's row order
        self.queue = deque()  # requests waiting for a row
        self._ids = itertools.count()
        self.timings = {name: 0.0 for name in model.sessions if name != "decoder_head"}  # the head counts as the decoder

    # ----- the public API ------------------------------------------------------------------

    def add_request(self, prompt_ids, params: GeneratorParams = None, request_id=None):
        """Queue a request (a prompt's token ids); returns its id. Every check runs here, before it is queued."""
        params = params or GeneratorParams()
        sampler = params.check()
        if self.model.kind == "calm":  # every row may draw this request's candidates in one step
            limits.check_draws(self.model, self.max_batch, sampler.draws_per_call(),
                               f"candidates={params.candidates} at T = 1/{sampler.n}")
        prompt = [int(t) for t in prompt_ids]
        check_prompts([prompt], self.model.chunk_size, self.model.max_context)
        streams = params.streams if params.streams is not None else [0]
        if len(streams) != 1:
            raise CalmEdgeError(f"{len(streams)} random streams for one request; give one stream (or none)")
        request_id = next(self._ids) if request_id is None else request_id
        if any(r.id == request_id for r in itertools.chain(self.rows, self.queue)):
            raise CalmEdgeError(f"request id {request_id!r} is already in use; give each request its own id")
        model = self.model
        filled = fill_to_chunks(prompt, model.chunk_size, model.eos_id, getattr(model, "prompt_fill", "left-eos"),
                                model.pad_id)
        self.queue.append(_Request(request_id, filled, params, sampler, RandomStream(params.seed, streams[0])))
        return request_id

    def cancel(self, request_id):
        """End a request now; returns whether it was queued or running. A running one leaves at the next step."""
        for request in itertools.chain(self.queue, self.rows):
            if request.id == request_id and request.stop_reason is None:
                request.stop_reason = "cancelled"
                return True
        return False

    @property
    def has_work(self):
        """Whether a step would do anything: requests running, queued or cancelled but not yet reported."""
        return bool(self.rows or self.queue)

    @property
    def running(self):
        return len(self.rows)

    @property
    def waiting(self):
        return sum(1 for r in self.queue if r.stop_reason is None)

    def step(self):
        """One step; returns a `RequestOutput` for every request it advanced or ended.

        A step either admits newcomers (their prefill and first tokens, while the running rows
        wait: a newcomer's time to first token is then one prefill, not a prefill after a
        decode step of the whole batch) or advances the running rows by one chunk.
        """
        outputs = [RequestOutput(r.id, [], r.stop_reason) for r in self.queue if r.stop_reason]
        self.queue = deque(r for r in self.queue if not r.stop_reason)
        for request in self.rows:
            if request.stop_reason and not request.reported:  # cancelled since the last step
                request.reported = True
                outputs.append(RequestOutput(request.id, [], request.stop_reason))
        self._retire()
        newcomers = self._admit()
        if newcomers:
            first = len(self.rows)
            last = self._prefill(newcomers)
            indices = range(first, len(self.rows))
        else:
            live = [i for i, r in enumerate(self.rows) if not r.stop_reason]
            if not live:
                return outputs
            last = self._advance()[live]
            indices = live
        for index, chunk in zip(indices, self._sample(last, indices)):
            request = self.rows[index]
            kept, reason = accept_chunk(request.tokens, chunk, request.params, self.model, request.position)
            request.tokens.extend(kept)
            request.chunk, request.stop_reason, request.reported = chunk, reason, reason is not None
            outputs.append(RequestOutput(request.id, kept, reason))
        self._retire()
        return outputs

    # ----- the batch -------------------------------------------------------------------------

    def _retire(self):
        """Ended rows leave the batch: at once (continuous), or all together when the last ends (static)."""
        ended = [i for i, r in enumerate(self.rows) if r.stop_reason]
        if self.batching == "continuous" or len(ended) == len(self.rows):
            self._leave(ended)

    def _leave(self, indices):
        """Remove rows from the batch: each gap is filled by the last row, so rows stay packed."""
        for index in sorted(indices, reverse=True):
            last = len(self.rows) - 1
            if index != last:
                self.cache.move_row(last, index)
                self.mask[index] = self.mask[last]
                self.rows[index] = self.rows[last]
            self.rows.pop()
            self.cache.rows -= 1
        self.mask = self.mask[:len(self.rows)]
        if not self.rows:
            self.cache.rows, self.cache.length, self.mask = 0, 0, np.zeros((0, 0), np.int64)

    def _admit(self):
        """The queued requests that get a row at this step (static batching: only into an empty batch)."""
        if self.batching == "static" and self.rows:
            return []
        free = self.max_batch - len(self.rows)
        return [self.queue.popleft() for _ in range(min(free, len(self.queue)))]

    def _advance(self):
        """One backbone call for every row on the chunk it chose; returns the rows' step output."""
        # Drop the left columns that no running row attends, when the cache is full or they are many.
        # The ended rows a static batch keeps do not count: their output is never read, and their
        # columns would otherwise hold the cache past the context.
        live = [i for i, r in enumerate(self.rows) if not r.stop_reason]
        used = self.mask[live].any(axis=0)
        first = int(used.argmax()) if used.any() else self.mask.shape[1]
        if first and (self.cache.length + 1 > self.cache.capacity or first >= self.cache.length // 4):
            self.cache.resize(self.cache.length - first)
            self.mask = self.mask[:, first:]
        for request in self.rows:
            request.position += 1
        pad = [self.model.pad_id] * self.model.chunk_size  # for the ended rows a static batch keeps
        ids = np.array([pad if r.stop_reason else r.chunk for r in self.rows], np.int64)
        positions = np.array([[r.position] for r in self.rows], np.int64)
        self.mask = np.concatenate([self.mask, np.ones((len(self.rows), 1), np.int64)], axis=1)
        return self._run(ids, self.mask, positions)

    def _run(self, input_ids, mask, position_ids, presents=None):
        """One step-graph call. The cache is the batch's (`SlotCache`), or, for a prefill from an empty
        cache, `presents` {past name: array [rows, kv_heads, S, head_dim]} that receive the new entries."""
        model, manifest = self.model, self.model.manifest
        binding = self._session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(mask))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids))
        rows, new_positions = position_ids.shape
        width = manifest.step_output_width
        shape = (rows, width) if model.kind == "ar" else (rows, new_positions, width)
        last = np.empty(shape, model.step_output_dtype)
        binding.bind_output(manifest.step_output, "cpu", 0, last.dtype, list(shape), last.ctypes.data)
        if presents is None:
            total = self.cache.bind(binding, new_positions)
        else:
            empty = np.empty(1, self.cache.dtype)  # a past of length 0 still needs an address
            for past, present in zip(manifest.past_names, manifest.present_names):
                values = presents[past]
                binding.bind_input(past, "cpu", 0, values.dtype, [rows, values.shape[1], 0, values.shape[3]],
                                   empty.ctypes.data)
                binding.bind_output(present, "cpu", 0, values.dtype, list(values.shape), values.ctypes.data)
        began = time.perf_counter()
        self._session.run_with_iobinding(binding)
        self.timings[manifest.step_graph] += time.perf_counter() - began
        if presents is None:
            self.cache.commit(total)
        return last[:, -1] if last.ndim == 3 else last

    def _prefill(self, newcomers):
        """Prefill the newcomers together and place their caches into rows at the end of the batch."""
        model, manifest = self.model, self.model.manifest
        ids, mask, positions = left_pad([r.prompt for r in newcomers], model.chunk_size, model.pad_id)
        width = mask.shape[1]
        entries = {name: np.empty((len(newcomers), manifest.num_kv_heads, width, manifest.head_dim), self.cache.dtype)
                   for name in manifest.past_names}
        hidden = self._run(ids, mask, positions, presents=entries)
        if width > self.cache.length:  # newcomers longer than the batch: columns are added on the left
            self.cache.resize(width)
            self.mask = np.concatenate([np.zeros((len(self.rows), width - self.mask.shape[1]), np.int64), self.mask],
                                       axis=1)
        rows = np.zeros((len(newcomers), self.cache.length), np.int64)
        rows[:, self.cache.length - width:] = mask
        for i, request in enumerate(newcomers):
            self.cache.place(len(self.rows), {name: values[i] for name, values in entries.items()})
            request.position = int(positions[i, -1])
            self.rows.append(request)
        self.mask = np.concatenate([self.mask, rows]) if self.mask.size else rows
        return hidden

    def _sample(self, last, indices):
        """The next chunk (CALM) or token (AR) of the rows `indices`, whose step outputs are `last`.

        Rows that share a sampler (temperature, method, candidates) are sampled together.
        """
        indices = list(indices)
        chunks = [None] * len(indices)
        groups = {}
        for position, index in enumerate(indices):
            p = self.rows[index].params
            groups.setdefault((p.temperature, p.method, p.candidates), []).append(position)
        for members in groups.values():
            requests = [self.rows[indices[m]] for m in members]
            rngs, done = [r.rng for r in requests], [False] * len(members)
            if self.model.kind == "calm":
                picked = sample_chunks(self, self.model, requests[0].sampler, last[members], rngs, done)
            else:
                picked = sample_tokens(last[members], requests[0].sampler.n, rngs, done, self.model.pad_id)
            for m, chunk in zip(members, picked):
                chunks[m] = chunk
        return chunks
