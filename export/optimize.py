"""Offline graph optimisation of an exported package, and the measurement that decides it.

ONNX Runtime already applies its generic graph optimisations (constant folding, MatMul+Add,
...) each time a session loads a graph. What it does not do at load time are the transformer
fusions of `onnxruntime.transformers.optimizer`: here RMSNorm becomes one
SimplifiedLayerNormalization node, and RMSNorm after a residual add a
SkipSimplifiedLayerNormalization node. (Its attention fusions match GPT-2 and BERT exports, not
our grouped-query attention, so attention stays as exported.) The fused graphs hold contrib
operators of ONNX Runtime, so they run on ONNX Runtime only, which is what a package is for.

`optimize_graph` rewrites one graph file; `time_graph` measures a graph at the decode shape, so
a benchmark can compare the two in the same run (benchmarks/export.py). The export applies the
fusions only when asked (`calm-edge export --optimize`): on the `small` models the fused decode
step's median was 0.94x (CALM backbone) and 0.89x (AR) of the exported graph's, but the seven
repeats of each overlap (benchmarks/results/export_small.json), so the gain is not yet
established on this noisy 2-core machine.
"""
import time

import numpy as np

FUSABLE_GRAPHS = ("backbone", "ar")


def optimize_graph(path, out, num_heads, hidden_size):
    """Fuse RMSNorm (and residual + RMSNorm) in the graph at `path`; write it to `out`.

    Returns the fused operator counts, e.g. {"SimplifiedLayerNormalization": 1, ...}.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("gpt2")
    optimized = optimize_model(str(path), model_type="gpt2", num_heads=num_heads, hidden_size=hidden_size,
                               opt_level=0, optimization_options=options, use_gpu=False)
    optimized.save_model_to_file(str(out))
    return {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}


def decode_feeds(session, model_section, past=256, batch=1):
    """Inputs of one decode step (S = 1) after `past` positions, random but well-formed."""
    rng = np.random.default_rng(0)
    K = model_section["chunk_size"]
    feeds = {}
    for io in session.get_inputs():
        if io.name == "input_ids":
            feeds[io.name] = rng.integers(4, model_section["vocab_size"], (batch, K), dtype=np.int64)
        elif io.name == "attention_mask":
            feeds[io.name] = np.ones((batch, past + 1), np.int64)
        elif io.name == "position_ids":
            feeds[io.name] = np.full((batch, 1), past, np.int64)
        elif io.name.startswith("past_key_values"):
            shape = (batch, model_section["num_kv_heads"], past, model_section["head_dim"])
            feeds[io.name] = rng.standard_normal(shape).astype(np.float32)
        elif io.name == "hidden":
            feeds[io.name] = rng.standard_normal((batch, model_section["hidden_size"])).astype(np.float32)
        elif io.name == "noise":
            feeds[io.name] = rng.random((batch, 16, model_section["noise_size"])).astype(np.float32)
        elif io.name == "latents":
            feeds[io.name] = rng.standard_normal((16, model_section["latent_size"])).astype(np.float32)
    return feeds


def time_graphs(paths, model_section, threads=None, repeats=7, calls=20):
    """Median milliseconds per call of each graph in `paths` ({label: file}), interleaved so
    that every label sees the same machine state. A label "X (fused)" is also compared with
    graph "X" on the same inputs (largest absolute difference of the first output)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    sessions = {label: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
                for label, p in paths.items()}
    feeds = {label: decode_feeds(s, model_section) for label, s in sessions.items()}
    samples = {label: [] for label in sessions}
    for label, session in sessions.items():
        session.run(None, feeds[label])  # warm-up
    for _ in range(repeats):
        for label, session in sessions.items():
            began = time.perf_counter()
            for _ in range(calls):
                session.run(None, feeds[label])
            samples[label].append(1e3 * (time.perf_counter() - began) / calls)
    result = {label: {"median_ms": round(float(np.median(v)), 3), "all_ms": [round(x, 3) for x in v]}
              for label, v in samples.items()}
    for label in sessions:
        if label.endswith(" (fused)"):
            base = label[:-len(" (fused)")]
            fused_out = sessions[label].run(None, feeds[base])[0]
            result[label]["max_abs_diff_vs_exported"] = float(np.abs(fused_out - sessions[base].run(None, feeds[base])[0]).max())
    return result
