// The key/value cache of one generation, allocated once and never copied.
//
// Each cache tensor (layer i's key or value) has two flat buffers sized for the whole generation.
// A step reads `past_key_values.{i}.*` from one buffer, shaped [batch, kv_heads, length, head_dim],
// and ONNX Runtime writes `present.{i}.*`, shaped [batch, kv_heads, length + S, head_dim], into the
// other; then the two swap roles. The tensors are contiguous in their current shape, so the step's
// output is the next step's input as it lies: no copy, no allocation after the first step.
#pragma once

#include <onnxruntime_cxx_api.h>

#include <cstddef>
#include <vector>

namespace calm_edge {

class KVCache {
 public:
  // `tensors` cache tensors (2 per layer), each holding up to `capacity` positions.
  KVCache(size_t tensors, size_t batch, size_t kv_heads, size_t head_dim, size_t capacity);

  size_t length() const { return length_; }  // positions held now

  // Tensor `index` as the step's input: [batch, kv_heads, length(), head_dim] over the current buffer.
  Ort::Value past(size_t index, const Ort::MemoryInfo& memory);
  // Tensor `index` as the step's output: [batch, kv_heads, new_length, head_dim] over the other buffer.
  Ort::Value present(size_t index, size_t new_length, const Ort::MemoryInfo& memory);
  // After the step ran: the presents just written become the pasts of the next step.
  void commit(size_t new_length);

 private:
  Ort::Value view(std::vector<float>& buffer, size_t length, const Ort::MemoryInfo& memory);

  size_t batch_, kv_heads_, head_dim_, capacity_;
  size_t length_ = 0;
  int current_ = 0;  // which of the two buffers holds the pasts
  std::vector<std::vector<float>> buffers_[2];
};

}  // namespace calm_edge
