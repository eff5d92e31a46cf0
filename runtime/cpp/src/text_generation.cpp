// Text in, text out over a Generator, as runtime/text_generation.py: each row's tokens are decoded
// incrementally; a piece of text is released once it cannot change or vanish: an incomplete UTF-8
// character (it decodes to U+FFFD) is held back until its last byte arrives, and an end of the text
// that a stop sequence begins with until the stop sequence completes (it is then cut off, with
// the text from it on, and the row stops) or cannot.
#include <algorithm>

#include "calm_edge.hpp"

namespace calm_edge {
namespace {

const std::string kReplacementCharacter = "\xEF\xBF\xBD";  // U+FFFD in UTF-8

bool ends_with(const std::string& text, size_t end, const std::string& suffix, size_t length) {
  return length <= end && text.compare(end - length, length, suffix, 0, length) == 0;
}

// The row's text, and the pieces of it that may be released; Python's TextTracker, step for step.
// Each step decodes only the ids of the last steps: the new text is decode(ids[prefix:]) less
// decode(ids[prefix:read]) (see the Python class for why from one step back).
class TextTracker {
 public:
  TextTracker(const Tokenizer& tokenizer, const std::vector<std::string>& stop_sequences)
      : tokenizer_(tokenizer) {
    for (const std::string& stop : stop_sequences)
      if (!stop.empty()) stop_sequences_.push_back(stop);
  }

  // The new printable text after `new_ids`; sets stopped() when a stop sequence completed.
  std::string add(const TokenIds& new_ids) {
    const size_t searched = emitted_;  // no stop sequence can begin before the text already released
    ids_.insert(ids_.end(), new_ids.begin(), new_ids.end());
    text_ = decode();
    size_t cut = std::string::npos;
    for (const std::string& stop : stop_sequences_) cut = std::min(cut, text_.find(stop, searched));
    size_t ready = text_.size();
    if (cut != std::string::npos) {
      text_.resize(cut);
      stopped_ = true;
      ready = cut;
    } else {
      while (ends_with(text_, ready, kReplacementCharacter, kReplacementCharacter.size()))
        ready -= kReplacementCharacter.size();
      ready -= stop_start(ready);
    }
    const std::string piece = ready > emitted_ ? text_.substr(emitted_, ready - emitted_) : "";
    emitted_ = std::max(emitted_, ready);
    return piece;
  }

  // The text held back at the end: an incomplete character, or the start of a stop sequence that never completed.
  std::string finish() {
    const std::string piece = emitted_ < text_.size() ? text_.substr(emitted_) : "";
    emitted_ = text_.size();
    return piece;
  }

  bool stopped() const { return stopped_; }
  const std::string& text() const { return text_; }
  bool empty() const { return ids_.empty(); }

 private:
  std::string decode_from(size_t start) const {
    return tokenizer_.decode(TokenIds(ids_.begin() + static_cast<std::ptrdiff_t>(start), ids_.end()));
  }

  std::string decode() {
    if (whole_) return tokenizer_.decode(ids_);
    const std::string tail = decode_from(prefix_);
    if (tail.compare(0, known_.size(), known_) != 0) {  // the tokenizer's decode is not consistent here
      whole_ = true;
      return tokenizer_.decode(ids_);
    }
    std::string text = settled_ + tail.substr(known_.size());
    if (!ends_with(text, text.size(), kReplacementCharacter, kReplacementCharacter.size())) {
      std::string known = decode_from(read_);
      if (!known.empty()) {  // ids that decode to nothing (special ids) would leave the next step nothing to measure by
        prefix_ = read_;
        read_ = ids_.size();
        settled_ = text;
        known_ = std::move(known);
      }
    }
    return text;
  }

  // How many bytes at text_[:end]'s end a stop sequence begins with (the longest such end).
  size_t stop_start(size_t end) const {
    size_t longest = 0;
    for (const std::string& stop : stop_sequences_)
      for (size_t length = std::min(stop.size() - 1, end); length > longest; --length)
        if (ends_with(text_, end, stop, length)) {
          longest = length;
          break;
        }
    return longest;
  }

  const Tokenizer& tokenizer_;
  std::vector<std::string> stop_sequences_;
  TokenIds ids_;
  std::string text_;
  size_t emitted_ = 0;
  bool stopped_ = false;
  size_t prefix_ = 0, read_ = 0;  // token offsets
  std::string settled_, known_;   // the text of ids[:read]; decode(ids[prefix:read])
  bool whole_ = false;
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
  const std::string rest = trackers[0].finish();
  if (on_text && !rest.empty()) on_text(rest);  // so that the streamed pieces add up to the text
  return make_result(prompt, generator, 0, trackers[0]);
}

}  // namespace calm_edge
