"""`calm-edge bench`: run every runner over the matrix, each in its own worker process, and report.

The report holds, per runner, its versions, package size and weights read per token, and per
cell the figures of `worker.summarize_cell`; then every CALM-against-AR ratio of decode tokens/s
beside its ideal from the weights-read model (`calm_edge.weights_read`), and the cost of a
T = 1/2 step against a T = 1 step. A peer that cannot be installed, converted or run appears
with the reason, never silently dropped.

Rounds (`--rounds R`): the runners take turns R times, each turn a fresh worker with `repeats`
timed runs per cell. This machine's speed drifts by tens of percent over minutes, and runners
measured one after the other then see different machines; with rounds every runner sees every
period. Decode tokens/s is then pooled over all rounds, and a CALM-against-AR ratio is the
median of the rounds' own ratios (each from runners measured minutes apart), listed beside it.
The other figures of a cell (latencies, the per-graph split, memory) are the first round's.
"""
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

from calm_edge import weights_read
from calm_edge.bench import output, stats
from calm_edge.bench.matrix import build_matrix
from calm_edge.bench.prompts import prompt_batches
from calm_edge.bench.runners import PEERS
from calm_edge.config import Config
from calm_edge.errors import CalmEdgeError
from calm_edge.runtime import limits
from calm_edge.runtime.model import DEFAULT_SPINNING, available_providers
from calm_edge.runtime.package import Manifest
from calm_edge.tokenizer import load_tokenizer

PEER_NAMES = {"optimum": "optimum", "ort-genai": "onnxruntime-genai"}


def _package_config(manifest):
    """The Config a package was exported from (its provenance), or None for a package without one."""
    data = manifest.training_config
    try:
        return Config.from_dict(data) if data else None
    except CalmEdgeError:
        return None


def _hf_config(hf_dir):
    """A Config holding the AR dimensions of a Hugging Face Llama folder (for the weights-read model)."""
    c = json.loads((Path(hf_dir) / "config.json").read_text())
    backbone = {"hidden_size": c["hidden_size"], "intermediate_size": c["intermediate_size"],
                "num_layers": c["num_hidden_layers"], "num_heads": c["num_attention_heads"],
                "num_kv_heads": c.get("num_key_value_heads", c["num_attention_heads"]),
                "max_positions": c["max_position_embeddings"]}
    try:
        return Config.from_dict({"tokenizer": {"vocab_size": c["vocab_size"]}, "ar": {"backbone": backbone}})
    except CalmEdgeError:
        return None


def _weights_figures(config, kind):
    if config is None:
        return None
    parts = weights_read.weights_per_token(config, kind)
    return {"weights_per_token": round(parts["total"]), "bytes_per_token_fp32": round(weights_read.bytes_per_token(config, kind)),
            "parts": {k: round(v) for k, v in parts["parts"].items()}}


# Text whose encoding every runner's tokenizer must agree on (see check_inputs).
AGREEMENT_TEXT = ("The history of the city begins in 1204, when the river was first bridged. "
                  "Its population grew to 12,000 by 1850; café naïve 東京.")


def check_inputs(packages, peers, hf_dirs):
    """Manifests of the packages, and a tokenizer every runner agrees with; clear errors otherwise.

    Runners may carry different tokenizer files (the paper-dimension packages pad one tokenizer
    to 128,256 ids with pieces that are never produced), but they must encode text to the same
    ids, so that every runner gets the very same prompts.
    """
    if not packages and not peers:
        raise CalmEdgeError("nothing to measure: pass --package PKG (repeatable) and/or --peer optimum / --peer ort-genai")
    for peer in peers:
        if peer not in PEERS:
            raise CalmEdgeError(f"--peer {peer!r} is unknown; choose one of: {', '.join(PEERS)}")
    if peers and not hf_dirs:
        raise CalmEdgeError(f"--peer {peers[0]} runs the AR weights from a Hugging Face folder; pass --hf DIR, "
                            "made by `calm-edge export --ar RUN --format hf --out DIR`")
    for hf in hf_dirs:
        if not (Path(hf) / "config.json").is_file() or not any((Path(hf) / f).is_file()
                                                                  for f in ("tokenizer.model", "tokenizer.json")):
            raise CalmEdgeError(f"--hf {hf} is not a Hugging Face folder written by `calm-edge export --format hf` "
                                "(it needs config.json and tokenizer.model or tokenizer.json); export it again")
    manifests = {str(Path(p).resolve()): Manifest.read(p) for p in packages}
    tokenizers = [m.tokenizer_path for m in manifests.values()]
    tokenizers += [Path(hf) for hf in hf_dirs]
    encodings = {str(t): load_tokenizer(t).encode(AGREEMENT_TEXT) for t in tokenizers}
    if len({tuple(ids) for ids in encodings.values()}) > 1:
        raise CalmEdgeError("the runners' tokenizers encode text differently (" + ", ".join(encodings) + "); "
                            "compare packages exported from runs trained on the same tokenizer, so every runner "
                            "gets the very same prompt ids")
    return manifests, tokenizers[0]


