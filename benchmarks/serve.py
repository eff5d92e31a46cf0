"""Benchmark: `calm-edge serve` under load on loopback, CALM against AR, continuous against static batching.

    python benchmarks/serve.py --suites small,paper-dims --rounds 2   # results/serve_{small,paper_dims}.json
    python benchmarks/serve.py --soak 10                              # results/serve_soak.json
    python benchmarks/serve.py --quick --out /tmp/serve-quick         # a check that everything runs (< 1 min)

Files (in benchmarks/results/ or --out): serve_<suite>.json (settings, machine, every cell, the
pooled figures, the ratios and goals), serve_<suite>.png (the plots), serve_<suite>_requests.jsonl
(one line per measured request); serve_soak.json and serve_soak.png (resident memory over time).
Server logs go to --work/logs/<time>/.

Suites (each a CALM package and an AR package that share one tokenizer):
  - small: the committed models/calm-small-int4 and models/ar-small-int4 (trained, int4);
  - paper-dims: random weights at the paper's dimensions, CALM-M against Transformer-S with a
    128,256-token vocabulary, exported with fused attention exactly as `bench.py paper-dims`
    does (its `random_run` and `export_random`; the committed small tokenizer padded to 128,256
    pieces). They are made under --work (bench-work/serve/packages/) unless they exist.

Per suite, every server is `calm-edge serve` in its own process on a free loopback port
(--threads 2, --max-batch 16), polled on /health, loaded, then stopped with SIGTERM:
  1. the CALM and the AR server (continuous batching) run side by side; for each round and each
     concurrency C (1, 4, 16) the two take turns (the order alternates from cell to cell), each
     cell a closed loop of C clients that send their next request when the previous one ended,
     `--requests` requests (default 4*C + 8) or `--max-seconds`, whichever comes first. The idle
     server's CPU time during the other's cell is recorded, to show that it did not compete.
     Then Poisson arrivals: at `--poisson-load` (0.7) of the saturation rate (steady requests/s
     at C = 16 measured just before, see below), `--poisson-requests` (64) requests
     with seeded exponential inter-arrival times, at most 16 outstanding (an arrival that finds 16
     waits in the client, and that wait counts in its time to first token).
  2. per package, a continuous and a static server side by side, taking turns at C = 16:
     the throughput ratio continuous / static.

Every request streams (server-sent events) and carries a seed; prompts are ~64-token paragraphs
of the WikiText-103 test set (detokenized), max_tokens uniform over {16, 32, 64, 128, 256} from a
seeded generator, T = 1; CALM and AR get the very same requests in a cell, with `extra.ignore_eos`
so that every response runs to its max_tokens. Completion
tokens are taken from each response's `usage`.

Figures per cell (definitions, also in the JSON's "definitions"):
  - output_tokens_per_s: completion tokens of all requests / wall time from the first send to the
    last response; requests_per_s likewise.
  - steady_*: the same within the steady window, from the start until the first client ran out of
    requests (all C clients busy until then; the tail where fewer are busy is left out). Tokens in
    the window are counted per text chunk, each chunk of a response carrying an equal share of its
    completion tokens (exact when every chunk holds the same number of tokens); steady requests/s
    is that token rate over the mean completion tokens of a request (the saturation rate).
  - ttft_ms: time to first token, from sending the request (Poisson: from its scheduled arrival)
    to the first chunk with non-empty text.
  - tpot_ms: per-token latency of a request, (last text chunk - first text chunk) / (completion
    tokens - 1), the usual "time per output token"; inter_chunk_ms: the gaps between text chunks
    (a CALM chunk holds up to K = 4 tokens).
Ratios across runners (CALM / AR, continuous / static) are the median over rounds of each
round's ratio of two cells measured one right after the other, as `calm-edge bench --rounds`
does, because this machine's speed drifts; the Poisson goal compares p99 TTFT of the Poisson run
with p99 TTFT at C = 1 (all rounds pooled), goal < 3.

The soak (`--soak MINUTES`, default 10): the small CALM package, continuous batching, a steady
mixed load from `--soak-concurrency` clients: streaming and non-streaming requests at T = 1 and
T = 1/2 (batch approximation, 16 candidates), max_tokens from 1 to 128 (stopping at eos), clients that close the
stream after a few chunks, and malformed requests that must get a 4xx with a JSON body
{"error": {"message", "type", "param", "code"}}. It checks that every request sent got exactly
one outcome, that no response id appears twice and that the server's /metrics counted every
request once and holds no running or queued row at the end; it samples the server's resident
memory (VmRSS of its process tree) every `--rss-interval` seconds and compares the end with the
end of the first minute (goal: within 10 %), and finally checks that the server still answers.

Options after `--` go to every `calm-edge serve` unchanged (e.g. `-- --request-timeout 120`).
`--serve-command` replaces `python -m calm_edge.cli serve` (to check this harness against
another server build).
"""
import argparse
import asyncio
import datetime
import gc
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from calm_edge import __version__
from calm_edge.bench.prompts import read_text
from calm_edge.bench.stats import summarize
from calm_edge.errors import CalmEdgeError
from calm_edge.fileio import write_json_atomic
from calm_edge.tokenizer import load_tokenizer
from calm_edge.wikitext import detokenize_wikitext

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import CONTEXT, export_random, random_run  # noqa: E402  (paper-dims: the very same packages)

RESULTS = REPO / "benchmarks" / "results"
TEXT = REPO.parent / "shared" / "data" / "wikitext103-test-doc.jsonl"
SMALL = {"calm": REPO / "models" / "calm-small-int4", "ar": REPO / "models" / "ar-small-int4"}
SMALL_TOKENIZER = SMALL["calm"] / "tokenizer.model"
SUITES = ("small", "paper-dims")
KINDS = ("calm", "ar")

MAX_TOKENS = (16, 32, 64, 128, 256)
PROMPT_TOKENS = 64
PROMPT_POOL = 64
COMPLETIONS = "/v1/completions"
EXTRA_BATCH = {"method": "batch", "candidates": 16}  # T = 1/2: the batch approximation over 16 candidates
QUICK = {"concurrency": "1,4,16", "requests_formula": (1, 2), "max_tokens": (8, 16, 32), "poisson_requests": 12,
         "rounds": 1}

DEFINITIONS = {
    "output_tokens_per_s": "completion tokens (each response's usage) / wall time from the first send to the last response",
    "requests_per_s": "requests completed / the same wall time",
    "steady_output_tokens_per_s": "completion tokens of the text chunks received before the first client ran out of "
                                  "requests (each chunk an equal share of its response's tokens) / that time",
    "steady_requests_per_s": "steady_output_tokens_per_s / the cell's mean completion tokens per request (the request "
                             "rate that throughput sustains for this mix of lengths; the Poisson runs' saturation rate)",
    "ttft_ms": "send (Poisson: scheduled arrival) to the first chunk with non-empty text",
    "tpot_ms": "per request, (last text chunk - first text chunk) / (completion tokens - 1)",
    "inter_chunk_ms": "gaps between consecutive text chunks of a response, pooled over the cell's requests",
    "e2e_ms": "send to the end of the response",
}


# ---------------------------------------------------------------------------------------------
# Packages

def paper_dims_packages(work, tokenizer):
    """CALM-M and Transformer-S with 128,256 tokens, random weights, fused attention (as bench.py paper-dims)."""
    packages = {}
    for kind in KINDS:
        name = f"{kind}-128k"
        package = Path(work) / "packages" / f"{name}-fused"
        if not package.exists():  # the checkpoint is only needed to export (runs/ may be deleted after)
            random_run(Path(work) / "runs" / name, kind, CONTEXT, tokenizer)
            export_random(Path(work) / "runs" / name, kind, package, None, fused=True)
        packages[kind] = package
    return packages


def suite_packages(suite, args):
    if suite == "small":
        return dict(SMALL)
    return paper_dims_packages(args.work, args.tokenizer)


# ---------------------------------------------------------------------------------------------
# Workload: prompts, requests, arrivals

