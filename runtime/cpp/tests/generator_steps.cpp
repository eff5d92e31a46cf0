// Runs a Generator step by step, as an application that owns the loop would, and prints what each
// step gave each row, one line per step and row ("STEP ROW: ids"); the caller stops row STOP_ROW
// after STOP_AFTER steps. Last, one line of every row's stop reason. pytest runs the Python
// runtime's Generator the same way and compares the two outputs.
//
//   generator_steps PKG SEED TEMPERATURE MAX_NEW_TOKENS STOP_AT_EOS(0|1) STOP_ROW STOP_AFTER PROMPT...
#include <calm_edge.hpp>

#include <iostream>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  if (argc < 9) {
    std::cerr << "usage: generator_steps PKG SEED TEMPERATURE MAX_NEW_TOKENS STOP_AT_EOS STOP_ROW STOP_AFTER PROMPT...\n";
    return 2;
  }
  try {
    calm_edge::ModelOptions options;
    options.threads = 1;
    const calm_edge::Model model(argv[1], options);
    calm_edge::GeneratorParams params;
    params.seed = std::stoull(argv[2]);
    params.temperature = std::stod(argv[3]);
    params.max_new_tokens = std::stoi(argv[4]);
    params.stop_at_eos = std::string(argv[5]) == "1";
    const size_t stop_row = std::stoul(argv[6]);
    const int stop_after = std::stoi(argv[7]);
    std::vector<calm_edge::TokenIds> prompts;
    for (int k = 8; k < argc; ++k) prompts.push_back(model.tokenizer().encode_prompt(argv[k]));

    calm_edge::Generator generator(model, prompts, params);
    for (int step = 1; !generator.done(); ++step) {
      const std::vector<calm_edge::TokenIds> new_ids = generator.step();
      for (size_t row = 0; row < new_ids.size(); ++row) {
        std::cout << step << " " << row << ":";
        for (int64_t id : new_ids[row]) std::cout << " " << id;
        std::cout << "\n";
      }
      if (step == stop_after && !generator.done()) generator.stop(stop_row);
    }
    std::cout << "reasons:";
    for (const std::string& reason : generator.stop_reasons()) std::cout << " " << reason;
    std::cout << "\n";
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