def _run_worker(spec, work_dir, label, bar, log):
    """Run one worker; returns (records, failure message or None)."""
    spec_path = work_dir / f"{label}.spec.json"
    spec_path.write_text(json.dumps(spec))
    log_path = work_dir / f"{label}.log"
    with open(log_path, "w", encoding="utf-8") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "calm_edge.bench.worker", str(spec_path)],
                                   stdout=subprocess.PIPE, stderr=log_file, text=True, bufsize=1)
        for line in process.stdout:
            if line.startswith("@@cell"):
                if bar is not None:
                    bar.update(1)
            else:
                log_file.write(line)
        code = process.wait()
    records = []
    results = Path(spec["results"])
    if results.is_file():
        records = [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines() if line.strip()]
    failure = None
    if code != 0:
        tail = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()][-3:]
        failure = f"worker exited with code {code}: {' | '.join(tail) or 'no output'} (log: {log_path})"
    log(f"{label}: exit {code}, {max(len(records) - 1, 0)} cells")
    return records, failure


def _label(index, spec):
    kind = spec["type"] if spec["type"] != "package" else Path(spec["path"]).name
    return f"{index:02d}-{''.join(c if c.isalnum() or c in '-_' else '_' for c in kind)}"


def run_bench(packages=(), peers=(), hf=(), out="bench.json", work_dir="bench-work", repeats=5, warmup=1,
              seed=0, candidates=16, text=None, matrix_options=None, provider="cpu", progress=True,
              log=lambda message: None, spinning=None, rounds=1):
    """Measure, write the JSON report (and CSV, plots) and return it."""
    packages, peers = [Path(p) for p in packages], list(peers)
    hf_dirs = [hf] if isinstance(hf, (str, Path)) else list(hf or ())
    if repeats < 1 or warmup < 0 or rounds < 1:
        raise CalmEdgeError(f"--repeats {repeats} / --warmup {warmup} / --rounds {rounds}: need at least 1 repeat, "
                            "0 or more warm-up runs and at least 1 round")
    if provider != "cpu":
        if provider not in available_providers():  # before any worker starts, with the fix
            raise CalmEdgeError(f"--provider {provider}: this onnxruntime offers {', '.join(available_providers())}; "
                                "install onnxruntime-gpu in place of onnxruntime (README.md, GPU machines)")
    cells = build_matrix(**(matrix_options or {}))
    manifests, tokenizer_path = check_inputs(packages, peers, hf_dirs)
    biggest = max(cells, key=lambda c: c.batch * (c.prompt_tokens + c.new_tokens))
    for path, manifest in manifests.items():  # before any prompt is built: a million rows would take it all
        limits.check_batch(manifest, biggest.batch, biggest.prompt_tokens + biggest.new_tokens,
                           candidates if manifest.kind == "calm" else 1, f"--batch-sizes {biggest.batch} with {path}")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    prompts = prompt_batches(load_tokenizer(tokenizer_path), text, sorted({c.prompt_tokens for c in cells}),
                             max(c.batch for c in cells))

    specs = [{"type": "package", "path": str(p.resolve()), "candidates": candidates, "provider": provider}
             for p in packages]
    # Each peer runs each Hugging Face folder; its converted models go to a folder of their own.
    specs += [{"type": peer, "hf": str(Path(hf).resolve()), "work_dir": str((work_dir / Path(hf).name).resolve()),
               "provider": provider} for hf in hf_dirs for peer in peers]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=rounds * len(specs) * len(cells), desc="bench", unit="cell")
    by_round = [[] for _ in specs]  # per spec, one assembled runner per round
    try:
        for round_index in range(rounds):
            for index, spec in enumerate(specs):
                if round_index and by_round[index][0]["status"] != "ok":
                    continue  # unavailable or failed: said once, not retried
                label = _label(index, spec) + (f"-round{round_index + 1}" if rounds > 1 else "")
                worker_spec = {"runner": spec, "cells": [c.to_dict() for c in cells], "prompts": prompts,
                               "repeats": repeats, "warmup": warmup, "seed": seed, "spinning": spinning,
                               "results": str((work_dir / f"{label}.results.jsonl").resolve())}
                (work_dir / f"{label}.results.jsonl").unlink(missing_ok=True)
                records, failure = _run_worker(worker_spec, work_dir, label, bar, log)
                runner = _assemble_runner(spec, records, failure, manifests, len(hf_dirs) > 1)
                by_round[index].append(runner)
                if bar is not None:  # cells a failed or unavailable runner never reached
                    bar.update(len(cells) - len(runner["cells"]) if runner["status"] != "ok" else 0)
    finally:
        if bar is not None:
            bar.close()
    runners = [pool_rounds(rounds_of_runner) for rounds_of_runner in by_round]

    report = {
        "benchmark": "calm-edge bench",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": _command_line(),
        "provider": provider,
        "machine": {"cpu_cores": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "platform": platform.platform(), "python": platform.python_version()},
        "settings": {"rounds": rounds, "repeats": repeats, "warmup": warmup, "seed": seed, "candidates": candidates,
                     "spinning": (f"{spinning} in every runner" if spinning else
                                  f"each runtime's default (calm-edge: {DEFAULT_SPINNING}; optimum and "
                                  "onnxruntime-genai: ONNX Runtime's, on)"),
                     "text": str(text) if text else "built-in prose", "matrix": matrix_options or {},
                     "cells": len(cells)},
        "runners": runners,
        "comparisons": compare(runners),
        "low_temperature_cost": low_temperature_cost(runners),
    }
    output.write_all(report, out)
    return report


