"""The CALM language model: next-vector prediction with an energy-based generative head.

For a window of token ids [batch, C*K]:

    embed each token -> concatenate the K embeddings of each chunk -> input MLP -> one vector per
    chunk -> backbone (causal over chunks) -> hidden state h_c per chunk

h_c conditions the energy head, which turns uniform noise into a latent vector: a sample of the
next chunk's latent. The frozen autoencoder's decoder maps a latent back to K tokens. Training
minimises the energy score (paper section 3.2), a strictly proper scoring rule that needs only
samples, no likelihoods:

    loss = 2/(N M) sum_ij |x_i - y_j|^beta  -  1/(N (N-1)) sum_{i != k} |x_i - x_k|^beta

with x_1..x_N model samples for a position and y_1..y_M draws from the autoencoder's posterior
N(mean, sigma^2) of the true next chunk. Its expectation is the energy distance between the
model's distribution and the target's, up to a constant, so the estimator is unbiased (the
i = k terms, which would bias it, are left out).

The noise is an input of the head, drawn outside it: in training from torch's generator, at
inference from the shared counter-based generator (`calm_edge.runtime.rng`), raw uniforms in
[0, 1) that the head centres, so every runtime makes the same samples for the same seed.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from calm_edge.config import Config
from calm_edge.models.autoencoder import Autoencoder
from calm_edge.models.backbone import Backbone, RMSNorm, SwiGLU, other_positions

LAYER_NORM_EPS = 1e-6  # the official model's LayerNorms (input projection, energy head)


def energy_score_loss(samples, targets, beta=1.0):
    """The unbiased energy-score loss, averaged over positions.

    samples: [P, N, L] model samples (N >= 2); targets: [P, M, L] target samples.
    """
    n = samples.shape[1]
    if n < 2:
        raise ValueError("the energy score needs at least 2 model samples per position")
    cross = torch.cdist(samples, targets).pow(beta).mean(dim=(1, 2))
    # Pairwise distances between distinct model samples, i < k, each pair once (no zero
    # diagonal: its gradient would be undefined, and including it would bias the estimate).
    first, second = torch.triu_indices(n, n, offset=1, device=samples.device)
    within = (samples[:, first] - samples[:, second]).norm(dim=-1).pow(beta).mean(dim=1)
    return (2.0 * cross - within).mean()


class EnergyHead(nn.Module):
    """Refines uniform noise into a latent, conditioned on the backbone's hidden state.

    noise -> linear -> residual blocks, each adding SwiGLU(norm(z) W_z + h W_h) -> norm -> linear.
    """

    def __init__(self, hidden_size, latent_size, noise_size, num_layers):
        super().__init__()
        self.noise_in = nn.Linear(noise_size, hidden_size)
        self.blocks = nn.ModuleList(EnergyBlock(hidden_size) for _ in range(num_layers))
        self.norm = RMSNorm(hidden_size)
        self.out = nn.Linear(hidden_size, latent_size)

    def forward(self, hidden, noise):
        """hidden [..., H], noise [..., N, noise_size] in [0, 1) -> latents [..., N, latent]."""
        z = self.noise_in(noise - 0.5)  # uniform on [-0.5, 0.5)
        condition = hidden.unsqueeze(-2)
        for block in self.blocks:
            z = block(z, condition)
        return self.out(self.norm(z))


class EnergyBlock(nn.Module):
    def __init__(self, hidden_size):
        super().__init__()
        self.norm = RMSNorm(hidden_size)
        self.z_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.h_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.mlp = SwiGLU(hidden_size, 2 * hidden_size)

    def forward(self, z, condition):
        return z + self.mlp(self.z_proj(self.norm(z)) + self.h_proj(condition))


class OfficialEnergyHead(nn.Module):
    """The released CALM models' energy head (their `MLPGenerator`), parameter for parameter.

    noise -> linear -> LayerNorm = x;  hidden -> linear -> LayerNorm = c (shared by the blocks);
    each block: x + down(silu(gate) * up), with (gate, up) = MLP(concat(LayerNorm(x), c));
    then LayerNorm -> linear -> SiLU -> linear: the latent. Every LayerNorm has eps 1e-6 and a bias.
    """

    def __init__(self, hidden_size, latent_size, noise_size, num_layers):
        super().__init__()
        self.noise_embd = nn.Linear(noise_size, hidden_size)
        self.hidden_embd = nn.Linear(hidden_size, hidden_size)
        self.norm_hidden = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)
        self.norm_noise = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)
        self.mlp_blocks = nn.ModuleList(OfficialEnergyBlock(hidden_size) for _ in range(num_layers))
        self.final_layer = OfficialFinalLayer(hidden_size, latent_size)

    def forward(self, hidden, noise):
        """hidden [..., H], noise [..., N, noise_size] in [0, 1) -> latents [..., N, latent]."""
        x = self.norm_noise(self.noise_embd(noise - 0.5))  # uniform on [-0.5, 0.5), as the official code draws it
        condition = self.norm_hidden(self.hidden_embd(hidden)).unsqueeze(-2).expand_as(x)
        for block in self.mlp_blocks:
            x = block(x, condition)
        return self.final_layer(x)

    def init_weights(self, std=0.02):
        """The official initialisation: normal weights, zero biases, and a zero last layer (latent 0 at first)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                nn.init.zeros_(module.bias)
        nn.init.zeros_(self.final_layer.linears[-1].weight)
        nn.init.zeros_(self.final_layer.linears[-1].bias)


