"""The model package, format versions 1 to 3: the one module that knows its layout.

A package is a folder with everything a runtime needs and nothing else:

    manifest.json       what the model is, where each file is, how each graph is called
    tokenizer.model     the SentencePiece model (or tokenizer.json: a Hugging Face tokenizer, version 2)
    CALM:  backbone.onnx  energy_head.onnx  decoder.onnx   (+ *.onnx.data: external weights, version 2)
           (+ decoder_head.onnx: a split decoder, version 3)
    AR:    ar.onnx

Version 2 says what version 1 cannot, and a reader of version 2 opens every version-1 package
unchanged (the defaults in brackets are version 1's):
- the tokenizer's kind, "sentencepiece" or "hf-bpe", and whether a prompt gets bos first
  (manifest "tokenizer": {"kind", "add_bos"}) [sentencepiece, no bos];
- how a CALM prompt is filled to whole chunks, "left-eos" or "right-pad" (the released models':
  pad ids on the right, inside the last chunk) ("model": {"prompt_fill"}) [left-eos];
- graphs whose weights lie in ONNX external data files (graphs over 2 GB), each with its sha256.
Version 3 adds the split decoder ("model": {"decoder_layout": "split", "decoder_hidden_size"}):
`decoder.onnx` stops before the vocabulary and gives the decoder's last states, and
`decoder_head.onnx` maps any set of those states to token ids. A runtime can then send the head
only the positions it needs: at T < 1 the batch approximation needs every candidate's first
token but, mostly, the other K - 1 tokens of one candidate only (runtime/sampling.py,
`lazy_batch_choice`), and the vocabulary projection is most of a decoder's arithmetic. A split
package decodes every token exactly as the whole decoder does. [whole: decoder.onnx gives token
ids]
Every file a manifest names must lie inside the package folder, in every version. `write_manifest`
writes the lowest version a package needs, so a package that needs nothing of versions 2 and 3
still opens in runtimes that read version 1 only.

Graphs (names follow optimum and onnxruntime-genai; `graph_specs` below is the contract):

    backbone     input_ids int64 [batch, S*K], attention_mask int64 [batch, P+S],
                 position_ids int64 [batch, S], past_key_values.{i}.key|value [batch, kv_heads, P, head_dim]
                 -> hidden [batch, S, hidden], present.{i}.key|value [batch, kv_heads, P+S, head_dim]
                 The same graph serves prefill (S > 1, P = 0) and decode (S = 1).
    energy_head  hidden [batch, hidden], noise [batch, N, noise_size] -> latents [batch, N, latent]
                 noise is the shared generator's raw uniforms in [0, 1) (see runtime/rng.py).
    decoder      latents [M, latent] -> token_ids int64 [M, K]   (argmax inside the graph)
                 split (version 3): latents [M, latent] -> decoder_states [M, K, decoder_hidden]
    decoder_head decoder_states [R, decoder_hidden] -> token_ids int64 [R]   (split only; R any rows)
    ar           as backbone with K = 1, -> logits [batch, vocab] of the last position, present.*

Writing: the exporter and the quantizer build the manifest's sections here (`model_section`,
`provenance_section`) and write it with `write_manifest`. Reading: `Manifest.read(folder)` is
the one place a package is checked (schema, format version, files confined to the folder,
presence and sha256 of every file) and the typed view every caller uses (`manifest.kind`,
`manifest.step_graph`, `manifest.past_names`, `manifest.quantization_mode`, ...). A problem is a
`CalmEdgeError` naming the file or key and the fix. `read_manifest` gives the same checked
manifest as the JSON dict, for tools that report it.
"""
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from calm_edge.config import PROMPT_FILLS  # how prompts are filled to whole chunks: the runtimes do each
from calm_edge.errors import CalmEdgeError
from calm_edge.fileio import sha256_of, write_json_atomic
from calm_edge.tokenizer import FILES as TOKENIZER_FILES  # the file a package carries for each tokenizer kind

