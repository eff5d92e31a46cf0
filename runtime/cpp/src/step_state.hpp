// One generation's attention mask and key/value cache over a shared Model: prefill (`start`) and
// one step (`advance`) of the backbone (CALM) or the AR graph, run with ONNX Runtime IO binding so
// the cache and the outputs are written straight into buffers allocated once.
#pragma once

#include <vector>

#include "kv_cache.hpp"
#include "model_impl.hpp"

namespace calm_edge {

class StepState {
 public:
  // `capacity`: the most positions the cache will hold in this generation.
  StepState(const Model::Impl& model, size_t batch, size_t capacity);

  // Prefill: input_ids [batch, S*K], attention_mask and position_ids [batch, S]. Returns the last
  // position's hidden state [batch, hidden] (CALM) or logits [batch, vocab] (AR).
  std::vector<float> start(const TokenIds& input_ids, const TokenIds& attention_mask, const TokenIds& position_ids);
  // One step on [batch, K] new tokens at position_ids [batch, 1]; the mask grows by a column of ones.
  std::vector<float> advance(const TokenIds& input_ids, const TokenIds& position_ids);

  const KVCache& cache() const { return cache_; }

 private:
  std::vector<float> run(const TokenIds& input_ids, const TokenIds& position_ids, size_t sequence);

  const Model::Impl& model_;
  size_t batch_;
  size_t first_output_width_;       // hidden size (CALM) or vocabulary size (AR)
  TokenIds mask_;                   // [batch, mask_width_], row-major
  size_t mask_width_ = 0;
  KVCache cache_;
  std::vector<float> first_output_;  // hidden [batch, S, hidden] or logits [batch, vocab], allocated once
};

}  // namespace calm_edge
