#include "bpe_tokenizer.hpp"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <fstream>
#include <queue>

#include "calm_edge.hpp"

namespace calm_edge {
namespace {

using nlohmann::json;

std::string utf8_of(uint32_t c) {
  std::string out;
  if (c < 0x80) {
    out += static_cast<char>(c);
  } else if (c < 0x800) {
    out += static_cast<char>(0xC0 | (c >> 6));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    out += static_cast<char>(0xE0 | (c >> 12));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (c >> 18));
    out += static_cast<char>(0x80 | ((c >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  }
  return out;
}

// The length of the UTF-8 character that starts with `lead` (1 for a stray byte: encode only sees valid text).
size_t utf8_length(unsigned char lead) {
  if (lead >= 0xF0) return 4;
  if (lead >= 0xE0) return 3;
  if (lead >= 0xC0) return 2;
  return 1;
}

// The length of the valid UTF-8 character at bytes[i], or 0 and in `bad` the length of the maximal
// invalid subpart there (Unicode's "maximal subpart": the valid start of a character cut short, or
// one byte that starts none).
size_t utf8_character(const std::string& bytes, size_t i, size_t& bad) {
  const auto b = static_cast<unsigned char>(bytes[i]);
  bad = 1;
  if (b < 0x80) return 1;
  size_t length = 0;
  unsigned char low = 0x80, high = 0xBF;  // the range of the second byte
  if (b >= 0xC2 && b <= 0xDF) length = 2;
  else if (b == 0xE0) length = 3, low = 0xA0;
  else if ((b >= 0xE1 && b <= 0xEC) || b == 0xEE || b == 0xEF) length = 3;
  else if (b == 0xED) length = 3, high = 0x9F;
  else if (b == 0xF0) length = 4, low = 0x90;
  else if (b >= 0xF1 && b <= 0xF3) length = 4;
  else if (b == 0xF4) length = 4, high = 0x8F;
  if (length == 0) return 0;
  size_t k = i + 1;
  for (size_t part = 1; part < length && k < bytes.size(); ++part, ++k) {
    const auto c = static_cast<unsigned char>(bytes[k]);
    if (part == 1 ? (c < low || c > high) : (c < 0x80 || c > 0xBF)) break;
  }
  if (k - i == length) return length;
  bad = k - i;
  return 0;
}

// Bytes to text, every maximal invalid subpart replaced by one U+FFFD (Unicode's recommended practice,
// and what Rust's String::from_utf8_lossy, behind `tokenizers`' decode, does).
std::string utf8_lossy(const std::string& bytes) {
  std::string out;
  for (size_t i = 0, bad = 0; i < bytes.size();) {
    const size_t length = utf8_character(bytes, i, bad);
    out += length ? bytes.substr(i, length) : "\xEF\xBF\xBD";
    i += length ? length : bad;
  }
  return out;
}

// The offset of the first byte that is not valid UTF-8, or std::string::npos.
size_t invalid_utf8_at(const std::string& text) {
  for (size_t i = 0, bad = 0; i < text.size();) {
    const size_t length = utf8_character(text, i, bad);
    if (!length) return i;
    i += length;
  }
  return std::string::npos;
}

json read_json(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw Error("tokenizer " + path + " not found; the package is incomplete, copy it again");
  try {
    return json::parse(file);
  } catch (const json::exception& e) {
    throw Error(path + " is not a Hugging Face tokenizer file (" + e.what() + "); copy the package again");
  }
}

}  // namespace

struct ByteLevelBpe::Regex {
  pcre2_code* code = nullptr;
  ~Regex() {
    if (code) pcre2_code_free(code);
  }
};

ByteLevelBpe::ByteLevelBpe(const std::string& path) : regex_(std::make_unique<Regex>()) {
  const json tokenizer = read_json(path);
  try {
    const json& model = tokenizer.at("model");
    if (model.at("type") != "BPE") throw Error(path + " holds a " + model.at("type").get<std::string>() +
                                               " model; the C++ runtime reads byte-level BPE tokenizers only");
    ignore_merges_ = model.value("ignore_merges", false);
    for (const auto& [token, id] : model.at("vocab").items()) vocab_[token] = id.get<int64_t>();
    int rank = 0;
    for (const json& merge : model.at("merges")) {
      std::string left, right;
      if (merge.is_array()) {
        left = merge.at(0), right = merge.at(1);
      } else {  // the older "left right" form
        const std::string text = merge;
        const size_t space = text.find(' ');
        left = text.substr(0, space), right = text.substr(space + 1);
      }
      merge_ranks_.emplace(left + '\x01' + right, rank++);
    }
    for (const json& added : tokenizer.at("added_tokens")) {
      vocab_[added.at("content")] = added.at("id").get<int64_t>();
      added_.emplace_back(added.at("content"), added.at("id").get<int64_t>());
    }
    std::sort(added_.begin(), added_.end(), [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
    // The pre-tokenizer: a Split on the regular expression, then ByteLevel without a regex of its own.
    std::string pattern;
    const json& pre = tokenizer.at("pre_tokenizer");
    for (const json& step : pre.value("pretokenizers", json::array({pre})))
      if (step.at("type") == "Split") pattern = step.at("pattern").at("Regex");
    if (pattern.empty()) throw Error(path + " has no Split pre-tokenizer; the C++ runtime reads byte-level BPE "
                                            "tokenizers of the Llama-3 kind only");
    // The post-processor's template: a special token before the sequence is bos, prepended to prompts.
    const json& post = tokenizer.value("post_processor", json());
    for (const json& step : post.is_object() ? post.value("processors", json::array({post})) : json::array()) {
      if (step.value("type", "") != "TemplateProcessing") continue;
      const json& first = step.at("single").at(0);
      if (first.contains("SpecialToken")) prepended_id_ = vocab_.at(first["SpecialToken"]["id"].get<std::string>());
    }
    int error = 0;
    PCRE2_SIZE offset = 0;
    regex_->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.c_str()), pattern.size(),
                                 PCRE2_UTF | PCRE2_UCP, &error, &offset, nullptr);
    if (!regex_->code) throw Error(path + ": PCRE2 cannot compile the pre-tokenizer's expression");
    pcre2_jit_compile(regex_->code, PCRE2_JIT_COMPLETE);  // a speed-up where the JIT exists; plain matching else
  } catch (const json::exception& e) {
    throw Error(path + " lacks a field of a Hugging Face tokenizer or has one of the wrong type (" + e.what() +
                "); copy the package again");
  }
  id_to_token_.resize(vocab_.size());
  for (const auto& [token, id] : vocab_) {
    if (id < 0 || static_cast<size_t>(id) >= id_to_token_.size())
      throw Error(path + " has token id " + std::to_string(id) + " beyond its vocabulary; copy the package again");
    id_to_token_[id] = token;
  }
  // GPT-2's byte-level alphabet: printable bytes stand for themselves, the others for 256 + n.
  int next = 0;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    byte_to_symbol_[b] = utf8_of(printable ? b : 256 + next++);
    symbol_to_byte_[byte_to_symbol_[b]] = static_cast<uint8_t>(b);
  }
}

ByteLevelBpe::~ByteLevelBpe() = default;

// One pre-token: its bytes in the byte-level alphabet, merged by rank, as ids.
void ByteLevelBpe::encode_piece(const std::string& piece, std::vector<int64_t>& ids) const {
  std::string word;
  std::vector<std::string> symbols;
  for (unsigned char b : piece) {
    word += byte_to_symbol_[b];
    symbols.push_back(byte_to_symbol_[b]);
  }
  if (ignore_merges_) {
    const auto whole = vocab_.find(word);
    if (whole != vocab_.end()) {
      ids.push_back(whole->second);
      return;
    }
  }
  // Merges in (rank, position) order, as `tokenizers` pops them from its queue: symbols are a linked
  // list; a queue entry whose pair has changed since it was pushed is skipped.
  const size_t n = symbols.size();
  std::vector<int> prev(n), next(n);
  std::vector<bool> alive(n, true);
  for (size_t i = 0; i < n; ++i) prev[i] = static_cast<int>(i) - 1, next[i] = i + 1 < n ? static_cast<int>(i + 1) : -1;
  using Entry = std::tuple<int, int, std::string>;  // rank, left position, the pair's merged text
  std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> queue;
  auto push = [&](int left) {
    const int right = next[left];
    if (right < 0) return;
    const auto rank = merge_ranks_.find(symbols[left] + '\x01' + symbols[right]);
    if (rank != merge_ranks_.end()) queue.emplace(rank->second, left, symbols[left] + symbols[right]);
  };
  for (size_t i = 0; i + 1 < n; ++i) push(static_cast<int>(i));
  while (!queue.empty()) {
    const auto [rank, left, merged] = queue.top();
    queue.pop();
    const int right = next[left];
    if (!alive[left] || right < 0 || symbols[left] + symbols[right] != merged) continue;  // stale
    symbols[left] = merged;
    alive[right] = false;
    next[left] = next[right];
    if (next[right] >= 0) prev[next[right]] = left;
    if (prev[left] >= 0) push(prev[left]);
    push(left);
  }
  for (int i = 0; i >= 0; i = next[i]) {
    const auto id = vocab_.find(symbols[i]);
    if (id == vocab_.end()) throw Error("the tokenizer has no token for a piece of the prompt; the package's "
                                        "tokenizer.json is incomplete, copy it again");
    ids.push_back(id->second);
  }
}

// Text without added tokens: the pre-tokenizer's pieces (matches and the stretches between them).
void ByteLevelBpe::encode_plain(const std::string& text, std::vector<int64_t>& ids) const {
  if (text.empty()) return;
  pcre2_match_data* match = pcre2_match_data_create_from_pattern(regex_->code, nullptr);
  const auto subject = reinterpret_cast<PCRE2_SPTR>(text.c_str());
  size_t start = 0, emitted = 0;
  while (start < text.size()) {
    const int found = pcre2_match(regex_->code, subject, text.size(), start, PCRE2_NO_UTF_CHECK, match, nullptr);
    if (found < 0) break;
    const PCRE2_SIZE* span = pcre2_get_ovector_pointer(match);
    if (span[0] > emitted) encode_piece(text.substr(emitted, span[0] - emitted), ids);
    if (span[1] > span[0]) {
      encode_piece(text.substr(span[0], span[1] - span[0]), ids);
      start = emitted = span[1];
    } else {  // an empty match: step over one character
      start = span[0] + utf8_length(static_cast<unsigned char>(text[span[0]]));
      emitted = span[0];
    }
  }
  if (emitted < text.size()) encode_piece(text.substr(emitted), ids);
  pcre2_match_data_free(match);
}

std::vector<int64_t> ByteLevelBpe::encode(const std::string& text) const {
  const size_t bad = invalid_utf8_at(text);
  if (bad != std::string::npos)
    throw Error("the prompt is not valid UTF-8 text (byte " + std::to_string(bad) + "); give it as UTF-8");
  std::vector<int64_t> ids;
  size_t plain = 0;  // the start of the stretch before the next added token
  for (size_t i = 0; i < text.size();) {
    const std::pair<std::string, int64_t>* hit = nullptr;
    for (const auto& added : added_)
      if (text.compare(i, added.first.size(), added.first) == 0) {
        hit = &added;  // longest first: the first that matches is the longest
        break;
      }
    if (!hit) {
      ++i;
      continue;
    }
    encode_plain(text.substr(plain, i - plain), ids);
    ids.push_back(hit->second);
    i += hit->first.size();
    plain = i;
  }
  encode_plain(text.substr(plain), ids);
  return ids;
}

std::string ByteLevelBpe::decode(const std::vector<int64_t>& ids) const {
  std::string bytes;
  for (int64_t id : ids) {
    if (id < 0 || static_cast<size_t>(id) >= id_to_token_.size())
      throw Error("token id " + std::to_string(id) + " is outside the tokenizer's vocabulary of " +
                  std::to_string(id_to_token_.size()));
    const std::string& token = id_to_token_[id];
    for (size_t i = 0; i < token.size();) {
      const size_t length = utf8_length(static_cast<unsigned char>(token[i]));
      const std::string symbol = token.substr(i, length);
      const auto byte = symbol_to_byte_.find(symbol);
      if (byte != symbol_to_byte_.end()) bytes += static_cast<char>(byte->second);
      else bytes += symbol;  // not of the alphabet (an added token's text): its own UTF-8
      i += length;
    }
  }
  return utf8_lossy(bytes);
}

}  // namespace calm_edge
