#include "step_state.hpp"

namespace calm_edge {

StepState::StepState(const Model::Impl& model, size_t batch, size_t capacity)
    : model_(model),
      batch_(batch),
      first_output_width_(model.manifest.kind == "ar" ? model.manifest.vocab_size : model.manifest.hidden_size),
      cache_(model.past_names.size(), batch, model.manifest.num_kv_heads, model.manifest.head_dim, capacity) {
  // CALM returns every position's hidden state, so prefill needs room for the whole prompt.
  const size_t positions = model.manifest.kind == "ar" ? 1 : capacity;
  first_output_.resize(batch * positions * first_output_width_);
}

std::vector<float> StepState::start(const TokenIds& input_ids, const TokenIds& attention_mask,
                                    const TokenIds& position_ids) {
  mask_ = attention_mask;
  mask_width_ = attention_mask.size() / batch_;
  return run(input_ids, position_ids, mask_width_);
}

std::vector<float> StepState::advance(const TokenIds& input_ids, const TokenIds& position_ids) {
  TokenIds wider(batch_ * (mask_width_ + 1), 1);
  for (size_t row = 0; row < batch_; ++row)
    std::copy_n(mask_.begin() + row * mask_width_, mask_width_, wider.begin() + row * (mask_width_ + 1));
  mask_.swap(wider);
  ++mask_width_;
  return run(input_ids, position_ids, 1);
}

std::vector<float> StepState::run(const TokenIds& input_ids, const TokenIds& position_ids, size_t sequence) {
  const Ort::MemoryInfo& memory = model_.cpu_memory;
  const auto batch = static_cast<int64_t>(batch_);
  auto int64_tensor = [&](const TokenIds& values, int64_t columns) {
    const int64_t shape[] = {batch, columns};
    return Ort::Value::CreateTensor<int64_t>(memory, const_cast<int64_t*>(values.data()), values.size(), shape, 2);
  };

  Ort::Session& session = *model_.step_graph;
  Ort::IoBinding binding(session);
  binding.BindInput("input_ids", int64_tensor(input_ids, static_cast<int64_t>(input_ids.size() / batch_)));
  binding.BindInput("attention_mask", int64_tensor(mask_, static_cast<int64_t>(mask_width_)));
  binding.BindInput("position_ids", int64_tensor(position_ids, static_cast<int64_t>(sequence)));

  const size_t new_length = cache_.length() + sequence;
  for (size_t k = 0; k < model_.past_names.size(); ++k) {
    binding.BindInput(model_.past_names[k].c_str(), cache_.past(k, memory));
    binding.BindOutput(model_.present_names[k].c_str(), cache_.present(k, new_length, memory));
  }
  const bool is_ar = model_.manifest.kind == "ar";
  const auto width = static_cast<int64_t>(first_output_width_);
  const int64_t hidden_shape[] = {batch, static_cast<int64_t>(sequence), width};
  const int64_t logits_shape[] = {batch, width};
  const size_t output_size = batch_ * (is_ar ? 1 : sequence) * first_output_width_;
  binding.BindOutput(model_.first_output.c_str(),
                     Ort::Value::CreateTensor<float>(memory, first_output_.data(), output_size,
                                                     is_ar ? logits_shape : hidden_shape, is_ar ? 2 : 3));
  session.Run(Ort::RunOptions{nullptr}, binding);
  cache_.commit(new_length);

  if (is_ar) return std::vector<float>(first_output_.begin(), first_output_.begin() + output_size);
  std::vector<float> last(batch_ * first_output_width_);  // hidden[:, -1]
  for (size_t row = 0; row < batch_; ++row)
    std::copy_n(first_output_.begin() + (row * sequence + sequence - 1) * first_output_width_, first_output_width_,
                last.begin() + row * first_output_width_);
  return last;
}

}  // namespace calm_edge
