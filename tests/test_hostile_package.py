"""Hostile model packages and command-line integers: both runtimes refuse them alike.

Each package case edits a copy of the committed CALM package (models/calm-small-int4) one way, then
opens it with the Python CLI (`calm-edge generate`, in process) and with the C++ program
(calm-edge-generate). Both must exit 1 with one line that names the key or the file, with the same
words, and leave every file of the package (and the file outside it that a case points at) as it was.
The integer table checks that calm-edge-generate reads options as runtime/limits.py bounds them.
"""
import hashlib
import io
import os
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from calm_edge.cli import main
from calm_edge.runtime.generator import GeneratorParams, generate_tokens
from calm_edge.runtime.model import Model

from conftest import REPO
from test_package_format import edit
from test_package_format import set_key as key_set

COMMITTED = REPO / "models" / "calm-small-int4"
TIMEOUT = 60
CPP_PREFIX = "calm-edge-generate: error: "


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory):
    """A SentencePiece model of 300 pieces: a tokenizer of another vocabulary than the package's 8192."""
    import sentencepiece as spm

    text = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([line for line in text if line.strip()] * 3),
                                   model_writer=model, vocab_size=300, model_type="unigram",
                                   hard_vocab_limit=False, minloglevel=2)
    path = tmp_path_factory.mktemp("other-tokenizer") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """The tiny package, copied once per module; each case edits its own copy of this one."""
    folder = tmp_path_factory.mktemp("pristine") / "pkg"
    shutil.copytree(COMMITTED, folder)
    return folder


@pytest.fixture
def package(pristine, tmp_path):
    folder = tmp_path / "pkg"
    shutil.copytree(pristine, folder)
    return folder


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder):
    """Every entry under `folder` and beside it: a link's target, else a file's sha256."""
    state = {}
    for path in sorted(folder.parent.rglob("*")):
        key = str(path.relative_to(folder.parent))
        if path.is_symlink():
            state[key] = ("link", os.readlink(path))
        elif path.is_file():
            state[key] = ("file", sha256(path))
    return state


# ----- the edits -------------------------------------------------------------------------------


def edit_manifest(change):
    return lambda folder, tools: edit(folder, change)


def set_key(*keys, value):
    return edit_manifest(key_set(*keys, value=value))


def delete_key(*keys):
    def change(manifest):
        target = manifest
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]
    return edit_manifest(change)


def swap_graphs(first, second):
    """The file entries of two graphs exchanged (their sha256 and size with them: only the roles are wrong)."""
    def change(manifest):
        graphs = manifest["graphs"]
        for key in ("file", "sha256", "bytes"):
            graphs[first][key], graphs[second][key] = graphs[second][key], graphs[first][key]
    return edit_manifest(change)


def other_vocabulary(folder, tools):
    shutil.copyfile(tools["tokenizer"], folder / "tokenizer.model")
    edit_manifest(lambda m: m["tokenizer"].update(sha256=sha256(folder / "tokenizer.model")))(folder, tools)


def outside_copy(folder, name):
    """A copy of one of the package's files beside the package folder: what a hostile entry points at."""
    outside = folder.parent / f"outside-{name}"
    shutil.copyfile(folder / name, outside)
    return outside


def parent_entry(folder, tools):
    outside_copy(folder, "decoder.onnx")
    set_key("graphs", "decoder", "file", value="../outside-decoder.onnx")(folder, tools)


def absolute_entry(folder, tools):
    outside = outside_copy(folder, "decoder.onnx")
    set_key("graphs", "decoder", "file", value=str(outside))(folder, tools)


def link_out(name):
    def apply(folder, tools):
        outside = outside_copy(folder, name)
        (folder / name).unlink()
        os.symlink(outside, folder / name)
    return apply


def dangling_link_out(folder, tools):
    (folder / "decoder.onnx").unlink()
    os.symlink(folder.parent / "nothing-here.onnx", folder / "decoder.onnx")


def link_loop(folder, tools):
    (folder / "decoder.onnx").unlink()
    os.symlink("loop-b", folder / "decoder.onnx")
    os.symlink("decoder.onnx", folder / "loop-b")


