"""One runner over the benchmark matrix, in a process of its own.

    python -m calm_edge.bench.worker SPEC.json

SPEC holds the runner's spec (see `runners.make_runner`), the cells, the prompt ids, repeats,
warm-up runs and the seed. Results go to SPEC's "results" file as JSON lines, one per cell,
plus a first line describing the runner (or saying why it is unavailable). After each cell the
worker prints "@@cell KEY" so the parent can advance its progress bar; anything else a library
prints is left to the parent's log.

A process of its own per runner keeps the peak-RSS figures of one runner free of another's
allocations, and a peer that fails to import, convert or run (or crashes) cannot take the
other runners' results down with it.
"""
import json
import sys
import traceback

import numpy as np

from calm_edge.bench import stats
from calm_edge.bench.matrix import Cell
from calm_edge.bench.runners import PeerUnavailable, make_runner
from calm_edge.runtime import timing

# Per-step samples are kept for the latency-distribution plot at batch 1 only, to keep the JSON small.
SAMPLE_BATCH = 1


def summarize_cell(cell, traces):
    """The figures of one cell from its timed repeats (definitions: calm_edge.runtime.timing)."""
    K = traces[0].tokens_per_step
    steps = [s for t in traces for s in t.step_s]
    decode_rates = [timing.decode_tokens_per_second(t, cell.batch) for t in traces]
    total_rates = [timing.end_to_end_tokens_per_second(t, cell.batch) for t in traces]
    # The per-graph split: mean ms per decode step over all repeats, so the parts add up to the
    # mean step (step_ms.mean); what the graphs do not account for is the loop's own overhead.
    split = {name: round(ms, 4) for name, ms in timing.step_split_ms(traces).items()}
    result = {
        "new_tokens_per_sequence": traces[0].new_tokens,
        "tokens_per_step": K,
        "steps": len(traces[0].step_s) + 1,
        "prefill_ms": stats.summarize([t.prefill_s for t in traces], 1e3),
        "ttft_ms": stats.summarize([t.ttft_s for t in traces], 1e3),
        "step_ms": stats.summarize(steps, 1e3),
        "token_ms": stats.summarize(steps, 1e3 / K),  # per generated token of one sequence
        "decode_tokens_per_s": stats.summarize(decode_rates, 1.0, 2),
        "decode_tokens_per_s_runs": [round(r, 3) for r in decode_rates],  # pooled over rounds by the harness
        "end_to_end_tokens_per_s": stats.summarize(total_rates, 1.0, 2),
        "total_s": stats.summarize([t.total_s for t in traces], 1.0, 4),
        "per_step_split_ms": split,
    }
    if cell.batch == SAMPLE_BATCH:
        result["step_ms_samples"] = [round(1e3 * s, 4) for s in steps]
    return result


def run(spec):
    results = open(spec["results"], "w", encoding="utf-8")

    def emit(record):
        results.write(json.dumps(record) + "\n")
        results.flush()

    runner = make_runner(spec["runner"])
    try:
        if hasattr(runner, "prepare"):
            runner.prepare()
    except PeerUnavailable as e:
        emit({"runner": runner.describe(), "unavailable": str(e)})
        return
    emit({"runner": runner.describe()})
    prompts = {int(k): v for k, v in spec["prompts"].items()}
    loaded_threads = None
    for raw in spec["cells"]:
        cell = Cell(**raw)
        record = {"cell": cell.to_dict(), "key": cell.key}
        if not runner.fits(cell):
            record["skipped"] = (f"{cell.prompt_tokens} prompt + {cell.new_tokens} new tokens do not fit this "
                                 f"runner's context of {runner.describe()['max_context_tokens']} tokens")
        else:
            try:
                if loaded_threads != cell.threads:
                    runner.model = None  # free the previous sessions before the next load
                    runner.load(cell.threads, spec.get("spinning"))
                    loaded_threads = cell.threads
                batch = prompts[cell.prompt_tokens][:cell.batch]
                stats.reset_peak_rss()
                for _ in range(spec["warmup"]):
                    runner.generate(batch, cell.new_tokens, cell.temperature, spec["seed"])
                traces = [runner.generate(batch, cell.new_tokens, cell.temperature, spec["seed"])
                          for _ in range(spec["repeats"])]
                record.update(summarize_cell(cell, traces))
                record["peak_rss_mb"] = round(stats.peak_rss_mb(), 1)
            except Exception as e:  # one failing cell is reported, the rest still run
                record["error"] = f"{type(e).__name__}: {e}"
                record["traceback"] = traceback.format_exc(limit=4)
        emit(record)
        print(f"@@cell {cell.key}", flush=True)
    results.close()


def main():
    with open(sys.argv[1], encoding="utf-8") as f:
        spec = json.load(f)
    np.seterr(all="ignore")
    run(spec)


if __name__ == "__main__":
    main()
