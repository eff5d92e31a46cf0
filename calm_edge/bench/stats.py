"""Summary statistics of repeated timings, and the memory figures of a benchmark process."""
import os
import resource
from pathlib import Path

import numpy as np


def summarize(values, scale=1.0, digits=3):
    """{median, p90, p99, mean, min, max, n} of `values` (each multiplied by `scale`)."""
    if len(values) == 0:
        return {"n": 0}
    v = np.asarray(values, dtype=np.float64) * scale
    # Linear interpolation between order statistics (numpy's default): with 5 repeats p99 lies
    # between the two slowest runs rather than collapsing onto the slowest.
    return {"median": round(float(np.median(v)), digits), "p90": round(float(np.percentile(v, 90)), digits),
            "p99": round(float(np.percentile(v, 99)), digits), "mean": round(float(v.mean()), digits),
            "min": round(float(v.min()), digits), "max": round(float(v.max()), digits), "n": int(v.size)}


def rss_mb():
    """Current resident set size in MB."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except OSError:
        return peak_rss_mb()


def _kib_to_mb(kib):
    return kib * 1024 / 1e6


def reset_peak_rss():
    """Reset the kernel's peak-RSS mark to the current RSS, so the next reading covers one cell only.

    Linux only (writing 5 to /proc/self/clear_refs); returns False where it is not possible, and
    `peak_rss_mb` then reports the process's peak so far.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb():
    """Peak resident set size in MB since the last `reset_peak_rss` (or since the process began)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return _kib_to_mb(int(line.split()[1]))  # the kernel's "kB" are KiB
    except OSError:
        pass
    return _kib_to_mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def folder_size_mb(path):
    """Bytes on disk of every file under `path` (a package or an exported peer model), in MB."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / 1e6, 3)
