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
            binding.bind_input(past, self.device, 0, self.dtype, self.shape(self.length), self._address(source))
            binding.bind_output(present, self.device, 0, self.dtype, self.shape(total), self._address(target))
        return total

    @staticmethod
    def _address(buffer):
        return buffer.data_ptr()

    def commit(self, total):
        """After the run: the present just written becomes the next step's past."""
        for pair in self.buffers.values():
            pair.reverse()
        self.length = total

    def nbytes(self):
        one = np.dtype(self.dtype).itemsize * self.batch * self.kv_heads * self.capacity * self.head_dim
        return one * 2 * len(self.buffers)


class SlotCache(KVCache):
    """The key/value cache of an `Engine`'s running batch: rows that join and leave between steps.

    `KVCache`'s ping-pong buffers and binding, in host (numpy) memory, for `slots` rows of up to
    `capacity` positions, viewed as [rows, kv_heads, length, head_dim] for the rows running now.
    Rows are kept packed at the front (rows 0..n-1), so a step runs the graph on exactly the n
    running rows, whatever the batch's size; every row's entries end at the same column (the
    newest), and each row's mask says where its own entries begin. The engine rearranges rows
    between steps: `move_row` (a row that left is replaced by the last), `place` (a newcomer's
    prefilled cache, right-aligned), `resize` (columns added on the left, or left columns that
    no row attends dropped).
    """

    def __init__(self, past_names, present_names, slots, kv_heads, head_dim, capacity, dtype=np.float32):
        self.past_names, self.present_names = past_names, present_names
        self.kv_heads, self.head_dim, self.capacity, self.dtype, self.device = kv_heads, head_dim, capacity, dtype, "cpu"
        size = slots * kv_heads * capacity * head_dim
        self.buffers = {name: [np.zeros(size, dtype), np.zeros(size, dtype)] for name in past_names}
        self.rows, self.length = 0, 0

    @property
    def batch(self):
        """The rows running now: what `KVCache.bind` binds."""
        return self.rows

    @staticmethod
    def _address(buffer):
        return buffer.ctypes.data

    def view(self, name, rows=None, length=None, which=0):
        """Buffer `which` of cache tensor `name` as [rows, kv_heads, length, head_dim] (a view, no copy)."""
        rows = self.rows if rows is None else rows
        length = self.length if length is None else length
        shape = (rows, self.kv_heads, length, self.head_dim)
        return self.buffers[name][which][:int(np.prod(shape))].reshape(shape)

    def move_row(self, source, target):
        for name in self.buffers:
            view = self.view(name)
            view[target] = view[source]

    def resize(self, length):
        """Keep the newest `length` columns of the running rows (zeros where there were none)."""
        if length > self.capacity:
            raise ValueError(f"cache of {self.capacity} positions cannot hold {length}")
        keep = min(length, self.length)
        for name in self.buffers:
            old = self.view(name)
            new = self.view(name, length=length, which=1)
            new[:, :, :length - keep] = 0
            new[:, :, length - keep:] = old[:, :, self.length - keep:]
            self.buffers[name].reverse()
        self.length = length

    def place(self, row, entries):
        """Row `row` (<= rows) holds `entries` {past name: [kv_heads, P, head_dim]}, ending at the newest column."""
        self.rows = max(self.rows, row + 1)
        for name, values in entries.items():
            view = self.view(name)
            width = values.shape[1]
            view[row, :, :self.length - width] = 0
            view[row, :, self.length - width:] = values
