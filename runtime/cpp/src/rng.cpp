// The counter-based random generator of ../shared/DESIGN.md ("Randomness contract"), the same
// formula as runtime/rng.py; unsigned 64-bit arithmetic wraps mod 2^64 as the contract needs.
#include "calm_edge.hpp"

namespace calm_edge {
namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;

// The splitmix64 finaliser.
uint64_t mix(uint64_t z) {
  z ^= z >> 30;
  z *= 0xBF58476D1CE4E5B9ULL;
  z ^= z >> 27;
  z *= 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

}  // namespace

RandomStream::RandomStream(uint64_t seed, uint64_t stream, uint64_t counter)
    : seed_(seed), stream_(stream), counter_(counter) {}

uint64_t RandomStream::u64(uint64_t seed, uint64_t stream, uint64_t i) {
  return mix(mix(seed ^ (stream * kGolden)) + i * kGolden);
}

float RandomStream::uniform(uint64_t seed, uint64_t stream, uint64_t i) {
  // The top 24 bits fit a float's mantissa, so the value is exact: the same in every runtime.
  return static_cast<float>(u64(seed, stream, i) >> 40) * (1.0f / 16777216.0f);
}

std::vector<float> RandomStream::draw(size_t count) {
  std::vector<float> values(count);
  for (size_t k = 0; k < count; ++k) values[k] = uniform(seed_, stream_, counter_ + k);
  counter_ += count;
  return values;
}

float RandomStream::draw_one() { return draw(1)[0]; }

}  // namespace calm_edge
