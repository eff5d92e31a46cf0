"""The C++ runtime (runtime/cpp/) against the Python runtime: the same random values, the same
tokens for the same package, prompt, seed and temperature, and a message and non-zero exit for
every error a user can cause.

CALM packages are tested in both decoder layouts: "calm" is the `packages` fixture's split decoder
(format 3; at T = 1/2 the batch approximation decodes lazily, runtime/sampling.py lazy_batch_choice),
"calm-whole" the same model with format 1/2's whole decoder.

The library and calm-edge-generate are built with runtime/cpp/build.sh (CI runs it first, so here
it only checks that the build is up to date). The tests skip only when a build prerequisite is
missing and cannot be installed (no C++ compiler or cmake, and not root).
"""
import itertools
import json
import random
import shutil
import subprocess

import pytest

from calm_edge.runtime.generator import Generator, GeneratorParams, generate_tokens
from calm_edge.runtime.model import Model
from calm_edge.runtime.sampling import lazy_batch_choice
from calm_edge.runtime.text_generation import generate, stream

from conftest import BUILD_DIR, REPO
from test_lazy_decoding import random_chunks

PROGRAM = BUILD_DIR / "cmake" / "calm-edge-generate"
PROMPTS = ("In the beginning", "And he said unto them,", "The")
TIMEOUT = 120


def run_program(*args):
    return subprocess.run([str(PROGRAM), *map(str, args)], capture_output=True, text=True, timeout=TIMEOUT)


KINDS = ["calm", "calm-whole", "ar"]


def package_of(request, kind):
    """The package folder of a kind in KINDS, checked to have the decoder layout it stands for."""
    folder = request.getfixturevalue("whole_packages" if kind == "calm-whole" else "packages")[kind.split("-")[0]]
    layout = Model(folder).manifest.decoder_layout
    assert layout == {"calm": "split", "calm-whole": "whole", "ar": "whole"}[kind], (kind, layout)
    return folder


def cpp_token_ids(package, prompt, temperature, method="batch"):
    done = run_program(package, prompt, "--token-ids", "--no-stop-at-eos", "--max-new-tokens", 64, "--seed", 11,
                       "--temperature", temperature, "--method", method, "--threads", 1)
    assert done.returncode == 0, done.stderr
    return [int(t) for t in done.stdout.split()]


