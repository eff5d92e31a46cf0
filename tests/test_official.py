"""The released CALM models brought in: checkpoints in the official format (written here, with random
weights of tiny dimensions and the real Llama-3 tokenizer) imported, exported, run and compared with
the official computation (tests/official_calm.py)."""
import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import official_calm as official
from conftest import SHARED_DATA
from calm_edge.cli import main
from calm_edge.errors import CalmEdgeError
from calm_edge.export.reference import TorchModel
from calm_edge.training.official import import_official, load_weights

LLAMA3 = SHARED_DATA / "llama3-tokenizer"
pytestmark = pytest.mark.skipif(not (LLAMA3 / "tokenizer.json").is_file(), reason="needs ../shared/data")


@pytest.fixture(scope="session")
def imported(released, tmp_path_factory):
    out = tmp_path_factory.mktemp("imported") / "calm-tiny"
    import_official(released["calm"], released["ae"], LLAMA3, out=out)
    return out


def test_the_official_checkpoint_holds_what_the_official_code_saves(released):
    tensors = load_weights(released["calm"], "CALM model")
    assert {"ae_model.decoder.lm_head_weight", "generative_head.noise_embd.weight", "mlp_generator.noise_embd.weight",
            "embed_proj.3.bias", "transformer.layers.1.self_attn.k_proj.weight"} <= set(tensors)


def test_import_without_the_autoencoder_names_the_missing_folder_and_the_option(released, tmp_path):
    with pytest.raises(CalmEdgeError, match=r"/mnt/train/.*does not exist here; pass --autoencoder"):
        import_official(released["calm"], None, LLAMA3, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    result = CliRunner().invoke(main, ["-q", "import", "--calm", str(released["calm"]), "--tokenizer", str(LLAMA3),
                                       "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and "--autoencoder" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("key, value", [("patch_size", 2), ("latent_size", 8), ("vocab_size", 128300)])
def test_a_mismatched_autoencoder_is_refused_before_any_work(released, tmp_path, key, value):
    other = tmp_path / "other-ae"
    shutil.copytree(released["ae"], other)
    (other / "config.json").write_text(json.dumps(official.ae_config(**{key: value})))
    (other / "pytorch_model.bin").write_bytes(b"not read: the configs disagree first")
    with pytest.raises(CalmEdgeError, match=f"autoencoder {other}.* has {key} {value}"):
        import_official(released["calm"], other, LLAMA3, out=tmp_path / "run")


def test_a_bin_holding_anything_but_tensors_is_refused(released, tmp_path):
    hostile = tmp_path / "hostile"
    shutil.copytree(released["calm"], hostile)

    class Payload:
        def __reduce__(self):
            return (print, ("unpickled!",))

    with open(hostile / "pytorch_model.bin", "wb") as f:
        pickle.dump({"transformer.embed_tokens.weight": Payload()}, f)
    with pytest.raises(CalmEdgeError, match="holds something other than tensors.*refused"):
        import_official(hostile, released["ae"], LLAMA3, out=tmp_path / "run")
    torch.save({"transformer.norm.weight": torch.ones(3), "step": 7}, hostile / "pytorch_model.bin")
    with pytest.raises(CalmEdgeError, match="not a state dict of named tensors"):
        import_official(hostile, released["ae"], LLAMA3, out=tmp_path / "run")


@pytest.mark.parametrize("form", ["safetensors", "sharded"])
def test_safetensors_and_sharded_checkpoints_import_to_the_same_weights(released, imported, tmp_path, form):
    ae, calm = released["modules"]
    folder = official.save(calm.state_dict(), official.calm_config(), tmp_path / form, form=form)
    ae_folder = official.save(ae.state_dict(), official.ae_config(), tmp_path / f"ae-{form}", form=form)
    if form == "safetensors":  # a CALM file without the autoencoder: its weights come from the autoencoder folder
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(folder / "model.safetensors"))
        save_file({k: v for k, v in tensors.items() if not k.startswith("ae_model.")}, str(folder / "model.safetensors"))
    import_official(folder, ae_folder, LLAMA3, out=tmp_path / "run")
    ours = TorchModel.load(tmp_path / "run").module.state_dict()
    reference = TorchModel.load(imported).module.state_dict()
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], reference[k]) for k in ours)