class OfficialEnergyBlock(nn.Module):
    def __init__(self, hidden_size):
        super().__init__()
        self.in_ln = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)
        self.linears = nn.Sequential(nn.Linear(2 * hidden_size, hidden_size), nn.SiLU(),
                                     nn.Linear(hidden_size, hidden_size), nn.SiLU(),
                                     nn.Linear(hidden_size, 2 * hidden_size))
        self.down_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x, condition):
        gate, up = self.linears(torch.cat([self.in_ln(x), condition], dim=-1)).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)


class OfficialFinalLayer(nn.Module):
    def __init__(self, hidden_size, latent_size):
        super().__init__()
        self.in_ln = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)
        self.linears = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, latent_size))

    def forward(self, x):
        return self.linears(self.in_ln(x))


def input_projection(kind, chunk_size, hidden):
    """The MLP that compresses a chunk's K token embeddings into one input vector.

    calm-edge:  Linear(K*H -> H), SiLU, Linear(H -> H)
    official:   Linear(K*H -> 2H), SiLU, Linear(2H -> H), LayerNorm (the released models' embed_proj)
    """
    if kind == "official":
        return nn.Sequential(nn.Linear(chunk_size * hidden, 2 * hidden), nn.SiLU(), nn.Linear(2 * hidden, hidden),
                             nn.LayerNorm(hidden, eps=LAYER_NORM_EPS))
    return nn.Sequential(nn.Linear(chunk_size * hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))


ENERGY_HEADS = {"calm-edge": EnergyHead, "official": OfficialEnergyHead}


