"""Temperature sampling with only a black-box sampler (CALM paper, section 5).

A CALM model has no likelihoods: the energy head draws a latent, the decoder turns it into a
chunk of K tokens, and that is all. To sample at temperature T = 1/n the paper gives two
algorithms, both implemented here over any `draw_chunks(count) -> list of chunks` callable:

- exact (rejection): draw n independent chunks; if all n are the same chunk, emit it, otherwise
  try again. A chunk x is accepted with probability p(x)^n, so the output follows p^(1/T)
  normalised, exactly. Each round costs n draws; at low T or with a flat p it can take many.
- batch approximation: draw N candidates, count each distinct chunk, and choose among the chunks
  seen at least n times with weight C(count, n) (an unbiased estimate of p(x)^n up to a common
  factor); if no chunk was seen n times, fall back to n - 1, and so on down to 1 (plain sampling
  from the candidates). One round of N draws, then one uniform for the choice.

Only T = 1/n for a whole number n is supported; other temperatures are an error, raised before
any generation starts.

Randomness (the order is part of the contract shared with the C++ runtime): each call of
`draw_chunks` consumes the noise for its chunks from the sequence's `RandomStream` first; a
choice among candidates then consumes exactly one uniform. At T = 1 one chunk is drawn and no
choice uniform is consumed. The exact sampler gives up after `max_rounds` rounds and then makes
the batch approximation's choice among every chunk it drew (documented fallback, so a step
always ends).

The exact sampler draws `trials_per_call` rounds in one call of `draw_chunks` (one energy-head
and one decoder call instead of several) and keeps the first round whose n chunks agree; it then
rewinds the stream's counter to the end of that round, as if the later rounds had never been
drawn. It therefore returns the same chunk and consumes the same random values as one round
per call, whatever `trials_per_call` is: the randomness contract is unchanged, and the C++
runtime does the same.
"""
import math
from collections import Counter
from math import comb

from calm_edge.errors import CalmEdgeError
from calm_edge.runtime.limits import MAX_CANDIDATES

METHODS = ("exact", "batch")


def temperature_exponent(temperature):
    """The n of T = 1/n; any other temperature is an error that says which ones work."""
    try:
        temperature = float(temperature)
    except (TypeError, ValueError):
        raise CalmEdgeError(f"temperature {temperature!r} is not a number; use 1, 1/2 (0.5), 1/3, ...") from None
    if not math.isfinite(temperature):
        raise CalmEdgeError(f"temperature {temperature} is not a finite number; use 1, 1/2 (0.5), 1/3, ...")
    if temperature <= 0 or temperature > 1:
        raise CalmEdgeError(f"temperature {temperature} is out of range; CALM samples at T = 1/n: 1, 0.5, 0.333..., 0.25, ...")
    n = round(1.0 / temperature)
    if abs(1.0 / temperature - n) > 1e-6 * n:
        raise CalmEdgeError(
            f"temperature {temperature} is not 1/n for a whole number n; the likelihood-free samplers need "
            f"T = 1/n, e.g. {1 / max(n, 1):.4g} (n={n}) or {1 / (n + 1):.4g} (n={n + 1})"
        )
    return n


def batch_choice(chunks, n, u):
    """Index into `chunks` of the batch approximation's choice, using the uniform `u` in [0, 1).

    Distinct chunks are weighed C(count, m) for the largest m <= n that some chunk reaches, in
    order of first appearance; the returned index is that chunk's first position.
    """
    counts = Counter(chunks)
    m = min(n, max(counts.values()))
    first_index = {}
    for index, chunk in enumerate(chunks):
        first_index.setdefault(chunk, index)
    weights = [(first_index[chunk], comb(count, m)) for chunk, count in counts.items() if count >= m]
    target = u * sum(w for _, w in weights)
    running = 0
    for index, weight in weights:
        running += weight
        if target < running:
            return index
    return weights[-1][0]  # u is < 1, so this is only reached through rounding


