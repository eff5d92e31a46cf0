"""The torch modules that become the package's ONNX graphs, and their export.

Each wrapper computes exactly one graph of `calm_edge.runtime.package` from a trained model, with
the cache flattened into separate inputs and outputs (ONNX has no lists). Names, dtypes and
dynamic axes come from `package.graph_specs`, the single description of the format.

Export uses torch's TorchScript-based ONNX exporter (`dynamo=False`), opset 17: it handles the
dynamic batch, sequence and past-length axes of the cache graph in one trace, and needs no
extra dependencies.
"""
import warnings

import torch
import torch.nn as nn

from calm_edge.export import external_data
from calm_edge.runtime import package

OPSET = 17


def _pair_up(flat):
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def _flatten(presents):
    return [t for pair in presents for t in pair]


class BackboneGraph(nn.Module):
    """CALM's step: token ids of S chunks plus the cache -> hidden states and the new cache."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def weight_modules(self):
        """The parts of the model whose weights this graph holds."""
        return [self.model.embed_tokens, self.model.input_proj, self.model.backbone]

    def forward(self, input_ids, attention_mask, position_ids, *past):
        hidden, presents = self.model.hidden_states(input_ids, attention_mask, position_ids, _pair_up(past))
        return (hidden, *_flatten(presents))


class EnergyHeadGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def weight_modules(self):
        return [self.model.energy_head]

    def forward(self, hidden, noise):
        return self.model.sample_latents(hidden, noise)


class DecoderGraph(nn.Module):
    """Latents -> token ids: the argmax happens inside, so logits never leave the graph."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def weight_modules(self):
        return [self.model.autoencoder]  # its decoder and tied embedding; the encoder's few layers besides

    def forward(self, latents):
        return self.model.decode_tokens(latents)


class DecoderStatesGraph(nn.Module):
    """Latents -> the decoder's last states [rows, K, H]: the decoder of a split package, all but the vocabulary."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def weight_modules(self):
        ae = self.model.autoencoder
        return [ae.from_latent, ae.decoder_chunk_layers, ae.expand, ae.decoder_token_layers, ae.decoder_norm]

    def forward(self, latents):
        return self.model.autoencoder.decode_states(latents)


class DecoderHeadGraph(nn.Module):
    """Decoder states [tokens, H] -> token ids [tokens]: the vocabulary projection and its argmax.

    A graph of its own so the runtime can send it only the positions it needs (runtime/sampling.py,
    `lazy_batch_choice`); each row's token depends on that row alone.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def weight_modules(self):
        return [self.model.autoencoder.embed]

    def forward(self, states):
        return self.model.autoencoder.logits_from_states(states).argmax(-1)


class ARGraph(nn.Module):
    """The baseline's step: logits of the last position and the new cache."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def weight_modules(self):
        return [self.model]

    def forward(self, input_ids, attention_mask, position_ids, *past):
        logits, presents = self.model.logits(input_ids, attention_mask, position_ids, _pair_up(past))
        return (logits[:, -1], *_flatten(presents))


def example_inputs(spec, model_section, batch=2, sequence=3, past=2, samples=4):
    """Tensors of the right dtypes and shapes for tracing one graph (axes sized distinctly)."""
    K = model_section.get("chunk_size", 1)
    sizes = {"batch": batch, "sequence": sequence, "sequence_tokens": sequence * K, "past": past,
             "total": past + sequence, "samples": samples, "rows": batch * samples, "tokens": batch * samples * K}
    tensors = []
    for io in spec["inputs"]:
        shape = [sizes[d] if isinstance(d, str) else d for d in io["shape"]]
        if io["name"] == "input_ids":
            tensors.append(torch.randint(4, model_section["vocab_size"], shape))
        elif io["name"] == "attention_mask":
            tensors.append(torch.ones(shape, dtype=torch.long))
        elif io["name"] == "position_ids":
            tensors.append(torch.arange(past, past + sequence).expand(batch, sequence).contiguous())
        elif io["name"] == "noise":
            tensors.append(torch.rand(shape))
        else:
            tensors.append(torch.randn(shape))
    return tuple(tensors)


def wrappers(kind, model, decoder_layout="whole"):
    """{graph name: torch module} for a model of `kind` (CALM: its decoder whole or split, see package.py)."""
    if kind == "ar":
        return {"ar": ARGraph(model)}
    graphs = {"backbone": BackboneGraph(model), "energy_head": EnergyHeadGraph(model)}
    if decoder_layout == "split":
        return {**graphs, "decoder": DecoderStatesGraph(model), "decoder_head": DecoderHeadGraph(model)}
    return {**graphs, "decoder": DecoderGraph(model)}


def export_graph(module, spec, model_section, path, external_data_bytes=external_data.EXTERNAL_DATA_BYTES):
    """Trace `module` to ONNX at `path` with the names and dynamic axes of `spec`.

    A graph whose weights reach `external_data_bytes` (or protobuf's 2 GB) is traced without them
    and gets them in `path` + ".data", streamed from the model a weight at a time
    (external_data.write_weights); any other graph is written whole, constants folded by torch.
    """
    inputs = example_inputs(spec, model_section)
    weight_bytes = sum(external_data.weight_bytes(m) for m in module.weight_modules())
    external = weight_bytes >= min(external_data_bytes, external_data.PROTOBUF_LIMIT)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's tracer warnings are about Python control flow it handles
        torch.onnx.export(
            module.eval(), inputs, str(path),
            input_names=[io["name"] for io in spec["inputs"]],
            output_names=[io["name"] for io in spec["outputs"]],
            dynamic_axes=package.dynamic_axes(spec),
            opset_version=OPSET,
            export_params=not external,
            do_constant_folding=not external,  # folding would make weights that only the exporter holds
            dynamo=False,
        )
    if external:
        external_data.write_weights(path, module.state_dict())
