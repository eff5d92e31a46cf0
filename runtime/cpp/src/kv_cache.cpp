#include "kv_cache.hpp"

#include <algorithm>
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

SlotCache::SlotCache(size_t tensors, size_t slots, size_t kv_heads, size_t head_dim, size_t capacity)
    : slots_(slots), kv_heads_(kv_heads), head_dim_(head_dim), capacity_(capacity) {
  const size_t elements = slots * kv_heads * capacity * head_dim;
  for (auto& side : buffers_)
    for (size_t k = 0; k < tensors; ++k) side.emplace_back(new float[elements]);  // uninitialised: see the header
}

float* SlotCache::row_start(float* buffer, size_t row, size_t length) const {
  return buffer + row * kv_heads_ * length * head_dim_;
}

Ort::Value SlotCache::view(float* buffer, size_t length, const Ort::MemoryInfo& memory) const {
  const int64_t shape[] = {static_cast<int64_t>(rows_), static_cast<int64_t>(kv_heads_), static_cast<int64_t>(length),
                           static_cast<int64_t>(head_dim_)};
  return Ort::Value::CreateTensor<float>(memory, buffer, rows_ * kv_heads_ * length * head_dim_, shape, 4);
}

void SlotCache::check_fits(size_t length) const {
  if (length > capacity_)
    throw Error("internal error: the engine's key/value cache holds " + std::to_string(capacity_) + " positions, " +
                std::to_string(length) + " were asked for; please report this");
}

Ort::Value SlotCache::past(size_t index, const Ort::MemoryInfo& memory) {
  return view(buffers_[current_][index].get(), length_, memory);
}

Ort::Value SlotCache::present(size_t index, size_t new_length, const Ort::MemoryInfo& memory) {
  check_fits(new_length);
  return view(buffers_[1 - current_][index].get(), new_length, memory);
}

void SlotCache::commit(size_t new_length) {
  current_ = 1 - current_;
  length_ = new_length;
}

void SlotCache::move_row(size_t source, size_t target) {
  const size_t row_size = kv_heads_ * length_ * head_dim_;
  for (auto& buffer : buffers_[current_])
    std::copy_n(row_start(buffer.get(), source, length_), row_size, row_start(buffer.get(), target, length_));
}

void SlotCache::remove_last_row() { --rows_; }

void SlotCache::clear() { rows_ = length_ = 0; }

void SlotCache::resize(size_t length) {
  check_fits(length);
  // The rows are rewritten into the other buffer: their stride changes with the length.
  const size_t keep = std::min(length, length_), added = length - keep;
  for (size_t k = 0; k < buffers_[0].size(); ++k) {
    const float* old = buffers_[current_][k].get();
    float* fresh = buffers_[1 - current_][k].get();
    for (size_t head = 0; head < rows_ * kv_heads_; ++head) {
      const float* from = old + (head * length_ + length_ - keep) * head_dim_;
      float* to = fresh + head * length * head_dim_;
      std::fill_n(to, added * head_dim_, 0.0f);
      std::copy_n(from, keep * head_dim_, to + added * head_dim_);
    }
  }
  current_ = 1 - current_;
  length_ = length;
}

void SlotCache::place(size_t row, const std::vector<const float*>& entries, size_t width) {
  check_fits(width);
  if (width > length_ || row > rows_ || row >= slots_)
    throw Error("internal error: a row of " + std::to_string(width) + " positions placed at row " +
                std::to_string(row) + " of a cache of " + std::to_string(rows_) + " rows and " +
                std::to_string(length_) + " positions; please report this");
  rows_ = std::max(rows_, row + 1);
  const size_t empty = length_ - width;
  for (size_t k = 0; k < entries.size(); ++k) {
    float* start = row_start(buffers_[current_][k].get(), row, length_);
    for (size_t head = 0; head < kv_heads_; ++head) {
      float* to = start + head * length_ * head_dim_;
      std::fill_n(to, empty * head_dim_, 0.0f);
      std::copy_n(entries[k] + head * width * head_dim_, width * head_dim_, to + empty * head_dim_);
    }
  }
}

}  // namespace calm_edge
