"""Export to the model package and the torch-free runtime over it."""
import json
import threading

import pytest

from calm_edge.errors import CalmEdgeError
from calm_edge.export.exporter import export_package
from calm_edge.export.reference import generate as reference_generate
from calm_edge.runtime import package
from calm_edge.runtime.generator import GeneratorParams, generate_tokens
from calm_edge.runtime.model import Model, available_providers, tensorrt_options
from calm_edge.runtime.text_generation import generate, stream
from calm_edge.training.language_models import load_language_model


def test_packages_hold_the_graphs_and_a_complete_manifest(packages):
    calm = json.loads((packages["calm"] / "manifest.json").read_text())
    assert sorted(p.name for p in packages["calm"].iterdir()) == [
        "backbone.onnx", "decoder.onnx", "decoder_head.onnx", "energy_head.onnx", "manifest.json", "tokenizer.model"]
    assert sorted(p.name for p in packages["ar"].iterdir()) == ["ar.onnx", "manifest.json", "tokenizer.model"]
    assert calm["format_version"] == 3 and calm["kind"] == "calm"  # the split decoder is version 3's
    assert json.loads((packages["ar"] / "manifest.json").read_text())["format_version"] == package.FORMAT_VERSION
    assert calm["model"]["chunk_size"] == 4 and calm["model"]["special_ids"]["eos"] == 2
    backbone = calm["graphs"]["backbone"]
    assert [i["name"] for i in backbone["inputs"][:4]] == ["input_ids", "attention_mask", "position_ids",
                                                          "past_key_values.0.key"]
    assert backbone["outputs"][0]["name"] == "hidden" and len(backbone["sha256"]) == 64
    assert calm["model"]["decoder_layout"] == "split" and calm["model"]["decoder_hidden_size"] == 64
    assert calm["graphs"]["decoder"]["outputs"] == [{"name": "decoder_states", "dtype": "float32",
                                                     "shape": ["rows", 4, 64]}]
    assert calm["graphs"]["decoder_head"]["outputs"] == [{"name": "token_ids", "dtype": "int64", "shape": ["tokens"]}]
    assert calm["provenance"]["step"] == 300 and "parameters" in calm["provenance"]
    assert calm["quantization"]["mode"] == "fp32"


def test_validation_figures_are_recorded(packages):
    for kind in ("calm", "ar"):
        validation = packages["manifests"][kind]["validation"]
        for graph, cases in validation["graphs"].items():
            assert {"random"} < set(cases)  # random and real inputs
            for outputs in cases.values():
                for result in outputs.values():
                    assert result["ok"]
                    assert result.get("max_abs_diff", 0.0) <= 1e-4 * 50
        for run in validation["end_to_end"].values():
            assert run["equal"] and run["tokens"] == 3 * 64 and run["identical_tokens"] == run["tokens"]


@pytest.mark.parametrize("kind", ["calm", "ar"])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_runtime_equals_the_pytorch_reference_token_for_token(packages, trained_runs, kind, temperature):
    model, _ = load_language_model(trained_runs[kind])
    runtime = Model(packages[kind])
    prompts = [runtime.tokenizer.encode(t) for t in ("In the beginning", "And he said unto them,", "The")]
    settings = GeneratorParams(max_new_tokens=64, temperature=temperature, seed=11, stop_at_eos=False)
    assert generate_tokens(runtime, prompts, settings) == reference_generate(model, prompts, settings)


def test_batched_equals_one_by_one_and_streaming_equals_whole(packages):
    runtime = Model(packages["calm"])
    prompts = ["In the beginning", "And the LORD spake", "Behold"]
    params = GeneratorParams(max_new_tokens=32, seed=4, stop_at_eos=False)
    together = generate(runtime, prompts, params)
    alone = [generate(runtime, [p], GeneratorParams(max_new_tokens=32, seed=4, stop_at_eos=False, streams=[i]))[0]
             for i, p in enumerate(prompts)]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert "".join(stream(runtime, prompts[0], params)) == together[0].text
    assert together[0].text == runtime.tokenizer.decode(together[0].token_ids)


def test_thread_spinning_policies_are_session_settings(packages):
    """Spinning changes where the CPU waits, never what is computed; "run" is the default."""
    models = {policy: Model(packages["calm"], threads=2, **({} if policy == "run" else {"spinning": policy}))
              for policy in ("off", "run", "on")}
    expected = {"off": ("0", None), "run": ("1", "1"), "on": ("1", None)}

    def entry(options, key):
        try:
            return options.get_session_config_entry(key)
        except RuntimeError:  # onnxruntime's way of saying the key is not set
            return None

    for policy, model in models.items():
        for session in model.sessions.values():
            options = session.get_session_options()
            entries = tuple(entry(options, key) for key in ("session.intra_op.allow_spinning", "session.force_spinning_stop"))
            assert entries == expected[policy], policy
    params = GeneratorParams(max_new_tokens=16, seed=2, stop_at_eos=False)
    tokens = {policy: generate(model, "In the beginning", params).token_ids for policy, model in models.items()}
    assert tokens["off"] == tokens["run"] == tokens["on"]
    with pytest.raises(CalmEdgeError, match="spinning='sometimes': choose one of off, run, on"):
        Model(packages["calm"], spinning="sometimes")


def test_one_model_serves_four_threads(packages):
    runtime = Model(packages["calm"], threads=1)
    prompts = [f"Prompt number {i} says" for i in range(4)]
    expected = [generate(runtime, p, GeneratorParams(max_new_tokens=24, seed=i)).token_ids for i, p in enumerate(prompts)]
    results = [None] * 4

    def work(i):
        results[i] = generate(runtime, prompts[i], GeneratorParams(max_new_tokens=24, seed=i)).token_ids

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == expected


