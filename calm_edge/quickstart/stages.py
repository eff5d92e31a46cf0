"""Run an ordered list of named stages that resume: a finished stage is skipped on the next run.

A stage is finished when its completion marker exists: a file its own outputs include and
that is written last and atomically (a tokenizer's `tokenizer.json`, the shards' `index.json`,
a training run's `run_summary.json`, a package's `manifest.json`). Nothing else records
progress, so deleting a stage's folder is enough to make it run again, and a run killed half-way
leaves no marker for the stage it was in. A stage that can continue its own work (training
from its newest checkpoint) does so when it runs again; that is the stage's business.

Each stage gets a tqdm bar (`StageContext.bar`): its total is the stage's items (packages,
samples, ...; 1 by default) and it shows the elapsed time; its own library bars, e.g. a
trainer's steps, appear beneath it. How long each stage took is kept in `stages.json` beside
the outputs, for the summary; it is a log, never read to decide what to skip.
"""
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from tqdm import tqdm

from calm_edge.fileio import write_json_atomic

log = logging.getLogger(__name__)

TIMINGS_FILE = "stages.json"


@dataclass
class Stage:
    """One named step: `run(ctx)` fills `folder` (relative to the output folder); `marker` says it finished.

    marker: path of the completion marker, relative to the output folder; None for a stage
    that is always done again (cheap, derived from the others).
    available: None when the stage can run, else why not (a feature not installed or built
    yet); such a stage is reported, never run, and never counts as finished.
    items: units of the stage's progress bar.
    check: given the marker's parsed JSON, whether it describes the outputs this run wants (a
    stage whose inputs can grow, e.g. one more package to evaluate, is then run again).
    """

    name: str
    description: str
    folder: str
    marker: Optional[str]
    run: Callable
    items: int = 1
    available: Optional[str] = None
    check: Optional[Callable] = None


@dataclass
class StageContext:
    """What a running stage sees: the output folder, its own folder, --force, and its bar."""

    out: Path
    folder: Path
    force: bool
    progress: bool
    bar: object = None

    def advance(self, n=1, note=None):
        """One more of the stage's items is done; `note` shows beside the bar."""
        self.bar.update(n)
        if note:
            self.bar.set_postfix_str(note, refresh=True)


@dataclass
class StageResult:
    name: str
    status: str  # "ran", "skipped" (already finished) or "unavailable"
    seconds: float = 0.0
    note: str = ""


def is_finished(out, stage):
    if stage.marker is None or not (Path(out) / stage.marker).is_file():
        return False
    if stage.check is None:
        return True
    try:
        return bool(stage.check(json.loads((Path(out) / stage.marker).read_text(encoding="utf-8"))))
    except ValueError:
        return False  # a damaged marker: run the stage again


def run_stages(stages, out, force=False, progress=True, echo=print, after_stage=None):
    """Run `stages` in order into folder `out`; returns a StageResult per stage.

    force: run every stage even when finished (each stage then replaces its outputs).
    after_stage: called as after_stage(stage, result) once a stage is finished or skipped;
    a test uses it to interrupt the run between stages.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings = _read_timings(out)
    results = []
    for number, stage in enumerate(stages, start=1):
        label = f"[{number}/{len(stages)}] {stage.name}"
        if stage.available is not None:
            result = StageResult(stage.name, "unavailable", note=stage.available)
            echo(f"{label}: not available: {stage.available}")
        elif is_finished(out, stage) and not force:
            seconds = timings.get(stage.name, {}).get("seconds", 0.0)
            result = StageResult(stage.name, "skipped", seconds, note=f"finished earlier ({stage.marker})")
            echo(f"{label}: already finished ({stage.marker}), skipped")
        else:
            result = _run_one(stage, label, out, force, progress)
            timings[stage.name] = {"seconds": result.seconds, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                         time.gmtime())}
            write_json_atomic(out / TIMINGS_FILE, timings)
            echo(f"{label}: done in {_clock(result.seconds)}" + (f" ({result.note})" if result.note else ""))
        results.append(result)
        if after_stage is not None:
            after_stage(stage, result)
    return results


def _run_one(stage, label, out, force, progress):
    folder = out / stage.folder
    if stage.marker is not None:
        # Gone before the stage starts, so a run killed in this stage never leaves an old marker
        # standing beside half-replaced outputs.
        (out / stage.marker).unlink(missing_ok=True)
    started = time.perf_counter()
    bar = tqdm(total=stage.items, desc=f"{label}: {stage.description}", unit="", disable=not progress,
               dynamic_ncols=True, bar_format="{desc} {n_fmt}/{total_fmt} |{bar}| {elapsed}{postfix}")
    ctx = StageContext(out=out, folder=folder, force=force, progress=progress, bar=bar)
    try:
        note = stage.run(ctx)
        bar.update(stage.items - bar.n)  # stages with a single item finish the bar here
    finally:
        bar.close()
    if stage.marker is not None and not (out / stage.marker).is_file():
        # A stage that returns without its marker would be run again on every re-run.
        raise RuntimeError(f"stage {stage.name} finished without writing its marker {stage.marker}")
    return StageResult(stage.name, "ran", round(time.perf_counter() - started, 2), note=note or "")


def _read_timings(out):
    path = Path(out) / TIMINGS_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # a log only: a missing or damaged one just starts afresh


def _clock(seconds):
    minutes, seconds = divmod(seconds, 60)
    return f"{int(minutes)}m{seconds:04.1f}s" if minutes else f"{seconds:.1f}s"
