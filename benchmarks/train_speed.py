"""Benchmark: training throughput with and without torch.compile, for CALM and AR, on this machine.

For each model kind, an eager and a compiled run of the same configuration train `--steps`
optimizer steps on the same shards, one after the other; tokens/s is the median of the train records'
`tokens_per_second` after the first `--warmup` steps (compilation happens in those). The result
is the compiled/eager ratio of each kind, measured in the same run, and whether the trainer should
compile by default on this device.

    python benchmarks/train_speed.py --data runs/shards --autoencoder runs/ae_small

Writes benchmarks/results/train_speed.json (or --out).
"""
import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from calm_edge.config import preset
from calm_edge.fileio import write_json_atomic
from calm_edge.training.language_models import train_ar, train_calm
from calm_edge.training.metrics import MetricsLog

REPO = Path(__file__).resolve().parent.parent


def measure(kind, config, args, out):
    began = time.perf_counter()
    if kind == "calm":
        train_calm(config, args.autoencoder, args.data, out, force=True, progress=False)
    else:
        train_ar(config, args.data, out, force=True, progress=False)
    train = [r for r in MetricsLog(out).records() if r["split"] == "train"]
    rates = [r["tokens_per_second"] for r in train if r["step"] > args.warmup]
    return {"tokens_per_second": statistics.median(rates), "intervals": len(rates),
            "wall_seconds": round(time.perf_counter() - began, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="prepared shards of the preset's tokenizer")
    parser.add_argument("--autoencoder", required=True, help="a trained autoencoder run of the preset")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--work", default=str(REPO / "bench-work" / "train_speed"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_speed.json"))
    args = parser.parse_args()
    work = Path(args.work)
    results = {}
    for kind in ("calm", "ar"):
        section = f"train_{kind}"
        for compiled in (False, True):
            config = preset(args.preset).with_overrides([
                f"{section}.max_steps={args.steps}", f"{section}.batch_size={args.batch_size}",
                f"{section}.log_every=1", f"{section}.eval_every=100000", f"{section}.save_every=100000",
                f"{section}.compile={str(compiled).lower()}"])
            name = f"{kind}-{'compiled' if compiled else 'eager'}"
            results[name] = measure(kind, config, args, work / name)
            print(name, results[name], flush=True)
        results[f"{kind}_compiled_vs_eager"] = (results[f"{kind}-compiled"]["tokens_per_second"]
                                                / results[f"{kind}-eager"]["tokens_per_second"])
    write_json_atomic(args.out, {
        "benchmark": "train_speed",
        "command": " ".join(["python", "benchmarks/train_speed.py", *sys.argv[1:]]),
        "machine": {"processor": platform.machine(), "cpu_cores": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"},
        "settings": {"preset": args.preset, "steps": args.steps, "warmup": args.warmup, "batch_size": args.batch_size},
        "results": results,
    })
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
