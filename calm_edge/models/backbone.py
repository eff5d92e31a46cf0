"""The Llama-style Transformer backbone that CALM and the token-by-token baseline share.

RMSNorm before each sublayer, rotary position embeddings, grouped-query attention (fewer key/
value heads than query heads) and a SwiGLU MLP. Parameter names follow Hugging Face's Llama
(`layers.{i}.self_attn.q_proj`, `mlp.gate_proj`, `input_layernorm`, ...) so the AR baseline maps
onto a Llama checkpoint one to one.

The key/value cache is explicit, as the exported ONNX graph has it: `forward` takes the past keys
and values of every layer, [batch, kv_heads, P, head_dim], and returns the presents, [batch,
kv_heads, P + S, head_dim]. The same call serves prefill (S > 1, P = 0) and decode (S = 1).
`attention_mask` [batch, P + S] marks real positions with 1 and (left) padding with 0;
`position_ids` [batch, S] are the rotary positions of the new inputs.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from calm_edge.config import BackboneConfig


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 like Llama's."""

    def __init__(self, size, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size, intermediate_size):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rotary_cos_sin(position_ids, head_dim, theta):
    """cos and sin [batch, S, head_dim] for the given positions (Llama's half-split layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos(), angles.sin()


def _rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(x, cos, sin):
    """Rotate query or key heads x [batch, heads, S, head_dim]."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return x * cos + _rotate_half(x) * sin


def grouped_attention(q, k, v, mask, past_key=None, past_value=None):
    """Attention of q [B, H, S, D] over the cache plus k, v [B, KV, S, D]; returns (out, present_key, present_value)."""
    if past_key is not None:
        k = torch.cat([past_key, k], dim=2)
        v = torch.cat([past_value, v], dim=2)
    present_key, present_value = k, v
    # Grouped-query attention: each key/value head serves H / KV query heads.
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), present_key, present_value


class Attention(nn.Module):
    def __init__(self, config: BackboneConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def forward(self, x, cos, sin, mask, past_key=None, past_value=None):
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out, present_key, present_value = grouped_attention(q, k, v, mask, past_key, past_value)
        out = out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        return self.o_proj(out), present_key, present_value


class Block(nn.Module):
    def __init__(self, config: BackboneConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin, mask, past_key=None, past_value=None):
        attended, key, value = self.self_attn(self.input_layernorm(x), cos, sin, mask, past_key, past_value)
        x = x + attended
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, key, value


def attention_bias(attention_mask, new_length, dtype):
    """Additive mask [batch, 1, S, P + S]: causal over the new positions, and no padded keys.

    Masked entries get the dtype's most negative value rather than -inf, so that a padded query
    row (which may attend to nothing) yields finite garbage instead of NaNs.
    """
    total = attention_mask.shape[1]
    past = total - new_length
    key_index = torch.arange(total, device=attention_mask.device)
    query_index = past + torch.arange(new_length, device=attention_mask.device)
    allowed = (key_index[None, :] <= query_index[:, None])[None, None] & attention_mask.bool()[:, None, None, :]
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


class Backbone(nn.Module):
    """A stack of Llama blocks over input vectors [batch, S, hidden]."""

    def __init__(self, config: BackboneConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, attention_mask=None, position_ids=None, past_key_values=None):
        """Returns (hidden [batch, S, hidden], presents: a list of (key, value) per layer)."""
        batch, length, _ = x.shape
        past_length = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        if attention_mask is None:
            attention_mask = torch.ones(batch, past_length + length, dtype=torch.long, device=x.device)
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + length, device=x.device).expand(batch, length)
        cos, sin = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
        mask = attention_bias(attention_mask, length, x.dtype)
        presents = []
        for i, layer in enumerate(self.layers):
            past_key, past_value = past_key_values[i] if past_key_values is not None else (None, None)
            x, key, value = layer(x, cos, sin, mask, past_key, past_value)
            presents.append((key, value))
        return self.norm(x), presents

    def init_weights(self, std=0.02):
        """Normal(0, std) for every projection; residual outputs scaled down by depth (GPT-2)."""
        for name, param in self.named_parameters():
            if param.dim() == 2:
                scale = std / (2 * self.config.num_layers) ** 0.5 if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                nn.init.normal_(param, mean=0.0, std=scale)


def other_positions(hidden):
    """`hidden` [N, H] with every row replaced by another row (a random cyclic shift, never 0).

    The context diagnostic: a model's loss on hidden states that belong to other positions (of
    other windows, mostly) against its loss on the true ones shows how much it uses its context.
    A model that ignores its context scores the same on both.
    """
    if hidden.shape[0] < 2:
        return hidden
    shift = int(torch.randint(1, hidden.shape[0], ()))
    return hidden.roll(shift, dims=0)
