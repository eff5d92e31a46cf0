"""CALM against the token-by-token baseline at T = 1/2, where coherent CALM text is sampled.

    python benchmarks/low_temperature_bench.py paper-dims --tokenizer models/calm-small-int4/tokenizer.model
    python benchmarks/low_temperature_bench.py small --calm-package models/calm-small-int4 --ar-package models/ar-small-int4

Runs `calm-edge bench` over the cells issue 18 names, at T = 1 and T = 1/2, once with the batch
approximation's default candidates and once with the official code's 200, every runner taking
turns in each run, and writes benchmarks/results/low_temperature_<suite>.json with, per cell:
CALM decode tokens/s at T = 1/2 against calm-edge AR's at T = 1/2 (the AR baseline samples at
T = 1/2 for the price of T = 1), a T = 1/2 step against a T = 1 step, the per-graph split; and,
from short untimed generations, what lazy decoding sent the decoder's head per step (calls and
positions, against the N x K a whole decoder computes); and the same package's step and decoder
time with lazy decoding and with every position sent to the head, interleaved (the tokens must
be equal), which is lazy decoding's own gain.

  paper-dims  random weights at the paper's dimensions (`base` preset, fused attention, as
              benchmarks/bench.py builds them, without the peers): CALM-M against Transformer-S at
              128,256 tokens, and the same backbone at 8,192 tokens; batch 1, 2 threads.
  small       two trained packages (the committed int4 ones by default); batch 4 and 16, 1 and 2
              threads. A package in the whole-decoder layout (format 1/2) is first rewritten with
              `calm-edge upgrade` (split decoder, format 3) under --work, as a user would.

Packages under --work are reused, so a rerun only measures.
"""
import argparse
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
TEXT = REPO.parent / "shared" / "data" / "wikitext103-test-doc.jsonl"
CANDIDATES = (16, 200)

sys.path.insert(0, str(REPO / "benchmarks"))
import bench  # noqa: E402  (the paper-dims packages are built as benchmarks/bench.py builds them)


def paper_dims_packages(work, tokenizer):
    packages = []
    for vocab, overrides in {"128k": [], "8k": bench.SAME_BACKBONE}.items():
        for kind in ("calm", "ar"):
            name = f"{kind}-{vocab}"
            bench.random_run(work / "runs" / name, kind, bench.CONTEXT + overrides, tokenizer)
            package = work / "packages" / f"{name}-fused"
            bench.export_random(work / "runs" / name, kind, package, fused=True)
            packages.append(package)
    return packages


def split_if_whole(package, work):
    """The package itself if its decoder is split (or it is an AR package), else its upgraded copy under `work`."""
    from calm_edge.runtime.package import Manifest

    manifest = Manifest.read(package, verify=False)
    if manifest.kind != "calm" or manifest.decoder_layout == "split":
        return Path(package)
    upgraded = work / "packages" / (Path(package).name + "-split")
    if not upgraded.exists():
        bench.calm_edge("upgrade", "--package", package, "--out", upgraded)
    return upgraded


def wikitext_prompts(model, count):
    """`count` prompts of up to 64 tokens from the first WikiText-103 test documents (or fixed ids without them)."""
    if not TEXT.is_file():
        return [[5, 6, 7, 8]] * count
    with TEXT.open(encoding="utf-8") as documents:
        texts = [json.loads(line)["text"] for line in itertools.islice(documents, count)]
    return [model.tokenizer.encode(text[:400])[:64] for text in texts]


def head_traffic(package, temperature, candidates, batch, prompts=4, new_tokens=64, seed=0):
    """Per step: decoder-head calls and positions sent, from untimed generations (lazy decoding's work)."""
    from calm_edge.runtime.generator import Generator, GeneratorParams
    from calm_edge.runtime.model import Model

    model = Model(package, threads=2)
    if model.kind != "calm":
        return None
    prompt_ids = wikitext_prompts(model, prompts * batch)
    steps = calls = rows = 0
    for start in range(0, len(prompt_ids), batch):
        params = GeneratorParams(max_new_tokens=new_tokens, temperature=temperature, candidates=candidates,
                                 seed=seed + start, stop_at_eos=False)
        generator = Generator(model, prompt_ids[start:start + batch], params)
        for _ in generator:
            steps += 1
        calls, rows = calls + generator.state.head_calls, rows + generator.state.head_rows
    whole = batch * candidates * model.chunk_size
    return {"batch": batch, "candidates": candidates, "steps": steps,
            "head_calls_per_step": round(calls / steps, 3), "head_positions_per_step": round(rows / steps, 1),
            "whole_decoder_positions_per_step": whole, "fraction_of_whole": round(rows / steps / whole, 4),
            "lazy": calls > 0}