FORMAT = "calm-edge-package"
FORMAT_VERSION = 1  # what a package that needs nothing of version 2 is written as (calm-edge's own models')
LATEST_VERSION = 3  # the newest version this calm-edge reads and writes
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"  # a SentencePiece package's; see TOKENIZER_FILES
KINDS = ("calm", "ar")
GRAPHS = {"calm": ("backbone", "energy_head", "decoder"), "ar": ("ar",)}
DECODER_LAYOUTS = ("whole", "split")  # see version 3 above
SPLIT_GRAPHS = ("backbone", "energy_head", "decoder", "decoder_head")
# Quantization modes whose activations are quantized over a whole call (one scale for every row):
# a row's token ids then depend on the other rows sent with it, so the runtime must send the head
# every position of every candidate at once, as the whole decoder does.
ROW_DEPENDENT_MODES = ("int8-dynamic",)
STEP_GRAPH = {"calm": "backbone", "ar": "ar"}  # the graph that holds the key/value cache
MAX_CONTEXT = 1 << 20  # positions; far beyond any model, and a bound on what a manifest may ask to allocate
MAX_DIMENSION = 1 << 24  # any other size of the model section: beyond any model, and inside a C++ int's products


# ----- the graphs' signatures ------------------------------------------------------------------


def cache_names(num_layers, prefix):
    """`{prefix}.{i}.key|value` for every layer: the step graph's cache inputs or outputs, in order."""
    return [f"{prefix}.{i}.{part}" for i in range(num_layers) for part in ("key", "value")]


def graph_specs(kind, model):
    """Inputs and outputs of each graph of a `kind` package, given its manifest's "model" section.

    Each input and output is {"name", "dtype", "shape"}, with a string for a dynamic axis.
    """
    layers, kv, head_dim = model["num_layers"], model["num_kv_heads"], model["head_dim"]
    past = [{"name": n, "dtype": "float32", "shape": ["batch", kv, "past", head_dim]}
            for n in cache_names(layers, "past_key_values")]
    present = [{"name": n, "dtype": "float32", "shape": ["batch", kv, "total", head_dim]}
               for n in cache_names(layers, "present")]
    step_inputs = [
        {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence_tokens"]},
        {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "total"]},
        {"name": "position_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
        *past,
    ]
    if kind == "ar":
        return {"ar": {"file": "ar.onnx", "inputs": step_inputs,
                       "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", model["vocab_size"]]},
                                   *present]}}
    hidden, latent, K = model["hidden_size"], model["latent_size"], model["chunk_size"]
    specs = {
        "backbone": {"file": "backbone.onnx", "inputs": step_inputs,
                     "outputs": [{"name": "hidden", "dtype": "float32", "shape": ["batch", "sequence", hidden]},
                                 *present]},
        "energy_head": {"file": "energy_head.onnx",
                        "inputs": [{"name": "hidden", "dtype": "float32", "shape": ["batch", hidden]},
                                   {"name": "noise", "dtype": "float32",
                                    "shape": ["batch", "samples", model["noise_size"]]}],
                        "outputs": [{"name": "latents", "dtype": "float32", "shape": ["batch", "samples", latent]}]},
        "decoder": {"file": "decoder.onnx",
                    "inputs": [{"name": "latents", "dtype": "float32", "shape": ["rows", latent]}],
                    "outputs": [{"name": "token_ids", "dtype": "int64", "shape": ["rows", K]}]},
    }
    if model.get("decoder_layout", "whole") == "split":
        states = model["decoder_hidden_size"]
        specs["decoder"]["outputs"] = [{"name": "decoder_states", "dtype": "float32", "shape": ["rows", K, states]}]
        specs["decoder_head"] = {
            "file": "decoder_head.onnx",
            "inputs": [{"name": "decoder_states", "dtype": "float32", "shape": ["tokens", states]}],
            "outputs": [{"name": "token_ids", "dtype": "int64", "shape": ["tokens"]}]}
    return specs


