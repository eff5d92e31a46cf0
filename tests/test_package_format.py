"""The package format, versions 1 to 3: what a manifest may say, checked in one place per runtime.

Cases run on a copy of a committed package (models/ar-small-int4; models/calm-small-int4 for the
split decoder of version 3), edited one key at a time; each must be refused with one error naming
the key or the file, by the Python runtime and, where the C++ runtime reads the same key, by
calm-edge-generate too.
"""
import json
import os
import re
import shutil
import subprocess

import pytest

from conftest import REPO
from calm_edge.errors import CalmEdgeError
from calm_edge.runtime.package import Manifest

COMMITTED = REPO / "models" / "ar-small-int4"
COMMITTED_CALM = REPO / "models" / "calm-small-int4"  # format 1: a whole decoder


@pytest.fixture
def package(tmp_path):
    folder = tmp_path / "pkg"
    shutil.copytree(COMMITTED, folder)
    return folder


@pytest.fixture
def calm_package(tmp_path):
    folder = tmp_path / "calm"
    shutil.copytree(COMMITTED_CALM, folder)
    return folder


def edit(folder, change):
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def set_key(*keys, value):
    def change(manifest):
        target = manifest
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return change


# (what is edited, the change, words the error must hold)
CASES = [
    ("format_version 0", set_key("format_version", value=0), "format_version is 0"),
    ("format_version -5", set_key("format_version", value=-5), "format_version is -5"),
    ("format_version true", set_key("format_version", value=True), "format_version is True"),
    ("format_version '1'", set_key("format_version", value="1"), "format_version is '1'"),
    ("format_version 4", set_key("format_version", value=4), "format version 4, newer than"),
    ("chunk_size 0", set_key("model", "chunk_size", value=0), "model.chunk_size is 0"),
    ("max_context 10^9", set_key("model", "max_context", value=10 ** 9), "model.max_context is 1000000000"),
    ("an AR chunk_size 4", set_key("model", "chunk_size", value=4), "an AR package generates one token per step"),
    ("num_kv_heads 0", set_key("model", "num_kv_heads", value=0), "model.num_kv_heads is 0"),
    ("head_dim 2^30", set_key("model", "head_dim", value=2 ** 30), "model.head_dim is 1073741824, beyond"),
    ("num_heads 5 over 2 kv heads", set_key("model", "num_heads", value=5), "(2) does not divide num_heads (5)"),
    ("hidden_size a string", set_key("model", "hidden_size", value="384"), "model.hidden_size is '384'"),
    ("eos beyond the vocabulary", set_key("model", "special_ids", "eos", value=10 ** 6), "special_ids.eos is 1000000"),
    ("a graph file with ..", set_key("graphs", "ar", "file", value="../ar.onnx"), "leads outside the package"),
    ("an absolute graph file", set_key("graphs", "ar", "file", value="/etc/passwd"), "leads outside the package"),
    ("a tokenizer kind of version 2 in version 1", set_key("tokenizer", "kind", value="hf-bpe"),
     "is 1, but the manifest uses version 2"),
    ("an unknown tokenizer kind", lambda m: (m.update(format_version=2), m["tokenizer"].update(kind="wordpiece")),
     "tokenizer.kind is 'wordpiece'"),
    ("an unknown prompt fill", lambda m: (m.update(format_version=2), m["model"].update(prompt_fill="middle")),
     "model.prompt_fill is 'middle'"),
    ("a split decoder in an AR package",
     lambda m: (m.update(format_version=3), m["model"].update(decoder_layout="split")),
     "model.decoder_layout is 'split', not one of whole, split (split: CALM only)"),
]


def split_calm(version=3, decoder_head=True, **model):
    """A change that makes the committed whole CALM package's manifest say it has a split decoder."""
    def change(manifest):
        manifest["format_version"] = version
        manifest["model"].update({"decoder_layout": "split", "decoder_hidden_size": 64, **model})
        if decoder_head:
            manifest["graphs"]["decoder_head"] = dict(manifest["graphs"]["decoder"], file="decoder_head.onnx")
    return change