# (case, the edit, what both messages must name)
CASES = [
    ("format_version 0", set_key("format_version", value=0), "format_version is 0, not a format version"),
    ("format_version -5", set_key("format_version", value=-5), "format_version is -5, not a format version"),
    ("format_version true", set_key("format_version", value=True), "format_version is True, not a format version"),
    ("format_version '1'", set_key("format_version", value="1"), "format_version is '1', not a format version"),
    ("format_version 1.0", set_key("format_version", value=1.0), "format_version is 1.0, not a format version"),
    ("format_version missing", delete_key("format_version"), "format_version is None"),
    ("format_version 4", set_key("format_version", value=4), "format version 4, newer than"),
    ("an unknown decoder layout", set_key("model", "decoder_layout", value="diagonal"),
     "model.decoder_layout is 'diagonal', not one of whole, split"),
    ("a split decoder without its head", set_key("model", "decoder_layout", value="split"),
     "lists graphs ['backbone', 'decoder', 'energy_head'] for kind 'calm'"),
    ("an unknown kind", set_key("kind", value="rnn"), "for kind 'rnn'"),
    ("a graph missing", delete_key("graphs", "decoder"), "lists graphs ['backbone', 'energy_head'] for kind 'calm'"),
    ("model missing", delete_key("model"), "model is missing or not an object"),
    ("vocab_size missing", delete_key("model", "vocab_size"), "model.vocab_size is None"),
    ("hidden_size a string", set_key("model", "hidden_size", value="384"), "model.hidden_size is '384'"),
    ("num_layers a float", set_key("model", "num_layers", value=6.0), "model.num_layers is 6.0"),
    ("head_dim true", set_key("model", "head_dim", value=True), "model.head_dim is True"),
    ("chunk_size 0", set_key("model", "chunk_size", value=0), "model.chunk_size is 0, not a positive whole number"),
    ("noise_size -1", set_key("model", "noise_size", value=-1), "model.noise_size is -1"),
    ("max_context 10^9", set_key("model", "max_context", value=10 ** 9), "model.max_context is 1000000000, beyond"),
    ("vocab_size 2^25", set_key("model", "vocab_size", value=2 ** 25), "model.vocab_size is 33554432, beyond"),
    ("num_kv_heads not dividing", set_key("model", "num_kv_heads", value=4), "model.num_kv_heads (4) does not divide"),
    ("eos beyond the vocabulary", set_key("model", "special_ids", "eos", value=10 ** 6), "special_ids.eos is 1000000"),
    ("pad negative", set_key("model", "special_ids", "pad", value=-1), "special_ids.pad is -1"),
    ("special_ids missing", delete_key("model", "special_ids"), "model.special_ids must give"),
    ("tokenizer sha256 missing", delete_key("tokenizer", "sha256"), "tokenizer.sha256 is None, not a sha256"),
    ("tokenizer add_bos a string", set_key("tokenizer", "add_bos", value="yes"), "tokenizer.add_bos is 'yes'"),
    ("version 2 keys in version 1", set_key("tokenizer", "kind", value="hf-bpe"), "is 1, but the manifest uses version 2"),
    ("an unknown prompt fill", lambda f, t: (set_key("format_version", value=2)(f, t),
                                            set_key("model", "prompt_fill", value="middle")(f, t)),
     "model.prompt_fill is 'middle'"),
    ("graph bytes missing", delete_key("graphs", "decoder", "bytes"), "graphs.decoder.bytes is None"),
    ("graph inputs not a list", set_key("graphs", "backbone", "inputs", value="ids"), "graphs.backbone.inputs must be"),
    ("quantization missing", delete_key("quantization"), "quantization.mode is missing"),
    ("provenance a list", set_key("provenance", value=[1]), "provenance is not an object"),
    ("hidden_size disagreeing with the graphs", set_key("model", "hidden_size", value=256),
     "graphs.backbone outputs: hidden has 384 at dimension 2, but the manifest's model section gives 256"),
    ("latent_size disagreeing with the graphs", set_key("model", "latent_size", value=32),
     "graphs.energy_head outputs: latents has 64 at dimension 2"),
    ("two graphs' files swapped", swap_graphs("energy_head", "decoder"),
     "graphs.energy_head inputs: the graph has latents where the manifest expects hidden, noise"),
    ("a tokenizer of another vocabulary", other_vocabulary,
     "model.vocab_size is 8192, but the tokenizer tokenizer.model has 300 pieces"),
    ("a file name ../x", parent_entry, "graphs.decoder.file is '../outside-decoder.onnx', which leads outside"),
    ("an absolute path", absolute_entry, "outside-decoder.onnx', which leads outside the package folder"),
    ("a backslash", set_key("graphs", "decoder", "file", value="..\\decoder.onnx"), "graphs.decoder.file is '..\\\\decoder"),
    ("a home folder", set_key("tokenizer", "file", value="~/tokenizer.model"), "tokenizer.file is '~/tokenizer.model'"),
    ("an empty file name", set_key("graphs", "backbone", "file", value=""),
     "graphs.backbone.file is '', not a file name"),
    ("a symlink to a graph outside", link_out("decoder.onnx"),
     "graphs.decoder.file is 'decoder.onnx' (decoder graph), which leads outside the package folder through a symbolic link"),
    ("a symlink to a tokenizer outside", link_out("tokenizer.model"),
     "tokenizer.file is 'tokenizer.model' (tokenizer), which leads outside the package folder"),
    ("a symlink to a manifest outside", link_out("manifest.json"),
     "manifest.json is 'manifest.json' (the manifest), which leads outside the package folder"),
    ("a dangling symlink out", dangling_link_out, "graphs.decoder.file is 'decoder.onnx' (decoder graph), which leads outside"),
    ("a loop of symlinks", link_loop, "graphs.decoder.file is 'decoder.onnx' (decoder graph), a symbolic link that cannot"),
]


