"""The runners: one way each to generate from the same prompt ids, timed the same way.

Every runner returns a `calm_edge.runtime.timing.Trace` per generation: time to the first new
tokens, the prompt's forward pass (prefill), then the wall time of every later step. A step is whatever the runner emits at
once: K tokens per sequence for CALM, one for the token-by-token runners. Where the runner
exposes its graph calls, the decode-phase seconds per graph come too, and what remains of a step
is the loop's own overhead (sampling, bookkeeping, Python).

- `PackageRunner`: a calm-edge model package (CALM or AR) in calm-edge's runtime.
- `OptimumRunner`: the AR weights as a Hugging Face folder (`calm-edge export --ar RUN --format hf`),
  exported by optimum to ONNX and generated with `ORTModelForCausalLM.generate`.
- `GenaiRunner`: the same folder through onnxruntime-genai's model builder (fp32, cpu) and its
  generator loop.

Peers sample with their own samplers (full softmax at temperature T, no top-k / top-p), so their
tokens differ from calm-edge's; the lengths, prompts and batch are identical, and every runner is
forced to produce exactly the requested number of new tokens (no early end of sequence).
"""
import functools
import json
import math
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from calm_edge.errors import CalmEdgeError
from calm_edge.runtime.generator import Generator, GeneratorParams
from calm_edge.runtime.model import DEFAULT_SPINNING, Model, spinning_entries
from calm_edge.runtime.package import Manifest
from calm_edge.runtime.timing import Trace


class PeerUnavailable(Exception):
    """A peer runtime cannot be installed, imported, converted or run here; the message says why."""


def version_of(*distributions):
    """{distribution: version or "not installed"}."""
    found = {}
    for name in distributions:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def fits_context(prompt_tokens, new_tokens, max_context, chunk_size=1):
    """Whether a prompt and the new tokens fit the context (CALM counts chunks of K tokens)."""
    return math.ceil(prompt_tokens / chunk_size) + math.ceil(new_tokens / chunk_size) <= max_context


class PackageRunner:
    """A calm-edge model package, CALM or AR, on one execution provider (cpu by default)."""

    def __init__(self, path, candidates=16, provider="cpu"):
        self.path, self.provider = Path(path), provider
        self.manifest = Manifest.read(self.path)
        self.kind = self.manifest.kind
        self.name = f"calm-edge {self.kind} ({self.path.name})"
        self.candidates = candidates
        self.model = None

    def describe(self):
        m = self.manifest
        return {"runner": "calm-edge", "kind": self.kind, "package": str(self.path), "provider": self.provider,
                "chunk_size": m.chunk_size, "max_context_tokens": m.max_context * m.chunk_size,
                "quantization": m.quantization_mode, "versions": version_of("calm-edge", "onnxruntime")}

    def fits(self, cell):
        return fits_context(cell.prompt_tokens, cell.new_tokens, self.manifest.max_context, self.manifest.chunk_size)

    def load(self, threads, spinning=None):  # spinning: a policy of runtime.model.SPINNING, None for the default
        self.model = Model(self.path, provider=self.provider, threads=threads, spinning=spinning or DEFAULT_SPINNING)

    def generate(self, prompts, new_tokens, temperature, seed):
        params = GeneratorParams(max_new_tokens=new_tokens, temperature=temperature, seed=seed,
                                 candidates=self.candidates, stop_at_eos=False)
        generator = Generator(self.model, prompts, params)
        for _ in generator:
            pass
        return generator.trace()


class HuggingFacePeer:
    """What both peers share: the AR weights as a Hugging Face folder, and its context length."""

    def __init__(self, hf_dir, provider):
        self.hf_dir, self.provider = Path(hf_dir), provider
        self.config = json.loads((self.hf_dir / "config.json").read_text())
        self.model, self.prepare_seconds = None, None

    def fits(self, cell):
        return fits_context(cell.prompt_tokens, cell.new_tokens, self.config["max_position_embeddings"])

    def _convert_once(self, folder, convert):
        """Run `convert()` to fill `folder` from the Hugging Face folder, unless a stamp there says
        it already holds the conversion of these very weights; record how long it took."""
        stamp = Path(folder) / "source.json"
        weights = (self.hf_dir / "model.safetensors").stat()
        source = {"config": self.config, "weights_bytes": weights.st_size, "weights_mtime": weights.st_mtime}
        if stamp.is_file() and json.loads(stamp.read_text()) == source:
            self.prepare_seconds = 0.0
            return
        began = time.perf_counter()
        Path(folder).mkdir(parents=True, exist_ok=True)
        convert()
        stamp.write_text(json.dumps(source))
        self.prepare_seconds = round(time.perf_counter() - began, 2)