def dynamic_axes(spec):
    """{name: {axis: label}} for torch.onnx.export, from one graph's spec."""
    return {io["name"]: {i: d for i, d in enumerate(io["shape"]) if isinstance(d, str)}
            for io in spec["inputs"] + spec["outputs"]}


# ----- writing ---------------------------------------------------------------------------------


def model_section(kind, config, decoder_layout="split"):
    """The manifest's "model" section for the `kind` model of a `calm_edge.config.Config`.

    decoder_layout: "split" (version 3, the default: what the runtime decodes fastest) or "whole"
    (the decoder of versions 1 and 2, for runtimes that read nothing newer).
    """
    if decoder_layout not in DECODER_LAYOUTS:
        raise CalmEdgeError(f"decoder layout {decoder_layout!r} is unknown; choose one of: {', '.join(DECODER_LAYOUTS)}")
    tok = config.tokenizer
    backbone = (config.calm if kind == "calm" else config.ar).backbone
    section = {
        "chunk_size": config.autoencoder.chunk_size if kind == "calm" else 1,
        "vocab_size": tok.vocab_size,
        "special_ids": dict(tok.reserved_ids),
        "hidden_size": backbone.hidden_size,
        "num_layers": backbone.num_layers,
        "num_heads": backbone.num_heads,
        "num_kv_heads": backbone.num_kv_heads,
        "head_dim": backbone.head_dim,
        "max_context": backbone.max_positions,  # CALM: vectors (K tokens each); AR: tokens
    }
    if kind == "calm":
        section.update(latent_size=config.autoencoder.latent_size, noise_size=config.calm.noise_size,
                       energy_head_layers=config.calm.energy_head_layers)
        if config.calm.prompt_fill != "left-eos":  # version 2 (left-eos is version 1's rule)
            section["prompt_fill"] = config.calm.prompt_fill
        if decoder_layout == "split":  # version 3
            section.update(decoder_layout="split", decoder_hidden_size=config.autoencoder.hidden_size)
    return section


PROVENANCE_FROM_SUMMARY = ("parameters", "training_flops", "inference_flops_per_token", "autoencoder")


def provenance_section(checkpoint_folder, trainer, config, run_summary=None):
    """The manifest's "provenance" section: where the weights came from and their measured quality.

    `trainer`: the checkpoint's trainer.json; `config`: its Config as a dict; `run_summary`: the
    run's run_summary.json, if it has one.
    """
    info = {
        "checkpoint": str(checkpoint_folder),
        "step": trainer.get("step"),
        "tokens_seen": trainer.get("tokens_seen"),
        "data": trainer.get("data"),
        "valid": trainer.get("valid", {}),
        "config": config,
    }
    if trainer.get("random_weights"):  # an untrained model of some preset's dimensions, for speed only
        info["random_weights"] = True
    for key in PROVENANCE_FROM_SUMMARY:
        if key in (run_summary or {}):
            info[key] = run_summary[key]
    return info


def write_manifest(folder, kind, model, provenance, quantization=None, validation=None, tokenizer_kind="sentencepiece",
                   add_bos=False):
    """Write manifest.json for the graph and tokenizer files already in `folder`; returns it as a dict.

    The tokenizer file is the kind's (TOKENIZER_FILES); `add_bos`: prompts get bos first.
    """
    folder = Path(folder)
    graphs = {}
    for name, spec in graph_specs(kind, model).items():
        graphs[name] = {**spec, "sha256": sha256_of(folder / spec["file"]),
                        "bytes": (folder / spec["file"]).stat().st_size}
        # ONNX external data (graphs over 2 GB) travels with its graph.
        data_file = folder / (spec["file"] + ".data")
        if data_file.exists():
            graphs[name]["external_data"] = {"file": data_file.name, "sha256": sha256_of(data_file),
                                             "bytes": data_file.stat().st_size}
    tokenizer_file = TOKENIZER_FILES[tokenizer_kind]
    tokenizer = {"file": tokenizer_file, "sha256": sha256_of(folder / tokenizer_file)}
    needs_v2 = (tokenizer_kind != "sentencepiece" or add_bos or model.get("prompt_fill", "left-eos") != "left-eos"
                or any("external_data" in g for g in graphs.values()))
    needs_v3 = model.get("decoder_layout", "whole") == "split"
    if needs_v2:
        tokenizer.update(kind=tokenizer_kind, add_bos=bool(add_bos))
    manifest = {
        "format": FORMAT,
        "format_version": 3 if needs_v3 else 2 if needs_v2 else FORMAT_VERSION,
        "kind": kind,
        "model": model,
        "tokenizer": tokenizer,
        "graphs": graphs,
        "quantization": quantization or {"mode": "fp32", "graphs": {name: "fp32" for name in graphs}},
        "provenance": provenance,
        "validation": validation or {},
    }
    write_json_atomic(folder / MANIFEST_FILE, manifest)
    return manifest