def _command_line():
    """What to run to measure again: the suite script's command when it started us, else ours."""
    if os.environ.get("CALM_EDGE_BENCH_COMMAND"):
        return os.environ["CALM_EDGE_BENCH_COMMAND"]
    if sys.argv[1:2] == ["bench"]:
        return " ".join(["calm-edge", "bench", *sys.argv[2:]])
    return " ".join(sys.argv)


def _assemble_runner(spec, records, failure, manifests, several_hf):
    head = records[0] if records and "runner" in records[0] else {}
    info = dict(head.get("runner", {}))
    if spec["type"] == "package":
        manifest = manifests[spec["path"]]  # both keyed by the resolved path
        kind = manifest.kind
        config = _package_config(manifest)
        name = f"calm-edge {kind} ({Path(spec['path']).name})"
        info.setdefault("kind", kind)
        info["random_weights"] = manifest.random_weights
        size_of = spec["path"]
    else:
        kind, config, name = "ar", _hf_config(spec["hf"]), PEER_NAMES[spec["type"]]
        if several_hf:
            name += f" ({Path(spec['hf']).name})"
        info.setdefault("kind", "ar")
        size_of = info.get("onnx_dir") or info.get("model_dir")
    runner = {"name": name, **info, "status": "ok", "reason": None,
              "package_size_mb": stats.folder_size_mb(size_of) if size_of and Path(size_of).exists() else None,
              "weights_read": _weights_figures(config, kind), "config": config.to_dict() if config else None,
              "cells": {}}
    if "unavailable" in head:
        runner.update(status="unavailable", reason=head["unavailable"])
    elif failure is not None:
        runner.update(status="failed", reason=failure)
    for record in records[1:]:
        runner["cells"][record["key"]] = record
    return runner


