"""Regenerate README.md's performance section from the benchmark results (a repository tool, not installed).

    python benchmarks/report.py                       # the CPU results: bench_small, bench_paper_dims
    python benchmarks/report.py --results benchmarks/results/bench_small.json

`update_readme` replaces everything between the markers

    <!-- performance:begin -->  ...  <!-- performance:end -->

in README.md, so the table, the ratios beside their ideals and the plot links always come from a
results file and the command that made them, never from hand-copied numbers. GPU results
(bench_*_gpu.json) are kept apart and reported in benchmarks/README.md, not here.
"""
import argparse
import json
import re
from pathlib import Path

from calm_edge.errors import CalmEdgeError

REPO = Path(__file__).resolve().parent.parent
DEFAULT = [REPO / "benchmarks" / "results" / f"bench_{name}.json" for name in ("small", "paper_dims")]
BEGIN, END = "<!-- performance:begin -->", "<!-- performance:end -->"
HEADLINE = {"batch": 1, "temperature": 1.0}  # the headline cells: the speed goals of README (Performance) are at batch 1, T = 1


def _headline_cells(runner):
    """The runner's batch-1, T = 1 cells, shortest prompt first, most threads first."""
    cells = [c for c in runner["cells"].values() if "decode_tokens_per_s" in c
             and all(c["cell"][k] == v for k, v in HEADLINE.items())]
    return sorted(cells, key=lambda c: (c["cell"]["prompt_tokens"], -c["cell"]["threads"]))


def _fmt(value, digits=1):
    return "–" if value is None else f"{value:,.{digits}f}"


def section(report, results_path, repo):
    """Markdown for one results file."""
    rel = lambda p: Path(p).resolve().relative_to(repo) if Path(p).resolve().is_relative_to(repo) else Path(p)
    lines = [f"**{rel(results_path)}** ({report['created']}, {report['machine']['processor']}, "
             f"{report['machine']['cpu_cores']} cores, {report['provider']} provider, "
             + (f"{report['settings']['rounds']} rounds of " if report["settings"].get("rounds", 1) > 1 else "")
             + f"{report['settings']['repeats']} repeats after {report['settings']['warmup']} warm-up"
             + (f"; thread spinning: {report['settings']['spinning']}" if "spinning" in report["settings"] else "")
             + ")", "",
             "| runner | prompt | threads | decode tokens/s | ms per token (p50 / p99) | time to first token ms | "
             "prefill ms | peak RSS MB | model MB |", "|---|---|---|---|---|---|---|---|---|"]
    for runner in report["runners"]:
        if runner["status"] != "ok":
            lines.append(f"| {runner['name']} | | | **{runner['status']}**: {runner['reason']} | | | | | |")
            continue
        headline = _headline_cells(runner)
        if not headline:  # every batch-1, T = 1 cell failed or was skipped: say why
            notes = [c.get("error") or c.get("skipped") for c in runner["cells"].values()
                     if c["cell"]["batch"] == 1 and c["cell"]["temperature"] == 1.0]
            lines.append(f"| {runner['name']} | | | **not measured**: {notes[0] if notes else 'no batch-1, T=1 cell'} "
                         "| | | | | |")
        for c in headline:
            lines.append(
                f"| {runner['name']} | {c['cell']['prompt_tokens']} | {c['cell']['threads']} | "
                f"{_fmt(c['decode_tokens_per_s']['median'])} | {_fmt(c['token_ms']['median'], 3)} / "
                f"{_fmt(c['token_ms']['p99'], 3)} | {_fmt(c['ttft_ms']['median'], 2)} | {_fmt(c['prefill_ms']['median'], 2)} | "
                f"{_fmt(c['peak_rss_mb'], 0)} | {_fmt(runner['package_size_mb'], 1)} |")
    ratios = [r for r in report["comparisons"] if r.get("ratio") is not None and "-b1-" in r["cell"]
              and r["cell"].endswith("-T1")]
    if ratios:
        by_round = any(r.get("ratio_by_round") for r in ratios)
        lines += ["", "| CALM | against | cell | measured ratio | ideal (weights read) | share of ideal |"
                  + (" each round |" if by_round else ""), "|---|---|---|---|---|---|" + ("---|" if by_round else "")]
        for r in ratios:
            share = "–" if r["fraction_of_ideal"] is None else f"{100 * r['fraction_of_ideal']:.0f} %"
            rounds = (" " + " / ".join(f"{x:.2f}" for x in r.get("ratio_by_round") or []) + " |") if by_round else ""
            lines.append(f"| {r['calm']} | {r['ar']} | {r['cell']} | {r['ratio']:.2f}× | "
                         f"{_fmt(r['ideal_ratio'], 2)}× | {share} |" + rounds)
    cost = [r for r in report["low_temperature_cost"] if "-b1-" in r["cell"]]
    if cost:
        lines += ["", "T = 1/2 step against T = 1 step (batch 1): " + ", ".join(
            f"{r['runner']} {r['cell']}: {r['ratio']:.2f}×" for r in cost) + "."]
    files = report.get("files", {})
    plots = {name: files[name] for name in ("throughput", "latency", "split") if name in files}
    if plots:
        links = [f"[{name}]({rel(path)})" for name, path in plots.items()]
        if "csv" in files:
            links.append(f"[CSV]({rel(files['csv'])})")
        lines += ["", "Plots and every cell: " + " · ".join(links)]
        if "throughput" in plots:
            lines += ["", f"![decode tokens/s against batch size]({rel(plots['throughput'])})"]
    lines += ["", f"Regenerate the measurement: `{report['command']}`"]
    return "\n".join(lines)


def render(results_files, repo):
    found = [Path(p) for p in results_files if Path(p).is_file()]
    body = ["_Generated by `python benchmarks/report.py` from "
            + (", ".join(f"`{Path(p).resolve().relative_to(repo) if Path(p).resolve().is_relative_to(repo) else p}`"
                         for p in found) or "no results file yet") + "; do not edit by hand._", ""]
    if not found:
        body += ["Not measured yet. The measurements, one command each (see `benchmarks/README.md`):", "",
                 "```bash", "python benchmarks/bench.py small --calm-run runs/calm --ar-run runs/ar",
                 "python benchmarks/bench.py paper-dims --tokenizer runs/tok", "python benchmarks/report.py", "```"]
    for path in found:
        body += [section(json.loads(path.read_text(encoding="utf-8")), path, repo), ""]
    return "\n".join(body).rstrip() + "\n"


def update_readme(readme, results_files, repo):
    """Replace the marked block of `readme` with the section for `results_files`; returns the new text."""
    readme = Path(readme)
    text = readme.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise CalmEdgeError(f"{readme} has no {BEGIN} ... {END} block; add the two markers where the "
                            "performance section belongs")
    new = pattern.sub(lambda _: f"{BEGIN}\n{render(results_files, Path(repo).resolve())}{END}", text)
    readme.write_text(new, encoding="utf-8")
    return new


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", action="append", default=None, help="Results JSON (repeatable).")
    parser.add_argument("--readme", default=str(REPO / "README.md"))
    args = parser.parse_args()
    update_readme(args.readme, args.results or DEFAULT, REPO)
    print(f"-> {args.readme}")


if __name__ == "__main__":
    main()