class OptimumRunner(HuggingFacePeer):
    """The AR weights through optimum's ORTModelForCausalLM (ONNX Runtime, fp32)."""

    name = "optimum"

    def __init__(self, hf_dir, work_dir, provider="cpu"):
        super().__init__(hf_dir, provider)
        self.onnx_dir = Path(work_dir) / "optimum-onnx"

    def describe(self):
        return {"runner": "optimum", "kind": "ar", "hf_checkpoint": str(self.hf_dir), "onnx_dir": str(self.onnx_dir),
                "provider": self.provider,
                "chunk_size": 1, "max_context_tokens": self.config["max_position_embeddings"],
                "prepare_seconds": self.prepare_seconds,
                "versions": version_of("optimum-onnx", "optimum", "transformers", "onnxruntime", "torch")}

    def prepare(self):
        """Export the Hugging Face folder to ONNX once (reused while the folder is unchanged)."""
        try:
            from optimum.onnxruntime import ORTModelForCausalLM
        except ImportError as e:
            raise PeerUnavailable(f"optimum's ONNX Runtime backend cannot be imported ({e}); "
                                  "pip install optimum-onnx (see benchmarks/README.md)") from None

        def export():
            try:
                model = ORTModelForCausalLM.from_pretrained(str(self.hf_dir), export=True, use_cache=True)
                model.save_pretrained(str(self.onnx_dir))
            except Exception as e:  # any failure of a third-party exporter is reported, not raised
                raise PeerUnavailable(f"optimum could not export {self.hf_dir} to ONNX: {type(e).__name__}: {e}") from None

        self._convert_once(self.onnx_dir, export)

    def load(self, threads, spinning=None):  # spinning: a policy of runtime.model.SPINNING, None for the default
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForCausalLM

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        if spinning is not None:  # else ONNX Runtime's default (spinning)
            for key, value in spinning_entries(spinning).items():
                options.add_session_config_entry(key, value)
        self.model = ORTModelForCausalLM.from_pretrained(str(self.onnx_dir), session_options=options,
                                                         provider=ORT_PROVIDERS[self.provider], use_cache=True)
        # Time every forward call: the first of a generation is the prefill, the rest decode steps.
        self._forward_s = []
        forward = self.model.forward

        # functools.wraps keeps forward's signature visible: generate() checks its kwargs against it.
        @functools.wraps(forward)
        def timed_forward(*args, **kwargs):
            began = time.perf_counter()
            out = forward(*args, **kwargs)
            self._forward_s.append(time.perf_counter() - began)
            return out

        self.model.forward = timed_forward

    def generate(self, prompts, new_tokens, temperature, seed):
        import torch

        marks = []

        class Clock:  # transformers calls put() with the prompt, then once per step with the new tokens
            def put(self, value):
                marks.append(time.perf_counter())

            def end(self):
                pass

        ids = torch.tensor(prompts, dtype=torch.long)
        torch.manual_seed(seed)
        self._forward_s = []
        began = time.perf_counter()
        self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=temperature,
                            top_k=0, top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                            pad_token_id=self.config.get("pad_token_id", 0), streamer=Clock())
        steps = marks[1:]  # marks[0] is the prompt, before any forward pass
        return Trace(total_s=steps[-1] - began, ttft_s=steps[0] - began, prefill_s=self._forward_s[0],
                     step_s=np.diff(steps).tolist(), tokens_per_step=1, new_tokens=len(steps),
                     graphs_s={"model": sum(self._forward_s[1:])})


