"""Typed configuration for every stage of the pipeline, and the presets.

One `Config` holds the tokenizer, the three models (autoencoder, CALM, token-by-token AR
baseline) and the training settings of each model. It is what a checkpoint stores next to its
weights, so a checkpoint is self-describing.

Configs load from and save to JSON or YAML (by file extension). On the command line a run
starts from `--preset NAME` (default `tiny`), then `--config FILE`, then each `--set key=value`
override, in that order. Unknown keys and values of the wrong type are `ConfigError`s that name
the key.

Presets:
  tiny   the whole pipeline in minutes on 2 CPU cores (tests, quickstart)
  small  the reference model, trained on ../shared/data on a CPU machine in a few hours
  base   the paper's CALM-M dimensions against Transformer-S, for GPU clusters
"""
import copy
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from calm_edge.errors import ConfigError
from calm_edge.fileio import write_bytes_atomic


TOKENIZER_KINDS = ("sentencepiece", "hf-bpe")
ARCHITECTURES = ("calm-edge", "official")
PROMPT_FILLS = ("left-eos", "right-pad")


@dataclass
class TokenizerConfig:
    """The tokenizer: calm-edge's SentencePiece BPE with byte fallback (no text is ever lost or mapped
    to unk), or a Hugging Face byte-level BPE (`tokenizer.json`, as the Llama-3 tokenizer of the
    released CALM models: kind "hf-bpe", special ids of its own, bos prepended to every text)."""

    kind: str = "sentencepiece"
    vocab_size: int = 8192
    character_coverage: float = 0.9995  # characters outside it are spelled as UTF-8 bytes
    max_sentences: int = 1_000_000  # lines sampled for training when the corpus has more
    # Reserved ids. The byte-fallback pieces <0x00>..<0xFF> follow them, then the learned pieces.
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    unk_id: int = 3  # -1: the tokenizer has none (byte-level BPE never needs one)

    @property
    def reserved_ids(self):
        ids = {"pad": self.pad_id, "bos": self.bos_id, "eos": self.eos_id, "unk": self.unk_id}
        return {name: i for name, i in ids.items() if i >= 0}

    @property
    def min_vocab_size(self):
        # 4 reserved ids + 256 byte pieces + room for at least a few learned merges.
        return len(self.reserved_ids) + 256 + 16


@dataclass
class AutoencoderConfig:
    """Compresses each chunk of K tokens into one latent vector and back (paper section 2)."""

    chunk_size: int = 4  # K: tokens per latent vector
    hidden_size: int = 512
    latent_size: int = 128
    intermediate_size: int = 1024  # width of the residual MLP layers
    num_encoder_layers: int = 2  # residual MLP layers on each side of the chunk projection
    num_decoder_layers: int = 2
    # Biases in the chunk projections (compress K token states into one, expand it back): the
    # released CALM autoencoder has them (its squeeze_layer and expand_layer), calm-edge's own not.
    projection_bias: bool = False
    # Robustness, part of the method: a variational posterior whose per-dimension KL is clamped
    # and weighted, dropout on the sampled latent, and masked input tokens during training.
    kl_clamp: float = 0.5
    kl_weight: float = 1e-3
    latent_dropout: float = 0.15
    token_mask_prob: float = 0.15


@dataclass
class BackboneConfig:
    """A Llama-style Transformer: RMSNorm, rotary positions, SwiGLU, grouped KV heads."""

    hidden_size: int = 1024
    intermediate_size: int = 2752
    num_layers: int = 16
    num_heads: int = 16
    num_kv_heads: int = 4
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_positions: int = 2048  # CALM: vectors; AR: tokens

    @property
    def head_dim(self):
        return self.hidden_size // self.num_heads


