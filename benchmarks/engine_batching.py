"""Benchmark: the runtime's `Engine` alone, continuous against static batching, no HTTP.

    python benchmarks/engine_batching.py                 # results/engine_batching_small.json
    python benchmarks/engine_batching.py --requests 40 --rounds 1 --out /tmp/eb   # a quick check

`benchmarks/serve.py` measures continuous against static batching through the server, with the
load generator on the same cores. This measures the same workload on the engine alone, so the
server's share can be told apart from the batching's, and it splits the engine's time by graph:
the part static batching wastes is backbone calls on the ended rows it keeps (they are never
sampled), so the gain continuous batching can reach is bounded by the backbone's share of a step.

Workload (the serve benchmark's): C = 16 virtual clients in a closed loop over one `Engine`
(--max-batch 16, --threads 2), each sending its next request when the previous one ended;
prompts are ~64-token WikiText-103 paragraphs, max_tokens uniform over {16, 32, 64, 128, 256}
from a seeded generator, T = 1, eos ignored. The two batchings take turns round by round, on
the very same requests; the ratio is the median over rounds of each round's ratio.

Figures per run: output tokens/s (all tokens / wall time), steps and the admission steps among
them (continuous: a step that prefilled newcomers), the seconds each graph ran (the engine's
own `timings`) and the rest (Python between the calls).
"""
import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO / "benchmarks"))
import serve  # noqa: E402  (the very same prompts and requests as the serving benchmark)

from calm_edge.fileio import write_json_atomic  # noqa: E402
from calm_edge.runtime.engine import BATCHING, Engine  # noqa: E402
from calm_edge.runtime.generator import GeneratorParams  # noqa: E402
from calm_edge.runtime.model import Model  # noqa: E402
from calm_edge.tokenizer import load_tokenizer  # noqa: E402


def closed_loop(model, tokenizer, specs, batching, concurrency, max_batch):
    """Run `specs` through one Engine with `concurrency` clients; returns the run's figures."""
    engine = Engine(model, max_batch=max_batch, batching=batching)
    pending = iter(specs)

    def send():
        spec = next(pending, None)
        if spec is not None:
            params = GeneratorParams(max_new_tokens=spec["max_tokens"], seed=spec["seed"], stop_at_eos=False)
            engine.add_request(tokenizer.encode(spec["prompt"]), params, request_id=spec["id"])

    for _ in range(concurrency):
        send()
    steps = admissions = tokens = 0
    began = time.perf_counter()
    while engine.has_work:
        # A step admits when requests wait and it may take them (static: only into an empty batch).
        admits = engine.waiting and (batching == "continuous" or not engine.running)
        outputs = engine.step()
        steps, admissions = steps + 1, admissions + bool(admits)
        for output in outputs:
            tokens += len(output.new_ids)
            if output.finished:
                send()
    wall = time.perf_counter() - began
    graphs = {name: round(seconds, 3) for name, seconds in engine.timings.items()}
    return {"batching": batching, "output_tokens": tokens, "wall_s": round(wall, 3),
            "output_tokens_per_s": round(tokens / wall, 1), "steps": steps, "admission_steps": admissions,
            "graph_s": graphs, "other_s": round(wall - sum(engine.timings.values()), 3)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--package", default=str(serve.SMALL["calm"]),
                        help="Package (default the committed small CALM).")
    parser.add_argument("--name", default="small", help="Names the results file: engine_batching_<name>.json.")
    parser.add_argument("--requests", type=int, default=200, help="Requests per run (default 200).")
    parser.add_argument("--rounds", type=int, default=3, help="Times the two batchings take turns (default 3).")
    parser.add_argument("--concurrency", type=int, default=16, help="Closed-loop clients (default 16).")
    parser.add_argument("--max-batch", type=int, default=16, help="The engine's max_batch (default 16).")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads (default 2).")
    parser.add_argument("--text", default=str(serve.TEXT), help="JSONL whose paragraphs give the prompts.")
    parser.add_argument("--out", default=str(RESULTS), help="Results folder (default benchmarks/results).")
    args = parser.parse_args(argv)

    model = Model(args.package, threads=args.threads)
    tokenizer = load_tokenizer(Path(args.package) / "tokenizer.model")
    prompts = serve.make_prompts(tokenizer, args.text)
    warm = serve.make_requests(args.max_batch, 999, prompts, (8,), tag="warmup")
    for batching in BATCHING:  # the first calls of each shape are slow
        closed_loop(model, tokenizer, warm, batching, args.max_batch, args.max_batch)
    runs = []
    for rnd in range(args.rounds):
        specs = serve.make_requests(args.requests, 1000 + rnd, prompts)
        for batching in (BATCHING if rnd % 2 == 0 else BATCHING[::-1]):
            run = {"round": rnd, **closed_loop(model, tokenizer, specs, batching, args.concurrency, args.max_batch)}
            runs.append(run)
            print(f"  round {rnd} {batching}: {run['output_tokens_per_s']} tokens/s, {run['steps']} steps "
                  f"({run['admission_steps']} admitting), graphs {run['graph_s']}, other {run['other_s']} s",
                  flush=True)
    by_round = []
    for rnd in range(args.rounds):
        rate = {r["batching"]: r["output_tokens_per_s"] for r in runs if r["round"] == rnd}
        by_round.append(round(rate["continuous"] / rate["static"], 3))
    command = " ".join(["python benchmarks/engine_batching.py", *(argv if argv is not None else sys.argv[1:])])
    report = {"benchmark": "engine_batching", "command": command,
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": serve.machine(), "versions": serve.versions(),
              "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "continuous_over_static": {"ratio": statistics.median(by_round), "by_round": by_round},
              "runs": runs}
    out = Path(args.out) / f"engine_batching_{args.name}.json"
    write_json_atomic(out, report)
    print(f"continuous / static output tokens/s: {report['continuous_over_static']['ratio']} (by round {by_round})")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
