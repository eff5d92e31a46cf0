"""The report's files: JSON (everything), CSV (one row per runner and cell), PNG plots.

    OUT.json                 the whole report
    OUT.csv                  runner x cell, medians and tails, with the status of every row
    OUT_throughput.png       decode tokens/s against batch size, one panel per prompt length and T
    OUT_latency.png          distribution of per-token decode latency at batch 1, per runner
    OUT_split.png            where a calm-edge step goes: per-graph time and the loop's overhead
"""
import csv
from pathlib import Path

from calm_edge.fileio import write_json_atomic

CSV_FIELDS = ["runner", "kind", "status", "prompt_tokens", "new_tokens", "batch", "threads", "temperature",
              "prefill_ms", "ttft_ms", "step_ms", "step_ms_p90", "step_ms_p99", "token_ms", "token_ms_p90",
              "token_ms_p99", "decode_tokens_per_s", "end_to_end_tokens_per_s", "peak_rss_mb", "package_size_mb",
              "note"]


def paths(out):
    out = Path(out)
    stem = out.with_suffix("")
    return {"json": out, "csv": out.with_suffix(".csv"), "throughput": Path(f"{stem}_throughput.png"),
            "latency": Path(f"{stem}_latency.png"), "split": Path(f"{stem}_split.png")}


def write_all(report, out):
    files = paths(out)
    report["files"] = {name: str(path) for name, path in files.items()}
    files["json"].parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(files["json"], report)
    write_csv(report, files["csv"])
    plot_throughput(report, files["throughput"])
    plot_latency(report, files["latency"])
    plot_split(report, files["split"])
    return files


def csv_rows(report):
    rows = []
    for runner in report["runners"]:
        common = {"runner": runner["name"], "kind": runner.get("kind"), "package_size_mb": runner.get("package_size_mb")}
        if runner["status"] != "ok" and not runner["cells"]:
            rows.append({**common, "status": runner["status"], "note": runner["reason"]})
            continue
        for record in runner["cells"].values():
            row = {**common, **record["cell"]}
            if "skipped" in record or "error" in record:
                rows.append({**row, "status": "skipped" if "skipped" in record else "error",
                             "note": record.get("skipped") or record.get("error")})
                continue
            row.update(status="ok", prefill_ms=record["prefill_ms"]["median"], ttft_ms=record["ttft_ms"]["median"],
                       peak_rss_mb=record["peak_rss_mb"],
                       decode_tokens_per_s=record["decode_tokens_per_s"]["median"],
                       end_to_end_tokens_per_s=record["end_to_end_tokens_per_s"]["median"])
            for metric in ("step_ms", "token_ms"):
                row[metric] = record[metric]["median"]
                row[f"{metric}_p90"], row[f"{metric}_p99"] = record[metric]["p90"], record[metric]["p99"]
            rows.append(row)
    return rows


def write_csv(report, path):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(csv_rows(report))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a server
    import matplotlib.pyplot as plt

    return plt


def _ok_cells(runner):
    return [r for r in runner["cells"].values() if "decode_tokens_per_s" in r]


def plot_throughput(report, path):
    plt = _pyplot()
    cells = [r["cell"] for runner in report["runners"] for r in _ok_cells(runner)]
    panels = sorted({(c["prompt_tokens"], c["temperature"]) for c in cells}) or [(None, None)]
    threads = max((c["threads"] for c in cells), default=None)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for ax, (prompt, temperature) in zip(axes[0], panels):
        for runner in report["runners"]:
            points = sorted((r["cell"]["batch"], r["decode_tokens_per_s"]["median"]) for r in _ok_cells(runner)
                            if (r["cell"]["prompt_tokens"], r["cell"]["temperature"], r["cell"]["threads"])
                            == (prompt, temperature, threads))
            if points:
                ax.plot(*zip(*points), marker="o", label=runner["name"])
        ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="decode tokens/s",
               title=f"prompt {prompt}, T={temperature:g}, {threads} threads" if prompt else "no results")
        batches = sorted({c["batch"] for c in cells})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
        ax.grid(alpha=0.3, which="both")
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=7)
    _save(fig, path, report)


def plot_latency(report, path):
    """Per-token decode latency at batch 1, T = 1, the shortest prompt and the most threads."""
    plt = _pyplot()
    data, labels = [], []
    for runner in report["runners"]:
        candidates = [r for r in _ok_cells(runner) if "step_ms_samples" in r and r["cell"]["temperature"] == 1.0]
        if not candidates:
            continue
        pick = min(candidates, key=lambda r: (r["cell"]["prompt_tokens"], -r["cell"]["threads"]))
        K = pick["tokens_per_step"]
        data.append([s / K for s in pick["step_ms_samples"]])
        c = pick["cell"]
        labels.append(f"{runner['name']}\np{c['prompt_tokens']} t{c['threads']}")
    fig, ax = plt.subplots(figsize=(max(4.5, 2.2 * len(data)), 4))
    if data:
        ax.boxplot(data, whis=(1, 99), showfliers=False)
        ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=7)
    ax.set(ylabel="ms per generated token (step / tokens per step)",
           title="decode latency per token, batch 1, T=1 (whiskers p1-p99)")
    ax.grid(alpha=0.3, axis="y")
    _save(fig, path, report)


def plot_split(report, path):
    """Stacked per-step time of each calm-edge runner at batch 1, per temperature."""
    plt = _pyplot()
    bars = []
    for runner in report["runners"]:
        for r in _ok_cells(runner):
            c = r["cell"]
            if c["batch"] == 1 and r["per_step_split_ms"]:
                bars.append((f"{runner['name']}\np{c['prompt_tokens']} t{c['threads']} T={c['temperature']:g}",
                             r["per_step_split_ms"]))
    names = sorted({n for _, split in bars for n in split}, key=lambda n: (n == "loop_overhead", n))
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(bars)), 4.2))
    bottoms = [0.0] * len(bars)
    for name in names:
        heights = [split.get(name, 0.0) for _, split in bars]
        ax.bar(range(len(bars)), heights, bottom=bottoms, label=name)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    ax.set_xticks(range(len(bars)), [label for label, _ in bars], fontsize=6, rotation=60, ha="right")
    ax.set(ylabel="ms per step", title="where a step goes (batch 1)")
    if names:
        ax.legend(fontsize=7)
    _save(fig, path)


def _save(fig, path, report=None):
    """Write and close a plot; with `report`, footnote the runners that could not be measured."""
    if report is not None:
        _note_unavailable(fig, report)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def _note_unavailable(fig, report):
    missing = [f"{r['name']}: {r['status']}" for r in report["runners"] if r["status"] != "ok"]
    if missing:
        fig.text(0.01, 0.01, "not measured: " + "; ".join(missing), fontsize=6, color="firebrick")
