"""Where a language model is evaluated: `EvalSettings`, and the (context, continuation) pairs they pick.

Positions. A position is a token offset t of the evaluation text with t = offset (mod K), t >= K,
stepping by `stride` tokens (a multiple of K), up to `max_positions` over the whole text. The
model sees the `context` tokens before t (fewer at the text's start) and the outcome is the next
4 tokens, text[t:t+4]. CALM and AR are scored at the very same positions. With `offset` = 0 every
CALM prompt is a whole number of chunks; other offsets exercise the eos left-fill of a partial
chunk, and comparing them shows what that costs.
"""
from dataclasses import dataclass

from calm_edge.errors import CalmEdgeError
from calm_edge.runtime.limits import check_seed

CONTINUATION = 4  # Brier-1..4 need 4 tokens
PROTOCOLS = ("calm-edge", "official")


@dataclass(frozen=True)
class EvalSettings:
    """How BrierLM is estimated: the positions (context, stride, how many, offsets) and the randomness."""

    context: int = 256  # tokens of context before each position
    stride: int = 32  # tokens between positions, a multiple of K
    max_positions: int = 2000
    offsets: tuple = (0,)  # offsets within a chunk to evaluate at; the first gives the headline figures
    seed: int = 0
    batch_size: int = 32  # positions generated together (two samples each)
    # "calm-edge": the positions above, two sampled continuations each; "official": the released
    # models' own protocol, teacher-forced over blocks of `block_tokens` (evaluation/official.py).
    protocol: str = "calm-edge"
    block_tokens: int = 8192
    # The context diagnostic: also score each position's target after another position's context
    # (`other_context_pairs`); a model that ignores its context scores the same on both.
    other_context: bool = False

    def __post_init__(self):
        object.__setattr__(self, "offsets", tuple(self.offsets))
        if self.protocol not in PROTOCOLS:
            raise CalmEdgeError(f"--protocol {self.protocol!r} is unknown; choose one of: {', '.join(PROTOCOLS)}")
        for name in ("context", "stride", "max_positions", "batch_size", "block_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CalmEdgeError(f"--{name.replace('_', '-')} {value!r} must be a positive whole number")
        check_seed(self.seed)
        if not self.offsets:
            raise CalmEdgeError("--offsets is empty; give at least one offset, e.g. 0")

    def describe(self, context_used):
        """What a report records of the positions: the context actually used, stride, count and seed."""
        return {"context_tokens": context_used, "stride": self.stride, "max_positions": self.max_positions,
                "seed": self.seed}


def other_context_pairs(pairs):
    """Each target after the prefix of the position half the list away (another part of the text)."""
    shift = len(pairs) // 2
    return [(pairs[(i + shift) % len(pairs)][0], target) for i, (_, target) in enumerate(pairs)]


def eval_positions(token_docs, chunk_size, context, stride, max_positions, offset=0):
    """(prefix, target) pairs: up to `context` tokens before each position, and the next 4 tokens."""
    if stride % chunk_size:
        raise CalmEdgeError(f"stride {stride} must be a multiple of K={chunk_size}")
    if not 0 <= offset < chunk_size:
        raise CalmEdgeError(f"offset {offset} must be in [0, K={chunk_size})")
    pairs = []
    for ids in token_docs:
        for t in range(chunk_size + offset, len(ids) - CONTINUATION + 1, stride):
            pairs.append((ids[max(0, t - context):t], ids[t:t + CONTINUATION]))
            if len(pairs) == max_positions:
                return pairs
    if not pairs:
        raise CalmEdgeError(f"the evaluation text has no position with {CONTINUATION} tokens after it; give longer documents")
    return pairs


def context_limit(max_context, chunk_size, kind):
    """The longest context (tokens, a multiple of K) that leaves room for the continuation.

    Room for the 4-token continuation and for a partial chunk's eos fill.
    """
    return max_context * (chunk_size if kind == "calm" else 1) - CONTINUATION - chunk_size
