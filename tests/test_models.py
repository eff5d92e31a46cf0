"""The CALM model, its energy loss, the AR baseline and their shared backbone (PyTorch)."""
import math

import pytest
import torch

from calm_edge.config import preset
from calm_edge.models.ar import ARModel
from calm_edge.models.backbone import Backbone
from calm_edge.models.calm import CalmModel, energy_score_loss


def test_energy_loss_is_unbiased_on_a_known_case():
    # Model and target both N(0, I_d): the expected loss is E|Y - Y'| = 2 Gamma((d+1)/2) / Gamma(d/2).
    torch.manual_seed(0)
    d, positions = 8, 4000
    expected = 2 * math.exp(math.lgamma((d + 1) / 2) - math.lgamma(d / 2))
    losses = [energy_score_loss(torch.randn(positions, 8, d), torch.randn(positions, 100, d)).item() for _ in range(5)]
    mean = sum(losses) / len(losses)
    # The estimator that keeps the zero i = k terms is off by a factor 1 + 1/N = 1.125 here;
    # 1% tolerance separates the two cleanly (the sampling error is about 0.1%).
    assert abs(mean - expected) / expected < 0.01, (mean, expected)


def test_energy_loss_prefers_the_true_distribution():
    torch.manual_seed(1)
    targets = 1.0 + 0.5 * torch.randn(2000, 100, 4)
    right = energy_score_loss(1.0 + 0.5 * torch.randn(2000, 8, 4), targets)
    too_narrow = energy_score_loss(1.0 + 0.1 * torch.randn(2000, 8, 4), targets)
    shifted = energy_score_loss(1.5 + 0.5 * torch.randn(2000, 8, 4), targets)
    assert right < too_narrow and right < shifted


def test_energy_loss_has_finite_gradients_even_for_equal_samples():
    samples = torch.zeros(3, 4, 5, requires_grad=True)
    energy_score_loss(samples, torch.randn(3, 10, 5)).backward()
    assert torch.isfinite(samples.grad).all()


@pytest.fixture(scope="module")
def config():
    return preset("tiny")


def _with_cache_equals_without(step_fn, ids, split):
    """Running the prefix, then the rest with the cache, gives what one full pass gives."""
    full, _ = step_fn(ids)
    first, presents = step_fn(ids[:, :split])
    second, _ = step_fn(ids[:, split:], past_key_values=presents)
    return torch.cat([first, second], dim=1), full


def test_kv_cache_reproduces_the_full_pass(config):
    torch.manual_seed(0)
    calm, ar = CalmModel(config).eval(), ARModel(config).eval()
    ids = torch.randint(5, config.tokenizer.vocab_size, (2, 48))
    with torch.no_grad():
        cached, full = _with_cache_equals_without(calm.hidden_states, ids, 32)
        assert torch.allclose(cached, full, atol=1e-5)
        cached, full = _with_cache_equals_without(ar.logits, ids, 17)
        assert torch.allclose(cached, full, atol=1e-5)


def test_left_padding_with_mask_and_positions_matches_unpadded(config):
    torch.manual_seed(0)
    backbone = Backbone(config.calm.backbone).eval()
    hidden = config.calm.backbone.hidden_size
    x = torch.randn(1, 5, hidden)
    padded = torch.cat([torch.randn(1, 3, hidden), x], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    positions = torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4]])
    with torch.no_grad():
        alone, _ = backbone(x)
        batched, _ = backbone(padded, mask, positions)
    assert torch.allclose(batched[:, 3:], alone, atol=1e-5)
    assert torch.isfinite(batched).all()  # padded rows attend to nothing, yet stay finite


def test_grouped_kv_heads_shrink_the_cache(config):
    backbone = Backbone(config.calm.backbone)
    _, presents = backbone(torch.randn(2, 6, config.calm.backbone.hidden_size))
    bb = config.calm.backbone
    assert len(presents) == bb.num_layers
    assert presents[0][0].shape == (2, bb.num_kv_heads, 6, bb.head_dim)


def test_calm_trains_only_its_own_weights(config):
    calm = CalmModel(config).train()
    assert not calm.autoencoder.training
    loss, metrics = calm(torch.randint(5, config.tokenizer.vocab_size, (2, 32)))
    loss.backward()
    assert all(p.grad is None for p in calm.autoencoder.parameters())
    assert all(p.grad is not None for n, p in calm.named_parameters() if not n.startswith("autoencoder."))
    assert {"energy", "accuracy", "chunk_accuracy"} <= set(metrics)


def test_energy_head_is_deterministic_given_noise(config):
    calm = CalmModel(config).eval()
    hidden = torch.randn(3, config.calm.backbone.hidden_size)
    noise = torch.rand(3, 5, config.calm.noise_size)
    latents = calm.sample_latents(hidden, noise)
    assert latents.shape == (3, 5, config.autoencoder.latent_size)
    assert torch.equal(latents, calm.sample_latents(hidden, noise))
    assert not torch.allclose(latents[:, 0], latents[:, 1])  # different noise, different samples
    assert calm.decode_tokens(latents).shape == (3, 5, config.autoencoder.chunk_size)
