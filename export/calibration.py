"""Real inputs for every graph of a package, made by running its fp32 graphs on real text.

Static quantization needs the value ranges the graphs really see, and quantization validation
needs inputs that look like deployment, not random noise. Both come from here:

- text, tokenized with the package's tokenizer (calm_edge.text_source), is cut into windows of
  whole chunks;
- each window is run through the fp32 step graph (`backbone` or `ar`) the way the runtime does:
  one prefill over the first chunks, then decode steps that feed the real next chunk and the
  cache back (teacher forcing, so the inputs stay real text and not the model's own samples);
- CALM only: the hidden states of those steps go through the fp32 energy head with noise from
  the shared generator (runtime/rng.py), and the latents it produces through the decoder.

`collect_feeds` returns {graph name: [feed dict, ...]}, each feed a complete input of that
graph; `FeedReader` hands one graph's feeds to ONNX Runtime's calibrator.

Only onnxruntime and numpy: the package's sessions are opened by `calm_edge.runtime.Model`, so
this works on any machine that can run the package.
"""
import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from calm_edge.errors import CalmEdgeError
from calm_edge.runtime.rng import RandomStream

ENERGY_SAMPLES = 8  # latents drawn per hidden state: the batch sampler's order of magnitude


def token_windows(tokens, width, max_windows, skip=0):
    """Up to `max_windows` consecutive windows of `width` tokens, after the first `skip` windows."""
    tokens = list(tokens)
    starts = range(skip * width, len(tokens) - width + 1, width)
    windows = [tokens[start:start + width] for start in starts][:max_windows]
    if not windows:
        raise CalmEdgeError(
            f"the text has {len(tokens)} tokens, fewer than {(skip + 1) * width} needed for its windows of "
            f"{width}; give more text"
        )
    return windows


def _step_feed(ids, total, first_position, past):
    """One call of a step graph: `ids` [1, S*K] after `total - S` cached positions."""
    sequence = total - first_position
    return {
        "input_ids": np.asarray([ids], dtype=np.int64),
        "attention_mask": np.ones((1, total), dtype=np.int64),
        "position_ids": np.arange(first_position, first_position + sequence, dtype=np.int64)[None],
        **past,
    }


def collect_feeds(model, windows, prefill_chunks, seed=0):
    """{graph: [feed, ...]} from running `model` (a runtime Model) over token `windows`.

    Each window gives one prefill over its first `prefill_chunks` chunks and one decode step per
    remaining chunk.
    """
    manifest = model.manifest
    kind, K, step_name, past_names = manifest.kind, manifest.chunk_size, manifest.step_graph, manifest.past_names
    empty = np.zeros((1, manifest.num_kv_heads, 0, manifest.head_dim), np.float32)
    feeds = {name: [] for name in model.sessions}
    hidden_states = []
    for window in windows:
        chunks = len(window) // K
        if not 0 < prefill_chunks < chunks:
            raise CalmEdgeError(f"prefill of {prefill_chunks} chunks does not fit a window of {chunks} chunks")
        calls = [(window[:prefill_chunks * K], prefill_chunks, 0)]
        calls += [(window[c * K:(c + 1) * K], c + 1, c) for c in range(prefill_chunks, chunks)]
        past = {name: empty for name in past_names}
        for ids, total, first in calls:
            feed = _step_feed(ids, total, first, past)
            feeds[step_name].append(feed)
            outputs = model.sessions[step_name].run(None, feed)
            past = dict(zip(past_names, outputs[1:]))  # present.* of this call is the next call's past
            if kind == "calm":
                hidden_states.append(outputs[0][0])  # [S, hidden]
    if kind == "calm":
        _collect_head_and_decoder_feeds(model, hidden_states, feeds, seed)
    return feeds


def _collect_head_and_decoder_feeds(model, hidden_states, feeds, seed):
    """Energy-head feeds from the backbone's hidden states; decoder feeds from the head's latents (and a
    split decoder's head feeds from the decoder's states)."""
    noise_size = model.noise_size
    for stream, hidden in enumerate(hidden_states):
        count = len(hidden) * ENERGY_SAMPLES * noise_size
        noise = RandomStream(seed, stream).draw(count).reshape(len(hidden), ENERGY_SAMPLES, noise_size)
        feed = {"hidden": np.ascontiguousarray(hidden, np.float32), "noise": noise.astype(np.float32)}
        feeds["energy_head"].append(feed)
        latents = model.sessions["energy_head"].run(None, feed)[0]
        feeds["decoder"].append({"latents": latents.reshape(-1, latents.shape[-1])})
        if "decoder_head" in feeds:  # a split decoder: its head takes the decoder's states
            states = model.decoder_states(latents.reshape(-1, latents.shape[-1]))
            feeds["decoder_head"].append({"decoder_states": states.reshape(-1, states.shape[-1])})


class FeedReader(CalibrationDataReader):
    """ONNX Runtime's calibration interface over a list of recorded feeds."""

    def __init__(self, feeds):
        self._feeds = list(feeds)
        self._next = 0

    def get_next(self):
        if self._next >= len(self._feeds):
            return None
        self._next += 1
        return self._feeds[self._next - 1]

    def rewind(self):
        self._next = 0
