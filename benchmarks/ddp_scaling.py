"""Benchmark: training tokens/s with 1 and with 2 data-parallel processes on this machine.

    python benchmarks/ddp_scaling.py

The `small` preset's CALM and AR shapes (vocabulary 8,192) with `--batch-size` windows of
`--seq-len` tokens per process and micro-batch, one intra-op thread per process, on the demo
corpus (speed does not depend on the text). Each kind trains `--steps` optimizer steps as one
process and then as two (`torchrun --standalone --nproc_per_node 2`), taking turns `--rounds`
times; tokens/s is taken from metrics.jsonl between the second and the last step (the first
steps warm up), and counts every process's tokens. The 1-process run accumulates as many
micro-batches per step as the two processes do together, so both take the same global batch.
Writes benchmarks/results/ddp_scaling.json with the 2-process / 1-process ratio per round.

`--calm-run RUN` adds the context diagnostic of a trained CALM (the `small` one): at every
validation of RUN, the held-out energy with each position's own hidden state and with another
position's (`energy_other_context`). `--keep-timing` writes only that, keeping the timing
figures already in `--out`.

    python benchmarks/ddp_scaling.py --calm-run runs/calm_small --keep-timing
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from calm_edge.fileio import write_json_atomic
from calm_edge.training.metrics import OTHER_CONTEXT, MetricsLog

REPO = Path(__file__).resolve().parent.parent


def cli(arguments, processes, env):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
                if processes > 1 else [sys.executable])
    subprocess.run([*launcher, "-m", "calm_edge.cli", "-q", *arguments], env=env, check=True)


def training_rate(run):
    """(tokens/s, seconds per step) between the second and the last train record of `run`."""
    train = [r for r in MetricsLog(run).records() if r["split"] == "train"]
    first, last = train[1], train[-1]
    seconds = last["elapsed_seconds"] - first["elapsed_seconds"]
    return (last["tokens"] - first["tokens"]) / seconds, seconds / (last["step"] - first["step"])


def context_diagnostic(run):
    """The validation records of a CALM run: energy with the true and with another position's context."""
    log, other = MetricsLog(run), "energy" + OTHER_CONTEXT
    valid = [r for r in log.records() if r["split"] == "valid" and other in r]
    if not valid:
        raise SystemExit(f"error: {log.path} has no validation with {other}; "
                         "give a CALM run trained with the context diagnostic")
    curve = [{"step": r["step"], "energy": round(r["energy"], 4), other: round(r[other], 4),
              "gain": round(r[other] - r["energy"], 4)} for r in valid]
    return {"run": str(run), "definition": "held-out energy (lower is better) with each position's own hidden "
                                            "state, and with another position's; gain = other - own",
            "validations": curve, "last": curve[-1]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ddp_scaling.json"))
    parser.add_argument("--work-dir", default="bench-work/ddp")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--calm-run", help="A trained CALM run whose context diagnostic the report adds.")
    parser.add_argument("--keep-timing", action="store_true",
                        help="Do not time anything: keep the timing figures in --out, (re)write the diagnostic.")
    args = parser.parse_args()
    out = Path(args.out)
    diagnostic = {"context_diagnostic": context_diagnostic(args.calm_run)} if args.calm_run else {}
    if args.keep_timing:
        if not out.is_file():
            raise SystemExit(f"error: --keep-timing needs the timing figures in {out}; run without it first")
        report = json.loads(out.read_text())
        write_json_atomic(out, {**report, **diagnostic,
                                "diagnostic_command": " ".join(["python", "benchmarks/ddp_scaling.py", *sys.argv[1:]])})
        print(json.dumps(diagnostic), "->", out)
        return

    work = Path(args.work_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not (work / "shards" / "index.json").is_file():
        cli(["tokenizer", "train", "--data", "demo:bible", "--preset", "small", "--out", str(work / "tok"), "--force"],
            1, env)
        cli(["data", "prepare", "--data", "demo:bible", "--tokenizer", str(work / "tok"), "--out",
             str(work / "shards"), "--force"], 1, env)
    sets = lambda section, accum, steps: [a for kv in (
        f"{section}.batch_size={args.batch_size}", f"{section}.seq_len={args.seq_len}", f"{section}.max_steps={steps}",
        f"{section}.grad_accum_steps={accum}", f"{section}.log_every=1", f"{section}.eval_every=100000",
        f"{section}.save_every=100000", f"{section}.bf16=false") for a in ("--set", kv)]
    if not (work / "ae" / "checkpoints").is_dir():
        cli(["train", "autoencoder", "--preset", "small", "--data", str(work / "shards"), "--out", str(work / "ae"),
             "--force", *sets("train_autoencoder", 1, 1)], 1, env)

    rounds = {kind: [] for kind in ("calm", "ar")}
    for round_index in range(args.rounds):
        for kind in rounds:
            source = ["--autoencoder", str(work / "ae")] if kind == "calm" else []
            figures = {}
            for processes in (1, 2):
                run = work / f"{kind}-{processes}"
                cli(["train", kind, "--preset", "small", *source, "--data", str(work / "shards"), "--out", str(run),
                     "--force", *sets(f"train_{kind}", 2 // processes, args.steps)], processes, env)
                rate, step_seconds = training_rate(run)
                figures[f"processes_{processes}"] = {"tokens_per_second": round(rate, 1),
                                                     "seconds_per_step": round(step_seconds, 3)}
            figures["ratio_2_over_1"] = round(figures["processes_2"]["tokens_per_second"]
                                              / figures["processes_1"]["tokens_per_second"], 3)
            rounds[kind].append(figures)
            print(kind, f"round {round_index + 1}", figures, flush=True)

    summary = {kind: {"ratio_2_over_1": statistics.median(r["ratio_2_over_1"] for r in runs),
                      "tokens_per_second_1": statistics.median(r["processes_1"]["tokens_per_second"] for r in runs),
                      "tokens_per_second_2": statistics.median(r["processes_2"]["tokens_per_second"] for r in runs)}
               for kind, runs in rounds.items()}
    write_json_atomic(out, {
        "benchmark": "ddp_scaling",
        "command": " ".join(["python", "benchmarks/ddp_scaling.py", *sys.argv[1:]]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "settings": {"preset": "small", "batch_size_per_process": args.batch_size, "seq_len": args.seq_len,
                     "steps": args.steps, "global_batch_windows": 2 * args.batch_size, "threads_per_process": 1,
                     "data": "demo:bible", "bf16": False},
        "definitions": {"tokens_per_second": "training tokens of all processes between the second and the last "
                                             "step / the time between them (metrics.jsonl)",
                        "ratio_2_over_1": "2 processes / 1 process (accumulating 2 micro-batches) in the same round"},
        "summary": summary, "rounds": rounds, **diagnostic,
    })
    print(json.dumps(summary), "->", args.out)


if __name__ == "__main__":
    main()
