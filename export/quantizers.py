"""One ONNX graph file in, its quantized version out: ONNX Runtime's own tools, one per mode.

    int8-dynamic  weights of MatMul/Gemm to int8 per output channel; activations quantized on the
                  fly at each call (quantize_dynamic -> DynamicQuantizeMatMul / MatMulInteger)
    int8-static   QDQ: int8 weights per channel and uint8 activations whose ranges were
                  calibrated (min/max) on real inputs of the graph (quantize_static)
    fp16          every float weight and op in float16, inputs and outputs kept float32 so the
                  package's signature is unchanged (onnxruntime.transformers.float16)
    int4          weight-only: MatMul weights to 4-bit blocks of `INT4_BLOCK_SIZE` with one scale
                  each, run by the MatMulNBits kernel, and the token embedding tables (Gather) in
                  the same blocks along the hidden axis, run by GatherBlockQuantized
                  (matmul_nbits_quantizer); without the tables an int4 package at vocabulary
                  8,192 would still carry 12.6 MB of fp32 embeddings

Both int8 modes quantize only MatMuls whose second input is a weight: the attention products of
two activations (QK^T, attention x V) stay float, because their ranges change with the prompt
far more than the weights' products do.

Nothing here writes quantization arithmetic by hand; these functions choose the tools'
settings and record them (`settings`), so the manifest says exactly what was done.

Graphs over 2 GB (CALM-L's and CALM-XL's backbones) come with their weights in NAME.onnx.data: the
tools read them from there, and a result over 2 GB goes the same way (`_save`); int4 converts
the graph's opset before its weights are read in, since ONNX's converter cannot pass 2 GB.
"""
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from calm_edge.errors import CalmEdgeError
from calm_edge.export import external_data
from calm_edge.export.calibration import FeedReader

INT4_BLOCK_SIZE = 32  # the small models' widths (256..1024) are multiples; smaller blocks keep more precision
INT4_ACCURACY_LEVEL = 4  # MatMulNBits computes with int8 activations on CPU: the fast path
INT4_OPSET = 21  # the first opset with a 4-bit tensor type


@dataclass(frozen=True)
class Mode:
    name: str
    summary: str
    needs_calibration: bool


MODES = {
    "int8-dynamic": Mode("int8-dynamic", "int8 weights, activations quantized at run time", False),
    "int8-static": Mode("int8-static", "int8 QDQ, activation ranges calibrated on real inputs", True),
    "fp16": Mode("fp16", "float16 weights and arithmetic, float32 inputs and outputs", False),
    "int4": Mode("int4", "4-bit weight-only blocks (MatMulNBits)", False),
}


def check_mode(mode):
    if mode not in MODES:
        raise CalmEdgeError(f"unknown quantization mode {mode!r}; choose one of: {', '.join(MODES)}")
    return MODES[mode]


@contextmanager
def _quiet_tools():
    """ONNX Runtime's quantization tools log every node at INFO and advise shape pre-processing at
    WARNING (our exported graphs carry their shapes); keep the user's console readable. Failures
    still raise."""
    # The int4 tool calls logging.basicConfig(level=INFO) when imported, which would undo the
    # level set below if the import came later.
    import onnxruntime.quantization.matmul_nbits_quantizer  # noqa: F401

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_graph(mode, source, target, calibration_feeds=None):
    """Write the `mode` version of the ONNX graph `source` to `target`; returns the settings used."""
    check_mode(mode)
    with _quiet_tools():
        settings = {"int8-dynamic": _int8_dynamic, "int8-static": _int8_static, "fp16": _fp16,
                    "int4": _int4}[mode](str(source), str(target), calibration_feeds)
    if Path(str(target) + ".data").exists():
        external_data.gather(target)  # a tool's external data, aligned and in one file
    return settings


def _tensor_bytes(model):
    return sum(len(t.raw_data) or 4 * len(t.float_data) for t in model.graph.initializer)


