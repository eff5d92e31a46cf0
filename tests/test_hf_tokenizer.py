"""The Llama-3 tokenizer of the released CALM models in both runtimes: the Python runtime through Hugging Face
`tokenizers`, the C++ runtime's own byte-level BPE (PCRE2 over tokenizer.json), token for token the same."""
import json
import subprocess

import pytest

from conftest import SHARED_DATA
from calm_edge.errors import CalmEdgeError
from calm_edge.tokenizer import HFTokenizer, Tokenizer, load_tokenizer

LLAMA3 = SHARED_DATA / "llama3-tokenizer"
WIKITEXT = SHARED_DATA / "wikitext103-test-doc.jsonl"
pytestmark = pytest.mark.skipif(not (LLAMA3 / "tokenizer.json").is_file(), reason="needs ../shared/data")

# Texts a user may type that a tokenizer gets wrong first: empty, lone combining marks, emoji sequences,
# SentencePiece's U+2581, runs of spaces and digits, special-token text, Unicode spaces and line breaks
# (U+0085 and U+2028 among them), compatibility characters, case-insensitive contractions.
HOSTILE = ["", "\u0301", "e\u0301\u0301 n\u0303", "🙂👍🏽 family 👨\u200d👩\u200d👧 🇩🇪", "\u2581hello\u2581 \u2581\u2581",
           " " * 1000, "1" * 1000, "12345678901 3.14159 1,000,000", "<|begin_of_text|>Hi<|end_of_text|>",
           "<|end_of_text", "<|reserved_special_token_7|>x", "[PAD] text [PAD]", "a\r\nb\n\n\nc\t\td\x0b\x0c",
           "I'M 'S 're 'LL don't", "\u00a0\u3000\u2028\u2029\u0085x \u200b", "\x00\x01\x7f", "ﬁ Ⅷ ½ ٣ ߀",
           "Straße İstanbul ǅ ΣΑΣ", "x" * 5000, "  \n  ", "a  b   c    ", "日本語のテキスト、そして中文。",
           "مرحبا بالعالم", "עברית", "\U0001d400\U0001d401 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "tab\tand\u000bvertical"]


@pytest.fixture(scope="module")
def llama3():
    return HFTokenizer(LLAMA3)


def test_the_python_tokenizer_is_hugging_faces_with_the_models_framing(llama3):
    from tokenizers import Tokenizer as Reference

    reference = Reference.from_file(str(LLAMA3 / "tokenizer.json"))
    assert llama3.kind == "hf-bpe" and llama3.add_bos and (llama3.bos_id, llama3.eos_id) == (128000, 128001)
    for text in HOSTILE:
        assert llama3.encode(text) == reference.encode(text, add_special_tokens=False).ids, repr(text)
        assert llama3.encode_prompt(text) == [128000] + llama3.encode(text)
    assert llama3.encode("a<|end_of_text|>b") == [64, 128001, 65]  # typed special-token text is the token
    assert llama3.encode_documents(["One.", "Two."]) == [[128000, 4054, 13], [128000, 11874, 13]]
    padded = HFTokenizer(LLAMA3, special_ids={"pad": 13})
    assert padded.decode([4054, 13, 13]) == "One"  # decode drops the model's pad id


def test_a_folder_is_told_apart_by_its_files(llama3, tokenizer_dir, tmp_path):
    # The Llama-3 folder holds a tokenizer.model (tiktoken's ranks, not SentencePiece) beside tokenizer.json.
    assert isinstance(load_tokenizer(LLAMA3), HFTokenizer)
    assert isinstance(load_tokenizer(tokenizer_dir), Tokenizer)  # its tokenizer.json is calm-edge's info file
    assert isinstance(load_tokenizer(LLAMA3 / "tokenizer.json"), HFTokenizer)
    with pytest.raises(CalmEdgeError, match="no tokenizer at"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(CalmEdgeError, match="not a Hugging Face tokenizer file"):
        HFTokenizer(tmp_path)


def cpp_tokenize(cpp_build, tokenizer, records, tmp_path):
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    done = subprocess.run([str(cpp_build / "tokenize"), str(tokenizer), str(texts)], capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.decode("utf-8").split("\n") if line]


def test_the_cpp_tokenizer_equals_hugging_faces_on_wikitext_and_hostile_text(cpp_build, llama3, tmp_path):
    documents = [json.loads(line)["text"] for line in WIKITEXT.read_text(encoding="utf-8").splitlines()]
    texts = documents + HOSTILE
    results = cpp_tokenize(cpp_build, LLAMA3 / "tokenizer.json", [{"text": t} for t in texts], tmp_path)
    assert len(results) == len(texts) == 62 + len(HOSTILE)
    for text, result in zip(texts, results):
        ids = llama3.encode(text)
        assert result["ids"] == ids, repr(text[:60])
        assert result["decoded"] == llama3.decode(ids), repr(text[:60])
    assert sum(len(r["ids"]) for r in results[:62]) > 250_000  # the whole test set, not a sample


def test_the_cpp_tokenizer_decodes_cut_characters_as_tokenizers_does(cpp_build, llama3, tmp_path):
    """Byte-level tokens can end inside a character: every prefix of the byte tokens of a few multi-byte
    characters (and stray continuation or lead bytes) decodes to the same U+FFFD replacements."""
    byte_token = {b: llama3._tok.token_to_id(s) for b, s in zip(range(256), _byte_symbols())}
    text = "日本 🙂 née".encode("utf-8") + bytes([0x80, 0xC3, 0xF0, 0x9F, 0x99, 0x41, 0xED, 0xA0, 0x80])
    sequences = [[byte_token[b] for b in text[:k]] for k in range(1, len(text) + 1)]
    results = cpp_tokenize(cpp_build, LLAMA3 / "tokenizer.json", [{"ids": ids} for ids in sequences], tmp_path)
    assert any("\ufffd" in r["decoded"] for r in results)
    assert [r["decoded"] for r in results] == [llama3.decode(ids) for ids in sequences]


def _byte_symbols():
    """GPT-2's byte-level alphabet: the character that stands for each byte 0..255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def test_the_cpp_tokenizer_refuses_invalid_utf8_with_a_message(cpp_build, tmp_path):
    results = cpp_tokenize(cpp_build, LLAMA3 / "tokenizer.json", [{"bytes": [72, 105, 0xC3, 0x28]}], tmp_path)
    assert "not valid UTF-8" in results[0]["error"] and "byte 2" in results[0]["error"]
