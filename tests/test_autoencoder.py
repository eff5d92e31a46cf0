"""The autoencoder: shapes, its robustness terms, training to high accuracy, and evaluation."""
import json
import math

import pytest
import torch
from click.testing import CliRunner

from calm_edge.cli import main
from calm_edge.config import preset
from calm_edge.models import Autoencoder

# The tiny preset with the test tokenizer's vocabulary. Latent 32 instead of 16: with dropout
# 0.15 on the latent, 16 dimensions leave too little redundancy to learn in a few seconds.
TEST_SETTINGS = ("tokenizer.vocab_size=512", "autoencoder.latent_size=32")
TRAIN_STEPS = 300


def tiny_config(*overrides):
    return preset("tiny").with_overrides([*TEST_SETTINGS, *overrides])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ae_shards):
    """A tiny autoencoder trained for TRAIN_STEPS steps with every robustness term on."""
    from calm_edge.training.autoencoder import train_autoencoder

    config = tiny_config(f"train_autoencoder.max_steps={TRAIN_STEPS}", "train_autoencoder.eval_every=100",
                         "train_autoencoder.save_every=150")
    out = tmp_path_factory.mktemp("ae") / "run"
    # One thread: a model this small gains little from two, and on a busy 2-core machine two
    # threads that wait for each other can make the run many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = train_autoencoder(config, ae_shards, out, progress=False)
    finally:
        torch.set_num_threads(threads)
    return out, config, summary


# ----- the model -----------------------------------------------------------------------------


@pytest.mark.parametrize("K", [1, 2, 4, 8])
def test_shapes_for_each_chunk_size(K):
    config = tiny_config(f"autoencoder.chunk_size={K}", "train_autoencoder.seq_len=64", "train_calm.seq_len=64",
                         "train_ar.seq_len=64")
    model = Autoencoder(config).eval()
    ids = torch.randint(0, 512, (3, 5, K))
    mean, logstd = model.encode(ids)
    assert mean.shape == logstd.shape == (3, 5, 32)
    assert model.decode(mean).shape == (3, 5, K, 512)
    tokens = model.decode_tokens(mean)
    assert tokens.shape == (3, 5, K) and tokens.dtype == torch.int64
    # forward takes token windows [batch, T] with T a multiple of K and trains end to end.
    model.train()
    loss, metrics = model(torch.randint(0, 512, (2, 8 * K)))
    loss.backward()
    assert math.isfinite(loss.item()) and set(metrics) == {"ce", "kl", "accuracy", "chunk_accuracy"}
    assert all(p.grad is not None for p in model.parameters())


def test_robustness_settings_are_on_by_default():
    ae = preset("small").autoencoder
    assert (ae.kl_clamp, ae.kl_weight, ae.latent_dropout, ae.token_mask_prob) == (0.5, 1e-3, 0.15, 0.15)


def test_kl_per_dimension_matches_torch():
    model = Autoencoder(tiny_config())
    mean, logstd = torch.randn(6, 32), 0.5 * torch.randn(6, 32)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, logstd.exp()), torch.distributions.Normal(0.0, 1.0))
    assert torch.allclose(model.kl_per_dimension(mean, logstd), expected, atol=1e-5)


def test_kl_is_clamped_per_dimension_and_weighted():
    model = Autoencoder(tiny_config()).eval()
    # Posterior exactly N(0, 1): every KL_d is 0, so each dimension contributes the clamp, 0.5.
    with torch.no_grad():
        model.to_latent.weight.zero_()
        model.to_latent.bias.zero_()
    ids = torch.randint(0, 512, (4, 16))
    loss, metrics = model(ids)
    assert metrics["kl"].item() == pytest.approx(0.0, abs=1e-6)
    expected = 4 * metrics["ce"].item() + 1e-3 * 0.5 * 32  # K tokens' cross-entropy + weight * clamped KL
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_masking_and_latent_noise_only_in_training_mode():
    torch.manual_seed(0)
    model = Autoencoder(tiny_config())
    ids = torch.randint(0, 512, (8, 16))
    model.eval()
    assert torch.equal(model(ids)[0], model(ids)[0])  # deterministic: posterior mean, no masking
    model.train()
    assert not torch.equal(model(ids)[0], model(ids)[0])


