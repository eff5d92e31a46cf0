// The key/value cache of one generation, allocated once and never copied.
//
// Each cache tensor (layer i's key or value) has two flat buffers sized for the whole generation.
// A step reads `past_key_values.{i}.*` from one buffer, shaped [batch, kv_heads, length, head_dim],
// and ONNX Runtime writes `present.{i}.*`, shaped [batch, kv_heads, length + S, head_dim], into the
// other; then the two swap roles. The tensors are contiguous in their current shape, so the step's
// output is the next step's input as it lies: no copy, no allocation after the first step.
// SlotCache, below, is the same for an Engine's batch, whose rows join and leave between steps.
#pragma once

#include <onnxruntime_cxx_api.h>

#include <cstddef>
#include <memory>
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
  // Tensor `index` as it lies after the last commit, [batch, kv_heads, length(), head_dim]: what an
  // Engine places into its slot cache after a prefill.
  const float* entries(size_t index) const { return buffers_[current_][index].data(); }

 private:
  Ort::Value view(std::vector<float>& buffer, size_t length, const Ort::MemoryInfo& memory);

  size_t batch_, kv_heads_, head_dim_, capacity_;
  size_t length_ = 0;
  int current_ = 0;  // which of the two buffers holds the pasts
  std::vector<std::vector<float>> buffers_[2];
};

// The key/value cache of an Engine's running batch (runtime/kv_cache.py's SlotCache): rows that join
// and leave between steps.
//
// Host ping-pong buffers like KVCache's, for `slots` rows of up to `capacity` positions, viewed as
// [rows, kv_heads, length, head_dim] for the rows running now. Rows are kept packed at the front, so
// a step runs the graph on exactly the running rows; every row's entries end at the same column (the
// newest), and each row's mask says where its own entries begin. Between steps the engine moves a row
// (`move_row`: a row that left is replaced by the last), places a newcomer's prefilled cache
// right-aligned (`place`), and adds columns on the left or drops left columns no row attends
// (`resize`). Every element a step reads was written by one of these or by the graph, so the buffers
// are left uninitialised: the pages of a cache sized for max_batch full contexts are only taken as
// rows use them.
class SlotCache {
 public:
  SlotCache(size_t tensors, size_t slots, size_t kv_heads, size_t head_dim, size_t capacity);

  size_t rows() const { return rows_; }
  size_t length() const { return length_; }
  size_t capacity() const { return capacity_; }

  // As KVCache's: the running rows' past of tensor `index`, their present new_length long, and commit.
  Ort::Value past(size_t index, const Ort::MemoryInfo& memory);
  Ort::Value present(size_t index, size_t new_length, const Ort::MemoryInfo& memory);
  void commit(size_t new_length);

  void move_row(size_t source, size_t target);  // row `target` becomes a copy of row `source`
  void remove_last_row();
  void clear();                                  // no rows, no columns
  // Keep the newest `length` columns of every row, zeros on the left where there were none.
  void resize(size_t length);
  // Row `row` (<= rows()) holds `entries[k]` for tensor k, [kv_heads, width, head_dim], ending at the
  // newest column; the columns before are zeros.
  void place(size_t row, const std::vector<const float*>& entries, size_t width);

 private:
  float* row_start(float* buffer, size_t row, size_t length) const;
  Ort::Value view(float* buffer, size_t length, const Ort::MemoryInfo& memory) const;
  void check_fits(size_t length) const;

  size_t slots_, kv_heads_, head_dim_, capacity_;
  size_t rows_ = 0, length_ = 0;
  int current_ = 0;  // which of the two buffers holds the pasts
  std::vector<std::unique_ptr<float[]>> buffers_[2];
};

}  // namespace calm_edge
