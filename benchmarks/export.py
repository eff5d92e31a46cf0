"""Benchmark: export of the trained CALM and AR models, its parity figures, and graph optimisation.

For each run given: `calm-edge export` to a package (validation included), then from its
manifest the per-graph parity (largest absolute difference per output, random and real
inputs), the end-to-end token-for-token check, and the graph sizes. Then the effect of offline
graph optimisation (`calm_edge.export.optimize`): the backbone / ar graph as exported against
the same graph with ONNX Runtime's transformer fusions, timed at a decode step after 256
positions, interleaved in the same run; the energy head and decoder timed beside them.

    python benchmarks/export.py --calm runs/calm_small --ar runs/ar_small --name small \
        --packages-dir packages
"""
import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from calm_edge.export import optimize
from calm_edge.export.exporter import export_package
from calm_edge.fileio import write_json_atomic
from calm_edge.runtime import package

REPO = Path(__file__).resolve().parent.parent


def bench_run(run, out_dir, threads, reuse):
    started = time.perf_counter()
    if reuse and (Path(out_dir) / package.MANIFEST_FILE).is_file():
        manifest = package.Manifest.read(out_dir)  # exported (and validated) earlier from the same run
    else:
        manifest = export_package(run, out_dir, force=True, progress=True)
    seconds = manifest.validation.get("export_seconds", time.perf_counter() - started)
    result = {
        "run": str(run),
        "package": str(out_dir),
        "kind": manifest.kind,
        "export_and_validate_seconds": round(seconds, 1),
        "graph_bytes": {name: g.total_bytes for name, g in manifest.graphs.items()},
        # Per graph, case (random / real inputs) and output: max_abs_diff (floats) or mismatches (token ids).
        "parity": {"graphs": manifest.validation["graphs"], "end_to_end": manifest.validation["end_to_end"]},
    }
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name in manifest.graphs:
            paths[name] = manifest.graph_path(name)
            if name in optimize.FUSABLE_GRAPHS:
                fused_path = Path(tmp) / f"{name}.fused.onnx"
                result["fused_operators"] = optimize.optimize_graph(paths[name], fused_path, manifest.num_heads,
                                                                    manifest.hidden_size)
                paths[f"{name} (fused)"] = fused_path
        timings = optimize.time_graphs(paths, manifest.model_section, threads=threads)
    step = manifest.step_graph
    result["decode_step_ms"] = timings
    result["fused_over_exported"] = round(timings[f"{step} (fused)"]["median_ms"] / timings[step]["median_ms"], 3)
    print(f"{manifest.kind}: {json.dumps(timings)}")
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calm", help="CALM run folder")
    parser.add_argument("--ar", help="AR run folder")
    parser.add_argument("--name", default="small")
    parser.add_argument("--packages-dir", default=str(REPO / "packages"), help="Where the packages are written.")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--reuse-packages", action="store_true", help="Read packages already exported there.")
    args = parser.parse_args()

    results = []
    for kind, run in (("calm", args.calm), ("ar", args.ar)):
        if run:
            results.append(bench_run(run, Path(args.packages_dir) / f"{kind}-{args.name}", args.threads,
                                     args.reuse_packages))
    report = {
        "benchmark": "export",
        "command": "python benchmarks/export.py" + (f" --calm {args.calm}" if args.calm else "")
                   + (f" --ar {args.ar}" if args.ar else "") + f" --name {args.name}",
        "format_version": package.FORMAT_VERSION,
        "machine": {"cpu_cores": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "threads": args.threads},
        "results": results,
    }
    out = REPO / "benchmarks" / "results" / f"export_{args.name}.json"
    write_json_atomic(out, report)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