# Version 3's split decoder, on the committed CALM package: the schema only (its graphs stay whole).
SPLIT_CASES = [
    ("a split decoder in version 2", split_calm(version=2), "format_version is 2, but a split decoder"),
    ("a split decoder without its head", split_calm(decoder_head=False),
     "lists graphs ['backbone', 'decoder', 'energy_head'] for kind 'calm'"),
    ("an unknown decoder layout", lambda m: (m.update(format_version=3), m["model"].update(decoder_layout="halved")),
     "model.decoder_layout is 'halved', not one of whole, split"),
    ("a decoder layout that is no string", lambda m: m["model"].update(decoder_layout=["split"]),
     "model.decoder_layout is ['split']"),
    ("no decoder_hidden_size", split_calm(decoder_hidden_size=None), "model.decoder_hidden_size is None"),
    ("decoder_hidden_size 0", split_calm(decoder_hidden_size=0), "model.decoder_hidden_size is 0"),
    ("decoder_hidden_size 2^30", split_calm(decoder_hidden_size=2 ** 30),
     "model.decoder_hidden_size is 1073741824, beyond"),
]


@pytest.mark.parametrize("name, change, words", CASES, ids=[c[0] for c in CASES])
def test_a_manifest_is_checked_key_by_key(package, name, change, words):
    edit(package, change)
    with pytest.raises(CalmEdgeError, match=words.replace("(", r"\(").replace(")", r"\)")):
        Manifest.read(package)


@pytest.mark.parametrize("name, change, words", SPLIT_CASES, ids=[c[0] for c in SPLIT_CASES])
def test_a_split_decoder_is_checked_key_by_key(calm_package, name, change, words):
    edit(calm_package, change)
    with pytest.raises(CalmEdgeError, match=re.escape(words)):
        Manifest.read(calm_package, verify=False)


def test_a_split_manifest_reads_its_layout(calm_package):
    manifest = Manifest.read(calm_package, verify=False)
    assert manifest.decoder_layout == "whole" and not manifest.decoder_head_rows_independent
    edit(calm_package, split_calm())
    (calm_package / "decoder_head.onnx").write_bytes((calm_package / "decoder.onnx").read_bytes())
    manifest = Manifest.read(calm_package, verify=False)
    assert manifest.format_version == 3 and manifest.decoder_layout == "split"
    assert manifest.decoder_head_rows_independent  # quantization.graphs names no mode for the head: fp32


def test_a_symlink_that_leads_out_of_the_package_is_refused(package, tmp_path):
    outside = tmp_path / "elsewhere.onnx"
    shutil.copyfile(package / "ar.onnx", outside)
    (package / "ar.onnx").unlink()
    os.symlink(outside, package / "ar.onnx")
    with pytest.raises(CalmEdgeError, match="ar.onnx' \\(ar graph\\), which leads outside the package folder"):
        Manifest.read(package, verify=False)


def test_version_2_keys_read_with_their_defaults_in_version_1(package):
    manifest = Manifest.read(package)
    assert manifest.format_version == 1 and manifest.tokenizer_kind == "sentencepiece" and not manifest.add_bos
    assert manifest.prompt_fill == "left-eos" and manifest["kind"] == "ar"  # the JSON view as well


# The C++ runtime reads the same schema with the same words (runtime/cpp/src/package.cpp): every case.
CPP_CASES = CASES


def refused_alike(program, package, words):
    done = subprocess.run([str(program), str(package), "Hi", "--max-new-tokens", "4"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1, done.stdout
    assert words in done.stderr and done.stderr.count("\n") == 1, done.stderr
    with pytest.raises(CalmEdgeError) as python_error:
        Manifest.read(package)
    assert done.stderr == f"calm-edge-generate: error: {python_error.value}\n"  # word for word


@pytest.mark.parametrize("name, change, words", CPP_CASES, ids=[c[0] for c in CPP_CASES])
def test_the_cpp_runtime_refuses_the_same_manifests(cpp_build, package, name, change, words):
    edit(package, change)
    refused_alike(cpp_build / "calm-edge-generate", package, words)


@pytest.mark.parametrize("name, change, words", SPLIT_CASES, ids=[c[0] for c in SPLIT_CASES])
def test_the_cpp_runtime_refuses_the_same_split_manifests(cpp_build, calm_package, name, change, words):
    edit(calm_package, change)
    refused_alike(cpp_build / "calm-edge-generate", calm_package, words)


def test_the_cpp_runtime_refuses_a_symlink_out_of_the_package(cpp_build, package, tmp_path):
    outside = tmp_path / "elsewhere.onnx"
    shutil.copyfile(package / "ar.onnx", outside)
    (package / "ar.onnx").unlink()
    os.symlink(outside, package / "ar.onnx")
    done = subprocess.run([str(cpp_build / "calm-edge-generate"), str(package), "Hi", "--no-verify"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "leads outside the package folder" in done.stderr
