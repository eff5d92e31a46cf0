"""Benchmark: quality of trained CALM and AR models at equal training FLOPs, with samples.

For each run: BrierLM and Brier-1..4 on WikiText-103 test (detokenized to plain text, since the
tokenizer was trained on plain Wikipedia), at every offset within a chunk (prompts ending at any
token, not only at chunk boundaries; the headline figure is the mean over offsets), beside the
run's parameters, training FLOPs, inference FLOPs per token and the command that trained it; and
a few generated samples (PyTorch reference, fixed seeds), so the numbers come with text.

Every evaluation also runs the context diagnostic (README: The context diagnostic): Brier-1 with
each target scored after another position's context, beside the true context's, both with their
standard errors. A model that uses its context scores clearly lower on the other one.

`--calm-package` / `--ar-package` evaluate a model package through the runtime (its ONNX graphs,
as deployed) at the same positions; the figures go under `package_evaluation` of that kind's
entry, which keeps its training record. This is how a model whose training run is no longer at
hand (the committed `models/` packages) is measured.

    python benchmarks/quality.py --calm runs/calm_small --ar runs/ar_small --name small
    python benchmarks/quality.py --ar-package models/ar-small-int4 --name small
"""
import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from calm_edge.evaluation.language_model import evaluate_checkpoint
from calm_edge.evaluation.package import evaluate_model_package
from calm_edge.evaluation.settings import EvalSettings
from calm_edge.export.reference import TorchModel
from calm_edge.fileio import write_json_atomic
from calm_edge.runtime.generator import GeneratorParams, generate_tokens
from calm_edge.text_source import TextSource

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "wikitext103-test-doc.jsonl"
SAMPLE_PROMPTS = ("The history of the city", "In 1905, the company", "The song was released")
TRAIN_COMMANDS = {
    "calm": "calm-edge train calm --preset small --autoencoder runs/ae_small --data runs/shards --out runs/calm_small",
    "ar": "calm-edge train ar --preset small --data runs/shards --out runs/ar_small",
}


def samples(run, new_tokens=48):
    model = TorchModel.load(run)
    prompts = [model.tokenizer.encode(p) for p in SAMPLE_PROMPTS]
    out = {}
    for label, temperature in (("T=1", 1.0), ("T=1/2", 0.5)):
        params = GeneratorParams(max_new_tokens=new_tokens, temperature=temperature, seed=7)
        out[label] = [{"prompt": p, "continuation": model.tokenizer.decode(ids)}
                      for p, ids in zip(SAMPLE_PROMPTS, generate_tokens(model, prompts, params))]
    return out


def settings(max_positions):
    return EvalSettings(offsets=(0, 1, 2, 3), max_positions=max_positions, other_context=True)


def mean_over_offsets(result):
    """The headline figures: each Brier-n averaged over the offsets, and Brier-1's standard error
    (the offsets' positions are disjoint, so their errors add in quadrature) for the true and the
    other position's context."""
    offsets = list(result["by_offset"].values())
    mean = lambda values: sum(values) / len(values)
    stderr = lambda values: sum(v * v for v in values) ** 0.5 / len(values)
    figures = {k: mean([o[k] for o in offsets]) for k in ("brier_1", "brier_2", "brier_3", "brier_4", "brierlm")}
    figures["brier_1_stderr"] = stderr([o["brier_1_stderr"] for o in offsets])
    if all("other_context" in o for o in offsets):
        figures["brier_1_other_context"] = mean([o["other_context"]["brier_1"] for o in offsets])
        figures["brier_1_other_context_stderr"] = stderr([o["other_context"]["brier_1_stderr"] for o in offsets])
    return {k: round(v, 4) for k, v in figures.items()}


def bench_run(kind, run, data, max_positions):
    started = time.perf_counter()
    result = evaluate_checkpoint(run, TextSource((str(data),), detokenize="wikitext"), settings(max_positions),
                                 progress=True)
    summary = json.loads((Path(run) / "run_summary.json").read_text())
    return {
        "kind": kind,
        "run": str(run),
        "train_command": TRAIN_COMMANDS.get(kind),
        "step": summary["step"],
        "tokens_seen": summary["tokens_seen"],
        "training_seconds": summary.get("elapsed_seconds"),
        "parameters": summary["parameters"],
        "training_flops": summary["training_flops"],
        "inference_flops_per_token": summary["inference_flops_per_token"],
        "valid": summary.get("valid"),
        "mean_over_offsets": mean_over_offsets(result),
        "evaluation": result,
        "eval_seconds": round(time.perf_counter() - started, 1),
        "samples": samples(run),
    }


def bench_package(package, data, max_positions):
    result = evaluate_model_package(package, TextSource((str(data),), detokenize="wikitext"), settings(max_positions),
                                    progress=True)
    return {"mean_over_offsets": mean_over_offsets(result), "evaluation": result}


def describe(kind, figures):
    line = f"{kind}: BrierLM {figures['brierlm']:.2f}, Brier-1 {figures['brier_1']:.4f} +/- {figures['brier_1_stderr']:.4f}"
    if "brier_1_other_context" in figures:
        line += (f", with another position's context {figures['brier_1_other_context']:.4f}"
                 f" +/- {figures['brier_1_other_context_stderr']:.4f}")
    return line


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calm", help="A CALM training run, evaluated in PyTorch.")
    parser.add_argument("--ar", help="An AR training run, evaluated in PyTorch.")
    parser.add_argument("--calm-package", help="A CALM model package, evaluated through the runtime.")
    parser.add_argument("--ar-package", help="An AR model package, evaluated through the runtime.")
    parser.add_argument("--name", default="small")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--max-positions", type=int, default=500, help="Positions per offset.")
    args = parser.parse_args()

    out = REPO / "benchmarks" / "results" / f"quality_{args.name}.json"
    # Models evaluated in separate runs share one file: an entry evaluated now replaces its old one.
    entries = {r["kind"]: r for r in json.loads(out.read_text())["results"]} if out.is_file() else {}
    command = " ".join(["python", "benchmarks/quality.py", *sys.argv[1:]])
    for kind, run, package in (("calm", args.calm, args.calm_package), ("ar", args.ar, args.ar_package)):
        if run:
            kept = entries.get(kind, {}).get("package_evaluation")
            entries[kind] = {**bench_run(kind, run, args.data, args.max_positions), "command": command}
            if kept:  # a package evaluated before keeps its figures until it is evaluated again
                entries[kind]["package_evaluation"] = kept
            print(describe(kind, entries[kind]["mean_over_offsets"]))
        if package:
            entries.setdefault(kind, {"kind": kind})["package_evaluation"] = {
                **bench_package(package, args.data, args.max_positions), "command": command}
            print(describe(f"{kind} package {package}", entries[kind]["package_evaluation"]["mean_over_offsets"]))
    report = {
        "benchmark": "quality",
        "data": Path(args.data).name,
        "estimator": "BrierLM = 100 x geometric mean of Brier-1..4, two model samples per position (paper, section 4); "
                     "positions every 32 tokens with 256 tokens of context, at offsets 0..3 within a chunk; "
                     "the context diagnostic scores each target after the context of the position half the "
                     "evaluation away",
        "machine": {"cpu_cores": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "results": sorted(entries.values(), key=lambda r: r["kind"] != "calm"),
    }
    write_json_atomic(out, report)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
