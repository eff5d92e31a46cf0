// Encodes and decodes texts with a package's tokenizer, for pytest to compare with the Python runtime's
// (and so with Hugging Face `tokenizers` or SentencePiece): one JSON object per input line, {"text": ...},
// in; one JSON line per text out: {"ids": [...], "decoded": "..."}, or {"error": "..."} when the text is
// refused (not valid UTF-8). An input {"ids": [...]} is decoded alone: {"decoded": "..."}.
//
//   tokenize TOKENIZER_FILE_OR_FOLDER TEXTS.jsonl
#include <calm_edge.hpp>

#include <nlohmann/json.hpp>

#include <fstream>
#include <iostream>
#include <string>

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: tokenize TOKENIZER TEXTS.jsonl\n";
    return 2;
  }
  try {
    const calm_edge::Tokenizer tokenizer(argv[1]);
    std::ifstream in(argv[2], std::ios::binary);
    std::string line;
    while (std::getline(in, line)) {
      // Texts arrive as JSON; a text that is not valid UTF-8 comes as {"bytes": [...]}.
      const nlohmann::json input = nlohmann::json::parse(line);
      nlohmann::json output;
      if (input.contains("ids")) {
        output["decoded"] = tokenizer.decode(input["ids"].get<calm_edge::TokenIds>());
        std::cout << output.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
        continue;
      }
      std::string text;
      if (input.contains("bytes"))
        for (int b : input["bytes"]) text += static_cast<char>(b);
      else
        text = input["text"];
      try {
        const calm_edge::TokenIds ids = tokenizer.encode(text);
        output["ids"] = ids;
        output["decoded"] = tokenizer.decode(ids);
      } catch (const calm_edge::Error& e) {
        output["error"] = e.what();
      }
      std::cout << output.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
    }
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
