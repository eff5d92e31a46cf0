"""Text in, text out: `generate` and `stream` over a `Model`.

    results = generate(model, ["Once upon", "The river"], GeneratorParams(max_new_tokens=64))
    for piece in stream(model, "Once upon", GeneratorParams(seed=3)):
        print(piece, end="", flush=True)

Both run a `Generator` (generator.py). Several prompts are generated as one left-padded batch.
Streaming yields text as each step's tokens arrive (K at a time for CALM), holding back an
incomplete UTF-8 character until its last byte arrives, and text that a stop sequence begins
with until the stop sequence completes (then it is cut) or cannot (then it is released). A stop
sequence ends a sequence: its text is cut before the stop sequence; its token ids are those
generated up to and including the step that completed it.
"""
from dataclasses import dataclass

from calm_edge.errors import CalmEdgeError
from calm_edge.runtime.generator import Generator, GeneratorParams


@dataclass
class GenerationResult:
    prompt: str
    text: str  # the generated continuation, without the prompt
    token_ids: list
    stopped_by: str  # "eos", "stop_sequence", "max_new_tokens" or "context"


class TextTracker:
    """Decodes one row's tokens incrementally and watches for stop sequences.

    `text` is always what decoding all of the row's ids gives (cut before a stop sequence), and
    the pieces `add` and `finish` return add up to it. A piece holds back what may still change
    or vanish: an incomplete UTF-8 character at the end (it decodes to U+FFFD until its last
    byte arrives), and an end of the text that a stop sequence begins with (streamed, it could
    not be taken back when the stop sequence completes and cuts it off).

    Each step decodes only the ids of the last two steps, not the whole row, as Hugging Face's
    and vLLM's incremental detokenizers do: the new text is decode(ids[prefix:]) less
    decode(ids[prefix:read]), where `read` is where the settled text ends and `prefix` where it
    ended a step before (decoding from one step back keeps whatever a tokenizer does at the
    start of a decode, such as dropping a leading space, out of the new text). A step settles
    once its text ends in a whole character. Should a decode from `prefix` not begin with the
    text it gave before, the tokenizer is decoded whole from then on.
    """

    def __init__(self, tokenizer, stop_sequences):
        self.tokenizer, self.stop_sequences = tokenizer, [s for s in stop_sequences if s]
        self.ids, self.text, self.emitted, self.stopped = [], "", 0, False
        self._prefix = self._read = 0  # token offsets: see the class docstring
        self._settled, self._known = "", ""  # the text of ids[:read]; decode(ids[prefix:read])
        self._whole = False  # decode everything at each step (a tokenizer the offsets do not suit)

    def add(self, new_ids):
        """Returns the new printable text; sets `stopped` when a stop sequence completed."""
        searched = self.emitted  # no stop sequence can begin before the text already released
        self.ids.extend(new_ids)
        self.text = self._decode()
        cuts = [i for i in (self.text.find(s, searched) for s in self.stop_sequences) if i >= 0]
        if cuts:
            self.text, self.stopped = self.text[:min(cuts)], True
            ready = len(self.text)
        else:
            printable = self.text.rstrip("\ufffd")
            ready = len(printable) - self._stop_start(printable)
        piece = self.text[self.emitted:ready]
        self.emitted = max(self.emitted, ready)
        return piece

    def finish(self):
        """The text held back at the end: an incomplete UTF-8 character (as U+FFFD), or the start of a
        stop sequence that never completed."""
        piece = self.text[self.emitted:]
        self.emitted = len(self.text)
        return piece

    def _decode(self):
        decode = self.tokenizer.decode
        if self._whole:
            return decode(self.ids)
        tail = decode(self.ids[self._prefix:])
        if not tail.startswith(self._known):
            self._whole = True
            return decode(self.ids)
        text = self._settled + tail[len(self._known):]
        if not text.endswith("\ufffd"):
            known = decode(self.ids[self._read:])
            if known:  # ids that decode to nothing (special ids) would leave the next step nothing to measure by
                self._prefix, self._read, self._settled, self._known = self._read, len(self.ids), text, known
        return text

    def _stop_start(self, text):
        """How many characters at the end of `text` a stop sequence begins with (the longest such end)."""
        longest = 0
        for stop in self.stop_sequences:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest


def _encode_prompts(model, prompts):
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise CalmEdgeError(f"prompts {prompts!r} must be a string or a list of strings")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise CalmEdgeError(f"prompt {i} is {type(prompt).__name__} {prompt!r}, not text; pass a string")
        if not prompt:
            raise CalmEdgeError(f"prompt {i} is empty; give some text to continue")
    return list(prompts), [model.tokenizer.encode_prompt(p) for p in prompts]


def _pieces(generator, trackers):
    """Advance `generator` to the end; yield (row, new printable text) as each row's tokens arrive."""
    for new_ids in generator:
        for row, ids in enumerate(new_ids):
            if ids:
                piece = trackers[row].add(ids)
                if trackers[row].stopped:
                    generator.stop(row, "stop_sequence")
                yield row, piece


def generate(model, prompts, params: GeneratorParams = None):
    """Generate continuations; a single prompt string gives one result, a list gives a list."""
    params = params or GeneratorParams()
    single = isinstance(prompts, str)
    texts, encoded = _encode_prompts(model, prompts)
    trackers = [TextTracker(model.tokenizer, params.stop_sequences) for _ in texts]
    generator = Generator(model, encoded, params)
    for _ in _pieces(generator, trackers):
        pass
    results = [GenerationResult(prompt=prompt, text=tracker.text if tracker.ids else "", token_ids=ids,
                                stopped_by=reason)
               for prompt, ids, tracker, reason in zip(texts, generator.tokens, trackers, generator.stop_reasons)]
    return results[0] if single else results


def stream(model, prompt, params: GeneratorParams = None):
    """Yield the continuation of one prompt as text pieces, as each step's tokens arrive."""
    params = params or GeneratorParams()
    _, encoded = _encode_prompts(model, [prompt])
    generator = Generator(model, encoded, params)
    trackers = [TextTracker(model.tokenizer, params.stop_sequences)]
    yield from (piece for _, piece in _pieces(generator, trackers) if piece)
    rest = trackers[0].finish()
    if rest:  # so that the streamed pieces add up to what `generate` returns
        yield rest
