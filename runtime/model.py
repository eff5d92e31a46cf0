"""`Model`: a model package opened on ONNX Runtime, and its place behind the generation loop.

    from calm_edge.runtime import Model, GeneratorParams, generate
    model = Model("models/calm-small", provider="cpu", threads=2)
    result = generate(model, "The history of", GeneratorParams(max_new_tokens=64, seed=1))

`Model` checks the package (manifest, format version, sha256 of every file), opens one ONNX
Runtime session per graph on the chosen execution provider, and serves as the loop's backend:
`start` / `advance` keep the key/value cache in buffers preallocated for the whole context on
the provider's device (`kv_cache.py`), bound through IO binding, so no step allocates a cache
or copies it out to numpy. A `Model` holds no per-generation state: each
generation gets its own `ModelState`, so one `Model` can serve several threads at once.

Providers: "cpu" (default), "cuda", "tensorrt" (TensorRT's execution provider with fp16, an
engine cache folder and optimisation profiles over the dynamic axes). Asking for a provider that
this onnxruntime build lacks is an error listing the ones it has.
"""
import os
import time
from pathlib import Path

import numpy as np

from calm_edge.errors import CalmEdgeError
from calm_edge.runtime import package
from calm_edge.runtime.generator import Backend
from calm_edge.runtime.kv_cache import ONNX_TO_NUMPY, KVCache
from calm_edge.tokenizer import Tokenizer

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def _onnxruntime():
    import onnxruntime

    return onnxruntime


def available_providers():
    """The calm-edge provider names this onnxruntime build offers."""
    have = set(_onnxruntime().get_available_providers())
    return [name for name, ort_name in PROVIDERS.items() if ort_name in have]


