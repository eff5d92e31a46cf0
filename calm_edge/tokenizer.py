"""The tokenizers: calm-edge's SentencePiece BPE with byte fallback (trained here), and Hugging Face
byte-level BPE (`tokenizer.json`, the Llama-3 tokenizer of the released CALM models).

Both offer one interface, which every stage uses through `load_tokenizer`:

    encode(text)           token ids of the text alone (special-token text a user types included)
    encode_prompt(text)    a prompt as the model reads one: bos first where the tokenizer prepends it
    encode_document(text)  a document as the model was trained on it: calm-edge's with eos after,
                           the released models' with bos before (their training framing)
    decode(ids), vocab_size, pad_id, bos_id, eos_id, sha256(), kind, path

SentencePiece training settings are chosen so that `decode(encode(text)) == text` for every
Unicode string:

- byte fallback: characters the model did not learn are spelled as their UTF-8 bytes
  (`<0x00>` .. `<0xFF>`), so nothing is ever mapped to unk;
- the `identity` normaliser and no whitespace clean-up, so the text is not rewritten;
- no dummy prefix, so encodings concatenate: `encode(a) + encode(b)` decodes to `a + b`
  (which streaming relies on);
- SentencePiece writes a space as the meta symbol U+2581 and decodes U+2581 back to a space, so
  a literal U+2581 in the input is encoded as its three byte pieces, which decode to itself.

A tokenizer folder holds `tokenizer.model` (what a model package ships) and `tokenizer.json`
(the reserved ids, the vocabulary size and what it was trained on). A Hugging Face tokenizer is
a folder (or the file itself) whose `tokenizer.json` holds the whole tokenizer, as `tokenizers`
writes it; telling the two `tokenizer.json` apart is `load_tokenizer`'s job.
"""
import io
import json
import logging
import re
import time
from pathlib import Path

import sentencepiece as spm

from calm_edge.config import TOKENIZER_KINDS, TokenizerConfig
from calm_edge.corpus import iter_documents
from calm_edge.errors import CalmEdgeError, ConfigError, DataError
from calm_edge.fileio import atomic_output_dir, sha256_of, write_json_atomic

log = logging.getLogger(__name__)

MODEL_FILE = "tokenizer.model"
INFO_FILE = "tokenizer.json"
HF_FILE = "tokenizer.json"  # a Hugging Face tokenizer: the same name, another content
SPACE_SYMBOL = "\u2581"  # SentencePiece's meta symbol for a space
FILES = {"sentencepiece": MODEL_FILE, "hf-bpe": HF_FILE}  # per kind (config.TOKENIZER_KINDS): the file a package or checkpoint carries


class Tokenizer:
    """calm-edge's SentencePiece tokenizer: encode text to token ids and back. Loads a folder or a `tokenizer.model` file."""

    kind = "sentencepiece"

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

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt's ids: the text alone (calm-edge's models read no bos)."""
        return self.encode(text)

    def encode_documents(self, texts, num_threads=1) -> list[list[int]]:
        """Documents as `data prepare` writes them: each followed by eos."""
        return [ids + [self.eos_id] for ids in self.encode_batch(texts, num_threads=num_threads)]

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def sha256(self) -> str:
        return sha256_of(self.path)


class HFTokenizer:
    """A Hugging Face byte-level BPE tokenizer (`tokenizer.json`), through the `tokenizers` library.

    `special_ids` ({"pad", "bos", "eos"}) name the ids a model uses; without them bos is the token
    the post-processor prepends, eos `<|end_of_text|>` or `</s>`, and pad `[PAD]`. Prompts and
    documents are encoded as the released CALM models read them: with the post-processor, which
    prepends bos. `decode` drops pad ids, as the official `generate` strips them from its output.
    """

    kind = "hf-bpe"

    def __init__(self, path, special_ids=None):
        from tokenizers import Tokenizer as HuggingFaceTokenizer

        path = Path(path)
        file = path / HF_FILE if path.is_dir() else path
        if not file.is_file():
            raise CalmEdgeError(f"tokenizer {file} not found; point at a Hugging Face tokenizer folder that holds "
                                f"{HF_FILE}, e.g. ../shared/data/llama3-tokenizer")
        try:
            self._tok = HuggingFaceTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises its own exception type for a malformed file
            raise CalmEdgeError(f"{file} is not a Hugging Face tokenizer file ({str(e).splitlines()[0]}); "
                                "copy the tokenizer again") from None
        self.path = file
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        special = dict(special_ids or {})
        prepended = [i for i in self._tok.encode("a").ids if i not in self._tok.encode("a", add_special_tokens=False).ids]
        self.add_bos = bool(prepended)
        self.bos_id = special.get("bos", prepended[0] if prepended else None)
        self.eos_id = special.get("eos", self._first_id("<|end_of_text|>", "</s>", "<|endoftext|>"))
        self.pad_id = special.get("pad", self._first_id("[PAD]", "<pad>"))
        self.unk_id = None

    def _first_id(self, *tokens):
        return next((self._tok.token_to_id(t) for t in tokens if self._tok.token_to_id(t) is not None), None)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no bos or eos added (special tokens typed in the text are matched)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts, num_threads=1) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt's ids as the model reads them: bos first, as the tokenizer's post-processor prepends it."""
        return self._tok.encode(text).ids

    def encode_documents(self, texts, num_threads=1) -> list[list[int]]:
        """Documents as the released models were trained on them: bos first (the post-processor), no eos."""
        return [e.ids for e in self._tok.encode_batch(list(texts))]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids if i != self.pad_id], skip_special_tokens=False)

    def id_to_piece(self, token_id: int) -> str:
        return self._tok.id_to_token(int(token_id))

    def token_to_id(self, token: str):
        return self._tok.token_to_id(token)

    def add_special_token(self, token: str):
        """Append `token` to the vocabulary as a special token (the `[PAD]` the released models' training added)."""
        self._tok.add_special_tokens([token])
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def save(self, file):
        """Write the tokenizer, as it is now, to `file` (compact JSON)."""
        self._tok.save(str(file), pretty=False)

    def sha256(self) -> str:
        return sha256_of(self.path)


def load_tokenizer(path, kind=None, special_ids=None):
    """The tokenizer at `path` (a file or a folder): SentencePiece (`tokenizer.model`) or Hugging Face
    (`tokenizer.json`), as `kind` says or, when it is None, as the files show."""
    path = Path(path)
    if kind is None:
        if path.suffix == ".json" or (path.is_dir() and _is_hf_tokenizer(path / HF_FILE)):
            kind = "hf-bpe"
        elif path.suffix == ".model" or (path.is_dir() and (path / MODEL_FILE).is_file()):
            kind = "sentencepiece"
        else:
            raise CalmEdgeError(f"no tokenizer at {path}: expected a tokenizer.model (SentencePiece) or a Hugging "
                                "Face tokenizer.json; point at the tokenizer's folder")
    if kind == "sentencepiece":
        return Tokenizer(path)
    if kind == "hf-bpe":
        return HFTokenizer(path, special_ids)
    raise CalmEdgeError(f"tokenizer kind {kind!r} is unknown; choose one of: {', '.join(TOKENIZER_KINDS)}")


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
    with atomic_output_dir(out, force=force, what="tokenizer", inputs={"--data": list(sources)}) as tmp:
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


def _is_hf_tokenizer(file):
    """Whether `file` is a Hugging Face tokenizer.json (a SentencePiece folder's tokenizer.json is its info file)."""
    if not file.is_file():
        return False
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("model"), dict) and "added_tokens" in data
