"""Graphs over 2 GB: their weights in one ONNX external-data file beside the graph, `NAME.onnx.data`.

A protobuf message cannot exceed 2 GB, so a graph of CALM-L's or CALM-XL's backbone keeps its
weights outside the `.onnx` file. torch's exporter then writes one file per weight next to the graph;
`gather` streams them, one at a time, into the single `NAME.onnx.data` that the package format
names (with its sha256) and both runtimes load, and removes the rest. Nothing here holds more than
one weight in memory, so a 1.8 B-parameter model is exported with one copy of its weights beyond
the model itself (the exporter's own). Each weight starts on a 4 KiB boundary, so ONNX Runtime can
map it into memory instead of reading it.

`move_out` does the same for a graph that torch wrote whole: below 2 GB, but over the size from
which `export` keeps weights outside anyway (`EXTERNAL_DATA_BYTES`, 1 GiB; tests lower it to
exercise the path on tiny models). From that size on external data pays even where protobuf
would not demand it: ONNX Runtime maps the file instead of parsing a copy of it, and the tools
(ONNX's opset converter, the quantizers) handle the graph without its weights; CALM-M's backbone
(1.4 GB) is written so, and every graph of calm-edge's own models stays whole.
"""
from pathlib import Path

ALIGNMENT = 4096
EXTERNAL_DATA_BYTES = 1 << 30  # graphs whose weights reach this size keep them in NAME.onnx.data
COPY_BLOCK = 1 << 24


def data_file_name(graph_path):
    return Path(graph_path).name + ".data"


def external_tensors(model):
    """Every tensor of `model` (initializers, also in subgraphs) whose data lies in an external file."""
    import onnx

    def walk(graph):
        for tensor in graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                yield tensor
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attribute.g)
    return list(walk(model.graph))


def gather(graph_path):
    """Stream every external weight of the graph at `graph_path` into one aligned NAME.onnx.data; returns its path."""
    import onnx

    graph_path = Path(graph_path)
    folder, target = graph_path.parent, graph_path.parent / data_file_name(graph_path)
    model = onnx.load(str(graph_path), load_external_data=False)
    sources = set()
    part = target.with_name(target.name + ".part")
    with open(part, "wb") as out:
        for tensor in external_tensors(model):
            info = {entry.key: entry.value for entry in tensor.external_data}
            source = folder / info["location"]
            offset = int(info.get("offset", 0))
            length = int(info.get("length", source.stat().st_size - offset))
            out.write(b"\0" * (-out.tell() % ALIGNMENT))
            start = out.tell()
            with open(source, "rb") as f:
                f.seek(offset)
                left = length
                while left:
                    block = f.read(min(COPY_BLOCK, left))
                    out.write(block)
                    left -= len(block)
            del tensor.external_data[:]
            for key, value in (("location", target.name), ("offset", str(start)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            sources.add(source)
    onnx.save(model, str(graph_path))  # the graph without its weights: small
    part.replace(target)
    for source in sources - {target}:
        source.unlink(missing_ok=True)
    return target


def move_out(graph_path):
    """Move the weights of a graph written whole into NAME.onnx.data (a graph below 2 GB: it fits in memory)."""
    import onnx

    graph_path = Path(graph_path)
    model = onnx.load(str(graph_path))
    onnx.save(model, str(graph_path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=data_file_name(graph_path), size_threshold=0)
    return gather(graph_path)  # aligned, as every external-data file of a package


def weight_bytes(module):
    """The bytes of a torch module's parameters and buffers: what its graph's weights will take."""
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
