"""Hostile inputs to the options, config files, shard readers and the Python API: each is refused
before any work with one error that names the option, key or file, and nothing on disk changes.

The cases are tables: (command, bad option value) for the CLI, (corruption) for the shard
reader, (misuse) for the API. A new option or reader gets its cases by adding a row.
"""
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from calm_edge.cli import main
from calm_edge.errors import CalmEdgeError

ROOT = Path(__file__).resolve().parents[1]
CALM = ROOT / "models" / "calm-small-int4"
AR = ROOT / "models" / "ar-small-int4"


def tree_hash(*folders):
    """sha256 of every file (name and bytes) under `folders`: equal before and after means untouched."""
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                digest.update(str(path).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def generate(package, *options):
    return ["generate", "--package", str(package), *options, "Hi"]


def eval_package(package, *options):
    return ["eval", "package", "--package", str(package), "--data", "demo:bible", "--max-positions", "2", *options]


def bench(package, *options):
    return ["bench", "--package", str(package), "--out", "bench.json", "--repeats", "1", *options]


def config_show(*overrides):
    return ["config", "show", *[a for o in overrides for a in ("--set", o)]]


# (name, argv builder given tmp_path, exit code, text the one Error: line must hold)
CLI_CASES = [
    ("candidates-huge", lambda t: generate(CALM, "--candidates", "1000000", "--temperature", "0.5"), 2, "--candidates"),
    ("candidates-zero", lambda t: generate(CALM, "--candidates", "0"), 2, "--candidates"),
    ("threads-huge", lambda t: generate(CALM, "--threads", "10000"), 2, "--threads"),
    ("threads-zero", lambda t: generate(AR, "--threads", "0"), 2, "--threads"),
    ("max-new-tokens-zero", lambda t: generate(CALM, "--max-new-tokens", "0"), 2, "--max-new-tokens"),
    ("max-new-tokens-huge", lambda t: generate(AR, "--max-new-tokens", str(2**40)), 2, "--max-new-tokens"),
    ("temperature-nan", lambda t: generate(CALM, "--temperature", "nan"), 1, "temperature nan"),
    ("temperature-inf", lambda t: generate(AR, "--temperature", "inf"), 1, "temperature inf"),
    ("temperature-tiny", lambda t: generate(CALM, "--temperature", "1e-9"), 1, "temperature"),
    ("seed-negative", lambda t: generate(CALM, "--seed", "-1"), 2, "--seed"),
    ("seed-2**64", lambda t: generate(AR, "--seed", str(2**64)), 2, "--seed"),
    ("prompt-not-utf8", lambda t: ["generate", "--package", str(CALM), "Hi\udcff"], 2, "UTF-8"),
    ("path-not-utf8", lambda t: ["generate", "--package", str(t / "pkg\udcff"), "Hi"], 2, "UTF-8"),
    ("package-and-checkpoint-missing", lambda t: ["generate", "Hi"], 2, "--package"),
    ("bench-threads-huge", lambda t: bench(CALM, "--threads", "1,100000"), 1, "--threads"),
    ("bench-new-tokens-2**40", lambda t: bench(AR, "--new-tokens", str(2**40)), 1, "--new-tokens"),
    ("bench-batch-beyond-memory", lambda t: bench(CALM, "--batch-sizes", str(10**9)), 1, "--batch-sizes"),
    ("bench-candidates-huge", lambda t: bench(CALM, "--candidates", "1000000"), 2, "--candidates"),
    ("bench-seed-negative", lambda t: bench(AR, "--seed", "-1"), 2, "--seed"),
    ("eval-context-zero", lambda t: eval_package(CALM, "--context", "0"), 1, "--context"),
    ("eval-stride-zero", lambda t: eval_package(AR, "--stride", "0"), 1, "--stride"),
    ("eval-seed-negative", lambda t: eval_package(CALM, "--seed", "-1"), 2, "--seed"),
    ("lr-negative", lambda t: config_show("train_ar.lr=-1"), 1, "train_ar.lr"),
    ("lr-nan", lambda t: config_show("train_calm.lr=.nan"), 1, "train_calm.lr"),
    ("beta1-two", lambda t: config_show("train_ar.beta1=2"), 1, "train_ar.beta1"),
    ("save-every-zero", lambda t: config_show("train_autoencoder.save_every=0"), 1, "save_every"),
    ("max-steps-negative", lambda t: config_show("train_ar.max_steps=-5"), 1, "max_steps"),
    ("vocab-size-2**40", lambda t: config_show(f"tokenizer.vocab_size={2**40}"), 1, "vocab_size"),
    ("config-binary", lambda t: ["config", "show", "--config", str(t / "inputs" / "binary.yaml")], 1, "binary.yaml"),
    ("config-list", lambda t: ["config", "show", "--config", str(t / "inputs" / "list.json")], 1, "list.json"),
    ("config-not-json", lambda t: ["config", "show", "--config", str(t / "inputs" / "broken.json")], 1, "broken.json"),
    ("workers-huge", lambda t: ["data", "prepare", "--data", str(t / "inputs" / "text.txt"), "--tokenizer",
                                str(t / "inputs"), "--out", str(t / "out"), "--workers", "100000"], 2, "--workers"),
    ("resume-and-force", lambda t: ["train", "ar", "--data", str(t / "inputs"), "--out", str(t / "out"),
                                    "--resume", "--force"], 2, "--resume"),
]


def make_inputs(folder):
    folder.mkdir()
    (folder / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (folder / "list.json").write_text("[1, 2, 3]\n")
    (folder / "broken.json").write_text('{"train_ar": ')
    (folder / "text.txt").write_text("some text\n")
    return folder


def one_error_line(output, needle):
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, output
    assert needle in errors[0], output
    return errors[0]


@pytest.mark.parametrize("name,argv,code,needle", CLI_CASES, ids=[case[0] for case in CLI_CASES])
def test_cli_refuses_hostile_option(tmp_path, name, argv, code, needle):
    inputs = make_inputs(tmp_path / "inputs")
    before = tree_hash(inputs, CALM, AR)
    result = CliRunner().invoke(main, argv(tmp_path))
    assert result.exit_code == code, result.output
    one_error_line(result.output, needle)
    assert tree_hash(inputs, CALM, AR) == before
    assert not (tmp_path / "out").exists()


def test_error_after_echoed_prompt_starts_its_own_line(tmp_path, monkeypatch):
    """A failure mid-stream: the Error: line must not be glued to the streamed text (`HiError: ...`)."""
    import calm_edge.runtime.text_generation as text_generation

    def failing_stream(model, prompt, params):
        yield " there"
        raise CalmEdgeError("the stream broke")

    monkeypatch.setattr(text_generation, "stream", failing_stream)
    monkeypatch.setattr("calm_edge.runtime.stream", failing_stream)
    result = CliRunner().invoke(main, generate(CALM))
    assert result.exit_code == 1
    one_error_line(result.output, "the stream broke")


# ----- the shard reader: corruptions of a tiny prepared folder ----------------------------------


def write_shards(folder, tokens, vocab_size=300, dtype="uint16"):
    folder.mkdir()
    array = np.asarray(tokens, dtype=np.uint16)
    (folder / "train_0000.bin").write_bytes(array.tobytes())
    (folder / "valid_0000.bin").write_bytes(array.tobytes())
    split = lambda name: {"tokens": len(array), "shards": [{"file": f"{name}_0000.bin", "tokens": len(array)}]}
    index = {"format": "calm-edge-token-shards", "version": 1, "dtype": dtype,
             "tokenizer": {"vocab_size": vocab_size, "eos_id": 2, "sha256": "0" * 64},
             "splits": {"train": split("train"), "valid": split("valid")}}
    (folder / "index.json").write_text(json.dumps(index))
    return index


def edit_index(change):
    def corrupt(folder):
        index = json.loads((folder / "index.json").read_text())
        change(index)
        (folder / "index.json").write_text(json.dumps(index))
    return corrupt


# (name, corruption of the folder, text the error must hold)
SHARD_CASES = [
    ("ids-beyond-vocabulary", lambda f: (f / "train_0000.bin").write_bytes(np.full(8, 60000, np.uint16).tobytes()),
     "train_0000.bin"),
    ("dtype-float", edit_index(lambda i: i.update(dtype="float64")), "dtype"),
    ("dtype-unknown", edit_index(lambda i: i.update(dtype="no such type")), "dtype"),
    ("index-is-list", lambda f: (f / "index.json").write_text("[]"), "index.json"),
    ("index-binary", lambda f: (f / "index.json").write_bytes(b"\xff\xfe\x00garbage"), "index.json"),
    ("vocab-size-string", edit_index(lambda i: i["tokenizer"].update(vocab_size="300")), "vocab_size"),
    ("eos-outside", edit_index(lambda i: i["tokenizer"].update(eos_id=5000)), "eos_id"),
    ("splits-list", edit_index(lambda i: i.update(splits=[])), "splits"),
    ("shard-tokens-string", edit_index(lambda i: i["splits"]["train"]["shards"][0].update(tokens="8")), "splits.train"),
    ("shard-outside", edit_index(lambda i: i["splits"]["train"]["shards"][0].update(file="../x.bin")), "outside"),
]


@pytest.mark.parametrize("name,corrupt,needle", SHARD_CASES, ids=[case[0] for case in SHARD_CASES])
def test_shard_reader_refuses_corruption(tmp_path, name, corrupt, needle):
    from calm_edge.data import TokenShards

    folder = tmp_path / "shards"
    write_shards(folder, [5, 6, 7, 8, 2, 9, 10, 11])
    corrupt(folder)
    before = tree_hash(folder)
    with pytest.raises(CalmEdgeError) as error:
        shards = TokenShards(folder)
        shards.shards("train")
    assert needle in str(error.value)
    assert tree_hash(folder) == before


def test_intact_shards_still_read(tmp_path):
    from calm_edge.data import TokenShards

    write_shards(tmp_path / "shards", [5, 6, 7, 8, 2, 9, 10, 11])
    assert TokenShards(tmp_path / "shards").shards("train")[0].tolist() == [5, 6, 7, 8, 2, 9, 10, 11]


# ----- the Python API ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calm_model():
    from calm_edge.runtime import Model

    return Model(CALM, threads=1)


def api_generate(prompt="Hi", **params):
    def call(model):
        from calm_edge.runtime import generate
        from calm_edge.runtime.generator import GeneratorParams

        return generate(model, prompt, GeneratorParams(**params))
    return call


def api_model(*args, **kwargs):
    def call(model):
        from calm_edge.runtime import Model

        return Model(*args, **kwargs)
    return call


# (name, call given a loaded model, text the error must hold)
API_CASES = [
    ("prompt-none", api_generate(None), "prompts"),
    ("prompt-int-in-list", api_generate([1]), "prompt 0"),
    ("seed-float", api_generate(seed=1.5), "seed"),
    ("seed-bool", api_generate(seed=True), "seed"),
    ("seed-2**64", api_generate(seed=2**64), "seed"),
    ("seed-negative", api_generate(seed=-1), "seed"),
    ("max-new-tokens-float", api_generate(max_new_tokens=2.0), "max_new_tokens"),
    ("candidates-string", api_generate(candidates="16"), "candidates"),
    ("temperature-nan", api_generate(temperature=float("nan")), "temperature"),
    ("stop-not-strings", api_generate(stop_sequences=(1,)), "stop_sequences"),
    ("threads-string", api_model(CALM, threads="2"), "threads"),
    ("threads-huge", api_model(CALM, threads=10**6), "threads"),
    ("path-none", api_model(None), "path"),
]


@pytest.mark.parametrize("name,call,needle", API_CASES, ids=[case[0] for case in API_CASES])
def test_api_refuses_misuse(calm_model, name, call, needle):
    before = tree_hash(CALM)
    with pytest.raises(CalmEdgeError) as error:
        call(calm_model)
    assert needle in str(error.value)
    assert tree_hash(CALM) == before


def test_candidates_bounded_by_available_memory(calm_model, monkeypatch):
    """Within the hard ceiling, a request whose sampler buffers exceed the memory there is refused before it runs."""
    from calm_edge.runtime import limits

    monkeypatch.setattr(limits, "available_memory", lambda: 1 << 30)
    with pytest.raises(CalmEdgeError) as error:
        api_generate(candidates=8192, temperature=0.5)(calm_model)
    message = str(error.value)
    assert "candidates=8192" in message and "GiB" in message
    most = int(message.rsplit("at most ", 1)[1])
    assert most < 8192  # the suggestion stays within the bound
    assert api_generate(candidates=min(most, 64), temperature=0.5, max_new_tokens=4)(calm_model).token_ids


# ----- the checkpoint reader: trainer.json corruptions ------------------------------------------


# (name, trainer.json's text, text the error must hold)
TRAINER_CASES = [
    ("list", "[1, 2, 3]", "trainer.json"),
    ("string", '"step 100"', "trainer.json"),
    ("sha256-list", '{"sha256": ["a"]}', "trainer.json"),
    ("not-json", "{step: 1", "trainer.json"),
    ("binary", "\udcff", "trainer.json"),
]


@pytest.mark.parametrize("name,text,needle", TRAINER_CASES, ids=[case[0] for case in TRAINER_CASES])
def test_checkpoint_reader_refuses_bad_trainer_json(tmp_path, name, text, needle):
    pytest.importorskip("torch")
    from calm_edge.config import preset
    from calm_edge.training.checkpoint import load_checkpoint

    folder = tmp_path / "step_1"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"kind": "ar", **preset("tiny").to_dict()}))
    (folder / "trainer.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    before = tree_hash(folder)
    with pytest.raises(CalmEdgeError) as error:
        load_checkpoint(folder, "ar")
    assert needle in str(error.value)
    assert tree_hash(folder) == before


@pytest.mark.parametrize("key,value", [("step", -1), ("step", "1"), ("tokens_seen", None), ("loader", [0]),
                                       ("elapsed_seconds", True)])
def test_resume_refuses_bad_trainer_keys(tmp_path, key, value):
    pytest.importorskip("torch")
    from calm_edge.training.trainer import _check_resume_info

    info = {"step": 1, "tokens_seen": 64, "elapsed_seconds": 1.5, "loader": {"epoch": 0}, key: value}
    with pytest.raises(CalmEdgeError) as error:
        _check_resume_info(info, tmp_path)
    assert key in str(error.value)


def test_error_after_progress_bar_starts_its_own_line(monkeypatch):
    """A failure inside a loop with an open tqdm bar: the Error: line must not follow the bar on its line."""
    from tqdm import tqdm

    import calm_edge.runtime.text_generation as text_generation

    def failing_stream(model, prompt, params):
        for _ in tqdm(range(3), desc="working", mininterval=0):
            raise CalmEdgeError("the loop broke")
        yield ""

    monkeypatch.setattr(text_generation, "stream", failing_stream)
    monkeypatch.setattr("calm_edge.runtime.stream", failing_stream)
    result = CliRunner().invoke(main, generate(CALM))
    assert result.exit_code == 1
    one_error_line(result.output, "the loop broke")


def test_the_engine_bounds_its_batch_and_each_request_by_available_memory(calm_model, monkeypatch):
    """An Engine's preallocated cache, and a request whose candidates every row may draw at once, are
    refused before anything is allocated or queued when the memory there cannot hold them."""
    from calm_edge.runtime import Engine, GeneratorParams, limits

    monkeypatch.setattr(limits, "available_memory", lambda: 1 << 30)
    with pytest.raises(CalmEdgeError, match=r"max_batch=100000: 100000 rows .* ask for at most \d+ rows"):
        Engine(calm_model, max_batch=100000)
    engine = Engine(calm_model, max_batch=16)
    with pytest.raises(CalmEdgeError, match=r"candidates=8192 at T = 1/2 .* ask for at most \d+"):
        engine.add_request([5, 6, 7, 8], GeneratorParams(temperature=0.5, candidates=8192))
    assert not engine.queue
    engine.add_request([5, 6, 7, 8], GeneratorParams(temperature=0.5, candidates=16, max_new_tokens=4))
    assert len(engine.queue) == 1
