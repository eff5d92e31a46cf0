"""Benchmark: quality of trained CALM and AR models at equal training FLOPs, with samples.

For each run: BrierLM and Brier-1..4 on WikiText-103 test (detokenized to plain text, since the
tokenizer was trained on plain Wikipedia), at every offset within a chunk (prompts ending at any
token, not only at chunk boundaries; the headline figure is the mean over offsets), beside the
run's parameters, training FLOPs, inference FLOPs per token and the command that trained it; and
a few generated samples (PyTorch reference, fixed seeds), so the numbers come with text.

    python benchmarks/quality.py --calm runs/calm_small --ar runs/ar_small --name small
"""
import argparse
import json
import os
import platform
import time
from pathlib import Path

from calm_edge.evaluation.language_model import evaluate_checkpoint
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


def bench_run(kind, run, data, max_positions):
    started = time.perf_counter()
    result = evaluate_checkpoint(run, TextSource((str(data),), detokenize="wikitext"),
                                 EvalSettings(offsets=(0, 1, 2, 3), max_positions=max_positions), progress=True)
    summary = json.loads((Path(run) / "run_summary.json").read_text())
    offsets = result["by_offset"]
    mean = {k: sum(o[k] for o in offsets.values()) / len(offsets) for k in ("brier_1", "brier_2", "brier_3", "brier_4", "brierlm")}
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
        "mean_over_offsets": {k: round(v, 4) for k, v in mean.items()},
        "evaluation": result,
        "eval_seconds": round(time.perf_counter() - started, 1),
        "samples": samples(run),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calm")
    parser.add_argument("--ar")
    parser.add_argument("--name", default="small")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--max-positions", type=int, default=1000, help="Positions per offset.")
    args = parser.parse_args()

    results = [bench_run(kind, run, args.data, args.max_positions)
               for kind, run in (("calm", args.calm), ("ar", args.ar)) if run]
    for r in results:
        print(f"{r['kind']}: BrierLM {r['mean_over_offsets']['brierlm']:.2f} (offset 0: {r['evaluation']['brierlm']:.2f}), "
              f"{r['parameters']:,} parameters, {r['training_flops']:.3g} training FLOPs")
    command = "python benchmarks/quality.py" + (f" --calm {args.calm}" if args.calm else "") \
        + (f" --ar {args.ar}" if args.ar else "") + f" --name {args.name} --max-positions {args.max_positions}"
    for r in results:
        r["command"] = command
    out = REPO / "benchmarks" / "results" / f"quality_{args.name}.json"
    # Models evaluated in separate runs share one file: a kind evaluated now replaces its old entry.
    if out.is_file():
        kept = [r for r in json.loads(out.read_text())["results"] if r["kind"] not in {n["kind"] for n in results}]
        results = sorted(kept + results, key=lambda r: r["kind"] != "calm")
    report = {
        "benchmark": "quality",
        "data": Path(args.data).name,
        "estimator": "BrierLM = 100 x geometric mean of Brier-1..4, two model samples per position (paper, section 4); "
                     "positions every 32 tokens with 256 tokens of context, at offsets 0..3 within a chunk",
        "machine": {"cpu_cores": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "results": results,
    }
    write_json_atomic(out, report)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
