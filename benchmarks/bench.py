"""The two reference benchmark runs, one command each: `small` (trained) and `paper-dims` (random weights).

    python benchmarks/bench.py small --calm-run runs/calm_small --ar-run runs/ar_small
    python benchmarks/bench.py paper-dims --tokenizer runs/tok

Each prepares what is missing (model packages, the AR's Hugging Face folder; for small a copy of
the AR run with a 1,024-token context, since its trained 512 cannot hold the matrix's 512-token
prompt and 256 new tokens; for paper-dims the random-weight checkpoints first), then runs `calm-edge bench` over the full matrix with both
peers, writing benchmarks/results/bench_<suite>.json (+ .csv and plots). Existing packages and
folders under --work are reused, so a rerun only measures.

paper-dims measures two pairings in one run, each CALM against Transformer-S-sized AR models
(`base` preset, random weights, calm_edge/weights_read.py gives the ideal ratios):
  - paper: CALM-M (1024 x 16) against Transformer-S (768 x 12), 128,256-token vocabulary;
  - same backbone: CALM with Transformer-S's backbone against Transformer-S, 8,192 tokens.
The contexts are cut to what the matrix needs (prompt 512 + 256 new tokens), because the
runtime preallocates the key/value cache for the whole context; speed does not depend on it.

`--fused-attention` exports the calm-edge packages with ONNX Runtime's fused attention and
rotary operators (`calm-edge export --fused-attention`), as a CPU deployment would ship them;
onnxruntime-genai's model builder writes the same fused operators into its graph. Those packages
get a "-fused" suffix, so plain and fused packages live side by side under --work.

`--layers N` builds the same widths with N layers (a quick end-to-end check of the path), and
`--quick` shrinks the matrix; neither writes to benchmarks/results unless --out says so. Options
after `--` go to `calm-edge bench` unchanged (e.g. `-- --provider cuda --threads 1`).
"""
import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
TEXT = REPO.parent / "shared" / "data" / "wikitext103-test-doc.jsonl"
QUICK = ["--prompt-lengths", "64", "--new-tokens", "32", "--batch-sizes", "1,4", "--threads", "2", "--repeats", "2"]

# Contexts long enough for a 512-token prompt and 256 new tokens (CALM counts vectors of K = 4).
CONTEXT = ["ar.backbone.max_positions=1024", "calm.backbone.max_positions=256"]
SAME_BACKBONE = ["tokenizer.vocab_size=8192", "calm.backbone.hidden_size=768", "calm.backbone.intermediate_size=2048",
                 "calm.backbone.num_layers=12", "calm.backbone.num_heads=12"]


def run(command):
    print("+", " ".join(str(c) for c in command), flush=True)
    subprocess.run([str(c) for c in command], check=True)


def calm_edge(*args):
    run([sys.executable, "-m", "calm_edge.cli", *args])


def export(run_dir, kind, package, hf=None, fused=False):
    """The package (and the AR's Hugging Face folder) of a run, unless they already exist."""
    if not Path(package).exists():
        calm_edge("export", f"--{kind}", run_dir, "--out", package, *(["--fused-attention"] if fused else []))
    if hf is not None and not Path(hf).exists():
        calm_edge("export", "--ar", run_dir, "--format", "hf", "--out", hf)


def export_random(run_dir, kind, package, hf=None, fused=False):
    """Like `export`, with the end-to-end check cut to 1 prompt x 16 tokens.

    Every graph is still validated against PyTorch on random and real inputs; only the token-for-
    token generation check is shortened, because at 128,256 tokens its T = 1/2 steps decode 16
    candidates through the full vocabulary in both PyTorch and ONNX Runtime, and random weights
    make no text worth comparing at length.
    """
    from calm_edge.export.exporter import export_package
    from calm_edge.export.huggingface import export_hf

    if not Path(package).exists():
        print(f"+ export {kind} {run_dir} -> {package} (end-to-end check: 1 prompt x 16 tokens"
              f"{', fused attention' if fused else ''})", flush=True)
        export_package(run_dir, package, kind=kind, e2e_prompts=1, e2e_tokens=16, fused_attention=fused)
    if hf is not None and not Path(hf).exists():
        print(f"+ export {run_dir} --format hf -> {hf}", flush=True)
        export_hf(run_dir, hf)


def random_run(out, kind, overrides, tokenizer):
    if Path(out).exists():
        return
    from calm_edge.config import resolve_config
    from calm_edge.export.random_weights import random_checkpoint

    print(f"+ random {kind} checkpoint {out}: base preset {' '.join(overrides)}", flush=True)
    random_checkpoint(resolve_config("base", None, overrides), kind, tokenizer, out)


