"""Lazy decoding (runtime/sampling.py `lazy_batch_choice`, split packages): the same tokens as decoding everything.

The batch approximation's choice depends only on which candidates' chunks are equal; the lazy
choice decodes each candidate's first token and as few others as settle that. These tests hold it
to the plain choice: on random candidate sets with every pattern of shared prefixes, and end to
end on split packages against the whole decoder of the same model, in Python (the C++ runtime's
are in test_cpp_runtime.py).
"""
import itertools
import random

import pytest

from calm_edge.runtime.sampling import batch_choice, lazy_batch_choice


def run_lazy(chunks, n, u):
    """(chosen chunk, rounds, positions decoded) of the lazy choice over fully known `chunks`."""
    choice = lazy_batch_choice(len(chunks), len(chunks[0]), n, u)
    requests, rounds, decoded = next(choice), 0, set()
    while True:
        rounds += 1
        assert requests and not decoded & set(requests), "a round asks for nothing, or for a token it has"
        decoded |= set(requests)
        try:
            requests = choice.send([chunks[j][p] for j, p in requests])
        except StopIteration as finished:
            return finished.value, rounds, decoded


def random_chunks(rng, count, K, vocab):
    """Candidates drawn from a few prototypes with random edits, so that prefixes are shared at every depth."""
    prototypes = [tuple(rng.randrange(vocab) for _ in range(K)) for _ in range(rng.randint(1, 4))]
    chunks = []
    for _ in range(count):
        chunk = list(rng.choice(prototypes))
        if rng.random() < 0.5:
            chunk[rng.randrange(K)] = rng.randrange(vocab)
        chunks.append(tuple(chunk))
    return chunks


@pytest.mark.parametrize("n", [2, 3])
def test_lazy_choice_equals_the_batch_choice(n):
    rng = random.Random(n)
    for case in range(3000):
        count, K = rng.choice([n, 4, 16, 33]), rng.choice([1, 2, 4])
        chunks = random_chunks(rng, max(count, n), K, vocab=rng.choice([2, 3, 50]))
        u = rng.random()
        chosen, rounds, decoded = run_lazy(chunks, n, u)
        assert chosen == chunks[batch_choice(chunks, n, u)], (case, chunks, u)
        assert rounds <= 2  # see lazy_batch_choice: two rounds always settle it


def test_distinct_first_tokens_cost_one_round_and_one_chunk():
    """All first tokens differ: one round, each candidate's first token and one chunk's others."""
    chunks = [(j, 7, 7, 7) for j in range(16)]
    for u in (0.0, 0.3, 0.999):
        chosen, rounds, decoded = run_lazy(chunks, 2, u)
        assert chosen == chunks[batch_choice(chunks, 2, u)]
        assert rounds == 1 and len(decoded) == 16 + 3


def test_identical_candidates_need_every_token():
    chunks = [(5, 6, 7, 8)] * 16
    chosen, rounds, decoded = run_lazy(chunks, 2, 0.5)
    assert chosen == (5, 6, 7, 8) and len(decoded) == 64 and rounds == 2


def test_every_small_case_exhaustively():
    """Every chunk set of 4 candidates, K = 2, over 3 tokens, at several uniforms."""
    pieces = list(itertools.product(range(3), repeat=2))
    for chunks in itertools.product(pieces, repeat=4):
        for u in (0.0, 0.26, 0.51, 0.76, 0.9999):
            assert run_lazy(list(chunks), 2, u)[0] == chunks[batch_choice(list(chunks), 2, u)]


# ----- end to end: split packages against the whole decoder of the same model -------------------

import numpy as np  # noqa: E402

from calm_edge.runtime.generator import GeneratorParams, generate_tokens  # noqa: E402
from calm_edge.runtime.model import Model  # noqa: E402

PROMPTS = ["In the beginning", "And he said unto them,", "The"]


