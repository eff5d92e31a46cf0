// Generates several prompts as one left-padded batch and prints each row's new token ids, one line
// per prompt, so that pytest can compare the batch path (left padding, a random stream per row,
// finished rows fed pad chunks) with the Python runtime's.
//
//   batch_token_ids PKG SEED TEMPERATURE METHOD MAX_NEW_TOKENS STOP_AT_EOS(0|1) PROMPT...
#include <calm_edge.hpp>

#include <iostream>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  if (argc < 8) {
    std::cerr << "usage: batch_token_ids PKG SEED TEMPERATURE METHOD MAX_NEW_TOKENS STOP_AT_EOS PROMPT...\n";
    return 2;
  }
  try {
    calm_edge::ModelOptions options;
    options.threads = 1;
    const calm_edge::Model model(argv[1], options);
    calm_edge::GeneratorParams params;
    params.seed = std::stoull(argv[2]);
    params.temperature = std::stod(argv[3]);
    params.method = argv[4];
    params.max_new_tokens = std::stoi(argv[5]);
    params.stop_at_eos = std::string(argv[6]) == "1";
    std::vector<calm_edge::TokenIds> prompts;
    for (int k = 7; k < argc; ++k) prompts.push_back(model.tokenizer().encode_prompt(argv[k]));
    for (const auto& ids : calm_edge::generate_tokens(model, prompts, params)) {
      for (size_t k = 0; k < ids.size(); ++k) std::cout << (k ? " " : "") << ids[k];
      std::cout << "\n";
    }
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
