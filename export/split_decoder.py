"""`calm-edge upgrade`: rewrite a CALM package's whole decoder as a split one (package format 3).

    upgrade_package("models/calm-small-int4", "packages/calm-small-int4-split")

A package exported before format 3 (or with `--decoder-layout whole`) has one decoder graph,
latents -> token ids. Lazy decoding (runtime/sampling.py, `lazy_batch_choice`) needs it in two:
the decoder up to its last states, and the head that projects states onto the vocabulary and
takes the argmax. Re-exporting needs the training checkpoint; this cuts the graph instead, so a
package that is all a user has (a quantized one, say) gets the fast layout with the very weights
and operators it had: the head is the graph's last product (MatMul, or int4's MatMulNBits) with
what it multiplies by, and its ArgMax; the decoder is everything else.

The result is validated before it replaces anything: the new decoder must give the same token
ids as the old one on random and real latents, and generation at T = 1 and T = 1/2 (where the
runtime decodes lazily) must be token-identical to the old package's. The manifest keeps the
source's quantization record, gives the head the decoder's mode, and records the upgrade under
validation.
"""
import shutil

import numpy as np

from calm_edge.errors import CalmEdgeError
from calm_edge.fileio import atomic_output_dir, sha256_of
from calm_edge.runtime import package
from calm_edge.runtime.generator import GeneratorParams, generate_tokens
from calm_edge.runtime.model import Model

PROJECTIONS = ("MatMul", "MatMulNBits")  # the head's product, as exported (fp32) or quantized to int4
STATES = "decoder_states"


def _cut(decoder):
    """(decoder graph, head graph, state width) from a whole decoder's ONNX model."""
    import onnx
    from onnx import helper

    graph = decoder.graph
    producer = {out: node for node in graph.node for out in node.output}
    initializers = {i.name: i for i in graph.initializer}
    argmax = producer.get("token_ids")
    projection = producer.get(argmax.input[0]) if argmax is not None and argmax.op_type == "ArgMax" else None
    if projection is None or projection.op_type not in PROJECTIONS or not all(
            name in initializers for name in projection.input[1:] if name):
        raise CalmEdgeError("this package's decoder does not end in a weight product and an argmax that calm-edge can "
                            "cut (its quantization rewrote it); export the model again with `calm-edge export` "
                            "(split is the default) and quantize that")
    states = projection.input[0]
    head_nodes = [projection, argmax]
    body_nodes = [n for n in graph.node if n not in head_nodes]
    if any(name in (projection.output[0], "token_ids") for n in body_nodes for name in n.input):
        raise CalmEdgeError("this package's decoder uses its logits beyond the argmax; export the model again")
    if projection.op_type == "MatMul":
        width = initializers[projection.input[1]].dims[0]
    else:
        width = next(a.i for a in projection.attribute if a.name == "K")

    def renamed(nodes):
        copies = []
        for node in nodes:
            node = onnx.NodeProto.FromString(node.SerializeToString())
            node.input[:] = [STATES if name == states else name for name in node.input]
            node.output[:] = [STATES if name == states else name for name in node.output]
            copies.append(node)
        return copies

    def model_of(nodes, inputs, outputs, name):
        used = {name for node in nodes for name in node.input}
        graph_ = helper.make_graph(nodes, name, inputs, outputs, [i for i in graph.initializer if i.name in used])
        model = helper.make_model(graph_, opset_imports=decoder.opset_import, producer_name="calm-edge upgrade")
        model.ir_version = decoder.ir_version
        onnx.checker.check_model(model)
        return model

    K = decoder.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    float_, int64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    body = model_of(renamed(body_nodes), list(graph.input),
                    [helper.make_tensor_value_info(STATES, float_, ["rows", K, width])], "decoder")
    head = model_of(renamed(head_nodes), [helper.make_tensor_value_info(STATES, float_, ["tokens", width])],
                    [helper.make_tensor_value_info("token_ids", int64, ["tokens"])], "decoder_head")
    return body, head, width


