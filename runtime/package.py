"""The model package, format version 1: the one module that knows its layout.

A package is a folder with everything a runtime needs and nothing else:

    manifest.json       what the model is, where each file is, how each graph is called
    tokenizer.model     the SentencePiece model
    CALM:  backbone.onnx  energy_head.onnx  decoder.onnx
    AR:    ar.onnx

Graphs (names follow optimum and onnxruntime-genai; `GRAPH_SPECS` below is the contract):

    backbone     input_ids int64 [batch, S*K], attention_mask int64 [batch, P+S],
                 position_ids int64 [batch, S], past_key_values.{i}.key|value [batch, kv_heads, P, head_dim]
                 -> hidden [batch, S, hidden], present.{i}.key|value [batch, kv_heads, P+S, head_dim]
                 The same graph serves prefill (S > 1, P = 0) and decode (S = 1).
    energy_head  hidden [batch, hidden], noise [batch, N, noise_size] -> latents [batch, N, latent]
                 noise is the shared generator's raw uniforms in [0, 1) (see runtime/rng.py).
    decoder      latents [M, latent] -> token_ids int64 [M, K]   (argmax inside the graph)
    ar           as backbone with K = 1, -> logits [batch, vocab] of the last position, present.*

The exporter writes packages with `write_manifest`; runtimes open them with `read_manifest`,
which checks the format version, every file's presence and sha256, and the graph list, and
raises a `CalmEdgeError` naming the file and the fix.
"""
import json
from pathlib import Path

from calm_edge.errors import CalmEdgeError
from calm_edge.fileio import sha256_of, write_json_atomic

FORMAT = "calm-edge-package"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"
KINDS = ("calm", "ar")
GRAPHS = {"calm": ("backbone", "energy_head", "decoder"), "ar": ("ar",)}


def _cache_names(num_layers, prefix):
    return [f"{prefix}.{i}.{part}" for i in range(num_layers) for part in ("key", "value")]


def graph_specs(kind, model):
    """Inputs and outputs of each graph of a `kind` package, given its manifest's "model" section.

    Each input and output is {"name", "dtype", "shape"}, with a string for a dynamic axis.
    """
    layers, kv, head_dim = model["num_layers"], model["num_kv_heads"], model["head_dim"]
    past = [{"name": n, "dtype": "float32", "shape": ["batch", kv, "past", head_dim]}
            for n in _cache_names(layers, "past_key_values")]
    present = [{"name": n, "dtype": "float32", "shape": ["batch", kv, "total", head_dim]}
               for n in _cache_names(layers, "present")]
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
    return {
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


def dynamic_axes(spec):
    """{name: {axis: label}} for torch.onnx.export, from one graph's spec."""
    return {io["name"]: {i: d for i, d in enumerate(io["shape"]) if isinstance(d, str)}
            for io in spec["inputs"] + spec["outputs"]}


def write_manifest(folder, kind, model, provenance, quantization=None, validation=None, extra_files=()):
    """Write manifest.json for the graph and tokenizer files already in `folder`; returns it."""
    folder = Path(folder)
    specs = graph_specs(kind, model)
    graphs = {}
    for name, spec in specs.items():
        graphs[name] = {**spec, "sha256": sha256_of(folder / spec["file"]),
                        "bytes": (folder / spec["file"]).stat().st_size}
        # ONNX external data (graphs over 2 GB) travels with its graph.
        data_file = folder / (spec["file"] + ".data")
        if data_file.exists():
            graphs[name]["external_data"] = {"file": data_file.name, "sha256": sha256_of(data_file)}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "model": model,
        "tokenizer": {"file": TOKENIZER_FILE, "sha256": sha256_of(folder / TOKENIZER_FILE)},
        "graphs": graphs,
        "quantization": quantization or {"mode": "fp32", "graphs": {name: "fp32" for name in graphs}},
        "provenance": provenance,
        "validation": validation or {},
    }
    write_json_atomic(folder / MANIFEST_FILE, manifest)
    return manifest


def read_manifest(folder, verify=True):
    """The checked manifest of the package in `folder` (sha256 of every file when `verify`)."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not folder.is_dir():
        raise CalmEdgeError(f"model package {folder} does not exist; create one with `calm-edge export`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CalmEdgeError(f"{path} not found: {folder} is not a calm-edge model package; export one with `calm-edge export`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CalmEdgeError(f"{path} is corrupt ({e}); export the package again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CalmEdgeError(f"{path} is not a calm-edge package manifest; export the package again")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CalmEdgeError(
            f"{path} has package format version {version}, newer than this calm-edge reads ({FORMAT_VERSION}); "
            "upgrade calm-edge (pip install -U calm-edge) or export the package with this version"
        )
    kind = manifest.get("kind")
    if kind not in KINDS or set(manifest.get("graphs", {})) != set(GRAPHS[kind]):
        raise CalmEdgeError(f"{path} lists graphs {sorted(manifest.get('graphs', {}))} for kind {kind!r}; export the package again")
    files = [(manifest["tokenizer"]["file"], manifest["tokenizer"]["sha256"], "tokenizer")]
    for name, graph in manifest["graphs"].items():
        files.append((graph["file"], graph["sha256"], f"{name} graph"))
        if "external_data" in graph:
            files.append((graph["external_data"]["file"], graph["external_data"]["sha256"], f"{name} graph's data"))
    for file, expected, what in files:
        file_path = folder / file
        if not file_path.is_file():
            raise CalmEdgeError(f"{file_path} ({what}) is missing from the package; copy the whole package folder again")
        if verify and sha256_of(file_path) != expected:
            raise CalmEdgeError(
                f"{file_path} ({what}) does not match the sha256 in {path}: the file is corrupt or was replaced; "
                "copy the package again or re-export it"
            )
    return manifest
