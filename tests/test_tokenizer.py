"""The tokenizer loses no text: byte fallback, no normalisation, encodings that concatenate."""
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calm_edge.cli import main
from calm_edge.config import TokenizerConfig
from calm_edge.errors import CalmEdgeError, ConfigError, DataError
from calm_edge.tokenizer import Tokenizer, read_tokenizer_info, train_tokenizer

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Tokenizer(tokenizer_dir)


def test_reserved_ids_and_vocab_size(tok, tokenizer_dir):
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 512
    info = read_tokenizer_info(tokenizer_dir)
    assert info["reserved_ids"] == {"pad": 0, "bos": 1, "eos": 2, "unk": 3}
    assert info["sha256"] == tok.sha256()
    # Byte pieces follow the reserved ids, so every byte has a token.
    assert [tok.id_to_piece(i) for i in (4, 5, 259)] == ["<0x00>", "<0x01>", "<0xFF>"]


@SETTINGS
@given(st.text())
def test_decode_encode_is_identity_for_any_unicode(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.unk_id not in ids


@SETTINGS
@given(st.text(alphabet=st.sampled_from(list(" \u2581\n\tab.é中")), max_size=30))
def test_space_symbol_and_whitespace_runs_survive(tok, text):
    assert tok.decode(tok.encode(text)) == text


@SETTINGS
@given(st.text(max_size=40), st.text(max_size=40))
def test_encodings_concatenate(tok, a, b):
    # Streaming decodes pieces as they arrive; that needs encode(a) + encode(b) to spell a + b.
    assert tok.decode(tok.encode(a) + tok.encode(b)) == a + b


def test_batch_encoding_equals_single(tok):
    texts = ["In the beginning", "", "x\u2581y", "  two  spaces "]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts[:2], num_threads=2) == [tok.encode(t) for t in texts[:2]]


def test_learned_merges_compress_common_text(tok):
    text = "And God said to them, Be fruitful and multiply"
    assert len(tok.encode(text)) < 0.6 * len(text.encode("utf-8"))


def test_vocab_too_small_for_reserved_ids(tmp_path, corpus_jsonl):
    with pytest.raises(ConfigError, match="vocab size 200 is too small.*--vocab-size 276"):
        train_tokenizer([corpus_jsonl], tmp_path / "t", TokenizerConfig(vocab_size=200), progress=False)
    assert not (tmp_path / "t").exists()


def test_corpus_too_small_for_vocab(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("just a few words here\n")
    with pytest.raises(DataError, match="too small for a vocabulary of 4096"):
        train_tokenizer([small], tmp_path / "t", TokenizerConfig(vocab_size=4096), progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no text found"):
        train_tokenizer([empty], tmp_path / "t", TokenizerConfig(vocab_size=512), progress=False)
    assert not (tmp_path / "t").exists()


def test_existing_output_is_kept_without_force(tmp_path, corpus_jsonl, tokenizer_dir):
    out = tmp_path / "tok"
    train_tokenizer([corpus_jsonl], out, TokenizerConfig(vocab_size=400), progress=False)
    before = (out / "tokenizer.model").read_bytes()
    with pytest.raises(CalmEdgeError, match="already exists.*--force"):
        train_tokenizer([corpus_jsonl], out, TokenizerConfig(vocab_size=512), progress=False)
    assert (out / "tokenizer.model").read_bytes() == before
    train_tokenizer([corpus_jsonl], out, TokenizerConfig(vocab_size=512), force=True, progress=False)
    assert Tokenizer(out).vocab_size == 512
    assert [p.name for p in tmp_path.iterdir()] == ["tok"]  # no temporary folders left behind


def test_missing_or_invalid_model_file(tmp_path):
    with pytest.raises(CalmEdgeError, match="tokenizer model .*tokenizer.model not found"):
        Tokenizer(tmp_path)
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(CalmEdgeError, match="not a valid SentencePiece model"):
        Tokenizer(bad)


def test_cli_train_and_encode(tmp_path, corpus_jsonl):
    runner = CliRunner()
    out = tmp_path / "tok"
    result = runner.invoke(main, ["-q", "tokenizer", "train", "--data", str(corpus_jsonl), "--vocab-size", "300",
                                  "--out", str(out)])
    assert result.exit_code == 1
    assert "vocab size 300 cannot hold" in result.output and "--vocab-size 317" in result.output
    result = runner.invoke(main, ["-q", "tokenizer", "train", "--data", str(corpus_jsonl), "--vocab-size", "400",
                                  "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "vocab 400" in result.stdout
    result = runner.invoke(main, ["tokenizer", "encode", "--tokenizer", str(out), "hello"])
    assert result.exit_code == 0 and '"ids"' in result.stdout
    result = runner.invoke(main, ["tokenizer", "train", "--data", str(corpus_jsonl), "--vocab-size", "100",
                                  "--out", str(tmp_path / "t2")])
    assert result.exit_code == 1
    assert "Error: tokenizer.vocab_size=100 is too small" in result.output
    assert "--vocab-size) to 276" in result.output and "Traceback" not in result.output