@dataclass
class CalmConfig:
    """The CALM language model: backbone over chunk vectors plus an energy-based head."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    noise_size: int = 64  # uniform noise the energy head refines into a latent
    energy_head_layers: int = 4
    # The structure of the input projection and of the energy head: calm-edge's own, or that of the
    # released CALM models (README: The model's two structures; calm_edge/models/calm.py).
    input_projection: str = "calm-edge"
    energy_head: str = "calm-edge"
    # Start calm-edge's energy head with its last layer at zero (every latent 0 at first), as the
    # official head does; an initialisation only (benchmarks/results/architecture_tiny.json).
    head_zero_init: bool = False
    # How a prompt is filled to a whole number of chunks: eos ids on the left (calm-edge's models),
    # or pad ids on the right, inside the last chunk (the released models' `generate`).
    prompt_fill: str = "left-eos"
    num_model_samples: int = 8  # N samples from the head per position for the energy score
    num_target_samples: int = 100  # M samples from the autoencoder posterior of the target
    energy_beta: float = 1.0  # distance exponent of the energy score


@dataclass
class ARConfig:
    """The token-by-token baseline: the same backbone class with a softmax head."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)


@dataclass
class TrainConfig:
    """Optimisation settings of one model's training run."""

    max_steps: int = 10_000
    batch_size: int = 32
    seq_len: int = 512  # tokens per training window; a multiple of K
    grad_accum_steps: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 500
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    bf16: bool = False  # bfloat16 autocast
    # Under torchrun, shard weights, gradients and optimizer state over the processes (PyTorch's
    # FSDP, `fully_shard`) instead of a full copy in each (DistributedDataParallel): for models that
    # do not fit one device. The same weights either way, up to float summation order.
    fsdp: bool = False
    # torch.compile the model's training forward and backward (benchmarks/results/train_speed.json).
    compile: bool = False
    # The device's peak FLOP/s for the model FLOPs utilisation logged with each train record; 0: the
    # peak of a known GPU (training/throughput.py), none logged on other devices.
    peak_flops: float = 0.0
    eval_every: int = 500
    eval_batches: int = 20
    save_every: int = 500
    log_every: int = 10
    seed: int = 1234


