"""Shared fixtures: tiny corpora, a tiny tokenizer and tiny trained models that the tests make themselves.

Tests that train a model or build the C++ runtime are marked `slow`, by the fixtures they use
(`SLOW_FIXTURES`) or by hand where they train in their own body: `python -m pytest -m "not slow"`
runs the others in seconds, `python -m pytest -q` runs everything.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from calm_edge.config import TokenizerConfig
from calm_edge.demo_corpus import iter_bible_chapters

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
BUILD_SCRIPT = REPO / "runtime" / "cpp" / "build.sh"
BUILD_DIR = REPO / "runtime" / "cpp" / "build"

# Fixtures that train models or build C++: every test that uses one (directly or through another
# fixture) is slow.
SLOW_FIXTURES = {"trained_runs", "trained", "small_run", "cpp_build"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def corpus_jsonl(tmp_path_factory):
    """The first 120 chapters of the demo corpus (about 400 k characters) as a JSONL file."""
    path = tmp_path_factory.mktemp("corpus") / "bible.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for number, (name, text) in enumerate(iter_bible_chapters()):
            if number == 120:
                break
            f.write(json.dumps({"title": name, "text": text}) + "\n")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_jsonl):
    """A 512-piece tokenizer trained on `corpus_jsonl`."""
    from calm_edge.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer([corpus_jsonl], out, TokenizerConfig(vocab_size=512), progress=False)
    return out


@pytest.fixture(scope="session")
def ae_shards(tmp_path_factory, corpus_jsonl, tokenizer_dir):
    """Token shards of `corpus_jsonl` (tokenizer `tokenizer_dir`), 5% of the chapters held out as valid."""
    from calm_edge.data import prepare_shards

    out = tmp_path_factory.mktemp("ae_data") / "shards"
    prepare_shards([corpus_jsonl], tokenizer_dir, out, valid_fraction=0.05, workers=1, progress=False)
    return out


# Tiny language models for the generation, export and runtime tests: trained once per session.
LM_SETTINGS = ["tokenizer.vocab_size=512", "calm.backbone.max_positions=64", "ar.backbone.max_positions=256"]
LM_STEPS = ["max_steps=300", "batch_size=8", "seq_len=64", "eval_every=100", "save_every=100", "log_every=10",
            "warmup_steps=10", "eval_batches=2"]


def tiny_lm_config(extra=()):
    from calm_edge.config import preset

    sections = [f"{s}.{kv}" for s in ("train_autoencoder", "train_calm", "train_ar") for kv in LM_STEPS]
    return preset("tiny").with_overrides([*LM_SETTINGS, *sections, *extra])


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory, ae_shards):
    """{"root", "shards", "ae", "calm", "ar"}: run folders of a tiny autoencoder, CALM and AR model."""
    from calm_edge.training.autoencoder import train_autoencoder
    from calm_edge.training.language_models import train_ar, train_calm

    root = tmp_path_factory.mktemp("lm")
    config = tiny_lm_config()
    train_autoencoder(config.with_overrides(["train_autoencoder.max_steps=600", "train_autoencoder.lr=3e-3"]),
                      ae_shards, root / "ae", progress=False)
    train_calm(config, root / "ae", ae_shards, root / "calm", progress=False)
    train_ar(config, ae_shards, root / "ar", progress=False)
    return {"root": root, "shards": ae_shards, "ae": root / "ae", "calm": root / "calm", "ar": root / "ar"}


@pytest.fixture(scope="session")
def packages(trained_runs, tmp_path_factory):
    """The tiny CALM and AR runs exported to model packages: {"calm", "ar", "manifests"}."""
    from calm_edge.export.exporter import export_package

    root = tmp_path_factory.mktemp("packages")
    manifests = {kind: export_package(trained_runs[kind], root / kind, progress=False) for kind in ("calm", "ar")}
    return {"root": root, "calm": root / "calm", "ar": root / "ar", "manifests": manifests}


@pytest.fixture(scope="session")
def whole_packages(trained_runs, tmp_path_factory):
    """The tiny CALM run exported with format 1/2's whole decoder (`packages` holds it split): {"calm"}."""
    from calm_edge.export.exporter import export_package

    root = tmp_path_factory.mktemp("whole-packages")
    export_package(trained_runs["calm"], root / "calm", progress=False, e2e_prompts=1, e2e_tokens=8,
                   decoder_layout="whole")
    return {"root": root, "calm": root / "calm"}


@pytest.fixture(scope="session")
def fused_packages(trained_runs, tmp_path_factory):
    """The same runs exported with `--fused-attention` (GroupQueryAttention and RotaryEmbedding nodes)."""
    from calm_edge.export.exporter import export_package

    root = tmp_path_factory.mktemp("fused-packages")
    manifests = {kind: export_package(trained_runs[kind], root / kind, progress=False, fused_attention=True,
                                      e2e_prompts=2, e2e_tokens=16) for kind in ("calm", "ar")}
    return {"root": root, "calm": root / "calm", "ar": root / "ar", "manifests": manifests}


# The random_packages fixture's dimensions.
RANDOM_SETTINGS = ["tokenizer.vocab_size=512", "calm.backbone.max_positions=32", "ar.backbone.max_positions=64"]


# Untrained packages (speed, formats, faults: anything that does not need trained weights).
@pytest.fixture(scope="session")
def random_packages(tmp_path_factory, tokenizer_dir):
    """Tiny CALM and AR packages with random weights (their runs under runs/), and the AR as a Hugging Face folder."""
    from calm_edge.config import preset
    from calm_edge.export.exporter import export_package
    from calm_edge.export.huggingface import export_hf
    from calm_edge.export.random_weights import random_checkpoint

    root = tmp_path_factory.mktemp("bench")
    config = preset("tiny").with_overrides(RANDOM_SETTINGS)
    found = {"root": root}
    for kind in ("calm", "ar"):
        random_checkpoint(config, kind, tokenizer_dir, root / "runs" / kind)
        export_package(root / "runs" / kind, root / kind, e2e_prompts=1, e2e_tokens=8, progress=False)
        found[kind] = root / kind
    export_hf(root / "runs" / "ar", root / "hf")
    found["hf"] = root / "hf"
    return found


# The released CALM format (tests/official_calm.py), with random weights of tiny dimensions.
@pytest.fixture(scope="session")
def released(tmp_path_factory):
    """{"ae", "calm", "modules"}: an official autoencoder and CALM written as the release has them (.bin)."""
    import official_calm as official

    root = tmp_path_factory.mktemp("released")
    ae, calm = official.build(seed=0)
    official.save(ae.state_dict(), official.ae_config(), root / "CALM-Autoencoder")
    official.save(calm.state_dict(), official.calm_config(), root / "CALM-tiny")
    return {"root": root, "ae": root / "CALM-Autoencoder", "calm": root / "CALM-tiny", "modules": (ae, calm)}


@pytest.fixture(scope="session")
def cpp_build():
    """The build folder's cmake tree, built (or brought up to date) by runtime/cpp/build.sh."""
    can_install = os.geteuid() == 0 and shutil.which("apt-get")
    missing = [tool for tool in ("cmake", "g++") if shutil.which(tool) is None]
    if missing and not can_install:
        pytest.skip(f"building the C++ runtime needs {' and '.join(missing)}, which are not installed")
    done = subprocess.run(["bash", str(BUILD_SCRIPT), str(BUILD_DIR)], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable})
    if done.returncode != 0:
        pytest.fail(f"runtime/cpp/build.sh failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return BUILD_DIR / "cmake"
