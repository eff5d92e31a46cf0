"""`Model`: a model package opened on ONNX Runtime.

    from calm_edge.runtime import Model, GeneratorParams, generate
    model = Model("models/calm-small-int4", provider="cpu", threads=2)
    result = generate(model, "The history of", GeneratorParams(max_new_tokens=64, seed=1))

`Model` checks the package (`package.Manifest.read`: schema, format version, files confined to
the folder, sha256 of every file), opens one ONNX Runtime session per graph on the chosen
execution provider and checks each graph's inputs and outputs against the manifest. A `Model`
holds no per-generation state: each generation gets its own `StepState` (`new_state`, which a
`Generator` calls), so one `Model` can serve several threads at once.

Providers: "cpu" (default), "cuda", "tensorrt" (TensorRT's execution provider with fp16, an
engine cache folder and optimisation profiles over the dynamic axes). Asking for a provider that
this onnxruntime build lacks is an error listing the ones it has.
"""
import os
from pathlib import Path

import numpy as np

from calm_edge.errors import CalmEdgeError
from calm_edge.runtime.limits import check_threads
from calm_edge.runtime.package import ONNX_DTYPES, Manifest
from calm_edge.runtime.step_state import StepState
from calm_edge.tokenizer import load_tokenizer

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


def tensorrt_options(manifest: Manifest, engine_cache, max_batch=16, fp16=True):
    """TensorRT execution-provider options: fp16, an engine cache, and profiles over the dynamic axes.

    The profiles cover batch 1..max_batch, prefill up to the full context, and the cache from
    empty to full, so one engine serves prefill and decode without rebuilding.
    """
    K, context = manifest.chunk_size, manifest.max_context

    def shapes(spec, pick):
        dims = {"batch": pick[0], "sequence": pick[1], "sequence_tokens": pick[1] * K, "past": pick[2],
                "total": pick[1] + pick[2], "samples": pick[3], "rows": pick[0] * pick[3],
                "tokens": pick[0] * pick[3] * K}
        parts = []
        for io in spec["inputs"]:
            shape = [str(dims[d]) if isinstance(d, str) else str(d) for d in io["shape"]]
            parts.append(f"{io['name']}:{'x'.join(shape)}")
        return ",".join(parts)

    options = {}
    for name, spec in manifest.specs().items():
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
    """A model package opened for generation on one execution provider.

    `prepack_weights=False` keeps ONNX Runtime from laying a second, faster copy of each MatMul
    weight out in memory: what export validation and quantization do, so that a 1.8 B-parameter
    package fits beside its PyTorch model. Graphs with external data are mapped into memory.

    Attributes a caller uses: `manifest` (the package's `Manifest`), `tokenizer`, `kind`,
    `chunk_size`, `max_context`, `eos_id`, `pad_id`, `noise_size`, `prompt_fill`, `sessions`
    ({graph: ONNX Runtime session}), `provider`.
    """

    def __init__(self, path, provider="cpu", threads=None, engine_cache=None, verify=True, spinning=DEFAULT_SPINNING,
                 prepack_weights=True):
        threads = check_threads(threads)  # before any work: a bad request costs nothing
        if not isinstance(path, (str, os.PathLike)):
            raise CalmEdgeError(f"Model(path={path!r}): the path must be a package folder's path (str or Path)")
        self.ort = _onnxruntime()
        self.path = Path(path)
        self.manifest = manifest = Manifest.read(self.path, verify=verify)
        self.kind, self.provider = manifest.kind, provider
        self.tokenizer = load_tokenizer(manifest.tokenizer_path, manifest.tokenizer_kind, manifest.special_ids)
        manifest.check_tokenizer(self.tokenizer.vocab_size)
        self.chunk_size, self.max_context = manifest.chunk_size, manifest.max_context
        self.prompt_fill = manifest.prompt_fill
        self.eos_id, self.pad_id, self.noise_size = manifest.eos_id, manifest.pad_id, manifest.noise_size

        options = self.ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        for key, value in spinning_entries(spinning).items():
            options.add_session_config_entry(key, value)
        if not prepack_weights:  # one copy of the weights in memory instead of two, for slower MatMuls
            options.add_session_config_entry("session.disable_prepacking", "1")
        self.sessions = {}
        for name in manifest.graphs:
            providers = session_providers(provider, manifest, name, engine_cache)
            file = manifest.graph_path(name)
            try:
                self.sessions[name] = self.ort.InferenceSession(str(file), options, providers=providers)
            except Exception as e:  # onnxruntime raises its own exception types for a bad graph
                raise CalmEdgeError(f"{file} cannot be loaded by onnxruntime ({e}); re-export the package") from None
            manifest.check_graph_signature(name, *session_signature(self.sessions[name]))
        # The cache lives where the step graph computes: the GPU for cuda/tensorrt, so it never
        # crosses to the host between steps. Its dtype is the graph's (fp16 packages may keep
        # an fp16 cache).
        output_types = {o.name: o.type for o in self.sessions[manifest.step_graph].get_outputs()}
        self.cache_dtype = np.dtype(ONNX_DTYPES[output_types[manifest.present_names[0]]])
        self.step_output_dtype = np.dtype(ONNX_DTYPES[output_types[manifest.step_output]])
        self.cache_device = "cpu" if provider == "cpu" else "cuda"

    def new_state(self, batch, capacity):
        """A generation's state: mask, a key/value cache of `capacity` positions for `batch` rows, timings."""
        return StepState(self, batch, capacity)

    # The graphs one call at a time, for evaluation (the loop uses them through StepState).

    def hidden_states(self, input_ids):
        """The backbone over one sequence of token ids from an empty cache: every chunk's hidden state [S, H].

        Teacher forcing (the official evaluation protocol): positions 0.., every chunk attended.
        """
        manifest = self.manifest
        ids = np.asarray(input_ids, np.int64).reshape(1, -1)
        chunks = ids.shape[1] // manifest.chunk_size
        empty = np.zeros((1, manifest.num_kv_heads, 0, manifest.head_dim), self.cache_dtype)
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, chunks), np.int64),
                 "position_ids": np.arange(chunks, dtype=np.int64)[None], **{name: empty for name in manifest.past_names}}
        return self.sessions[manifest.step_graph].run([manifest.step_output], feeds)[0][0]

    def sample_latents(self, hidden, noise):
        return self.sessions["energy_head"].run(None, {"hidden": np.ascontiguousarray(hidden, np.float32),
                                                       "noise": np.ascontiguousarray(noise, np.float32)})[0]

    def decode(self, latents):
        """Latents [M, latent] -> token ids [M, K], whatever the decoder's layout."""
        if self.manifest.decoder_layout == "whole":
            return self.sessions["decoder"].run(None, {"latents": np.ascontiguousarray(latents, np.float32)})[0]
        states = self.decoder_states(latents)
        return self.head_tokens(states.reshape(-1, states.shape[-1])).reshape(states.shape[:2])

    def decoder_states(self, latents):
        """A split decoder's last states [M, K, decoder_hidden] for latents [M, latent]."""
        return self.sessions["decoder"].run(None, {"latents": np.ascontiguousarray(latents, np.float32)})[0]

    def head_tokens(self, states):
        """A split decoder's head: token ids [R] for decoder states [R, decoder_hidden].

        A lone row is sent twice: ONNX Runtime computes a one-row product by another kernel whose
        rounding can differ in the last bit (int4's MatMulNBits does), and a token must not depend
        on how many rows travelled with it. From two rows on, each row's result is the same
        whatever the others are (tests/test_lazy_decoding.py checks this).
        """
        states = np.ascontiguousarray(states, np.float32)
        if len(states) == 1:
            return self.sessions["decoder_head"].run(None, {"decoder_states": np.repeat(states, 2, axis=0)})[0][:1]
        return self.sessions["decoder_head"].run(None, {"decoder_states": states})[0]


def session_signature(session):
    """(inputs, outputs) of an ONNX Runtime session as [(name, dtype, shape)], for `Manifest.check_graph_signature`."""
    def side(args):
        return [(a.name, ONNX_DTYPES.get(a.type, a.type), list(a.shape)) for a in args]
    return side(session.get_inputs()), side(session.get_outputs())
