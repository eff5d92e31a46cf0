#include "kv_cache.hpp"

#include <string>

#include "calm_edge.hpp"

namespace calm_edge {

KVCache::KVCache(size_t tensors, size_t batch, size_t kv_heads, size_t head_dim, size_t capacity)
    : batch_(batch), kv_heads_(kv_heads), head_dim_(head_dim), capacity_(capacity) {
  // At least one element, so an empty cache (prefill) still points at real memory.
  const size_t elements = batch * kv_heads * (capacity > 0 ? capacity : 1) * head_dim;
  for (auto& side : buffers_) side.assign(tensors, std::vector<float>(elements));
}

Ort::Value KVCache::view(std::vector<float>& buffer, size_t length, const Ort::MemoryInfo& memory) {
  const int64_t shape[] = {static_cast<int64_t>(batch_), static_cast<int64_t>(kv_heads_),
                           static_cast<int64_t>(length), static_cast<int64_t>(head_dim_)};
  return Ort::Value::CreateTensor<float>(memory, buffer.data(), batch_ * kv_heads_ * length * head_dim_, shape, 4);
}

Ort::Value KVCache::past(size_t index, const Ort::MemoryInfo& memory) {
  return view(buffers_[current_][index], length_, memory);
}

Ort::Value KVCache::present(size_t index, size_t new_length, const Ort::MemoryInfo& memory) {
  if (new_length > capacity_)
    throw Error("internal error: the key/value cache holds " + std::to_string(capacity_) + " positions, " +
                std::to_string(new_length) + " were asked for; please report this");
  return view(buffers_[1 - current_][index], new_length, memory);
}

void KVCache::commit(size_t new_length) {
  current_ = 1 - current_;
  length_ = new_length;
}

}  // namespace calm_edge