def _same_tokens(old, new, seed):
    """The checks of the module docstring; returns their figures, raises on any difference."""
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((256, old.manifest.latent_size)).astype(np.float32)
    noise = rng.random((4, 64, old.noise_size), dtype=np.float32)
    ids = old.tokenizer.encode("The history of the city begins with a small harbour on the river") * 4
    hidden = old.hidden_states(ids[:4 * old.chunk_size])  # whole chunks, as teacher forcing takes them
    real = old.sample_latents(hidden[-4:], noise).reshape(-1, old.manifest.latent_size)
    figures = {}
    for name, batch in (("random_latents", latents), ("real_latents", real)):
        mismatches = int((old.decode(batch) != new.decode(batch)).sum())
        if mismatches:
            raise CalmEdgeError(f"upgrade check failed: the split decoder gives {mismatches} different token ids on "
                                f"{name.replace('_', ' ')}; keep the original package")
        figures[name] = len(batch)
    prompts = [old.tokenizer.encode(t) for t in ("In the beginning", "The river was", "After the war ended, many")]
    for temperature in (1.0, 0.5):
        params = GeneratorParams(max_new_tokens=64, temperature=temperature, seed=seed, stop_at_eos=False)
        if generate_tokens(old, prompts, params) != generate_tokens(new, prompts, params):
            raise CalmEdgeError(f"upgrade check failed: generation at T = {temperature:g} differs from the original "
                                "package's; keep the original package")
        figures[f"generation_T={temperature:g}"] = f"{len(prompts)} prompts x 64 tokens identical"
    return figures


def upgrade_package(source, out, force=False, seed=0):
    """Write `source` (a CALM package with a whole decoder) to `out` with its decoder split; returns the manifest."""
    import onnx

    manifest = package.Manifest.read(source)
    if manifest.kind != "calm":
        raise CalmEdgeError(f"{source} is an {manifest.kind} package; only a CALM package has a decoder to split")
    if manifest.decoder_layout == "split":
        raise CalmEdgeError(f"{source} already has a split decoder (format version {manifest.format_version}); "
                            "nothing to upgrade")
    if manifest.graphs["decoder"].external_data:
        raise CalmEdgeError(f"{source}'s decoder keeps its weights in external data; export the model again instead")
    old = Model(source, prepack_weights=False)
    with atomic_output_dir(out, force=force, what="package", inputs={"--package": source}) as tmp:
        for name, graph in manifest.graphs.items():
            if name != "decoder":
                shutil.copyfile(manifest.graph_path(name), tmp / graph.file)
                if graph.external_data:
                    shutil.copyfile(manifest.file(graph.external_data["file"]), tmp / graph.external_data["file"])
        shutil.copyfile(manifest.tokenizer_path, tmp / manifest.tokenizer_file)
        body, head, width = _cut(onnx.load(str(manifest.graph_path("decoder"))))
        model = {**manifest.model_section, "decoder_layout": "split", "decoder_hidden_size": width}
        specs = package.graph_specs("calm", model)
        onnx.save(body, str(tmp / specs["decoder"]["file"]))
        onnx.save(head, str(tmp / specs["decoder_head"]["file"]))
        quantization = dict(manifest.quantization)
        modes = dict(quantization.get("graphs", {}))
        modes["decoder_head"] = modes.get("decoder", "fp32")
        quantization["graphs"] = modes
        if "decoder" in (quantization.get("settings") or {}):
            quantization["settings"] = {**quantization["settings"], "decoder_head": quantization["settings"]["decoder"]}
        about_tokenizer = {"tokenizer_kind": manifest.tokenizer_kind, "add_bos": manifest.add_bos}
        package.write_manifest(tmp, "calm", model, manifest.provenance, quantization, manifest.validation,
                               **about_tokenizer)
        figures = _same_tokens(old, Model(tmp, prepack_weights=False), seed)
        validation = {**manifest.validation,
                      "upgrade": {"from": {"package": str(source),
                                           "manifest_sha256": sha256_of(manifest.path),
                                           "format_version": manifest.format_version},
                                  "identical_to_source": figures}}
        package.write_manifest(tmp, "calm", model, manifest.provenance, quantization, validation, **about_tokenizer)
    return package.Manifest.read(out, verify=False)