class GenaiRunner(HuggingFacePeer):
    """The AR weights through onnxruntime-genai: its model builder (fp32, cpu), then its generator loop."""

    name = "onnxruntime-genai"

    def __init__(self, hf_dir, work_dir, provider="cpu"):
        # On a GPU genai's builder makes an fp16 CUDA model (its TensorRT path is another EP,
        # NvTensorRtRtx, so "tensorrt" runs the CUDA model too); on the CPU fp32.
        super().__init__(hf_dir, provider)
        self.precision, self.target = ("fp32", "cpu") if provider == "cpu" else ("fp16", "cuda")
        self.model_dir = Path(work_dir) / f"genai-{self.precision}-{self.target}"

    def describe(self):
        return {"runner": "onnxruntime-genai", "kind": "ar", "hf_checkpoint": str(self.hf_dir),
                "model_dir": str(self.model_dir), "chunk_size": 1, "provider": self.provider,
                "precision": self.precision, "builder_target": self.target,
                "max_context_tokens": self.config["max_position_embeddings"], "prepare_seconds": self.prepare_seconds,
                "versions": version_of("onnxruntime-genai", "onnxruntime", "onnx-ir", "transformers")}

    def builder_command(self):
        return [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(self.hf_dir), "-o",
                str(self.model_dir), "-p", self.precision, "-e", self.target, "-c", str(self.model_dir.parent / "genai-cache")]

    def prepare(self):
        try:
            import onnxruntime_genai  # noqa: F401
        except ImportError as e:
            raise PeerUnavailable(f"onnxruntime-genai cannot be imported ({e}); pip install onnxruntime-genai "
                                  "(see benchmarks/README.md for the version that works with optimum-onnx)") from None

        def build():
            done = subprocess.run(self.builder_command(), capture_output=True, text=True)
            if done.returncode != 0:
                last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
                raise PeerUnavailable(f"onnxruntime-genai's model builder failed on {self.hf_dir} "
                                      f"(exit {done.returncode}): {last[0]}")

        self._convert_once(self.model_dir, build)

    def load(self, threads, spinning=None):  # spinning: a policy of runtime.model.SPINNING, None for the default
        import onnxruntime_genai as og

        config = og.Config(str(self.model_dir))
        if self.target == "cuda":
            config.clear_providers()
            config.append_provider("cuda")
        session_options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        if spinning is not None:  # else onnxruntime-genai's default (ONNX Runtime's: spinning)
            session_options["config_entries"] = dict(spinning_entries(spinning))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": session_options}}}))
        self.model = og.Model(config)

    def generate(self, prompts, new_tokens, temperature, seed):
        import onnxruntime_genai as og

        length = len(prompts[0]) + new_tokens
        params = og.GeneratorParams(self.model)
        # top_k 0 and top_p 1 make genai sample from the whole softmax at temperature T;
        # min_length keeps it from stopping at end of sequence.
        params.set_search_options(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_length=length,
                                  min_length=length, batch_size=len(prompts), random_seed=seed)
        generator = og.Generator(self.model, params)
        began = time.perf_counter()
        generator.append_tokens(np.asarray(prompts, dtype=np.int32))
        prefill = time.perf_counter() - began
        marks = []
        while not generator.is_done():
            generator.generate_next_token()
            generator.get_next_tokens()
            marks.append(time.perf_counter())
        del generator
        return Trace(total_s=marks[-1] - began, ttft_s=marks[0] - began, prefill_s=prefill,
                     step_s=np.diff(marks).tolist(), tokens_per_step=1, new_tokens=len(marks))


PEERS = {"optimum": OptimumRunner, "ort-genai": GenaiRunner}
ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def make_runner(spec):
    """A runner from its spec: {"type": "package", "path"} or {"type": "optimum" | "ort-genai", "hf", "work_dir"}."""
    provider = spec.get("provider", "cpu")
    if spec["type"] == "package":
        return PackageRunner(spec["path"], candidates=spec.get("candidates", 16), provider=provider)
    if spec["type"] in PEERS:
        return PEERS[spec["type"]](spec["hf"], spec["work_dir"], provider=provider)
    raise CalmEdgeError(f"unknown peer {spec['type']!r}; choose one of: {', '.join(PEERS)}")
