"""Benchmark: the `small` preset's autoencoder, trained on the shared Wikipedia text on this machine.

Runs the pipeline through the CLI, exactly as a user would, into runs/ (git-ignored):

    calm-edge tokenizer train --data ../shared/data/wiki-train.jsonl.xz --vocab-size 8192 --out runs/tok
    calm-edge data prepare --data ../shared/data/wiki-train.jsonl.xz --tokenizer runs/tok --out runs/shards
    calm-edge train autoencoder --preset small --data runs/shards --out runs/ae_small
    calm-edge eval autoencoder --checkpoint runs/ae_small --data ../shared/data/wikitext103-test-doc.jsonl \
        --detokenize wikitext --out runs/ae_small_eval_wikitext.json          (and once more --detokenize none)

The tokenizer and shards are reused when present; a training run already in runs/ae_small is
resumed (--resume), so the script can be stopped and started again. Writes
benchmarks/results/autoencoder_small.json: the commands, preset, tokens seen, wall time of the
training, parameter count, token and chunk accuracy on WikiText-103 test (detokenized, and as
WikiText writes it) and the latent-noise robustness table.

    python benchmarks/autoencoder_small.py
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from calm_edge.fileio import write_json_atomic

REPO = Path(__file__).resolve().parent.parent
DATA = "../shared/data/wiki-train.jsonl.xz"
TEST = "../shared/data/wikitext103-test-doc.jsonl"


def run(command):
    """Run one CLI command from the repository root; return its wall time."""
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True)
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "autoencoder_small.json"))
    parser.add_argument("--run", default="runs/ae_small", help="Training run folder, relative to the repository.")
    args = parser.parse_args()

    cli = ["calm-edge", "-q"]
    commands = {
        "tokenizer": [*cli, "tokenizer", "train", "--data", DATA, "--vocab-size", "8192", "--out", "runs/tok"],
        "data": [*cli, "data", "prepare", "--data", DATA, "--tokenizer", "runs/tok", "--out", "runs/shards"],
    }
    if not (REPO / "runs" / "tok" / "tokenizer.model").exists():
        run(commands["tokenizer"])
    if not (REPO / "runs" / "shards" / "index.json").exists():
        run(commands["data"])

    train = ["calm-edge", "train", "autoencoder", "--preset", "small", "--data", "runs/shards", "--out", args.run]
    resumed = (REPO / args.run / "checkpoints").is_dir()
    run(train + (["--resume"] if resumed else []))
    commands["train"] = train

    evaluations = {}
    for form in ("wikitext", "none"):
        report = f"{args.run}_eval_{form}.json"
        command = [*cli, "eval", "autoencoder", "--checkpoint", args.run, "--data", TEST, "--detokenize", form,
                   "--out", report]
        run(command)
        commands[f"eval_{form}"] = command
        evaluations[form] = json.loads((REPO / report).read_text())

    main_eval = evaluations["wikitext"]
    trainer = json.loads((Path(REPO / main_eval["checkpoint"]) / "trainer.json").read_text())
    config = json.loads((Path(REPO / main_eval["checkpoint"]) / "config.json").read_text())
    report = {
        "benchmark": "autoencoder_small",
        "commands": {name: " ".join(c) for name, c in commands.items()},
        "preset": "small",
        "autoencoder": config["autoencoder"],
        "train_autoencoder": config["train_autoencoder"],
        "machine": {"cpu_cores": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "torch_threads": _torch_threads()},
        "parameters": main_eval["parameters"],
        "steps": trainer["step"],
        "tokens_seen": trainer["tokens_seen"],
        "train_wall_seconds": trainer["elapsed_seconds"],
        "valid_during_training": trainer.get("valid", {}),
        "eval_data": TEST,
        "eval_text_form": main_eval["text_form"],
        "tokens_evaluated": main_eval["tokens_evaluated"],
        "token_accuracy": main_eval["token_accuracy"],
        "chunk_accuracy": main_eval["chunk_accuracy"],
        "most_missed_tokens": main_eval["most_missed_tokens"],
        "posterior": main_eval["posterior"],
        "posterior_sample": main_eval["posterior_sample"],
        "noise": main_eval["noise"],
        "noise_robustness": main_eval["noise_robustness"],
        "as_is_wikitext": {k: evaluations["none"][k] for k in
                           ("text_form", "tokens_evaluated", "token_accuracy", "chunk_accuracy", "most_missed_tokens",
                            "noise_robustness")},
    }
    write_json_atomic(args.out, report)
    print(json.dumps({k: report[k] for k in ("steps", "tokens_seen", "train_wall_seconds", "token_accuracy",
                                             "chunk_accuracy")}, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)


def _torch_threads():
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
