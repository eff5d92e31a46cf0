"""The CALM autoencoder: K tokens to one latent vector and back (paper section 2).

Encoder, for each chunk of K token ids:

    embed each token -> residual MLP layers on each token -> concatenate the K token states and
    project to one hidden vector -> residual MLP layers -> (mean, log sigma) of the latent

Decoder, the mirror image:

    latent -> hidden vector -> residual MLP layers -> expand to K hidden states -> residual MLP
    layers on each token -> logits through the (tied) embedding matrix

The released CALM autoencoder has exactly this structure, with one residual layer on each side
(its `num_encoder_layers = 2` counts both sides; ours counts one) and biases in the two chunk
projections (`projection_bias`); `calm_edge.training.official` maps its weights onto this module.

Robustness is part of the method, and each piece is a config value that is on by default:

- the posterior is a diagonal Gaussian; the KL to N(0, I) is computed per dimension, clamped
  from below at `kl_clamp` (max(KL_d, 0.5)) and weighted by `kl_weight`, so dimensions are not
  pushed to collapse yet the encoder cannot shrink sigma to nothing for free;
- dropout (`latent_dropout`) on the sampled latent;
- `token_mask_prob` of the input tokens are masked during training. A masked token's embedding
  is replaced by a ZERO VECTOR (no extra vocabulary id is needed, and the tied output matrix
  stays the tokenizer's). The decoder must still reconstruct the masked token.

Masking, sampling and dropout happen only in training mode (`model.train()`); in eval mode
`encode` is deterministic and the CALM model uses the posterior mean and sigma it returns.

The decoder uses only plain ops (linear layers, SiLU, a hand-written RMSNorm, reshapes and one
matmul with the embedding matrix) so that it exports to ONNX; `decode_tokens` adds the argmax
that the exported graph ends with.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from calm_edge.config import Config
from calm_edge.models.backbone import RMSNorm  # one RMSNorm for every model (elementwise ops only)

INITIAL_LOG_SIGMA = math.log(0.1)


class ResidualMLP(nn.Module):
    """x + SwiGLU(RMSNorm(x)): one residual MLP layer."""

    def __init__(self, hidden_size, intermediate_size):
        super().__init__()
        self.norm = RMSNorm(hidden_size)
        self.gate = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        h = self.norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def _stack(count, hidden_size, intermediate_size):
    return nn.Sequential(*[ResidualMLP(hidden_size, intermediate_size) for _ in range(count)])


class Autoencoder(nn.Module):
    """Maps chunks of K token ids [..., K] to latents [..., latent_size] and back to logits."""

    def __init__(self, config: Config):
        super().__init__()
        ae = config.autoencoder
        self.settings = ae
        self.chunk_size = K = ae.chunk_size
        self.vocab_size = config.tokenizer.vocab_size
        self.latent_size = ae.latent_size
        H, I = ae.hidden_size, ae.intermediate_size

        self.embed = nn.Embedding(self.vocab_size, H)
        # Encoder.
        self.encoder_token_layers = _stack(ae.num_encoder_layers, H, I)
        self.compress = nn.Linear(K * H, H, bias=ae.projection_bias)
        self.encoder_chunk_layers = _stack(ae.num_encoder_layers, H, I)
        self.encoder_norm = RMSNorm(H)
        self.to_latent = nn.Linear(H, 2 * ae.latent_size)  # mean and log sigma, side by side
        # Decoder.
        self.from_latent = nn.Linear(ae.latent_size, H)
        self.decoder_chunk_layers = _stack(ae.num_decoder_layers, H, I)
        self.expand = nn.Linear(H, K * H, bias=ae.projection_bias)
        self.decoder_token_layers = _stack(ae.num_decoder_layers, H, I)
        self.decoder_norm = RMSNorm(H)
        self.latent_dropout = nn.Dropout(ae.latent_dropout)

        self.apply(self._init_weights)
        # Start with a narrow posterior (sigma = 0.1): with sigma = 1 the sampled latent would be
        # almost pure noise against a mean of norm ~0.2, and the decoder would get no signal
        # until the encoder slowly learned to shrink sigma. Training still sets sigma freely.
        with torch.no_grad():
            self.to_latent.bias[ae.latent_size:] = INITIAL_LOG_SIGMA

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self):
        return sum(p.numel() for p in self.parameters())

    # ----- the two halves --------------------------------------------------------------------

    def encode(self, ids):
        """Token ids [..., K] -> (mean, log sigma), each [..., latent_size].

        In training mode a random `token_mask_prob` of the tokens are masked (zero embedding).
        """
        lead = ids.shape[:-1]
        x = self.embed(ids)  # [..., K, H]
        if self.training and self.settings.token_mask_prob > 0:
            keep = torch.rand(ids.shape, device=ids.device) >= self.settings.token_mask_prob
            x = x * keep.unsqueeze(-1).to(x.dtype)
        x = self.encoder_token_layers(x)
        x = self.compress(x.flatten(-2))  # [..., K*H] -> [..., H]
        x = self.encoder_chunk_layers(x)
        mean, logstd = self.to_latent(self.encoder_norm(x)).chunk(2, dim=-1)
        return mean.reshape(*lead, self.latent_size), logstd.reshape(*lead, self.latent_size)

    def decode_states(self, latent):
        """Latents [..., latent_size] -> the decoder's last states [..., K, H], before the vocabulary."""
        x = self.from_latent(latent)
        x = self.decoder_chunk_layers(x)
        x = self.expand(x)  # [..., K*H]
        x = x.reshape(*x.shape[:-1], self.chunk_size, -1)  # [..., K, H]
        x = self.decoder_token_layers(x)
        return self.decoder_norm(x)

    def logits_from_states(self, states):
        """Decoder states [..., H] -> logits [..., vocab_size], through the tied embedding matrix."""
        return states @ self.embed.weight.t()

    def decode(self, latent):
        """Latents [..., latent_size] -> logits [..., K, vocab_size]."""
        return self.logits_from_states(self.decode_states(latent))

    def decode_tokens(self, latent):
        """Latents [..., latent_size] -> token ids [..., K] (the argmax of `decode`)."""
        return self.decode(latent).argmax(-1)

    # ----- training --------------------------------------------------------------------------

    def sample_latent(self, mean, logstd):
        """A draw from the posterior N(mean, sigma^2), with latent dropout in training mode."""
        z = mean + torch.exp(logstd) * torch.randn_like(mean)
        return self.latent_dropout(z)

    def kl_per_dimension(self, mean, logstd):
        """KL(N(mean, sigma^2) || N(0, 1)) for each latent dimension."""
        return 0.5 * (mean.pow(2) + torch.exp(2 * logstd) - 1.0) - logstd

    def forward(self, ids):
        """Loss and metrics for token ids [batch, T] (T a multiple of K) or chunks [..., K].

        Training mode: the paper's objective per chunk, the summed cross-entropy of its K tokens
        plus kl_weight * sum_d max(KL_d, kl_clamp), on a sampled latent with dropout and masked
        inputs; averaged over chunks. Eval mode: the same terms with the posterior mean as the
        latent, which is what reconstruction uses.
        Returns (loss, metrics): metrics hold detached scalars `ce` (per token), `kl` (per
        chunk, unclamped), `accuracy` (tokens) and `chunk_accuracy` (all K tokens right).
        """
        chunks = ids.reshape(-1, self.chunk_size)
        mean, logstd = self.encode(chunks)
        latent = self.sample_latent(mean, logstd) if self.training else mean
        logits = self.decode(latent).float()
        ce = F.cross_entropy(logits.reshape(-1, self.vocab_size), chunks.reshape(-1), reduction="none")
        ce = ce.view(-1, self.chunk_size)
        kl = self.kl_per_dimension(mean.float(), logstd.float())
        clamped_kl = torch.clamp(kl, min=self.settings.kl_clamp).sum(-1)
        loss = (ce.sum(-1) + self.settings.kl_weight * clamped_kl).mean()
        with torch.no_grad():
            correct = logits.argmax(-1) == chunks
            metrics = {
                "ce": ce.mean(),
                "kl": kl.sum(-1).mean(),
                "accuracy": correct.float().mean(),
                "chunk_accuracy": correct.all(-1).float().mean(),
            }
        return loss, metrics
