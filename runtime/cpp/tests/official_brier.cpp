// The official CALM evaluation protocol through the C++ runtime (evaluation/official.py is the reference):
// blocks of BLOCK_TOKENS token ids, one backbone call per block, two energy-head samples per chunk position
// from the shared generator's stream of that position, decoded, scored against the next chunk by the
// two-sample Brier estimate of its first n = 1..4 tokens. Prints {"brier_1": ..., ..., "positions": N,
// "draws": [[first chunk, second chunk] per position]}.
//
//   official_brier PKG TOKENS.json BLOCK_TOKENS MAX_POSITIONS SEED     (TOKENS.json: a JSON list of ids)
#include <calm_edge.hpp>

#include <nlohmann/json.hpp>

#include <fstream>
#include <iostream>

int main(int argc, char** argv) {
  if (argc != 6) {
    std::cerr << "usage: official_brier PKG TOKENS.json BLOCK_TOKENS MAX_POSITIONS SEED\n";
    return 2;
  }
  try {
    calm_edge::ModelOptions options;
    options.threads = 1;
    const calm_edge::Model model(argv[1], options);
    std::ifstream in(argv[2]);
    const calm_edge::TokenIds tokens = nlohmann::json::parse(in).get<calm_edge::TokenIds>();
    const size_t K = model.chunk_size(), block = std::stoul(argv[3]) / K * K, max_positions = std::stoul(argv[4]);
    const uint64_t seed = std::stoull(argv[5]);
    const size_t noise = model.noise_size(), samples = 2;
    double sums[4] = {0, 0, 0, 0};
    nlohmann::json draws = nlohmann::json::array();
    size_t position = 0;
    for (size_t start = 0; start + block <= tokens.size() && position < max_positions; start += block) {
      const calm_edge::TokenIds ids(tokens.begin() + start, tokens.begin() + start + block);
      const std::vector<float> hidden = model.hidden_states(ids);
      const size_t hidden_size = hidden.size() / (block / K);
      for (size_t c = 0; c + 1 < block / K && position < max_positions; ++c, ++position) {
        std::vector<float> row(hidden.begin() + c * hidden_size, hidden.begin() + (c + 1) * hidden_size);
        calm_edge::RandomStream stream(seed, position);
        const calm_edge::TokenIds chunks = model.decode(model.sample_latents(row, 1, stream.draw(samples * noise), samples),
                                                        samples);
        draws.push_back({calm_edge::TokenIds(chunks.begin(), chunks.begin() + K),
                         calm_edge::TokenIds(chunks.begin() + K, chunks.end())});
        bool first = true, second = true, same = true;
        for (size_t n = 0; n < 4; ++n) {
          const int64_t target = ids[(c + 1) * K + n];
          first = first && chunks[n] == target;
          second = second && chunks[K + n] == target;
          same = same && chunks[n] == chunks[K + n];
          sums[n] += double(first) + double(second) - double(same);
        }
      }
    }
    nlohmann::json report;
    for (size_t n = 0; n < 4; ++n) report["brier_" + std::to_string(n + 1)] = position ? sums[n] / position : 0.0;
    report["positions"] = position;
    report["draws"] = draws;
    std::cout << report.dump() << "\n";
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