def make_prompts(tokenizer, text_file, count=PROMPT_POOL, length=PROMPT_TOKENS):
    """`count` prompts of about `length` tokens: the starts of the text's paragraphs (headings left out)."""
    text = read_text(text_file if text_file and Path(text_file).is_file() else None, count * length * 20)
    prompts = []
    for line in text.split("\n"):
        line = line.strip()
        if not line or line.startswith("="):
            continue
        ids = tokenizer.encode(detokenize_wikitext(line))
        if len(ids) >= length:
            prompts.append(tokenizer.decode(ids[:length]))
            if len(prompts) == count:
                return prompts
    ids = tokenizer.encode(detokenize_wikitext(" ".join(text.split())))  # short paragraphs: windows of the whole
    while len(prompts) < count:
        start = (len(prompts) * length) % max(len(ids) - length, 1)
        prompts.append(tokenizer.decode(ids[start:start + length]))
    return prompts


def make_requests(count, seed, prompts, max_tokens=MAX_TOKENS, tag="r"):
    """`count` request specs from a seeded generator: a prompt, max_tokens, a seed and an id each."""
    rng = np.random.default_rng(seed)
    return [{"id": f"{tag}-{i:05d}", "prompt": prompts[int(rng.integers(len(prompts)))],
             "max_tokens": int(rng.choice(max_tokens)), "seed": int(seed * 100_003 + i) % 2**31}
            for i in range(count)]


def poisson_arrivals(count, rate, seed):
    """Arrival times (s, the first at 0) with exponential gaps of mean 1 / rate, from a seeded generator."""
    if count <= 0:
        return []
    if rate <= 0:
        raise CalmEdgeError(f"Poisson arrivals need a positive rate, not {rate}")
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, count - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


def request_body(spec, stream, temperature=1.0, ignore_eos=True):
    """A request; `ignore_eos` (the default) makes every response as long as its max_tokens, so
    CALM and AR produce the same tokens for the same requests whatever each model says."""
    body = {"model": "calm-edge", "prompt": spec["prompt"], "max_tokens": spec["max_tokens"],
            "temperature": temperature, "seed": spec["seed"], "stream": stream, "extra": {"ignore_eos": ignore_eos}}
    if temperature != 1.0:
        body["extra"].update(EXTRA_BATCH)
    return body


# ---------------------------------------------------------------------------------------------
# One request

def _error_body_problem(raw):
    """None if `raw` is a JSON error body {"error": {"message", "type", "param", "code"}}, else what is wrong."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return f"not JSON: {raw[:120]!r}"
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return f"no \"error\" object: {str(data)[:120]}"
    missing = [k for k in ("message", "type", "param", "code") if k not in error]
    if missing:
        return f"error object lacks {', '.join(missing)}: {str(error)[:120]}"
    if not isinstance(error["message"], str) or not isinstance(error["type"], str):
        return f"error message and type must be strings: {str(error)[:120]}"
    return None


def _check_usage(record, usage, max_tokens):
    if not isinstance(usage, dict) or not isinstance(usage.get("completion_tokens"), int):
        record["problems"].append(f"no usage with completion_tokens: {usage!r}"[:200])
        return
    record["completion_tokens"] = usage["completion_tokens"]
    record["prompt_tokens"] = usage.get("prompt_tokens")
    if max_tokens is not None and not 0 <= usage["completion_tokens"] <= max_tokens:
        record["problems"].append(f"completion_tokens {usage['completion_tokens']} outside 0..max_tokens {max_tokens}")
    if usage.get("total_tokens") != (usage.get("prompt_tokens") or 0) + usage["completion_tokens"]:
        record["problems"].append(f"usage total_tokens is not prompt + completion: {usage}")


def _new_record(spec, stream, t0):
    return {"id": spec["id"], "max_tokens": spec.get("max_tokens"), "stream": stream, "start": time.perf_counter() - t0,
            "status": None, "outcome": None, "completion_tokens": None, "prompt_tokens": None, "finish_reason": None,
            "chunk_times": [], "response_ids": [], "problems": [], "error": None}


async def _read_error(record, response):
    raw = await response.aread()
    record["outcome"] = "http_error"
    record["error_body"] = raw[:300].decode("utf-8", "replace")
    record["error_body_problem"] = _error_body_problem(raw)
    if response.status_code == 429:
        record["retry_after"] = response.headers.get("retry-after")


async def stream_request(client, spec, t0, temperature=1.0, disconnect_after=None, body=None):
    """POST one streaming completion and read it to the end (or close it after `disconnect_after` text chunks)."""
    import httpx

    record = _new_record(spec, True, t0)
    finish, usage, done, texts = None, None, False, []
    try:
        async with client.stream("POST", COMPLETIONS, json=body or request_body(spec, True, temperature)) as response:
            record["status"] = response.status_code
            if response.status_code != 200:
                await _read_error(record, response)
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    done = True
                    break
                chunk = json.loads(payload)
                if "error" in chunk:
                    record["outcome"], record["error"] = "stream_error", str(chunk["error"])[:300]
                    return record
                if chunk.get("id") not in record["response_ids"]:
                    record["response_ids"].append(chunk.get("id"))
                if chunk.get("usage"):
                    usage = chunk["usage"]
                text = ""
                for choice in chunk.get("choices") or []:
                    text += choice.get("text") or ""
                    finish = choice.get("finish_reason") or finish
                if text:
                    record["chunk_times"].append(time.perf_counter() - t0)
                    texts.append(text)
                    if disconnect_after is not None and len(record["chunk_times"]) >= disconnect_after:
                        record["outcome"] = "disconnected"  # leaving the block closes the connection
                        return record
    except httpx.TimeoutException as e:
        record["outcome"], record["error"] = "timeout", repr(e)[:300]
        return record
    except httpx.HTTPError as e:
        record["outcome"], record["error"] = "transport_error", repr(e)[:300]
        return record
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # a data line that is not a JSON chunk
        record["outcome"], record["error"] = "bad_response", repr(e)[:300]
        return record
    finally:
        record["end"] = time.perf_counter() - t0
    record["finish_reason"] = finish
    _check_usage(record, usage, spec.get("max_tokens"))
    if not done:
        record["problems"].append("the stream ended without data: [DONE]")
    if len(record["response_ids"]) > 1:
        record["problems"].append(f"chunks of one stream carry {len(record['response_ids'])} ids")
    if finish not in ("stop", "length"):
        record["problems"].append(f"finish_reason {finish!r}")
    if record["completion_tokens"] and not texts:
        record["problems"].append(f"{record['completion_tokens']} completion tokens but no text chunk")
    record["outcome"] = "ok" if done and usage else "incomplete"
    return record


async def plain_request(client, spec, t0, temperature=1.0, content=None, body=None):
    """POST one non-streaming completion (or the raw `content` of a malformed request)."""
    import httpx

    record = _new_record(spec, False, t0)
    try:
        if content is not None:
            response = await client.post(COMPLETIONS, content=content, headers={"content-type": "application/json"})
        else:
            response = await client.post(COMPLETIONS, json=body or request_body(spec, False, temperature))
    except httpx.TimeoutException as e:
        record.update(outcome="timeout", error=repr(e)[:300], end=time.perf_counter() - t0)
        return record
    except httpx.HTTPError as e:
        record.update(outcome="transport_error", error=repr(e)[:300], end=time.perf_counter() - t0)
        return record
    record["end"] = time.perf_counter() - t0
    record["status"] = response.status_code
    if response.status_code != 200:
        record["outcome"] = "http_error"
        record["error_body"] = response.content[:300].decode("utf-8", "replace")
        record["error_body_problem"] = _error_body_problem(response.content)
        if response.status_code == 429:
            record["retry_after"] = response.headers.get("retry-after")
        return record
    try:
        data = response.json()
        choice = data["choices"][0]
        if not isinstance(choice.get("text"), str):
            record["problems"].append("choices[0].text is not a string")
        record["finish_reason"] = choice.get("finish_reason")
        record["response_ids"] = [data.get("id")]
        if record["finish_reason"] not in ("stop", "length"):
            record["problems"].append(f"finish_reason {record['finish_reason']!r}")
        _check_usage(record, data.get("usage"), spec.get("max_tokens"))
        record["outcome"] = "ok"
    except (ValueError, KeyError, IndexError, TypeError) as e:
        record.update(outcome="bad_response", error=f"{e!r}: {response.text[:200]}")
    return record


def make_client(base_url, connections, timeout_s):
    import httpx

    return httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(timeout_s, connect=10.0),
                             limits=httpx.Limits(max_connections=connections + 4, max_keepalive_connections=connections + 4))


# ---------------------------------------------------------------------------------------------
# Load generators

def run_load(coroutine):
    """Run one cell's load with the client's garbage collector off (collected before and after), so that
    a collection pause in this process is not counted as the server's latency."""
    gc.collect()
    gc.disable()
    try:
        return asyncio.run(coroutine)
    finally:
        gc.enable()
        gc.collect()


