"""Checkpoint folders: written atomically, read back with clear errors.

A training run's `--out` folder holds its checkpoints under `checkpoints/step_NNNNNNNN/`:

    config.json         the full Config (Config.to_dict()) plus "kind" ("autoencoder", ...)
    model.safetensors   the model weights
    tokenizer.model     a copy of the tokenizer, so the checkpoint is self-contained (tokenizer.json
                        for a Hugging Face tokenizer: `calm-edge import` of the released models)
    trainer.json        step, tokens seen, wall time, the data loader's position, the latest
                        metrics, and the sha256 of the files above
    trainer_state.pt    optimizer state and RNG states (torch tensors only; read back with
                        torch.load(weights_only=True), so nothing is unpickled)

Each checkpoint is filled in a hidden temporary folder and renamed into place once complete,
so a crash (even SIGKILL) never leaves a half-written checkpoint under a `step_*` name; older
checkpoints are removed only after the new one is in place. Anything a reader can be pointed at
(a run folder or one checkpoint folder) goes through `resolve_checkpoint`.
"""
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from calm_edge.config import Config
from calm_edge.errors import CalmEdgeError, ConfigError
from calm_edge.fileio import atomic_output_dir, sha256_of, write_json_atomic
from calm_edge.tokenizer import FILES as tokenizer_files
from calm_edge.tokenizer import load_tokenizer

CHECKPOINTS_DIR = "checkpoints"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.model"
TRAINER_FILE = "trainer.json"
TRAINER_STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class Checkpoint:
    folder: Path
    kind: str
    config: Config
    weights: dict  # parameter name -> tensor
    trainer: dict  # trainer.json ({} when the folder has none)

    @property
    def tokenizer_path(self):
        return self.folder / tokenizer_files[self.config.tokenizer.kind]

    def tokenizer(self):
        """The checkpoint's tokenizer, with the special ids of its config."""
        return load_tokenizer(self.tokenizer_path, self.config.tokenizer.kind,
                              {"pad": self.config.tokenizer.pad_id, "bos": self.config.tokenizer.bos_id,
                               "eos": self.config.tokenizer.eos_id})


# ----- writing -------------------------------------------------------------------------------


def save_checkpoint(run_dir, step, kind, config, model, trainer_info, trainer_state, files=None, keep=1, weights=None):
    """Write `run_dir/checkpoints/step_{step}` atomically and keep only the newest `keep`.

    `files` maps names in the checkpoint to existing files to copy in (the tokenizer). `weights`:
    the state dict to write, when not `model.state_dict()` (a sharded model's, gathered whole).
    Returns the new checkpoint folder.
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    folder = root / f"step_{step:08d}"
    with atomic_output_dir(folder, force=True, what="checkpoint") as tmp:
        tensors = {name: t.detach().contiguous().cpu() for name, t in (weights or model.state_dict()).items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"kind": kind, "step": str(step)})
        write_json_atomic(tmp / CONFIG_FILE, {"kind": kind, **config.to_dict()})
        for name, source in (files or {}).items():
            shutil.copyfile(source, tmp / name)
        torch.save(trainer_state, tmp / TRAINER_STATE_FILE)
        checksums = {name: sha256_of(tmp / name) for name in (WEIGHTS_FILE, CONFIG_FILE, *(files or {}))}
        write_json_atomic(tmp / TRAINER_FILE, {"kind": kind, "step": step, **trainer_info, "sha256": checksums})
    for old in list_checkpoints(run_dir)[:-keep]:
        remove_folder(old)
    return folder


def remove_folder(folder):
    """Delete a folder so that no reader sees it half-deleted: rename it to a hidden name first."""
    folder = Path(folder)
    trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".trash", dir=folder.parent))
    os.replace(folder, trash / folder.name)
    shutil.rmtree(trash, ignore_errors=True)


def remove_leftovers(run_dir):
    """Delete the hidden temporary folders a killed run may have left in its checkpoints folder."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(".") and path.name.endswith((".partial", ".trash", ".old")):
                shutil.rmtree(path, ignore_errors=True)


# ----- finding -------------------------------------------------------------------------------


