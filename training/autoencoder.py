"""Training the autoencoder, and loading a trained one (for evaluation and the CALM model).

`train_autoencoder` checks that the config, the token shards and their tokenizer fit together,
then runs the shared Trainer; the model's forward is the autoencoder objective.
"""
import logging
from pathlib import Path

import torch

from calm_edge.data import TokenShards
from calm_edge.errors import CalmEdgeError, ConfigError
from calm_edge.fileio import sha256_of
from calm_edge.models import Autoencoder
from calm_edge.training import checkpoint
from calm_edge.training.trainer import Trainer

log = logging.getLogger(__name__)

KIND = "autoencoder"


def train_autoencoder(config, data, out, tokenizer=None, resume=False, force=False, progress=True):
    """Train (or with `resume`, continue) an autoencoder on the shards in `data` into `out`.

    config: a Config, or None when resuming to reuse the checkpoint's own config.
    tokenizer: the tokenizer folder or file the shards were made with; by default the path
    recorded in the shards' index.json.
    Returns the trainer's summary.
    """
    if config is None:
        if not resume:
            raise ConfigError("a config is needed to start training; pass --preset/--config/--set")
        config = checkpoint.load_checkpoint(checkpoint.newest_to_resume(out), KIND).config
    shards = TokenShards(data)
    check_shards_vocabulary(config, shards, data)
    tokenizer_file = find_shards_tokenizer(shards, tokenizer)
    trainer = Trainer(KIND, Autoencoder, config, "train_autoencoder", data, out,
                      files={checkpoint.TOKENIZER_FILE: tokenizer_file}, progress=progress)
    return trainer.run(resume=resume, force=force)


def check_shards_vocabulary(config, shards, data):
    """The shards must be tokenized with the vocabulary the config's models are built for."""
    if shards.vocab_size != config.tokenizer.vocab_size:
        raise ConfigError(
            f"the shards in {data} use a {shards.vocab_size}-token vocabulary but the config has "
            f"tokenizer.vocab_size={config.tokenizer.vocab_size}; pass --set tokenizer.vocab_size={shards.vocab_size} "
            "or a preset with that vocabulary"
        )


def find_shards_tokenizer(shards, tokenizer=None):
    """The tokenizer.model whose sha256 the shards' index.json records, checked."""
    recorded = shards.index["tokenizer"]
    if tokenizer is not None:
        path = Path(tokenizer)
        if path.is_dir():
            path = path / checkpoint.TOKENIZER_FILE
    else:
        # index.json records the path as given to `data prepare`, relative to the folder it ran
        # in; look for it from there and from each folder above the shards (the sha256 decides).
        path = Path(recorded["file"])
        if not path.is_absolute():
            candidates = [path] + [parent / path for parent in shards.folder.resolve().parents]
            path = next((c for c in candidates if c.is_file()), path)
    if not path.is_file():
        raise CalmEdgeError(
            f"tokenizer {path} (recorded in {shards.folder / 'index.json'}) not found; "
            "pass --tokenizer with the tokenizer folder the shards were prepared with"
        )
    if sha256_of(path) != recorded["sha256"]:
        raise CalmEdgeError(
            f"tokenizer {path} is not the one {shards.folder} was prepared with (sha256 differs from its index.json); "
            "pass --tokenizer with the right folder, or prepare the data again"
        )
    return path


def load_autoencoder(path, device="cpu"):
    """A trained autoencoder in eval mode, and its Checkpoint, from a run or checkpoint folder."""
    saved = checkpoint.load_checkpoint(path, KIND)
    with torch.device("meta"):  # no weights of its own: the checkpoint's become its parameters
        model = Autoencoder(saved.config)
    checkpoint.load_weights_into(model, saved, assign=True)
    if not saved.tokenizer_path.is_file():
        raise CalmEdgeError(
            f"{saved.tokenizer_path} is missing; a checkpoint carries its tokenizer, copy the whole folder again"
        )
    return model.to(device).eval(), saved
