"""Benchmark: calm-edge's own CALM structure against the released models', trained alike at a tiny size.

    python benchmarks/architecture_choice.py           # -> benchmarks/results/architecture_tiny.json

The released CALM models differ from calm-edge's own in two places (calm_edge/models/calm.py):
the input projection (official: Linear K*H -> 2H, SiLU, Linear 2H -> H, LayerNorm, zero biases;
calm-edge: K*H -> H -> H) and the energy head (official: the MLPGenerator of LayerNorms and
concatenated noise and condition, its last layer zero at first; calm-edge: RMSNorm residual blocks
that add the projected condition). Whether calm-edge's own training adopts the official structure
is decided here: one autoencoder, then CALM models of each variant trained on the same shards with
the same seeds, scored by the held-out energy loss (lower is better) and Brier-1 on held-out text
(higher is better), each with its spread over the seeds. The same runs measure two training
choices: the warm-up's length, and the energy head's last layer starting at zero. Each run also
reports its context gain, the held-out energy with every position's hidden state taken from
another position minus the true-context energy: near 0, the model ignores its context.

Data: the first documents of ../shared/data/wiki-train (training) and wiki-valid (scoring), a
2,048-piece tokenizer trained on them; the tiny preset's models with a 256-token window.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from calm_edge.config import preset
from calm_edge.corpus import iter_documents
from calm_edge.data import prepare_shards
from calm_edge.evaluation.language_model import evaluate_checkpoint
from calm_edge.evaluation.settings import EvalSettings
from calm_edge.fileio import write_json_atomic
from calm_edge.text_source import TextSource
from calm_edge.tokenizer import train_tokenizer
from calm_edge.training.autoencoder import train_autoencoder
from calm_edge.training.language_models import train_calm

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"
OFFICIAL_PROJECTION = ["calm.input_projection=official"]
VARIANTS = {  # name -> overrides of the base below (whose CALM warms up over 40 of its 400 steps)
    "calm-edge": [],
    "calm-edge with the head's last layer zero at first": ["calm.head_zero_init=true"],
    "calm-edge with warm-up 200": ["train_calm.warmup_steps=200"],
    "official input projection": OFFICIAL_PROJECTION,
    "official input projection with warm-up 20": [*OFFICIAL_PROJECTION, "train_calm.warmup_steps=20"],
    "official input projection with warm-up 200": [*OFFICIAL_PROJECTION, "train_calm.warmup_steps=200"],
    "official input projection and energy head": [*OFFICIAL_PROJECTION, "calm.energy_head=official"],
}


def slice_corpus(source, target, characters):
    """Whole documents of `source` up to `characters`, as JSONL."""
    total = 0
    with open(target, "w", encoding="utf-8") as f:
        for document in iter_documents([source]):
            f.write(json.dumps({"text": document.text}) + "\n")
            total += len(document.text)
            if total >= characters:
                break
    return target


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(REPO / "bench-work" / "architecture"))
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names, default all")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--characters", type=int, default=4_000_000)
    parser.add_argument("--positions", type=int, default=1000)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "architecture_tiny.json"))
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    train_text = slice_corpus(DATA / "wiki-train.jsonl.xz", work / "train.jsonl", args.characters)
    valid_text = DATA / "wiki-valid.jsonl"
    steps = [f"max_steps={args.steps}", "seq_len=256", "batch_size=16", "eval_every=100", "save_every=100",
             "eval_batches=8", "warmup_steps=40", "log_every=20"]
    base = preset("tiny").with_overrides(["tokenizer.vocab_size=2048", "autoencoder.latent_size=32",
                                          "calm.backbone.max_positions=256", "calm.backbone.num_layers=4"]
                                         + [f"train_calm.{s}" for s in steps]
                                         + ["train_autoencoder.max_steps=600", "train_autoencoder.seq_len=256"])
    if not (work / "tok" / "tokenizer.json").is_file():
        train_tokenizer([train_text], work / "tok", base.tokenizer, force=True, progress=False)
    if not (work / "shards" / "index.json").is_file():
        prepare_shards([train_text], work / "tok", work / "shards", valid_fraction=0.02, force=True, progress=False)
    if not (work / "ae" / "run_summary.json").is_file() and not list((work / "ae").glob("checkpoints/*")):
        train_autoencoder(base, work / "shards", work / "ae", force=True, progress=False)
    text = TextSource((str(valid_text),))
    results = {}
    for name in args.variants.split(","):
        overrides = VARIANTS[name]
        runs = []
        for seed in map(int, args.seeds.split(",")):
            config = base.with_overrides([*overrides, f"train_calm.seed={seed}"])
            out = work / f"{name.replace(' ', '-')}-{seed}"
            began = time.perf_counter()
            summary = train_calm(config, work / "ae", work / "shards", out, force=True, progress=False)
            quality = evaluate_checkpoint(out, text, EvalSettings(context=128, max_positions=args.positions, seed=seed),
                                          progress=False)
            valid = summary["valid"]
            runs.append({"seed": seed, "valid_energy": valid["energy"],
                         "context_gain": valid["energy_other_context"] - valid["energy"], "brier_1": quality["brier_1"],
                         "brier_1_stderr": quality["by_offset"]["0"]["brier_1_stderr"],
                         "parameters": summary["parameters"], "seconds": round(time.perf_counter() - began, 1)})
            print(name, runs[-1], flush=True)
        results[name] = {"runs": runs, **{f"{key}_mean": statistics.fmean(r[key] for r in runs)
                                           for key in ("valid_energy", "context_gain", "brier_1")},
                         **{f"{key}_sd": statistics.stdev(r[key] for r in runs) if len(runs) > 1 else None
                            for key in ("valid_energy", "context_gain", "brier_1")}}
    reference = results.get("calm-edge")
    for result in results.values():
        if reference:
            result["valid_energy_vs_calm_edge"] = result["valid_energy_mean"] - reference["valid_energy_mean"]
    write_json_atomic(args.out, {"benchmark": "architecture_tiny",
                                 "command": " ".join(["python", "benchmarks/architecture_choice.py", *sys.argv[1:]]),
                                 "settings": {"steps": args.steps, "seeds": args.seeds, "characters": args.characters,
                                              "positions": args.positions, "config": base.to_dict()},
                                 "variants": results})
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