def pool_rounds(rounds):
    """One runner from its rounds: the first round's figures, decode tokens/s pooled over all.

    A runner that failed in a later round keeps that round's status and reason.
    """
    runner = dict(rounds[0])
    failed = [r for r in rounds if r["status"] != "ok"]
    if failed:
        runner.update(status=failed[0]["status"], reason=failed[0]["reason"])
    if len(rounds) == 1:
        return runner
    runner["cells"] = {}
    for key, cell in rounds[0]["cells"].items():
        same = [r["cells"].get(key, {}) for r in rounds]
        if not all("decode_tokens_per_s_runs" in c for c in same):
            runner["cells"][key] = cell  # skipped or failed somewhere: as the first round saw it
            continue
        pooled = [rate for c in same for rate in c["decode_tokens_per_s_runs"]]
        runner["cells"][key] = {**cell, "decode_tokens_per_s": stats.summarize(pooled, 1.0, 2),
                                "decode_tokens_per_s_runs": pooled,
                                "decode_tokens_per_s_by_round": [c["decode_tokens_per_s"]["median"] for c in same]}
    return runner


def _median(runner, key, metric="decode_tokens_per_s"):
    cell = runner["cells"].get(key, {})
    return cell.get(metric, {}).get("median")


def _vocab(runner):
    return (runner.get("config") or {}).get("tokenizer", {}).get("vocab_size")


def compare(runners):
    """CALM decode tokens/s over each AR runner's, cell by cell, beside the weights-read ideal.

    A CALM runner is paired with the AR runners of the same vocabulary size: one file may hold
    several pairings (the paper's 128,256-token pairing and an 8,192-token one). With rounds, the
    ratio is the median of the rounds' ratios (see the module's docstring).
    """
    rows = []
    for calm in (r for r in runners if r.get("kind") == "calm" and r["status"] == "ok"):
        for ar in (r for r in runners if r.get("kind") == "ar" and _vocab(r) == _vocab(calm)):
            ideal = None
            if calm["config"] and ar["config"]:
                ideal = weights_read.ideal_speedup(Config.from_dict(calm["config"]), Config.from_dict(ar["config"]))
            base = {"calm": calm["name"], "ar": ar["name"], "ideal_ratio": round(ideal, 3) if ideal else None}
            if ar["status"] != "ok":
                rows.append({**base, "cell": None, "ratio": None, "note": f"{ar['name']} {ar['status']}: {ar['reason']}"})
                continue
            for key in calm["cells"]:
                mine, theirs = _median(calm, key), _median(ar, key)
                if mine is None or theirs is None:
                    continue
                ratio, by_round = mine / theirs, None
                mine_by_round = calm["cells"][key].get("decode_tokens_per_s_by_round")
                theirs_by_round = ar["cells"][key].get("decode_tokens_per_s_by_round")
                if mine_by_round and theirs_by_round and len(mine_by_round) == len(theirs_by_round):
                    by_round = [round(a / b, 3) for a, b in zip(mine_by_round, theirs_by_round)]
                    ratio = float(np.median(by_round))
                rows.append({**base, "cell": key, "calm_tokens_per_s": mine, "ar_tokens_per_s": theirs,
                             "ratio": round(ratio, 3),
                             "fraction_of_ideal": round(ratio / ideal, 3) if ideal else None,
                             **({"ratio_by_round": by_round} if by_round else {})})
    return rows


def low_temperature_cost(runners):
    """Per CALM runner and cell: the median step at T = 1/n over the median step at T = 1."""
    rows = []
    for runner in (r for r in runners if r.get("kind") == "calm" and r["status"] == "ok"):
        for key, cell in runner["cells"].items():
            if "step_ms" not in cell or cell["cell"]["temperature"] == 1.0:
                continue
            reference_key = key.rsplit("-T", 1)[0] + "-T1"
            reference = runner["cells"].get(reference_key, {}).get("step_ms", {}).get("median")
            if reference:
                rows.append({"runner": runner["name"], "cell": key, "step_ms": cell["step_ms"]["median"],
                             "t1_step_ms": reference, "ratio": round(cell["step_ms"]["median"] / reference, 3),
                             "split_ms": cell["per_step_split_ms"],
                             "t1_split_ms": runner["cells"][reference_key]["per_step_split_ms"]})
    return rows
