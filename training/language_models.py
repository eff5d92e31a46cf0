"""Training the two language models, CALM and the token-by-token AR baseline, and loading them.

Both run on the shared Trainer (`trainer.py`); they differ only in the model they build. CALM
needs a trained autoencoder: its weights are loaded into the CALM model before the first step,
kept frozen, and saved inside every CALM checkpoint, so a CALM checkpoint is self-contained
(the export reads the decoder from it).

Each run writes `run_summary.json` beside its checkpoints: parameters, tokens seen, training
FLOPs and inference FLOPs per generated token (`calm_edge.flops`), so the two kinds can be
compared at equal training compute.
"""
import dataclasses
import json
import logging
from pathlib import Path

import torch

from calm_edge import flops
from calm_edge.config import Config
from calm_edge.data import TokenShards
from calm_edge.errors import CalmEdgeError, ConfigError
from calm_edge.fileio import write_json_atomic
from calm_edge.models.ar import ARModel
from calm_edge.models.calm import CalmModel
from calm_edge.training import checkpoint
from calm_edge.training.autoencoder import check_shards_vocabulary, find_shards_tokenizer, load_autoencoder
from calm_edge.training.trainer import Trainer

log = logging.getLogger(__name__)

SUMMARY_FILE = "run_summary.json"


def check_autoencoder_fits(config: Config, ae_config: Config, ae_folder):
    """The CALM config must describe exactly the autoencoder it is given: K, latent size, all of it."""
    mine, theirs = dataclasses.asdict(config.autoencoder), dataclasses.asdict(ae_config.autoencoder)
    differences = [f"autoencoder.{k}: checkpoint {theirs[k]!r}, config {mine[k]!r}" for k in mine if mine[k] != theirs[k]]
    if config.tokenizer.vocab_size != ae_config.tokenizer.vocab_size:
        differences.append(f"tokenizer.vocab_size: checkpoint {ae_config.tokenizer.vocab_size}, "
                           f"config {config.tokenizer.vocab_size}")
    if differences:
        raise ConfigError(
            f"the autoencoder in {ae_folder} does not match this CALM config ({'; '.join(differences)}); "
            "use the --preset/--set values the autoencoder was trained with"
        )


def train_calm(config, autoencoder, data, out, tokenizer=None, resume=False, force=False, progress=True):
    """Train (or resume) a CALM model on shards `data` with the frozen autoencoder at `autoencoder`."""
    if config is None:
        config = checkpoint.load_checkpoint(checkpoint.newest_to_resume(out), "calm").config
    ae_model, ae_saved = load_autoencoder(autoencoder)
    check_autoencoder_fits(config, ae_saved.config, ae_saved.folder)
    shards = TokenShards(data)
    check_shards_vocabulary(config, shards, data)
    if ae_saved.trainer.get("data_tokenizer_sha256") not in (None, shards.index["tokenizer"]["sha256"]):
        raise CalmEdgeError(
            f"the autoencoder in {ae_saved.folder} was trained on data of another tokenizer than {data}; "
            "train both on data prepared with the same tokenizer"
        )

    def build(cfg):
        return CalmModel(cfg, autoencoder=ae_model)

    trainer = Trainer("calm", build, config, "train_calm", data, out,
                      files={checkpoint.TOKENIZER_FILE: find_shards_tokenizer(shards, tokenizer)}, progress=progress,
                      inputs={"--autoencoder": autoencoder})
    result = trainer.run(resume=resume, force=force)
    result["autoencoder"] = {"checkpoint": str(ae_saved.folder), "step": ae_saved.trainer.get("step"),
                             "valid": ae_saved.trainer.get("valid", {})}
    return _write_summary(out, config, "calm", result, trainer.world.is_main)


def train_ar(config, data, out, tokenizer=None, resume=False, force=False, progress=True):
    """Train (or resume) the token-by-token baseline on shards `data`."""
    if config is None:
        config = checkpoint.load_checkpoint(checkpoint.newest_to_resume(out), "ar").config
    shards = TokenShards(data)
    check_shards_vocabulary(config, shards, data)
    trainer = Trainer("ar", ARModel, config, "train_ar", data, out,
                      files={checkpoint.TOKENIZER_FILE: find_shards_tokenizer(shards, tokenizer)}, progress=progress)
    return _write_summary(out, config, "ar", trainer.run(resume=resume, force=force), trainer.world.is_main)


def _write_summary(out, config, kind, result, write=True):
    """The run's summary, written to run_summary.json when `write` (rank 0 of a torchrun job)."""
    # flops.summary's "parameters" (trained ones) replaces the trainer's count, which for CALM
    # includes the frozen autoencoder.
    summary = {**result, "parameters_with_frozen": result["parameters"],
               **flops.summary(config, kind, tokens_seen=result["tokens_seen"])}
    if write:
        write_json_atomic(Path(out) / SUMMARY_FILE, summary)
    return summary


def _read_kind(folder):
    path = Path(folder) / checkpoint.CONFIG_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("kind")
    except (OSError, json.JSONDecodeError, AttributeError):
        raise CalmEdgeError(f"{path} is missing or corrupt; copy the whole checkpoint folder again") from None


def load_language_model(path, device="cpu"):
    """A trained CALM or AR model in eval mode, and its Checkpoint, from a run or checkpoint folder."""
    folder = checkpoint.resolve_checkpoint(path)
    kind = _read_kind(folder)
    if kind not in ("calm", "ar"):
        raise CalmEdgeError(
            f"{folder} holds a {kind} checkpoint, not a language model; pass the folder of a "
            "`calm-edge train calm` or `calm-edge train ar` run"
        )
    saved = checkpoint.load_checkpoint(folder, kind)
    with torch.device("meta"):  # no weights of its own: the checkpoint's become its parameters
        model = CalmModel(saved.config) if kind == "calm" else ARModel(saved.config)
    checkpoint.load_weights_into(model, saved, assign=True)
    return model.to(device).eval(), saved
