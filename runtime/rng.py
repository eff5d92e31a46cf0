"""The counter-based random generator that every calm-edge runtime shares.

All sampling randomness (the energy head's noise, the choices of temperature sampling) comes
from this generator, defined in ../shared/DESIGN.md and implemented identically in C++, so the
PyTorch reference, the Python runtime and the C++ runtime generate the same tokens for the same
seed:

    mix(z)  = z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31
    u64(seed, stream, i)     = mix(mix(seed ^ (stream * GOLDEN)) + i * GOLDEN)      (all mod 2**64)
    uniform(seed, stream, i) = (u64 >> 40) * 2**-24                                  float32-exact, [0, 1)

`stream` is a sequence's index in its batch and `i` counts every value that sequence has drawn
so far. Being counter-based, any value can be computed directly from (seed, stream, i): no state
but a counter, and vectorised draws are a single numpy expression.

Order of draws within one sequence, per generation step: first the energy-head noise, row by
row (`rows * noise_size` values), then the uniforms that temperature sampling consumes for its
choices (see `calm_edge.runtime.sampling`).
"""
import numpy as np

GOLDEN = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(z):
    """The splitmix64 finaliser on a uint64 array (numpy's uint64 arithmetic wraps mod 2**64)."""
    z = z ^ (z >> np.uint64(30))
    z = z * _M1
    z = z ^ (z >> np.uint64(27))
    z = z * _M2
    return z ^ (z >> np.uint64(31))


def u64(seed, stream, counters):
    """The raw 64-bit values for `counters` (an int or array) of one (seed, stream)."""
    # The stream's key is computed with Python ints: exact, and no numpy scalar-overflow warnings.
    key = np.asarray([(int(seed) ^ (int(stream) * GOLDEN)) & _MASK], dtype=np.uint64)
    i = np.asarray(counters, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return _mix(_mix(key) + i * np.uint64(GOLDEN))


def uniform(seed, stream, counters):
    """float32 uniforms in [0, 1) for `counters`: the top 24 bits, so every value is exact."""
    return ((u64(seed, stream, counters) >> np.uint64(40)).astype(np.float32)) * np.float32(2.0**-24)


class RandomStream:
    """The draws of one sequence: a (seed, stream) pair and the count of values drawn so far."""

    def __init__(self, seed, stream=0, counter=0):
        self.seed, self.stream, self.counter = int(seed), int(stream), int(counter)

    def draw(self, count):
        """The next `count` uniforms, as a float32 array."""
        values = uniform(self.seed, self.stream, np.arange(self.counter, self.counter + count, dtype=np.uint64))
        self.counter += count
        return values

    def draw_one(self):
        return float(self.draw(1)[0])
