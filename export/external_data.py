"""Big graphs: their weights in one ONNX external-data file beside the graph, `NAME.onnx.data`.

A protobuf message cannot exceed 2 GB, so the backbones of CALM-L and CALM-XL keep their weights
outside the `.onnx` file, and from `EXTERNAL_DATA_BYTES` (1 GiB; tests lower it to take the path on
tiny models) on so does every graph: ONNX Runtime then maps the file instead of parsing a copy of
it, and the tools (ONNX's opset converter, the quantizers) handle the graph without its weights.
CALM-M's backbone (1.4 GB) is written so; every graph of calm-edge's own models stays whole.

Such a graph is traced without its weights and `write_weights` streams them from the torch
tensors, one at a time, so an export holds the model and at most one weight beyond it (torch's
exporter, asked for the weights, builds the whole protobuf in memory below 2 GB, about 2.6 copies
of them at CALM-M). `gather` streams the external weights that a tool wrote (one file per weight,
or its own layout) into the same single aligned file. Each weight starts on a 4 KiB boundary, so
ONNX Runtime can map it into memory instead of reading it.
"""
from pathlib import Path

ALIGNMENT = 4096
EXTERNAL_DATA_BYTES = 1 << 30  # graphs whose weights reach this size keep them in NAME.onnx.data
PROTOBUF_LIMIT = 2 ** 31 - 1  # no graph at or over this size can keep its weights inside
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


def _align(out):
    """Pad the file `out` to the next ALIGNMENT boundary; returns the offset where the next weight starts."""
    out.write(b"\0" * (-out.tell() % ALIGNMENT))
    return out.tell()


def _locate(tensor, file_name, offset, length):
    """Point the initializer `tensor` at `length` bytes from `offset` of the external file `file_name`."""
    import onnx

    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", file_name), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


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
            start = _align(out)
            with open(source, "rb") as f:
                f.seek(offset)
                left = length
                while left:
                    block = f.read(min(COPY_BLOCK, left))
                    out.write(block)
                    left -= len(block)
            _locate(tensor, target.name, start, length)
            sources.add(source)
    onnx.save(model, str(graph_path))  # the graph without its weights: small
    part.replace(target)
    for source in sources - {target}:
        source.unlink(missing_ok=True)
    return target


def write_weights(graph_path, tensors):
    """Give the graph at `graph_path`, traced without its weights, its weights: `tensors` in NAME.onnx.data.

    torch's exporter, asked for no weights (`export_params=False`, no constant folding), names
    each weight a graph input after its state-dict key: `tensors` maps those names to the torch
    tensors. Each is written straight from the tensor, one at a time, aligned, and becomes an
    initializer. The one folding the graphs need is done here: a Transpose of a weight (every
    Linear's `x @ W.T`) becomes the transposed weight, so MatMuls read their weights directly, as
    ONNX Runtime and its quantizers expect; any other constant expression ONNX Runtime folds when
    it loads the graph. Identity nodes that torch puts on a weight used twice are followed.
    """
    import onnx

    graph_path = Path(graph_path)
    model = onnx.load(str(graph_path))  # no weights: small
    graph = model.graph
    weights = {i.name for i in graph.input if i.name in tensors}
    source = {name: name for name in weights}  # a value name -> the weight it is
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in source:
            source[node.output[0]] = source[node.input[0]]
    folded, keep = {}, []
    for node in graph.node:
        if node.op_type == "Transpose" and node.input[0] in source:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            folded[node.output[0]] = (source[node.input[0]], perm)
        else:
            keep.append(node)
    # Keep the nodes the outputs need (the Identity on a weight read only by a folded Transpose goes).
    used, live = {o.name for o in graph.output}, []
    for node in reversed(keep):
        if used & set(node.output):
            live.append(node)
            used |= set(node.input)
    del graph.node[:]
    graph.node.extend(reversed(live))
    kept_inputs = [i for i in graph.input if i.name not in weights]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    initializers = [(name, name, None) for name in sorted(weights) if name in used]
    initializers += [(name, weight, perm) for name, (weight, perm) in folded.items() if name in used]
    target = graph_path.parent / data_file_name(graph_path)
    part = target.with_name(target.name + ".part")
    with open(part, "wb") as out:
        for name, weight, perm in initializers:
            tensor = tensors[weight].detach()
            if weight != name:  # a folded Transpose (no perm: reversed axes, as ONNX says)
                tensor = tensor.permute(perm if perm is not None else list(reversed(range(tensor.dim()))))
            array = tensor.contiguous().cpu().numpy()
            start = _align(out)
            out.write(array.tobytes())
            initializer = graph.initializer.add()
            initializer.name, initializer.data_type = name, onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
            initializer.dims.extend(array.shape)
            _locate(initializer, target.name, start, array.nbytes)
            del array, tensor
    onnx.save(model, str(graph_path))
    part.replace(target)
    return target


def weight_bytes(module):
    """The bytes of a torch module's parameters and buffers: what its graph's weights will take."""
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
