"""Where evaluation and calibration text comes from: a `TextSource`, and the token stream it gives.

    source = TextSource(("../shared/data/wikitext103-test-doc.jsonl",), detokenize="wikitext")
    tokens, description = source.load_tokens(tokenizer, max_tokens=10_000)

Each path is either
- a prepared shard folder (it holds index.json): the tokens of one split (`split`, default
  "valid"); its tokenizer must be the model's, which the sha256 in index.json proves; or
- anything `calm_edge.corpus.iter_documents` reads (.txt, .jsonl[.gz|.xz], a folder of them,
  demo:bible): each document, optionally detokenized (see calm_edge.wikitext), is encoded with
  the model's tokenizer as the model was trained on documents (`encode_documents`): calm-edge's
  followed by an eos id, exactly as `data prepare` does; the released models' bos first.

The tokens of all paths are concatenated in order. The returned description says what was read
and in which text form, so results can state it.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calm_edge.corpus import iter_documents
from calm_edge.data import INDEX_FILE, TokenShards
from calm_edge.errors import DataError
from calm_edge.wikitext import detokenizer


@dataclass(frozen=True)
class TextSource:
    """Text to evaluate or calibrate on: the paths, the JSONL field, the detokenizer, a shard split."""

    paths: tuple
    text_field: str = "text"
    detokenize: str = "none"  # "none" or "wikitext" (see calm_edge.wikitext)
    split: str = "valid"  # the split read from a prepared shard folder

    def __post_init__(self):
        object.__setattr__(self, "paths", tuple(str(p) for p in ([self.paths] if isinstance(self.paths, (str, Path))
                                                                  else self.paths)))
        detokenizer(self.detokenize)  # an unknown form is an error before any reading

    def load_tokens(self, tokenizer, max_tokens=None, progress=False):
        """(int64 token array, description) of every path, encoded with `tokenizer` (a Tokenizer)."""
        transform = detokenizer(self.detokenize)
        if max_tokens is not None and max_tokens < 1:
            raise DataError(f"--max-tokens {max_tokens} must be positive")
        parts, described, total = [], [], 0
        for path in self.paths:
            if max_tokens is not None and total >= max_tokens:
                break
            if (Path(path) / INDEX_FILE).is_file():
                tokens, info = _shard_tokens(path, tokenizer, self.split)
            else:
                tokens, info = _text_tokens(path, tokenizer, self.text_field, transform, progress)
            if max_tokens is not None:
                tokens = tokens[:max_tokens - total]
            info["tokens_used"] = int(len(tokens))
            parts.append(tokens)
            described.append(info)
            total += len(tokens)
        tokens = np.concatenate(parts) if parts else np.empty(0, np.int64)
        if len(tokens) == 0:
            raise DataError(f"no tokens to evaluate in {', '.join(self.paths)}; pass non-empty --data")
        return tokens, {"sources": described, "detokenize": self.detokenize, "tokens": int(len(tokens))}


def _shard_tokens(folder, tokenizer, split):
    shards = TokenShards(folder)
    if shards.index["tokenizer"]["sha256"] != tokenizer.sha256():
        raise DataError(
            f"{Path(folder) / INDEX_FILE} was prepared with another tokenizer than the model's {tokenizer.path}; "
            "prepare the data again with the model's tokenizer, or pass the raw text files instead"
        )
    arrays = shards.shards(split)
    tokens = np.concatenate([np.asarray(a, dtype=np.int64) for a in arrays]) if arrays else np.empty(0, np.int64)
    return tokens, {"path": str(folder), "kind": "shards", "split": split, "tokens": int(len(tokens))}


def _text_tokens(source, tokenizer, text_field, transform, progress):
    texts = [transform(d.text) for d in iter_documents([source], text_field=text_field, progress=progress)]
    encoded = tokenizer.encode_documents(texts) if texts else []
    pieces = [np.asarray(ids, dtype=np.int64) for ids in encoded]
    tokens = np.concatenate(pieces) if pieces else np.empty(0, np.int64)
    return tokens, {"path": str(source), "kind": "text", "documents": len(texts), "tokens": int(len(tokens))}
