#include "sampling.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <map>

namespace calm_edge {
namespace {

std::string format_g(double value) {
  char text[32];
  std::snprintf(text, sizeof text, "%.4g", value);
  return text;
}

// C(count, m) as an exact integer; the products stay within 64 bits for counts up to 62.
unsigned long long binomial(int count, int m) {
  unsigned long long result = 1;
  for (int k = 1; k <= m; ++k) result = result * static_cast<unsigned long long>(count - m + k) / k;
  return result;
}

}  // namespace

int temperature_exponent(double temperature) {
  if (!(temperature > 0) || temperature > 1)
    throw Error("temperature " + format_g(temperature) +
                " is out of range; CALM samples at T = 1/n: 1, 0.5, 0.333..., 0.25, ...");
  // nearbyint rounds halves to even, like Python's round(), so the suggestions below match.
  const int n = static_cast<int>(std::nearbyint(1.0 / temperature));
  if (std::abs(1.0 / temperature - n) > 1e-6 * n) {
    const int lower = n > 1 ? n : 1;
    throw Error("temperature " + format_g(temperature) +
                " is not 1/n for a whole number n; the likelihood-free samplers need T = 1/n, e.g. " +
                format_g(1.0 / lower) + " (n=" + std::to_string(n) + ") or " + format_g(1.0 / (n + 1)) +
                " (n=" + std::to_string(n + 1) + ")");
  }
  return n;
}

size_t batch_choice(const std::vector<Chunk>& chunks, int n, float u) {
  // Distinct chunks in order of first appearance, with their count (Python's Counter order).
  std::map<Chunk, size_t> slot_of;
  std::vector<size_t> first_index;
  std::vector<int> counts;
  for (size_t index = 0; index < chunks.size(); ++index) {
    auto [it, added] = slot_of.emplace(chunks[index], first_index.size());
    if (added) {
      first_index.push_back(index);
      counts.push_back(0);
    }
    ++counts[it->second];
  }
  int most = 0;
  for (int count : counts) most = std::max(most, count);
  const int m = std::min(n, most);

  std::vector<std::pair<size_t, unsigned long long>> weights;
  unsigned long long total = 0;
  for (size_t slot = 0; slot < counts.size(); ++slot) {
    if (counts[slot] < m) continue;
    weights.emplace_back(first_index[slot], binomial(counts[slot], m));
    total += weights.back().second;
  }
  // As in Python: a float target against integer running sums (exact while sums stay below 2^53).
  const double target = static_cast<double>(u) * static_cast<double>(total);
  unsigned long long running = 0;
  for (const auto& [index, weight] : weights) {
    running += weight;
    if (target < static_cast<double>(running)) return index;
  }
  return weights.back().first;  // u is < 1, so this is only reached through rounding
}

TemperatureSampler::TemperatureSampler(double temperature, const std::string& method, int candidates,
                                       int max_rounds, int trials_per_call)
    : n_(temperature_exponent(temperature)),
      method_(method),
      candidates_(candidates),
      max_rounds_(max_rounds),
      trials_per_call_(std::max(1, trials_per_call)) {
  if (method != "batch" && method != "exact")
    throw Error("sampling method '" + method + "' is unknown; choose one of: exact, batch");
  if (method == "batch" && candidates < n_)
    throw Error(std::to_string(candidates) + " candidates cannot show a chunk " + std::to_string(n_) +
                " times, which T = 1/" + std::to_string(n_) + " needs; pass --candidates " + std::to_string(n_) +
                " or more (at least " + std::to_string(4 * n_) + " for a good approximation)");
}

int TemperatureSampler::draws_per_round() const {
  if (n_ == 1) return 1;
  return method_ == "exact" ? n_ : candidates_;
}

bool TemperatureSampler::single_round() const { return n_ == 1 || method_ == "batch"; }

Chunk TemperatureSampler::choose(const std::vector<Chunk>& chunks, RandomStream& rng) const {
  if (n_ == 1) return chunks[0];
  return chunks[batch_choice(chunks, n_, rng.draw_one())];
}

Chunk TemperatureSampler::sample(const std::function<std::vector<Chunk>(int)>& draw_chunks,
                                 RandomStream& rng) const {
  if (single_round()) return choose(draw_chunks(draws_per_round()), rng);
  std::vector<Chunk> drawn;
  for (int done = 0; done < max_rounds_;) {
    const int trials = std::min(trials_per_call_, max_rounds_ - done);
    const uint64_t start = rng.counter();
    const std::vector<Chunk> chunks = draw_chunks(n_ * trials);
    const uint64_t per_trial = (rng.counter() - start) / trials;  // random values of one round of n chunks
    for (int j = 0; j < trials; ++j) {
      const auto first = chunks.begin() + static_cast<std::ptrdiff_t>(j) * n_;
      const bool all_agree = std::all_of(first, first + n_, [&](const Chunk& chunk) { return chunk == *first; });
      if (all_agree) {
        rng.set_counter(start + (j + 1) * per_trial);  // as if the later rounds were never drawn
        return *first;
      }
      drawn.insert(drawn.end(), first, first + n_);
    }
    done += trials;
  }
  return drawn[batch_choice(drawn, n_, rng.draw_one())];
}

}  // namespace calm_edge
