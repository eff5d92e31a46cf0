"""Token shards: documents in (`calm_edge.corpus`), memory-mapped token shards out, training windows back.

Preparing (`prepare_shards`). Documents are tokenized by worker processes, an eos id is appended
after each, and each document goes to the train or the valid split by a hash of its text (so the
split does not depend on order or worker count). Tokens are written to flat binary shards,
`{split}_{n:04d}.bin`, as uint16 when the vocabulary fits and uint32 otherwise, with an
`index.json` that lists files, token counts and the tokenizer's sha256. The same inputs give
byte-identical output. The folder appears only when complete.

Loading (`TokenShards`, `WindowLoader`). Shards are memory-mapped; a loader cuts them into
non-overlapping windows of a fixed length (a multiple of K) and serves batches in a seeded
order per epoch, which `state_dict()` / `load_state_dict()` resume exactly.
"""
import json
import logging
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from calm_edge.corpus import expand_sources, is_valid_document, iter_documents
from calm_edge.errors import DataError
from calm_edge.fileio import atomic_output_dir, write_json_atomic
from calm_edge.tokenizer import Tokenizer

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
INDEX_FORMAT = "calm-edge-token-shards"
INDEX_VERSION = 1
SPLITS = ("train", "valid")


# ----- preparing shards ----------------------------------------------------------------------


