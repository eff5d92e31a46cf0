"""Quantization of model packages, evaluation through the deployed graphs, and the comparison table."""
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from calm_edge.cli import main
from calm_edge.errors import CalmEdgeError
from calm_edge.evaluation.language_model import evaluate_checkpoint, evaluate_package
from calm_edge.evaluation.settings import EvalSettings
from calm_edge.export.quantize import quantize_package
from calm_edge.export.quantizers import MODES
from calm_edge.runtime import package
from calm_edge.runtime.generator import GeneratorParams
from calm_edge.runtime.model import Model
from calm_edge.runtime.text_generation import generate
from calm_edge.text_source import TextSource

# Few positions keep the tests fast; the estimator's error at this size is stated where used.
POSITIONS = dict(context=32, stride=16, max_positions=64)


@pytest.fixture(scope="module")
def quantized(packages, corpus_jsonl, tmp_path_factory):
    """{(kind, mode): package folder} for both kinds in every mode."""
    root = tmp_path_factory.mktemp("quantized")
    out = {}
    for kind in ("calm", "ar"):
        for mode in MODES:
            out[kind, mode] = root / f"{kind}-{mode}"
            quantize_package(packages[kind], out[kind, mode], mode, calibration_data=[corpus_jsonl],
                             calibration_windows=4, progress=False)
    return out


@pytest.mark.parametrize("kind", ["calm", "ar"])
@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_gives_a_package_that_loads_and_generates(quantized, packages, kind, mode):
    folder = quantized[kind, mode]
    manifest = package.read_manifest(folder)
    fp32 = package.read_manifest(packages[kind])
    assert manifest["quantization"]["mode"] == mode
    assert manifest["quantization"]["graphs"] == {name: mode for name in fp32["graphs"]}
    # The signature is the format's: quantization changes no input or output.
    for name, graph in manifest["graphs"].items():
        assert graph["inputs"] == fp32["graphs"][name]["inputs"]
        assert graph["outputs"] == fp32["graphs"][name]["outputs"]
    validation = manifest["validation"]
    assert set(validation["graphs"]) == set(fp32["graphs"])
    for outputs in validation["graphs"].values():
        for result in outputs.values():
            assert np.isfinite(list(result.values())).all()
    assert validation["generation"]["tokens"] == 3 * 32
    result = generate(Model(folder), "In the beginning", GeneratorParams(max_new_tokens=16, seed=1, stop_at_eos=False))
    assert len(result.token_ids) == 16 and result.text


def test_weight_modes_shrink_the_graphs(quantized, packages):
    fp32 = package.read_manifest(packages["calm"])["graphs"]["backbone"]["bytes"]
    # The int8 modes leave the float32 token embedding (a Gather), a large part of a tiny backbone.
    for mode, at_most in (("int8-dynamic", 0.65), ("int4", 0.35), ("fp16", 0.65)):
        assert package.read_manifest(quantized["calm", mode])["graphs"]["backbone"]["bytes"] < at_most * fp32, mode


@pytest.mark.parametrize("kind, graph", [("calm", "backbone"), ("ar", "ar")])
def test_int4_quantizes_the_embedding_table(quantized, kind, graph):
    """int4 leaves no float32 weight behind a Gather: the embedding becomes a GatherBlockQuantized
    whose 4-bit rows the graph reads, in an opset-21 graph that ONNX Runtime loads."""
    import onnx

    model = onnx.load(quantized[kind, "int4"] / package.read_manifest(quantized[kind, "int4"])["graphs"][graph]["file"])
    weights = {init.name: init for init in model.graph.initializer}
    ops = [node.op_type for node in model.graph.node]
    assert "GatherBlockQuantized" in ops and "MatMulNBits" in ops
    float_tables = [node.name for node in model.graph.node if node.op_type == "Gather" and node.input[0] in weights
                    and weights[node.input[0]].data_type == onnx.TensorProto.FLOAT]
    assert float_tables == []
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 21


def test_int8_static_records_its_calibration(quantized):
    quantization = package.read_manifest(quantized["calm", "int8-static"])["quantization"]
    calibration = quantization["calibration"]
    assert calibration["windows"] == 4 and calibration["window_tokens"] == 64
    # Backbone: a prefill and 8 decode steps per window; head and decoder: one feed per backbone call.
    assert calibration["feeds"] == {"backbone": 36, "energy_head": 36, "decoder": 36, "decoder_head": 36}
    assert quantization["settings"]["backbone"]["format"] == "QDQ"


def test_keep_fp32_leaves_a_graph_as_it_was(packages, corpus_jsonl, tmp_path):
    out = tmp_path / "calm-int8-fp32-decoder"
    manifest = quantize_package(packages["calm"], out, "int8-dynamic", keep_fp32=["decoder"], progress=False)
    assert manifest["quantization"]["graphs"] == {"backbone": "int8-dynamic", "energy_head": "int8-dynamic",
                                                  "decoder": "fp32", "decoder_head": "int8-dynamic"}
    assert (out / "decoder.onnx").read_bytes() == (packages["calm"] / "decoder.onnx").read_bytes()
    assert set(manifest["validation"]["graphs"]) == {"backbone", "energy_head", "decoder_head"}
    # int8-dynamic scales the head's activations over a whole call: the runtime must not send it a subset.
    assert not manifest.decoder_head_rows_independent


