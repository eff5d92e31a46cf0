"""`calm-edge quantize`: an fp32 model package in, a quantized package of the same format out.

    quantize_package("packages/calm-small", "packages/calm-small-int8", "int8-static",
                     calibration_data=["../shared/data/wiki-valid.jsonl"])

Steps, all in a temporary folder that replaces `out` only once everything passed (the rules of
`calm_edge.fileio.atomic_output_dir`: an existing `out` needs `force`, and a failure leaves it
untouched):

  1. open the fp32 package with the runtime (its manifest and every sha256 checked);
  2. run it on real text to record real inputs of every graph (`calibration.py`): validation
     inputs always, calibration inputs for int8-static;
  3. quantize each graph with ONNX Runtime's tool for the mode (`quantizers.py`), or copy it
     when the user keeps it in fp32 (`keep_fp32`: the graphs differ in sensitivity);
  4. write the manifest through `runtime.package` with the mode of every graph;
  5. open the new package, compare each graph with fp32 on the validation inputs and generate
     with it (`quant_validate.py`), and write the manifest again with those figures.

Validation text: the first windows of `calibration_data` when given (calibration uses the
windows after them, so the two never overlap), else a few built-in English sentences.
"""
import logging
import shutil
import time
from pathlib import Path

from tqdm import tqdm

from calm_edge.errors import CalmEdgeError
from calm_edge.export import calibration, quant_validate
from calm_edge.export.quantizers import MODES, check_mode, quantize_graph
from calm_edge.fileio import atomic_output_dir, check_apart, out_of_space, sha256_of
from calm_edge.runtime import package
from calm_edge.runtime.model import Model
from calm_edge.text_source import TextSource

log = logging.getLogger(__name__)

WINDOW_TOKENS = 64  # tokens per calibration window: 16 CALM chunks of K = 4, or 64 AR tokens
DECODE_STEPS = 8  # of each window, the last 8 steps are decode calls, the rest one prefill
VALIDATION_WINDOWS = 4
VALIDATION_TEXT = " ".join(quant_validate.GENERATION_PROMPTS) + (
    " The river rose for three days, and the people of the valley moved their animals to the hills."
    " When the water fell again, the fields were covered with a fine grey mud that made them rich."
    " In the following spring the town council voted to build a stone bridge across the narrows,"
    " and the work was given to a young engineer who had studied in the capital. He drew the plans"
    " himself, hired men from the nearby villages, and finished the bridge two years later, at half"
    " the cost that the council had expected. It still carries the main road to the north today."
    " The bridge appears in several paintings of the period, and a copy of the engineer's first"
    " drawing hangs in the museum beside the old market hall."
)


