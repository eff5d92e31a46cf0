"""Parameter counts and FLOPs of the three models, from their configs alone.

Conventions (the usual ones, as in the Chinchilla and CALM papers):

- a matrix multiply with a weight of P entries costs 2 P FLOPs per row it is applied to;
- attention over a context of c positions costs 2 * 2 * (heads * head_dim) * c per query
  (scores, then the weighted sum of values); norms, activations and softmax are left out;
- training costs 3x the forward pass (forward plus a backward of twice its cost) for the parts
  that are trained, 1x for frozen parts that only run forward (CALM's autoencoder).

Per generated token:

    AR    backbone(c) + lm_head                              every token
    CALM  [input MLP + backbone(c) + energy head x S + AE decoder] / K,  S = head samples per step

The context c is the average attended length: half the training window, or for generation the
prompt plus half the new tokens. `tests/test_flops.py` checks every parameter count here against
the torch modules.
"""
from calm_edge.config import Config


def _backbone_layer_weights(bb):
    attention = bb.hidden_size * bb.num_heads * bb.head_dim * 2 + bb.hidden_size * bb.num_kv_heads * bb.head_dim * 2
    return attention + 3 * bb.hidden_size * bb.intermediate_size


def backbone_weights(bb):
    """Matrix weights of the backbone (norm vectors excluded)."""
    return bb.num_layers * _backbone_layer_weights(bb)


def backbone_flops(bb, context):
    """Forward FLOPs of one position through the backbone, attending `context` positions."""
    return 2 * backbone_weights(bb) + 4 * bb.num_layers * bb.num_heads * bb.head_dim * context


def energy_head_weights(config: Config):
    """Matrix weights of the energy head, of either structure (calm_edge/models/calm.py)."""
    hidden, calm, latent = config.calm.backbone.hidden_size, config.calm, config.autoencoder.latent_size
    if calm.energy_head == "official":
        # noise and hidden embeddings; per block a 2H -> H -> H -> 2H MLP and the H -> H down projection;
        # the final H -> H -> latent layer.
        block = 2 * hidden * hidden + hidden * hidden + hidden * 2 * hidden + hidden * hidden
        return calm.noise_size * hidden + hidden * hidden + calm.energy_head_layers * block + hidden * hidden + hidden * latent
    block = 2 * hidden * hidden + 3 * hidden * 2 * hidden
    return calm.noise_size * hidden + calm.energy_head_layers * block + hidden * latent


def energy_head_vectors(config: Config):
    """Biases and norm weights of the energy head."""
    hidden, calm, latent = config.calm.backbone.hidden_size, config.calm, config.autoencoder.latent_size
    if calm.energy_head == "official":
        # biases of every linear; two LayerNorms (weight and bias) up front, one per block and one at the end
        block = hidden + hidden + 2 * hidden + hidden + 2 * hidden
        return 2 * hidden + 4 * hidden + calm.energy_head_layers * block + hidden + latent + 2 * hidden
    return hidden + latent + (calm.energy_head_layers + 1) * hidden  # two biases, the norms


def input_mlp_weights(config: Config):
    hidden, K = config.calm.backbone.hidden_size, config.autoencoder.chunk_size
    if config.calm.input_projection == "official":
        return K * hidden * 2 * hidden + 2 * hidden * hidden
    return K * hidden * hidden + hidden * hidden


def input_mlp_vectors(config: Config):
    """Biases (and the official projection's LayerNorm) of the input MLP."""
    hidden = config.calm.backbone.hidden_size
    return 2 * hidden + hidden + 2 * hidden if config.calm.input_projection == "official" else 2 * hidden


def _ae_mlp_layer(ae):
    return 3 * ae.hidden_size * ae.intermediate_size


def ae_encoder_flops(config: Config):
    """Forward FLOPs of encoding one chunk of K tokens."""
    ae, K = config.autoencoder, config.autoencoder.chunk_size
    weights_per_chunk = (K * ae.num_encoder_layers * _ae_mlp_layer(ae) + K * ae.hidden_size * ae.hidden_size
                         + ae.num_encoder_layers * _ae_mlp_layer(ae) + ae.hidden_size * 2 * ae.latent_size)
    return 2 * weights_per_chunk


def ae_decoder_flops(config: Config):
    """Forward FLOPs of decoding one latent into K tokens, the vocabulary projection included."""
    ae, K, vocab = config.autoencoder, config.autoencoder.chunk_size, config.tokenizer.vocab_size
    weights_per_chunk = (ae.latent_size * ae.hidden_size + ae.num_decoder_layers * _ae_mlp_layer(ae)
                         + ae.hidden_size * K * ae.hidden_size + K * ae.num_decoder_layers * _ae_mlp_layer(ae)
                         + K * ae.hidden_size * vocab)
    return 2 * weights_per_chunk


