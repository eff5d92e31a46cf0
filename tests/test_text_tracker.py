"""TextTracker: incremental decoding equals decoding everything, and a stop sequence never leaks into a stream.

Both tokenizers the runtime knows (the small SentencePiece model and the released models' Llama-3
byte-level BPE), random rows of real text, byte pieces and special ids, split into random steps.
"""
import random
from pathlib import Path

import pytest

from conftest import SHARED_DATA
from calm_edge.runtime.text_generation import TextTracker
from calm_edge.tokenizer import HFTokenizer, load_tokenizer

REPO = Path(__file__).resolve().parent.parent
SMALL_TOKENIZER = REPO / "models" / "calm-small-int4" / "tokenizer.model"
LLAMA3 = SHARED_DATA / "llama3-tokenizer"
TEXT = "The river rises in the hills. naïve café 日本語 🙂👍🏽 \n\nUser: hi\tthere, 3.14 — done."


def tokenizers():
    found = [("sentencepiece", load_tokenizer(SMALL_TOKENIZER))]
    if (LLAMA3 / "tokenizer.json").is_file():
        found.append(("llama3", HFTokenizer(LLAMA3)))
    return found


@pytest.fixture(scope="module", params=tokenizers(), ids=lambda t: t[0])
def tokenizer(request):
    return request.param[1]


def random_rows(tokenizer, count, seed):
    """Rows of ids: runs of real text, lone ids from anywhere in the vocabulary (byte pieces, specials)."""
    rng = random.Random(seed)
    words = tokenizer.encode(TEXT)
    size = tokenizer.vocab_size
    rows = []
    for _ in range(count):
        row = []
        while len(row) < rng.randrange(1, 120):
            if rng.random() < 0.6:
                start = rng.randrange(len(words))
                row += words[start:start + rng.randrange(1, 8)]
            else:
                row.append(rng.randrange(size))
        rows.append(row)
    return rows


def steps(row, rng):
    """`row` cut into steps of 1 to 8 ids."""
    out, i = [], 0
    while i < len(row):
        n = rng.randrange(1, 9)
        out.append(row[i:i + n])
        i += n
    return out


def test_text_is_always_the_whole_decode_and_the_pieces_add_up_to_it(tokenizer):
    rng = random.Random(0)
    for row in random_rows(tokenizer, 150, seed=1):
        tracker, pieces, ids = TextTracker(tokenizer, []), [], []
        for step in steps(row, rng):
            ids += step
            pieces.append(tracker.add(step))
            assert tracker.text == tokenizer.decode(ids)
            assert tracker.text.startswith("".join(pieces))  # nothing released is ever taken back
        assert "".join(pieces) + tracker.finish() == tokenizer.decode(row) and not tracker.stopped


def test_a_stop_sequence_cuts_the_text_and_none_of_it_is_streamed(tokenizer):
    rng = random.Random(2)
    for row in random_rows(tokenizer, 150, seed=3):
        whole = tokenizer.decode(row)
        if len(whole) < 4:
            continue
        at = rng.randrange(len(whole) - 2)
        stop = whole[at:at + rng.randrange(2, 6)]
        stop_also = "\nUser:"  # the chat template's stop, usually absent: only its starts are held back
        cut = whole[:min(i for i in (whole.find(stop), whole.find(stop_also)) if i >= 0)]
        tracker, pieces, ids = TextTracker(tokenizer, [stop_also, stop]), [], []
        for step in steps(row, rng):
            ids += step
            pieces.append(tracker.add(step))
            assert cut.startswith("".join(pieces))  # no piece of a stop sequence was ever streamed
            if tracker.stopped:
                break
        assert tracker.stopped and tracker.text == cut
        assert "".join(pieces) + tracker.finish() == tracker.text


def test_text_a_stop_sequence_begins_with_is_held_until_it_cannot_be_one():
    tokenizer = load_tokenizer(SMALL_TOKENIZER)
    ids = tokenizer.encode("hello world\nUser: hi")
    tracker = TextTracker(tokenizer, ["\nUser:"])
    pieces = [tracker.add([i]) for i in ids]
    assert "".join(pieces) == "hello world" == tracker.text and tracker.stopped
    # The same start, but the row ends before the stop sequence completes: finish releases it.
    tracker = TextTracker(tokenizer, ["\nUser:"])
    streamed = "".join(tracker.add([i]) for i in tokenizer.encode("hello world\nUs"))
    assert streamed == "hello world" and tracker.finish() == "\nUs" and not tracker.stopped
    # A start that the next tokens rule out is released with them.
    tracker = TextTracker(tokenizer, ["\nUser:"])
    streamed = "".join(tracker.add([i]) for i in tokenizer.encode("hello\nUnder the bridge"))
    assert streamed == "hello\nUnder the bridge" and tracker.finish() == ""


class CountingTokenizer:
    """A tokenizer's decode, recording how many ids each call decoded; optionally dropping a
    decode's leading space, as SentencePiece models trained with a dummy prefix decode."""

    def __init__(self, inner, strip_leading_space=False):
        self.inner, self.strip, self.lengths = inner, strip_leading_space, []

    def decode(self, ids):
        self.lengths.append(len(ids))
        text = self.inner.decode(ids)
        return text[1:] if self.strip and text.startswith(" ") else text


def test_each_step_decodes_a_few_ids_not_the_whole_row():
    inner = load_tokenizer(SMALL_TOKENIZER)
    row = inner.encode(" ".join([TEXT] * 40))
    counting = CountingTokenizer(inner)
    tracker = TextTracker(counting, ["\nAssistant:"])
    for i in range(0, len(row), 4):
        tracker.add(row[i:i + 4])
    assert len(row) > 1000 and tracker.text == inner.decode(row)
    # The ids of the last two steps, and those of a character still incomplete (an emoji's bytes span steps).
    assert max(counting.lengths) <= 32


def test_a_tokenizer_that_drops_a_leading_space_gets_the_exact_text():
    inner = load_tokenizer(SMALL_TOKENIZER)
    rng = random.Random(5)
    specials = [inner.eos_id, inner.pad_id, inner.bos_id]
    for row in random_rows(inner, 80, seed=6):
        row = [rng.choice(specials) if rng.random() < 0.2 else i for i in row]  # steps that decode to nothing
        counting = CountingTokenizer(inner, strip_leading_space=True)
        tracker, ids = TextTracker(counting, []), []
        for step in steps(row, rng):
            ids += step
            tracker.add(step)
            assert tracker.text == counting.decode(ids)