@pytest.fixture(scope="module")
def whole_calm(packages, trained_runs, tmp_path_factory):
    """The trained tiny CALM exported with the whole decoder of format 1 (`packages` holds it split)."""
    from calm_edge.export.exporter import export_package

    out = tmp_path_factory.mktemp("whole") / "calm"
    export_package(trained_runs["calm"], out, progress=False, e2e_prompts=1, e2e_tokens=8, decoder_layout="whole")
    return out


@pytest.fixture(scope="module")
def random_vocab_packages(tmp_path_factory, tokenizer_dir):
    """{vocab: (split package, whole package)}: random tiny CALM models at 8,192 and 128,256 tokens."""
    from calm_edge.config import preset
    from calm_edge.export.exporter import export_package
    from calm_edge.export.random_weights import random_checkpoint

    root, found = tmp_path_factory.mktemp("vocab"), {}
    for vocab in (8192, 128256):
        config = preset("tiny").with_overrides([f"tokenizer.vocab_size={vocab}", "calm.backbone.max_positions=32"])
        random_checkpoint(config, "calm", tokenizer_dir, root / f"run-{vocab}", seed=vocab)
        found[vocab] = tuple(export_package(root / f"run-{vocab}", root / f"{layout}-{vocab}", progress=False,
                                            e2e_prompts=1, e2e_tokens=8, decoder_layout=layout).folder
                             for layout in ("split", "whole"))
    return found


def _same_generation(split, whole, settings, seeds):
    prompts = [split.tokenizer.encode(p) for p in PROMPTS]
    for seed in seeds:
        for temperature, method, candidates in settings:
            params = GeneratorParams(max_new_tokens=32, temperature=temperature, method=method, candidates=candidates,
                                     seed=seed, stop_at_eos=False)
            assert generate_tokens(split, prompts, params) == generate_tokens(whole, prompts, params), (seed, params)


SETTINGS = [(1.0, "batch", 16), (0.5, "batch", 16), (0.5, "batch", 200), (1 / 3, "batch", 32), (0.5, "exact", 16)]


def test_trained_split_package_generates_the_whole_decoders_tokens(packages, whole_calm):
    split, whole = Model(packages["calm"]), Model(whole_calm)
    assert split.manifest.decoder_head_rows_independent and whole.manifest.decoder_layout == "whole"
    _same_generation(split, whole, SETTINGS, seeds=range(6))


def test_lazy_decoding_sends_the_head_fewer_positions(packages):
    """What lazy decoding saves: the trained tiny model's candidates, 16 per step, 4 tokens each."""
    model = Model(packages["calm"])
    prompts = [model.tokenizer.encode(p) for p in PROMPTS]
    from calm_edge.runtime.generator import Generator

    generator = Generator(model, prompts, GeneratorParams(max_new_tokens=64, temperature=0.5, seed=3,
                                                          stop_at_eos=False))
    steps = sum(1 for _ in generator)
    positions = generator.state.head_rows / steps
    assert 1 <= generator.state.head_calls / steps <= 3
    assert len(prompts) * 16 <= positions < len(prompts) * 16 * 4  # every first token, not every token


@pytest.mark.parametrize("vocab", [8192, 128256])
def test_random_split_packages_decode_and_generate_as_whole_ones(random_vocab_packages, vocab):
    split, whole = (Model(p) for p in random_vocab_packages[vocab])
    rng = np.random.default_rng(vocab)
    latents = rng.standard_normal((2048, split.manifest.latent_size)).astype(np.float32) * 2
    expected = whole.decode(latents)
    assert np.array_equal(split.decode(latents), expected)  # the plain argmax, row for row, ties as before
    states = split.decoder_states(latents).reshape(-1, split.manifest.model_section["decoder_hidden_size"])
    flat = expected.reshape(-1)
    for size in (1, 2, 3, 19, 200):  # a token does not depend on the rows sent with it
        rows = rng.choice(len(states), size, replace=False)
        assert np.array_equal(split.head_tokens(states[rows]), flat[rows]), size
    # 200 candidates at 128,256 tokens would make the whole decoder's side of this test slow.
    settings = SETTINGS[:3] if vocab == 8192 else [*SETTINGS[:2], (0.5, "batch", 48)]
    _same_generation(split, whole, settings, seeds=range(3))


