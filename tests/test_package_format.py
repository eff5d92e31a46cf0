"""The package format, versions 1 and 2: what a manifest may say, checked in one place per runtime.

Cases run on a copy of a committed package (models/ar-small-int4), edited one key at a time; each
must be refused with one error naming the key or the file, by the Python runtime and, where the C++
runtime reads the same key, by calm-edge-generate too.
"""
import json
import os
import shutil
import subprocess

import pytest

from conftest import REPO
from calm_edge.errors import CalmEdgeError
from calm_edge.runtime.package import Manifest

COMMITTED = REPO / "models" / "ar-small-int4"


@pytest.fixture
def package(tmp_path):
    folder = tmp_path / "pkg"
    shutil.copytree(COMMITTED, folder)
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
    ("format_version 3", set_key("format_version", value=3), "format version 3, newer than"),
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
]


@pytest.mark.parametrize("name, change, words", CASES, ids=[c[0] for c in CASES])
def test_a_manifest_is_checked_key_by_key(package, name, change, words):
    edit(package, change)
    with pytest.raises(CalmEdgeError, match=words.replace("(", r"\(").replace(")", r"\)")):
        Manifest.read(package)


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


@pytest.mark.parametrize("name, change, words", CPP_CASES, ids=[c[0] for c in CPP_CASES])
def test_the_cpp_runtime_refuses_the_same_manifests(cpp_build, package, name, change, words):
    edit(package, change)
    done = subprocess.run([str(cpp_build / "calm-edge-generate"), str(package), "Hi", "--max-new-tokens", "4"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stdout
    assert words in done.stderr and done.stderr.count("\n") == 1, done.stderr
    with pytest.raises(CalmEdgeError) as python_error:
        Manifest.read(package)
    assert done.stderr == f"calm-edge-generate: error: {python_error.value}\n"  # word for word


def test_the_cpp_runtime_refuses_a_symlink_out_of_the_package(cpp_build, package, tmp_path):
    outside = tmp_path / "elsewhere.onnx"
    shutil.copyfile(package / "ar.onnx", outside)
    (package / "ar.onnx").unlink()
    os.symlink(outside, package / "ar.onnx")
    done = subprocess.run([str(cpp_build / "calm-edge-generate"), str(package), "Hi", "--no-verify"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "leads outside the package folder" in done.stderr