def test_bad_requests_give_clear_errors_and_keep_the_old_package(packages, quantized, tmp_path):
    with pytest.raises(CalmEdgeError, match="unknown quantization mode 'int3'; choose one of: int8-dynamic"):
        quantize_package(packages["calm"], tmp_path / "x", "int3")
    with pytest.raises(CalmEdgeError, match="already quantized \\(int4\\); quantize the fp32 package"):
        quantize_package(quantized["ar", "int4"], tmp_path / "x", "int8-dynamic")
    with pytest.raises(CalmEdgeError, match="--keep-fp32 encoder: no such graph.*backbone, energy_head, decoder"):
        quantize_package(packages["calm"], tmp_path / "x", "fp16", keep_fp32=["encoder"])
    with pytest.raises(CalmEdgeError, match="nothing left to quantize"):
        quantize_package(packages["ar"], tmp_path / "x", "fp16", keep_fp32=["ar"])
    with pytest.raises(CalmEdgeError, match="int8-static calibrates on real text; pass --calibration-data"):
        quantize_package(packages["ar"], tmp_path / "x", "int8-static")
    with pytest.raises(CalmEdgeError, match="not a calm-edge model package"):
        quantize_package(tmp_path, tmp_path / "x", "fp16")
    with pytest.raises(CalmEdgeError, match="is the input --package"):
        quantize_package(packages["ar"], packages["ar"], "fp16", force=True)
    assert not (tmp_path / "x").exists()

    out = tmp_path / "pkg"
    shutil.copytree(quantized["ar", "fp16"], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(CalmEdgeError, match="already exists; choose another --out or pass --force"):
        quantize_package(packages["ar"], out, "int4")
    with pytest.raises(CalmEdgeError, match="calibrates on real text"):
        quantize_package(packages["ar"], out, "int8-static", force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


@pytest.mark.parametrize("kind", ["calm", "ar"])
def test_brierlm_through_the_package_agrees_with_pytorch(packages, trained_runs, corpus_jsonl, kind):
    """Same positions, seed and random streams, and graphs that compute what the PyTorch modules
    do: the two estimates draw (nearly) the same samples, and differ only where float rounding
    flips a draw. Sampling error of the estimator: each position's estimate lies in [-1, 1], so a
    Brier-n mean over 64 positions has a standard error of at most 1/sqrt(64) = 0.125. (The
    measured standard error of these tiny models, whose estimates are mostly 0, is far smaller and
    finer than one flipped sample, 2/64, so it is not the yardstick.) We require the difference
    to lie within that error, at least 95% of the sampled continuations to be identical, and each
    Brier-n to differ by no more than the non-identical positions can explain (2/64 each)."""
    drawn_runtime, drawn_reference = [], []
    text, settings = TextSource((corpus_jsonl,)), EvalSettings(**POSITIONS)
    runtime = evaluate_package(Model(packages[kind]), text, settings, progress=False, samples=drawn_runtime)
    reference = evaluate_checkpoint(trained_runs[kind], text, settings, progress=False, samples=drawn_reference)
    assert runtime["positions"] == reference["positions"]
    positions = runtime["by_offset"]["0"]["positions"]["1"]
    assert positions == POSITIONS["max_positions"] == len(drawn_runtime) == len(drawn_reference)
    differing = sum(a != b for a, b in zip(drawn_runtime, drawn_reference))
    assert differing <= 0.05 * positions
    for n in (1, 2, 3, 4):
        gap = abs(runtime[f"brier_{n}"] - reference[f"brier_{n}"])
        assert gap <= 1 / positions ** 0.5, n
        assert gap <= 2 * differing / positions + 1e-12, n


def test_eval_package_command_with_reconstruction(packages, quantized, trained_runs, corpus_jsonl, tmp_path):
    from calm_edge.evaluation.autoencoder import evaluate_autoencoder

    runner = CliRunner()
    out = tmp_path / "calm.json"
    args = ["--data", str(corpus_jsonl), "--max-positions", "16", "--reconstruction-tokens", "4000"]
    result = runner.invoke(main, ["-q", "eval", "package", "--package", str(packages["calm"]), *args,
                                  "--autoencoder", str(trained_runs["ae"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["kind"] == "calm" and report["quantization"] == "fp32" and "BrierLM" in result.stdout
    # The fp32 decoder graph reconstructs what the PyTorch decoder does.
    torch_ae = evaluate_autoencoder(trained_runs["ae"], TextSource((corpus_jsonl,)), max_tokens=4000, noise_scales=())
    assert report["reconstruction"]["token_accuracy"] == pytest.approx(torch_ae["token_accuracy"], abs=1e-3)
    assert report["reconstruction"]["tokens_evaluated"] == torch_ae["tokens_evaluated"]

    # Without --autoencoder the one named in the package's provenance is used (it exists here).
    default = runner.invoke(main, ["-q", "eval", "package", "--package", str(quantized["calm", "int4"]), *args])
    assert default.exit_code == 0, default.output
    assert "calm int4" in default.stdout and "reconstruction" in default.stdout

    ar = runner.invoke(main, ["-q", "eval", "package", "--package", str(quantized["ar", "int8-dynamic"]), *args])
    assert ar.exit_code == 0 and "ar int8-dynamic" in ar.stdout and "reconstruction" not in ar.stdout
    missing = runner.invoke(main, ["-q", "eval", "package", "--package", str(tmp_path), *args])
    assert missing.exit_code == 1 and "not a calm-edge model package" in missing.output
    assert "Traceback" not in missing.output


def test_quantize_command(packages, tmp_path):
    runner = CliRunner()
    out = tmp_path / "ar-int4"
    result = runner.invoke(main, ["-q", "quantize", "--package", str(packages["ar"]), "--mode", "int4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("quantized ar package") and "ar int4" in result.stdout
    again = runner.invoke(main, ["-q", "quantize", "--package", str(packages["ar"]), "--mode", "int4", "--out", str(out)])
    assert again.exit_code == 1 and "already exists" in again.output and "--force" in again.output
    bad = runner.invoke(main, ["-q", "quantize", "--package", str(packages["ar"]), "--mode", "int2", "--out", str(out)])
    assert bad.exit_code == 1 and "unknown quantization mode 'int2'" in bad.output and "Traceback" not in bad.output


def test_compare_command_writes_the_table_and_the_plot(packages, quantized, corpus_jsonl, tmp_path):
    out, png = tmp_path / "quantization.json", tmp_path / "quantization.png"
    paths = [str(packages["ar"]), str(quantized["ar", "int8-dynamic"]), str(quantized["ar", "int4"])]
    result = CliRunner().invoke(main, ["-q", "eval", "compare", *paths, "--data", str(corpus_jsonl), "--max-positions",
                                       "16", "--speed-tokens", "16", "--speed-repeats", "1", "--out", str(out),
                                       "--plot", str(png)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [row["mode"] for row in report["rows"]] == ["fp32", "int8-dynamic", "int4"]
    reference = report["rows"][0]
    assert reference["relative_to_fp32"]["bytes"] == 1.0
    if reference["brierlm"] > 0:  # a tiny model's BrierLM can be 0 at 16 positions, and then has no ratio
        assert reference["relative_to_fp32"]["brierlm"] == pytest.approx(1.0)
    assert reference["relative_to_fp32"]["decode_speedup"] == pytest.approx(1.0)
    assert all(row["decode_tokens_per_second"] > 0 and row["bytes"] > 0 for row in report["rows"])
    # Paired with itself, fp32 draws the same everywhere; the quantized packages are paired with it.
    assert reference["paired_with_fp32"]["identical_draws"] == 1.0
    assert reference["paired_with_fp32"]["brier_1_difference"] == 0.0
    for row in report["rows"]:
        paired = row["paired_with_fp32"]
        assert paired["positions"] == 16 and 0 <= paired["identical_draws"] <= 1
        assert paired["brier_1_difference"] == pytest.approx(row["brier_1"] - reference["brier_1"])
        quality = row["quality_relative_to_fp32"]
        if reference["brierlm"] <= 0 and reference["brier_1"] > 0:
            assert quality["measure"] == "Brier-1 (paired)"
            assert quality["value"] == pytest.approx(1 + paired["brier_1_difference"] / reference["brier_1"])
    assert png.read_bytes().startswith(b"\x89PNG")
    assert "int4" in result.stdout
    alone = CliRunner().invoke(main, ["-q", "eval", "compare", str(quantized["ar", "int4"]), "--data", str(corpus_jsonl)])
    assert alone.exit_code == 1 and "no fp32 ar package among the packages" in alone.output


def test_quantize_and_eval_package_run_without_torch(packages, corpus_jsonl, tmp_path):
    """A device (no torch) can quantize a package and measure its BrierLM; only reconstruction needs torch."""
    import subprocess
    import sys

    from conftest import REPO

    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from click.testing import CliRunner\n"
        "from calm_edge.cli import main\n"
        f"pkg, out, data = {str(packages['ar'])!r}, {str(tmp_path / 'ar-int8')!r}, {str(corpus_jsonl)!r}\n"
        "r = CliRunner().invoke(main, ['-q', 'quantize', '--package', pkg, '--mode', 'int8-dynamic', '--out', out])\n"
        "assert r.exit_code == 0, r.output\n"
        "r = CliRunner().invoke(main, ['-q', 'eval', 'package', '--package', out, '--data', data, '--max-positions', '8'])\n"
        "assert r.exit_code == 0, r.output\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print(r.stdout)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "ar int8-dynamic" in result.stdout and "BrierLM" in result.stdout