def test_stop_sequences_cut_the_text(packages):
    runtime = Model(packages["ar"])
    free = generate(runtime, "In the beginning", GeneratorParams(max_new_tokens=40, seed=2, stop_at_eos=False))
    stop = free.text[5:8]
    cut = generate(runtime, "In the beginning", GeneratorParams(max_new_tokens=40, seed=2, stop_at_eos=False,
                                                               stop_sequences=(stop,)))
    assert cut.stopped_by == "stop_sequence" and cut.text == free.text[:free.text.find(stop)]


def test_bad_packages_and_inputs(packages, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(packages["calm"], broken)
    with open(broken / "decoder.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(CalmEdgeError, match="decoder.onnx .* does not match the sha256"):
        Model(broken)
    (broken / "tokenizer.model").unlink()
    with pytest.raises(CalmEdgeError, match="tokenizer.model .* is missing"):
        Model(broken)
    newer = tmp_path / "newer"
    shutil.copytree(packages["ar"], newer)
    manifest = json.loads((newer / "manifest.json").read_text())
    manifest["format_version"] = 99
    (newer / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CalmEdgeError, match="format version 99, newer than this calm-edge reads"):
        Model(newer)
    with pytest.raises(CalmEdgeError, match="not a calm-edge model package"):
        Model(tmp_path)

    runtime = Model(packages["calm"])
    with pytest.raises(CalmEdgeError, match="prompt 0 is empty"):
        generate(runtime, "", GeneratorParams())
    with pytest.raises(CalmEdgeError, match="context holds 64"):
        generate(runtime, "word " * 400, GeneratorParams())
    with pytest.raises(CalmEdgeError, match="0.3 is not 1/n"):
        generate(runtime, "Hello", GeneratorParams(temperature=0.3))


def test_unavailable_provider_lists_the_available_ones(packages):
    assert "cpu" in available_providers()
    with pytest.raises(CalmEdgeError, match=r"provider 'tensorrt' is not available .*available: cpu"):
        Model(packages["calm"], provider="tensorrt")
    with pytest.raises(CalmEdgeError, match="unknown provider 'tpu'"):
        Model(packages["calm"], provider="tpu")


def test_tensorrt_options_cover_the_dynamic_axes(packages):
    manifest = package.Manifest.read(packages["calm"])
    options = tensorrt_options(manifest, "/tmp/engines", max_batch=16)
    backbone = options["backbone"]
    assert backbone["trt_fp16_enable"] and backbone["trt_engine_cache_enable"]
    assert backbone["trt_engine_cache_path"] == "/tmp/engines/backbone"
    assert "input_ids:1x4" in backbone["trt_profile_min_shapes"]
    assert "past_key_values.0.key:1x2x0x16" in backbone["trt_profile_min_shapes"]
    assert "input_ids:16x256" in backbone["trt_profile_max_shapes"]  # 64 chunks of K = 4
    assert "noise:1x1x16" in options["energy_head"]["trt_profile_min_shapes"]


def test_failed_export_leaves_the_old_package_intact(packages, trained_runs, tmp_path):
    import shutil

    out = tmp_path / "pkg"
    shutil.copytree(packages["ar"], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(CalmEdgeError, match="already exists.*--force"):
        export_package(trained_runs["ar"], out)
    with pytest.raises(CalmEdgeError, match="not a language model"):
        export_package(trained_runs["ae"], out, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


@pytest.mark.parametrize("kind", ["calm", "ar"])
def test_fused_attention_export_computes_what_the_plain_one_does(packages, fused_packages, kind):
    """`--fused-attention`: one GroupQueryAttention and two RotaryEmbedding nodes per layer, the same
    package signature, and the same tokens as the plain package, also for a left-padded batch (the mask rides in the
    node's attention_bias)."""
    import onnx

    manifest = fused_packages["manifests"][kind]
    assert manifest["validation"]["graph_optimisation"]["fused_attention"] is True
    step = "backbone" if kind == "calm" else "ar"
    assert set(manifest["validation"]["graphs"][step]) >= {"random", "random-batch"}
    plain = packages["manifests"][kind]
    assert manifest["graphs"][step]["inputs"] == plain["graphs"][step]["inputs"]
    assert manifest["graphs"][step]["outputs"] == plain["graphs"][step]["outputs"]
    graph = onnx.load(fused_packages[kind] / manifest["graphs"][step]["file"])
    ops = [node.op_type for node in graph.graph.node]
    assert ops.count("GroupQueryAttention") == manifest["model"]["num_layers"] and "Tile" not in ops
    assert ops.count("RotaryEmbedding") == 2 * manifest["model"]["num_layers"] and "Neg" not in ops
    assert all(node.input[10] and not any(node.input[7:10]) for node in graph.graph.node
               if node.op_type == "GroupQueryAttention")  # the bias in its own slot, cos/sin/positions unused

    prompts = ["In the beginning God created", "And", "Behold, the LORD"]  # different lengths: left padding
    for temperature in (1.0, 0.5):
        params = GeneratorParams(max_new_tokens=16, temperature=temperature, seed=5, stop_at_eos=False)
        fused = generate(Model(fused_packages[kind]), prompts, params)
        reference = generate(Model(packages[kind]), prompts, params)
        assert [r.token_ids for r in fused] == [r.token_ids for r in reference]
