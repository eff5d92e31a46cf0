"""What a T = 1/n step costs, and a prototype that makes the exact sampler cheap without changing its tokens.

    python benchmarks/low_temperature.py --package PKG [--new-tokens 64] [--repeats 3]

Measures, on one CALM package at batch 1, the decode step at T = 1 and at T = 1/2 with
  - the batch approximation at N = 16, 8 and 4 candidates (one energy-head and one decoder call
    over N samples per step: the cost grows with N, the decoder's vocabulary projection most);
  - the exact rejection sampler as the runtime has it (one call of n samples per trial);
  - `BatchedExactSampler` below: the same rejection trials, `trials` of them per call.

It also simulates, on the toy distributions of tests/test_sampling.py, a batch approximation that
draws in rounds of r and stops as soon as a chunk is confirmed (seen n times), capped at N: how
far its output is from p^n (total variation; the frequency test allows 0.05) and how many draws
it needs, beside one round of N (today's sampler).

It also counts, on real prompts (`--text`, WikiText-103 test by default), how often any chunk
repeats among the N = 16 candidates of a step, and how often one is already confirmed (seen n
times) among the first r: that is what any sampler that stops early, in rounds, can save.

The prototype draws t trials in one call and keeps the first whose n chunks agree, which is the
rejection sampler's choice; it then rewinds the sequence's counter to the end of that trial, so
it consumes exactly the random values the one-trial-per-call sampler consumes and returns the
very same tokens for the same seed (the script checks it), with fewer graph calls. It lives here,
not in runtime/sampling.py, because the owners of the sampler and of the C++ runtime decide on
the change; the report's numbers are the case for it.
"""
import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from calm_edge.runtime.generator import GeneratorParams, iterate_steps
from calm_edge.runtime.model import Model
from calm_edge.runtime.sampling import TemperatureSampler, batch_choice


class BatchedExactSampler(TemperatureSampler):
    """The exact sampler, `trials` rejection trials per draw call; same tokens as method="exact"."""

    def __init__(self, temperature, trials=2, max_rounds=100):
        super().__init__(temperature, method="exact", max_rounds=max_rounds)
        self.trials = trials

    def sample(self, draw_chunks, rng):
        if self.n == 1:
            return super().sample(draw_chunks, rng)
        drawn, done = [], 0
        while done < self.max_rounds:
            trials = min(self.trials, self.max_rounds - done)
            start = rng.counter
            chunks = draw_chunks(self.n * trials)
            per_trial = (rng.counter - start) // trials  # random values one trial of n chunks consumes
            for j in range(trials):
                trial = chunks[j * self.n:(j + 1) * self.n]
                if all(chunk == trial[0] for chunk in trial):
                    rng.counter = start + (j + 1) * per_trial  # as if the later trials were never drawn
                    return trial[0]
                drawn.extend(trial)
            done += trials
        return drawn[batch_choice(drawn, self.n, rng.draw_one())]


class CountingState:
    """Wraps a ModelState to count energy-head calls and samples (draw calls of the sampler)."""

    def __init__(self, state):
        self.state, self.calls, self.samples = state, 0, 0

    def __getattr__(self, name):
        return getattr(self.state, name)

    def sample_latents(self, hidden, noise):
        self.calls += 1
        self.samples += noise.shape[0] * noise.shape[1]
        return self.state.sample_latents(hidden, noise)


class RepeatCounter(TemperatureSampler):
    """The batch approximation, recording per step the largest count of one chunk among the candidates."""

    def __init__(self, temperature, candidates):
        super().__init__(temperature, method="batch", candidates=candidates)
        self.largest, self.confirmed_within = Counter(), Counter()

    def choose(self, chunks, rng):
        self.largest[max(Counter(chunks).values())] += 1
        for r in (2, 4, 8, 16):
            if r <= len(chunks) and max(Counter(chunks[:r]).values()) >= self.n:
                self.confirmed_within[r] += 1
        return super().choose(chunks, rng)


def chunk_repeats(model, text, documents=8, prompt_tokens=64, new_tokens=128, candidates=16):
    """How often a chunk repeats among a step's candidates at T = 1/2, over real prompts."""
    lines = [json.loads(line)["text"] for line in Path(text).read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts = [ids[:prompt_tokens] for ids in (model.tokenizer.encode(t) for t in lines) if len(ids) >= prompt_tokens]
    counter = RepeatCounter(0.5, candidates)
    params = GeneratorParams(temperature=0.5, candidates=candidates, max_new_tokens=new_tokens, stop_at_eos=False)
    original = GeneratorParams.check
    GeneratorParams.check = lambda self: counter
    try:
        for _ in iterate_steps(model.new_state(), prompts[:documents], params):
            pass
    finally:
        GeneratorParams.check = original
    steps = sum(counter.largest.values())
    return {"steps": steps, "candidates": candidates, "documents": min(documents, len(prompts)),
            "largest_count_share": {str(k): round(v / steps, 4) for k, v in sorted(counter.largest.items())},
            "confirmed_within_first_r_share": {str(r): round(counter.confirmed_within[r] / steps, 4)
                                               for r in (2, 4, 8, 16)}}


def stop_when_confirmed(p, n, round_size, cap, draws=20000, seed=0):
    """(total variation from p^n, mean draws) of a batch approximation that stops once a chunk is confirmed."""
    rng = np.random.default_rng(seed)
    counts, used = np.zeros(len(p)), 0
    for _ in range(draws):
        drawn = []
        while len(drawn) < cap:
            drawn += rng.choice(len(p), size=min(round_size, cap - len(drawn)), p=p).tolist()
            if max(Counter(drawn).values()) >= n:
                break
        counts[drawn[batch_choice(drawn, n, rng.random())]] += 1
        used += len(drawn)
    target = p ** n / (p ** n).sum()
    return round(0.5 * float(np.abs(counts / draws - target).sum()), 4), round(used / draws, 2)


def rounds_bias():
    """Stopping early against one round, on the test's toy distributions (T = 1/2 with N = 32, T = 1/3 with N = 48)."""
    toys = {"six chunks (tests/test_sampling.py)": np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]),
            "three chunks": np.array([0.5, 0.3, 0.2])}
    rows = []
    for name, p in toys.items():
        for n, cap in ((2, 32), (3, 48)):
            for round_size in (n, 2 * n, cap):
                tv, mean_draws = stop_when_confirmed(p, n, round_size, cap)
                rows.append({"distribution": name, "temperature": f"1/{n}", "round_size": round_size, "cap": cap,
                             "total_variation": tv, "mean_draws": mean_draws})
    return rows