def autoencoder_parameters(config: Config):
    ae, K, vocab = config.autoencoder, config.autoencoder.chunk_size, config.tokenizer.vocab_size
    mlp = _ae_mlp_layer(ae) + ae.hidden_size  # + its norm
    biases = (ae.hidden_size + K * ae.hidden_size) if ae.projection_bias else 0  # compress and expand
    return (vocab * ae.hidden_size
            + (ae.num_encoder_layers * 2) * mlp + K * ae.hidden_size * ae.hidden_size + ae.hidden_size
            + ae.hidden_size * 2 * ae.latent_size + 2 * ae.latent_size
            + ae.latent_size * ae.hidden_size + ae.hidden_size
            + (ae.num_decoder_layers * 2) * mlp + ae.hidden_size * K * ae.hidden_size + ae.hidden_size + biases)


def _backbone_parameters(bb):
    return backbone_weights(bb) + (2 * bb.num_layers + 1) * bb.hidden_size


def calm_parameters(config: Config):
    """Trainable parameters of the CALM model (the frozen autoencoder not included)."""
    hidden, calm = config.calm.backbone.hidden_size, config.calm
    embeddings = config.tokenizer.vocab_size * hidden
    input_mlp = input_mlp_weights(config) + input_mlp_vectors(config)
    head = energy_head_weights(config) + energy_head_vectors(config)
    return embeddings + input_mlp + _backbone_parameters(calm.backbone) + head


def ar_parameters(config: Config):
    bb, vocab = config.ar.backbone, config.tokenizer.vocab_size
    return 2 * vocab * bb.hidden_size + _backbone_parameters(bb)


def ar_inference_flops_per_token(config: Config, context):
    bb = config.ar.backbone
    return backbone_flops(bb, context) + 2 * bb.hidden_size * config.tokenizer.vocab_size


def calm_inference_flops_per_token(config: Config, context_tokens, head_samples=1):
    """Per generated token; `context_tokens` is the attended context in tokens."""
    K = config.autoencoder.chunk_size
    per_step = (2 * input_mlp_weights(config) + backbone_flops(config.calm.backbone, context_tokens / K)
                + head_samples * 2 * energy_head_weights(config) + head_samples * ae_decoder_flops(config))
    return per_step / K


def ar_training_flops_per_token(config: Config):
    return 3 * ar_inference_flops_per_token(config, config.train_ar.seq_len / 2)


def calm_training_flops_per_token(config: Config):
    """Per training token: trained parts 3x, with N head samples; the frozen AE encoder 1x."""
    K, calm = config.autoencoder.chunk_size, config.calm
    trained = (2 * input_mlp_weights(config)
               + backbone_flops(calm.backbone, config.train_calm.seq_len / K / 2)
               + calm.num_model_samples * 2 * energy_head_weights(config))
    return (3 * trained + ae_encoder_flops(config)) / K


def autoencoder_training_flops_per_token(config: Config):
    """Per training token: encoder and decoder, forward and backward (3x)."""
    return 3 * (ae_encoder_flops(config) + ae_decoder_flops(config)) / config.autoencoder.chunk_size


def training_flops_per_token(config: Config, kind):
    """Model FLOPs of one training token of a `kind` model (for throughput and utilisation)."""
    per_token = {"autoencoder": autoencoder_training_flops_per_token, "calm": calm_training_flops_per_token,
                 "ar": ar_training_flops_per_token}
    return per_token[kind](config)


def summary(config: Config, kind, tokens_seen=0, context_tokens=None):
    """Parameters, training FLOPs so far and inference FLOPs per token, for a run's metadata."""
    if kind == "calm":
        context = context_tokens if context_tokens is not None else config.train_calm.seq_len / 2
        return {
            "parameters": calm_parameters(config),
            "autoencoder_parameters": autoencoder_parameters(config),
            "training_flops_per_token": calm_training_flops_per_token(config),
            "training_flops": calm_training_flops_per_token(config) * tokens_seen,
            "inference_flops_per_token": calm_inference_flops_per_token(config, context),
            "inference_context_tokens": context,
        }
    if kind == "ar":
        context = context_tokens if context_tokens is not None else config.train_ar.seq_len / 2
        return {
            "parameters": ar_parameters(config),
            "training_flops_per_token": ar_training_flops_per_token(config),
            "training_flops": ar_training_flops_per_token(config) * tokens_seen,
            "inference_flops_per_token": ar_inference_flops_per_token(config, context),
            "inference_context_tokens": context,
        }
    raise ValueError(f"no FLOPs model for kind {kind!r}")
