"""Configs and presets: typed, savable, overridable, and strict about what they accept."""
import json

import pytest
from click.testing import CliRunner

from calm_edge.cli import main
from calm_edge.config import PRESETS, Config, preset, resolve_config
from calm_edge.errors import ConfigError


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_valid_and_round_trips(name, tmp_path):
    config = preset(name)
    for suffix in (".json", ".yaml"):
        path = tmp_path / f"config{suffix}"
        config.save(path)
        assert Config.load(path) == config


def test_presets_have_the_documented_sizes():
    assert preset("tiny").calm.backbone.hidden_size < preset("small").calm.backbone.hidden_size
    base = preset("base")
    # The paper's pairing: CALM-M against Transformer-S, Llama-3's vocabulary, the paper's AE.
    assert (base.calm.backbone.hidden_size, base.calm.backbone.num_layers, base.calm.backbone.intermediate_size) == (1024, 16, 2752)
    assert (base.ar.backbone.hidden_size, base.ar.backbone.num_layers, base.ar.backbone.intermediate_size) == (768, 12, 2048)
    assert base.tokenizer.vocab_size == 128_256
    assert (base.autoencoder.hidden_size, base.autoencoder.latent_size, base.autoencoder.chunk_size) == (512, 128, 4)
    # The method's robustness settings are on in every preset.
    for name in PRESETS:
        ae = preset(name).autoencoder
        assert (ae.kl_clamp, ae.kl_weight, ae.latent_dropout, ae.token_mask_prob) == (0.5, 1e-3, 0.15, 0.15)


def test_partial_config_file_applies_on_top_of_the_preset(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("calm:\n  backbone:\n    num_layers: 3\ntrain_ar:\n  lr: 0.002\n")
    config = resolve_config("tiny", path, ["train_ar.bf16=true"])
    assert config.calm.backbone.num_layers == 3
    assert config.train_ar.lr == 0.002
    assert config.train_ar.bf16 is True
    assert config.calm.backbone.hidden_size == preset("tiny").calm.backbone.hidden_size


def test_overrides_parse_values_to_the_field_type():
    config = preset("tiny").with_overrides(["train_calm.lr=1e-3", "train_calm.max_steps=7", "calm.energy_beta=2"])
    assert config.train_calm.lr == 0.001
    assert config.train_calm.max_steps == 7
    assert isinstance(config.calm.energy_beta, float) and config.calm.energy_beta == 2.0


@pytest.mark.parametrize("override, words", [
    ("calm.backbone.num_layerz=3", ["unknown config key", "calm.backbone.num_layerz", "num_layers"]),
    ("nosuchsection.x=1", ["unknown config key", "nosuchsection"]),
    ("calm.backbone.num_layers=four", ["calm.backbone.num_layers", "must be int", "four"]),
    ("train_ar.bf16=1", ["train_ar.bf16", "must be bool"]),
    ("train_ar.max_steps=true", ["train_ar.max_steps", "must be int"]),
    ("calm.backbone=3", ["calm.backbone", "mapping"]),
    ("no_equals_sign", ["key=value"]),
    ("tokenizer.vocab_size=100", ["tokenizer.vocab_size=100", "too small"]),
    ("calm.backbone.num_heads=5", ["not divisible"]),
    ("train_autoencoder.seq_len=30", ["seq_len=30", "multiple of autoencoder.chunk_size=4"]),
])
def test_bad_overrides_are_clear_errors(override, words):
    with pytest.raises(ConfigError) as error:
        preset("tiny").with_overrides([override])
    for word in words:
        assert word in str(error.value)


def test_bad_config_files_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Config.load(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match="broken.json is not valid JSON"):
        Config.load(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        Config.load(listed)
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset("huge")


def test_cli_config_show_applies_preset_file_and_overrides(tmp_path):
    out = tmp_path / "saved.json"
    result = CliRunner().invoke(main, ["config", "show", "--preset", "small", "--set", "calm.noise_size=32",
                                       "--format", "json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["calm"]["noise_size"] == 32
    assert shown["tokenizer"]["vocab_size"] == preset("small").tokenizer.vocab_size
    assert Config.load(out).calm.noise_size == 32


def test_cli_config_errors_have_no_traceback():
    result = CliRunner().invoke(main, ["config", "show", "--set", "calm.bogus=1"])
    assert result.exit_code == 1
    assert "Error: unknown config key 'calm.bogus'" in result.output
    assert "Traceback" not in result.output
