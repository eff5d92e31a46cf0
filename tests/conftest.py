"""Shared fixtures: tiny corpora and a tiny tokenizer that the tests make themselves."""
import json
from pathlib import Path

import pytest

from calm_edge.config import TokenizerConfig
from calm_edge.demo_corpus import iter_bible_chapters

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def corpus_jsonl(tmp_path_factory):
    """The first 120 chapters of the demo corpus (about 400 k characters) as a JSONL file."""
    path = tmp_path_factory.mktemp("corpus") / "bible.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for number, (name, text) in enumerate(iter_bible_chapters()):
            if number == 120:
                break
            f.write(json.dumps({"title": name, "text": text}) + "\n")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_jsonl):
    """A 512-piece tokenizer trained on `corpus_jsonl`."""
    from calm_edge.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer([corpus_jsonl], out, TokenizerConfig(vocab_size=512), progress=False)
    return out


@pytest.fixture(scope="session")
def ae_shards(tmp_path_factory, corpus_jsonl, tokenizer_dir):
    """Token shards of `corpus_jsonl` (tokenizer `tokenizer_dir`), 5% of the chapters held out as valid."""
    from calm_edge.data import prepare_shards

    out = tmp_path_factory.mktemp("ae_data") / "shards"
    prepare_shards([corpus_jsonl], tokenizer_dir, out, valid_fraction=0.05, workers=1, progress=False)
    return out