def lazy_against_plain(package, candidates, batch, threads=2, new_tokens=64, rounds=3, seed=0):
    """Step and decoder milliseconds with lazy decoding and with every position sent to the head, interleaved.

    The same split package both ways (plain: one head call over all N x K positions, what a whole
    decoder computes), so the difference is lazy decoding's alone; the tokens must be equal.
    """
    import time

    from calm_edge.runtime.generator import Generator, GeneratorParams
    from calm_edge.runtime.model import Model
    from calm_edge.runtime.step_state import StepState

    model = Model(package, threads=threads)
    if model.kind != "calm" or not model.manifest.decoder_head_rows_independent:
        return None
    prompts = wikitext_prompts(model, batch)
    params = GeneratorParams(max_new_tokens=new_tokens, temperature=0.5, candidates=candidates, seed=seed,
                             stop_at_eos=False)
    lazy_property = StepState.lazy_decoding
    figures = {"lazy": [], "plain": []}
    tokens = {}
    try:
        for _ in range(rounds):
            for way in ("lazy", "plain"):
                StepState.lazy_decoding = lazy_property if way == "lazy" else property(lambda self: False)
                generator = Generator(model, prompts, params)
                generator.step()  # prefill and the first step: not a decode step
                decoder_before, began, steps = generator.state.timings["decoder"], time.perf_counter(), 0
                for _ in generator:
                    steps += 1
                figures[way].append(((time.perf_counter() - began) / steps * 1e3,
                                     (generator.state.timings["decoder"] - decoder_before) / steps * 1e3))
                tokens[way] = generator.tokens
    finally:
        StepState.lazy_decoding = lazy_property
    if tokens["lazy"] != tokens["plain"]:
        raise SystemExit(f"lazy and plain decoding gave different tokens on {package}: a bug, please report it")

    def median(values):
        return round(sorted(values)[len(values) // 2], 2)

    result = {"package": str(package), "batch": batch, "candidates": candidates, "threads": threads,
              "rounds": rounds, "identical_tokens": True}
    for way, runs in figures.items():
        result[f"{way}_step_ms"] = median([r[0] for r in runs])
        result[f"{way}_decoder_ms"] = median([r[1] for r in runs])
    result["step_speedup"] = round(result["plain_step_ms"] / result["lazy_step_ms"], 3)
    result["decoder_speedup"] = round(result["plain_decoder_ms"] / result["lazy_decoder_ms"], 3)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("suite", choices=["paper-dims", "small"])
    parser.add_argument("--tokenizer", default="models/calm-small-int4/tokenizer.model",
                        help="paper-dims: the tokenizer to pad to the vocabularies.")
    parser.add_argument("--calm-package", default="models/calm-small-int4", help="small: the CALM package.")
    parser.add_argument("--ar-package", default="models/ar-small-int4", help="small: the AR package.")
    parser.add_argument("--work", default=None, help="Where packages go (default bench-work/SUITE).")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--candidates", default=",".join(map(str, CANDIDATES)),
                        help="Candidates of the batch approximation, one bench run each.")
    parser.add_argument("--out", default=None, help="Report JSON (default benchmarks/results/low_temperature_<suite>.json).")
    parser.add_argument("--reuse-bench", action="store_true",
                        help="Take the bench runs from --work where they exist (measure only the rest).")
    args = parser.parse_args()
    work = Path(args.work or f"bench-work/{args.suite}")
    if args.suite == "paper-dims":
        packages = paper_dims_packages(work, args.tokenizer)
        matrix = ["--batch-sizes", "1", "--threads", "2"]
    else:
        packages = [split_if_whole(args.calm_package, work), Path(args.ar_package)]
        matrix = ["--batch-sizes", "4,16", "--threads", "1,2"]
    out = Path(args.out or RESULTS / f"low_temperature_{args.suite.replace('-', '_')}.json")
    command_line = " ".join(["python", "benchmarks/low_temperature_bench.py",
                             *[a for a in sys.argv[1:] if a != "--reuse-bench"]])
    runs = {}
    for candidates in [int(c) for c in args.candidates.split(",")]:
        bench_out = work / "low_temperature" / f"bench_N{candidates}.json"
        if args.reuse_bench and bench_out.is_file():
            runs[candidates] = json.loads(bench_out.read_text())
            continue
        os.environ["CALM_EDGE_BENCH_COMMAND"] = command_line
        bench.calm_edge("bench", *[a for p in packages for a in ("--package", p)], "--out", bench_out,
                        "--prompt-lengths", "64", "--new-tokens", str(args.new_tokens), "--temperatures", "1,1/2",
                        "--candidates", str(candidates), "--rounds", str(args.rounds), "--repeats", str(args.repeats),
                        *(["--text", TEXT] if TEXT.is_file() else []), "--work-dir", work / "peers", *matrix)
        runs[candidates] = json.loads(bench_out.read_text())
    batches = [1] if args.suite == "paper-dims" else [4, 16]
    report = {
        "benchmark": "low_temperature_bench",
        "command": command_line,
        "suite": args.suite,
        "packages": [str(p) for p in packages],
        "machine": next(iter(runs.values()))["machine"],
        "by_candidates": {str(n): {"settings": r["settings"],
                                   "decode_tokens_per_s": {runner["name"]: {key: cell["decode_tokens_per_s"]
                                                                            for key, cell in runner["cells"].items()}
                                                           for runner in r["runners"]},
                                   "comparisons": r["comparisons"],
                                   "low_temperature_cost": r["low_temperature_cost"]} for n, r in runs.items()},
        "head_traffic": [t for p in packages for n in runs for b in batches
                         if (t := head_traffic(p, 0.5, n, b)) is not None],
        "lazy_against_plain": [r for p in packages for n in runs for b in batches
                               if (r := lazy_against_plain(p, n, b, new_tokens=32 if n > 64 else 64)) is not None],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    for n, run in runs.items():
        for c in run["comparisons"]:
            print(f"N={n:>3} {c['cell']:<22} {c['calm']} / {c['ar']}: {c['ratio']}x")
        for c in run["low_temperature_cost"]:
            print(f"N={n:>3} {c['cell']:<22} {c['runner']}: T=1/2 step {c['step_ms']} ms = {c['ratio']}x the T=1 step")


if __name__ == "__main__":
    main()