def test_golden_random_vector(cpp_build):
    done = subprocess.run([str(cpp_build / "rng_golden_test"), str(REPO / "tests" / "golden_rng.json")],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout + done.stderr
    cases = json.loads((REPO / "tests" / "golden_rng.json").read_text())["cases"]
    count = sum(len(case["u64"]) + len(case["uniform"]) for case in cases)
    assert f"{count} of {count} golden values match" in done.stdout


def test_the_lazy_choice_self_test(cpp_build):
    done = subprocess.run([str(cpp_build / "lazy_choice")], capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0 and "lazy choices match" in done.stdout, done.stdout + done.stderr


def python_rounds(chunks, n, u):
    """(rounds of (candidate, position) requests, chosen chunk) of runtime/sampling.py's lazy choice."""
    choice = lazy_batch_choice(len(chunks), len(chunks[0]), n, u)
    requests, rounds = next(choice), []
    while True:
        rounds.append([list(r) for r in requests])
        try:
            requests = choice.send([chunks[j][p] for j, p in requests])
        except StopIteration as finished:
            return rounds, list(finished.value)


def test_the_cpp_lazy_choice_asks_what_the_python_one_asks(cpp_build):
    """Round for round the same requests in the same order, so a step makes the same head calls."""
    rng = random.Random(17)
    cases = []
    for _ in range(1500):
        n = rng.choice([2, 3, 4])
        chunks = random_chunks(rng, max(n, rng.choice([4, 16, 33])), rng.choice([1, 2, 4]), rng.choice([2, 3, 50]))
        cases.append({"chunks": chunks, "n": n, "u": rng.randrange(1 << 24) / (1 << 24)})  # float32-exact
    lines = "".join(json.dumps(case) + "\n" for case in cases)
    done = subprocess.run([str(cpp_build / "lazy_choice"), "--trace"], input=lines, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    traced = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(traced) == len(cases)
    for case, cpp in zip(cases, traced):
        rounds, chosen = python_rounds(case["chunks"], case["n"], case["u"])
        assert cpp == {"rounds": rounds, "chosen": chosen}, case


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_cpp_prints_the_tokens_of_the_python_runtime(cpp_build, request, kind, temperature):
    package = package_of(request, kind)
    model = Model(package, threads=1)
    params = GeneratorParams(max_new_tokens=64, temperature=temperature, seed=11, stop_at_eos=False)
    for prompt in PROMPTS:
        expected = generate_tokens(model, [model.tokenizer.encode(prompt)], params)[0]
        assert len(expected) == 64
        assert cpp_token_ids(package, prompt, temperature) == expected, prompt


@pytest.mark.parametrize("mode", ["int4", "int8-dynamic"])
def test_cpp_decodes_a_quantized_split_package_as_python_does(cpp_build, packages, tmp_path, mode):
    """int4's head (MatMulNBits) is sent any rows, a lone one twice; int8-dynamic's scales its activations
    over the whole call, so it is never sent a subset: both runtimes follow the same rule."""
    from calm_edge.export.quantize import quantize_package

    manifest = quantize_package(packages["calm"], tmp_path / mode, mode, progress=False)
    assert manifest.decoder_head_rows_independent == (mode == "int4")
    model = Model(tmp_path / mode, threads=1)
    params = GeneratorParams(max_new_tokens=64, temperature=0.5, seed=11, stop_at_eos=False)
    for prompt in PROMPTS:
        expected = generate_tokens(model, [model.tokenizer.encode(prompt)], params)[0]
        assert cpp_token_ids(tmp_path / mode, prompt, 0.5) == expected, prompt


@pytest.mark.parametrize("kind", ["calm", "ar"])
def test_cpp_runs_a_fused_attention_package(cpp_build, fused_packages, kind):
    """The contrib nodes of `export --fused-attention` (GroupQueryAttention, RotaryEmbedding) in C++."""
    model = Model(fused_packages[kind], threads=1)
    params = GeneratorParams(max_new_tokens=64, temperature=0.5, seed=11, stop_at_eos=False)
    expected = generate_tokens(model, [model.tokenizer.encode(PROMPTS[0])], params)[0]
    assert cpp_token_ids(fused_packages[kind], PROMPTS[0], 0.5) == expected


def test_cpp_exact_sampler_matches_python(cpp_build, packages):
    model = Model(packages["calm"], threads=1)
    params = GeneratorParams(max_new_tokens=64, temperature=0.5, method="exact", seed=11, stop_at_eos=False)
    expected = generate_tokens(model, [model.tokenizer.encode(PROMPTS[1])], params)[0]
    assert cpp_token_ids(packages["calm"], PROMPTS[1], 0.5, method="exact") == expected


@pytest.mark.parametrize("kind", KINDS)
def test_a_cpp_batch_matches_a_python_batch(cpp_build, request, kind):
    """Prompts of different lengths in one left-padded batch, eos stopping rows at different steps
    (split: every row's lazy requests of a round in one head call)."""
    prompts = ["In the beginning", "And the LORD spake unto Moses, saying, Speak", "Behold"]
    package = package_of(request, kind)
    model = Model(package, threads=1)
    params = GeneratorParams(max_new_tokens=40, temperature=0.5, seed=5)
    expected = generate_tokens(model, [model.tokenizer.encode(p) for p in prompts], params)
    done = subprocess.run([str(cpp_build / "batch_token_ids"), str(package), "5", "0.5", "batch", "40", "1",
                           *prompts], capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert [[int(t) for t in line.split()] for line in done.stdout.split("\n")[:-1]] == expected


@pytest.mark.parametrize("kind", KINDS)
def test_the_cpp_generator_steps_as_the_python_generator_does(cpp_build, request, kind):
    """The step-level API in both languages: the same tokens each step, a row the caller stops,
    rows stopping at eos, and the same stop reasons."""
    prompts = ["In the beginning", "And the LORD spake unto Moses, saying, Speak", "Behold"]
    package = package_of(request, kind)
    model = Model(package, threads=1)
    generator = Generator(model, [model.tokenizer.encode(p) for p in prompts],
                          GeneratorParams(max_new_tokens=24, temperature=0.5, seed=9))
    lines = []
    for step in itertools.count(1):
        if generator.done:
            break
        for row, ids in enumerate(generator.step()):
            lines.append(f"{step} {row}:" + "".join(f" {i}" for i in ids))
        if step == 2 and not generator.done:
            generator.stop(1)
    lines.append("reasons: " + " ".join(generator.stop_reasons))
    done = subprocess.run([str(cpp_build / "generator_steps"), str(package), "9", "0.5", "24", "1", "1", "2",
                           *prompts], capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == lines
    assert generator.stop_reasons[1] == "stop_sequence"


def test_cpp_streams_the_text_of_the_python_runtime(cpp_build, packages):
    model = Model(packages["calm"], threads=1)
    params = GeneratorParams(max_new_tokens=48, seed=3, stop_sequences=(" and",))
    expected = "".join(stream(model, PROMPTS[0], params))
    done = run_program(packages["calm"], PROMPTS[0], "--max-new-tokens", 48, "--seed", 3, "--stop", " and",
                       "--threads", 1)
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected + "\n"


def test_cpp_streams_no_part_of_a_stop_sequence_and_releases_one_that_never_completes(cpp_build, packages):
    model = Model(packages["calm"], threads=1)
    free = GeneratorParams(max_new_tokens=32, seed=5, stop_at_eos=False)
    pieces = [p for p in stream(model, PROMPTS[1], free) if p]
    text = "".join(pieces)
    # A stop sequence that begins in one step's text and ends in the next: the first part must be
    # held back, or the stream would show text that the cut then removes.
    j = next(j for j in range(1, len(pieces) - 1) if len(pieces[j + 1]) >= 2 and pieces[j].strip())
    spanning = pieces[j][-1] + pieces[j + 1][:2]
    # The text's last characters begin a stop sequence that never follows: released at the end.
    never = text[-2:] + "\u00a7never"
    for stop, expected in ((spanning, text[:text.find(spanning)]), (never, text)):
        params = GeneratorParams(max_new_tokens=32, seed=5, stop_at_eos=False, stop_sequences=(stop,))
        assert "".join(stream(model, PROMPTS[1], params)) == expected
        done = run_program(packages["calm"], PROMPTS[1], "--max-new-tokens", 32, "--seed", 5, "--no-stop-at-eos",
                           "--stop", stop, "--threads", 1)
        assert done.returncode == 0, done.stderr
        assert done.stdout == expected + "\n", stop


def test_the_readme_example_runs(cpp_build, packages):
    model = Model(packages["calm"])
    expected = generate(model, PROMPTS[0], GeneratorParams(max_new_tokens=64, temperature=0.5, seed=1)).text
    done = subprocess.run([str(cpp_build / "calm-edge-minimal"), str(packages["calm"]), PROMPTS[0]],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected + "\n"


@pytest.fixture
def package_copy(packages, tmp_path):
    copy = tmp_path / "calm"
    shutil.copytree(packages["calm"], copy)
    return copy


def assert_fails_with(done, *fragments):
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert done.stderr.startswith("calm-edge-generate: error: ")
    for fragment in fragments:
        assert fragment in done.stderr, done.stderr


def test_a_corrupt_graph_is_named(cpp_build, package_copy):
    graph = package_copy / "decoder.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    assert_fails_with(run_program(package_copy, "Hello"), str(graph), "does not match the sha256",
                      "copy the package again or re-export it")


def test_a_missing_tokenizer_is_named(cpp_build, package_copy):
    (package_copy / "tokenizer.model").unlink()
    assert_fails_with(run_program(package_copy, "Hello"), "tokenizer.model (tokenizer) is missing",
                      "copy the whole package folder again")


def test_a_corrupt_manifest_is_named(cpp_build, package_copy):
    (package_copy / "manifest.json").write_text("{not json")
    assert_fails_with(run_program(package_copy, "Hello"), "manifest.json is corrupt", "export the package again")


def test_a_too_long_prompt_is_refused(cpp_build, packages):
    context = Model(packages["calm"]).max_context
    assert_fails_with(run_program(packages["calm"], "And the LORD spake " * (4 * context)),
                      f"the model's context holds {context}", "shorten the prompt")


def test_an_unsupported_temperature_is_refused(cpp_build, packages):
    assert_fails_with(run_program(packages["calm"], "Hello", "--temperature", 0.3), "temperature 0.3",
                      "not 1/n for a whole number n")


def test_spinning_policies_keep_the_tokens_and_a_bad_one_is_refused(cpp_build, packages):
    common = (packages["calm"], "In the beginning", "--token-ids", "--max-new-tokens", 16, "--seed", 3, "--threads", 2)
    outputs = {policy: run_program(*common, "--spinning", policy) for policy in ("off", "run", "on")}
    assert all(done.returncode == 0 for done in outputs.values()), {p: d.stderr for p, d in outputs.items()}
    assert outputs["off"].stdout == outputs["run"].stdout == outputs["on"].stdout != ""
    assert_fails_with(run_program(*common, "--spinning", "sometimes"), "spinning='sometimes'", "choose one of off, run, on")


def test_a_malformed_command_line_exits_2(cpp_build):
    done = run_program("only-a-package")
    assert done.returncode == 2 and "usage: calm-edge-generate" in done.stderr


def test_the_readme_shows_the_example_that_the_build_compiles():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## C++ runtime\n", 1)[1].split("\n## ", 1)[0]
    shown = section.split("```cpp\n", 1)[1].split("```", 1)[0]
    assert shown == (REPO / "runtime" / "cpp" / "examples" / "minimal.cpp").read_text(encoding="utf-8")
