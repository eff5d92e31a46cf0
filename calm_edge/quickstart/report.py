"""The quickstart's summary: read back from the stages' own outputs, printed, and saved.

Every figure comes from a file a stage wrote (reconstruction.json, run_summary.json, the
packages' manifest.json, eval/*.json, benchmark.json), so the summary of a resumed run is the
same as that of an uninterrupted one. A figure whose stage is not available in this build, or
has not run, is None in summary.json and "n/a" in the table, with the reason under
`unavailable`: never a guess.

summary.json holds, per package: kind, quantization, size in bytes (graphs and tokenizer),
BrierLM, decode tokens/s and its speed-up over the AR package; and the autoencoder's token
reconstruction accuracy, the training runs, the data and each stage's time. summary.png draws
BrierLM, Brier-1, size and tokens/s per package side by side.
"""
import io
import json
from pathlib import Path

from calm_edge.fileio import write_bytes_atomic, write_json_atomic
from calm_edge.quickstart.stages import TIMINGS_FILE
from calm_edge.runtime.package import MANIFEST_FILE, Manifest

SUMMARY_FILE = "summary.json"
PLOT_FILE = "summary.png"


def _read(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _package_bytes(folder):
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file())


def collect(run, results):
    """The summary dict, from the outputs in `run.out` and the stage results of this run."""
    out = run.out
    corpus = _read(out / "corpus" / "corpus.json") or {}
    shards = _read(out / "shards" / "index.json") or {}
    reconstruction = _read(out / "autoencoder" / "reconstruction.json")
    benchmark = _read(out / "benchmark.json") or {}
    samples = (_read(out / "samples.json") or {}).get("samples", {})
    timings = _read(out / TIMINGS_FILE) or {}
    packages = {}
    for name in run.package_names:
        if not (out / "packages" / name / MANIFEST_FILE).is_file():
            continue
        manifest = Manifest.read(out / "packages" / name, verify=False)
        evaluation = _read(out / "eval" / f"{name}.json") or {}
        speed = benchmark.get("packages", {}).get(name, {})
        packages[name] = {
            "path": str(out / "packages" / name),
            "kind": manifest.kind,
            "quantization": manifest.quantization_mode,
            "bytes": _package_bytes(out / "packages" / name),
            "brierlm": evaluation.get("brierlm"),
            "brier": {f"brier_{n}": evaluation.get(f"brier_{n}") for n in (1, 2, 3, 4)} if evaluation else None,
            "decoder_token_accuracy": (evaluation.get("reconstruction") or {}).get("token_accuracy"),
            "decode_tokens_per_second": speed.get("decode_tokens_per_second"),
            "step_ms": speed.get("step_ms"),
        }
    ar_speed = packages.get("ar", {}).get("decode_tokens_per_second")
    for entry in packages.values():
        speed = entry["decode_tokens_per_second"]
        entry["speedup_over_ar"] = round(speed / ar_speed, 3) if speed and ar_speed else None

    runs = {}
    for kind in ("calm", "ar"):
        summary = _read(out / kind / "run_summary.json")
        if summary:
            runs[kind] = {k: summary.get(k) for k in ("step", "parameters", "tokens_seen", "training_flops",
                                                      "inference_flops_per_token", "elapsed_seconds")}
            runs[kind]["valid_loss"] = (summary.get("valid") or {}).get("loss")
    return {
        "preset": run.preset_name,
        "out": str(out),
        "data": {"sources": corpus.get("sources"), "documents": corpus.get("documents"),
                 "characters": corpus.get("characters"),
                 "train_tokens": shards.get("splits", {}).get("train", {}).get("tokens"),
                 "held_out_tokens": shards.get("splits", {}).get("valid", {}).get("tokens")},
        "autoencoder": None if reconstruction is None else {
            "token_accuracy": reconstruction["token_accuracy"], "chunk_accuracy": reconstruction["chunk_accuracy"],
            "tokens_evaluated": reconstruction["tokens_evaluated"], "chunk_size": reconstruction["chunk_size"]},
        "training": runs,
        "packages": packages,
        "calm_over_ar_speedup": packages.get("calm", {}).get("speedup_over_ar"),
        "samples": {name: rows[0] for name, rows in samples.items() if rows},
        "benchmark": {k: benchmark.get(k) for k in ("provider", "batch", "threads", "cpu_cores", "definition")}
                     if benchmark else None,
        "stages": {r.name: {"status": r.status, "seconds": timings.get(r.name, {}).get("seconds"), "note": r.note}
                   for r in results},
        "unavailable": {r.name: r.note for r in results if r.status == "unavailable"},
    }