def lazy_batch_choice(count, chunk_size, n, u):
    """The batch approximation's choice among `count` candidates, decoding only the tokens it needs.

    `batch_choice` depends on which candidates' chunks are equal, not on the chunks themselves,
    and it returns one chunk. Both can mostly be settled from the candidates' first tokens: two
    candidates whose first tokens differ have different chunks. So this asks for the tokens in at
    most two rounds, and the decoder's head (its vocabulary projection, most of a decoder's
    arithmetic) runs only on them:

      0. every candidate's first token, and the rest of the chunk `batch_choice` would pick if
         all chunks differed (its pick when they do: then one round is all a step costs);
      1. if some candidates still agree on every token known so far, the remaining tokens of
         each of them.

    Two rounds always settle it. If some chunk is drawn twice or more, `batch_choice` weighs
    only chunks drawn at least twice, and those are the groups round 1 decoded in full; if every
    chunk differs, it picks round 0's guess. The last step below (the pick's missing tokens) is
    therefore never needed, and kept only as the definition: the chunk returned is complete.

    Candidates are sorted into groups known to agree on their first `depth` tokens; a group is
    split by its next token once all its members have it. At the end, two candidates share a
    group exactly when their chunks are equal, so `batch_choice` over the group labels returns
    the index it returns over the chunks, and the chunk returned is the one plain decoding would
    return: the same tokens, for the same uniform `u`, with no randomness of its own.

    A generator: it yields a list of (candidate, position) pairs, takes their token ids (a list
    in the same order) through `send`, and returns the chosen chunk as a tuple.
    """
    K = chunk_size
    tokens = [[None] * K for _ in range(count)]
    groups = [(0, list(range(count)))]  # (depth, members): the members agree on positions < depth

    def missing(candidates, start=0):
        return [(j, p) for j in candidates for p in range(start, K) if tokens[j][p] is None]

    def split_groups():
        settled, pending = [], list(groups)
        while pending:
            depth, members = pending.pop(0)
            if len(members) == 1 or depth == K or any(tokens[j][depth] is None for j in members):
                settled.append((depth, members))
                continue
            by_token = {}
            for j in members:
                by_token.setdefault(tokens[j][depth], []).append(j)
            pending[:0] = [(depth + 1, part) for part in by_token.values()]
        return settled

    def pick():
        label = {j: g for g, (_, members) in enumerate(groups) for j in members}
        return batch_choice([label[j] for j in range(count)], n, u)

    def unsettled():
        return [(depth, members) for depth, members in groups if len(members) > 1 and depth < K]

    requests = [(j, 0) for j in range(count)] + missing([batch_choice(list(range(count)), n, u)], 1)
    while requests:
        received = yield requests
        for (j, p), token in zip(requests, received):
            tokens[j][p] = int(token)
        groups = split_groups()
        if unsettled():  # groups are disjoint, so no position is asked for twice
            requests = [r for depth, members in unsettled() for r in missing(members, depth)]
        else:
            requests = missing([pick()])
    return tuple(tokens[pick()])


class TemperatureSampler:
    """Picks one chunk per step at temperature T = 1/n from a black-box chunk sampler."""

    def __init__(self, temperature=1.0, method="batch", candidates=16, max_rounds=100, trials_per_call=4):
        self.n = temperature_exponent(temperature)
        if method not in METHODS:
            raise CalmEdgeError(f"sampling method {method!r} is unknown; choose one of: {', '.join(METHODS)}")
        if self.n > MAX_CANDIDATES:
            raise CalmEdgeError(f"temperature 1/{self.n} is too low: T = 1/n needs n <= {MAX_CANDIDATES}, the most "
                                "candidates a step may draw; use a higher temperature")
        if method == "batch" and candidates < self.n:
            raise CalmEdgeError(
                f"{candidates} candidates cannot show a chunk {self.n} times, which T = 1/{self.n} needs; "
                f"pass --candidates {self.n} or more"
            + (f" (at least {4 * self.n} for a good approximation)" if 4 * self.n <= MAX_CANDIDATES else "")
            )
        self.method, self.candidates, self.max_rounds = method, candidates, max_rounds
        self.trials_per_call = max(1, trials_per_call)

    def draws_per_round(self):
        """How many chunks one round draws (the energy head's sample count for a step)."""
        if self.n == 1:
            return 1
        return self.n if self.method == "exact" else self.candidates

    def draws_per_call(self):
        """The most chunks one call of the energy head draws per row (what its memory is sized by)."""
        return self.draws_per_round() * (1 if self.single_round() else self.trials_per_call)

    def single_round(self):
        """Whether one round of `draws_per_round()` chunks always decides the step (T = 1 or batch)."""
        return self.n == 1 or self.method == "batch"

    def choose(self, chunks, rng):
        """The pick among one round's chunks, for a `single_round()` sampler."""
        if self.n == 1:
            return chunks[0]
        return chunks[batch_choice(chunks, self.n, rng.draw_one())]

    def sample(self, draw_chunks, rng):
        """One chunk. `draw_chunks(count)` draws `count` chunks, taking its noise from `rng` first."""
        if self.single_round():
            return self.choose(draw_chunks(self.draws_per_round()), rng)
        drawn, done = [], 0
        while done < self.max_rounds:
            trials = min(self.trials_per_call, self.max_rounds - done)
            start = rng.counter
            chunks = draw_chunks(self.n * trials)
            per_trial = (rng.counter - start) // trials  # random values one round of n chunks consumes
            for j in range(trials):
                trial = chunks[j * self.n:(j + 1) * self.n]
                if all(chunk == trial[0] for chunk in trial):
                    rng.counter = start + (j + 1) * per_trial  # as if the later rounds were never drawn
                    return trial[0]
                drawn.extend(trial)
            done += trials
        return drawn[batch_choice(drawn, self.n, rng.draw_one())]
