"""Benchmark: the Python runtime's generation loop on model packages, where each step's time goes.

For every package given (CALM and AR alike), on ONNX Runtime's CPU provider at batch 1:
  - prefill time of a real prompt (the start of a WikiText-103 test document);
  - decode: tokens/s over `--new-tokens` new tokens at T = 1 and at T = 1/2 (batch approximation,
    16 candidates), the median of `--repeats` runs;
  - per step, the time in each graph (backbone or ar, energy_head, decoder) and the rest, which
    is the loop's own overhead (sampling, random numbers, bookkeeping, Python): its share of the
    step is the figure to keep small;
  - memory: resident set size after loading and at the end, the preallocated KV cache, and the
    peak against a budget of package size + KV cache + 150 MB (each package in its own process).

Everything is measured in one run, so the ratios (T = 1/2 against T = 1, CALM against AR) compare
like with like on a noisy machine.

    python benchmarks/runtime.py --package models/calm-small --package models/ar-small --name small
"""
import argparse
import json
import multiprocessing
import os
import platform
from pathlib import Path

from calm_edge.bench.stats import folder_size_mb, peak_rss_mb, rss_mb
from calm_edge.fileio import write_json_atomic
from calm_edge.runtime.generator import Generator, GeneratorParams
from calm_edge.runtime.model import Model
from calm_edge.runtime.profiling import measure, trace_generation

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TEXT = REPO.parent / "shared" / "data" / "wikitext103-test-doc.jsonl"


def prompt_ids(model, text_file, prompt_tokens):
    with open(text_file, encoding="utf-8") as f:
        text = json.loads(f.readline())["text"]
    return model.tokenizer.encode(text)[:prompt_tokens]


def bench_package(path, text_file, prompt_tokens, new_tokens, threads, repeats):
    before = rss_mb()
    model = Model(path, threads=threads)
    loaded = rss_mb()
    prompt = prompt_ids(model, text_file, prompt_tokens)
    result = {"package": str(path), "kind": model.kind, "chunk_size": model.chunk_size,
              "prompt_tokens": len(prompt), "rss_mb_before_load": round(before, 1), "rss_mb_loaded": round(loaded, 1)}
    trace_generation(model, [prompt], GeneratorParams(max_new_tokens=8, seed=0, stop_at_eos=False))  # warm-up
    for label, temperature in (("T=1", 1.0), ("T=1/2", 0.5)):
        params = GeneratorParams(max_new_tokens=new_tokens, temperature=temperature, seed=1, stop_at_eos=False)
        result[label] = measure(model, prompt, params, repeats)
        print(f"{path} {label}: {result[label]['decode_tokens_per_second']} tokens/s, step {result[label]['step_ms']} ms "
              f"{result[label]['per_step_ms']}, loop share {result[label]['loop_share']:.1%}")
    # The cache one measured generation preallocates (the prompt plus its steps).
    cache = Generator(model, [prompt], GeneratorParams(max_new_tokens=new_tokens, stop_at_eos=False)).state.cache
    result["kv_cache_mb"] = round(cache.nbytes() / 1e6, 2)
    result["rss_mb_end"] = round(rss_mb(), 1)
    # Peak resident memory of this process (a fresh one per package, see main) against the
    # budget: the package's files, the KV cache, and 150 MB for Python, ONNX Runtime and buffers.
    result["package_mb"] = round(folder_size_mb(path), 1)
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    result["peak_rss_budget_mb"] = round(result["package_mb"] + result["kv_cache_mb"] + 150, 1)
    result["peak_rss_within_budget"] = result["peak_rss_mb"] <= result["peak_rss_budget_mb"]
    result["t_half_over_t1_step_cost"] = round(result["T=1/2"]["step_ms"] / result["T=1"]["step_ms"], 3)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", action="append", required=True, help="Model package (repeatable).")
    parser.add_argument("--name", default="small", help="Results go to benchmarks/results/runtime_<name>.json.")
    parser.add_argument("--text", default=str(DEFAULT_TEXT), help="JSONL whose first document gives the prompt.")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    # One fresh process per package, so each peak RSS is that package's alone.
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        results = [pool.apply(bench_package, (p, args.text, args.prompt_tokens, args.new_tokens, args.threads, args.repeats))
                   for p in args.package]
    report = {
        "benchmark": "runtime",
        "command": "python benchmarks/runtime.py " + " ".join(f"--package {p}" for p in args.package)
                   + f" --name {args.name} --new-tokens {args.new_tokens} --threads {args.threads}",
        "provider": "cpu",
        "batch": 1,
        "machine": {"cpu_cores": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version()},
        "packages": results,
    }
    kinds = {r["kind"]: r for r in results}
    if {"calm", "ar"} <= set(kinds):
        report["calm_over_ar_decode_tokens_per_second"] = round(
            kinds["calm"]["T=1"]["decode_tokens_per_second"] / kinds["ar"]["T=1"]["decode_tokens_per_second"], 3)
    out = Path(args.out or REPO / "benchmarks" / "results" / f"runtime_{args.name}.json")
    write_json_atomic(out, report)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
