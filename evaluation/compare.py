"""`calm-edge eval compare`: several packages of one model in one table, each against its fp32 package.

For every package: its quantization mode (and per graph), graph sizes, BrierLM, CALM's token
reconstruction through its decoder graph, and decode tokens/s at batch 1 on the CPU. Each figure
is also given relative to the fp32 package of the same kind measured in the same run, so a table
made on a busy or a different machine still compares like with like. Speeds are measured
round-robin (`measure_round_robin`): a load change on the machine hits every package alike
rather than one. Decode tokens/s is `calm_edge.runtime.timing`'s: the tokens after the first
step over their time, at T = 1 without stopping at eos, so every package generates the same
number of tokens. A PNG plots relative quality against decode speed-up.

Quality is also compared position by position (`paired_with_fp32`): every package draws with the
same seed and random streams, so a quantized package's Brier-n minus its fp32 package's has a
much smaller error than the two means apart (`brierlm.paired_difference`). It is what
judges a small quality change, and the only judge when the fp32 BrierLM is 0 (a model too weak
for a positive Brier-4) and a relative BrierLM does not exist.
"""
import os
import platform
import statistics
import time
from pathlib import Path

import onnxruntime

from calm_edge.errors import CalmEdgeError
from calm_edge.evaluation.brierlm import paired_difference
from calm_edge.evaluation.package import evaluate_model_package
from calm_edge.evaluation.settings import EvalSettings
from calm_edge.fileio import sha256_of
from calm_edge.runtime.generator import GeneratorParams
from calm_edge.runtime.model import Model
from calm_edge.runtime.package import MANIFEST_FILE
from calm_edge.runtime.profiling import trace_generation
from calm_edge.runtime.timing import decode_tokens_per_second

SPEED_PROMPT = "The history of the city begins in the early years of the century, when"


