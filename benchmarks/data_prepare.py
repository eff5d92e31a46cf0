"""Benchmark: tokenizer training and `data prepare` on the shared Wikipedia training file.

Writes benchmarks/results/data_prepare.json: the tokenizer's training time, the token count,
characters per token, and the prepare throughput with 1 worker and with all cores, measured in
the same run so the speed-up is a ratio on the same machine state.

    python benchmarks/data_prepare.py [--data ../shared/data/wiki-train.jsonl.xz] [--vocab-size 8192]
"""
import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from calm_edge.config import TokenizerConfig
from calm_edge.data import prepare_shards
from calm_edge.fileio import write_json_atomic
from calm_edge.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "wiki-train.jsonl.xz"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "data_prepare.json"))
    args = parser.parse_args()

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        info = train_tokenizer([args.data], tmp / "tok", TokenizerConfig(vocab_size=args.vocab_size))
        tokenizer_seconds = time.perf_counter() - started

        runs = {}
        for workers in sorted({1, cores}):
            result = prepare_shards([args.data], tmp / "tok", tmp / f"shards{workers}", workers=workers)
            runs[workers] = result
            print(f"workers={workers}: {result['seconds']:.1f}s, {result['tokens_per_second']:,.0f} tokens/s")
        identical = all(
            (tmp / f"shards{w}" / f).read_bytes() == (tmp / "shards1" / f).read_bytes()
            for w in runs for f in os.listdir(tmp / "shards1")
        )

    best = runs[cores]
    tokens = sum(s["tokens"] for s in best["splits"].values())
    report = {
        "benchmark": "data_prepare",
        "command": "python benchmarks/data_prepare.py",
        "data": str(Path(args.data).name),
        "machine": {"cpu_cores": cores, "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version()},
        "tokenizer": {
            "vocab_size": args.vocab_size,
            "lines": info["lines"],
            "lines_sampled": info["lines_sampled"],
            "characters": info["characters"],
            "train_seconds": info["train_seconds"],
            "total_seconds_with_reading": round(tokenizer_seconds, 2),
        },
        "prepare": {
            "documents": sum(s["documents"] for s in best["splits"].values()),
            "characters": best["characters"],
            "tokens": tokens,
            "train_tokens": best["splits"]["train"]["tokens"],
            "valid_tokens": best["splits"]["valid"]["tokens"],
            "characters_per_token": best["characters_per_token"],
            "dtype": best["dtype"],
            "by_workers": {str(w): {"seconds": r["seconds"], "tokens_per_second": r["tokens_per_second"]}
                           for w, r in runs.items()},
            "workers": cores,
            "seconds": best["seconds"],
            "tokens_per_second": best["tokens_per_second"],
            "speedup_vs_1_worker": round(runs[1]["seconds"] / best["seconds"], 3),
            "byte_identical_across_worker_counts": identical,
        },
        "goal": "whole file prepared in under 300 s on 2 cores",
        "goal_met": best["seconds"] < 300,
    }
    write_json_atomic(args.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
