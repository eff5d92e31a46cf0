"""Benchmark: per-step latency of the C++ runtime against the Python runtime, same package, same run.

Both runtimes generate the same continuation (same prompt, seed and temperature; eos does not
stop them, so every run takes the same number of steps) on the same ONNX Runtime library, with
the same number of threads, taking turns so that both see the same machine load. A runtime
reports when each step's tokens were ready; a step's latency is the time between two of those
(one backbone call, the energy head, the decoder and the sampler for CALM; one AR call and the
sampler for AR). The first entry (prompt checks, prefill and the first step) is reported apart
as time to first step. Each turn loads the model afresh and generates `--repeats` times; the
first of these is a warm-up and is not counted. Model loading is not timed. Writes benchmarks/results/runtime_cpp_<name>.json.

    runtime/cpp/build.sh                       # builds runtime/cpp/build/cmake/calm-edge-generate
    python benchmarks/runtime_cpp.py --package models/calm-small --name small
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from calm_edge.fileio import write_json_atomic

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PROGRAM = REPO / "runtime" / "cpp" / "build" / "cmake" / "calm-edge-generate"
PROMPT = "The history of the city begins"


def python_runs(package, prompt, settings, repeats, threads):
    """(token ids, [[seconds at each step] per run]) of the Python runtime."""
    from calm_edge.runtime.generator import Generator, GeneratorParams
    from calm_edge.runtime.model import Model

    model = Model(package, threads=threads)
    params = GeneratorParams(max_new_tokens=settings["max_new_tokens"], temperature=settings["temperature"],
                             seed=settings["seed"], stop_at_eos=False)
    prompt_ids = model.tokenizer.encode(prompt)
    runs = []
    for _ in range(repeats):
        seconds = []
        started = time.perf_counter()
        generator = Generator(model, [prompt_ids], params)
        for _ in generator:
            seconds.append(time.perf_counter() - started)
        runs.append(seconds)
    return generator.tokens[0], runs


def cpp_runs(program, package, prompt, settings, repeats, threads):
    """(token ids, [[seconds at each step] per run]) of calm-edge-generate, in one process."""
    with tempfile.TemporaryDirectory() as tmp:
        timings = Path(tmp) / "timings.json"
        command = [str(program), str(package), prompt, "--token-ids", "--no-stop-at-eos",
                   "--max-new-tokens", str(settings["max_new_tokens"]), "--temperature", str(settings["temperature"]),
                   "--seed", str(settings["seed"]), "--threads", str(threads), "--repeat", str(repeats),
                   "--timings", str(timings)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"calm-edge-generate failed ({done.returncode}): {done.stderr.strip()}")
        tokens = [int(t) for t in done.stdout.split()]
        return tokens, json.loads(timings.read_text())["runs"]


def summarize(runs, chunk_size):
    """Time to first step and per-step latency (ms) over every measured run."""
    steps = [1000 * (b - a) for seconds in runs for a, b in zip(seconds, seconds[1:])]
    ordered = sorted(steps)
    return {
        "runs": len(runs),
        "steps_per_run": len(runs[0]),
        "first_step_ms": round(statistics.median(1000 * seconds[0] for seconds in runs), 3),
        "step_ms": {
            "median": round(statistics.median(steps), 4),
            "mean": round(statistics.fmean(steps), 4),
            "p10": round(ordered[len(ordered) // 10], 4),
            "p90": round(ordered[(9 * len(ordered)) // 10], 4),
        },
        "ms_per_token": round(statistics.median(steps) / chunk_size, 4),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", required=True, help="Model package folder (CALM or AR).")
    parser.add_argument("--name", required=True, help="Names the result: benchmarks/results/runtime_cpp_<name>.json.")
    parser.add_argument("--program", default=str(DEFAULT_PROGRAM), help="The calm-edge-generate to measure.")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="Turns each runtime takes.")
    parser.add_argument("--repeats", type=int, default=4, help="Generations per turn; the first is a warm-up.")
    parser.add_argument("--out", default=None, help="Result file (default benchmarks/results/runtime_cpp_<name>.json).")
    args = parser.parse_args()
    if args.repeats < 2:
        parser.error("--repeats must be at least 2: the first generation of each turn is a warm-up")

    import onnxruntime

    from calm_edge.runtime.package import Manifest

    program = Path(args.program)
    if not program.is_file():
        sys.exit(f"{program} not found; build it with runtime/cpp/build.sh or pass --program")
    manifest = Manifest.read(args.package)
    settings = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "seed": args.seed}

    measured = {"python": [], "cpp": []}
    tokens = {}
    for round_number in range(args.rounds):
        print(f"round {round_number + 1}/{args.rounds}", flush=True)
        tokens["python"], runs = python_runs(args.package, args.prompt, settings, args.repeats, args.threads)
        measured["python"].extend(runs[1:])
        tokens["cpp"], runs = cpp_runs(program, args.package, args.prompt, settings, args.repeats, args.threads)
        measured["cpp"].extend(runs[1:])

    K = manifest.chunk_size
    python, cpp = summarize(measured["python"], K), summarize(measured["cpp"], K)
    result = {
        "what": "per-step latency, C++ runtime vs Python runtime, same package and machine, taking turns",
        "command": [sys.executable, *sys.argv],
        "package": str(args.package),
        "kind": manifest.kind,
        "chunk_size": K,
        "quantization": manifest.quantization_mode,
        "provenance": {k: manifest.provenance.get(k) for k in ("checkpoint", "step", "parameters")},
        "settings": {**settings, "prompt": args.prompt, "threads": args.threads, "rounds": args.rounds,
                     "repeats": args.repeats, "stop_at_eos": False, "warmup_runs_per_turn": 1},
        "python": python,
        "cpp": cpp,
        "cpp_speedup_per_step": round(python["step_ms"]["median"] / cpp["step_ms"]["median"], 3),
        "identical_tokens": tokens["python"] == tokens["cpp"],
        "tokens": len(tokens["cpp"]),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "onnxruntime": onnxruntime.__version__},
    }
    out = Path(args.out or REPO / "benchmarks" / "results" / f"runtime_cpp_{args.name}.json")
    write_json_atomic(out, result)
    print(json.dumps({k: result[k] for k in ("python", "cpp", "cpp_speedup_per_step", "identical_tokens")}, indent=1))
    print(f"wrote {out}")
    if not result["identical_tokens"]:
        sys.exit("the C++ and Python runtimes generated different tokens; see the test tests/test_cpp_runtime.py")


if __name__ == "__main__":
    main()
