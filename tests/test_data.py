"""The data pipeline: reading every supported format, deterministic shards, resumable loading."""
import gzip
import json
import lzma

import numpy as np
import pytest
from click.testing import CliRunner

from calm_edge.cli import main
from calm_edge.corpus import expand_sources, is_valid_document, iter_documents
from calm_edge.data import TokenShards, WindowLoader, prepare_shards, token_dtype
from calm_edge.demo_corpus import SOURCE_NAME, iter_bible_chapters
from calm_edge.errors import CalmEdgeError, DataError
from calm_edge.tokenizer import Tokenizer

DOCS = [f"Document number {i}. " + "Some words to read here. " * (i % 7 + 1) for i in range(60)]


def _write_jsonl(path, docs, field="text", opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({field: d, "id": 1}) + "\n")
    return path


@pytest.fixture
def corpus_folder(tmp_path):
    """The same 60 documents spread over every supported format, nested in a folder."""
    root = tmp_path / "corpus"
    (root / "nested").mkdir(parents=True)
    _write_jsonl(root / "a.jsonl", DOCS[:20])
    _write_jsonl(root / "b.jsonl.gz", DOCS[20:40], opener=gzip.open)
    _write_jsonl(root / "nested" / "c.jsonl.xz", DOCS[40:59], opener=lzma.open)
    (root / "nested" / "d.txt").write_text(DOCS[59], encoding="utf-8")
    (root / "notes.md").write_text("ignored: not a corpus format")
    return root


def test_every_format_and_folders_are_read_in_order(corpus_folder):
    documents = list(iter_documents([corpus_folder]))
    assert [d.text for d in documents] == DOCS
    assert documents[0].line == 1 and documents[0].source.endswith("a.jsonl")
    assert documents[-1].line == 0 and documents[-1].source.endswith("d.txt")


def test_demo_corpus_is_a_data_source():
    chapters = list(iter_bible_chapters())
    assert len(chapters) == 1189
    assert chapters[0][1].startswith("In the beginning God created the heavens and the earth.")
    documents = iter_documents([SOURCE_NAME])
    assert next(documents).text == chapters[0][1]