def test_masked_tokens_get_a_zero_embedding():
    torch.manual_seed(0)
    model = Autoencoder(tiny_config("autoencoder.token_mask_prob=0.9999")).train()
    a, b = torch.randint(0, 512, (2, 4)), torch.randint(0, 512, (2, 4))
    # With (almost) every token masked, the encoder sees only zero vectors whatever the ids.
    assert torch.equal(model.encode(a)[0], model.encode(b)[0])
    model.eval()
    assert not torch.equal(model.encode(a)[0], model.encode(b)[0])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter is deprecated
def test_decoder_exports_to_onnx(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")

    class Decoder(torch.nn.Module):
        def __init__(self, ae):
            super().__init__()
            self.ae = ae

        def forward(self, latents):
            return self.ae.decode_tokens(latents)

    model = Autoencoder(tiny_config()).eval()
    path = tmp_path / "decoder.onnx"
    torch.onnx.export(Decoder(model), (torch.randn(3, 32),), str(path), input_names=["latents"],
                      output_names=["token_ids"], dynamic_axes={"latents": {0: "M"}, "token_ids": {0: "M"}},
                      dynamo=False)
    latents = torch.randn(7, 32)
    got = ort.InferenceSession(str(path)).run(None, {"latents": latents.numpy()})[0]
    assert got.shape == (7, 4)
    assert (got == model.decode_tokens(latents).numpy()).all()


# ----- training ------------------------------------------------------------------------------


def test_training_reduces_loss_and_writes_the_run(trained):
    out, config, summary = trained
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    valid = [r for r in records if r["split"] == "valid"]
    assert [r["step"] for r in valid] == [100, 200, 300]
    assert train[-1]["ce"] < 0.2 * train[0]["ce"]
    assert valid[-1]["ce"] < valid[0]["ce"]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["step"] == TRAIN_STEPS
    assert summary["tokens_seen"] == TRAIN_STEPS * 16 * 64


@pytest.mark.slow  # trains
def test_bf16_autocast_and_gradient_accumulation_train(ae_shards, tmp_path):
    from calm_edge.training.autoencoder import train_autoencoder

    config = tiny_config("train_autoencoder.bf16=true", "train_autoencoder.grad_accum_steps=2",
                         "train_autoencoder.max_steps=3", "train_autoencoder.batch_size=4")
    summary = train_autoencoder(config, ae_shards, tmp_path / "run", progress=False)
    assert summary["tokens_seen"] == 3 * 2 * 4 * 64
    assert math.isfinite(summary["valid"]["loss"])


def test_checkpoint_is_self_contained(trained, ae_shards, tokenizer_dir):
    from calm_edge.fileio import sha256_of
    from calm_edge.training import checkpoint

    out, config, _ = trained
    folders = checkpoint.list_checkpoints(out)
    assert [f.name for f in folders] == [f"step_{TRAIN_STEPS:08d}"]  # older ones are removed
    folder = folders[0]
    saved = json.loads((folder / "config.json").read_text())
    assert saved.pop("kind") == "autoencoder"
    assert saved == config.to_dict()
    index = json.loads((ae_shards / "index.json").read_text())
    assert sha256_of(folder / "tokenizer.model") == index["tokenizer"]["sha256"]
    state = checkpoint.load_trainer_state(folder)  # weights_only: tensors and plain values only
    assert set(state) >= {"optimizer", "torch_rng"}
    trainer = json.loads((folder / "trainer.json").read_text())
    assert trainer["step"] == TRAIN_STEPS and trainer["loader"]["split"] == "train"


def test_trained_autoencoder_reconstructs_its_data_and_is_robust(trained, ae_shards):
    from calm_edge.evaluation.autoencoder import evaluate_autoencoder
    from calm_edge.text_source import TextSource

    out, config, _ = trained
    ae = config.autoencoder
    assert (ae.kl_clamp, ae.kl_weight, ae.latent_dropout, ae.token_mask_prob) == (0.5, 1e-3, 0.15, 0.15)
    result = evaluate_autoencoder(out, TextSource((ae_shards,), split="train"), max_tokens=40_000)
    # Measured: 0.99 token accuracy, 0.99 under noise 0.1 (the latent's entries have rms ~0.65).
    assert result["token_accuracy"] >= 0.95
    assert result["chunk_accuracy"] >= 0.8
    assert result["posterior_sample"]["token_accuracy"] >= 0.95
    by_scale = {r["scale"]: r["token_accuracy"] for r in result["noise_robustness"]}
    assert by_scale[0.1] >= 0.9
    assert by_scale[0.2] >= 0.8
    assert by_scale[1.0] < by_scale[0.1]  # the table measures something: large noise does hurt
    missed = result["most_missed_tokens"]
    assert missed and all(0 < m["errors"] <= m["occurrences"] for m in missed)
    assert sum(m["errors"] for m in missed) <= round((1 - result["token_accuracy"]) * result["tokens_evaluated"])


def test_eval_cli_on_text_and_shards(trained, ae_shards, tmp_path):
    out, _, _ = trained
    text = tmp_path / "wiki.jsonl"
    lines = ["In the 2 @,@ 000 games , the long @-@ time player 's score was 3 @.@ 5 ( or so ) .",
             " = A Title = \n The river 's banks , wide and low , flooded ."]
    text.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    report = tmp_path / "eval.json"
    result = CliRunner().invoke(main, ["-q", "eval", "autoencoder", "--checkpoint", str(out), "--data", str(text),
                                       "--data", str(ae_shards), "--detokenize", "wikitext", "--out", str(report)])
    assert result.exit_code == 0, result.output
    assert "token accuracy" in result.output
    data = json.loads(report.read_text())
    assert data["text_form"] == "wikitext-detokenized" and data["data"]["detokenize"] == "wikitext"
    assert [s["kind"] for s in data["data"]["sources"]] == ["text", "shards"]
    assert data["tokens_evaluated"] == data["data"]["tokens"] // 4 * 4
    assert 0.0 <= data["token_accuracy"] <= 1.0
    assert [r["scale"] for r in data["noise_robustness"]] == [0.05, 0.1, 0.2, 0.3, 0.5, 1.0]


def test_eval_rejects_shards_of_another_tokenizer(trained, tmp_path, corpus_jsonl):
    from calm_edge.config import TokenizerConfig
    from calm_edge.data import prepare_shards
    from calm_edge.tokenizer import train_tokenizer

    out, _, _ = trained
    train_tokenizer([corpus_jsonl], tmp_path / "tok", TokenizerConfig(vocab_size=400), progress=False)
    prepare_shards([corpus_jsonl], tmp_path / "tok", tmp_path / "shards", valid_fraction=0.05, workers=1,
                   progress=False)
    result = CliRunner().invoke(main, ["-q", "eval", "autoencoder", "--checkpoint", str(out),
                                       "--data", str(tmp_path / "shards")])
    assert result.exit_code == 1
    assert "another tokenizer" in result.output and "Traceback" not in result.output


def test_wikitext_detokenizer():
    from calm_edge.wikitext import detokenize_wikitext

    assert detokenize_wikitext("a guest @-@ starring role , in 2 @,@ 000 . He 's 3 @.@ 5 % ( approx . ) ; isn 't") \
        == "a guest-starring role, in 2,000. He's 3.5% (approx.); isn't"
    assert detokenize_wikitext(" = Robert Boulter = \n") == " = Robert Boulter = \n"
