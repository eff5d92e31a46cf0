"""Weights read per generated token: the model of decode speed at batch 1.

At batch 1 a decode step multiplies one row by every weight matrix it uses, so its time is
bound by reading those matrices from memory, not by arithmetic. The ideal speed-up of CALM over
the token-by-token model is therefore the ratio of weights read per *generated token*:

    AR    backbone + lm_head (+ one embedding row)                               every token
    CALM  [input MLP + backbone + energy head + AE decoder (+ K embedding rows)] / K

Unlike the FLOPs model (`flops.py`), a matrix read once serves every row it multiplies: the
autoencoder decoder's per-position layers and its tied vocabulary projection are read once for
all K positions, and the energy head's weights once for all N candidates of a low-temperature
step. Norm vectors and biases are left out (a rounding error next to the matrices), and so is
the key/value cache, which `kv_cache_bytes_per_token` gives separately: at the benchmark's
contexts it is a few percent of the weights.

Worked numbers (tests/test_weights_read.py checks them): the paper's pairing, CALM-M against
Transformer-S with a 128,256-token vocabulary and the paper's autoencoder, reads 183.4 M
weights per token for AR against 78.6 M for CALM with full multi-head attention (2.33x), and
174.0 M against 72.3 M with the `base` preset's 4 KV heads (2.41x).
"""
from calm_edge import flops
from calm_edge.config import Config

BYTES_PER_WEIGHT = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "int4": 0.5}


def ar_weights_per_token(config: Config):
    """{part: weights read} for one AR token."""
    bb, vocab = config.ar.backbone, config.tokenizer.vocab_size
    return {"backbone": flops.backbone_weights(bb), "embedding_rows": bb.hidden_size,
            "lm_head": bb.hidden_size * vocab}


def ae_decoder_weights(config: Config):
    """Weights one decoder call reads for a chunk: its per-position layers and projection once."""
    ae, K, vocab = config.autoencoder, config.autoencoder.chunk_size, config.tokenizer.vocab_size
    mlp = 3 * ae.hidden_size * ae.intermediate_size  # a residual SwiGLU layer, as in flops.py
    return (ae.latent_size * ae.hidden_size + ae.num_decoder_layers * mlp  # latent -> hidden, chunk layers
            + ae.hidden_size * K * ae.hidden_size  # expand to K positions
            + ae.num_decoder_layers * mlp  # per-position layers: the same matrices for all K
            + vocab * ae.hidden_size)  # tied vocabulary projection


def calm_weights_per_step(config: Config):
    """{part: weights read} for one CALM step (K tokens)."""
    hidden, K = config.calm.backbone.hidden_size, config.autoencoder.chunk_size
    return {"input_mlp": flops.input_mlp_weights(config), "backbone": flops.backbone_weights(config.calm.backbone),
            "embedding_rows": K * hidden, "energy_head": flops.energy_head_weights(config),
            "ae_decoder": ae_decoder_weights(config)}


def weights_per_token(config: Config, kind):
    """{"parts": {part: weights per token}, "total": weights per generated token} for `kind`."""
    if kind == "ar":
        parts = ar_weights_per_token(config)
    elif kind == "calm":
        K = config.autoencoder.chunk_size
        parts = {name: weights / K for name, weights in calm_weights_per_step(config).items()}
    else:
        raise ValueError(f"no weights-read model for kind {kind!r}")
    return {"parts": parts, "total": sum(parts.values())}


def bytes_per_token(config: Config, kind, precision="fp32"):
    """Bytes of weights read per generated token at `precision` (fp32, fp16, int8, ...)."""
    return weights_per_token(config, kind)["total"] * BYTES_PER_WEIGHT[precision]


def kv_cache_bytes_per_token(config: Config, kind, context_tokens, bytes_per_value=4):
    """Bytes of key/value cache read per generated token when attending `context_tokens` tokens."""
    bb = (config.calm if kind == "calm" else config.ar).backbone
    per_position = 2 * bb.num_layers * bb.num_kv_heads * bb.head_dim * bytes_per_value
    if kind == "calm":  # one step per K tokens, over a cache of context / K vectors
        K = config.autoencoder.chunk_size
        return per_position * (context_tokens / K) / K
    return per_position * context_tokens


def ideal_speedup(calm_config: Config, ar_config: Config):
    """CALM over AR decode tokens/s at batch 1 if both ran at the memory bandwidth's limit."""
    return weights_per_token(ar_config, "ar")["total"] / weights_per_token(calm_config, "calm")["total"]
