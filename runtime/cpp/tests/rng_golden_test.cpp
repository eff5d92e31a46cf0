// The C++ generator against the golden vector that the Python tests check too (tests/golden_rng.json):
// both runtimes must draw the same values, so they generate the same tokens.
//
//   rng_golden_test path/to/golden_rng.json      exit 0 when every value matches
#include <calm_edge.hpp>

#include <nlohmann/json.hpp>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: rng_golden_test GOLDEN_RNG_JSON\n";
    return 2;
  }
  std::ifstream file(argv[1]);
  if (!file) {
    std::cerr << "cannot read " << argv[1] << "; pass the path of tests/golden_rng.json\n";
    return 2;
  }
  const auto golden = nlohmann::json::parse(file);
  int checked = 0, wrong = 0;
  for (const auto& c : golden.at("cases")) {
    const uint64_t seed = c.at("seed"), stream = c.at("stream");
    for (size_t i = 0; i < c.at("u64").size(); ++i, ++checked) {
      const uint64_t expected = std::stoull(c["u64"][i].get<std::string>(), nullptr, 16);
      if (calm_edge::RandomStream::u64(seed, stream, i) != expected) {
        std::cerr << "u64(" << seed << ", " << stream << ", " << i << ") differs from the golden value\n";
        ++wrong;
      }
    }
    calm_edge::RandomStream rng(seed, stream);
    const std::vector<float> drawn = rng.draw(c.at("uniform").size());
    for (size_t i = 0; i < drawn.size(); ++i, ++checked) {
      if (static_cast<double>(drawn[i]) != c["uniform"][i].get<double>()) {
        std::cerr << "uniform(" << seed << ", " << stream << ", " << i << ") = " << drawn[i] << " differs from the golden value\n";
        ++wrong;
      }
    }
  }
  std::cout << checked - wrong << " of " << checked << " golden values match\n";
  return wrong == 0 ? 0 : 1;
}