def list_checkpoints(run_dir):
    """The complete checkpoint folders of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def newest_to_resume(run_dir):
    """The newest checkpoint of a run that `--resume` continues, or a clear error."""
    found = list_checkpoints(run_dir)
    if not found:
        raise CalmEdgeError(f"nothing to resume: {run_dir} has no checkpoints; run without --resume to start training")
    return found[-1]


def resolve_checkpoint(path):
    """A checkpoint folder from a run folder (its newest checkpoint) or a checkpoint folder."""
    path = Path(path)
    if not path.exists():
        raise CalmEdgeError(
            f"checkpoint folder {path} does not exist; pass the --out folder of a `calm-edge train` run "
            f"or one of its {CHECKPOINTS_DIR}/step_* folders"
        )
    if not path.is_dir():
        raise CalmEdgeError(f"checkpoint {path} is a file, not a folder; pass the run folder or a checkpoint folder")
    if (path / CONFIG_FILE).is_file():
        return path
    checkpoints = list_checkpoints(path)
    if checkpoints:
        return checkpoints[-1]
    raise CalmEdgeError(
        f"{path} is not a checkpoint: it has no {CONFIG_FILE} and no {CHECKPOINTS_DIR}/step_* folders; "
        "pass the --out folder of a finished or running `calm-edge train` run"
    )


# ----- reading -------------------------------------------------------------------------------


def load_checkpoint(path, kind):
    """Read and check the checkpoint at `path` (run folder or checkpoint folder) of model `kind`."""
    folder = resolve_checkpoint(path)
    config_path = folder / CONFIG_FILE
    data = _read_json(config_path, "config")
    saved_kind = data.pop("kind", None) if isinstance(data, dict) else None
    if saved_kind != kind:
        raise CalmEdgeError(
            f"{config_path} belongs to a checkpoint of kind {saved_kind!r}, not {kind!r}; "
            f"pass the folder of a `calm-edge train {kind}` run"
        )
    try:
        config = Config.from_dict(data)
    except ConfigError as e:
        raise CalmEdgeError(f"{config_path} holds an invalid config ({e}); the checkpoint is damaged or edited") from None
    trainer = _read_trainer_info(folder / TRAINER_FILE) if (folder / TRAINER_FILE).exists() else {}
    for name, expected in trainer.get("sha256", {}).items():
        file = folder / name
        if not file.is_file():
            raise CalmEdgeError(f"{file} is missing from the checkpoint; copy the whole folder again or retrain")
        if sha256_of(file) != expected:
            raise CalmEdgeError(
                f"{file} is truncated or corrupt (its sha256 differs from {folder / TRAINER_FILE}); "
                "copy the checkpoint again, or resume/retrain from an intact one"
            )
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CalmEdgeError(f"{weights_path} is missing; copy the whole checkpoint folder again or retrain")
    try:
        weights = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CalmEdgeError(
            f"{weights_path} is truncated or corrupt ({e}); copy the checkpoint again, or resume/retrain from an intact one"
        ) from None
    return Checkpoint(folder=folder, kind=kind, config=config, weights=weights, trainer=trainer)


def load_weights_into(model, checkpoint, assign=False):
    """Copy a checkpoint's weights into `model` (or, with `assign`, make them its parameters: a model
    built on the meta device then holds the one copy the checkpoint was read into), naming the file
    when they do not fit."""
    try:
        model.load_state_dict(checkpoint.weights, strict=True, assign=assign)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[:3]
        raise CalmEdgeError(
            f"{checkpoint.folder / WEIGHTS_FILE} does not match the model its {CONFIG_FILE} describes "
            f"({' '.join(first)}); the checkpoint is damaged or was edited by hand"
        ) from None


def load_trainer_state(folder):
    """Optimizer and RNG state of a checkpoint (tensors only; weights_only=True unpickles nothing else)."""
    path = Path(folder) / TRAINER_STATE_FILE
    try:
        return torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise CalmEdgeError(f"{path} is missing, so this checkpoint cannot be resumed; start a new run") from None
    except Exception as e:  # torch raises many types for a damaged file
        raise CalmEdgeError(f"{path} is truncated or corrupt ({type(e).__name__}); resume from an intact checkpoint") from None


def _read_trainer_info(path):
    """trainer.json, checked to be what every reader of `Checkpoint.trainer` expects: an object whose
    sha256 maps file names to digests (a list or a hand-edited file fails here, naming the file)."""
    info = _read_json(path, "trainer state")
    checksums = info.get("sha256", {}) if isinstance(info, dict) else None
    if not isinstance(checksums, dict) or not all(isinstance(v, str) for v in checksums.values()):
        raise CalmEdgeError(f"{path} must hold a JSON object whose sha256 maps files to digests, not "
                            f"{type(info).__name__ if not isinstance(info, dict) else 'this'}; the checkpoint is "
                            "damaged or edited, copy it again or resume/retrain from an intact one")
    return info


def _read_json(path, what):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CalmEdgeError(f"{path} is missing; the checkpoint is incomplete, copy the whole folder again") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CalmEdgeError(f"{path} ({what}) is corrupt ({e}); copy the checkpoint again or retrain") from None