# ----- reading ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Graph:
    """One graph of a package: its file (inside the package), checksum, size and signature."""

    name: str
    file: str
    sha256: str
    bytes: int
    inputs: list  # [{"name", "dtype", "shape"}]
    outputs: list
    external_data: dict = None  # {"file", "sha256"} when the weights lie beside the graph

    @property
    def total_bytes(self):
        """The graph file and its external data, if any."""
        return self.bytes + int((self.external_data or {}).get("bytes", 0))

    @property
    def input_names(self):
        return [io["name"] for io in self.inputs]

    @property
    def output_names(self):
        return [io["name"] for io in self.outputs]


class Manifest(Mapping):
    """A package's manifest.json, checked: the typed view of everything a caller needs.

    Attributes: `folder`, `kind` ("calm" or "ar"), `format_version`, the model's dimensions
    (`chunk_size` K, `vocab_size`, `hidden_size`, `num_layers`, `num_heads`, `num_kv_heads`,
    `head_dim`, `max_context` in positions, and for CALM `latent_size`, `noise_size`), the
    special ids (`eos_id`, `pad_id`, `bos_id`), `graphs` ({name: Graph}), `provenance`,
    `validation` and the raw dict (`data`). Build one with `Manifest.read(folder)`.

    It is also a read-only mapping over the JSON as written (`manifest["quantization"]`), which
    is what `Model.manifest` was before this class: reports copy it, and scripts written against
    the dict keep working. calm-edge's own code uses the properties.
    """

    def __init__(self, folder, data):
        self.folder = Path(folder)
        self.data = data
        self.path = self.folder / MANIFEST_FILE
        self.format_version = data["format_version"]
        self.kind = data["kind"]
        model = data["model"]
        self.model_section = model
        self.chunk_size, self.vocab_size = model["chunk_size"], model["vocab_size"]
        self.hidden_size, self.num_layers = model["hidden_size"], model["num_layers"]
        self.num_heads, self.num_kv_heads, self.head_dim = model["num_heads"], model["num_kv_heads"], model["head_dim"]
        self.max_context = model["max_context"]
        self.latent_size, self.noise_size = model.get("latent_size", 0), model.get("noise_size", 0)
        self.special_ids = dict(model["special_ids"])
        self.prompt_fill = model.get("prompt_fill", "left-eos")
        self.decoder_layout = model.get("decoder_layout", "whole")
        self.tokenizer_file = data["tokenizer"]["file"]
        self.tokenizer_kind = data["tokenizer"].get("kind", "sentencepiece")
        self.add_bos = bool(data["tokenizer"].get("add_bos", False))
        self.graphs = {name: Graph(name=name, file=g["file"], sha256=g["sha256"], bytes=g["bytes"], inputs=g["inputs"],
                                   outputs=g["outputs"], external_data=g.get("external_data"))
                       for name, g in data["graphs"].items()}
        self.quantization = data["quantization"]
        # Whether the decoder head's token id for a row depends on that row alone (split packages):
        # true unless the head was quantized with activations scaled over a whole call
        # (ROW_DEPENDENT_MODES); only then may a runtime send it a subset of the positions. Known
        # once here, since every lazy step asks.
        self.decoder_head_rows_independent = (
            self.decoder_layout == "split"
            and self.graph_modes.get("decoder_head", "fp32") not in ROW_DEPENDENT_MODES)
        self.provenance = data.get("provenance") or {}
        self.validation = data.get("validation") or {}

    def __getitem__(self, key):
        return self.data[key]

    def __iter__(self):
        return iter(self.data)

    def __len__(self):
        return len(self.data)

    # ----- what callers ask ------------------------------------------------------------------

    @property
    def eos_id(self):
        return self.special_ids["eos"]

    @property
    def pad_id(self):
        return self.special_ids["pad"]

    @property
    def bos_id(self):
        return self.special_ids.get("bos")

    @property
    def step_graph(self):
        """The graph that runs once per step and holds the key/value cache: "backbone" or "ar"."""
        return STEP_GRAPH[self.kind]

    @property
    def past_names(self):
        return cache_names(self.num_layers, "past_key_values")

    @property
    def present_names(self):
        return cache_names(self.num_layers, "present")

    @property
    def step_output(self):
        """The step graph's first output: "hidden" (CALM) or "logits" (AR)."""
        return "logits" if self.kind == "ar" else "hidden"

    @property
    def step_output_width(self):
        return self.vocab_size if self.kind == "ar" else self.hidden_size

    def specs(self):
        """{graph name: spec} of this package's graphs (see `graph_specs`)."""
        return graph_specs(self.kind, self.model_section)

    def file(self, name):
        """The path of a file the manifest names (checked to lie inside the package when it was read)."""
        return self.folder / name

    @property
    def tokenizer_path(self):
        return self.file(self.tokenizer_file)

    def graph_path(self, name):
        return self.file(self.graphs[name].file)

    @property
    def quantization_mode(self):
        return self.quantization["mode"]

    @property
    def graph_modes(self):
        """{graph: quantization mode}, "fp32" for a graph left as exported."""
        return dict(self.quantization.get("graphs", {}))

    @property
    def quantization_source(self):
        """{"package", "manifest_sha256"} of the fp32 package a quantized one came from, else None."""
        return self.quantization.get("source")

    @property
    def training_config(self):
        """The training run's Config as a dict (`calm_edge.config.Config.from_dict`), or None."""
        return self.provenance.get("config") or None

    @property
    def position_chunk_size(self):
        """The K that lays evaluation positions out: the autoencoder's, for AR packages too.

        An AR model is evaluated at the positions of the CALM model it is compared with, which
        its training config's autoencoder K gives; a package without one uses its own K.
        """
        config = self.training_config or {}
        return int((config.get("autoencoder") or {}).get("chunk_size") or self.chunk_size)

    @property
    def random_weights(self):
        return bool(self.provenance.get("random_weights"))

    @property
    def total_graph_bytes(self):
        return sum(g.total_bytes for g in self.graphs.values())

    # ----- reading and checking --------------------------------------------------------------

    @classmethod
    def read(cls, folder, verify=True):
        """The checked manifest of the package in `folder` (sha256 of every file when `verify`)."""
        folder = Path(folder)
        path = folder / MANIFEST_FILE
        if not folder.is_dir():
            raise CalmEdgeError(f"model package {folder} does not exist; create one with `calm-edge export`")
        _check_confined(folder, path, "manifest.json", MANIFEST_FILE, "the manifest")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CalmEdgeError(f"{path} not found: {folder} is not a calm-edge model package; "
                                "export one with `calm-edge export`") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CalmEdgeError(f"{path} is corrupt ({e}); export the package again") from None
        except OSError as e:
            raise CalmEdgeError(f"cannot read {path}: {e.strerror}; check the package folder") from None
        _check_schema(data, path)
        manifest = cls(folder, data)
        manifest._check_files(verify)
        return manifest

    def _files(self):
        """(key, file, expected sha256, what it is) for every file the manifest names."""
        files = [("tokenizer.file", self.tokenizer_file, self.data["tokenizer"]["sha256"], "tokenizer")]
        for name, graph in self.graphs.items():
            files.append((f"graphs.{name}.file", graph.file, graph.sha256, f"{name} graph"))
            if graph.external_data:
                files.append((f"graphs.{name}.external_data.file", graph.external_data["file"],
                              graph.external_data["sha256"], f"{name} graph's data"))
        return files

    def _check_files(self, verify):
        """Every file lies inside the folder once symbolic links are followed, exists, and matches its sha256.

        Confinement is checked for every file before any is opened, so a hostile package makes
        no runtime read anything outside it (not even to hash it).
        """
        for key, file, _, what in self._files():
            _check_confined(self.folder, self.path, key, file, what)
        for _, file, expected, what in self._files():
            file_path = self.folder / file
            if not file_path.is_file():
                raise CalmEdgeError(f"{file_path} ({what}) is missing from the package; "
                                    "copy the whole package folder again")
            if verify and sha256_of(file_path) != expected:
                raise CalmEdgeError(
                    f"{file_path} ({what}) does not match the sha256 in {self.path}: the file is corrupt or was "
                    "replaced; copy the package again or re-export it"
                )

    # ----- what the opened files must agree with ---------------------------------------------

    def check_graph_signature(self, name, inputs, outputs):
        """The `name` graph as its session reports it must take and give what the manifest's model section says.

        `inputs`, `outputs`: [(name, dtype, shape)] in the session's order, dtype as in a spec
        ("float32", "int64", ...; see ONNX_DTYPES) and a string or None for a dynamic axis. A
        graph swapped between roles, or dimensions that disagree with the model section, fail
        here with one error naming the graph and the input or output.
        """
        spec = self.specs()[name]
        for side, have in (("inputs", inputs), ("outputs", outputs)):
            problem = signature_problem(spec[side], have)
            if problem:
                raise CalmEdgeError(
                    f"{self.graph_path(name)}: graphs.{name} {side}: {problem}; the graph does not belong to this "
                    "manifest (files swapped between roles, or the model section edited): export the package again")

    def check_tokenizer(self, tokenizer_vocab_size):
        """The tokenizer's vocabulary must be the model's (an id beyond model.vocab_size has no embedding)."""
        too_big = tokenizer_vocab_size > self.vocab_size
        if too_big or (self.tokenizer_kind == "sentencepiece" and tokenizer_vocab_size != self.vocab_size):
            raise CalmEdgeError(
                f"{self.path}: model.vocab_size is {self.vocab_size}, but the tokenizer {self.tokenizer_file} has "
                f"{tokenizer_vocab_size} pieces; the tokenizer does not belong to this model: export the package "
                "again with its own tokenizer")


