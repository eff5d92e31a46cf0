#include "sampling.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <deque>
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

LazyBatchChoice::LazyBatchChoice(size_t count, size_t chunk_size, int n, float u)
    : count_(count), K_(chunk_size), n_(n), u_(u), tokens_(count * chunk_size, 0), known_(count * chunk_size, false) {
  std::vector<size_t> everyone(count);
  std::vector<Chunk> distinct(count);
  for (size_t j = 0; j < count; ++j) {
    everyone[j] = j;
    distinct[j] = {static_cast<int64_t>(j)};
  }
  groups_.push_back({0, everyone});
  std::vector<bool> asked(count * K_, false);
  for (size_t j = 0; j < count; ++j) {
    requests_.push_back({j, 0});
    asked[j * K_] = true;
  }
  // Round 0 also asks for the rest of the pick that all-different chunks would give: when the first
  // tokens do differ, it is the chunk chosen, and one round is all the step costs.
  add_missing({batch_choice(distinct, n, u)}, 1, requests_, asked);
}

void LazyBatchChoice::add_missing(const std::vector<size_t>& candidates, size_t start, std::vector<Position>& wanted,
                                  std::vector<bool>& asked) const {
  for (size_t j : candidates)
    for (size_t p = start; p < K_; ++p)
      if (!known(j, p) && !asked[j * K_ + p]) {
        wanted.push_back({j, p});
        asked[j * K_ + p] = true;
      }
}

void LazyBatchChoice::receive(const TokenIds& token_ids) {
  for (size_t r = 0; r < requests_.size(); ++r) {
    const size_t at = requests_[r].candidate * K_ + requests_[r].position;
    tokens_[at] = token_ids[r];
    known_[at] = true;
  }
  split_groups();
  std::vector<Position> next;
  std::vector<bool> asked(count_ * K_, false);
  for (const Group& group : groups_)  // the groups not settled yet: all their remaining tokens
    if (group.members.size() > 1 && group.depth < K_) add_missing(group.members, group.depth, next, asked);
  add_missing({pick()}, 0, next, asked);
  requests_ = std::move(next);
}

// Each group whose members all know their token at `depth` splits by it, the parts (in order of first
// appearance) taking its place and splitting further, until no group can: the order of Python's list.
void LazyBatchChoice::split_groups() {
  std::vector<Group> settled;
  std::deque<Group> pending(groups_.begin(), groups_.end());
  while (!pending.empty()) {
    Group group = std::move(pending.front());
    pending.pop_front();
    const bool whole = group.members.size() == 1 || group.depth == K_ ||
                       std::any_of(group.members.begin(), group.members.end(),
                                   [&](size_t j) { return !known(j, group.depth); });
    if (whole) {
      settled.push_back(std::move(group));
      continue;
    }
    std::vector<Group> parts;
    std::map<int64_t, size_t> part_of;
    for (size_t j : group.members) {
      const auto [it, added] = part_of.emplace(tokens_[j * K_ + group.depth], parts.size());
      if (added) parts.push_back({group.depth + 1, {}});
      parts[it->second].members.push_back(j);
    }
    pending.insert(pending.begin(), parts.begin(), parts.end());
  }
  groups_ = std::move(settled);
}

size_t LazyBatchChoice::pick() const {
  std::vector<Chunk> labels(count_);
  for (size_t g = 0; g < groups_.size(); ++g)
    for (size_t j : groups_[g].members) labels[j] = {static_cast<int64_t>(g)};
  return batch_choice(labels, n_, u_);
}

Chunk LazyBatchChoice::chosen() const {
  const size_t j = pick();
  return Chunk(tokens_.begin() + j * K_, tokens_.begin() + (j + 1) * K_);
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
