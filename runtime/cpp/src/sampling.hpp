// Temperature sampling with only a black-box chunk sampler (CALM paper, section 5), the same
// algorithms and the same order of random draws as runtime/sampling.py:
//
// - exact (rejection): draw n chunks; emit them if all n agree, else try again (at most
//   max_rounds rounds, then the batch approximation's choice among every chunk drawn). Up to
//   trials_per_call rounds go in one call of draw_chunks; the first that agrees wins and the
//   stream's counter is set back to its end, so the chunk and the random values consumed are
//   those of one round per call;
// - batch approximation: draw N candidates, weigh each distinct chunk C(count, m) for the largest
//   m <= n that some chunk reaches, and pick one with a single uniform.
//
// At T = 1 one chunk is drawn and no choice uniform is consumed.
//
// LazyBatchChoice makes the batch approximation's choice from as few decoded tokens as settle it, for a
// split decoder whose head may be sent any positions (runtime/sampling.py lazy_batch_choice): the same
// chunk, asked for in the same rounds with the same requests.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "calm_edge.hpp"

namespace calm_edge {

using Chunk = TokenIds;

// The n of T = 1/n; any other temperature throws an Error that says which ones work.
int temperature_exponent(double temperature);

// Index into `chunks` of the batch approximation's choice for uniform `u` in [0, 1).
size_t batch_choice(const std::vector<Chunk>& chunks, int n, float u);

// The batch approximation's choice among `count` candidates of K tokens, decoding only the tokens it needs
// (runtime/sampling.py lazy_batch_choice, round for round and request for request). batch_choice depends
// only on which candidates' chunks are equal, and two candidates whose first tokens differ have different
// chunks; so the tokens are asked for in at most three rounds:
//
//   0. every candidate's first token, and the rest of the chunk batch_choice picks if all chunks differ;
//   1. if some candidates still agree on every token known, the remaining tokens of each of them, and of
//      the pick that treats each such group as one chunk;
//   2. if the chunk finally picked is not complete yet, its remaining tokens.
//
// Candidates are kept in groups known to agree on their first `depth` tokens; a group is split by its
// next token once all its members have it. At the end two candidates share a group exactly when their
// chunks are equal, so batch_choice over group labels returns the index it returns over the chunks.
//
//     LazyBatchChoice choice(count, K, n, u);
//     while (!choice.done()) choice.receive(head(choice.requests()));  // token ids in request order
//     Chunk chunk = choice.chosen();
class LazyBatchChoice {
 public:
  struct Position {
    size_t candidate, position;
  };

  LazyBatchChoice(size_t count, size_t chunk_size, int n, float u);

  bool done() const { return requests_.empty(); }
  // The (candidate, position) pairs whose token ids the next round needs; empty when done().
  const std::vector<Position>& requests() const { return requests_; }
  // The token ids of requests(), in their order; then the next round's requests are set.
  void receive(const TokenIds& token_ids);
  // The chosen chunk, once done().
  Chunk chosen() const;

 private:
  struct Group {
    size_t depth;                  // the members agree on the positions before depth
    std::vector<size_t> members;
  };

  bool known(size_t j, size_t p) const { return known_[j * K_ + p]; }
  // Appends to `wanted` the unknown, not yet wanted positions from `start` of each candidate, in order.
  void add_missing(const std::vector<size_t>& candidates, size_t start, std::vector<Position>& wanted,
                   std::vector<bool>& asked) const;
  void split_groups();
  size_t pick() const;  // batch_choice over the groups' labels

  size_t count_, K_;
  int n_;
  float u_;
  std::vector<int64_t> tokens_;  // [count, K], valid where known_
  std::vector<bool> known_;
  std::vector<Group> groups_;
  std::vector<Position> requests_;
};

class TemperatureSampler {
 public:
  TemperatureSampler(double temperature, const std::string& method, int candidates, int max_rounds = 100,
                     int trials_per_call = 4);

  int n() const { return n_; }
  int draws_per_round() const;  // the energy head's sample count for one round
  bool single_round() const;    // one round always decides the step (T = 1 or batch)

  // The pick among one round's chunks, for a single_round() sampler.
  Chunk choose(const std::vector<Chunk>& chunks, RandomStream& rng) const;

  // One chunk; `draw_chunks(count)` draws `count` chunks, taking its noise from `rng` first.
  Chunk sample(const std::function<std::vector<Chunk>(int)>& draw_chunks, RandomStream& rng) const;

 private:
  int n_;
  std::string method_;
  int candidates_;
  int max_rounds_;
  int trials_per_call_;
};

}  // namespace calm_edge