# ONNX Runtime's element type names, as a spec writes them.
ONNX_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
               "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool"}
# A float32 spec accepts a float16 graph: an fp16 package may keep an fp16 cache (the runtimes follow the graph).
COMPATIBLE_DTYPES = {"float32": {"float32", "float16"}}


def signature_problem(expected, have):
    """What is wrong with one side of a graph's signature, or None.

    `expected`: the spec's [{"name", "dtype", "shape"}]; `have`: [(name, dtype, shape)] from the
    session. Names must match as sets, then each dtype, rank and fixed dimension. The C++ runtime
    words the same problems the same way (runtime/cpp/src/package.cpp).
    """
    want = {io["name"]: io for io in expected}
    names = [n for n, _, _ in have]
    missing = [n for n in want if n not in names]
    extra = [n for n in names if n not in want]
    if missing or extra:
        return (f"the graph has {', '.join(extra) or 'none'} where the manifest expects "
                f"{', '.join(missing) or 'none'}")
    for io_name, dtype, shape in have:
        spec = want[io_name]
        if dtype not in COMPATIBLE_DTYPES.get(spec["dtype"], {spec["dtype"]}):
            return f"{io_name} has element type {dtype}, but the manifest says {spec['dtype']}"
        fixed = [d if isinstance(d, int) else None for d in shape]
        expected_fixed = [d if isinstance(d, int) else None for d in spec["shape"]]
        if len(fixed) != len(expected_fixed):
            return f"{io_name} has {len(fixed)} dimensions, but the manifest says {len(expected_fixed)}"
        for axis, (got, wanted) in enumerate(zip(fixed, expected_fixed)):
            if got is not None and wanted is not None and got != wanted:
                return f"{io_name} has {got} at dimension {axis}, but the manifest's model section gives {wanted}"
    return None