def test_the_imported_model_computes_what_the_official_one_does(released, imported):
    ae, calm = released["modules"]
    model = TorchModel.load(imported)
    assert model.prompt_fill == "right-pad" and model.tokenizer.kind == "hf-bpe" and model.tokenizer.pad_id == 128256
    ids = torch.randint(0, official.VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = calm.hidden_states(ids)
        hidden, _ = model.module.hidden_states(ids)
        assert torch.allclose(hidden, reference, rtol=1e-4, atol=1e-4 * reference.abs().max())
        noise = torch.rand(2, 8, 3, official.CALM_DIMS["noise_size"], generator=torch.Generator().manual_seed(2))
        expected = calm.mlp_generator.sample(reference[:, :8, None].expand(-1, -1, 3, -1), noise - 0.5)
        latents = model.module.sample_latents(hidden[:, :8], noise)
        assert torch.allclose(latents, expected, rtol=1e-4, atol=1e-4 * expected.abs().max())
        flat = expected.reshape(-1, expected.shape[-1])
        assert torch.equal(model.module.decode_tokens(flat), ae.decode_tokens(flat))
        mean = ae.encoder(ids)[..., :official.AE_DIMS["latent_size"]]
        ours, _ = model.module.autoencoder.encode(ids.reshape(2, -1, 4))
        assert torch.allclose(ours, mean, rtol=1e-4, atol=1e-4 * mean.abs().max())


def test_the_import_cli_and_the_run_folder(released, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["-q", "import", "--calm", str(released["calm"]), "--autoencoder",
                                       str(released["ae"]), "--tokenizer", str(LLAMA3), "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "import.json").read_text())
    assert summary["sources"]["calm"]["sha256"]["pytorch_model.bin"]
    config = json.loads(next((out / "checkpoints").iterdir()).joinpath("config.json").read_text())
    assert config["calm"]["energy_head"] == "official" and config["autoencoder"]["num_encoder_layers"] == 1
    assert (out / "autoencoder" / "checkpoints").is_dir()
    again = CliRunner().invoke(main, ["-q", "import", "--calm", str(released["calm"]), "--autoencoder",
                                      str(released["ae"]), "--tokenizer", str(LLAMA3), "--out", str(out)])
    assert again.exit_code == 1 and "--force" in again.output


def test_hub_ids_resolve_through_the_cache_and_never_the_network(released, tmp_path, monkeypatch):
    """A pre-populated Hugging Face cache folder, HF_HUB_OFFLINE=1: ids resolve to the cached snapshots."""
    cache = tmp_path / "hub"
    for repo, folder in (("cccczshao/CALM-tiny", released["calm"]), ("cccczshao/CALM-Autoencoder", released["ae"])):
        base = cache / f"models--{repo.replace('/', '--')}"
        shutil.copytree(folder, base / "snapshots" / ("0" * 40))
        (base / "refs").mkdir()
        (base / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    summary = import_official("cccczshao/CALM-tiny", "cccczshao/CALM-Autoencoder", LLAMA3, out=tmp_path / "run")
    assert summary["sources"]["calm"]["folder"].startswith(str(cache))
    with pytest.raises(CalmEdgeError, match="cccczshao/CALM-XL cannot be fetched.*huggingface-cli download"):
        import_official("cccczshao/CALM-XL", "cccczshao/CALM-Autoencoder", LLAMA3, out=tmp_path / "other")


@pytest.fixture(scope="session")
def official_package(imported, tmp_path_factory):
    from calm_edge.export.exporter import export_package

    out = tmp_path_factory.mktemp("official-package") / "calm-tiny"
    export_package(imported, out, progress=False, e2e_prompts=2, e2e_tokens=24)
    return out


def test_the_package_is_format_version_3_with_the_llama3_tokenizer(official_package):
    from calm_edge.runtime.package import Manifest

    manifest = Manifest.read(official_package)  # version 2's tokenizer and prompt fill, version 3's split decoder
    assert manifest.format_version == 3 and manifest.tokenizer_kind == "hf-bpe" and manifest.add_bos
    assert manifest.decoder_layout == "split"
    assert manifest.prompt_fill == "right-pad" and manifest.tokenizer_file == "tokenizer.json"
    assert manifest.vocab_size == official.VOCAB and manifest.pad_id == official.PAD
    for run in manifest.validation["end_to_end"].values():
        assert run["equal"] and not run["sampling_ties"]


def test_each_graph_equals_the_official_computation(released, official_package):
    import onnxruntime as ort

    ae, calm = released["modules"]
    sessions = {name: ort.InferenceSession(str(official_package / f"{name}.onnx"), providers=["CPUExecutionProvider"])
                for name in ("backbone", "energy_head", "decoder", "decoder_head")}
    ids = torch.randint(0, official.VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    layers, heads = official.CALM_DIMS["num_hidden_layers"], official.CALM_DIMS["num_key_value_heads"]
    head_dim = official.CALM_DIMS["hidden_size"] // official.CALM_DIMS["num_attention_heads"]
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones((2, 6), np.int64),
             "position_ids": np.tile(np.arange(6), (2, 1)),
             **{f"past_key_values.{i}.{part}": np.zeros((2, heads, 0, head_dim), np.float32)
                for i in range(layers) for part in ("key", "value")}}
    hidden = sessions["backbone"].run(["hidden"], feeds)[0]
    with torch.no_grad():
        reference = calm.hidden_states(ids).numpy()
    assert np.abs(hidden - reference).max() <= 1e-4 * max(1.0, np.abs(reference).max())
    noise = np.random.default_rng(0).random((12, 5, official.CALM_DIMS["noise_size"]), dtype=np.float32)
    latents = sessions["energy_head"].run(None, {"hidden": reference.reshape(12, -1), "noise": noise})[0]
    with torch.no_grad():
        expected = calm.mlp_generator.sample(torch.from_numpy(reference.reshape(12, 1, -1)).expand(-1, 5, -1),
                                             torch.from_numpy(noise) - 0.5).numpy()
    assert np.abs(latents - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())
    states = sessions["decoder"].run(None, {"latents": expected.reshape(60, -1)})[0]
    tokens = sessions["decoder_head"].run(None, {"decoder_states": states.reshape(-1, states.shape[-1])})[0]
    tokens = tokens.reshape(60, -1)
    with torch.no_grad():
        assert np.array_equal(tokens, ae.decode_tokens(torch.from_numpy(expected.reshape(60, -1))).numpy())


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_generation_is_identical_in_the_reference_the_python_and_the_cpp_runtime(imported, official_package,
                                                                                  cpp_build, temperature):
    import subprocess

    from calm_edge.runtime import GeneratorParams, Model, generate_tokens

    reference, model = TorchModel.load(imported), Model(official_package, threads=1)
    for prompt in ("The history of", "Hi", "A prompt of several words, which fills its chunks"):
        ids = model.tokenizer.encode_prompt(prompt)
        assert ids[0] == official.BOS  # bos first, and the last chunk filled with pads on the right
        params = GeneratorParams(max_new_tokens=24, temperature=temperature, seed=11, stop_at_eos=False)
        python = generate_tokens(model, [ids], params)[0]
        assert python == generate_tokens(reference, [ids], params)[0]
        done = subprocess.run([str(cpp_build / "calm-edge-generate"), str(official_package), prompt, "--token-ids",
                               "--no-stop-at-eos", "--max-new-tokens", "24", "--seed", "11", "--temperature",
                               str(temperature), "--threads", "1"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert [int(t) for t in done.stdout.split()] == python


def test_prompts_are_right_padded_inside_their_last_chunk(official_package):
    from calm_edge.runtime import Generator, GeneratorParams, Model

    model = Model(official_package, threads=1)
    ids = model.tokenizer.encode_prompt("Hi")  # bos + 1 token: half a chunk
    generator = Generator(model, [ids], GeneratorParams(max_new_tokens=4))
    assert generator._prompt[0].tolist() == [[official.BOS, *ids[1:], official.PAD, official.PAD]]
    assert generator._prompt[1].tolist() == [[1]]  # the filled chunk is attended, as the official generate does


def test_the_official_protocol_gives_one_figure_in_the_reference_the_python_and_the_cpp_runtime(
        imported, official_package, cpp_build, tmp_path):
    """Random official-format weights, the official protocol on WikiText-103 test (blocks of 256 tokens here,
    8,192 in the official evaluation): the same draws at every position, so the same Brier-1..4, in all three.
    (Random weights score Brier -1: two draws that differ from each other and from the text; the draws
    themselves are what is compared.)"""
    import subprocess

    from calm_edge.evaluation.language_model import evaluate_checkpoint, evaluate_package
    from calm_edge.evaluation.settings import EvalSettings
    from calm_edge.runtime import Model
    from calm_edge.text_source import TextSource

    text = TextSource((SHARED_DATA / "wikitext103-test-doc.jsonl",))
    settings = EvalSettings(protocol="official", block_tokens=256, max_positions=300, seed=5)
    model = Model(official_package, threads=1)
    drawn_python, drawn_reference = [], []
    python = evaluate_package(model, text, settings, progress=False, samples=drawn_python)
    reference = evaluate_checkpoint(imported, text, settings, progress=False, samples=drawn_reference)
    assert drawn_python == drawn_reference and len(drawn_python) == 300
    assert python["positions"] == {"block_tokens": 256, "blocks": python["positions"]["blocks"], "scored": 300, "seed": 5}
    tokens, _ = text.load_tokens(model.tokenizer)
    assert tokens[0] == official.BOS and python["positions"]["blocks"] == len(tokens) // 256
    (tmp_path / "tokens.json").write_text(json.dumps(tokens.tolist()))
    done = subprocess.run([str(cpp_build / "official_brier"), str(official_package), str(tmp_path / "tokens.json"),
                           "256", "300", "5"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    cpp = json.loads(done.stdout)
    for n in (1, 2, 3, 4):
        assert python[f"brier_{n}"] == pytest.approx(reference[f"brier_{n}"], abs=1e-12)
        assert python[f"brier_{n}"] == pytest.approx(cpp[f"brier_{n}"], abs=1e-12)
    assert cpp["positions"] == 300 and cpp["draws"] == [[first, second] for first, second, _ in drawn_python]


def test_graphs_with_external_data_export_quantize_and_run_in_both_runtimes(imported, official_package, cpp_build,
                                                                              tmp_path):
    """The path of graphs over 2 GB, taken here by lowering the size from which weights go outside."""
    import subprocess

    from calm_edge.export.exporter import export_package
    from calm_edge.export.quantize import quantize_package
    from calm_edge.runtime import GeneratorParams, Model, generate_tokens

    manifest = export_package(imported, tmp_path / "ext", progress=False, external_data_bytes=1, e2e_prompts=1,
                              e2e_tokens=8)
    assert manifest.format_version == 3
    for name, graph in manifest.graphs.items():
        assert graph.external_data["file"] == f"{name}.onnx.data" and graph.external_data["bytes"] > graph.bytes
    assert sorted(p.name for p in (tmp_path / "ext").iterdir()) == sorted(
        ["manifest.json", "tokenizer.json"] + [f"{n}.onnx{x}" for n in manifest.graphs for x in ("", ".data")])
    params = GeneratorParams(max_new_tokens=12, seed=4, stop_at_eos=False)
    prompt = Model(official_package).tokenizer.encode_prompt("The river")
    expected = generate_tokens(Model(official_package), [prompt], params)
    assert generate_tokens(Model(tmp_path / "ext"), [prompt], params) == expected
    done = subprocess.run([str(cpp_build / "calm-edge-generate"), str(tmp_path / "ext"), "The river", "--token-ids",
                           "--no-stop-at-eos", "--max-new-tokens", "12", "--seed", "4"], capture_output=True, text=True)
    assert done.returncode == 0 and [int(t) for t in done.stdout.split()] == expected[0], done.stderr
    int4 = quantize_package(tmp_path / "ext", tmp_path / "int4", "int4", progress=False)
    assert int4.quantization_mode == "int4" and generate_tokens(Model(tmp_path / "int4"), [prompt], params)


def test_a_big_graph_takes_its_weights_from_the_model_once_each(official_package, imported, tmp_path):
    """Traced without weights, then each written straight from its tensor: the whole graph's MatMuls, no copy twice."""
    import onnx

    from calm_edge.export.exporter import export_package

    export_package(imported, tmp_path / "ext", progress=False, external_data_bytes=1, e2e_prompts=1, e2e_tokens=4)

    def weights_of_matmuls(model):
        shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
        return sorted(shapes[n.input[1]] for n in model.graph.node if n.op_type in ("MatMul", "Gemm")
                      and n.input[1] in shapes)

    for name in ("backbone", "energy_head", "decoder"):
        whole = onnx.load(str(official_package / f"{name}.onnx"))
        split = onnx.load(str(tmp_path / "ext" / f"{name}.onnx"), load_external_data=False)
        inits = {i.name for i in split.graph.initializer}
        assert not [n for n in split.graph.node if n.op_type == "Transpose" and n.input[0] in inits]
        assert weights_of_matmuls(split) == weights_of_matmuls(whole) != []
        written = sum(int({e.key: e.value for e in i.external_data}["length"]) for i in split.graph.initializer)
        assert written <= sum(len(i.raw_data) for i in whole.graph.initializer)  # nothing written twice


def test_weights_written_one_file_each_are_gathered_into_one_aligned_file(tmp_path):
    """What a tool may write (torch's exporter over 2 GB, ONNX's own save): one external file per weight."""
    import onnx
    import onnxruntime as ort

    from calm_edge.export import external_data

    path = tmp_path / "graph.onnx"
    torch.onnx.export(torch.nn.Linear(64, 32), (torch.randn(2, 64),), str(path), input_names=["x"],
                      output_names=["y"], dynamo=False)
    reference = ort.InferenceSession(str(path)).run(None, {"x": np.ones((2, 64), np.float32)})[0]
    onnx.save(onnx.load(str(path)), str(path), save_as_external_data=True, all_tensors_to_one_file=False,
              size_threshold=0)
    assert len(list(tmp_path.iterdir())) == 3  # the graph and one file per weight
    external_data.gather(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graph.onnx", "graph.onnx.data"]
    model = onnx.load(str(path), load_external_data=False)
    offsets = [int({e.key: e.value for e in t.external_data}["offset"]) for t in external_data.external_tensors(model)]
    assert all(offset % external_data.ALIGNMENT == 0 for offset in offsets)
    got = ort.InferenceSession(str(path)).run(None, {"x": np.ones((2, 64), np.float32)})[0]
    assert np.array_equal(got, reference)
