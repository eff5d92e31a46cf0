"""`StepState`: one generation's attention mask, key/value cache and graph timings on a shared `Model`.

The state a `Generator` advances (see generator.py for the interface). The cache lives in
buffers preallocated once for the generation on the provider's device (`kv_cache.py`), bound
to the step graph through IO binding, so no step allocates a cache or copies it out to numpy.
`timings` accumulates the seconds spent in each graph's run, so a benchmark can tell the
graphs' time from the loop's own (sampling, bookkeeping, Python).
"""
import time

import numpy as np

from calm_edge.runtime.kv_cache import KVCache


class TimedSampling:
    """The energy-head and decoder calls of a step, their seconds added to `self.timings`.

    Shared by `StepState` and the runtime's `Engine`: both have `self.model` and `self.timings`.
    """

    def _timed(self, stage, call, *args):
        began = time.perf_counter()
        result = call(*args)
        self.timings[stage] += time.perf_counter() - began
        return result

    def sample_latents(self, hidden, noise):
        return self._timed("energy_head", self.model.sample_latents, hidden, noise)

    def decode(self, latents):
        return self._timed("decoder", self.model.decode, latents)

    # A split decoder's two graphs, for lazy decoding (sampling.lazy_batch_choice); the head's
    # time counts as the decoder's, so timings keep one entry per stage.

    @property
    def lazy_decoding(self):
        """Whether the decoder head may be sent only the positions a step needs (a split, row-independent head)."""
        return self.model.manifest.decoder_head_rows_independent

    def decoder_states(self, latents):
        return self._timed("decoder", self.model.decoder_states, latents)

    def head_tokens(self, states):
        self.head_calls, self.head_rows = self.head_calls + 1, self.head_rows + len(states)
        return self._timed("decoder", self.model.head_tokens, states)

    head_calls = head_rows = 0  # lazy decoding's head calls and the positions sent (benchmarks report them)


class StepState(TimedSampling):
    """The per-generation state of a runtime `Model`: `model.new_state(batch, capacity)` makes one."""

    def __init__(self, model, batch, capacity):
        self.model = model
        manifest = model.manifest
        # Looked up once: a step of a small model takes a few hundred microseconds.
        self.step_graph, self.session = manifest.step_graph, model.sessions[manifest.step_graph]
        self.output_name, self.output_width, self.is_ar = manifest.step_output, manifest.step_output_width, model.kind == "ar"
        self.mask = None
        self.cache = KVCache(model.ort, model.manifest.past_names, model.manifest.present_names, batch=batch,
                             kv_heads=model.manifest.num_kv_heads, head_dim=model.manifest.head_dim, capacity=capacity,
                             dtype=model.cache_dtype, device=model.cache_device)
        self.timings = {name: 0.0 for name in model.sessions if name != "decoder_head"}

    def _run(self, input_ids, position_ids):
        session = self.session
        binding = session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(self.mask, np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, np.int64))
        # The step's result goes straight into a host array: reading it back through
        # get_outputs() would wrap every bound output, the cache included, each step.
        batch, new_positions = position_ids.shape
        shape = (batch, self.output_width) if self.is_ar else (batch, new_positions, self.output_width)
        last = np.empty(shape, self.model.step_output_dtype)
        binding.bind_output(self.output_name, "cpu", 0, last.dtype, list(shape), last.ctypes.data)
        total = self.cache.bind(binding, new_positions)
        began = time.perf_counter()
        session.run_with_iobinding(binding)
        self.timings[self.step_graph] += time.perf_counter() - began
        self.cache.commit(total)
        return last[:, -1] if last.ndim == 3 else last

    def start(self, input_ids, attention_mask, position_ids):
        self.mask = attention_mask
        return self._run(input_ids, position_ids)

    def advance(self, input_ids, position_ids):
        self.mask = np.concatenate([self.mask, np.ones((len(self.mask), 1), dtype=np.int64)], axis=1)
        return self._run(input_ids, position_ids)