def tensorrt_options(manifest, engine_cache, max_batch=16, fp16=True):
    """TensorRT execution-provider options: fp16, an engine cache, and profiles over the dynamic axes.

    The profiles cover batch 1..max_batch, prefill up to the full context, and the cache from
    empty to full, so one engine serves prefill and decode without rebuilding.
    """
    model, kind = manifest["model"], manifest["kind"]
    K, context = model["chunk_size"], model["max_context"]

    def shapes(spec, pick):
        dims = {"batch": pick[0], "sequence": pick[1], "sequence_tokens": pick[1] * K, "past": pick[2],
                "total": pick[1] + pick[2], "samples": pick[3], "rows": pick[0] * pick[3]}
        parts = []
        for io in spec["inputs"]:
            shape = [str(dims[d]) if isinstance(d, str) else str(d) for d in io["shape"]]
            parts.append(f"{io['name']}:{'x'.join(shape)}")
        return ",".join(parts)

    specs = package.graph_specs(kind, model)
    options = {}
    for name, spec in specs.items():
        options[name] = {
            "trt_fp16_enable": fp16,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(Path(engine_cache) / name),
            "trt_profile_min_shapes": shapes(spec, (1, 1, 0, 1)),
            "trt_profile_opt_shapes": shapes(spec, (1, 1, context // 2, 16)),
            "trt_profile_max_shapes": shapes(spec, (max_batch, context, context, 64)),
        }
    return options


def session_providers(provider, manifest, graph, engine_cache=None):
    """The providers list for one graph's InferenceSession, checked against what is installed."""
    if provider not in PROVIDERS:
        raise CalmEdgeError(f"unknown provider {provider!r}; choose one of: {', '.join(PROVIDERS)}")
    available = available_providers()
    if provider not in available:
        raise CalmEdgeError(
            f"provider {provider!r} is not available in this onnxruntime build (available: {', '.join(available)}); "
            "for cuda or tensorrt install onnxruntime-gpu instead of onnxruntime (see README.md)"
        )
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider == "cuda":
        return [("CUDAExecutionProvider", {}), "CPUExecutionProvider"]
    cache = engine_cache or os.path.join(os.path.expanduser("~"), ".cache", "calm-edge", "trt")
    options = tensorrt_options(manifest, cache)[graph]
    return [("TensorrtExecutionProvider", options), ("CUDAExecutionProvider", {}), "CPUExecutionProvider"]


# How ONNX Runtime's worker threads wait for work: the session options of each policy.
# ORT's default ("on") keeps them busy-waiting between ops and for a while after a run. A CALM
# step runs three sessions back to back, each with its own pool, so the pool that just finished
# spins on the cores the next one needs. "run" spins while a graph runs and stops when it
# returns: the default, CALM's fastest on an otherwise idle CPU. "off" never spins, kindest to other
# work on the same cores. Measured in README: The Python runtime.
SPINNING = {
    "off": {"session.intra_op.allow_spinning": "0"},
    "run": {"session.intra_op.allow_spinning": "1", "session.force_spinning_stop": "1"},
    "on": {"session.intra_op.allow_spinning": "1"},
}
DEFAULT_SPINNING = "run"


def spinning_entries(policy):
    """The session config entries of a spinning policy ("off", "run" or "on")."""
    if policy not in SPINNING:
        raise CalmEdgeError(f"spinning={policy!r}: choose one of {', '.join(SPINNING)}")
    return SPINNING[policy]


class Model:
    """A model package opened for generation on one execution provider."""

    def __init__(self, path, provider="cpu", threads=None, engine_cache=None, verify=True, spinning=DEFAULT_SPINNING):
        ort = _onnxruntime()
        self.path = Path(path)
        self.manifest = package.read_manifest(self.path, verify=verify)
        self.kind = self.manifest["kind"]
        self.provider = provider
        section = self.manifest["model"]
        self.tokenizer = Tokenizer(self.path / self.manifest["tokenizer"]["file"])
        self.chunk_size = section["chunk_size"]
        self.eos_id, self.pad_id = section["special_ids"]["eos"], section["special_ids"]["pad"]
        self.noise_size = section.get("noise_size", 0)
        self.max_context = section["max_context"]
        self.num_layers = section["num_layers"]
        if threads is not None and threads < 1:
            raise CalmEdgeError(f"threads={threads} must be at least 1")

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        for key, value in spinning_entries(spinning).items():
            options.add_session_config_entry(key, value)
        self.sessions = {}
        for name, graph in self.manifest["graphs"].items():
            providers = session_providers(provider, self.manifest, name, engine_cache)
            try:
                self.sessions[name] = ort.InferenceSession(str(self.path / graph["file"]), options, providers=providers)
            except Exception as e:  # onnxruntime raises its own exception types for a bad graph
                raise CalmEdgeError(f"{self.path / graph['file']} cannot be loaded by onnxruntime ({e}); re-export the package") from None
        self._step_name = "ar" if self.kind == "ar" else "backbone"
        self._step_graph = self.sessions[self._step_name]
        step_spec = package.graph_specs(self.kind, section)[self._step_name]
        self._past_names = [io["name"] for io in step_spec["inputs"][3:]]
        self._present_names = [io["name"] for io in step_spec["outputs"][1:]]
        self._first_output = step_spec["outputs"][0]["name"]
        self.num_kv_heads, self.head_dim = section["num_kv_heads"], section["head_dim"]
        # The cache lives where the step graph computes: the GPU for cuda/tensorrt, so it never
        # crosses to the host between steps. Its dtype is the graph's (fp16 packages may keep
        # an fp16 cache).
        output_types = {o.name: o.type for o in self._step_graph.get_outputs()}
        self._cache_dtype = ONNX_TO_NUMPY[output_types[self._present_names[0]]]
        self._first_output_dtype = ONNX_TO_NUMPY[output_types[self._first_output]]
        self._first_output_width = section["vocab_size"] if self.kind == "ar" else section["hidden_size"]
        self._cache_device = "cpu" if provider == "cpu" else "cuda"

    def new_state(self):
        """Per-generation state (mask and cache) behind the loop's Backend interface."""
        return ModelState(self)

    # The two stateless graphs, used directly by the loop and by evaluation.

    def sample_latents(self, hidden, noise):
        return self.sessions["energy_head"].run(None, {"hidden": np.ascontiguousarray(hidden, np.float32),
                                                       "noise": np.ascontiguousarray(noise, np.float32)})[0]

    def decode(self, latents):
        return self.sessions["decoder"].run(None, {"latents": np.ascontiguousarray(latents, np.float32)})[0]


class ModelState(Backend):
    """One generation's mask, preallocated key/value cache and timings on a shared `Model`.

    `timings` accumulates the seconds spent in each graph's run, so a benchmark can tell the
    graphs' time from the loop's own (sampling, bookkeeping, Python).
    """

    def __init__(self, model: Model):
        self.model = model
        self.kind, self.chunk_size = model.kind, model.chunk_size
        self.eos_id, self.pad_id, self.noise_size = model.eos_id, model.pad_id, model.noise_size
        self.max_context = model.max_context
        self.mask = None
        self.cache = None  # a KVCache, allocated at prefill when the batch size is known
        self.timings = {name: 0.0 for name in model.sessions}

    def _run(self, input_ids, position_ids):
        session = self.model._step_graph
        binding = session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(self.mask, np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, np.int64))
        # The step's result goes straight into a host array: reading it back through
        # get_outputs() would wrap every bound output, the cache included, each step.
        model = self.model
        batch, new_positions = position_ids.shape
        shape = (batch, model._first_output_width) if self.kind == "ar" else (batch, new_positions, model._first_output_width)
        last = np.empty(shape, model._first_output_dtype)
        binding.bind_output(model._first_output, "cpu", 0, last.dtype, list(shape), last.ctypes.data)
        total = self.cache.bind(binding, new_positions)
        began = time.perf_counter()
        session.run_with_iobinding(binding)
        self.timings[self.model._step_name] += time.perf_counter() - began
        self.cache.commit(total)
        return last[:, -1] if last.ndim == 3 else last

    def start(self, input_ids, attention_mask, position_ids):
        model = self.model
        self.mask = attention_mask
        self.cache = KVCache(_onnxruntime(), model._past_names, model._present_names, batch=len(input_ids),
                             kv_heads=model.num_kv_heads, head_dim=model.head_dim, capacity=self.max_context,
                             dtype=model._cache_dtype, device=model._cache_device)
        return self._run(input_ids, position_ids)

    def advance(self, input_ids, position_ids):
        self.mask = np.concatenate([self.mask, np.ones((len(self.mask), 1), dtype=np.int64)], axis=1)
        return self._run(input_ids, position_ids)

    def sample_latents(self, hidden, noise):
        began = time.perf_counter()
        latents = self.model.sample_latents(hidden, noise)
        self.timings["energy_head"] += time.perf_counter() - began
        return latents

    def decode(self, latents):
        began = time.perf_counter()
        token_ids = self.model.decode(latents)
        self.timings["decoder"] += time.perf_counter() - began
        return token_ids