def _require_tools():
    """The quantization tools need onnx and onnx-ir beside onnxruntime: not part of the edge install."""
    missing = []
    for module in ("onnx", "onnx_ir"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise CalmEdgeError(f"quantization needs {', '.join(missing)}; install them with pip install 'calm-edge[quantize]'")


def _windows(model, tokens, max_windows, skip=0):
    width = WINDOW_TOKENS - WINDOW_TOKENS % model.chunk_size
    width = min(width, (model.max_context - 1) * model.chunk_size)
    return calibration.token_windows(tokens, width, max_windows, skip=skip)


def _feeds(model, windows, seed):
    chunks = len(windows[0]) // model.chunk_size
    prefill = max(1, chunks - DECODE_STEPS)
    return calibration.collect_feeds(model, windows, prefill, seed=seed)


def _check_request(manifest, source, out, mode, keep_fp32):
    check_mode(mode)
    if manifest.quantization_mode != "fp32":
        origin = (manifest.quantization_source or {}).get("package", "see its manifest")
        raise CalmEdgeError(f"{source} is already quantized ({manifest.quantization_mode}); quantize the fp32 package "
                            f"it came from ({origin})")
    graphs = list(manifest.graphs)
    unknown = sorted(set(keep_fp32) - set(graphs))
    if unknown:
        raise CalmEdgeError(f"--keep-fp32 {', '.join(unknown)}: no such graph in {source}; its graphs are {', '.join(graphs)}")
    if set(keep_fp32) >= set(graphs):
        raise CalmEdgeError(f"--keep-fp32 names every graph of {source}: nothing left to quantize; keep fewer graphs")
    check_apart(out, {"--package": source})  # before calibration, the slow part


def quantize_package(source, out, mode, keep_fp32=(), calibration_data=(), calibration_windows=32, text_field="text",
                     force=False, seed=0, progress=True):
    """Quantize the fp32 package `source` into `out`; returns the new manifest."""
    started = time.perf_counter()
    fp32 = Model(source, prepack_weights=False)
    manifest = fp32.manifest
    _check_request(manifest, source, out, mode, keep_fp32)
    _require_tools()
    if MODES[mode].needs_calibration and not calibration_data:
        raise CalmEdgeError(f"--mode {mode} calibrates on real text; pass --calibration-data FILE (e.g. a validation split)")

    if calibration_data:
        needed = (VALIDATION_WINDOWS + calibration_windows) * WINDOW_TOKENS  # no need to read a whole corpus
        tokens, described = TextSource(tuple(calibration_data), text_field=text_field).load_tokens(fp32.tokenizer,
                                                                                                  max_tokens=needed)
        tokens = tokens.tolist()
    else:
        tokens, described = fp32.tokenizer.encode(VALIDATION_TEXT) + [fp32.tokenizer.eos_id], "built-in sentences"
    validation_windows = _windows(fp32, tokens, VALIDATION_WINDOWS)
    validation_feeds = _feeds(fp32, validation_windows, seed)
    calibration_feeds, calibration_info = {}, None
    if MODES[mode].needs_calibration:
        windows = _windows(fp32, tokens, calibration_windows, skip=len(validation_windows))
        calibration_feeds = _feeds(fp32, windows, seed + 1)
        calibration_info = {"data": described, "windows": len(windows), "window_tokens": len(windows[0]),
                            "feeds": {name: len(f) for name, f in calibration_feeds.items()}, "seed": seed + 1}

    # The fp32 sessions go while the tools work: a tool holds a graph's weights itself, and a
    # 1.8 B-parameter package must not be in memory three times over. They come back to validate.
    del fp32
    with atomic_output_dir(out, force=force, what="package", inputs={"--package": source}) as tmp:
        modes, settings = {}, {}
        for name, graph in tqdm(manifest.graphs.items(), desc=f"quantizing ({mode})", unit=" graph",
                                disable=not progress):
            source_file = manifest.graph_path(name)
            if name in keep_fp32:
                shutil.copyfile(source_file, tmp / graph.file)
                if graph.external_data:
                    shutil.copyfile(manifest.file(graph.external_data["file"]), tmp / graph.external_data["file"])
                modes[name] = "fp32"
                continue
            log.info("quantizing %s to %s", name, mode)
            try:
                settings[name] = quantize_graph(mode, source_file, tmp / graph.file, calibration_feeds.get(name))
            except (CalmEdgeError, OSError):  # an OSError (disk full) is the output's, not the graph's
                raise
            except Exception as e:  # the ORT tools raise assorted exception types
                if out_of_space(tmp):
                    raise  # the disk is full, not the graph unquantizable: atomic_output_dir says so
                raise CalmEdgeError(f"onnxruntime's {mode} quantizer failed on {source_file} ({e}); "
                                    f"keep that graph in fp32 with --keep-fp32 {name}") from None
            modes[name] = mode
        shutil.copyfile(manifest.tokenizer_path, tmp / manifest.tokenizer_file)
        about_tokenizer = {"tokenizer_kind": manifest.tokenizer_kind, "add_bos": manifest.add_bos}
        quantization = {"mode": mode, "graphs": modes, "settings": settings, "calibration": calibration_info,
                        "source": {"package": str(source),
                                   "manifest_sha256": sha256_of(Path(source) / package.MANIFEST_FILE)}}
        # The manifest first without validation figures, so the runtime can open the folder.
        package.write_manifest(tmp, manifest.kind, manifest.model_section, manifest.provenance, quantization,
                               **about_tokenizer)
        validation = _validate(Model(source, prepack_weights=False), tmp, validation_feeds, modes, described, seed)
        validation["quantize_seconds"] = round(time.perf_counter() - started, 2)
        package.write_manifest(tmp, manifest.kind, manifest.model_section, manifest.provenance, quantization,
                               validation=validation, **about_tokenizer)
    return package.Manifest.read(out, verify=False)


def _validate(fp32, folder, feeds, modes, described, seed):
    try:
        quantized = Model(folder, prepack_weights=False)
    except CalmEdgeError as e:
        raise CalmEdgeError(f"the quantized package cannot be loaded: {e}; choose another --mode or --keep-fp32") from None
    graphs = {name: quant_validate.compare_graph(name, fp32.sessions[name], quantized.sessions[name], feeds[name])
              for name in modes if modes[name] != "fp32"}
    return {"reference": "the fp32 package's graphs on the same inputs",
            "inputs": {"data": described, "feeds": {name: len(f) for name, f in feeds.items()}},
            "graphs": graphs,
            "generation": quant_validate.compare_generation(fp32, quantized, seed=seed)}
