"""benchmarks/engine_batching.py: both batchings run the same requests to the end, and the report says so.

Fast (a few seconds): the committed small CALM package, 20 short requests.
"""
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "engine_batching.py"
spec = importlib.util.spec_from_file_location("engine_batching", SCRIPT)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

PACKAGE = REPO / "models" / "calm-small-int4"


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from calm_edge.runtime.model import Model
    from calm_edge.tokenizer import load_tokenizer

    return Model(PACKAGE, threads=1), load_tokenizer(PACKAGE / "tokenizer.model")


def test_both_batchings_give_every_request_its_tokens(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = ["The river rises in the hills and", "In 1897 the company", "She wrote that the"]
    specs = bench.serve.make_requests(20, 7, prompts, (4, 8, 16, 32))
    expected = sum(s["max_tokens"] for s in specs)  # eos is ignored, so each request runs to max_tokens
    runs = {b: bench.closed_loop(model, tokenizer, specs, b, concurrency=8, max_batch=8)
            for b in ("continuous", "static")}
    for run in runs.values():
        assert run["output_tokens"] == expected
        assert set(run["graph_s"]) == {"backbone", "energy_head", "decoder"}
        assert run["other_s"] >= 0 and run["steps"] > run["admission_steps"] > 0
    # Static admits only into an empty batch: 20 requests over 8 rows are 3 batches. Continuous
    # admits whenever a row is free, and needs fewer steps for the same tokens.
    assert runs["static"]["admission_steps"] == 3
    assert runs["continuous"]["admission_steps"] > 3
    assert runs["continuous"]["steps"] < runs["static"]["steps"]


def test_the_report_holds_each_round_and_the_ratio(tmp_path):
    bench.main(["--requests", "6", "--rounds", "2", "--concurrency", "4", "--max-batch", "4", "--threads", "1",
                "--name", "check", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "engine_batching_check.json").read_text())
    assert report["benchmark"] == "engine_batching" and "--rounds 2" in report["command"]
    assert [(r["round"], r["batching"]) for r in report["runs"]] == [
        (0, "continuous"), (0, "static"), (1, "static"), (1, "continuous")]  # taking turns
    by_round = report["continuous_over_static"]["by_round"]
    assert len(by_round) == 2 and report["continuous_over_static"]["ratio"] == pytest.approx(sum(by_round) / 2)