def _check_confined(folder, path, key, file, what):
    """`folder / file` must lie inside `folder` once every symbolic link is followed."""
    # resolve() follows every link it can (a dangling one too) and every linked folder on the way.
    try:
        resolved = (Path(folder) / file).resolve()
    except (OSError, RuntimeError):  # a loop of links
        raise CalmEdgeError(f"{path}: {key} is {file!r} ({what}), a symbolic link that cannot be followed (a loop); "
                            "a package must hold its own files: export the package again") from None
    if not resolved.is_relative_to(Path(folder).resolve()):
        raise CalmEdgeError(f"{path}: {key} is {file!r} ({what}), which leads outside the package folder through a "
                            "symbolic link; a package must hold its own files: export the package again")


def read_manifest(folder, verify=True):
    """The checked manifest of the package in `folder` as its JSON dict (see `Manifest.read`)."""
    return Manifest.read(folder, verify=verify).data


# ----- the schema ------------------------------------------------------------------------------


def _check_schema(data, path):
    """Every key a runtime relies on is present, of its type and in range; else one error naming the key."""
    def fail(key, problem):
        raise CalmEdgeError(f"{path}: {key} {problem}; the manifest is damaged or was edited, export the package again")

    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CalmEdgeError(f"{path} is not a calm-edge package manifest; export the package again")
    version = data.get("format_version")
    if not _is_int(version) or version < 1:
        fail("format_version", f"is {version!r}, not a format version (1 to {LATEST_VERSION})")
    if version > LATEST_VERSION:
        raise CalmEdgeError(
            f"{path} has package format version {version}, newer than this calm-edge reads ({LATEST_VERSION}); "
            "upgrade calm-edge (pip install -U calm-edge) or export the package with this version"
        )
    kind = data.get("kind")
    graphs = data.get("graphs")
    model = data.get("model")
    layout = model.get("decoder_layout", "whole") if isinstance(model, dict) else "whole"
    expected = SPLIT_GRAPHS if kind == "calm" and layout == "split" else GRAPHS.get(kind, ())
    if kind not in KINDS or not isinstance(graphs, dict) or set(graphs) != set(expected):
        listed = sorted(graphs) if isinstance(graphs, dict) else graphs
        raise CalmEdgeError(f"{path} lists graphs {listed} for kind {kind!r}; export the package again")

    if not isinstance(model, dict):
        fail("model", "is missing or not an object")
    if layout not in DECODER_LAYOUTS or (layout == "split" and kind != "calm"):
        fail("model.decoder_layout", f"is {layout!r}, not one of {', '.join(DECODER_LAYOUTS)} (split: CALM only)")
    if layout == "split" and version < 3:
        fail("format_version", f"is {version}, but a split decoder (model.decoder_layout) needs version 3")
    positive = ["chunk_size", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                "max_context"] + (["latent_size", "noise_size"] if kind == "calm" else []) + (
                   ["decoder_hidden_size"] if layout == "split" else [])
    for key in positive:
        if not _is_int(model.get(key)) or model[key] < 1:
            fail(f"model.{key}", f"is {model.get(key)!r}, not a positive whole number")
    for key in positive:
        if key != "max_context" and model[key] > MAX_DIMENSION:
            fail(f"model.{key}", f"is {model[key]}, beyond the {MAX_DIMENSION} calm-edge allows for any dimension")
    if kind == "ar" and model["chunk_size"] != 1:
        fail("model.chunk_size", f"is {model['chunk_size']}, but an AR package generates one token per step (1)")
    if model["max_context"] > MAX_CONTEXT:
        fail("model.max_context", f"is {model['max_context']}, beyond the {MAX_CONTEXT} positions calm-edge allocates")
    if model["num_heads"] % model["num_kv_heads"]:
        fail("model.num_kv_heads", f"({model['num_kv_heads']}) does not divide num_heads ({model['num_heads']})")
    special = model.get("special_ids")
    if not isinstance(special, dict) or not all(_is_int(special.get(k)) for k in ("eos", "pad")):
        fail("model.special_ids", "must give whole-number eos and pad ids")
    for key, value in special.items():
        if _is_int(value) and not 0 <= value < model["vocab_size"]:
            fail(f"model.special_ids.{key}", f"is {value}, outside the vocabulary of {model['vocab_size']}")

    if model.get("prompt_fill", "left-eos") not in PROMPT_FILLS:
        fail("model.prompt_fill", f"is {model.get('prompt_fill')!r}, not one of {', '.join(PROMPT_FILLS)}")
    tokenizer = data.get("tokenizer")
    if not isinstance(tokenizer, dict):
        fail("tokenizer", "is missing or not an object")
    _check_file_entry(tokenizer, "tokenizer", fail)
    tokenizer_kind = tokenizer.get("kind", "sentencepiece")
    if not isinstance(tokenizer_kind, str) or tokenizer_kind not in TOKENIZER_FILES:  # a list would not hash
        fail("tokenizer.kind", f"is {tokenizer_kind!r}, not one of {', '.join(TOKENIZER_FILES)}")
    if not isinstance(tokenizer.get("add_bos", False), bool):
        fail("tokenizer.add_bos", f"is {tokenizer.get('add_bos')!r}, not true or false")
    if version < 2 and (set(tokenizer) - {"file", "sha256"} or "prompt_fill" in model):
        fail("format_version", "is 1, but the manifest uses version 2's tokenizer kind or prompt fill")
    for name, graph in graphs.items():
        if not isinstance(graph, dict):
            fail(f"graphs.{name}", "is not an object")
        _check_file_entry(graph, f"graphs.{name}", fail)
        if not _is_int(graph.get("bytes")) or graph["bytes"] < 0:
            fail(f"graphs.{name}.bytes", f"is {graph.get('bytes')!r}, not a size in bytes")
        for side in ("inputs", "outputs"):
            entries = graph.get(side)
            if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("name"), str)
                                                         for e in entries):
                fail(f"graphs.{name}.{side}", "must be a list of {name, dtype, shape}")
        if "external_data" in graph:
            if not isinstance(graph["external_data"], dict):
                fail(f"graphs.{name}.external_data", "is not an object")
            _check_file_entry(graph["external_data"], f"graphs.{name}.external_data", fail)
    quantization = data.get("quantization")
    if not isinstance(quantization, dict) or not isinstance(quantization.get("mode"), str):
        fail("quantization.mode", "is missing or not a string")
    for key in ("provenance", "validation"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            fail(key, "is not an object")


def _check_file_entry(entry, key, fail):
    """A {"file", "sha256"} entry whose file is a plain name inside the package folder."""
    file = entry.get("file")
    if not isinstance(file, str) or not file:
        fail(f"{key}.file", f"is {file!r}, not a file name")
    parts = PurePosixPath(file).parts
    if PurePosixPath(file).is_absolute() or "\\" in file or ".." in parts or file.startswith("~"):
        fail(f"{key}.file", f"is {file!r}, which leads outside the package folder")
    digest = entry.get("sha256")
    if not isinstance(digest, str) or len(digest) != 64:
        fail(f"{key}.sha256", f"is {digest!r}, not a sha256")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)
