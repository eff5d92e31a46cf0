"""The tokenizer: a SentencePiece BPE model with byte fallback, trained and loaded here.

Training settings are chosen so that `decode(encode(text)) == text` for every Unicode string:

- byte fallback: characters the model did not learn are spelled as their UTF-8 bytes
  (`<0x00>` .. `<0xFF>`), so nothing is ever mapped to unk;
- the `identity` normaliser and no whitespace clean-up, so the text is not rewritten;
- no dummy prefix, so encodings concatenate: `encode(a) + encode(b)` decodes to `a + b`
  (which streaming relies on);
- SentencePiece writes a space as the meta symbol U+2581 and decodes U+2581 back to a space, so
  a literal U+2581 in the input is encoded as its three byte pieces, which decode to itself.

A tokenizer folder holds `tokenizer.model` (what a model package ships) and `tokenizer.json`
(the reserved ids, the vocabulary size and what it was trained on).
"""
import io
import json
import logging
import re
import time
from pathlib import Path

import sentencepiece as spm

from calm_edge.config import TokenizerConfig
from calm_edge.corpus import iter_documents
from calm_edge.errors import CalmEdgeError, ConfigError, DataError
from calm_edge.fileio import atomic_output_dir, sha256_of, write_json_atomic

log = logging.getLogger(__name__)

MODEL_FILE = "tokenizer.model"
INFO_FILE = "tokenizer.json"
SPACE_SYMBOL = "\u2581"  # SentencePiece's meta symbol for a space


class Tokenizer:
    """Encode text to token ids and back. Loads a folder or a `tokenizer.model` file."""

    def __init__(self, path):
        path = Path(path)
        model_path = path / MODEL_FILE if path.is_dir() else path
        if not model_path.is_file():
            raise CalmEdgeError(
                f"tokenizer model {model_path} not found; train one with `calm-edge tokenizer train` "
                "or point at a folder that holds tokenizer.model"
            )
        self.path = model_path
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(model_path))
        except (OSError, RuntimeError) as e:
            raise CalmEdgeError(f"{model_path} is not a valid SentencePiece model ({e}); retrain or re-export it") from None
        self.vocab_size = self._sp.get_piece_size()
        self.pad_id = self._sp.pad_id()
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        self.unk_id = self._sp.unk_id()
        # The byte pieces that spell U+2581, which SentencePiece would otherwise read as a space.
        self._space_symbol_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE_SYMBOL.encode("utf-8")]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no bos or eos added."""
        if SPACE_SYMBOL not in text:
            return self._sp.encode(text)
        ids = []
        for i, part in enumerate(text.split(SPACE_SYMBOL)):
            if i:
                ids.extend(self._space_symbol_ids)
            if part:
                ids.extend(self._sp.encode(part))
        return ids

    def encode_batch(self, texts, num_threads=1) -> list[list[int]]:
        """Encode many texts at once (SentencePiece's own threads when `num_threads` > 1)."""
        plain = [SPACE_SYMBOL not in t for t in texts]
        if all(plain):
            return self._sp.encode(list(texts), num_threads=num_threads)
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def sha256(self) -> str:
        return sha256_of(self.path)


def train_tokenizer(sources, out, config: TokenizerConfig, text_field="text", force=False, progress=True):
    """Train a tokenizer on the documents of `sources` and write it to folder `out`.

    Documents are split into lines; SentencePiece samples `config.max_sentences` of them.
    Returns the info dict written to `tokenizer.json`.
    """
    if config.vocab_size < config.min_vocab_size:
        raise ConfigError(
            f"vocab size {config.vocab_size} is too small: the 4 reserved ids and 256 byte pieces need "
            f"at least {config.min_vocab_size}; pass --vocab-size {config.min_vocab_size} or more"
        )
    started = time.perf_counter()
    lines = []
    characters = 0
    for document in iter_documents(sources, text_field=text_field, progress=progress, desc="reading text"):
        for line in document.text.split("\n"):
            if line.strip():
                lines.append(line)
                characters += len(line)
    if not lines:
        raise DataError(f"no text found in {', '.join(map(str, sources))}; the tokenizer needs a non-empty corpus")
    read_seconds = time.perf_counter() - started

    model = io.BytesIO()
    log.info("training SentencePiece BPE, vocab %d, on %d of %d lines", config.vocab_size,
             min(len(lines), config.max_sentences), len(lines))
    train_started = time.perf_counter()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            model_type="bpe",
            vocab_size=config.vocab_size,
            character_coverage=config.character_coverage,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            max_sentence_length=1 << 16,
            input_sentence_size=config.max_sentences,
            shuffle_input_sentence=True,
            pad_id=config.pad_id,
            bos_id=config.bos_id,
            eos_id=config.eos_id,
            unk_id=config.unk_id,
            num_threads=2,
            minloglevel=2,
        )
    except RuntimeError as e:
        message = str(e)
        if "smaller than required_chars" in message:
            needed = re.search(r"vs (\d+)", message)
            raise ConfigError(
                f"vocab size {config.vocab_size} cannot hold the 4 reserved ids, the 256 byte pieces and one piece "
                f"per character of this corpus; pass --vocab-size {needed.group(1) if needed else 'larger'} or more"
            ) from None
        if "Vocabulary size too high" in message:
            raise DataError(
                f"the corpus is too small for a vocabulary of {config.vocab_size} ({message.strip()}); "
                "pass a smaller --vocab-size or more text"
            ) from None
        raise DataError(f"SentencePiece training failed: {message.strip()}") from None
    train_seconds = time.perf_counter() - train_started

    info = {
        "vocab_size": config.vocab_size,
        "model_type": "bpe",
        "byte_fallback": True,
        "reserved_ids": config.reserved_ids,
        "sources": [str(s) for s in sources],
        "lines": len(lines),
        "lines_sampled": min(len(lines), config.max_sentences),
        "characters": characters,
        "read_seconds": round(read_seconds, 3),
        "train_seconds": round(train_seconds, 3),
    }
    with atomic_output_dir(out, force=force, what="tokenizer") as tmp:
        (tmp / MODEL_FILE).write_bytes(model.getvalue())
        info["sha256"] = sha256_of(tmp / MODEL_FILE)
        write_json_atomic(tmp / INFO_FILE, info)
    return info


def read_tokenizer_info(folder):
    """The `tokenizer.json` of a tokenizer folder (reserved ids, vocabulary size, provenance)."""
    path = Path(folder) / INFO_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CalmEdgeError(f"{path} not found; {folder} is not a tokenizer folder made by `calm-edge tokenizer train`") from None