@pytest.mark.parametrize("make, words", [
    (lambda d: d / "missing.jsonl", ["missing.jsonl does not exist"]),
    (lambda d: _write_jsonl(d / "f.jsonl", ["ok"], field="body"), ["f.jsonl:1", "no 'text' field", "body", "--text-field"]),
    (lambda d: (d / "f.jsonl").write_text('{"text": "ok"}\n{"text": broken\n') and d / "f.jsonl",
     ["f.jsonl:2", "not valid JSON"]),
    (lambda d: (d / "f.jsonl").write_text('{"text": 5}\n') and d / "f.jsonl", ["f.jsonl:1", "is int, not a string"]),
    (lambda d: (d / "f.jsonl.xz").write_bytes(b"\xfd7zXZ\x00garbage" * 10) and d / "f.jsonl.xz",
     ["f.jsonl.xz is corrupt or truncated"]),
    (lambda d: (d / "f.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 100)[:40]) and d / "f.jsonl.gz",
     ["f.jsonl.gz is corrupt or truncated"]),
    (lambda d: (d / "f.txt").write_bytes(b"caf\xe9") and d / "f.txt", ["f.txt is not valid UTF-8"]),
    (lambda d: (d / "f.csv").write_text("a,b") and d / "f.csv", ["f.csv: unsupported file type"]),
    (lambda d: (d / "sub").mkdir() or d / "sub", ["holds no .txt, .jsonl"]),
])
def test_bad_input_names_the_file_and_the_fix(tmp_path, make, words):
    path = make(tmp_path)
    with pytest.raises(DataError) as error:
        list(iter_documents([path]))
    for word in words:
        assert word in str(error.value)


def test_no_sources_is_an_error():
    with pytest.raises(DataError, match="no data given"):
        expand_sources([])


def test_prepare_appends_eos_and_round_trips(corpus_folder, tokenizer_dir, tmp_path):
    result = prepare_shards([corpus_folder], tokenizer_dir, tmp_path / "shards", valid_fraction=0.0, workers=1,
                            progress=False)
    tok = Tokenizer(tokenizer_dir)
    shards = TokenShards(tmp_path / "shards")
    assert shards.dtype == np.uint16 and result["dtype"] == "uint16"
    tokens = np.concatenate(shards.shards("train"))
    assert int((tokens == tok.eos_id).sum()) == len(DOCS)
    pieces = np.split(tokens, np.flatnonzero(tokens == tok.eos_id) + 1)[:-1]
    assert [tok.decode(p[:-1]) for p in pieces] == DOCS
    # The index accounts for every file, document and token.
    assert [s["documents"] for s in result["sources"]] == [20, 20, 19, 1]
    assert sum(s["tokens"] for s in result["sources"]) == len(tokens) == result["splits"]["train"]["tokens"]
    assert result["tokenizer"]["sha256"] == tok.sha256()
    assert result["characters"] == sum(map(len, DOCS))


def test_prepare_is_byte_identical_across_runs_and_worker_counts(corpus_folder, tokenizer_dir, tmp_path):
    outputs = []
    for run, workers in enumerate((1, 2, 2)):
        out = tmp_path / f"run{run}"
        prepare_shards([corpus_folder], tokenizer_dir, out, valid_fraction=0.2, workers=workers,
                       shard_tokens=500, progress=False)
        outputs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert len(outputs[0]) > 3  # several train shards and a valid shard
    assert outputs[0] == outputs[1] == outputs[2]


def test_shards_split_at_the_shard_size(corpus_folder, tokenizer_dir, tmp_path):
    whole = prepare_shards([corpus_folder], tokenizer_dir, tmp_path / "whole", valid_fraction=0.0, workers=1,
                           progress=False)
    split = prepare_shards([corpus_folder], tokenizer_dir, tmp_path / "split", valid_fraction=0.0, workers=1,
                           shard_tokens=300, progress=False)
    sizes = [s["tokens"] for s in split["splits"]["train"]["shards"]]
    assert all(size == 300 for size in sizes[:-1]) and 0 < sizes[-1] <= 300
    assert np.array_equal(np.concatenate(TokenShards(tmp_path / "split").shards("train")),
                          np.concatenate(TokenShards(tmp_path / "whole").shards("train")))
    assert whole["splits"]["train"]["tokens"] == sum(sizes)


def test_valid_split_is_chosen_by_content_not_position(corpus_folder, tokenizer_dir, tmp_path):
    result = prepare_shards([corpus_folder], tokenizer_dir, tmp_path / "s", valid_fraction=0.25, workers=1,
                            progress=False)
    expected_valid = [d for d in DOCS if is_valid_document(d, 0.25)]
    assert 0 < len(expected_valid) < len(DOCS)
    assert result["splits"]["valid"]["documents"] == len(expected_valid)
    tok = Tokenizer(tokenizer_dir)
    valid = np.concatenate(TokenShards(tmp_path / "s").shards("valid"))
    assert tok.decode(valid[valid != tok.eos_id]) == "".join(expected_valid)


def test_token_dtype_fits_the_vocabulary():
    assert token_dtype(8192) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    assert token_dtype(128_256) == np.uint32


def test_failed_prepare_leaves_nothing_half_written(corpus_folder, tokenizer_dir, tmp_path):
    # A corpus that breaks after several good batches: the error surfaces mid-way.
    big = [("x" * 5000 + " ") * 50 for _ in range(10)]
    _write_jsonl(corpus_folder / "e.jsonl", big + ["fine"])
    with open(corpus_folder / "e.jsonl", "a") as f:
        f.write('{"title": "no text here"}\n')
    out = tmp_path / "shards"
    with pytest.raises(DataError, match="e.jsonl:12"):
        prepare_shards([corpus_folder], tokenizer_dir, out, workers=2, progress=False)
    assert list(tmp_path.iterdir()) == [corpus_folder]  # no output, no temporary folder

    # With --force over an existing good output, a failure keeps the old output intact.
    good = tmp_path / "good"
    prepare_shards([corpus_folder / "a.jsonl"], tokenizer_dir, good, workers=1, progress=False)
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    with pytest.raises(DataError):
        prepare_shards([corpus_folder], tokenizer_dir, good, workers=1, force=True, progress=False)
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    with pytest.raises(CalmEdgeError, match="already exists.*--force"):
        prepare_shards([corpus_folder / "a.jsonl"], tokenizer_dir, good, workers=1, progress=False)


def test_empty_corpus_is_an_error(tmp_path, tokenizer_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no training text in .*empty.jsonl"):
        prepare_shards([empty], tokenizer_dir, tmp_path / "out", workers=1, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.fixture
def shards(corpus_jsonl, tokenizer_dir, tmp_path):
    prepare_shards([corpus_jsonl], tokenizer_dir, tmp_path / "shards", valid_fraction=0.05, workers=2,
                   shard_tokens=20_000, progress=False)
    return TokenShards(tmp_path / "shards")


def test_loader_visits_every_window_once_per_epoch(shards):
    loader = WindowLoader(shards, "train", window=64, batch_size=8, seed=3, chunk_size=4)
    windows_per_shard = [len(a) // 64 for a in shards.shards("train")]
    assert loader.num_windows == sum(windows_per_shard) and len(windows_per_shard) > 1
    seen = np.concatenate([loader.next_batch() for _ in range(loader.num_windows // 8)])
    assert seen.shape == (loader.num_windows // 8 * 8, 64) and seen.dtype == np.int64
    # Every row is a real window of the shards, and no window repeats within the epoch.
    expected = {tuple(a[i * 64:(i + 1) * 64]) for a in shards.shards("train") for i in range(len(a) // 64)}
    rows = {tuple(r) for r in seen}
    assert len(rows) == len(seen) and rows <= expected


def test_loader_order_is_seeded(shards):
    first = [WindowLoader(shards, "train", 64, 4, seed=1).next_batch() for _ in range(2)]
    assert np.array_equal(first[0], first[1])
    other = WindowLoader(shards, "train", 64, 4, seed=2).next_batch()
    assert not np.array_equal(first[0], other)
    epoch0 = WindowLoader(shards, "train", 64, 1, seed=1)
    order0 = [epoch0.next_batch() for _ in range(epoch0.num_windows)]
    order1 = [epoch0.next_batch() for _ in range(epoch0.num_windows)]
    assert epoch0.epoch == 1
    assert not all(np.array_equal(a, b) for a, b in zip(order0, order1))  # each epoch reshuffles


def test_loader_resumes_exactly_across_epochs(shards):
    straight = WindowLoader(shards, "train", 64, 16, seed=5, chunk_size=4)
    n = straight.num_windows // 16 + 3  # crosses an epoch boundary
    reference = [straight.next_batch() for _ in range(2 * n)]
    first = WindowLoader(shards, "train", 64, 16, seed=5, chunk_size=4)
    for _ in range(n):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # survives a trip through a JSON checkpoint
    resumed = WindowLoader(shards, "train", 64, 16, seed=5, chunk_size=4)
    resumed.load_state_dict(state)
    assert all(np.array_equal(resumed.next_batch(), ref) for ref in reference[n:])
    other = WindowLoader(shards, "train", 64, 8, seed=5, chunk_size=4)
    with pytest.raises(DataError, match="saved batch_size=16 but this run has 8"):
        other.load_state_dict(state)


def test_loader_rejects_bad_windows(shards):
    with pytest.raises(DataError, match="window length 30 must be a positive multiple of the chunk size K=4"):
        WindowLoader(shards, "train", 30, 2, chunk_size=4)
    with pytest.raises(DataError, match="fewer than one window"):
        WindowLoader(shards, "valid", 1 << 20, 2)
    with pytest.raises(DataError, match="no split 'test'"):
        WindowLoader(shards, "test", 64, 2)


def test_damaged_shards_are_reported(shards):
    folder = shards.folder
    shard = folder / shards.index["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(DataError, match=f"shard {shard} is missing or has the wrong size"):
        TokenShards(folder).shards("train")
    (folder / "index.json").write_text("{")
    with pytest.raises(DataError, match="index.json is corrupt"):
        TokenShards(folder)
    with pytest.raises(DataError, match="prepare the data first"):
        TokenShards(folder / "nowhere")


def test_cli_prepare(tmp_path, corpus_folder, tokenizer_dir):
    runner = CliRunner()
    out = tmp_path / "shards"
    result = runner.invoke(main, ["-q", "data", "prepare", "--data", str(corpus_folder), "--tokenizer",
                                  str(tokenizer_dir), "--out", str(out), "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "train and" in result.stdout and (out / "index.json").is_file()
    result = runner.invoke(main, ["data", "prepare", "--data", str(tmp_path / "nope.jsonl"), "--tokenizer",
                                  str(tokenizer_dir), "--out", str(tmp_path / "x")])
    assert result.exit_code == 1
    assert "Error: data file" in result.output and "nope.jsonl does not exist" in result.output
    assert "Traceback" not in result.output
