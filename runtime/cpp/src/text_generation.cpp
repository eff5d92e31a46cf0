// Text in, text out over a Generator, as runtime/text_generation.py: each row's tokens are decoded
// incrementally; a piece of text is released once printable (an incomplete UTF-8 character, which
// decodes to U+FFFD, is held back until its last byte arrives); a stop sequence cuts the text
// before it and stops the row.
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
    encoded.push_back(model.tokenizer().encode_prompt(prompts[i]));
  }
  return encoded;
}

// Runs `generator` to the end, feeding each row's new tokens to its tracker (and each printable
// piece to `on_text`), and stopping a row whose stop sequence completed.
void run(Generator& generator, std::vector<TextTracker>& trackers, const TextCallback& on_text = nullptr) {
  while (!generator.done()) {
    const std::vector<TokenIds> new_ids = generator.step();
    for (size_t row = 0; row < new_ids.size(); ++row) {
      if (new_ids[row].empty()) continue;
      const std::string piece = trackers[row].add(new_ids[row]);
      if (on_text && !piece.empty()) on_text(piece);
      if (trackers[row].stopped()) generator.stop(row, "stop_sequence");
    }
  }
}

GenerationResult make_result(const std::string& prompt, const Generator& generator, size_t row,
                             const TextTracker& tracker) {
  return GenerationResult{prompt, tracker.empty() ? "" : tracker.text(), generator.tokens()[row],
                          generator.stop_reasons()[row]};
}

}  // namespace

std::vector<GenerationResult> generate(const Model& model, const std::vector<std::string>& prompts,
                                       const GeneratorParams& params) {
  Generator generator(model, encode_prompts(model, prompts), params);
  std::vector<TextTracker> trackers;
  for (size_t row = 0; row < prompts.size(); ++row) trackers.emplace_back(model.tokenizer(), params.stop_sequences);
  run(generator, trackers);
  std::vector<GenerationResult> results;
  for (size_t row = 0; row < prompts.size(); ++row) results.push_back(make_result(prompts[row], generator, row, trackers[row]));
  return results;
}

GenerationResult generate(const Model& model, const std::string& prompt, const GeneratorParams& params,
                          const TextCallback& on_text) {
  Generator generator(model, encode_prompts(model, {prompt}), params);
  std::vector<TextTracker> trackers;
  trackers.emplace_back(model.tokenizer(), params.stop_sequences);
  run(generator, trackers, on_text);
  return make_result(prompt, generator, 0, trackers[0]);
}

}  // namespace calm_edge