def decode_rate(model, new_tokens=128, seed=0, prompt=SPEED_PROMPT):
    """(decode tokens/s, tokens timed) of one batch-1 generation of about `new_tokens` tokens."""
    ids = model.tokenizer.encode(prompt)
    K = model.chunk_size
    room = (model.max_context - 1 - -(-len(ids) // K)) * K  # positions left after the prompt, in tokens
    params = GeneratorParams(max_new_tokens=max(2 * K, min(new_tokens, room)), seed=seed, stop_at_eos=False)
    _, trace = trace_generation(model, [ids], params)
    return decode_tokens_per_second(trace), trace.new_tokens - trace.tokens_per_step


def measure_round_robin(models, new_tokens=128, repeats=5, seed=0):
    """{name: {"tokens_per_second" (median), "runs": [...], "tokens"}} for {name: runtime Model}."""
    for model in models.values():
        decode_rate(model, new_tokens=2 * model.chunk_size, seed=seed)  # warm-up: allocations, thread pools
    runs = {name: [] for name in models}
    tokens = {}
    for _ in range(repeats):
        for name, model in models.items():
            rate, tokens[name] = decode_rate(model, new_tokens=new_tokens, seed=seed)
            runs[name].append(rate)
    return {name: {"tokens_per_second": statistics.median(rates), "runs": [round(r, 2) for r in rates],
                   "tokens": tokens[name]} for name, rates in runs.items()}


def _label(report):
    modes = report["graph_modes"]
    kept = sorted(name for name, mode in modes.items() if mode == "fp32")
    label = f"{report['kind']} {report['quantization']}"
    return label + (f" (fp32 {'+'.join(kept)})" if kept and report["quantization"] != "fp32" else "")


def _relative(value, reference):
    if value is None or reference in (None, 0):
        return None
    return value / reference


def compare_packages(paths, text, settings=EvalSettings(), autoencoder=None, reconstruction_tokens=None, threads=None,
                     speed_tokens=128, speed_repeats=5, progress=True):
    """The comparison report of the packages at `paths` on `text` (a TextSource); each kind needs its fp32 package."""
    if len(set(map(str, paths))) != len(paths):
        raise CalmEdgeError("a package is named twice; list each package once")
    started = time.perf_counter()
    models = {str(p): Model(p, threads=threads) for p in paths}
    kinds = {name: model.kind for name, model in models.items()}
    references = {}
    for name, model in models.items():
        if model.manifest.quantization_mode == "fp32":
            if model.kind in references:
                raise CalmEdgeError(f"two fp32 {model.kind} packages ({references[model.kind]}, {name}); compare one model's packages")
            references[model.kind] = name
    missing = sorted(set(kinds.values()) - set(references))
    if missing:
        raise CalmEdgeError(f"no fp32 {' or '.join(missing)} package among the packages; add the fp32 package the "
                            "quantized ones came from, as the reference")
    _check_sources(models, references)

    speeds = measure_round_robin(models, new_tokens=speed_tokens, repeats=speed_repeats, seed=settings.seed)
    rows, draws = {}, {}
    for name in models:
        draws[name] = []
        report = evaluate_model_package(name, text, settings, autoencoder=autoencoder if kinds[name] == "calm" else None,
                                        reconstruction_tokens=reconstruction_tokens, threads=threads,
                                        progress=progress, samples=draws[name])
        recon = report.get("reconstruction") or {}
        main = next(iter(report["by_offset"].values()))  # the first offset's figures are the headline ones
        rows[name] = {
            "package": name, "kind": report["kind"], "label": _label(report), "mode": report["quantization"],
            "graph_modes": report["graph_modes"], "graph_bytes": report["graph_bytes"],
            "bytes": sum(report["graph_bytes"].values()),
            "brierlm": report["brierlm"], **{f"brier_{n}": report[f"brier_{n}"] for n in (1, 2, 3, 4)},
            "brier_stderr": {n: main[f"brier_{n}_stderr"] for n in (1, 2, 3, 4)},
            "reconstruction_token_accuracy": recon.get("token_accuracy"),
            "reconstruction_chunk_accuracy": recon.get("chunk_accuracy"),
            "decode_tokens_per_second": speeds[name]["tokens_per_second"],
            "decode_runs": speeds[name]["runs"],
        }
    for row in rows.values():
        reference = rows[references[row["kind"]]]
        row["relative_to_fp32"] = {
            "bytes": _relative(row["bytes"], reference["bytes"]),
            "brierlm": _relative(row["brierlm"], reference["brierlm"]),
            "reconstruction_token_accuracy": _relative(row["reconstruction_token_accuracy"],
                                                       reference["reconstruction_token_accuracy"]),
            "decode_speedup": _relative(row["decode_tokens_per_second"], reference["decode_tokens_per_second"]),
        }
        row["paired_with_fp32"] = paired_difference(draws[row["package"]], draws[reference["package"]])
    for row in rows.values():
        value, error, measure = quality_relative_to_fp32(row, rows[references[row["kind"]]])
        row["quality_relative_to_fp32"] = {"value": value, "stderr": error, "measure": measure}
    return {
        "references": references,
        "data": list(text.paths),
        "positions": {"context": settings.context, "stride": settings.stride, "max_positions": settings.max_positions,
                      "text_field": text.text_field, "detokenize": text.detokenize,
                      "reconstruction_tokens": reconstruction_tokens},
        "speed": {"batch": 1, "provider": "cpu", "threads": threads or os.cpu_count(), "new_tokens": speed_tokens,
                  "repeats": speed_repeats, "statistic": "median"},
        "machine": {"cpu_cores": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "onnxruntime": onnxruntime.__version__},
        "rows": list(rows.values()),
        "seconds": round(time.perf_counter() - started, 2),
    }


def _check_sources(models, references):
    """Each quantized package must come from the fp32 package it is compared with."""
    for name, model in models.items():
        source = model.manifest.quantization_source
        if not source:
            continue
        reference = references[model.kind]
        if source["manifest_sha256"] != sha256_of(Path(reference) / MANIFEST_FILE):
            raise CalmEdgeError(f"{name} was quantized from {source['package']}, not from the fp32 package {reference} "
                                "it would be compared with; quantize it again from that package")


def quality_relative_to_fp32(row, reference):
    """(value, standard error, measure): the package's quality as a fraction of its fp32 package's.

    Relative BrierLM when the fp32 BrierLM is positive; otherwise (a model too weak for a positive
    Brier-4) 1 + the paired Brier-1 difference over the fp32 Brier-1, the finest comparison left.
    """
    if reference["brierlm"] > 0:
        return row["brierlm"] / reference["brierlm"], None, "BrierLM"
    if reference["brier_1"] <= 0:
        return None, None, "none (fp32 Brier-1 not positive)"
    paired = row["paired_with_fp32"]
    return (1 + paired["brier_1_difference"] / reference["brier_1"],
            paired["brier_1_difference_stderr"] / reference["brier_1"], "Brier-1 (paired)")


def table(report):
    """The report as a plain-text table (one line per package)."""
    header = (f"{'package':<34} {'MB':>7} {'BrierLM':>8} {'Brier-1':>8} {'quality':>15} {'same':>5} {'recon':>7} "
              f"{'tok/s':>8} {'speedup':>7}")
    lines = [header, "-" * len(header)]

    def fixed(value, digits):
        return "-" if value is None else f"{value:.{digits}f}"

    for row in report["rows"]:
        rel = row["relative_to_fp32"]
        relative = row["quality_relative_to_fp32"]
        quality = fixed(relative["value"], 3) + ("" if relative["stderr"] is None else f" ±{relative['stderr']:.3f}")
        lines.append(f"{row['label']:<34} {row['bytes'] / 1e6:>7.2f} {row['brierlm']:>8.2f} {row['brier_1']:>8.4f} "
                     f"{quality:>15} {row['paired_with_fp32']['identical_draws']:>5.0%} "
                     f"{fixed(row['reconstruction_token_accuracy'], 4):>7} {row['decode_tokens_per_second']:>8.1f} "
                     f"{fixed(rel['decode_speedup'], 2):>7}")
    measures = sorted({row["quality_relative_to_fp32"]["measure"] for row in report["rows"]})
    lines.append(f"quality: relative to fp32 by {' / '.join(measures)} (± one standard error); "
                 "same: positions whose draws equal fp32's")
    return "\n".join(lines)


def plot(report, path):
    """Relative quality (± 1 s.e.) against decode speed-up, one point per package, one colour per kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    colours = {"calm": "tab:blue", "ar": "tab:orange"}
    measures = set()
    for kind in sorted({row["kind"] for row in report["rows"]}):
        rows = [row for row in report["rows"] if row["kind"] == kind]
        xs = [row["relative_to_fp32"]["decode_speedup"] for row in rows]
        quality = [row["quality_relative_to_fp32"] for row in rows]
        ys = [q["value"] or 0.0 for q in quality]
        errors = [q["stderr"] or 0.0 for q in quality]
        measures |= {q["measure"] for q in quality}
        ax.errorbar(xs, ys, yerr=errors, fmt="o", color=colours.get(kind), label=kind.upper(), zorder=3, capsize=3)
        for row, x, y in zip(rows, xs, ys):
            ax.annotate(row["label"].split(" ", 1)[1], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(0.97, color="grey", linestyle=":", linewidth=1, label="-3% quality")
    ax.axvline(1.5, color="grey", linestyle="--", linewidth=1, label="1.5x decode speed")
    ax.set_xlabel("decode tokens/s at batch 1, relative to fp32")
    ax.set_ylabel(f"{' / '.join(sorted(measures))} relative to fp32 (± 1 s.e.)")
    ax.set_title("Quantization: quality against speed (CPU)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
