"""Export attention as ONNX Runtime's fused GroupQueryAttention operator (`export --fused-attention`).

The plain export writes each layer's attention as the ops PyTorch traces: concatenation with
the cache, the key/value repeat for grouped heads (Tile), two MatMuls, the mask and a Softmax,
about 86 nodes a layer after ONNX Runtime's own optimizations. At batch 1 a decode step then
spends a large share of its time between small ops instead of reading weights. This module
swaps each layer's attention for a module whose ONNX form is one `com.microsoft`
GroupQueryAttention node, which does all of that in one kernel and returns the new cache.

Rotary embeddings become one `com.microsoft` RotaryEmbedding node each for queries and keys,
in place of the ~10 small ops (slices, negation, concatenation, products, and the head
reshapes and transposes around them) that PyTorch's form traces to. The node looks its cos and
sin up in a cache by position id; we hand it the backbone's own per-token cos and sin,
flattened into a [batch x S, head_dim / 2] cache, with position ids 0 .. batch x S - 1, so every
row keeps its own positions (left padding shifts them) and the values are the ones PyTorch uses.

What stays the same: the graph's inputs and outputs (the package format does not change, and
both runtimes load the graph as before), and the additive mask, passed as the node's
attention_bias so left-padded batches are masked exactly as before; seqlens_k is then every
row's full length.

Limit, from the operator: a call with both a cache and more than one new position must have
batch 1. The runtimes never make such a call (a prompt is one call on an empty cache, then
one position per step); validation checks the fused graph within it.

PyTorch computes the same attention as `calm_edge.models.backbone.Attention` (the module
wraps the trained projections), so the traced values and the validation reference are
unchanged; only the ONNX node differs.
"""
import torch
from torch import nn

from calm_edge.models.backbone import Attention, apply_rotary, grouped_attention


class _RotaryEmbedding(torch.autograd.Function):
    """`apply_rotary` on x [B, S, heads*D] with a looked-up cos/sin; exported as one RotaryEmbedding node."""

    @staticmethod
    def forward(ctx, x, position_ids, cos_cache, sin_cache, num_heads):
        # position_ids [B, S] index the rows of cos_cache / sin_cache [P, D/2].
        batch, length, width = x.shape
        cos, sin = cos_cache[position_ids], sin_cache[position_ids]
        cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)
        heads = x.view(batch, length, num_heads, width // num_heads).transpose(1, 2)
        return apply_rotary(heads, cos, sin).transpose(1, 2).reshape(batch, length, width)

    @staticmethod
    def symbolic(g, x, position_ids, cos_cache, sin_cache, num_heads):
        return g.op("com.microsoft::RotaryEmbedding", x, position_ids, cos_cache, sin_cache,
                    num_heads_i=num_heads, interleaved_i=0)


class _GroupQueryAttention(torch.autograd.Function):
    """Attention over the cache; exported as one GroupQueryAttention node."""

    @staticmethod
    def forward(ctx, query, key, value, past_key, past_value, bias, num_heads, num_kv_heads):
        # query [B, S, H*D], key/value [B, S, KV*D], past [B, KV, P, D], bias [B, 1, S, P+S]
        batch, length, _ = query.shape
        head_dim = query.shape[-1] // num_heads

        def heads(x, count):
            return x.view(batch, length, count, head_dim).transpose(1, 2)

        out, present_key, present_value = grouped_attention(heads(query, num_heads), heads(key, num_kv_heads),
                                                            heads(value, num_kv_heads), bias, past_key, past_value)
        return out.transpose(1, 2).reshape(batch, length, num_heads * head_dim), present_key, present_value

    @staticmethod
    def symbolic(g, query, key, value, past_key, past_value, bias, num_heads, num_kv_heads):
        # Every row attends over its whole cache; the bias masks padding and the future. Both
        # lengths come from the bias, which every layer shares, so they are computed once a graph.
        bias_shape = g.op("Shape", bias)
        total = g.op("Gather", bias_shape, g.op("Constant", value_t=torch.tensor(3)), axis_i=0)
        batch = g.op("Gather", bias_shape, g.op("Constant", value_t=torch.tensor([0])), axis_i=0)
        last = g.op("Sub", total, g.op("Constant", value_t=torch.tensor(1)))
        seqlens_k = g.op("Cast", g.op("Expand", last, batch), to_i=6)  # int32 [B]
        total_length = g.op("Cast", total, to_i=6)  # int32 scalar
        # The bias goes in 8th here; `place_bias` moves it behind the three optional inputs we do
        # not use (cos/sin caches, position ids), which the TorchScript exporter cannot leave empty.
        return g.op("com.microsoft::GroupQueryAttention", query, key, value, past_key, past_value, seqlens_k,
                    total_length, bias, num_heads_i=num_heads, kv_num_heads_i=num_kv_heads, outputs=3)


class FusedAttention(nn.Module):
    """`Attention` with the same weights, exported as GroupQueryAttention."""

    def __init__(self, attention: Attention):
        super().__init__()
        self.attention = attention

    def forward(self, x, cos, sin, mask, past_key=None, past_value=None):
        a = self.attention
        batch, length, _ = x.shape
        if past_key is None:  # an empty cache, as the runtimes pass it on a prompt
            past_key = past_value = x.new_zeros(batch, a.num_kv_heads, 0, a.head_dim)
        # Each token's own cos and sin (first half; the second repeats it) as the rotary cache.
        # Derived from cos and sin only, which every layer shares, so ONNX Runtime computes the
        # cache and its position ids once for the graph rather than once a layer.
        half = a.head_dim // 2
        cos_cache, sin_cache = cos[..., :half].reshape(-1, half), sin[..., :half].reshape(-1, half)
        position_ids = torch.arange(cos_cache.shape[0], device=x.device).view(cos.shape[0], cos.shape[1])
        q = _RotaryEmbedding.apply(a.q_proj(x), position_ids, cos_cache, sin_cache, a.num_heads)
        k = _RotaryEmbedding.apply(a.k_proj(x), position_ids, cos_cache, sin_cache, a.num_kv_heads)
        out, present_key, present_value = _GroupQueryAttention.apply(q, k, a.v_proj(x), past_key, past_value, mask,
                                                                     a.num_heads, a.num_kv_heads)
        return a.o_proj(out), present_key, present_value


BIAS_INPUT = 10  # GroupQueryAttention's attention_bias input


def place_bias(path):
    """Move each GroupQueryAttention node's bias from input 8 to its own slot, 11th; returns the count."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)  # the nodes only; external weights stay where they are
    nodes = [node for node in model.graph.node if node.op_type == "GroupQueryAttention" and len(node.input) == 8]
    for node in nodes:
        inputs = list(node.input)
        del node.input[:]
        node.input.extend(inputs[:7] + [""] * (BIAS_INPUT - 7) + [inputs[7]])
    onnx.save(model, str(path))
    return len(nodes)


def fuse_attention(model):
    """Replace every backbone layer's attention in `model` (in place) by its fused form; returns the count."""
    # Collect first: replacing while walking would walk into the wrappers.
    found = [(module, name, child) for module in model.modules() for name, child in module.named_children()
             if isinstance(child, Attention)]
    for module, name, child in found:
        setattr(module, name, FusedAttention(child))
    return len(found)
