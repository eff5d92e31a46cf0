"""`calm-edge bench` on tiny random-weight packages: the report's files and fields, bad input, peers that fail.

Speed does not depend on trained weights, so these packages come from `export/random_weights.py`
(seconds) rather than from the training fixtures. Timings are recorded, never asserted.
"""
import csv
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from calm_edge.bench import harness, stats, worker
from calm_edge.bench.matrix import Cell, build_matrix
from calm_edge.runtime.timing import Trace
from calm_edge.cli import main
from calm_edge.errors import CalmEdgeError

TINY_MATRIX = {"prompt_lengths": "8", "new_tokens": "8", "batch_sizes": "1,2", "threads": "1", "temperatures": "1,1/2"}


def test_bench_writes_json_csv_and_plots(random_packages, tmp_path):
    out = tmp_path / "bench.json"
    report = harness.run_bench(packages=[random_packages["calm"], random_packages["ar"]], out=out,
                               work_dir=tmp_path / "work", repeats=2, warmup=1, matrix_options=TINY_MATRIX,
                               progress=False)
    assert json.loads(out.read_text())["runners"][0]["name"] == report["runners"][0]["name"]
    calm, ar = report["runners"]
    assert (calm["kind"], ar["kind"]) == ("calm", "ar") and calm["random_weights"]
    assert calm["status"] == ar["status"] == "ok"
    assert calm["package_size_mb"] > 0 and calm["weights_read"]["weights_per_token"] > 0
    assert len(calm["cells"]) == len(build_matrix(**TINY_MATRIX)) == 4
    cell = calm["cells"]["p8-n8-b1-t1-T1"]
    for field in ("prefill_ms", "ttft_ms", "step_ms", "token_ms", "decode_tokens_per_s", "end_to_end_tokens_per_s"):
        assert set(cell[field]) >= {"median", "p90", "p99"}, field
    assert cell["new_tokens_per_sequence"] == 8 and cell["tokens_per_step"] == 4 and cell["steps"] == 2
    assert cell["peak_rss_mb"] > 0 and cell["step_ms_samples"]
    assert set(cell["per_step_split_ms"]) == {"backbone", "energy_head", "decoder", "loop_overhead"}
    assert cell["token_ms"]["median"] == pytest.approx(cell["step_ms"]["median"] / 4, rel=1e-2, abs=1e-3)
    assert ar["cells"]["p8-n8-b2-t1-T1"]["steps"] == 8 and "ar" in ar["cells"]["p8-n8-b2-t1-T1"]["per_step_split_ms"]
    # Every CALM cell against the AR cell, beside the weights-read ideal.
    ratios = [r for r in report["comparisons"] if r["ratio"] is not None]
    assert len(ratios) == 4 and all(r["ideal_ratio"] > 0 and r["fraction_of_ideal"] > 0 for r in ratios)
    assert {r["cell"] for r in report["low_temperature_cost"]} == {"p8-n8-b1-t1-T0.5", "p8-n8-b2-t1-T0.5"}

    with open(tmp_path / "bench.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {r["status"] for r in rows} == {"ok"}
    assert float(rows[0]["decode_tokens_per_s"]) > 0 and rows[0]["step_ms_p99"]
    for plot in ("throughput", "latency", "split"):
        assert (tmp_path / f"bench_{plot}.png").stat().st_size > 1000


def test_rounds_pool_the_rates_and_take_the_median_of_the_rounds_ratios(random_packages, tmp_path):
    matrix = {**TINY_MATRIX, "batch_sizes": "1", "temperatures": "1"}
    report = harness.run_bench(packages=[random_packages["calm"], random_packages["ar"]], out=tmp_path / "r.json",
                               work_dir=tmp_path / "work", repeats=2, warmup=0, matrix_options=matrix,
                               progress=False, rounds=3)
    assert report["settings"]["rounds"] == 3
    calm, ar = report["runners"]
    cell = calm["cells"]["p8-n8-b1-t1-T1"]
    assert len(cell["decode_tokens_per_s_by_round"]) == 3 and len(cell["decode_tokens_per_s_runs"]) == 6
    assert cell["decode_tokens_per_s"]["n"] == 6
    assert cell["decode_tokens_per_s"]["median"] == pytest.approx(np.median(cell["decode_tokens_per_s_runs"]), abs=0.01)
    assert len(list((tmp_path / "work").glob("*-round3.results.jsonl"))) == 2
    row = next(r for r in report["comparisons"] if r["cell"] == "p8-n8-b1-t1-T1")
    by_round = [a / b for a, b in zip(cell["decode_tokens_per_s_by_round"],
                                      ar["cells"]["p8-n8-b1-t1-T1"]["decode_tokens_per_s_by_round"])]
    assert row["ratio_by_round"] == pytest.approx(by_round, abs=1e-3)
    assert row["ratio"] == pytest.approx(float(np.median(by_round)), abs=1e-3)


def test_pooling_keeps_a_later_rounds_failure():
    ok = {"status": "ok", "reason": None, "cells": {}}
    pooled = harness.pool_rounds([ok, {"status": "failed", "reason": "worker exited with code 1", "cells": {}}])
    assert pooled["status"] == "failed" and "code 1" in pooled["reason"]


def test_cells_that_do_not_fit_the_context_are_reported_as_skipped(random_packages, tmp_path):
    matrix = {**TINY_MATRIX, "prompt_lengths": "40", "new_tokens": "32", "batch_sizes": "1", "temperatures": "1"}
    report = harness.run_bench(packages=[random_packages["calm"], random_packages["ar"]], out=tmp_path / "b.json",
                               work_dir=tmp_path / "work", repeats=1, warmup=0, matrix_options=matrix, progress=False)
    calm, ar = report["runners"]
    assert "decode_tokens_per_s" in calm["cells"]["p40-n32-b1-t1-T1"]  # 10 + 8 vectors of 32
    assert "do not fit" in ar["cells"]["p40-n32-b1-t1-T1"]["skipped"]  # 72 tokens of 64
    assert "skipped" in (tmp_path / "b.csv").read_text()


def test_a_peer_that_cannot_be_imported_is_reported_not_dropped(random_packages, tmp_path, monkeypatch):
    # Shadow both peers' modules with ones that fail to import, in the workers' environment.
    fake = tmp_path / "fake"
    for module in ("optimum/onnxruntime", "onnxruntime_genai"):
        (fake / module).mkdir(parents=True)
        (fake / module / "__init__.py").write_text("raise ImportError('blocked by the test')\n")
    (fake / "optimum" / "__init__.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")]))
    matrix = {**TINY_MATRIX, "batch_sizes": "1", "temperatures": "1"}
    report = harness.run_bench(packages=[random_packages["calm"]], peers=["optimum", "ort-genai"],
                               hf=random_packages["hf"], out=tmp_path / "p.json", work_dir=tmp_path / "work",
                               repeats=1, warmup=0, matrix_options=matrix, progress=False)
    peers = {r["name"]: r for r in report["runners"][1:]}
    assert set(peers) == {"optimum", "onnxruntime-genai"}
    for peer in peers.values():
        assert peer["status"] == "unavailable" and "blocked by the test" in peer["reason"] and "pip install" in peer["reason"]
        assert peer["versions"]  # what is installed is reported even so
    notes = [r["note"] for r in report["comparisons"] if r["ratio"] is None]
    assert len(notes) == 2 and all("unavailable" in n for n in notes)
    csv_text = (tmp_path / "p.csv").read_text()
    assert csv_text.count("unavailable") == 2