class CalmModel(nn.Module):
    """Backbone over chunk vectors, energy head, and the frozen autoencoder for targets and decoding."""

    def __init__(self, config: Config, autoencoder: Autoencoder = None):
        super().__init__()
        calm, ae = config.calm, config.autoencoder
        hidden = calm.backbone.hidden_size
        self.config = config
        self.chunk_size = ae.chunk_size
        self.noise_size = calm.noise_size
        self.embed_tokens = nn.Embedding(config.tokenizer.vocab_size, hidden)
        self.input_proj = input_projection(calm.input_projection, ae.chunk_size, hidden)
        self.backbone = Backbone(calm.backbone)
        self.energy_head = ENERGY_HEADS[calm.energy_head](hidden, ae.latent_size, calm.noise_size,
                                                          calm.energy_head_layers)
        self._init_weights()
        # The autoencoder is frozen: its weights come from its own training run.
        self.autoencoder = autoencoder if autoencoder is not None else Autoencoder(config)
        self.autoencoder.requires_grad_(False)
        self.autoencoder.eval()

    def _init_weights(self):
        for module in (self.embed_tokens, self.input_proj, self.energy_head):
            for param in module.parameters():
                if param.dim() == 2:
                    nn.init.normal_(param, mean=0.0, std=0.02)
        if self.config.calm.input_projection == "official":  # zero biases, as the official post_init
            for module in self.input_proj:
                if isinstance(module, nn.Linear):
                    nn.init.zeros_(module.bias)
        if isinstance(self.energy_head, OfficialEnergyHead):
            self.energy_head.init_weights()
        elif self.config.calm.head_zero_init:
            nn.init.zeros_(self.energy_head.out.weight)
            nn.init.zeros_(self.energy_head.out.bias)
        self.backbone.init_weights()

    def train(self, mode=True):
        super().train(mode)
        self.autoencoder.eval()  # never in training mode: no masking, dropout or latent sampling
        return self

    def num_parameters(self, include_autoencoder=False):
        total = sum(p.numel() for p in self.parameters())
        return total if include_autoencoder else total - sum(p.numel() for p in self.autoencoder.parameters())

    # ----- inference pieces (what the exported graphs compute) ---------------------------------

    def embed_chunks(self, input_ids):
        """Token ids [batch, S*K] -> one input vector per chunk [batch, S, hidden]."""
        batch, length = input_ids.shape
        x = self.embed_tokens(input_ids).reshape(batch, length // self.chunk_size, -1)
        return self.input_proj(x)

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None):
        """The backbone step: (hidden [batch, S, hidden], presents), with an explicit KV cache."""
        return self.backbone(self.embed_chunks(input_ids), attention_mask, position_ids, past_key_values)

    def sample_latents(self, hidden, noise):
        """hidden [batch, hidden], noise [batch, N, noise_size] -> latents [batch, N, latent]."""
        return self.energy_head(hidden, noise)

    def decode_tokens(self, latents):
        """latents [..., latent] -> token ids [..., K] through the autoencoder's decoder."""
        return self.autoencoder.decode_tokens(latents)

    # ----- training ----------------------------------------------------------------------------

    def forward(self, ids):
        """Energy loss for windows [batch, C*K]: each chunk's hidden state predicts the next chunk."""
        settings = self.config.calm
        batch, length = ids.shape
        chunks = ids.view(batch, length // self.chunk_size, self.chunk_size)
        hidden, _ = self.hidden_states(ids)
        hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # positions that have a next chunk
        target_chunks = chunks[:, 1:].reshape(-1, self.chunk_size)

        with torch.no_grad():
            mean, logstd = self.autoencoder.encode(target_chunks)
            mean, std = mean.float(), logstd.float().exp()
            eps = torch.randn(mean.shape[0], settings.num_target_samples, mean.shape[1], device=ids.device)
            targets = mean[:, None] + std[:, None] * eps

        noise = torch.rand(hidden.shape[0], settings.num_model_samples, self.noise_size, device=ids.device)
        samples = self.energy_head(hidden, noise).float()
        loss = energy_score_loss(samples, targets, settings.energy_beta)

        with torch.no_grad():
            # How often the first sample decodes to the right tokens: a readable progress signal.
            predicted = self.decode_tokens(samples[:, 0])
            correct = predicted == target_chunks
            metrics = {
                "energy": loss.detach(),
                "accuracy": correct.float().mean(),
                "chunk_accuracy": correct.all(-1).float().mean(),
                "latent_mse": F.mse_loss(samples[:, 0], mean),
            }
            if not self.training:  # validation: the context diagnostic, same noise and targets
                elsewhere = self.energy_head(other_positions(hidden), noise).float()
                metrics["energy_other_context"] = energy_score_loss(elsewhere, targets, settings.energy_beta)
        return loss, metrics
