"""The preallocated key/value cache, on a one-node graph that appends to its cache like a backbone."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from calm_edge.runtime.kv_cache import KVCache

HEADS, HEAD_DIM = 2, 3


@pytest.fixture(scope="module")
def append_session(tmp_path_factory):
    """present = concat(past, new) along the sequence axis, as the backbone does per layer."""
    shape = lambda length: ["batch", HEADS, length, HEAD_DIM]  # noqa: E731
    graph = helper.make_graph(
        [helper.make_node("Concat", ["past_key_values.0.key", "new"], ["present.0.key"], axis=2)],
        "append",
        [helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, shape("past")),
         helper.make_tensor_value_info("new", TensorProto.FLOAT, shape("sequence"))],
        [helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, shape("total"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path_factory.mktemp("kv") / "append.onnx"
    onnx.save(model, str(path))
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_step(session, cache, new):
    binding = session.io_binding()
    binding.bind_cpu_input("new", new)
    total = cache.bind(binding, new.shape[2])
    session.run_with_iobinding(binding)
    cache.commit(total)
    return binding.get_outputs()[0].numpy()


def test_cache_holds_every_step_in_preallocated_buffers(append_session):
    batch, capacity = 2, 8
    cache = KVCache(ort, ["past_key_values.0.key"], ["present.0.key"], batch=batch, kv_heads=HEADS,
                    head_dim=HEAD_DIM, capacity=capacity)
    pointers = {v.data_ptr() for pair in cache.buffers.values() for v in pair}
    rng = np.random.default_rng(0)
    expected = np.zeros((batch, HEADS, 0, HEAD_DIM), np.float32)
    for length in (3, 1, 1, 2, 1):  # a prefill, then steps
        new = rng.standard_normal((batch, HEADS, length, HEAD_DIM)).astype(np.float32)
        present = run_step(append_session, cache, new)
        expected = np.concatenate([expected, new], axis=2)
        np.testing.assert_array_equal(present, expected)
        assert cache.length == expected.shape[2]
    # No step allocated a buffer: the same two buffers per tensor served all of them.
    assert {v.data_ptr() for pair in cache.buffers.values() for v in pair} == pointers
    assert cache.nbytes() == 2 * batch * HEADS * capacity * HEAD_DIM * 4


def test_cache_refuses_to_overflow(append_session):
    cache = KVCache(ort, ["past_key_values.0.key"], ["present.0.key"], batch=1, kv_heads=HEADS,
                    head_dim=HEAD_DIM, capacity=4)
    run_step(append_session, cache, np.zeros((1, HEADS, 3, HEAD_DIM), np.float32))
    with pytest.raises(ValueError, match="cannot hold 5"):
        run_step(append_session, cache, np.zeros((1, HEADS, 2, HEAD_DIM), np.float32))