def paper_dims(args):
    work = Path(args.work)
    layers = [f"calm.backbone.num_layers={args.layers}", f"ar.backbone.num_layers={args.layers}"] if args.layers else []
    pairings = {"128k": [], "8k": SAME_BACKBONE}
    packages, hf_dirs = [], []
    for vocab, overrides in pairings.items():
        settings = CONTEXT + overrides + layers
        for kind in ("calm", "ar"):
            name = f"{kind}-{vocab}" + (f"-{args.layers}l" if args.layers else "")
            package = work / "packages" / (name + ("-fused" if args.fused_attention else ""))
            random_run(work / "runs" / name, kind, settings, args.tokenizer)
            export_random(work / "runs" / name, kind, package, work / "hf" / name if kind == "ar" else None,
                          args.fused_attention)
            packages.append(package)
            if kind == "ar":
                hf_dirs.append(work / "hf" / name)
    return packages, hf_dirs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("suite", choices=["small", "paper-dims"])
    parser.add_argument("--calm-run", default="runs/calm", help="small: the trained CALM run.")
    parser.add_argument("--ar-run", default="runs/ar", help="small: the trained AR run.")
    parser.add_argument("--ar-context", type=int, default=1024,
                        help="small: export the AR with this context (tokens; its 512 cannot hold the 512-token "
                             "prompt and 256 new tokens; rotary positions, same weights); 0 keeps the trained one.")
    parser.add_argument("--tokenizer", default="runs/tok", help="paper-dims: the tokenizer to pad to the vocabularies.")
    parser.add_argument("--layers", type=int, default=None, help="paper-dims: fewer layers, for a quick check.")
    parser.add_argument("--fused-attention", action="store_true",
                        help="Export the calm-edge packages with fused attention (a '-fused' suffix).")
    parser.add_argument("--work", default=None, help="Where packages and converted models go (default bench-work/SUITE).")
    parser.add_argument("--quick", action="store_true", help="A small matrix (a check that everything runs).")
    parser.add_argument("--out", default=None, help="Report JSON (default benchmarks/results/bench_<suite>.json).")
    # Anything after `--` goes to `calm-edge bench` as it is (e.g. -- --provider cuda --threads 1).
    argv = sys.argv[1:]
    bench_args = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.work = args.work or f"bench-work/{args.suite}"
    if args.suite == "small":
        work = Path(args.work)
        suffix = "-fused" if args.fused_attention else ""
        export(args.calm_run, "calm", work / "packages" / f"calm-small{suffix}", fused=args.fused_attention)
        ar_run = args.ar_run
        if args.ar_context:  # same weights, a context that holds a 512-token prompt and 256 new tokens
            ar_run = work / "runs" / f"ar-small-ctx{args.ar_context}"
            if not ar_run.exists():
                from calm_edge.export.random_weights import widened_checkpoint

                print(f"+ {args.ar_run} with a context of {args.ar_context} tokens -> {ar_run}", flush=True)
                widened_checkpoint(args.ar_run, ar_run, args.ar_context)
        export(ar_run, "ar", work / "packages" / f"ar-small{suffix}", work / "hf" / "ar-small", fused=args.fused_attention)
        packages = [work / "packages" / f"calm-small{suffix}", work / "packages" / f"ar-small{suffix}"]
        hf_dirs = [work / "hf" / "ar-small"]
    else:
        packages, hf_dirs = paper_dims(args)
    if args.out is None and (args.quick or args.layers):
        parser.error("--quick and --layers are checks, not the results; give --out somewhere outside benchmarks/results")
    out = args.out or RESULTS / f"bench_{args.suite.replace('-', '_')}.json"
    command = ["bench", *[a for p in packages for a in ("--package", p)], *[a for h in hf_dirs for a in ("--hf", h)],
               "--peer", "optimum", "--peer", "ort-genai", "--work-dir", Path(args.work) / "peers", "--out", out]
    if TEXT.is_file():
        command += ["--text", TEXT]
    # The report records this script's command line, the one that reproduces the whole measurement.
    os.environ["CALM_EDGE_BENCH_COMMAND"] = " ".join(["python", "benchmarks/bench.py", *sys.argv[1:]])
    calm_edge(*command, *(QUICK if args.quick else []), *bench_args)


if __name__ == "__main__":
    main()
