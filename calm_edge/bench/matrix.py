"""The benchmark matrix: every combination of prompt length, new tokens, batch, threads and temperature.

Defaults are the benchmark's standard matrix: prompts of 64 and 512 tokens, 256 new tokens, batch sizes 1, 4 and 16,
1 and 2 threads, T = 1 and T = 1/2. Each axis can be narrowed on the command line.
"""
import itertools
from dataclasses import asdict, dataclass
from fractions import Fraction

from calm_edge.errors import CalmEdgeError
from calm_edge.runtime.limits import MAX_NEW_TOKENS, THREADS_PER_CORE, max_threads
from calm_edge.runtime.sampling import temperature_exponent

DEFAULTS = {"prompt_lengths": "64,512", "new_tokens": "256", "batch_sizes": "1,4,16", "threads": "1,2",
            "temperatures": "1,1/2"}


@dataclass(frozen=True)
class Cell:
    prompt_tokens: int
    new_tokens: int
    batch: int
    threads: int
    temperature: float

    @property
    def key(self):
        """A short label, unique in a matrix: p64-n256-b1-t2-T0.5."""
        return f"p{self.prompt_tokens}-n{self.new_tokens}-b{self.batch}-t{self.threads}-T{self.temperature:g}"

    def to_dict(self):
        return asdict(self)


def parse_counts(text, option, high=None, why=""):
    """"1,4,16" -> [1, 4, 16]; anything but whole numbers in [1, high] is an error naming the option."""
    values = []
    for part in str(text).split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise CalmEdgeError(f"{option} {text!r}: {part!r} is not a positive whole number; "
                                f"give a comma-separated list such as {DEFAULTS.get(option.lstrip('-').replace('-', '_'), '1,2')}")
        if high is not None and int(part) > high:
            raise CalmEdgeError(f"{option} {text!r}: {part} is more than {high}{why}; give smaller values")
        values.append(int(part))
    return sorted(set(values))


def parse_temperatures(text):
    """"1,1/2" -> [1.0, 0.5]; each must be 1/n for a whole n (what CALM's samplers support)."""
    values = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            value = float(Fraction(part))
        except (ValueError, ZeroDivisionError):
            raise CalmEdgeError(f"--temperatures {text!r}: {part!r} is not a number; write e.g. 1,1/2 or 1,0.5") from None
        temperature_exponent(value)  # raises with the nearest valid temperatures
        values.append(value)
    return sorted(set(values), reverse=True)


def build_matrix(prompt_lengths=DEFAULTS["prompt_lengths"], new_tokens=DEFAULTS["new_tokens"],
                 batch_sizes=DEFAULTS["batch_sizes"], threads=DEFAULTS["threads"],
                 temperatures=DEFAULTS["temperatures"]):
    """The cells, ordered so that each runner loads its model once per thread count."""
    tokens = " (the runtimes count tokens in 32 bits)"
    axes = (parse_counts(threads, "--threads", max_threads(), f" ({THREADS_PER_CORE} per core of this machine)"),
            parse_counts(prompt_lengths, "--prompt-lengths", MAX_NEW_TOKENS, tokens),
            parse_counts(new_tokens, "--new-tokens", MAX_NEW_TOKENS, tokens),
            parse_counts(batch_sizes, "--batch-sizes"), parse_temperatures(temperatures))
    return [Cell(prompt_tokens=p, new_tokens=n, batch=b, threads=t, temperature=T)
            for t, p, n, b, T in itertools.product(*axes)]