def _save(model, target):
    """Save a graph, its weights in TARGET.data when they would pass protobuf's 2 GB."""
    import onnx

    if _tensor_bytes(model) >= external_data.EXTERNAL_DATA_BYTES:
        onnx.save(model, target, save_as_external_data=True, all_tensors_to_one_file=True,
                  location=external_data.data_file_name(target), size_threshold=1024)
    else:
        onnx.save(model, target)


def _large(source):
    """Whether a graph keeps its weights outside (the tools must then write theirs outside too)."""
    return Path(str(source) + ".data").exists()


def _int8_dynamic(source, target, _feeds):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    settings = {"tool": "onnxruntime.quantization.quantize_dynamic", "op_types": ["MatMul", "Gemm"],
                "weight_type": "int8", "per_channel": True, "weights_only_matmuls": True}
    quantize_dynamic(source, target, op_types_to_quantize=settings["op_types"], per_channel=True,
                     weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True},
                     use_external_data_format=_large(source))
    return settings


def _int8_static(source, target, feeds):
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not feeds:
        raise CalmEdgeError("int8-static needs calibration inputs; pass --calibration-data with some real text")
    settings = {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ", "op_types": ["MatMul", "Gemm"],
                "weight_type": "int8", "activation_type": "uint8", "per_channel": True, "calibration": "minmax",
                "calibration_feeds": len(feeds), "weights_only_matmuls": True}
    # The QDQ quantizer does not honour MatMulConstBOnly, so the activation products are named
    # explicitly to keep them float.
    quantize_static(source, target, FeedReader(feeds), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=settings["op_types"], per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=_activation_matmuls(source),
                    extra_options={"MatMulConstBOnly": True}, use_external_data_format=_large(source))
    return settings


def _activation_matmuls(path):
    """Names of the MatMul nodes whose second operand is not a weight (an initializer)."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    nodes = [node for node in graph.node if node.op_type == "MatMul" and node.input[1] not in weights]
    unnamed = [node for node in nodes if not node.name]
    if unnamed:
        raise CalmEdgeError(f"{path} has unnamed MatMul nodes, which int8-static cannot exclude; re-export the package")
    return [node.name for node in nodes]


def _fp16(source, target, _feeds):
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(source), keep_io_types=True)
    _save(model, target)
    return {"tool": "onnxruntime.transformers.float16.convert_float_to_float16", "keep_io_types": True}


def _int4(source, target, _feeds):
    import onnx
    from onnx.version_converter import convert_version
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # 4-bit tensors (the quantized embedding table) need opset 21. Left alone, the tool would only
    # relabel our opset-17 graph, which then fails to load (ReduceMean's axes moved from an
    # attribute to an input in opset 18); ONNX's converter rewrites the graph properly.
    from onnx.external_data_helper import load_external_data_for_model

    model = onnx.load(source, load_external_data=False)  # the converter works on the graph, not its weights
    if max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) < INT4_OPSET:
        model = convert_version(model, INT4_OPSET)
    load_external_data_for_model(model, str(Path(source).parent))

    # Gather along axis 1: each embedding row (one token) is cut into blocks of the hidden axis, so
    # a lookup dequantizes only the rows it reads.
    axes = (("MatMul", 0), ("Gather", 1))
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=INT4_BLOCK_SIZE, is_symmetric=True,
                                     accuracy_level=INT4_ACCURACY_LEVEL, op_types_to_quantize=("MatMul", "Gather"),
                                     quant_axes=axes)
    quantizer.process()
    _save(quantizer.model.model, target)
    return {"tool": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer", "bits": 4,
            "block_size": INT4_BLOCK_SIZE, "symmetric": True, "accuracy_level": INT4_ACCURACY_LEVEL,
            "op_types": ["MatMul", "Gather"], "quant_axes": dict(axes), "opset": INT4_OPSET}
