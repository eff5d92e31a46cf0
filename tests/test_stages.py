"""The resumable stage runner on stand-in stages: skipping, --force, markers, unavailable stages."""
import json

import pytest

from calm_edge.quickstart.stages import TIMINGS_FILE, Stage, run_stages


def make_stage(name, calls, marker_content=None, **kwargs):
    def run(ctx):
        calls.append(name)
        ctx.folder.mkdir(parents=True, exist_ok=True)
        (ctx.folder / "done.json").write_text(json.dumps(marker_content or {"ok": True}))
        return f"{name} note"

    return Stage(name, f"stage {name}", name, f"{name}/done.json", run, **kwargs)


def test_finished_stages_are_skipped_and_force_reruns(tmp_path):
    calls, lines = [], []
    stages = [make_stage("a", calls), make_stage("b", calls)]
    first = run_stages(stages, tmp_path, progress=False, echo=lines.append)
    assert calls == ["a", "b"] and [r.status for r in first] == ["ran", "ran"]
    assert first[0].note == "a note" and "[1/2] a: done in" in lines[0]
    assert set(json.loads((tmp_path / TIMINGS_FILE).read_text())) == {"a", "b"}

    (tmp_path / "b" / "done.json").unlink()  # as if the run had been killed inside b
    second = run_stages(stages, tmp_path, progress=False, echo=lines.append)
    assert calls == ["a", "b", "b"] and [r.status for r in second] == ["skipped", "ran"]
    assert "[1/2] a: already finished (a/done.json), skipped" in lines

    run_stages(stages, tmp_path, force=True, progress=False, echo=lines.append)
    assert calls == ["a", "b", "b", "a", "b"]


def test_marker_check_unavailable_stages_and_interruption(tmp_path):
    calls = []
    wants_two = make_stage("eval", calls, marker_content={"packages": ["calm"]},
                           check=lambda marker: marker["packages"] == ["calm", "ar"])
    missing = make_stage("quantize", calls, available="not in this build")
    results = run_stages([missing, wants_two], tmp_path, progress=False, echo=lambda line: None)
    assert [r.status for r in results] == ["unavailable", "ran"] and results[0].note == "not in this build"
    # The marker lists one package where two are wanted: the stage is not finished.
    run_stages([wants_two], tmp_path, progress=False, echo=lambda line: None)
    assert calls == ["eval", "eval"]

    class Stop(Exception):
        pass

    def fails(ctx):
        raise Stop

    broken = Stage("eval", "fails", "eval", "eval/done.json", fails)
    with pytest.raises(Stop):
        run_stages([broken], tmp_path, force=True, progress=False, echo=lambda line: None)
    # The old marker went before the stage started, so the half-done stage is not taken as finished.
    assert not (tmp_path / "eval" / "done.json").exists()


def test_a_stage_that_writes_no_marker_is_an_error(tmp_path):
    stage = Stage("x", "forgets its marker", "x", "x/done.json", lambda ctx: None)
    with pytest.raises(RuntimeError, match="without writing its marker x/done.json"):
        run_stages([stage], tmp_path, progress=False, echo=lambda line: None)