def test_a_quantized_split_package_decodes_lazily_as_it_decodes_plainly(packages, tmp_path, monkeypatch):
    from calm_edge.export.quantize import quantize_package
    from calm_edge.runtime.step_state import StepState

    manifest = quantize_package(packages["calm"], tmp_path / "int4", "int4", progress=False)
    assert manifest.graph_modes["decoder_head"] == "int4" and manifest.decoder_head_rows_independent
    model = Model(tmp_path / "int4")
    prompts = [model.tokenizer.encode(p) for p in PROMPTS]
    params = GeneratorParams(max_new_tokens=32, temperature=0.5, seed=5, stop_at_eos=False)
    lazy = generate_tokens(model, prompts, params)
    monkeypatch.setattr(StepState, "lazy_decoding", property(lambda self: False))
    assert generate_tokens(model, prompts, params) == lazy


def test_a_head_whose_activations_are_scaled_per_call_is_never_sent_a_subset(packages):
    from calm_edge.runtime.package import Manifest

    manifest = Manifest.read(packages["calm"], verify=False)
    data = {**manifest.data, "quantization": {"mode": "int8-dynamic", "graphs": {"decoder_head": "int8-dynamic"}}}
    assert not Manifest(packages["calm"], data).decoder_head_rows_independent
    assert Manifest(packages["calm"], {**data, "quantization": {"mode": "int4", "graphs": {"decoder_head": "int4"}}}
                    ).decoder_head_rows_independent


def test_upgrade_splits_a_whole_package_without_changing_a_token(whole_calm, packages, tmp_path):
    from click.testing import CliRunner

    from calm_edge.cli import main

    result = CliRunner().invoke(main, ["upgrade", "--package", str(whole_calm), "--out", str(tmp_path / "up")])
    assert result.exit_code == 0, result.output
    upgraded = Model(tmp_path / "up")
    assert upgraded.manifest.format_version == 3 and upgraded.manifest.decoder_layout == "split"
    assert upgraded.manifest.validation["upgrade"]["from"]["format_version"] == 1
    _same_generation(upgraded, Model(whole_calm), SETTINGS[1:3], seeds=range(2))
    for source, message in ((tmp_path / "up", "already has a split decoder"), (packages["ar"], "only a CALM package")):
        result = CliRunner().invoke(main, ["upgrade", "--package", str(source), "--out", str(tmp_path / "again")])
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
        assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("mode", ["fp16", "int8-static", "int4"])
def test_a_quantized_head_gives_each_row_the_token_it_gives_in_any_company(packages, corpus_jsonl, tmp_path, mode):
    """What lazy decoding relies on, for every head it sends subsets to: a row's token does not depend on its call."""
    from calm_edge.export.quantize import quantize_package

    extra = {"calibration_data": [str(corpus_jsonl)]} if mode == "int8-static" else {}
    manifest = quantize_package(packages["calm"], tmp_path / mode, mode, progress=False, **extra)
    assert manifest.decoder_head_rows_independent
    model = Model(tmp_path / mode)
    rng = np.random.default_rng(7)
    latents = rng.standard_normal((256, model.manifest.latent_size)).astype(np.float32) * 2
    states = model.decoder_states(latents).reshape(-1, model.manifest.model_section["decoder_hidden_size"])
    together = model.head_tokens(states)
    for size in (1, 2, 3, 19, 100):
        for _ in range(5):
            rows = rng.choice(len(states), size, replace=False)
            assert np.array_equal(model.head_tokens(states[rows]), together[rows]), (mode, size)