def token_dtype(vocab_size):
    """The smallest unsigned dtype that holds every id of the vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# Worker-process state: each worker loads the tokenizer once.
_worker = {}


def _init_worker(tokenizer_path, valid_fraction, dtype):
    _worker.update(tokenizer=Tokenizer(tokenizer_path), valid_fraction=valid_fraction, dtype=np.dtype(dtype))


def _encode_batch(batch):
    """Tokenize a `(source, texts)` batch: its source, tokens and document count per split, characters."""
    source, texts = batch
    tokenizer, dtype = _worker["tokenizer"], _worker["dtype"]
    encoded = tokenizer.encode_batch(texts)
    parts = {split: [] for split in SPLITS}
    documents = {split: 0 for split in SPLITS}
    for text, ids in zip(texts, encoded):
        split = "valid" if is_valid_document(text, _worker["valid_fraction"]) else "train"
        ids.append(tokenizer.eos_id)
        parts[split].append(np.asarray(ids, dtype=dtype))
        documents[split] += 1
    arrays = {s: np.concatenate(p) if p else np.empty(0, dtype) for s, p in parts.items()}
    return source, arrays, documents, sum(len(t) for t in texts)


def _batches_of_documents(documents, max_characters=1 << 20):
    """Group documents into `(source, texts)` batches of about `max_characters`, one source each."""
    source, batch, size = None, [], 0
    for document in documents:
        if batch and (document.source != source or size >= max_characters):
            yield source, batch
            batch, size = [], 0
        source = document.source
        batch.append(document.text)
        size += len(document.text)
    if batch:
        yield source, batch


class _ShardWriter:
    """Appends tokens to `{split}_{n:04d}.bin` files, starting a new one every `shard_tokens`."""

    def __init__(self, folder, split, dtype, shard_tokens):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards = []  # [{"file", "tokens"}]
        self.documents = 0
        self._file = None

    def write(self, tokens):
        while len(tokens):
            if self._file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            head, tokens = tokens[:room], tokens[room:]
            self._file.write(head.tobytes())
            self.shards[-1]["tokens"] += len(head)

    def _open_next(self):
        if self._file is not None:
            self._file.close()
        name = f"{self.split}_{len(self.shards):04d}.bin"
        self._file = open(self.folder / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self):
        if self._file is not None:
            self._file.close()
        return {
            "tokens": sum(s["tokens"] for s in self.shards),
            "documents": self.documents,
            "shards": self.shards,
        }


def prepare_shards(sources, tokenizer_dir, out, text_field="text", valid_fraction=0.01, workers=None,
                   shard_tokens=1 << 28, force=False, progress=True):
    """Tokenize `sources` into token shards in folder `out`. Returns the index plus timings."""
    if not 0.0 <= valid_fraction < 1.0:
        raise DataError(f"--valid-fraction {valid_fraction} must be in [0, 1)")
    if shard_tokens < 1:
        raise DataError(f"--shard-tokens {shard_tokens} must be positive")
    tokenizer = Tokenizer(tokenizer_dir)
    dtype = token_dtype(tokenizer.vocab_size)
    workers = workers or os.cpu_count() or 1
    files = expand_sources(sources)  # fail on a missing file before any work starts
    started = time.perf_counter()
    stats = {}
    characters = 0

    with atomic_output_dir(out, force=force, what="prepared data",
                           inputs={"--data": list(sources), "--tokenizer": tokenizer_dir}) as tmp:
        writers = {split: _ShardWriter(tmp, split, dtype, shard_tokens) for split in SPLITS}
        batches = _batches_of_documents(iter_documents(files, text_field))
        init_args = (str(tokenizer.path), valid_fraction, dtype.str)
        bar = tqdm(unit=" tok", unit_scale=True, desc="tokenizing", disable=not progress)
        if workers == 1:
            _init_worker(*init_args)
            results = map(_encode_batch, batches)
            pool = None
        else:
            pool = multiprocessing.get_context("fork").Pool(workers, initializer=_init_worker, initargs=init_args)
            results = pool.imap(_encode_batch, batches)  # ordered: output does not depend on timing
        try:
            for source, arrays, documents, batch_characters in results:
                batch_tokens = sum(len(a) for a in arrays.values())
                for split in SPLITS:
                    writers[split].write(arrays[split])
                    writers[split].documents += documents[split]
                entry = stats.setdefault(source, {"path": source, "documents": 0, "characters": 0, "tokens": 0})
                entry["documents"] += sum(documents.values())
                entry["characters"] += batch_characters
                entry["tokens"] += batch_tokens
                characters += batch_characters
                bar.update(batch_tokens)
        finally:
            bar.close()
            if pool is not None:
                pool.terminate()
        splits = {split: writer.close() for split, writer in writers.items()}
        if splits["train"]["tokens"] == 0:
            raise DataError(
                f"no training text in {', '.join(files)}: every document was empty"
                + (" or went to the valid split; lower --valid-fraction" if valid_fraction else "")
            )
        index = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "dtype": dtype.name,
            "tokenizer": {
                "file": str(tokenizer.path),
                "sha256": tokenizer.sha256(),
                "vocab_size": tokenizer.vocab_size,
                "eos_id": tokenizer.eos_id,
            },
            "text_field": text_field,
            "valid_fraction": valid_fraction,
            "sources": list(stats.values()),
            "characters": characters,
            "splits": splits,
        }
        write_json_atomic(tmp / INDEX_FILE, index)

    seconds = time.perf_counter() - started
    tokens = sum(s["tokens"] for s in splits.values())
    return {
        **index,
        "workers": workers,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(tokens / seconds, 1),
        "characters_per_token": round(characters / max(tokens, 1), 4),
    }


# ----- loading -------------------------------------------------------------------------------


def _index_fields(index, index_path):
    """(dtype, vocab_size, eos_id) of an index.json, each checked: a hand-edited index fails here, by key."""
    def bad(key, why):
        return DataError(f"{index_path}: {key} {why}; the index is corrupt, prepare the data again")

    if not isinstance(index.get("splits"), dict):
        raise bad("splits", "must be a mapping of split names to shards")
    if index.get("dtype") not in ("uint16", "uint32"):
        raise bad("dtype", f"is {index.get('dtype')!r}, not uint16 or uint32")
    tokenizer = index.get("tokenizer")
    if not isinstance(tokenizer, dict):
        raise bad("tokenizer", "must be a mapping")
    dtype = np.dtype(index["dtype"])
    vocab_size, eos_id = tokenizer.get("vocab_size"), tokenizer.get("eos_id")
    if not _whole(vocab_size) or not 1 <= vocab_size <= np.iinfo(dtype).max + 1:
        raise bad("tokenizer.vocab_size", f"is {vocab_size!r}, not a vocabulary size that {dtype.name} holds")
    if not _whole(eos_id) or not 0 <= eos_id < vocab_size:
        raise bad("tokenizer.eos_id", f"is {eos_id!r}, not an id of the vocabulary of {vocab_size}")
    for split, entry in index["splits"].items():
        shards = entry.get("shards") if isinstance(entry, dict) else None
        if not isinstance(shards, list) or not _whole(entry.get("tokens")) or not all(
                isinstance(s, dict) and isinstance(s.get("file"), str) and _whole(s.get("tokens")) for s in shards):
            raise bad(f"splits.{split}", "must hold a token count and a list of shards, each a file and a token count")
        for shard in shards:
            if Path(shard["file"]).name != shard["file"]:
                raise bad(f"splits.{split}", f"names shard {shard['file']!r} outside the folder")
    return dtype, vocab_size, eos_id


def _whole(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class TokenShards:
    """A prepared data folder, memory-mapped read-only."""

    def __init__(self, folder):
        self.folder = Path(folder)
        index_path = self.folder / INDEX_FILE
        try:
            self.index = json.loads(index_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(
                f"{index_path} not found; prepare the data first with `calm-edge data prepare --out {self.folder}`"
            ) from None
        except json.JSONDecodeError as e:
            raise DataError(f"{index_path} is corrupt ({e.msg}); prepare the data again") from None
        except UnicodeDecodeError:
            raise DataError(f"{index_path} is not UTF-8 text; the index is corrupt, prepare the data again") from None
        if not isinstance(self.index, dict):
            raise DataError(f"{index_path} must hold a JSON object, not {type(self.index).__name__}; prepare the data again")
        if self.index.get("format") != INDEX_FORMAT or self.index.get("version", 0) > INDEX_VERSION:
            raise DataError(
                f"{index_path} is not a calm-edge token-shard index of version <= {INDEX_VERSION}; prepare the data again"
            )
        self.dtype, self.vocab_size, self.eos_id = _index_fields(self.index, index_path)

    def shards(self, split):
        """The memory-mapped token arrays of one split, in order."""
        if split not in self.index["splits"]:
            raise DataError(f"{self.folder} has no split {split!r}; it has {', '.join(self.index['splits'])}")
        arrays = []
        for shard in self.index["splits"][split]["shards"]:
            path = self.folder / shard["file"]
            expected = shard["tokens"] * self.dtype.itemsize
            if not path.is_file() or path.stat().st_size != expected:
                raise DataError(
                    f"shard {path} is missing or has the wrong size (expected {expected} bytes); prepare the data again"
                )
            array = np.memmap(path, dtype=self.dtype, mode="r")
            if len(array) and int(array.max()) >= self.vocab_size:
                raise DataError(f"shard {path} holds token id {int(array.max())}, beyond the vocabulary of "
                                f"{self.vocab_size} in {self.folder / INDEX_FILE}; the shard is corrupt, prepare the data again")
            arrays.append(array)
        return arrays

    def tokens(self, split):
        return self.index["splits"][split]["tokens"]


class WindowLoader:
    """Batches of fixed-length token windows in a seeded, resumable order.

    The windows of a split are its shards cut into non-overlapping pieces of `window` tokens
    (a window never spans two shards). Each epoch visits every window once, in the order of a
    permutation seeded by `(seed, epoch)`; a batch that runs past the end continues into the
    next epoch. `state_dict()` records the epoch and the position in it, so a resumed run sees
    exactly the batches an uninterrupted one would.
    """

    def __init__(self, shards: TokenShards, split, window, batch_size, seed=0, chunk_size=1, shuffle=True):
        if window < 1 or window % chunk_size:
            raise DataError(f"window length {window} must be a positive multiple of the chunk size K={chunk_size}")
        if batch_size < 1:
            raise DataError(f"batch size {batch_size} must be positive")
        self.split, self.window, self.batch_size, self.seed, self.shuffle = split, window, batch_size, seed, shuffle
        self._arrays = shards.shards(split)
        counts = [len(a) // window for a in self._arrays]
        self.num_windows = sum(counts)
        if self.num_windows == 0:
            raise DataError(
                f"split {split!r} of {shards.folder} has {shards.tokens(split)} tokens, fewer than one window of "
                f"{window}; use more data or a shorter sequence length"
            )
        self._shard_of = np.repeat(np.arange(len(counts)), counts)
        self._offset_of = np.concatenate([np.arange(c) * window for c in counts])
        self.epoch = 0
        self.position = 0
        self._order = self._order_of(0)

    def _order_of(self, epoch):
        if not self.shuffle:
            return np.arange(self.num_windows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)

    def next_batch(self):
        """The next batch, an int64 array of shape [batch_size, window]."""
        batch = np.empty((self.batch_size, self.window), dtype=np.int64)
        for row in range(self.batch_size):
            w = self._next_window()
            start = self._offset_of[w]
            batch[row] = self._arrays[self._shard_of[w]][start:start + self.window]
        return batch

    def skip(self, batches):
        """Move past `batches` batches without reading them (the other ranks' share of a step)."""
        for _ in range(batches * self.batch_size):
            self._next_window()

    def _next_window(self):
        """The next window's number in the order; a new epoch's permutation once one is used up."""
        if self.position == self.num_windows:
            self.epoch += 1
            self.position = 0
            self._order = self._order_of(self.epoch)
        self.position += 1
        return self._order[self.position - 1]

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self):
        return {"split": self.split, "window": self.window, "batch_size": self.batch_size, "seed": self.seed,
                "shuffle": self.shuffle, "num_windows": self.num_windows, "epoch": self.epoch,
                "position": self.position}

    def load_state_dict(self, state):
        mine = self.state_dict()
        for key in ("split", "window", "batch_size", "seed", "shuffle", "num_windows"):
            if state.get(key) != mine[key]:
                raise DataError(
                    f"cannot resume the data order: saved {key}={state.get(key)!r} but this run has {mine[key]!r}; "
                    "resume with the same data and settings"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._order_of(self.epoch)
