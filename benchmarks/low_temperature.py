"""What a T = 1/n step costs at batch 1, how often the model repeats a chunk, and what stopping early would cost in bias.

    python benchmarks/low_temperature.py --package PKG [--new-tokens 64] [--repeats 3]

Measures, on one CALM package at batch 1, the decode step at T = 1 and at T = 1/2 with
  - the batch approximation at N = 16, 8 and 4 candidates (one energy-head and one decoder call
    over N samples per step: the cost grows with N, the decoder's vocabulary projection most);
  - the exact rejection sampler with 1, 2 and 4 (the runtime's default) rounds per call of the
    energy head and decoder; the tokens must be the same for every choice (the script checks it
    over --seeds seeds), only the number of calls changes.

It also simulates, on the toy distributions of tests/test_sampling.py, a batch approximation that
draws in rounds of r and stops as soon as a chunk is confirmed (seen n times), capped at N: how
far its output is from p^n (total variation; the frequency test allows 0.05) and how many draws
it needs, beside one round of N (today's sampler).

It also counts, on real prompts (`--text`, WikiText-103 test by default), how often any chunk
repeats among the N = 16 candidates of a step, and how often one is already confirmed (seen n
times) among the first r: that is what any sampler that stops early, in rounds, can save.
"""
import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from calm_edge.runtime.generator import Generator, GeneratorParams
from calm_edge.runtime.model import Model
from calm_edge.runtime.sampling import TemperatureSampler, batch_choice


class CountingModel:
    """A runtime Model whose generations' states count their energy-head calls and samples."""

    def __init__(self, model):
        self.model, self.state = model, None

    def __getattr__(self, name):
        return getattr(self.model, name)

    def new_state(self, batch, capacity):
        self.state = CountingState(self.model.new_state(batch, capacity))
        return self.state


class CountingState:
    """Wraps a generation's StepState to count energy-head calls and samples (draw calls of the sampler)."""

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
    for _ in Generator(model, prompts[:documents], params, sampler=counter):
        pass
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
    counting = CountingModel(model)
    generator = Generator(counting, [prompt], params, sampler=sampler)
    tokens, marks = [], []
    for new_ids in generator:
        marks.append(time.perf_counter())
        tokens.extend(new_ids[0])
    steps = len(marks)
    step_s = [b - a for a, b in zip(marks, marks[1:])]
    return tokens, statistics.median(step_s), counting.state.calls / steps, counting.state.samples / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", required=True)
    parser.add_argument("--prompt", default="The history of the city begins")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=5,
                        help="Seeds over which the exact sampler must give the same tokens for 1, 2 and 4 rounds per call.")
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
    for t in (1, 2, 4):
        variants[f"T=1/2 exact ({t} trials per call)"] = (GeneratorParams(temperature=0.5, method="exact"),
                                                          TemperatureSampler(0.5, method="exact", trials_per_call=t))
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

    # Rounds per call change the calls, never the tokens: seed for seed against one round per call.
    same = []
    for seed in range(args.seeds):
        params = GeneratorParams(temperature=0.5, method="exact", max_new_tokens=args.new_tokens, seed=seed,
                                 stop_at_eos=False)
        one = generate(model, prompt, params, TemperatureSampler(0.5, method="exact", trials_per_call=1))[0]
        same.append(all(generate(model, prompt, params, TemperatureSampler(0.5, method="exact", trials_per_call=t))[0]
                        == one for t in (2, 4)))
    print(f"exact sampler: tokens identical for 1, 2 and 4 rounds per call for {sum(same)}/{len(same)} seeds")
    repeats = chunk_repeats(model, args.text)
    print(f"chunk repeats among {repeats['candidates']} candidates over {repeats['steps']} steps: largest count "
          f"{repeats['largest_count_share']}; confirmed within the first r: {repeats['confirmed_within_first_r_share']}")
    bias = rounds_bias()
    for row in bias:
        print(f"stop when confirmed, {row['distribution']}, T={row['temperature']}, rounds of {row['round_size']} "
              f"up to {row['cap']}: total variation {row['total_variation']}, {row['mean_draws']} draws")
    report = {"benchmark": "low_temperature", "command": "python benchmarks/low_temperature.py " + " ".join(sys.argv[1:]),
              "package": args.package, "new_tokens": args.new_tokens, "threads": args.threads, "results": results,
              "exact_rounds_per_call_identical_seeds": f"{sum(same)}/{len(same)}", "chunk_repeats": repeats,
              "stop_when_confirmed": bias}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"-> {args.out}")


if __name__ == "__main__":
    main()
