"""Reading text corpora: files and folders in, `Document`s out.

A source is a file, a folder (searched recursively, in sorted order) or `demo:bible`:

  `.txt`                              the whole file is one document
  `.jsonl`, `.jsonl.gz`, `.jsonl.xz`  one document per line, its text under `text_field`

Every reader of text goes through `iter_documents`: the tokenizer's training, `data prepare`,
evaluation text and calibration text. Bad input is a `DataError` naming the file (and line) and
the fix.
"""
import gzip
import hashlib
import json
import lzma
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from calm_edge import demo_corpus
from calm_edge.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.xz")
TEXT_SUFFIXES = (".txt",)


@dataclass(frozen=True)
class Document:
    source: str  # file path or demo corpus name
    line: int  # 1-based line of a JSONL file (chapter of the demo corpus); 0 for a whole file
    text: str


def expand_sources(sources):
    """The files to read, in order: folders are searched recursively and sorted."""
    if not sources:
        raise DataError("no data given; pass at least one --data PATH (a file, a folder, or demo:bible)")
    files = []
    for source in sources:
        source = str(source)
        if source == demo_corpus.SOURCE_NAME:
            files.append(source)
            continue
        path = Path(source)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _is_supported(p))
            if not found:
                raise DataError(
                    f"folder {path} holds no .txt, .jsonl, .jsonl.gz or .jsonl.xz files; point --data at text files"
                )
            files.extend(str(p) for p in found)
        elif path.is_file():
            if not _is_supported(path):
                raise DataError(
                    f"{path}: unsupported file type; calm-edge reads .txt, .jsonl, .jsonl.gz and .jsonl.xz"
                )
            files.append(str(path))
        else:
            raise DataError(f"data file {path} does not exist; check the --data path")
    return files


def _is_supported(path):
    return path.name.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES)


def iter_documents(sources, text_field="text", progress=False, desc="reading"):
    """Yield every `Document` of `sources`, in order."""
    files = expand_sources(sources)
    bar = tqdm(total=None, unit=" docs", desc=desc, disable=not progress, leave=False)
    for file in files:
        for document in _read_file(file, text_field):
            bar.update(1)
            yield document
    bar.close()


def _read_file(file, text_field):
    if file == demo_corpus.SOURCE_NAME:
        for number, (_, text) in enumerate(demo_corpus.iter_bible_chapters(), start=1):
            yield Document(file, number, text)
        return
    try:
        if file.endswith(TEXT_SUFFIXES):
            with open(file, encoding="utf-8") as f:
                yield Document(file, 0, f.read())
            return
        opener = {".gz": gzip.open, ".xz": lzma.open}.get(Path(file).suffix, open)
        with opener(file, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    yield Document(file, number, _text_of_json_line(file, number, line, text_field))
    except PermissionError:
        raise DataError(f"cannot read {file}: permission denied; check the file's permissions") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{file} is not valid UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    except (lzma.LZMAError, gzip.BadGzipFile, EOFError, OSError) as e:
        raise DataError(
            f"{file} is corrupt or truncated ({type(e).__name__}: {e}); re-download or re-compress it"
        ) from None


def _text_of_json_line(file, number, line, text_field):
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{file}:{number}: not valid JSON ({e.msg}); each line must be one JSON object") from None
    if not isinstance(record, dict) or text_field not in record:
        keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(
            f"{file}:{number}: no {text_field!r} field (found: {keys}); pass --text-field with the field that holds the text"
        )
    text = record[text_field]
    if not isinstance(text, str):
        raise DataError(f"{file}:{number}: field {text_field!r} is {type(text).__name__}, not a string")
    return text


def is_valid_document(text, valid_fraction):
    """Whether a document goes to the valid split: a stable hash of its text, not its position."""
    if valid_fraction <= 0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < valid_fraction * 2**64
