"""Text in, text out: `generate` and `stream` over a `Model`.

    results = generate(model, ["Once upon", "The river"], GeneratorParams(max_new_tokens=64))
    for piece in stream(model, "Once upon", GeneratorParams(seed=3)):
        print(piece, end="", flush=True)

Both run a `Generator` (generator.py). Several prompts are generated as one left-padded batch.
Streaming yields text as each step's tokens arrive (K at a time for CALM), holding back an
incomplete UTF-8 character until its last byte arrives. A stop sequence ends a sequence: its
text is cut before the stop sequence; its token ids are those generated up to and including the
step that completed it.
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
    """Decodes one row's tokens incrementally and watches for stop sequences."""

    def __init__(self, tokenizer, stop_sequences):
        self.tokenizer, self.stop_sequences = tokenizer, [s for s in stop_sequences if s]
        self.ids, self.text, self.emitted, self.stopped = [], "", 0, False

    def add(self, new_ids):
        """Returns the new printable text; sets `stopped` when a stop sequence completed."""
        self.ids.extend(new_ids)
        self.text = self.tokenizer.decode(self.ids)
        cut = min((i for i in (self.text.find(s) for s in self.stop_sequences) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
        ready = len(self.text) if self.stopped else len(self.text.rstrip("\ufffd"))
        piece = self.text[self.emitted:ready]
        self.emitted = max(self.emitted, ready)
        return piece

    def finish(self):
        """The text held back at the end (a UTF-8 character whose last bytes never came, as U+FFFD)."""
        piece = self.text[self.emitted:]
        self.emitted = len(self.text)
        return piece


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
