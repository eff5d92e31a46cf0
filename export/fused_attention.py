"""Export attention as ONNX Runtime's fused GroupQueryAttention operator (`export --fused-attention`).

The plain export writes each layer's attention as the ops PyTorch traces: concatenation with
the cache, the key/value repeat for grouped heads (Tile), two MatMuls, the mask and a Softmax,
about 86 nodes a layer after ONNX Runtime's own optimizations. At batch 1 a decode step then
spends a large share of its time between small ops instead of reading weights. This module
swaps each layer's attention for a module whose ONNX form is one `com.microsoft`
GroupQueryAttention node, which does all of that in one kernel and returns the new cache.

What stays the same: the graph's inputs and outputs (the package format does not change, and
both runtimes load the graph as before), rotary embeddings (applied before the node, as in
PyTorch), and the additive mask, passed as the node's attention_bias so left-padded batches
are masked exactly as before; seqlens_k is then every row's full length.

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
        # Every row attends over its whole cache; the bias masks padding and the future.
        total = g.op("Gather", g.op("Shape", bias), g.op("Constant", value_t=torch.tensor(3)), axis_i=0)
        batch = g.op("Gather", g.op("Shape", query), g.op("Constant", value_t=torch.tensor([0])), axis_i=0)
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
        q = a.q_proj(x).view(batch, length, a.num_heads, a.head_dim).transpose(1, 2)
        k = a.k_proj(x).view(batch, length, a.num_kv_heads, a.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q = q.transpose(1, 2).reshape(batch, length, a.num_heads * a.head_dim)
        k = k.transpose(1, 2).reshape(batch, length, a.num_kv_heads * a.head_dim)
        out, present_key, present_value = _GroupQueryAttention.apply(q, k, a.v_proj(x), past_key, past_value, mask,
                                                                     a.num_heads, a.num_kv_heads)
        return a.o_proj(out), present_key, present_value


BIAS_INPUT = 10  # GroupQueryAttention's attention_bias input


def place_bias(path):
    """Move each GroupQueryAttention node's bias from input 8 to its own slot, 11th; returns the count."""
    import onnx

    model = onnx.load(str(path))
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