@dataclass
class Config:
    """Everything one experiment needs: tokenizer, models and their training."""

    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    calm: CalmConfig = field(default_factory=CalmConfig)
    ar: ARConfig = field(default_factory=ARConfig)
    train_autoencoder: TrainConfig = field(default_factory=TrainConfig)
    train_calm: TrainConfig = field(default_factory=TrainConfig)
    train_ar: TrainConfig = field(default_factory=TrainConfig)

    def validate(self):
        """Check values that each make sense alone but not together. Returns self."""
        tok, ae = self.tokenizer, self.autoencoder
        for key, value, choices in (("tokenizer.kind", tok.kind, TOKENIZER_KINDS),
                                    ("calm.input_projection", self.calm.input_projection, ARCHITECTURES),
                                    ("calm.energy_head", self.calm.energy_head, ARCHITECTURES),
                                    ("calm.prompt_fill", self.calm.prompt_fill, PROMPT_FILLS)):
            if value not in choices:
                raise ConfigError(f"{key}={value!r} is not one of: {', '.join(choices)}")
        if tok.kind == "sentencepiece":
            if tok.vocab_size < tok.min_vocab_size:
                raise ConfigError(
                    f"tokenizer.vocab_size={tok.vocab_size} is too small: the 4 reserved ids and 256 byte "
                    f"pieces need at least {tok.min_vocab_size}; set tokenizer.vocab_size (--vocab-size) to {tok.min_vocab_size} or more"
                )
            if sorted(tok.reserved_ids.values()) != list(range(4)):
                raise ConfigError(
                    f"tokenizer reserved ids {tok.reserved_ids} must be 0, 1, 2, 3 in some order "
                    "(byte pieces start right after them)"
                )
        for name in ("pad_id", "bos_id", "eos_id"):
            if not 0 <= getattr(tok, name) < tok.vocab_size:
                raise ConfigError(f"tokenizer.{name}={getattr(tok, name)} is outside the vocabulary of {tok.vocab_size}")
        if ae.chunk_size < 1:
            raise ConfigError(f"autoencoder.chunk_size={ae.chunk_size} must be at least 1")
        for name in ("latent_dropout", "token_mask_prob"):
            value = getattr(ae, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"autoencoder.{name}={value} must be in [0, 1)")
        for section in ("calm", "ar"):
            bb = getattr(self, section).backbone
            if bb.hidden_size % bb.num_heads:
                raise ConfigError(
                    f"{section}.backbone.hidden_size={bb.hidden_size} is not divisible by num_heads={bb.num_heads}"
                )
            if bb.num_heads % bb.num_kv_heads:
                raise ConfigError(
                    f"{section}.backbone.num_heads={bb.num_heads} is not divisible by num_kv_heads={bb.num_kv_heads}"
                )
        _check_ranges(self, "")
        for section in ("train_autoencoder", "train_calm", "train_ar"):
            seq_len = getattr(self, section).seq_len
            if seq_len % ae.chunk_size:
                raise ConfigError(
                    f"{section}.seq_len={seq_len} is not a multiple of autoencoder.chunk_size={ae.chunk_size}"
                )
        return self

    # ----- conversion ------------------------------------------------------------------------

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data, base=None):
        """Build a Config from a (possibly partial) dict, on top of `base` (defaults if None)."""
        config = copy.deepcopy(base) if base is not None else cls()
        _merge_into(config, data, prefix="")
        return config.validate()

    def save(self, path):
        """Write to `path` as JSON or YAML, chosen by its extension."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        else:
            text = json.dumps(self.to_dict(), indent=2) + "\n"
        write_bytes_atomic(path, text.encode("utf-8"))

    @classmethod
    def load(cls, path, base=None):
        """Read a JSON or YAML file (whole or partial config) on top of `base`."""
        return cls.from_dict(read_config_file(path), base=base)

    def with_overrides(self, assignments):
        """Apply `key=value` strings, e.g. `calm.backbone.num_layers=4` or `train_ar.bf16=true`."""
        config = copy.deepcopy(self)
        for assignment in assignments:
            key, sep, raw = assignment.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"override {assignment!r} is not of the form key=value, e.g. train_ar.lr=1e-3")
            # YAML parsing turns "4" into 4, "true" into True and "1e-3" into 0.001.
            value = yaml.safe_load(raw) if raw.strip() else raw
            nested = value
            for part in reversed(key.strip().split(".")):
                nested = {part: nested}
            _merge_into(config, nested, prefix="")
        return config.validate()


# The range of every number a config holds, by dataclass and field: (low, high, low_is_open).
# A missing bound is unbounded; fields not named are at least 0 (counts, sizes, weights). The
# upper bounds are what the code can represent (token ids as 32-bit shards, one process's
# memory), far beyond any real model, so a typo such as vocab_size 2**40 fails here, not in a library.
_POSITIVE = (0, None, True)
_AT_LEAST_1 = (1, None, False)
_UNIT_OPEN_TOP = (0, 1, False)  # checked as [0, 1): see _in_range
_RANGES = {
    TokenizerConfig: {"vocab_size": (1, 1 << 22, False), "character_coverage": (0, 1, True),
                      "max_sentences": _AT_LEAST_1, "pad_id": (-1, None, False), "bos_id": (-1, None, False),
                      "eos_id": (-1, None, False), "unk_id": (-1, None, False)},
    AutoencoderConfig: {"chunk_size": (1, 64, False), "hidden_size": _AT_LEAST_1, "latent_size": _AT_LEAST_1,
                        "intermediate_size": _AT_LEAST_1, "latent_dropout": _UNIT_OPEN_TOP,
                        "token_mask_prob": _UNIT_OPEN_TOP},
    BackboneConfig: {"hidden_size": _AT_LEAST_1, "intermediate_size": _AT_LEAST_1, "num_layers": _AT_LEAST_1,
                     "num_heads": _AT_LEAST_1, "num_kv_heads": _AT_LEAST_1, "rope_theta": _POSITIVE,
                     "rms_norm_eps": _POSITIVE, "max_positions": (1, 1 << 24, False)},
    CalmConfig: {"noise_size": _AT_LEAST_1, "energy_head_layers": _AT_LEAST_1, "num_model_samples": (2, None, False),
                 "num_target_samples": _AT_LEAST_1, "energy_beta": (0, 2, True)},
    TrainConfig: {"max_steps": _AT_LEAST_1, "batch_size": _AT_LEAST_1, "seq_len": _AT_LEAST_1,
                  "grad_accum_steps": _AT_LEAST_1, "lr": _POSITIVE, "min_lr_ratio": (0, 1, False),
                  "beta1": _UNIT_OPEN_TOP, "beta2": _UNIT_OPEN_TOP, "grad_clip": _POSITIVE,
                  "eval_every": _AT_LEAST_1, "eval_batches": _AT_LEAST_1, "save_every": _AT_LEAST_1,
                  "log_every": _AT_LEAST_1, "seed": (0, 2**63 - 1, False)},
}


def _in_range(value, bound):
    low, high, low_open = bound
    if value < low or (low_open and value == low):
        return False
    if bound is _UNIT_OPEN_TOP:
        return value < high
    return high is None or value <= high


def _describe(bound):
    low, high, low_open = bound
    if bound is _UNIT_OPEN_TOP:
        return "in [0, 1)"
    first = f"more than {low}" if low_open else f"at least {low}"
    return first if high is None else f"{first} and at most {high}"


def _check_ranges(obj, prefix):
    """Every number of `obj` (a config dataclass, recursively) within its range in _RANGES."""
    bounds = _RANGES.get(type(obj), {})
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            _check_ranges(value, key + ".")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            bound = bounds.get(f.name, (0, None, False))
            if not _in_range(value, bound):
                raise ConfigError(f"config key {key!r} is {value!r}; it must be {_describe(bound)}")


def read_config_file(path):
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text; pass a JSON or YAML file") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder; pass a JSON or YAML file") from None
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; pass an existing JSON or YAML file") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(data).__name__}")
    return data


def _merge_into(obj, data, prefix):
    """Set the fields of dataclass `obj` from `data`, checking names and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    for key, value in data.items():
        path = prefix + str(key)
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key {path!r}; known keys here: {known}")
        expected = hints[key]
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge_into(current, value, prefix=path + ".")
        else:
            setattr(obj, key, _checked_value(path, value, expected))


