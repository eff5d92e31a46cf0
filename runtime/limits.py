"""The bounds on every number a caller asks the runtime for, checked before any work starts.

A request the machine cannot serve (a million candidates, ten thousand threads) is refused with
one error that names the option, its bound and why, instead of being killed by the kernel or
hanging. The CLI passes its options straight to the API, so these checks are its checks too;
`option` names the command-line spelling a message shows next to the API's name.
"""
import os

from calm_edge.errors import CalmEdgeError

SEED_MAX = 2**64 - 1  # seeds are unsigned 64-bit (DESIGN.md: the random streams)
MAX_NEW_TOKENS = 2**31 - 1  # the C++ runtime's int32 token counts
MAX_CANDIDATES = 65536  # far past any useful batch approximation (16-64 is typical)
THREADS_PER_CORE = 4  # more intra-op threads than this per core only adds contention


def option(name, is_option=True):
    """How a message names the API argument `name` and, if it has one, its command-line option."""
    return f"{name} (--{name.replace('_', '-')})" if is_option else name


def check_whole(name, value, low=0, high=None, why="", is_option=True):
    """`value` must be an int (not a bool, not 1.5) in [low, high]; returns it.

    is_option: whether the command line has an option of that name, for the message to show.
    """
    shown = option(name, is_option)
    if isinstance(value, bool) or not isinstance(value, int):
        raise CalmEdgeError(f"{shown} must be a whole number, got {value!r} ({type(value).__name__})")
    if value < low or (high is not None and value > high):
        span = f"at least {low}" if high is None else f"between {low} and {high}"
        raise CalmEdgeError(f"{shown} {value} is out of range: it must be {span}{why}")
    return value


def max_threads():
    """The most intra-op threads worth asking for on this machine."""
    return THREADS_PER_CORE * (os.cpu_count() or 1)


def check_threads(threads):
    """None (all cores) or a thread count in [1, max_threads()]."""
    if threads is None:
        return None
    cores = os.cpu_count() or 1
    return check_whole("threads", threads, 1, max_threads(),
                       f" ({THREADS_PER_CORE} per core of the {cores} this machine has)")


def check_seed(seed):
    return check_whole("seed", seed, 0, SEED_MAX, " (an unsigned 64-bit seed)")


def available_memory():
    """Bytes of memory the system can still give (MemAvailable), or None where it cannot say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def bytes_per_draw(model):
    """Memory one drawn chunk takes in a step (float32): its noise, latent, decoder states and logits.

    Doubled for ONNX Runtime's intermediate buffers. Only dimensions the package declares are used.
    """
    manifest = getattr(model, "manifest", None)
    K = model.chunk_size
    noise = getattr(model, "noise_size", 0) or 0
    latent = getattr(manifest, "latent_size", 0) or 0
    hidden = getattr(manifest, "hidden_size", 0) or 0
    vocab = getattr(manifest, "vocab_size", 0) or 0
    return 2 * 4 * (noise + latent + K * (hidden + vocab))


def check_draws(model, rows, draws, what):
    """Refuse a step that would draw `draws` chunks per row when their memory exceeds what is available."""
    per_draw = rows * bytes_per_draw(model)
    need = draws * per_draw
    free = available_memory()
    if free is None or need <= free // 2:
        return
    most = max(1, (free // 2) // max(1, per_draw))
    raise CalmEdgeError(
        f"{what} would draw {draws} chunks per step for {rows} prompt(s), about {need / 2**30:.1f} GiB, but this "
        f"machine has {free / 2**30:.1f} GiB available (half of it may be used); ask for at most {most}"
    )


def check_batch(manifest, rows, positions, draws, what):
    """Refuse a batch of `rows` sequences of `positions` tokens whose key-value cache (float32) and
    drawn chunks (`draws` per row, 1 at T = 1) would not fit in half the memory available."""
    model = manifest.model_section
    cache = 2 * 4 * model["num_layers"] * model["num_kv_heads"] * model["head_dim"] * positions
    chunk = 2 * 4 * (model.get("noise_size", 0) + model.get("latent_size", 0)
                     + model["chunk_size"] * (model["hidden_size"] + model["vocab_size"]))
    per_row = cache + draws * chunk
    free = available_memory()
    if free is None or rows * per_row <= free // 2:
        return
    raise CalmEdgeError(
        f"{what}: {rows} rows of {positions} positions would take about {rows * per_row / 2**30:.1f} GiB, but this "
        f"machine has {free / 2**30:.1f} GiB available (half of it may be used); ask for at most "
        f"{max(1, (free // 2) // per_row)} rows")
