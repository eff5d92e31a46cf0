// Text in, text out over generate_tokens, as runtime/text_generation.py: each row's tokens are
// decoded incrementally; a piece of text is released once printable (an incomplete UTF-8
// character, which decodes to U+FFFD, is held back until its last byte arrives); a stop sequence
// cuts the text before it and stops the row.
#include <algorithm>

#include "calm_edge.hpp"

namespace calm_edge {
namespace {

const std::string kReplacementCharacter = "\xEF\xBF\xBD";  // U+FFFD in UTF-8

class TextTracker {
 public:
  TextTracker(const Tokenizer& tokenizer, const std::vector<std::string>& stop_sequences)
      : tokenizer_(tokenizer) {
    for (const std::string& stop : stop_sequences)
      if (!stop.empty()) stop_sequences_.push_back(stop);
  }

  // The new printable text after `new_ids`; sets stopped() when a stop sequence completed.
  std::string add(const TokenIds& new_ids) {
    ids_.insert(ids_.end(), new_ids.begin(), new_ids.end());
    text_ = tokenizer_.decode(ids_);
    size_t cut = std::string::npos;
    for (const std::string& stop : stop_sequences_) cut = std::min(cut, text_.find(stop));
    if (cut != std::string::npos) {
      text_.resize(cut);
      stopped_ = true;
    }
    size_t ready = text_.size();
    if (!stopped_)
      while (ready >= kReplacementCharacter.size() &&
             text_.compare(ready - kReplacementCharacter.size(), kReplacementCharacter.size(), kReplacementCharacter) == 0)
        ready -= kReplacementCharacter.size();
    const std::string piece = ready > emitted_ ? text_.substr(emitted_, ready - emitted_) : "";
    emitted_ = std::max(emitted_, ready);
    return piece;
  }

  bool stopped() const { return stopped_; }
  const std::string& text() const { return text_; }
  bool empty() const { return ids_.empty(); }

 private:
  const Tokenizer& tokenizer_;
  std::vector<std::string> stop_sequences_;
  TokenIds ids_;
  std::string text_;
  size_t emitted_ = 0;
  bool stopped_ = false;
};

std::vector<TokenIds> encode_prompts(const Model& model, const std::vector<std::string>& prompts) {
  std::vector<TokenIds> encoded;
  for (size_t i = 0; i < prompts.size(); ++i) {
    if (prompts[i].empty()) throw Error("prompt " + std::to_string(i) + " is empty; give some text to continue");
    encoded.push_back(model.tokenizer().encode(prompts[i]));
  }
  return encoded;
}

size_t chunks_for(size_t tokens, int chunk_size) { return (tokens + chunk_size - 1) / chunk_size; }

GenerationResult make_result(const Model& model, const GeneratorParams& params, const std::string& prompt,
                             const TokenIds& prompt_ids, const TokenIds& ids, const TextTracker& tracker) {
  GenerationResult result{prompt, tracker.empty() ? "" : tracker.text(), ids, ""};
  const bool context_full = chunks_for(prompt_ids.size(), model.chunk_size()) + chunks_for(ids.size(), model.chunk_size()) >=
                            static_cast<size_t>(model.max_context());
  if (tracker.stopped())
    result.stopped_by = "stop_sequence";
  else if (ids.size() >= static_cast<size_t>(params.max_new_tokens))
    result.stopped_by = "max_new_tokens";
  else if (params.stop_at_eos && !context_full)
    result.stopped_by = "eos";
  else
    result.stopped_by = "context";
  return result;
}

}  // namespace

std::vector<GenerationResult> generate(const Model& model, const std::vector<std::string>& prompts,
                                       const GeneratorParams& params) {
  const std::vector<TokenIds> encoded = encode_prompts(model, prompts);
  std::vector<TextTracker> trackers;
  for (size_t row = 0; row < prompts.size(); ++row) trackers.emplace_back(model.tokenizer(), params.stop_sequences);
  auto on_step = [&](size_t row, const TokenIds& new_ids) {
    trackers[row].add(new_ids);
    return !trackers[row].stopped();
  };
  const std::vector<TokenIds> outputs = generate_tokens(model, encoded, params, on_step);
  std::vector<GenerationResult> results;
  for (size_t row = 0; row < prompts.size(); ++row)
    results.push_back(make_result(model, params, prompts[row], encoded[row], outputs[row], trackers[row]));
  return results;
}

GenerationResult generate(const Model& model, const std::string& prompt, const GeneratorParams& params,
                          const TextCallback& on_text) {
  const std::vector<TokenIds> encoded = encode_prompts(model, {prompt});
  TextTracker tracker(model.tokenizer(), params.stop_sequences);
  auto on_step = [&](size_t, const TokenIds& new_ids) {
    const std::string piece = tracker.add(new_ids);
    if (on_text && !piece.empty()) on_text(piece);
    return !tracker.stopped();
  };
  const std::vector<TokenIds> outputs = generate_tokens(model, encoded, params, on_step);
  return make_result(model, params, prompt, encoded[0], outputs[0], tracker);
}

}  // namespace calm_edge