def _checked_value(path, value, expected):
    # bool is a subclass of int in Python; a flag must be a real bool and a count a real int.
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-3" (no dot) as a string; people write learning rates that way.
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
        if ok and not math.isfinite(value):  # NaN compares false with every bound, so refuse it here
            raise ConfigError(f"config key {path!r} is {value!r}; it must be a finite number")
    elif expected is str:
        ok = isinstance(value, str)
    else:  # pragma: no cover - every field above is one of the four
        raise TypeError(f"unsupported config type {expected} for {path}")
    if not ok:
        raise ConfigError(f"config key {path!r} must be {expected.__name__}, got {value!r} ({type(value).__name__})")
    return value


# ----- presets -------------------------------------------------------------------------------


def _tiny():
    backbone = dict(hidden_size=64, intermediate_size=172, num_layers=2, num_heads=4, num_kv_heads=2, max_positions=256)
    train = dict(max_steps=300, batch_size=16, seq_len=64, lr=3e-3, warmup_steps=20, eval_every=100,
                 eval_batches=4, save_every=100, log_every=10)
    return {
        "tokenizer": dict(vocab_size=1024),
        "autoencoder": dict(chunk_size=4, hidden_size=64, latent_size=16, intermediate_size=128,
                            num_encoder_layers=1, num_decoder_layers=1),
        "calm": dict(backbone=backbone, noise_size=16, energy_head_layers=2),
        "ar": dict(backbone=backbone),
        "train_autoencoder": train,
        "train_calm": train,
        "train_ar": train,
    }


