"""Prompts as token ids, identical for every runner.

All runners share one tokenizer (the packages' SentencePiece model, which export's Hugging Face
output copies), so the prompts are cut once as ids and handed to each runner as ids: no runner
tokenizes, and none can disagree about a prompt's length. Row i of a batch of prompts of length
L is the i-th consecutive window of L tokens of the text, so the rows differ.
"""
import json
from pathlib import Path

from calm_edge.errors import CalmEdgeError

# Used when no text file is given or found: any prose works, speed does not depend on it.
FALLBACK_TEXT = (
    "The history of the city begins in the twelfth century, when a bridge was built where the old road "
    "crossed the river. Merchants settled on both banks, a market grew around the bridge, and within a "
    "hundred years the town had walls, a church and a charter of its own. "
)


def read_text(text_file, min_chars):
    """At least `min_chars` characters: the JSONL documents of `text_file` in order, else the fallback."""
    pieces, total = [], 0
    if text_file is not None and Path(text_file).is_file():
        with open(text_file, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise CalmEdgeError(f"{text_file} is not JSONL with a \"text\" field on every line; "
                                        "pass a file like ../shared/data/wikitext103-test-doc.jsonl with --text") from None
                pieces.append(text)
                total += len(text)
                if total >= min_chars:
                    break
    elif text_file is not None:
        raise CalmEdgeError(f"--text {text_file} does not exist; pass a JSONL file of documents or leave --text out")
    while total < min_chars:  # a short file is repeated rather than refused
        pieces.append(pieces[len(pieces) % len(pieces)] if pieces else FALLBACK_TEXT)
        total += len(pieces[-1])
    return "\n".join(pieces)


def prompt_batches(tokenizer, text_file, lengths, max_batch):
    """{length: [max_batch lists of `length` token ids]}; batch b uses the first b rows."""
    needed = max(lengths) * max_batch
    ids = []
    chars = needed * 6  # about 3.7 characters per token on Wikipedia text, with room to spare
    while len(ids) < needed:
        ids = tokenizer.encode(read_text(text_file, chars))
        chars *= 2
    return {L: [ids[i * L:(i + 1) * L] for i in range(max_batch)] for L in lengths}
