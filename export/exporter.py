"""`calm-edge export`: a trained checkpoint in, a validated model package out.

Steps, all inside a temporary folder that replaces `out` only once everything passed:
  1. export each graph of the package (`graphs.py`) and copy the tokenizer;
  2. validate, as optimum does: every graph in ONNX Runtime against its PyTorch module on random
     and on real inputs, with the largest absolute difference per output (`validate.py`); and the
     whole generation loop over the graphs against the PyTorch reference, token for token;
  3. write manifest.json: the model's dimensions, each graph's file, sha256 and signature, the
     training provenance and the validation figures.

A failure at any step raises a `CalmEdgeError` and leaves an existing package untouched.
"""
import copy
import json
import logging
import shutil
import time

from calm_edge.errors import CalmEdgeError
from calm_edge.export import external_data, graphs, validate
from calm_edge.export import fused_attention as fused_attention_module
from calm_edge.export import optimize as optimize_module
from calm_edge.fileio import atomic_output_dir
from calm_edge.runtime import package
from calm_edge.training.language_models import SUMMARY_FILE, load_language_model

log = logging.getLogger(__name__)


def provenance(saved):
    """The manifest's provenance for the training checkpoint `saved`, with its run's summary when there is one."""
    summary_path = saved.folder.parent.parent / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    return package.provenance_section(saved.folder, saved.trainer, saved.config.to_dict(), summary)


def export_package(checkpoint, out, force=False, kind=None, e2e_prompts=3, e2e_tokens=64, seed=0, progress=True,
                   optimize=False, fused_attention=False, external_data_bytes=external_data.EXTERNAL_DATA_BYTES,
                   decoder_layout="split"):
    """Export the CALM or AR checkpoint at `checkpoint` to the package folder `out`.

    kind: "calm" or "ar" to insist on a model kind (the CLI's --calm / --ar), None for either.
    optimize: apply ONNX Runtime's transformer fusions to the backbone / ar graph (`optimize.py`)
    before validation, so the validated graph is the one shipped.
    fused_attention: write each layer's attention as ONNX Runtime's GroupQueryAttention node and
    its rotary embeddings as RotaryEmbedding nodes (`fused_attention.py`); PyTorch's reference
    stays the plain model.
    external_data_bytes: a graph whose weights reach this size keeps them in NAME.onnx.data (graphs
    over 2 GB must; the default is 1 GiB, see external_data.py).
    decoder_layout: a CALM package's decoder "split" (format version 3: decoder + decoder_head, so
    the runtime decodes only the tokens a step needs) or "whole" (versions 1 and 2's one graph, for
    runtimes that read nothing newer); see runtime/package.py.
    """
    started = time.perf_counter()
    with atomic_output_dir(out, force=force, what="package", inputs={f"--{kind or 'calm'}": checkpoint}) as tmp:
        model, saved = load_language_model(checkpoint)
        if kind is not None and saved.kind != kind:
            raise CalmEdgeError(f"{saved.folder} holds a {saved.kind} checkpoint, not {kind}; pass it with --{saved.kind}")
        kind = saved.kind
        section = package.model_section(kind, saved.config, decoder_layout)
        specs = package.graph_specs(kind, section)
        exported = model
        if fused_attention:  # a copy, so that validation compares with the model as trained
            exported = copy.deepcopy(model)
            fused_attention_module.fuse_attention(exported)
        for name, module in graphs.wrappers(kind, exported, decoder_layout).items():
            log.info("exporting %s", name)
            graphs.export_graph(module, specs[name], section, tmp / specs[name]["file"], external_data_bytes)
            if fused_attention:
                fused_attention_module.place_bias(tmp / specs[name]["file"])
        fused = {}
        if optimize:
            for name in set(specs) & set(optimize_module.FUSABLE_GRAPHS):
                path = tmp / specs[name]["file"]
                fused[name] = optimize_module.optimize_graph(path, path, section["num_heads"], section["hidden_size"])
                log.info("optimised %s: %s", name, fused[name])
        tokenizer = saved.tokenizer()
        shutil.copyfile(saved.tokenizer_path, tmp / package.TOKENIZER_FILES[tokenizer.kind])
        about_tokenizer = {"tokenizer_kind": tokenizer.kind, "add_bos": getattr(tokenizer, "add_bos", False)}
        # The manifest first without validation figures, so the runtime can open the folder.
        package.write_manifest(tmp, kind, section, provenance(saved), **about_tokenizer)
        report = validate.validate_package(model, tmp, e2e_prompts=e2e_prompts, e2e_tokens=e2e_tokens, seed=seed,
                                           progress=progress, fused_attention=fused_attention)
        report["export_seconds"] = round(time.perf_counter() - started, 2)
        report["graph_optimisation"] = {"applied": bool(optimize), "fused_operators": fused,
                                        "fused_attention": bool(fused_attention)}
        package.write_manifest(tmp, kind, section, provenance(saved), validation=report, **about_tokenizer)
    return package.Manifest.read(out, verify=False)
