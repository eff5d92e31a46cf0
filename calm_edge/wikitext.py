"""Undo WikiText's tokenized spacing, so its text looks like the raw text tokenizers train on.

WikiText-103 (../shared/data/wikitext103-test-doc.jsonl) splits punctuation off words and marks
joined numbers and hyphens with `@`: "a guest @-@ starring role , in 2 @,@ 000 . He 's".
`detokenize_wikitext` rewrites that to "a guest-starring role, in 2,000. He's". It is
deliberately simple and only undoes spacing: it never changes characters otherwise, and
"= Title =" heading lines and double quotes (whose pairing is ambiguous) are left as they are.
Results record which form of the text they were measured on.
"""
import re

from calm_edge.errors import ConfigError

# Applied in order.
_RULES = [
    (re.compile(r" @([-,.])@ "), r"\1"),  # " @-@ " -> "-", " @,@ " -> ",", " @.@ " -> "."
    (re.compile(r" ([,.;:!?%)\]}])"), r"\1"),  # no space before closing punctuation
    (re.compile(r"([(\[{$]) "), r"\1"),  # no space after opening brackets and currency
    (re.compile(r" ('(?:s|re|ve|ll|d|m|t)\b|n't\b)"), r"\1"),  # clitics: "He 's" -> "He's"
]

FORMS = ("none", "wikitext")


def detokenize_wikitext(text):
    for pattern, replacement in _RULES:
        text = pattern.sub(replacement, text)
    return text


def detokenizer(form):
    """The text transform for `--detokenize FORM`: "none" (identity) or "wikitext"."""
    if form == "none":
        return lambda text: text
    if form == "wikitext":
        return detokenize_wikitext
    raise ConfigError(f"unknown detokenizer {form!r}; choose one of: {', '.join(FORMS)}")
