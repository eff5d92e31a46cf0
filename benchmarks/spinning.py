"""Benchmark: decode speed under each thread-spinning policy of the runtime (runtime/model.py SPINNING).

    python benchmarks/spinning.py --name small --package packages/calm-small --package packages/ar-small \
        --package bench-work/paper-dims/packages/calm-8k --package bench-work/paper-dims/packages/ar-8k

For every package and policy ("off", "run", "on"): batch-1 decode tokens/s at T = 1 (64-token
prompt, `--new-tokens`, `--threads`), the median of `--repeats` generations. The policies of one
package take turns within each repeat, so a busy moment of the machine falls on all of them;
each package is opened once per policy (the policy is a session option). Writes
benchmarks/results/spinning_<name>.json with each policy's speed relative to "off" in the same run.
"""
import argparse
import os
import platform
import sys
import statistics
import time
from pathlib import Path

from calm_edge.fileio import write_json_atomic
from calm_edge.runtime.generator import GeneratorParams
from calm_edge.runtime.model import SPINNING, Model
from calm_edge.runtime.profiling import trace_generation
from calm_edge.runtime.timing import decode_tokens_per_second

REPO = Path(__file__).resolve().parent.parent


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="Result name: benchmarks/results/spinning_<name>.json")
    parser.add_argument("--package", action="append", required=True, help="A model package (repeatable).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    prompt = list(range(10, 74))  # 64 ordinary token ids; speed does not depend on which
    params = GeneratorParams(max_new_tokens=args.new_tokens, seed=0, stop_at_eos=False)
    results = {}
    for path in args.package:
        models = {policy: Model(path, threads=args.threads, spinning=policy) for policy in SPINNING}
        runs = {policy: [] for policy in SPINNING}
        for policy, model in models.items():  # warm-up
            trace_generation(model, [prompt], params)
        for _ in range(args.repeats):
            for policy, model in models.items():
                runs[policy].append(decode_tokens_per_second(trace_generation(model, [prompt], params)[1]))
        medians = {policy: statistics.median(speeds) for policy, speeds in runs.items()}
        results[path] = {"kind": models["off"].kind,
                         "decode_tokens_per_second": {p: round(v, 1) for p, v in medians.items()},
                         "relative_to_off": {p: round(v / medians["off"], 3) for p, v in medians.items()},
                         "all_runs": {p: [round(v, 1) for v in speeds] for p, speeds in runs.items()}}
        print(path, results[path]["decode_tokens_per_second"], results[path]["relative_to_off"], flush=True)
        del models
    out = REPO / "benchmarks" / "results" / f"spinning_{args.name}.json"
    write_json_atomic(out, {
        "benchmark": f"spinning_{args.name}",
        "command": " ".join(["python", "benchmarks/spinning.py", *sys.argv[1:]]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {"batch": 1, "temperature": 1, "prompt_tokens": len(prompt), "new_tokens": args.new_tokens,
                     "threads": args.threads, "repeats": args.repeats, "statistic": "median"},
        "policies": {p: entries for p, entries in SPINNING.items()},
        "machine": {"cpu_cores": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "packages": results,
    })
    print(f"-> {out}")


if __name__ == "__main__":
    main()
