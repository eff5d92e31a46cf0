"""The metrics of a training run: one JSON object per line in metrics.jsonl, and a PNG of the curves.

Every record has `step` and `split` ("train" or "valid") plus numeric metrics. A resumed run
first drops the records written after its checkpoint (the killed run's last steps are redone),
so the log always reads as one uninterrupted run.
"""
import io
import json
import math
from pathlib import Path

from calm_edge.fileio import reporting_os_errors, write_bytes_atomic

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"
# Bookkeeping columns that are logged but not drawn as curves.
_NOT_PLOTTED = {"step", "split", "tokens", "elapsed_seconds"}


OTHER_CONTEXT = "_other_context"  # the suffix of the context diagnostic's metrics (models/calm.py, ar.py)


class MetricsLog:
    def __init__(self, run_dir):
        self.path = Path(run_dir) / METRICS_FILE
        self.plot_path = Path(run_dir) / PLOT_FILE

    def records(self):
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a kill: the records before it are intact
        return records

    def keep_until(self, step):
        """Drop the records after `step` (used when resuming from the checkpoint at `step`)."""
        kept = [r for r in self.records() if r.get("step", 0) <= step]
        write_bytes_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode("utf-8"))

    def append(self, record):
        with reporting_os_errors(self.path), open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def plot(self, title):
        """Draw every metric against the step, train and valid on the same axes."""
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt

        records = self.records()
        names = []
        for record in records:
            names += [k for k, v in record.items() if k not in _NOT_PLOTTED and k not in names
                      and not k.endswith(OTHER_CONTEXT) and isinstance(v, (int, float))]
        if not names:
            return
        columns = min(3, len(names))
        rows = math.ceil(len(names) / columns)
        fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.2 * rows), squeeze=False)
        for ax, name in zip(axes.flat, names):
            for split in ("train", "valid"):
                points = [(r["step"], r[name]) for r in records if r.get("split") == split and name in r]
                if points:
                    steps, values = zip(*points)
                    ax.plot(steps, values, label=split, marker="o" if split == "valid" else None, markersize=3)
            # The context diagnostic on its metric's axes: near the true-context line, context is unused.
            points = [(r["step"], r[name + OTHER_CONTEXT]) for r in records if name + OTHER_CONTEXT in r]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, label="valid, another position's context", marker="x", markersize=4,
                        linestyle="--")
            ax.set_title(name)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        fig.suptitle(title)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=90)
        plt.close(fig)
        write_bytes_atomic(self.plot_path, buffer.getvalue())
