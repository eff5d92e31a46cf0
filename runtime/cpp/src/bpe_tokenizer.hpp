// A Hugging Face byte-level BPE tokenizer (a tokenizer.json as the `tokenizers` library writes it: the
// Llama-3 tokenizer of the released CALM models), token for token what `tokenizers` gives:
//
//   encode: the added tokens (<|begin_of_text|>, [PAD], ...) are cut out of the text first, leftmost
//           and longest, as `tokenizers` matches them; every other stretch is split by the
//           pre-tokenizer's regular expression (PCRE2, Unicode-aware), each piece's UTF-8 bytes are
//           mapped to the byte-level alphabet, and BPE merges them by rank (lowest rank first, the
//           leftmost on a tie); with `ignore_merges`, a piece that is a whole vocabulary entry is
//           taken as it is;
//   decode: tokens back to bytes through the same alphabet, then UTF-8 with every invalid stretch
//           replaced by U+FFFD (maximal subparts, as Rust's String::from_utf8_lossy does).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace calm_edge {

class ByteLevelBpe {
 public:
  explicit ByteLevelBpe(const std::string& tokenizer_json);
  ~ByteLevelBpe();
  ByteLevelBpe(const ByteLevelBpe&) = delete;
  ByteLevelBpe& operator=(const ByteLevelBpe&) = delete;

  std::vector<int64_t> encode(const std::string& text) const;  // no bos; throws Error on invalid UTF-8
  std::string decode(const std::vector<int64_t>& ids) const;
  int vocab_size() const { return static_cast<int>(id_to_token_.size()); }
  int64_t prepended_id() const { return prepended_id_; }  // the post-processor's bos, or -1 when it adds none

 private:
  void encode_piece(const std::string& piece, std::vector<int64_t>& ids) const;
  void encode_plain(const std::string& text, std::vector<int64_t>& ids) const;

  std::unordered_map<std::string, int64_t> vocab_;
  std::unordered_map<std::string, int> merge_ranks_;  // left + '\x01' + right -> rank
  std::vector<std::string> id_to_token_;
  std::vector<std::pair<std::string, int64_t>> added_;  // added tokens, longest first
  bool ignore_merges_ = false;
  int64_t prepended_id_ = -1;
  std::string byte_to_symbol_[256];                  // each byte's character of the byte-level alphabet (UTF-8)
  std::unordered_map<std::string, uint8_t> symbol_to_byte_;
  struct Regex;
  std::unique_ptr<Regex> regex_;
};

}  // namespace calm_edge
