"""The key/value cache of one generation, preallocated for the whole context.

The backbone graph follows optimum's convention: `past_key_values.{i}.key|value`
[batch, kv_heads, P, head_dim] in, `present.{i}.key|value` [batch, kv_heads, P + S, head_dim]
out. Left to itself, ONNX Runtime would allocate a new present tensor every step and free the
old one. Instead each cache tensor gets two flat buffers sized for the full context, allocated
once on the execution provider's device, and the steps ping-pong between them: a step reads
the past from one buffer and writes the present into the other through IO binding. A tensor
[batch, kv_heads, L, head_dim] of any L <= context is the first batch·kv_heads·L·head_dim
elements of a flat buffer, so one buffer serves every length without reallocation.
"""
import numpy as np

ONNX_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class KVCache:
    """Ping-pong buffers for every past/present pair of the step graph."""

    def __init__(self, ort, past_names, present_names, batch, kv_heads, head_dim, capacity,
                 dtype=np.float32, device="cpu"):
        self.past_names, self.present_names = past_names, present_names
        self.batch, self.kv_heads, self.head_dim, self.capacity = batch, kv_heads, head_dim, capacity
        self.dtype, self.device = dtype, device
        size = batch * kv_heads * capacity * head_dim
        # buffers[name] = [buffer the past is read from, buffer the present is written to]
        self.buffers = {name: [ort.OrtValue.ortvalue_from_shape_and_type([size], dtype, device, 0) for _ in range(2)]
                        for name in past_names}
        self.length = 0  # positions held (P)

    def shape(self, length):
        return [self.batch, self.kv_heads, length, self.head_dim]

    def bind(self, binding, new_positions):
        """Bind past (length P) as inputs and present (P + S) as outputs of the next run."""
        total = self.length + new_positions
        if total > self.capacity:
            raise ValueError(f"cache of {self.capacity} positions cannot hold {total}")
        for past, present in zip(self.past_names, self.present_names):
            source, target = self.buffers[past]
            binding.bind_input(past, self.device, 0, self.dtype, self.shape(self.length), source.data_ptr())
            binding.bind_output(present, self.device, 0, self.dtype, self.shape(total), target.data_ptr())
        return total

    def commit(self, total):
        """After the run: the present just written becomes the next step's past."""
        for pair in self.buffers.values():
            pair.reverse()
        self.length = total

    def nbytes(self):
        one = np.dtype(self.dtype).itemsize * self.batch * self.kv_heads * self.capacity * self.head_dim
        return one * 2 * len(self.buffers)