def generate(model, prompt, params, sampler=None):
    """(token ids, seconds per step, head calls per step, samples per step) of one generation."""
    original = GeneratorParams.check
    if sampler is not None:  # hand iterate_steps the prototype in place of the runtime's sampler
        GeneratorParams.check = lambda self: sampler
    try:
        state = CountingState(model.new_state())
        tokens, marks = [], []
        for new_ids in iterate_steps(state, [prompt], params):
            marks.append(time.perf_counter())
            tokens.extend(new_ids[0])
    finally:
        GeneratorParams.check = original
    steps = len(marks)
    step_s = [b - a for a, b in zip(marks, marks[1:])]
    return tokens, statistics.median(step_s), state.calls / steps, state.samples / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", required=True)
    parser.add_argument("--prompt", default="The history of the city begins")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=5, help="Seeds whose tokens the prototype must reproduce.")
    parser.add_argument("--text", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" /
                                              "wikitext103-test-doc.jsonl"),
                        help="JSONL documents whose openings are the prompts of the chunk-repeat count.")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    model = Model(args.package, threads=args.threads)
    prompt = model.tokenizer.encode(args.prompt)
    variants = {"T=1": (GeneratorParams(temperature=1.0), None)}
    for n in (16, 8, 4):
        variants[f"T=1/2 batch N={n}"] = (GeneratorParams(temperature=0.5, candidates=n), None)
    variants["T=1/2 exact (1 trial per call)"] = (GeneratorParams(temperature=0.5, method="exact"), None)
    for t in (2, 4):
        variants[f"T=1/2 exact ({t} trials per call)"] = (GeneratorParams(temperature=0.5, method="exact"),
                                                          BatchedExactSampler(0.5, trials=t))
    results = {}
    for label, (params, sampler) in variants.items():
        params.max_new_tokens, params.stop_at_eos = args.new_tokens, False
        generate(model, prompt, params, sampler)  # warm-up
        runs = [generate(model, prompt, params, sampler) for _ in range(args.repeats)]
        step = statistics.median(r[1] for r in runs)
        results[label] = {"step_ms": round(1e3 * step, 4), "head_calls_per_step": round(runs[0][2], 3),
                          "samples_per_step": round(runs[0][3], 3)}
    reference = results["T=1"]["step_ms"]
    for label, r in results.items():
        r["cost_vs_t1"] = round(r["step_ms"] / reference, 3)
        print(f"{label:34s} step {r['step_ms']:8.3f} ms  {r['cost_vs_t1']:5.2f}x T=1  "
              f"calls/step {r['head_calls_per_step']:6.2f}  samples/step {r['samples_per_step']:6.2f}")

    # The prototype must return the runtime's exact-sampler tokens, seed for seed.
    same = []
    for seed in range(args.seeds):
        params = GeneratorParams(temperature=0.5, method="exact", max_new_tokens=args.new_tokens, seed=seed,
                                 stop_at_eos=False)
        exact = generate(model, prompt, params)[0]
        same.append(all(generate(model, prompt, params, BatchedExactSampler(0.5, trials=t))[0] == exact for t in (2, 4)))
    print(f"prototype tokens identical to method=exact for {sum(same)}/{len(same)} seeds")
    repeats = chunk_repeats(model, args.text)
    print(f"chunk repeats among {repeats['candidates']} candidates over {repeats['steps']} steps: largest count "
          f"{repeats['largest_count_share']}; confirmed within the first r: {repeats['confirmed_within_first_r_share']}")
    bias = rounds_bias()
    for row in bias:
        print(f"stop when confirmed, {row['distribution']}, T={row['temperature']}, rounds of {row['round_size']} "
              f"up to {row['cap']}: total variation {row['total_variation']}, {row['mean_draws']} draws")
    report = {"benchmark": "low_temperature", "command": "python benchmarks/low_temperature.py " + " ".join(sys.argv[1:]),
              "package": args.package, "new_tokens": args.new_tokens, "threads": args.threads, "results": results,
              "prototype_identical_seeds": f"{sum(same)}/{len(same)}", "chunk_repeats": repeats,
              "stop_when_confirmed": bias}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"-> {args.out}")


if __name__ == "__main__":
    main()