def format_table(summary):
    """The summary as the lines the quickstart prints last."""
    def fmt(value, pattern, missing="n/a"):
        return missing if value is None else pattern.format(value)

    ae = summary["autoencoder"] or {}
    data = summary["data"]
    lines = [
        "",
        f"calm-edge quickstart ({summary['preset']} preset) -> {summary['out']}",
        f"data: {fmt(data['documents'], '{:,}')} documents, {fmt(data['characters'], '{:,}')} characters, "
        f"{fmt(data['train_tokens'], '{:,}')} training tokens, {fmt(data['held_out_tokens'], '{:,}')} held out",
        f"autoencoder (K = {ae.get('chunk_size', '?')}): token reconstruction "
        f"{fmt(ae.get('token_accuracy'), '{:.2%}')}, whole chunks {fmt(ae.get('chunk_accuracy'), '{:.2%}')} "
        "on held-out text",
        "",
    ]
    # Brier-1 beside BrierLM: BrierLM is 0 as soon as one of Brier-1..4 is, as it is for barely
    # trained models, while Brier-1 still tells them apart.
    header = ("package", "quantization", "size MB", "BrierLM", "Brier-1", "decode tokens/s", "vs AR")
    rows = [header]
    for name, p in summary["packages"].items():
        rows.append((name, p["quantization"], f"{p['bytes'] / 1e6:.2f}", fmt(p["brierlm"], "{:.2f}"),
                     fmt((p["brier"] or {}).get("brier_1"), "{:.3f}"), fmt(p["decode_tokens_per_second"], "{:.0f}"),
                     fmt(p["speedup_over_ar"], "{:.2f}x")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for number, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
        if number == 0:
            lines.append("  ".join("-" * w for w in widths))
    if summary["calm_over_ar_speedup"] is not None:
        lines.append(f"CALM decodes {summary['calm_over_ar_speedup']:.2f}x as many tokens per second as the AR baseline "
                     "(batch 1, CPU)")
    if summary["samples"]:
        lines.append("samples (T = 1; all of them in samples.json):")
    for name, sample in summary["samples"].items():
        text = " ".join((sample["prompt"] + sample["text"]).split())  # one line each
        lines.append(f"  {name}: {text[:100]}" + ("..." if len(text) > 100 else ""))
    for name, why in summary["unavailable"].items():
        lines.append(f"not available: {name}: {why}")
    lines.append(f"-> {Path(summary['out']) / SUMMARY_FILE}, {Path(summary['out']) / PLOT_FILE}")
    return "\n".join(lines)


def plot(summary, path):
    """Bar charts per package: BrierLM, Brier-1, size, decode tokens/s."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a server
    import matplotlib.pyplot as plt

    names = list(summary["packages"])
    panels = [("BrierLM (higher is better)", lambda p: p["brierlm"], 1),
              ("Brier-1 (higher is better)", lambda p: (p["brier"] or {}).get("brier_1"), 1),
              ("package size (MB)", lambda p: p["bytes"], 1e-6),
              ("decode tokens/s, batch 1 CPU", lambda p: p["decode_tokens_per_second"], 1)]
    figure, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6))
    colors = ["#1f77b4" if summary["packages"][n]["kind"] == "calm" else "#ff7f0e" for n in names]
    for axis, (title, value_of, scale) in zip(axes, panels):
        values = [value_of(summary["packages"][n]) for n in names]
        axis.set_title(title, fontsize=10)
        if all(v is None for v in values):
            axis.text(0.5, 0.5, "not available", ha="center", va="center", transform=axis.transAxes)
            axis.set_xticks([])
            axis.set_yticks([])
            continue
        heights = [0 if v is None else v * scale for v in values]
        bars = axis.bar(names, heights, color=colors)
        for bar, value in zip(bars, values):
            label = "n/a" if value is None else (f"{value * scale:,.0f}" if value * scale >= 100
                                                 else f"{value * scale:.3g}")
            axis.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                          fontsize=8)
    speedup = summary["calm_over_ar_speedup"]
    figure.suptitle(f"calm-edge quickstart ({summary['preset']})"
                    + (f": CALM decodes {speedup:.2f}x faster than AR" if speedup else ""), fontsize=11)
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=110)
    plt.close(figure)
    write_bytes_atomic(path, image.getvalue())


def write_summary(run, results):
    """Collect, write summary.json and summary.png into `run.out`, and return the summary."""
    summary = collect(run, results)
    write_json_atomic(run.out / SUMMARY_FILE, summary)
    plot(summary, run.out / PLOT_FILE)
    return summary
