// LazyBatchChoice (src/sampling.hpp), the lazy decoding of the batch approximation, held to batch_choice
// and to the Python runtime's lazy_batch_choice. A white-box test: it includes the library's own
// sampling.hpp, since the choice is not part of the public API.
//
//   lazy_choice            every chunk set of 4 candidates (K = 2, 3 tokens) and random ones: the lazy
//                          choice is batch_choice's, in at most 3 rounds that never ask for a token twice;
//                          exit 0 when every case holds
//   lazy_choice --trace    one JSON line in per case, {"chunks": [[...], ...], "n": N, "u": U}; one out,
//                          {"rounds": [[[candidate, position], ...], ...], "chosen": [...]}, for pytest to
//                          compare with runtime/sampling.py lazy_batch_choice round by round
#include <nlohmann/json.hpp>

#include <iostream>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "sampling.hpp"

namespace {

using calm_edge::Chunk;
using calm_edge::LazyBatchChoice;

struct Run {
  Chunk chosen;
  std::vector<std::vector<LazyBatchChoice::Position>> rounds;
};

// The lazy choice over fully known `chunks`, answering each round from them.
Run run_lazy(const std::vector<Chunk>& chunks, int n, float u) {
  LazyBatchChoice choice(chunks.size(), chunks[0].size(), n, u);
  Run run;
  while (!choice.done()) {
    run.rounds.push_back(choice.requests());
    calm_edge::TokenIds token_ids;
    for (const auto& at : choice.requests()) token_ids.push_back(chunks[at.candidate][at.position]);
    choice.receive(token_ids);
  }
  run.chosen = choice.chosen();
  return run;
}

// What is wrong with the lazy choice on `chunks`, or "".
std::string problem(const std::vector<Chunk>& chunks, int n, float u) {
  const Run run = run_lazy(chunks, n, u);
  if (run.chosen != chunks[calm_edge::batch_choice(chunks, n, u)]) return "a chunk other than batch_choice's";
  if (run.rounds.size() > 3) return std::to_string(run.rounds.size()) + " rounds";
  std::set<std::pair<size_t, size_t>> asked;
  for (const auto& round : run.rounds) {
    if (round.empty()) return "a round that asks for nothing";
    for (const auto& at : round)
      if (!asked.emplace(at.candidate, at.position).second) return "a token asked for twice";
  }
  return "";
}

int self_test() {
  int cases = 0, failed = 0;
  auto check = [&](const std::vector<Chunk>& chunks, int n, float u) {
    ++cases;
    const std::string found = problem(chunks, n, u);
    if (found.empty()) return;
    if (++failed <= 5) {
      std::cout << "case " << cases << " (n=" << n << ", u=" << u << "):";
      for (const Chunk& chunk : chunks) std::cout << " " << nlohmann::json(chunk).dump();
      std::cout << ": " << found << "\n";
    }
  };
  // Every set of 4 candidates of K = 2 tokens over 3 token ids.
  for (int code = 0; code < 9 * 9 * 9 * 9; ++code) {
    std::vector<Chunk> chunks;
    for (int j = 0, rest = code; j < 4; ++j, rest /= 9) chunks.push_back({rest % 9 / 3, rest % 3});
    for (float u : {0.0f, 0.26f, 0.51f, 0.76f, 0.9999f}) check(chunks, 2, u);
  }
  // Random sets drawn from a few prototypes with edits, so that prefixes are shared at every depth.
  std::mt19937 rng(7);
  auto below = [&](int bound) { return static_cast<int>(rng() % static_cast<unsigned>(bound)); };
  for (int k = 0; k < 6000; ++k) {
    const int n = 2 + k % 2, K = std::vector<int>{1, 2, 4}[below(3)], vocab = std::vector<int>{2, 3, 50}[below(3)];
    const int count = std::max(n, std::vector<int>{n, 4, 16, 33}[below(4)]);
    std::vector<Chunk> prototypes(1 + below(4));
    for (Chunk& prototype : prototypes)
      for (int p = 0; p < K; ++p) prototype.push_back(below(vocab));
    std::vector<Chunk> chunks;
    for (int j = 0; j < count; ++j) {
      chunks.push_back(prototypes[below(static_cast<int>(prototypes.size()))]);
      if (below(2)) chunks.back()[below(K)] = below(vocab);
    }
    check(chunks, n, static_cast<float>(rng() >> 8) * (1.0f / 16777216.0f));
  }
  std::cout << cases - failed << " of " << cases << " lazy choices match\n";
  return failed == 0 ? 0 : 1;
}

int trace() {
  std::string line;
  while (std::getline(std::cin, line)) {
    const nlohmann::json input = nlohmann::json::parse(line);
    const Run run = run_lazy(input["chunks"].get<std::vector<Chunk>>(), input["n"].get<int>(), input["u"].get<float>());
    nlohmann::json rounds = nlohmann::json::array();
    for (const auto& round : run.rounds) {
      nlohmann::json pairs = nlohmann::json::array();
      for (const auto& at : round) pairs.push_back({at.candidate, at.position});
      rounds.push_back(pairs);
    }
    std::cout << nlohmann::json{{"rounds", rounds}, {"chosen", run.chosen}}.dump() << "\n";
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 1) return self_test();
  if (argc == 2 && std::string(argv[1]) == "--trace") return trace();
  std::cerr << "usage: lazy_choice [--trace]\n";
  return 2;
}