async def closed_loop(base_url, specs, concurrency, max_seconds, timeout_s, temperature=1.0):
    """C clients, each sending its next request when the previous one ended; no new request after max_seconds."""
    pending = iter(specs)
    records, state = [], {"first_idle": None}
    t0 = time.perf_counter()

    async def client_loop(client):
        while time.perf_counter() - t0 < max_seconds:
            spec = next(pending, None)
            if spec is None:
                break
            records.append(await stream_request(client, spec, t0, temperature))
        if state["first_idle"] is None:
            state["first_idle"] = time.perf_counter() - t0

    async with make_client(base_url, concurrency, timeout_s) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return records, wall, state["first_idle"]


async def open_loop(base_url, specs, arrivals, cap, max_seconds, timeout_s, temperature=1.0):
    """Requests at the given arrival times (s), at most `cap` outstanding; none scheduled after max_seconds."""
    records, tasks = [], []
    semaphore = asyncio.Semaphore(cap)
    t0 = time.perf_counter()

    async def one(client, spec, scheduled):
        try:
            record = await stream_request(client, spec, t0, temperature)
            record["scheduled"] = scheduled
            record["cap_wait"] = record["start"] - scheduled
            records.append(record)
        finally:
            semaphore.release()

    async with make_client(base_url, cap, timeout_s) as client:
        for spec, at in zip(specs, arrivals):
            if at > max_seconds:
                break
            delay = at - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            await semaphore.acquire()  # in arrival order: a request that finds `cap` outstanding waits here
            tasks.append(asyncio.create_task(one(client, spec, at)))
        await asyncio.gather(*tasks)
    return records, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# Statistics

def _ms(values):
    return summarize(values, 1000.0, 2)


def request_row(r):
    """The compact per-request line of the requests file."""
    times = r["chunk_times"]
    return {"id": r["id"], "outcome": r["outcome"], "status": r["status"], "max_tokens": r["max_tokens"],
            "prompt_tokens": r["prompt_tokens"], "completion_tokens": r["completion_tokens"],
            "finish_reason": r["finish_reason"], "chunks": len(times),
            "start_s": round(r["start"], 4), "end_s": round(r.get("end", r["start"]), 4),
            "ttft_ms": round((times[0] - r.get("scheduled", r["start"])) * 1000, 2) if times else None,
            "problems": r["problems"] or None}


def cell_figures(records, wall, steady_end=None):
    """The figures of one cell (see DEFINITIONS) from its request records."""
    ok = [r for r in records if r["outcome"] == "ok"]
    tokens = sum(r["completion_tokens"] or 0 for r in ok)
    outcomes = {}
    for r in records:
        key = r["outcome"] if r["outcome"] != "http_error" else f"http_{r['status']}"
        outcomes[key] = outcomes.get(key, 0) + 1
    ttft, tpot, gaps, e2e, per_chunk = [], [], [], [], []
    for r in ok:
        times = r["chunk_times"]
        e2e.append(r["end"] - r["start"])
        if not times:
            continue
        ttft.append(times[0] - r.get("scheduled", r["start"]))
        if r["completion_tokens"] and r["completion_tokens"] > 1 and len(times) > 1:
            tpot.append((times[-1] - times[0]) / (r["completion_tokens"] - 1))
        gaps.extend(np.diff(times).tolist())
        per_chunk.append((r["completion_tokens"] or 0) / len(times))
    figures = {
        "requests": len(records), "completed": len(ok), "outcomes": outcomes,
        "wall_s": round(wall, 3), "output_tokens": tokens,
        "requests_per_s": round(len(ok) / wall, 4) if wall > 0 else None,
        "output_tokens_per_s": round(tokens / wall, 2) if wall > 0 else None,
        "ttft_ms": _ms(ttft), "tpot_ms": _ms(tpot), "inter_chunk_ms": _ms(gaps), "e2e_ms": _ms(e2e),
        "tokens_per_chunk": round(float(np.mean(per_chunk)), 3) if per_chunk else None,
        "completion_tokens": summarize([r["completion_tokens"] or 0 for r in ok], 1.0, 1),
        "prompt_tokens": summarize([r["prompt_tokens"] for r in ok if r["prompt_tokens"] is not None], 1.0, 1),
        "finish_reasons": {f: sum(1 for r in ok if r["finish_reason"] == f) for f in sorted({str(r["finish_reason"]) for r in ok})},
        "problems": sum(len(r["problems"]) for r in records),
        "problem_examples": [f"{r['id']}: {p}" for r in records for p in r["problems"]][:5],
        "error_examples": [f"{r['id']}: {r['outcome']} {r['status']} {r.get('error') or r.get('error_body')}"
                           for r in records if r["outcome"] != "ok"][:5],
    }
    if steady_end:
        steady_tokens = 0.0
        for r in ok:
            times = r["chunk_times"]
            if times and r["completion_tokens"]:
                steady_tokens += r["completion_tokens"] / len(times) * sum(1 for t in times if t <= steady_end)
        figures["steady_window_s"] = round(steady_end, 3)
        figures["steady_output_tokens_per_s"] = round(steady_tokens / steady_end, 2)
        mean_tokens = tokens / len(ok) if ok else 0
        figures["steady_requests_per_s"] = round(steady_tokens / steady_end / mean_tokens, 4) if mean_tokens else None
    return figures


def _median(values):
    values = [v for v in values if v is not None]
    return round(float(np.median(values)), 4) if values else None


def ratio_by_round(cells, key_a, key_b, metric="output_tokens_per_s"):
    """{ratio (median of the rounds'), by_round} of cells[key_a] over cells[key_b], matched by round."""
    by_round = []
    for a in (c for c in cells if c["key"] == key_a):
        b = next((c for c in cells if c["key"] == key_b and c["round"] == a["round"]), None)
        if b and a["figures"].get(metric) and b["figures"].get(metric):
            by_round.append(round(a["figures"][metric] / b["figures"][metric], 3))
    return {"ratio": _median(by_round), "by_round": by_round, "metric": metric}


def pooled(cells, key):
    """Figures of all rounds of one cell: throughputs as medians over rounds, latencies over all requests."""
    same = [c for c in cells if c["key"] == key]
    if not same:
        return None
    records = [r for c in same for r in c["records"]]
    out = {"rounds": len(same)}
    for metric in ("output_tokens_per_s", "requests_per_s", "steady_output_tokens_per_s", "steady_requests_per_s"):
        out[metric] = _median([c["figures"].get(metric) for c in same])
        out[f"{metric}_by_round"] = [c["figures"].get(metric) for c in same]
    whole = cell_figures(records, 1.0)
    for metric in ("ttft_ms", "tpot_ms", "inter_chunk_ms", "e2e_ms", "tokens_per_chunk", "outcomes"):
        out[metric] = whole[metric]
    out["requests"], out["completed"] = whole["requests"], whole["completed"]
    return out


# ---------------------------------------------------------------------------------------------
# The server process

def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process_tree(pid):
    """pid and all its descendants (from /proc)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def tree_rss_mb(pid):
    """VmRSS of the process and its descendants, MB (None once it has gone)."""
    total, seen = 0, False
    for p in _process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024  # the kernel's "kB" are KiB
                    seen = True
        except OSError:
            continue
    return round(total / 1e6, 1) if seen else None


def tree_cpu_s(pid):
    """User + system CPU seconds of the process and its descendants."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in _process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14 and 15)
        except (OSError, IndexError, ValueError):
            continue
    return total