def _small():
    backbone = dict(hidden_size=384, intermediate_size=1024, num_layers=6, num_heads=6, num_kv_heads=2, max_positions=512)
    return {
        "tokenizer": dict(vocab_size=8192),
        "autoencoder": dict(chunk_size=4, hidden_size=256, latent_size=64, intermediate_size=512,
                            num_encoder_layers=2, num_decoder_layers=2),
        # The official input projection (benchmarks/results/architecture_tiny.json: lower held-out
        # energy and a larger context gain on every seed; README: The model's two structures).
        "calm": dict(backbone=backbone, noise_size=64, energy_head_layers=3, input_projection="official"),
        "ar": dict(backbone=backbone),
        # Measured on a 2-core CPU (benchmarks/autoencoder_small.py): bf16 autocast (needs a CPU
        # with bfloat16 support, else --set train_autoencoder.bf16=false) and a high learning rate.
        "train_autoencoder": dict(max_steps=3000, batch_size=32, seq_len=128, lr=2e-3, warmup_steps=200,
                                  bf16=True, eval_every=250, eval_batches=10, save_every=250),
        # Equal training FLOPs (tests/test_flops.py checks it): a CALM token costs 0.751 of an AR
        # token here (calm_edge/flops.py), so CALM takes 500 / 0.751 = 666 steps of the same batches.
        # 0.34 PFLOP each: measured ~3 s per CALM step and ~6 s per AR step on 2 cores with bf16,
        # so both models train in about 1.5 hours on this CPU.
        "train_calm": dict(max_steps=666, batch_size=16, seq_len=512, lr=1e-3, warmup_steps=50,
                           bf16=True, eval_every=100, eval_batches=8, save_every=100),
        "train_ar": dict(max_steps=500, batch_size=16, seq_len=512, lr=1e-3, warmup_steps=50,
                         bf16=True, eval_every=100, eval_batches=8, save_every=100),
    }


def _base():
    # The paper's pairing: CALM-M (hidden 1024, 16 layers) against Transformer-S (hidden 768,
    # 12 layers), with Llama-3's vocabulary size and the paper's autoencoder (512 / 128).
    return {
        "tokenizer": dict(vocab_size=128_256, max_sentences=2_000_000),
        "autoencoder": dict(chunk_size=4, hidden_size=512, latent_size=128, intermediate_size=1024,
                            num_encoder_layers=2, num_decoder_layers=2),
        "calm": dict(backbone=dict(hidden_size=1024, intermediate_size=2752, num_layers=16, num_heads=16,
                                   num_kv_heads=4, max_positions=2048), noise_size=64, energy_head_layers=4),
        "ar": dict(backbone=dict(hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12,
                                 num_kv_heads=4, max_positions=8192)),
        "train_autoencoder": dict(max_steps=30_000, batch_size=512, seq_len=2048, lr=3e-4, bf16=True),
        "train_calm": dict(max_steps=250_000, batch_size=256, seq_len=2048, lr=3e-4, bf16=True, warmup_steps=2000),
        "train_ar": dict(max_steps=250_000, batch_size=256, seq_len=2048, lr=3e-4, bf16=True, warmup_steps=2000),
    }


PRESETS = {"tiny": _tiny, "small": _small, "base": _base}


def preset(name):
    """The named preset as a validated Config."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return Config.from_dict(PRESETS[name]())


def resolve_config(preset_name="tiny", config_file=None, overrides=()):
    """Preset, then config file, then `key=value` overrides: what the CLI's options build."""
    config = preset(preset_name)
    if config_file is not None:
        config = Config.load(config_file, base=config)
    return config.with_overrides(overrides)