@pytest.mark.skipif(os.environ.get("CALM_EDGE_PEER_TESTS") != "1",
                    reason="converting with optimum and onnxruntime-genai takes minutes; set CALM_EDGE_PEER_TESTS=1")
def test_peers_run_on_the_same_prompts(random_packages, tmp_path):
    matrix = {**TINY_MATRIX, "temperatures": "1"}
    report = harness.run_bench(packages=[random_packages["ar"]], peers=["optimum", "ort-genai"],
                               hf=random_packages["hf"], out=tmp_path / "peers.json", work_dir=tmp_path / "work",
                               repeats=1, warmup=0, matrix_options=matrix, progress=False)
    for runner in report["runners"]:
        assert runner["status"] == "ok", runner["reason"]
        for cell in runner["cells"].values():
            assert cell["new_tokens_per_sequence"] == 8, (runner["name"], cell)


def test_bad_input_is_a_clear_error(random_packages, tmp_path):
    runner = CliRunner()
    base = ["bench", "--package", str(random_packages["calm"]), "--out", str(tmp_path / "x.json")]
    cases = {("--temperatures", "0.3"): "not 1/n", ("--batch-sizes", "1,zero"): "--batch-sizes",
             ("--peer", "optimum"): "--hf DIR",
             ("--hf", str(tmp_path), "--peer", "optimum"): "not a Hugging Face folder"}
    for extra, message in cases.items():
        result = runner.invoke(main, [*base, *extra])
        assert result.exit_code == 1 and message in result.output, (extra, result.output)
    result = runner.invoke(main, [*base, "--repeats", "0"])  # out of the option's range: a usage error
    assert result.exit_code == 2 and "'--repeats'" in result.output, result.output
    result = runner.invoke(main, ["bench", "--package", str(tmp_path / "none"), "--out", str(tmp_path / "x.json")])
    assert result.exit_code == 1 and "does not exist" in result.output
    with pytest.raises(CalmEdgeError, match="nothing to measure"):
        harness.run_bench(out=tmp_path / "y.json")


def test_cell_summary_from_traces():
    cell = Cell(prompt_tokens=8, new_tokens=12, batch=2, threads=1, temperature=1.0)
    traces = [Trace(total_s=0.5, ttft_s=0.2, prefill_s=0.15, step_s=[0.1, 0.2], tokens_per_step=4, new_tokens=12,
                    graphs_s={"backbone": 0.2, "energy_head": 0.05, "decoder": 0.02})] * 3
    result = worker.summarize_cell(cell, traces)
    assert result["step_ms"]["median"] == pytest.approx(150.0) and result["token_ms"]["median"] == pytest.approx(37.5)
    assert result["decode_tokens_per_s"]["median"] == pytest.approx(2 * 8 / 0.3, rel=1e-3)  # tokens after the first step
    assert result["end_to_end_tokens_per_s"]["median"] == pytest.approx(2 * 12 / 0.5)
    assert result["per_step_split_ms"] == {"backbone": 100.0, "energy_head": 25.0, "decoder": 10.0, "loop_overhead": 15.0}
    assert stats.summarize([1, 2, 3, 4, 100])["p90"] == pytest.approx(61.6)


def test_padded_tokenizer_encodes_text_as_before(tokenizer_dir, tmp_path):
    from calm_edge.export.random_weights import pad_tokenizer
    from calm_edge.tokenizer import Tokenizer

    before = Tokenizer(tokenizer_dir)
    assert pad_tokenizer(before.path, tmp_path / "t.model", 2048) == 2048 - before.vocab_size
    after = Tokenizer(tmp_path / "t.model")
    text = "In the beginning <unused_700> was the Word, 1204 café 東京."
    assert after.vocab_size == 2048 and after.encode(text) == before.encode(text)
    with pytest.raises(CalmEdgeError, match="more than the config's vocab_size"):
        pad_tokenizer(before.path, tmp_path / "u.model", 300)
