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
