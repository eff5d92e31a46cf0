"""Checkpoints for speed measurements: untrained models of any preset's dimensions, wider contexts.

Speed does not depend on trained weights, so the benchmark measures packages of the paper's
dimensions (`--preset base`) without training them: `random_checkpoint` builds the CALM or AR
model of a config with its initial (random) weights and saves it as an ordinary checkpoint, so
`calm-edge export` (ONNX package) and `calm-edge export --format hf` (the peers' input) run on
it unchanged. The checkpoint's trainer.json says "random_weights": true, and the package's
provenance carries it, so nobody mistakes such a package for a trained one.

    random_checkpoint(preset("base"), "calm", "runs/tok", "runs/calm-base-random")    # as benchmarks/bench.py does

The tokenizer must have the config's vocabulary size. A smaller one (the 8,192-piece `small`
tokenizer under the base preset's 128,256) is padded with UNUSED pieces, which SentencePiece never
produces when encoding, so text still encodes exactly as before while the ids reach the full
vocabulary, as a model of that size needs.
"""
import tempfile
from pathlib import Path

import torch
from sentencepiece import sentencepiece_model_pb2

from calm_edge.errors import CalmEdgeError
from calm_edge.models.ar import ARModel
from calm_edge.models.calm import CalmModel
from calm_edge.tokenizer import FILES as tokenizer_files
from calm_edge.tokenizer import HFTokenizer, Tokenizer
from calm_edge.training import checkpoint
from calm_edge.training.language_models import load_language_model

KINDS = ("calm", "ar")


def pad_tokenizer(source, target, vocab_size):
    """Write `source`'s SentencePiece model to `target` with UNUSED pieces up to `vocab_size`."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(source).read_bytes())
    have = len(proto.pieces)
    if have > vocab_size:
        raise CalmEdgeError(f"tokenizer {source} has {have} pieces, more than the config's vocab_size={vocab_size}; "
                            f"pass --set tokenizer.vocab_size={have} or a smaller tokenizer")
    lowest = min(p.score for p in proto.pieces)
    for i in range(have, vocab_size):
        piece = proto.pieces.add()
        piece.piece = f"<unused_{i}>"
        piece.score = lowest - 1.0
        piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.UNUSED
    proto.trainer_spec.vocab_size = vocab_size
    Path(target).write_bytes(proto.SerializeToString())
    return vocab_size - have


def random_checkpoint(config, kind, tokenizer, out, seed=0, force=False):
    """Save the `kind` model of `config` with initial weights as a checkpoint run folder `out`."""
    if kind not in KINDS:
        raise CalmEdgeError(f"model kind {kind!r} is unknown; choose one of: {', '.join(KINDS)}")
    out = Path(out)
    if out.exists() and not force:
        raise CalmEdgeError(f"{out} already exists; pass --force to replace it or choose another --out")
    if config.tokenizer.kind == "hf-bpe":
        # A Hugging Face tokenizer (an imported model's, [PAD] included) must have the vocabulary as it is.
        source = HFTokenizer(tokenizer)
        if source.vocab_size != config.tokenizer.vocab_size:
            raise CalmEdgeError(f"tokenizer {source.path} has {source.vocab_size} tokens, the config "
                                f"{config.tokenizer.vocab_size}; pass the tokenizer of the model (an imported run's)")
    else:
        source = Tokenizer(tokenizer)  # accepts a folder or a tokenizer.model file, with a clear error
        ids = config.tokenizer.reserved_ids
        special = {"pad": source.pad_id, "bos": source.bos_id, "eos": source.eos_id, "unk": source.unk_id}
        if special != dict(ids):
            raise CalmEdgeError(f"tokenizer {source.path} has special ids {special}, the config expects {dict(ids)}; "
                                "use a tokenizer made by `calm-edge tokenizer train`")
    torch.manual_seed(seed)
    model = CalmModel(config) if kind == "calm" else ARModel(config)
    with tempfile.TemporaryDirectory() as tmp:
        if source.kind == "hf-bpe":
            file, added = Path(source.path), 0
        else:
            file = Path(tmp) / checkpoint.TOKENIZER_FILE
            added = pad_tokenizer(source.path, file, config.tokenizer.vocab_size)
        info = {"random_weights": True, "seed": seed, "tokens_seen": 0, "data": None,
                "tokenizer_padding": {"source": str(source.path), "unused_pieces_added": added}}
        if out.exists():
            checkpoint.remove_folder(out)
        checkpoint.save_checkpoint(out, 0, kind, config, model, info, {},
                                   files={tokenizer_files[source.kind]: file})
    return out


def widened_checkpoint(source, out, max_positions, force=False):
    """A copy of the checkpoint at `source` whose backbone context is `max_positions`, for speed runs.

    The backbones use rotary positions computed on the fly, so the context is a number in the
    config and no weight depends on it: the copy holds the very same weights. The benchmark needs
    it where the benchmark's default matrix (a 512-token prompt and 256 new tokens) passes a trained model's
    context, e.g. the `small` AR's 512 tokens; what the model would generate past its trained
    context does not matter for speed. trainer.json records the original context.
    """
    out = Path(out)
    if out.exists() and not force:
        raise CalmEdgeError(f"{out} already exists; pass --force to replace it or choose another --out")
    model, saved = load_language_model(source)
    section = saved.config.calm if saved.kind == "calm" else saved.config.ar
    original = section.backbone.max_positions
    config = saved.config.with_overrides([f"{saved.kind}.backbone.max_positions={max_positions}"])
    info = {**{k: v for k, v in saved.trainer.items() if k not in ("sha256", "kind", "step")},
            "context_widened_from": original, "source_checkpoint": str(saved.folder)}
    if out.exists():
        checkpoint.remove_folder(out)
    checkpoint.save_checkpoint(out, saved.trainer.get("step", 0), saved.kind, config, model, info, {},
                               files={saved.tokenizer_path.name: saved.tokenizer_path})
    return out