class ServerDied(CalmEdgeError):
    pass


class Server:
    """One `calm-edge serve` process on a free loopback port; started, polled on /health, stopped with SIGTERM."""

    def __init__(self, label, package, batching, args, log_dir):
        self.label, self.package, self.batching = label, Path(package), batching
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        prefix = shlex.split(args.serve_command) if args.serve_command else [sys.executable, "-m", "calm_edge.cli", "serve"]
        self.command = [*prefix, "--package", str(self.package), "--host", "127.0.0.1", "--port", str(self.port),
                        "--max-batch", str(args.max_batch), "--threads", str(args.threads), "--batching", batching,
                        "--max-queue", str(args.max_queue), *args.serve_args]
        self.log_path = Path(log_dir) / f"{label}.log"
        self.startup_timeout = args.startup_timeout
        self.process = None
        self.info = {"label": label, "package": str(self.package), "batching": batching,
                     "command": " ".join(shlex.quote(c) for c in self.command), "log": str(self.log_path)}

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self, attempts=2):
        """Start and wait until healthy; a server that dies before it is ready is started once more (recorded)."""
        for attempt in range(1, attempts + 1):
            try:
                return self._start()
            except ServerDied as e:
                self.info.setdefault("failed_starts", []).append(str(e))
                if attempt == attempts:
                    raise
                print(f"  {e}; starting it again", flush=True)
                self.port = free_port()
                self.url = f"http://127.0.0.1:{self.port}"
                self.command[self.command.index("--port") + 1] = str(self.port)
                self.info["command"] = " ".join(shlex.quote(c) for c in self.command)

    def _start(self):
        import httpx

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "a", encoding="utf-8")
        started = time.perf_counter()
        print(f"+ start {self.label}: {self.info['command']}", flush=True)
        self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        cwd=REPO, start_new_session=True)
        log.close()
        while True:
            if self.process.poll() is not None:
                raise ServerDied(f"server {self.label} exited with code {self.process.returncode} before it was "
                                    f"ready: {self.log_tail()} (log: {self.log_path})")
            if time.perf_counter() - started > self.startup_timeout:
                self.stop()
                raise CalmEdgeError(f"server {self.label} not healthy after {self.startup_timeout} s: {self.log_tail()}")
            try:
                response = httpx.get(self.url + "/health", timeout=2.0)
                if response.status_code == 200 and response.json().get("status") == "ok":
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.25)
        self.info["ready_s"] = round(time.perf_counter() - started, 2)
        self.info["printed_serving"] = "serving" in self.log_path.read_text(errors="replace")
        self.info["rss_mb_ready"] = tree_rss_mb(self.process.pid)
        print(f"  {self.label} ready in {self.info['ready_s']} s, RSS {self.info['rss_mb_ready']} MB", flush=True)

    def cpu_s(self):
        return tree_cpu_s(self.process.pid)

    def rss_mb(self):
        return tree_rss_mb(self.process.pid)

    def log_tail(self, lines=3):
        try:
            text = [line for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return "no log"
        return " | ".join(text[-lines:]) or "no output"

    def stop(self, timeout=60):
        if self.process is None or "exit_code" in self.info:
            return
        if self.process.poll() is None:
            self.info["rss_mb_end"] = self.rss_mb()
            started = time.perf_counter()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
                self.info["graceful"] = True
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                self.info["graceful"] = False
            self.info["shutdown_s"] = round(time.perf_counter() - started, 2)
        self.info["exit_code"] = self.process.returncode
        print(f"  stopped {self.label}: exit {self.process.returncode} after {self.info.get('shutdown_s')} s", flush=True)


def warm_up(server, args, prompts):
    """Unmeasured requests at every batch size up to max-batch (the first calls of each shape are slow)."""
    specs = make_requests(args.max_batch + 1, 999, prompts, (8,), tag="warmup")
    started = time.perf_counter()
    records, _, _ = run_load(closed_loop(server.url, specs[:1], 1, args.max_seconds, args.timeout))
    more, _, _ = run_load(closed_loop(server.url, specs[1:], args.max_batch, args.max_seconds, args.timeout))
    records += more
    failed = [r for r in records if r["outcome"] != "ok"]
    server.info["warmup"] = {"requests": len(records), "failed": len(failed), "s": round(time.perf_counter() - started, 2)}
    if failed:
        r = failed[0]
        raise CalmEdgeError(f"warm-up of {server.label}: {len(failed)} of {len(records)} requests failed, e.g. "
                            f"{r['outcome']} {r['status']} {r.get('error') or r.get('error_body')} "
                            f"(server log {server.log_path}: {server.log_tail()})")


# ---------------------------------------------------------------------------------------------
# A suite

def requests_for(concurrency, args):
    if args.requests:
        return args.requests
    a, b = QUICK["requests_formula"] if args.quick else (4, 8)
    return a * concurrency + b


class Recorder:
    """Cells measured so far, with their request rows for the requests file."""

    def __init__(self):
        self.cells, self.rows = [], []

    def closed(self, key, kind, batching, concurrency, rnd, server, specs, args, other=None):
        cpu, other_cpu, client_cpu = server.cpu_s(), other.cpu_s() if other else None, time.process_time()
        records, wall, first_idle = run_load(closed_loop(server.url, specs, concurrency, args.max_seconds, args.timeout))
        figures = cell_figures(records, wall, first_idle)
        figures["server_cpu_s"] = round(server.cpu_s() - cpu, 2)
        figures["client_cpu_s"] = round(time.process_time() - client_cpu, 2)
        if other is not None:
            figures["idle_server_cpu_s"] = round(other.cpu_s() - other_cpu, 2)
        return self._add(key, kind, batching, concurrency, rnd, "closed", records, figures)

    def poisson(self, key, kind, rnd, server, specs, arrivals, rate, args):
        cpu = server.cpu_s()
        records, wall = run_load(open_loop(server.url, specs, arrivals, args.max_batch, args.max_seconds, args.timeout))
        figures = cell_figures(records, wall)
        waits = [r["cap_wait"] for r in records]
        figures.update(rate_per_s=round(rate, 4), offered_requests=len(specs),
                       delayed_by_cap=sum(1 for w in waits if w > 0.005), cap_wait_ms=_ms(waits),
                       server_cpu_s=round(server.cpu_s() - cpu, 2))
        return self._add(key, kind, "continuous", args.max_batch, rnd, "poisson", records, figures)

    def _add(self, key, kind, batching, concurrency, rnd, load, records, figures):
        cell = {"key": key, "kind": kind, "batching": batching, "concurrency": concurrency, "round": rnd,
                "load": load, "figures": figures, "records": records}
        self.cells.append(cell)
        self.rows += [{"cell": key, "round": rnd, **request_row(r)} for r in records]
        f = figures
        print(f"  {key} round {rnd}: {f['completed']}/{f['requests']} ok, {f['output_tokens_per_s']} tok/s, "
              f"{f['requests_per_s']} req/s, TTFT p50 {f['ttft_ms'].get('median')} p99 {f['ttft_ms'].get('p99')} ms, "
              f"TPOT p50 {f['tpot_ms'].get('median')} ms"
              + (f", idle server {f['idle_server_cpu_s']} CPU s" if "idle_server_cpu_s" in f else "")
              + (f" [{f['outcomes']}]" if f["completed"] != f["requests"] else ""), flush=True)
        return cell


def _order(rnd, index):
    return KINDS if (rnd + index) % 2 == 0 else KINDS[::-1]


def run_suite(suite, packages, args, prompts, log_dir):
    recorder, servers = Recorder(), []
    concurrencies, top = args.concurrency, args.max_batch
    seed_of = {"cell": lambda rnd, c: 1000 * (rnd + 1) + c, "poisson": lambda rnd: 50_000 + rnd}
    # Phase 1: CALM and AR, continuous, side by side, taking turns.
    pair = {kind: Server(f"{suite}-{kind}-continuous", packages[kind], "continuous", args, log_dir) for kind in KINDS}
    try:
        for kind in KINDS:
            pair[kind].start()
            warm_up(pair[kind], args, prompts)
        for rnd in range(args.rounds):
            for index, c in enumerate(concurrencies):
                specs = make_requests(requests_for(c, args), seed_of["cell"](rnd, c), prompts, args.max_tokens_choices)
                for kind in _order(rnd, index):
                    other = pair["ar" if kind == "calm" else "calm"]
                    recorder.closed(f"{kind}-continuous-c{c}", kind, "continuous", c, rnd, pair[kind], specs, args, other)
        # Poisson arrivals at a fraction of the saturation rate measured above (C = max-batch).
        saturation = {}
        for kind in KINDS:
            key = f"{kind}-continuous-c{top}"
            if not any(c["key"] == key for c in recorder.cells):  # not among --concurrency: measure it now
                specs = make_requests(requests_for(top, args), seed_of["cell"](0, top), prompts, args.max_tokens_choices)
                recorder.closed(key, kind, "continuous", top, 0, pair[kind], specs, args)
            saturation[kind] = _median([c["figures"].get("steady_requests_per_s") or c["figures"]["requests_per_s"]
                                        for c in recorder.cells if c["key"] == key])
        for rnd in range(args.rounds):
            specs = make_requests(args.poisson_requests, seed_of["poisson"](rnd), prompts, args.max_tokens_choices)
            for kind in _order(rnd, 0):
                rate = args.poisson_load * saturation[kind]
                if not rate:
                    print(f"  {kind}: no saturation rate measured, Poisson arrivals skipped", flush=True)
                    continue
                arrivals = poisson_arrivals(len(specs), rate, seed_of["poisson"](rnd))
                recorder.poisson(f"{kind}-poisson", kind, rnd, pair[kind], specs, arrivals, rate, args)
        if not any(c["key"] == f"{kind}-continuous-c1" for c in recorder.cells for kind in KINDS):
            for kind in KINDS:  # the Poisson TTFT's reference: TTFT at concurrency 1
                specs = make_requests(requests_for(1, args), seed_of["cell"](0, 1), prompts, args.max_tokens_choices)
                recorder.closed(f"{kind}-continuous-c1", kind, "continuous", 1, 0, pair[kind], specs, args)
    finally:
        for server in pair.values():
            server.stop()
            servers.append(server.info)
    # Phase 2: per package, continuous against static at C = max-batch, side by side, taking turns.
    for kind in KINDS:
        modes = {m: Server(f"{suite}-{kind}-{m}-c{top}", packages[kind], m, args, log_dir) for m in ("continuous", "static")}
        try:
            for server in modes.values():
                server.start()
                warm_up(server, args, prompts)
            for rnd in range(args.rounds):
                specs = make_requests(requests_for(top, args), seed_of["cell"](rnd, top) + 7, prompts, args.max_tokens_choices)
                order = ("continuous", "static") if rnd % 2 == 0 else ("static", "continuous")
                for mode in order:
                    other = modes["static" if mode == "continuous" else "continuous"]
                    recorder.closed(f"{kind}-{mode}-c{top}-paired", kind, mode, top, rnd, modes[mode], specs, args, other)
        finally:
            for server in modes.values():
                server.stop()
                servers.append(server.info)
    return recorder, servers, saturation


def summarize_suite(suite, packages, recorder, servers, saturation, args):
    cells = recorder.cells
    keys = list(dict.fromkeys(c["key"] for c in cells))
    summary = {key: pooled(cells, key) for key in keys}
    top = args.max_batch
    comparisons = {"calm_over_ar": {}, "continuous_over_static": {}, "poisson": {}}
    for c in args.concurrency:
        comparisons["calm_over_ar"][f"c{c}"] = {
            "output_tokens_per_s": ratio_by_round(cells, f"calm-continuous-c{c}", f"ar-continuous-c{c}"),
            "steady_output_tokens_per_s": ratio_by_round(cells, f"calm-continuous-c{c}", f"ar-continuous-c{c}",
                                                         "steady_output_tokens_per_s")}
    goals = {}
    for kind in KINDS:
        comparisons["continuous_over_static"][kind] = {
            "output_tokens_per_s": ratio_by_round(cells, f"{kind}-continuous-c{top}-paired", f"{kind}-static-c{top}-paired"),
            "requests_per_s": ratio_by_round(cells, f"{kind}-continuous-c{top}-paired", f"{kind}-static-c{top}-paired",
                                             "requests_per_s")}
        poisson, c1 = summary.get(f"{kind}-poisson"), summary.get(f"{kind}-continuous-c1")
        row = {"saturation_requests_per_s": saturation.get(kind), "load": args.poisson_load,
               "rate_per_s": round(args.poisson_load * saturation[kind], 4) if saturation.get(kind) else None}
        if poisson and c1 and poisson["ttft_ms"].get("n") and c1["ttft_ms"].get("n"):
            ratio = poisson["ttft_ms"]["p99"] / c1["ttft_ms"]["p99"]
            row.update(ttft_ms_p50=poisson["ttft_ms"]["median"], ttft_ms_p99=poisson["ttft_ms"]["p99"],
                       c1_ttft_ms_p50=c1["ttft_ms"]["median"], c1_ttft_ms_p99=c1["ttft_ms"]["p99"],
                       p99_ttft_poisson_over_c1=round(ratio, 3), goal="< 3", goal_met=bool(ratio < 3))
            goals[f"{kind}_p99_ttft_poisson{round(args.poisson_load * 100)}_under_3x_c1"] = bool(ratio < 3)
        comparisons["poisson"][kind] = row
    failures = {c["key"] + f"-round{c['round']}": c["figures"]["outcomes"] for c in cells
                if c["figures"]["completed"] != c["figures"]["requests"] or c["figures"]["problems"]}
    goals["every_request_completed_and_well_formed"] = not failures
    for rnd_cell in cells:
        rnd_cell.pop("records")
    return {
        "benchmark": "serve",
        "suite": suite,
        "packages": {kind: str(p) for kind, p in packages.items()},
        "servers": servers,
        "summary": summary,
        "comparisons": comparisons,
        "goals": goals,
        "failed_cells": failures,
        "cells": cells,
    }


# ---------------------------------------------------------------------------------------------
# The soak

MALFORMED = [  # (what, raw body or None, JSON body or None)
    ("not JSON", b'{"prompt": "The", "max_tokens": 4', None),
    ("a JSON array", b"[1, 2, 3]", None),
    ("no prompt", None, {"model": "calm-edge", "max_tokens": 8}),
    ("negative max_tokens", None, {"model": "calm-edge", "prompt": "The", "max_tokens": -5}),
    ("max_tokens a string", None, {"model": "calm-edge", "prompt": "The", "max_tokens": "ten"}),
    ("temperature a string", None, {"model": "calm-edge", "prompt": "The", "max_tokens": 8, "temperature": "hot"}),
    ("prompt an object", None, {"model": "calm-edge", "prompt": {"text": "The"}, "max_tokens": 8}),
    ("unknown sampler", None, {"model": "calm-edge", "prompt": "The", "max_tokens": 8, "temperature": 0.5,
                               "extra": {"method": "no-such-method", "candidates": 16}}),
]

SOAK_MIX = [  # (share, what)
    (0.50, "stream"), (0.20, "plain"), (0.06, "stream-t0.5"), (0.04, "plain-t0.5"),
    (0.12, "disconnect"), (0.08, "malformed"),
]


def soak_action(rng):
    x, total = rng.random(), 0.0
    for share, what in SOAK_MIX:
        total += share
        if x < total:
            return what
    return SOAK_MIX[-1][1]


async def soak_load(server, args, prompts, duration_s):
    rng = np.random.default_rng(args.seed)
    sent, outcomes, records, rss = [], {}, [], []
    counter = {"next": 0}
    t0 = time.perf_counter()

    async def sample_rss():
        while True:
            rss.append((round(time.perf_counter() - t0, 1), server.rss_mb()))
            await asyncio.sleep(args.rss_interval)

    async def client_loop(client):
        while time.perf_counter() - t0 < duration_s and counter["next"] < args.soak_max_requests:
            i = counter["next"]
            counter["next"] += 1
            what = soak_action(rng)
            spec = {"id": f"soak-{i:06d}", "prompt": prompts[int(rng.integers(len(prompts)))],
                    "max_tokens": int(rng.integers(1, 129)), "seed": i}
            sent.append(spec["id"])
            if what == "malformed":
                name, raw, body = MALFORMED[int(rng.integers(len(MALFORMED)))]
                spec["max_tokens"] = None
                if raw is not None:
                    record = await plain_request(client, spec, t0, content=raw)
                else:
                    record = await plain_request(client, spec, t0, body=body)
                record["malformed"] = name
            elif what == "disconnect":
                record = await stream_request(client, spec, t0, disconnect_after=int(rng.integers(1, 4)),
                                              body=request_body(spec, True, ignore_eos=False))
            else:
                temperature = 0.5 if what.endswith("t0.5") else 1.0
                request = stream_request if what.startswith("stream") else plain_request
                # The model stops at eos here, as a user's requests do (the measured cells run to max_tokens).
                record = await request(client, spec, t0, temperature,
                                       body=request_body(spec, request is stream_request, temperature, ignore_eos=False))
            record["what"] = what
            outcomes.setdefault(spec["id"], []).append(record["outcome"])
            records.append(record)

    sampler = asyncio.create_task(sample_rss())
    async with make_client(server.url, args.soak_concurrency, args.timeout) as client:
        before, _ = await _metrics(client)
        await asyncio.gather(*(client_loop(client) for _ in range(args.soak_concurrency)))
        wall = time.perf_counter() - t0
        await asyncio.sleep(min(args.rss_interval, 5.0))  # let the last disconnects settle before the final sample
        sampler.cancel()
        rss.append((round(time.perf_counter() - t0, 1), server.rss_mb()))
        after = await stream_request(client, {"id": "soak-after", "prompt": prompts[0], "max_tokens": 16, "seed": 1}, t0)
        health = await client.get("/health")
        await asyncio.sleep(0.5)
        end, end_status = await _metrics(client)
    return {"sent": sent, "outcomes": outcomes, "records": records, "rss": rss, "after": after, "health": health,
            "metrics_before": before, "metrics_end": end, "metrics_status": end_status, "wall": wall}


def parse_metrics(text):
    """Prometheus text: {sample name with labels: value}, histogram buckets left out."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        if "_bucket{" in name or name.endswith("_created") or "_created{" in name:
            continue
        try:
            samples[name] = float(value)
        except ValueError:
            samples[line[:120]] = None
    return samples


def metric_sum(samples, name, contains=None):
    """The sum of the samples of metric `name` (any labels; with `contains`, those whose labels hold it)."""
    values = [v for k, v in samples.items() if v is not None and (k == name or k.startswith(name + "{"))
              and (contains is None or contains in k)]
    return sum(values) if values else None


async def _metrics(client):
    try:
        response = await client.get("/metrics")
    except Exception as e:  # a missing or failing endpoint is reported, not fatal
        return None, repr(e)[:200]
    return (parse_metrics(response.text) if response.status_code == 200 else None), response.status_code


def server_counts(before, end, expected):
    """What the server's own metrics say about the soak: completion requests answered, rows left running."""
    if not before or not end:
        return {"note": "no /metrics to compare"}
    answered = [metric_sum(m, "calm_edge_requests_total", "/v1/completions") for m in (before, end)]
    counted = answered[1] - answered[0] if None not in answered else None
    return {"requests_counted": counted, "requests_expected": expected,
            "requests_by_status": {k: v - before.get(k, 0.0) for k, v in end.items()
                                   if k.startswith("calm_edge_requests_total{")},
            "running_at_end": metric_sum(end, "calm_edge_running_requests"),
            "queued_at_end": metric_sum(end, "calm_edge_queue_length"),
            "completion_tokens": (metric_sum(end, "calm_edge_completion_tokens_total") or 0)
            - (metric_sum(before, "calm_edge_completion_tokens_total") or 0)}


def run_soak(args, log_dir, prompts):
    duration_s = args.soak * 60.0
    warmup_s = min(args.soak_warmup, duration_s / 3)
    server = Server("soak-calm-small-continuous", SMALL["calm"], "continuous", args, log_dir)
    try:
        server.start()
        warm_up(server, args, prompts)
        print(f"+ soak: {args.soak} min, {args.soak_concurrency} clients, RSS every {args.rss_interval} s", flush=True)
        load = asyncio.run(soak_load(server, args, prompts, duration_s))
    finally:
        server.stop()
    sent, outcomes, records, rss, after, health = (load[k] for k in ("sent", "outcomes", "records", "rss", "after", "health"))
    wall = load["wall"]
    server_side = server_counts(load["metrics_before"], load["metrics_end"], len(sent) + 1)
    lost = [i for i in sent if i not in outcomes]
    duplicated = [i for i, o in outcomes.items() if len(o) != 1]
    response_ids = {}
    for r in records:
        for rid in r["response_ids"]:
            if rid is not None:
                response_ids.setdefault(rid, []).append(r["id"])
    shared_ids = {rid: ids for rid, ids in response_ids.items() if len(ids) > 1}
    by_what = {}
    for r in records:
        row = by_what.setdefault(r["what"], {})
        key = r["outcome"] if r["outcome"] != "http_error" else f"http_{r['status']}"
        row[key] = row.get(key, 0) + 1
    errors = [r for r in records if r["outcome"] == "http_error"]
    bad_bodies = [f"{r['id']} ({r.get('malformed', r['what'])}): HTTP {r['status']}: {r['error_body_problem']}"
                  for r in errors if r.get("error_body_problem")]
    malformed = [r for r in records if r["what"] == "malformed"]
    malformed_not_4xx = [f"{r['id']} ({r['malformed']}): {r['outcome']} {r['status']}" for r in malformed
                         if not (r["status"] and 400 <= r["status"] < 500)]
    unexpected = [r for r in records if r["what"] not in ("malformed", "disconnect") and r["outcome"] != "ok"]
    disconnects = [r for r in records if r["what"] == "disconnect"]
    problems = [f"{r['id']}: {p}" for r in records for p in r["problems"]]
    after_warmup = next(((t, m) for t, m in rss if t >= warmup_s and m is not None), None)
    end = next(((t, m) for t, m in reversed(rss) if m is not None), None)
    rss_ratio = round(end[1] / after_warmup[1], 4) if after_warmup and end else None
    tail = [(t, m) for t, m in rss if t >= warmup_s and m is not None]
    slope = float(np.polyfit([t for t, _ in tail], [m for _, m in tail], 1)[0]) * 60 if len(tail) >= 3 else None
    ok = [r for r in records if r["outcome"] == "ok"]
    goals = {
        "no_request_lost_or_duplicated": not lost and not duplicated and not shared_ids,
        "every_error_body_well_formed": not bad_bodies,
        "malformed_requests_got_4xx": bool(malformed) and not malformed_not_4xx,
        "well_formed_requests_succeeded": not unexpected and not problems,
        "rss_end_within_10pct_of_after_warmup": rss_ratio is not None and abs(rss_ratio - 1) <= 0.10,
        "server_answers_after_soak": after["outcome"] == "ok" and health.status_code == 200,
        "graceful_shutdown": bool(server.info.get("graceful")) and server.info.get("exit_code") in (0, -signal.SIGTERM),
    }
    if server_side.get("requests_counted") is not None:
        goals["server_counted_every_request_once"] = server_side["requests_counted"] == server_side["requests_expected"]
    if server_side.get("running_at_end") is not None:
        goals["server_idle_after_soak"] = server_side["running_at_end"] == 0 and not server_side.get("queued_at_end")
    return {
        "benchmark": "serve-soak",
        "package": str(SMALL["calm"]),
        "server": server.info,
        "settings": {"minutes": args.soak, "clients": args.soak_concurrency, "mix": dict((w, s) for s, w in SOAK_MIX),
                     "max_tokens": "uniform 1..128", "malformed_kinds": [m[0] for m in MALFORMED],
                     "disconnect": "close the stream after 1-3 text chunks", "rss_interval_s": args.rss_interval,
                     "warmup_s": warmup_s, "seed": args.seed},
        "wall_s": round(wall, 1),
        "requests": {"sent": len(sent), "with_one_outcome": sum(1 for o in outcomes.values() if len(o) == 1),
                     "lost": len(lost), "duplicated": len(duplicated), "response_ids_shared": len(shared_ids),
                     "completed": len(ok), "by_kind_and_outcome": by_what,
                     "errored_by_status": {str(s): sum(1 for r in errors if r["status"] == s)
                                           for s in sorted({r["status"] for r in errors})},
                     "unexpected_failures": len(unexpected),
                     "unexpected_examples": [f"{r['id']} ({r['what']}): {r['outcome']} {r['status']} "
                                             f"{r.get('error') or r.get('error_body')}" for r in unexpected][:10],
                     "disconnected_as_planned": sum(1 for r in disconnects if r["outcome"] == "disconnected"),
                     "problems": len(problems), "problem_examples": problems[:10]},
        "errors": {"bodies_checked": len(errors), "malformed_sent": len(malformed), "malformed_not_4xx": malformed_not_4xx[:10],
                   "bad_bodies": len(bad_bodies), "bad_body_examples": bad_bodies[:10],
                   "examples": {r["malformed"]: r.get("error_body") for r in malformed}},
        "latency": {"stream_ttft_ms": _ms([r["chunk_times"][0] - r["start"] for r in ok if r["chunk_times"]]),
                    "plain_e2e_ms": _ms([r["end"] - r["start"] for r in ok if not r["stream"]]),
                    "output_tokens_per_s": round(sum(r["completion_tokens"] or 0 for r in ok) / wall, 2)},
        "rss": {"after_warmup_mb": after_warmup[1] if after_warmup else None,
                "after_warmup_at_s": after_warmup[0] if after_warmup else None,
                "end_mb": end[1] if end else None, "end_over_after_warmup": rss_ratio,
                "max_mb": max((m for _, m in rss if m is not None), default=None),
                "slope_mb_per_min_after_warmup": round(slope, 3) if slope is not None else None,
                "samples_s": [t for t, _ in rss], "samples_mb": [m for _, m in rss]},
        "server_side": server_side,
        "after_soak": {"request": after["outcome"], "health": health.status_code,
                       "metrics_status": load["metrics_status"], "metrics": load["metrics_end"]},
        "goals": goals,
    }


# ---------------------------------------------------------------------------------------------
# Report files

def machine():
    """The same description as calm-edge bench's reports (calm_edge/bench/harness.py)."""
    return {"cpu_cores": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "platform": platform.platform(), "python": platform.python_version()}


def versions():
    out = {"calm_edge": __version__}
    for module in ("onnxruntime", "httpx"):
        try:
            out[module] = __import__(module).__version__
        except ImportError:
            out[module] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        out["git"] = commit + ("+uncommitted changes" if dirty else "")
    except OSError:
        out["git"] = None
    return out


def header(args, started):
    return {"command": " ".join(["python", "benchmarks/serve.py", *map(shlex.quote, sys.argv[1:])]),
            "created": started.isoformat(timespec="seconds"),
            "machine": machine(), "versions": versions(),
            "settings": {"threads": args.threads, "max_batch": args.max_batch, "max_queue": args.max_queue,
                         "concurrency": args.concurrency, "rounds": args.rounds,
                         "requests_per_cell": args.requests or ("C + 2" if args.quick else "4*C + 8"),
                         "max_seconds_per_cell": args.max_seconds, "max_tokens_choices": list(args.max_tokens_choices),
                         "temperature": 1.0, "prompt_tokens": PROMPT_TOKENS, "prompt_pool": PROMPT_POOL,
                         "text": str(args.text) if Path(args.text).is_file() else "built-in prose (detokenized WikiText missing)",
                         "poisson_load": args.poisson_load, "poisson_requests": args.poisson_requests,
                         "poisson_cap_outstanding": args.max_batch, "client_timeout_s": args.timeout,
                         "serve_args": args.serve_args, "quick": args.quick},
            "definitions": DEFINITIONS}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    return plt


COLORS = {"calm": "tab:blue", "ar": "tab:orange"}


def plot_suite(report, path):
    """Output tokens/s, TTFT and per-token latency against concurrency; static batching and Poisson arrivals apart."""
    plt = _pyplot()
    summary, top = report["summary"], report["settings"]["max_batch"]
    concurrencies = report["settings"]["concurrency"]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.4), gridspec_kw={"width_ratios": [1.2, 1, 1, 0.8]})
    for kind in KINDS:
        color = COLORS[kind]
        points = [(c, summary.get(f"{kind}-continuous-c{c}")) for c in concurrencies]
        points = [(c, s) for c, s in points if s and s["output_tokens_per_s"]]
        if points:
            axes[0].plot([c for c, _ in points], [s["output_tokens_per_s"] for _, s in points], "o-", color=color,
                         label=f"{kind} continuous")
            for metric, ax in (("ttft_ms", axes[1]), ("tpot_ms", axes[2])):
                for stat, style in (("median", "o-"), ("p99", "s--")):
                    xy = [(c, s[metric][stat]) for c, s in points if s[metric].get(stat) is not None]
                    if xy:
                        ax.plot(*zip(*xy), style, color=color, label=f"{kind} {'p50' if stat == 'median' else 'p99'}")
        for mode, marker in (("continuous", "D"), ("static", "X")):
            paired = summary.get(f"{kind}-{mode}-c{top}-paired")
            if paired and paired["output_tokens_per_s"]:
                axes[0].plot([top], [paired["output_tokens_per_s"]], marker, color=color, markersize=9,
                             fillstyle="none" if mode == "continuous" else "full", linestyle="none",
                             label=f"{kind} {mode}, C={top} (paired)")
    # Poisson arrivals against concurrency 1: the TTFT goal.
    ax, width, ticks = axes[3], 0.35, []
    load = round(report["settings"]["poisson_load"] * 100)
    for i, kind in enumerate(KINDS):
        c1, poisson = summary.get(f"{kind}-continuous-c1"), summary.get(f"{kind}-poisson")
        for j, (label, s) in enumerate((("C=1", c1), (f"Poisson {load}%", poisson))):
            if s and s["ttft_ms"].get("n"):
                x = i + (j - 0.5) * width
                ax.bar([x], [s["ttft_ms"]["p99"]], width * 0.9, color=COLORS[kind], alpha=0.35 if j == 0 else 0.8)
                ax.plot([x], [s["ttft_ms"]["median"]], "k_", markersize=14)
                ticks.append((x, f"{kind}\n{label}"))
        ratio = report["comparisons"]["poisson"].get(kind, {}).get("p99_ttft_poisson_over_c1")
        if ratio is not None:
            height = max(s["ttft_ms"]["p99"] for s in (c1, poisson))
            ax.annotate(f"{ratio:.2f}x", (i, height), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=8)
    if ticks:
        ax.set_xticks([t for t, _ in ticks], [label for _, label in ticks], fontsize=7)
    ax.set(ylabel="ms", title=f"TTFT p99 (bars), p50 (ticks)\nPoisson {load}% against C=1, goal < 3x")
    ax.margins(y=0.12)
    ax.grid(alpha=0.3, axis="y")
    titles = ("output tokens/s (closed loop)", "time to first token (ms)", "per-token latency, TPOT (ms)")
    for ax, title in zip(axes[:3], titles):
        ax.set(xscale="log", xlabel="concurrent clients", title=title)
        ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[1].set_yscale("log")
    m = report["machine"]
    fig.suptitle(f"calm-edge serve, {report['suite']}: {report['settings']['threads']} threads, max batch {top}, "
                 f"{m['cpu_cores']} cores ({m['processor']}), {report['settings']['rounds']} round(s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_soak(report, path):
    plt = _pyplot()
    rss = report["rss"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot([t / 60 for t in rss["samples_s"]], rss["samples_mb"], ".-")
    ax.axvline(report["settings"]["warmup_s"] / 60, color="gray", linestyle=":", label="end of warm-up")
    ax.set(xlabel="minutes", ylabel="server RSS (MB)",
           title=f"soak: RSS end / after warm-up = {rss['end_over_after_warmup']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_rows(path, rows):
    text = "".join(json.dumps(row) + "\n" for row in rows)
    from calm_edge.fileio import write_bytes_atomic

    write_bytes_atomic(path, text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------

def print_summary(report):
    comparisons = report["comparisons"]
    calm_ar = ", ".join(f"{c} {r['output_tokens_per_s']['ratio']}" for c, r in comparisons["calm_over_ar"].items())
    static = ", ".join(f"{k} {r['output_tokens_per_s']['ratio']}" for k, r in comparisons["continuous_over_static"].items())
    poisson = ", ".join(f"{k} {r.get('p99_ttft_poisson_over_c1')} ({r.get('ttft_ms_p99')} / {r.get('c1_ttft_ms_p99')} ms)"
                        for k, r in comparisons["poisson"].items())
    print(f"{report['suite']}: CALM / AR output tokens/s: {calm_ar}")
    print(f"{report['suite']}: continuous / static output tokens/s at C={report['settings']['max_batch']}: {static}")
    print(f"{report['suite']}: p99 TTFT Poisson {round(report['settings']['poisson_load'] * 100)}% / C=1 (goal < 3): {poisson}")
    print(f"{report['suite']}: goals: " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in report["goals"].items()))
    if report["failed_cells"]:
        print(f"{report['suite']}: cells with failed or malformed responses: {report['failed_cells']}")


def _fraction(value):
    numerator, _, denominator = value.partition("/")
    return float(numerator) / float(denominator or 1)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suites", default=None, help="Comma-separated: small, paper-dims (default both; --quick: small).")
    parser.add_argument("--concurrency", default="1,4,16", help="Closed-loop client counts (default 1,4,16).")
    parser.add_argument("--requests", type=int, default=None, help="Requests per cell (default 4*C + 8; --quick C + 2).")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="No new request in a cell after this (s).")
    parser.add_argument("--rounds", type=int, default=None, help="Times the runners take turns over the cells (default 1).")
    parser.add_argument("--poisson-load", type=_fraction, default=0.7, help="Poisson rate as a fraction of saturation.")
    parser.add_argument("--poisson-requests", type=int, default=None, help="Requests of a Poisson run (default 64).")
    parser.add_argument("--threads", type=int, default=2, help="calm-edge serve --threads.")
    parser.add_argument("--max-batch", type=int, default=16, help="calm-edge serve --max-batch (also the Poisson cap).")
    parser.add_argument("--max-queue", type=int, default=256, help="calm-edge serve --max-queue.")
    parser.add_argument("--timeout", type=float, default=600.0, help="Client timeout of one request (s).")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="Seconds a server may take to be healthy.")
    parser.add_argument("--tokenizer", default=str(SMALL_TOKENIZER),
                        help="paper-dims: the SentencePiece tokenizer padded to 128,256 pieces (default: the small packages').")
    parser.add_argument("--text", default=str(TEXT), help="JSONL whose paragraphs give the prompts.")
    parser.add_argument("--work", default=str(REPO / "bench-work" / "serve"), help="Packages and server logs.")
    parser.add_argument("--out", default=None, help="Results folder (default benchmarks/results).")
    parser.add_argument("--quick", action="store_true", help="Tiny counts on the small suite: a check that everything runs.")
    parser.add_argument("--prepare-only", action="store_true", help="Make the suites' packages and stop.")
    parser.add_argument("--soak", type=float, nargs="?", const=10.0, default=None, metavar="MINUTES",
                        help="Run the soak instead of the suites (default 10 minutes).")
    parser.add_argument("--soak-concurrency", type=int, default=8, help="Clients of the soak.")
    parser.add_argument("--soak-warmup", type=float, default=60.0, help="Soak: RSS is compared from this time on (s).")
    parser.add_argument("--soak-max-requests", type=int, default=200_000, help="Soak: a bound on requests sent.")
    parser.add_argument("--rss-interval", type=float, default=5.0, help="Soak: seconds between RSS samples.")
    parser.add_argument("--seed", type=int, default=0, help="Soak: the mix's seed.")
    parser.add_argument("--serve-command", default=None,
                        help="Replace `python -m calm_edge.cli serve` (a check of the harness against another server).")
    serve_args = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.serve_args = serve_args
    args.suites = [s.strip() for s in (args.suites or ("small" if args.quick else ",".join(SUITES))).split(",") if s.strip()]
    for suite in args.suites:
        if suite not in SUITES:
            parser.error(f"--suites {suite!r}: choose from {', '.join(SUITES)}")
    args.concurrency = sorted({int(c) for c in (QUICK["concurrency"] if args.quick and args.concurrency == "1,4,16"
                                                else args.concurrency).split(",")})
    if any(c < 1 or c > args.max_queue for c in args.concurrency):
        parser.error(f"--concurrency {args.concurrency}: each between 1 and --max-queue")
    args.rounds = args.rounds or (QUICK["rounds"] if args.quick else 1)
    args.poisson_requests = args.poisson_requests or (QUICK["poisson_requests"] if args.quick else 64)
    args.max_tokens_choices = QUICK["max_tokens"] if args.quick else MAX_TOKENS
    if args.soak is not None and args.soak <= 0:
        parser.error("--soak MINUTES must be positive")
    if args.out is None and args.quick:
        parser.error("--quick is a check, not the results; give --out somewhere outside benchmarks/results")
    args.out = Path(args.out) if args.out else RESULTS
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    work = Path(args.work)
    log_dir = work / "logs" / started.strftime("%Y%m%d-%H%M%S")
    if args.soak is None:
        packages = {suite: suite_packages(suite, args) for suite in args.suites}
        if args.prepare_only:
            print("packages:", json.dumps({s: {k: str(p) for k, p in d.items()} for s, d in packages.items()}))
            return
    tokenizer = load_tokenizer(SMALL_TOKENIZER)  # every suite's packages encode text as this one does
    prompts = make_prompts(tokenizer, args.text)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.soak is not None:
        report = {"benchmark": "serve-soak", **header(args, started)}
        report.update(run_soak(args, log_dir, prompts))
        out = args.out / "serve_soak.json"
        report["files"] = {"json": str(out), "plot": str(out.with_suffix(".png"))}
        write_json_atomic(out, report)
        plot_soak(report, out.with_suffix(".png"))
        q, rss = report["requests"], report["rss"]
        print(f"soak: {q['sent']} sent, {q['completed']} completed, errors by status {q['errored_by_status']}, "
              f"{q['disconnected_as_planned']} closed early, {q['lost']} lost, {q['duplicated']} duplicated, "
              f"{q['unexpected_failures']} unexpected failures, {q['problems']} malformed responses")
        print(f"soak: RSS {rss['after_warmup_mb']} MB after warm-up, {rss['end_mb']} MB at the end "
              f"(x{rss['end_over_after_warmup']}, {rss['slope_mb_per_min_after_warmup']} MB/min), max {rss['max_mb']} MB")
        print("soak: goals: " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in report["goals"].items()))
        print(f"-> {out}")
        return
    for suite in args.suites:
        print(f"=== suite {suite}: {packages[suite]['calm']} against {packages[suite]['ar']}", flush=True)
        suite_started = datetime.datetime.now(datetime.timezone.utc)
        recorder, servers, saturation = run_suite(suite, packages[suite], args, prompts, log_dir)
        rows = recorder.rows
        report = {"benchmark": "serve", **header(args, suite_started)}
        report.update(summarize_suite(suite, packages[suite], recorder, servers, saturation, args))
        stem = args.out / f"serve_{suite.replace('-', '_')}"
        files = {"json": f"{stem}.json", "plot": f"{stem}.png", "requests": f"{stem}_requests.jsonl"}
        report["files"] = files
        write_json_atomic(files["json"], report)
        write_rows(files["requests"], rows)
        plot_suite(report, files["plot"])
        print_summary(report)
        print(f"-> {files['json']}")


if __name__ == "__main__":
    main()
