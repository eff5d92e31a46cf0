"""Regenerate README.md's performance section from the benchmark results.

    python benchmarks/report.py                       # the CPU results: bench_small, bench_paper_dims
    python benchmarks/report.py --results benchmarks/results/bench_small.json

Rewrites only the block between `<!-- performance:begin -->` and `<!-- performance:end -->`
(calm_edge/bench/readme.py). GPU results (bench_*_gpu.json) are kept apart and reported in
benchmarks/README.md, not here.
"""
import argparse
from pathlib import Path

from calm_edge.bench.readme import update_readme

REPO = Path(__file__).resolve().parent.parent
DEFAULT = [REPO / "benchmarks" / "results" / f"bench_{name}.json" for name in ("small", "paper_dims")]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", action="append", default=None, help="Results JSON (repeatable).")
    parser.add_argument("--readme", default=str(REPO / "README.md"))
    args = parser.parse_args()
    update_readme(args.readme, args.results or DEFAULT, REPO)
    print(f"-> {args.readme}")


if __name__ == "__main__":
    main()
