// calm_edge::Tokenizer: SentencePiece as calm_edge/tokenizer.py uses it (a literal U+2581, SentencePiece's
// meta symbol for a space, is encoded as its three byte pieces, so it decodes to itself instead of to a
// space), or a Hugging Face byte-level BPE tokenizer.json (bpe_tokenizer.cpp).
#include <sentencepiece_processor.h>

#include <filesystem>
#include <fstream>

#include "bpe_tokenizer.hpp"
#include "calm_edge.hpp"

namespace calm_edge {

namespace {
const std::string kSpaceSymbol = "\xE2\x96\x81";  // U+2581 in UTF-8
namespace fs = std::filesystem;

// A tokenizer.json of the `tokenizers` library (a SentencePiece folder's tokenizer.json is its info file).
bool is_hf_tokenizer(const fs::path& file) {
  std::ifstream in(file);
  std::string head(4096, '\0');
  in.read(head.data(), head.size());
  head.resize(in.gcount());
  return head.find("\"added_tokens\"") != std::string::npos;
}
}  // namespace

struct Tokenizer::Impl {
  std::string kind;
  sentencepiece::SentencePieceProcessor processor;
  TokenIds space_symbol_ids;  // the byte pieces <0xE2> <0x96> <0x81>
  std::unique_ptr<ByteLevelBpe> bpe;
  int64_t pad_id = -1;

  TokenIds encode_plain(const std::string& text) const {
    std::vector<int> ids;
    const auto status = processor.Encode(text, &ids);
    if (!status.ok()) throw Error("SentencePiece could not encode the prompt: " + status.ToString());
    return TokenIds(ids.begin(), ids.end());
  }
};

Tokenizer::Tokenizer(const std::string& path, int64_t pad_id) : impl_(std::make_unique<Impl>()) {
  impl_->pad_id = pad_id;
  const fs::path given(path);
  fs::path file = given;
  if (fs::is_directory(given))
    file = fs::is_regular_file(given / "tokenizer.json") && is_hf_tokenizer(given / "tokenizer.json")
               ? given / "tokenizer.json" : given / "tokenizer.model";
  if (!fs::is_regular_file(file))
    throw Error("tokenizer model " + file.string() +
                " not found; train one with `calm-edge tokenizer train` or point at a folder that holds "
                "tokenizer.model (or a Hugging Face tokenizer.json)");
  if (file.extension() == ".json") {
    impl_->kind = "hf-bpe";
    impl_->bpe = std::make_unique<ByteLevelBpe>(file.string());
    return;
  }
  impl_->kind = "sentencepiece";
  const auto status = impl_->processor.Load(file.string());
  if (!status.ok())
    throw Error(file.string() + " is not a valid SentencePiece model (" + status.ToString() +
                "); retrain or re-export it");
  for (const char* piece : {"<0xE2>", "<0x96>", "<0x81>"}) impl_->space_symbol_ids.push_back(impl_->processor.PieceToId(piece));
}

Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

TokenIds Tokenizer::encode(const std::string& text) const {
  if (impl_->bpe) return impl_->bpe->encode(text);
  if (text.find(kSpaceSymbol) == std::string::npos) return impl_->encode_plain(text);
  TokenIds ids;
  size_t start = 0;
  while (true) {
    const size_t found = text.find(kSpaceSymbol, start);
    const std::string part = text.substr(start, found == std::string::npos ? std::string::npos : found - start);
    if (!part.empty()) {
      const TokenIds part_ids = impl_->encode_plain(part);
      ids.insert(ids.end(), part_ids.begin(), part_ids.end());
    }
    if (found == std::string::npos) return ids;
    ids.insert(ids.end(), impl_->space_symbol_ids.begin(), impl_->space_symbol_ids.end());
    start = found + kSpaceSymbol.size();
  }
}

TokenIds Tokenizer::encode_prompt(const std::string& text) const {
  TokenIds ids = encode(text);
  if (impl_->bpe && impl_->bpe->prepended_id() >= 0) ids.insert(ids.begin(), impl_->bpe->prepended_id());
  return ids;
}

std::string Tokenizer::decode(const TokenIds& ids) const {
  if (impl_->bpe) {
    TokenIds kept;
    for (int64_t id : ids)
      if (id != impl_->pad_id) kept.push_back(id);
    return impl_->bpe->decode(kept);
  }
  const std::vector<int> int_ids(ids.begin(), ids.end());
  std::string text;
  const auto status = impl_->processor.Decode(int_ids, &text);
  if (!status.ok()) throw Error("SentencePiece could not decode token ids: " + status.ToString());
  return text;
}

int Tokenizer::vocab_size() const { return impl_->bpe ? impl_->bpe->vocab_size() : impl_->processor.GetPieceSize(); }
const std::string& Tokenizer::kind() const { return impl_->kind; }

}  // namespace calm_edge