def python_error(folder):
    """The one line the Python CLI prints for the package, without its "Error: "."""
    result = CliRunner().invoke(main, ["generate", "--package", str(folder), "Hi", "--max-new-tokens", "4",
                                       "--threads", "1"])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # a CalmEdgeError, not a crash
    lines = result.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    return lines[0][len("Error: "):]


def cpp_error(program, folder):
    """The one line calm-edge-generate prints on stderr for the package, without its prefix."""
    done = subprocess.run([str(program), str(folder), "Hi", "--max-new-tokens", "4", "--threads", "1"],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert done.stdout == "" and done.stderr.count("\n") == 1 and done.stderr.startswith(CPP_PREFIX), done.stderr
    return done.stderr[len(CPP_PREFIX):].rstrip("\n")


@pytest.mark.parametrize("name, change, words", CASES, ids=[c[0] for c in CASES])
def test_python_refuses_a_hostile_package(package, other_tokenizer, name, change, words):
    change(package, {"tokenizer": other_tokenizer})
    before = snapshot(package)
    message = python_error(package)
    assert words in message
    assert snapshot(package) == before


@pytest.mark.parametrize("name, change, words", CASES, ids=[c[0] for c in CASES])
def test_both_runtimes_refuse_a_hostile_package_alike(cpp_build, package, other_tokenizer, name, change, words):
    change(package, {"tokenizer": other_tokenizer})
    before = snapshot(package)
    from_python = python_error(package)
    from_cpp = cpp_error(cpp_build / "calm-edge-generate", package)
    assert words in from_python and words in from_cpp
    assert from_cpp == from_python  # the same key, file and fix, word for word
    assert snapshot(package) == before


def test_the_pristine_package_opens_in_both(cpp_build, pristine):
    done = subprocess.run([str(cpp_build / "calm-edge-generate"), str(pristine), "Hi", "--max-new-tokens", "4",
                           "--token-ids"], capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    Model(pristine, threads=1)


# ----- calm-edge-generate's integer options ----------------------------------------------------

PROMPT = "In the beginning"


def cpp_tokens(program, package, *options):
    done = subprocess.run([str(program), str(package), PROMPT, "--token-ids", "--no-stop-at-eos", "--threads", "1",
                           "--max-new-tokens", "12", *map(str, options)], capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    return [int(t) for t in done.stdout.split()]


@pytest.mark.parametrize("seed", [0, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1])
def test_a_large_seed_gives_the_tokens_of_the_python_runtime(cpp_build, pristine, seed):
    model = Model(pristine, threads=1)
    params = GeneratorParams(max_new_tokens=12, seed=seed, stop_at_eos=False)
    expected = generate_tokens(model, [model.tokenizer.encode(PROMPT)], params)[0]
    assert cpp_tokens(cpp_build / "calm-edge-generate", pristine, "--seed", seed) == expected


def test_seeds_past_2_to_the_63_are_not_one_seed(cpp_build, pristine):
    program = cpp_build / "calm-edge-generate"
    assert cpp_tokens(program, pristine, "--seed", 2 ** 63) != cpp_tokens(program, pristine, "--seed", 2 ** 64 - 1)


# (option, value): each refused with exit 2 and one line "Error: OPTION VALUE ..."
REFUSED = [
    ("--seed", str(2 ** 64)), ("--seed", "-1"), ("--seed", "1.5"), ("--seed", ""), ("--seed", " 1"), ("--seed", "+1"),
    ("--seed", "0x10"), ("--seed", "9" * 40),
    ("--max-new-tokens", "4294967300"), ("--max-new-tokens", str(2 ** 31)), ("--max-new-tokens", "0"),
    ("--max-new-tokens", "-1"), ("--max-new-tokens", "1.5"), ("--max-new-tokens", "1e3"),
    ("--threads", "0"), ("--threads", "4294967297"), ("--threads", str(4 * (os.cpu_count() or 1) + 1)),
    ("--candidates", "0"), ("--candidates", "65537"), ("--candidates", "4294967312"),
    ("--repeat", "0"), ("--repeat", "4294967297"),
]


@pytest.mark.parametrize("option, value", REFUSED, ids=[f"{o} {v!r}" for o, v in REFUSED])
def test_an_integer_option_out_of_range_is_refused(cpp_build, pristine, option, value):
    done = subprocess.run([str(cpp_build / "calm-edge-generate"), str(pristine), "Hi", "--token-ids", option, value],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stdout == "" and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"Error: {option} {value} is ")
    assert "must be between" in done.stderr


@pytest.mark.parametrize("option, value", [("--max-new-tokens", str(2 ** 31 - 1)), ("--candidates", "65536"),
                                           ("--threads", str(4 * (os.cpu_count() or 1))), ("--seed", "007")])
def test_an_integer_option_at_its_bound_is_taken(cpp_build, pristine, option, value):
    # --max-new-tokens at its bound would run long: the prompt fills the context, so generation ends at once.
    args = ["--max-new-tokens", "1"] if option != "--max-new-tokens" else []
    done = subprocess.run([str(cpp_build / "calm-edge-generate"), str(pristine), "Hi", "--token-ids", *args,
                           option, value, "--threads" if option != "--threads" else "--seed", "1"],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
