// SentencePiece behind calm_edge::Tokenizer, as calm_edge/tokenizer.py uses it: a literal U+2581
// (SentencePiece's meta symbol for a space) is encoded as its three byte pieces, so it decodes to
// itself instead of to a space.
#include <sentencepiece_processor.h>

#include <filesystem>

#include "calm_edge.hpp"

namespace calm_edge {

namespace {
const std::string kSpaceSymbol = "\xE2\x96\x81";  // U+2581 in UTF-8
}

struct Tokenizer::Impl {
  sentencepiece::SentencePieceProcessor processor;
  TokenIds space_symbol_ids;  // the byte pieces <0xE2> <0x96> <0x81>

  TokenIds encode_plain(const std::string& text) const {
    std::vector<int> ids;
    const auto status = processor.Encode(text, &ids);
    if (!status.ok()) throw Error("SentencePiece could not encode the prompt: " + status.ToString());
    return TokenIds(ids.begin(), ids.end());
  }
};

Tokenizer::Tokenizer(const std::string& path) : impl_(std::make_unique<Impl>()) {
  namespace fs = std::filesystem;
  const fs::path model_path = fs::is_directory(path) ? fs::path(path) / "tokenizer.model" : fs::path(path);
  if (!fs::is_regular_file(model_path))
    throw Error("tokenizer model " + model_path.string() +
                " not found; train one with `calm-edge tokenizer train` or point at a folder that holds "
                "tokenizer.model");
  const auto status = impl_->processor.Load(model_path.string());
  if (!status.ok())
    throw Error(model_path.string() + " is not a valid SentencePiece model (" + status.ToString() +
                "); retrain or re-export it");
  for (const char* piece : {"<0xE2>", "<0x96>", "<0x81>"}) impl_->space_symbol_ids.push_back(impl_->processor.PieceToId(piece));
}

Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

TokenIds Tokenizer::encode(const std::string& text) const {
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

std::string Tokenizer::decode(const TokenIds& ids) const {
  const std::vector<int> int_ids(ids.begin(), ids.end());
  std::string text;
  const auto status = impl_->processor.Decode(int_ids, &text);
  if (!status.ok()) throw Error("SentencePiece could not decode token ids: " + status.ToString());
  return text;
}

int Tokenizer::vocab_size() const { return impl_->processor.GetPieceSize(); }

}  // namespace calm_edge
