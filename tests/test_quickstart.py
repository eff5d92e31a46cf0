"""`calm-edge quickstart` end to end on a very small slice, and resuming after an interruption.

Both tests run the tiny preset with far fewer steps and smaller batches than the quickstart's
own settings (QUICK_SETS, QUICK_SETTINGS), so each run takes about a minute on 2 cores; what they
check is the wiring (every stage's outputs, the summary's fields, skipping and resuming), not
the models' quality.
"""
import json

import pytest
from click.testing import CliRunner

from calm_edge.cli import main
from calm_edge.quickstart import QuickstartSettings, format_table, run_quickstart
from calm_edge.training.trainer import Trainer

QUICK_SETS = ["tokenizer.vocab_size=512", "calm.backbone.max_positions=64", "ar.backbone.max_positions=128"] + [
    f"{section}.{kv}" for section in ("train_autoencoder", "train_calm", "train_ar")
    for kv in ("max_steps=20", "batch_size=8", "seq_len=32", "eval_every=10", "save_every=10", "log_every=5",
               "warmup_steps=2", "eval_batches=1")
]
QUICK_SETTINGS = QuickstartSettings(
    max_characters=120_000, valid_fraction=0.1, min_valid_tokens=200, reconstruction_tokens=2_000,
    eval_positions=8, eval_context=32, sample_prompts=("In the beginning", "The river"), sample_tokens=8,
    bench_prompt_tokens=16, bench_new_tokens=16, bench_repeats=1, threads=1, torch_threads=1,
)
STAGE_MARKERS = ["corpus/corpus.json", "tokenizer/tokenizer.json", "shards/index.json",
                 "autoencoder/reconstruction.json", "calm/run_summary.json", "ar/run_summary.json",
                 "packages/calm/manifest.json", "packages/ar/manifest.json", "samples.json", "benchmark.json"]


class Interrupted(Exception):
    """Stands in for a Ctrl-C or a killed process."""


def quickstart(out, corpus, **kwargs):
    lines = []
    summary = run_quickstart(out, "tiny", data=[corpus], overrides=QUICK_SETS, settings=QUICK_SETTINGS,
                             progress=False, echo=lines.append, **kwargs)
    return summary, "\n".join([*lines, format_table(summary)])


def check_outputs(out, summary):
    """Every stage's outputs and the summary's fields."""
    for marker in STAGE_MARKERS:
        assert (out / marker).is_file(), marker
    assert (out / "summary.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["preset"] == "tiny"
    assert summary["data"]["characters"] <= QUICK_SETTINGS.max_characters
    assert summary["data"]["held_out_tokens"] >= QUICK_SETTINGS.min_valid_tokens
    assert 0.0 <= summary["autoencoder"]["token_accuracy"] <= 1.0
    assert summary["training"]["calm"]["step"] == summary["training"]["ar"]["step"] == 20
    assert {"calm", "ar"} <= set(summary["packages"])
    for name, package in summary["packages"].items():
        assert package["bytes"] > 0 and package["decode_tokens_per_second"] > 0, name
        assert package["speedup_over_ar"] == pytest.approx(
            package["decode_tokens_per_second"] / summary["packages"]["ar"]["decode_tokens_per_second"], rel=1e-2)
        # BrierLM is there exactly when the stage that measures it is part of this build.
        assert (package["brierlm"] is None) == ("evaluate" in summary["unavailable"]), name
    assert summary["calm_over_ar_speedup"] == summary["packages"]["calm"]["speedup_over_ar"]
    assert summary["packages"]["calm"]["kind"] == "calm" and summary["packages"]["ar"]["kind"] == "ar"
    samples = json.loads((out / "samples.json").read_text())["samples"]
    assert set(samples) == set(summary["packages"]) and all(len(s) == 2 for s in samples.values())
    for stage, state in summary["stages"].items():
        assert state["status"] in ("ran", "skipped", "unavailable"), stage
        assert state["status"] != "unavailable" or state["note"], stage  # says why


@pytest.mark.slow  # trains
def test_quickstart_end_to_end_and_rerun_skips(corpus_jsonl, tmp_path):
    out = tmp_path / "qs"
    summary, printed = quickstart(out, corpus_jsonl)
    check_outputs(out, summary)
    assert "package" in printed and "BrierLM" in printed and "decode tokens/s" in printed
    assert all(s["status"] in ("ran", "unavailable") for s in summary["stages"].values())

    again, printed = quickstart(out, corpus_jsonl)
    assert all(s["status"] in ("skipped", "unavailable") for s in again["stages"].values()), printed
    assert again["packages"] == summary["packages"]

    # Other settings into the same folder are refused, not mixed in; --force is the way out.
    other = CliRunner().invoke(main, ["-q", "quickstart", "--data", str(corpus_jsonl), "--out", str(out),
                                      "--max-characters", "100000"])
    assert other.exit_code == 1 and "--force" in other.output and "Traceback" not in other.output


@pytest.mark.slow  # trains
def test_interrupted_quickstart_resumes(corpus_jsonl, tmp_path, monkeypatch):
    out = tmp_path / "qs"

    # 1. Interrupted between stages, right after the autoencoder.
    def stop_after_autoencoder(stage, result):
        if stage.name == "autoencoder":
            raise Interrupted

    with pytest.raises(Interrupted):
        quickstart(out, corpus_jsonl, after_stage=stop_after_autoencoder)
    assert (out / "autoencoder" / "reconstruction.json").is_file()
    assert not (out / "calm").exists()
    tokenizer_written = (out / "tokenizer" / "tokenizer.model").stat().st_mtime_ns
    autoencoder_checkpoint = next((out / "autoencoder" / "checkpoints").iterdir())

    # 2. Interrupted inside the CALM training, after its checkpoint at step 10.
    save = Trainer._save

    def save_then_stop(self):
        save(self)
        if self.kind == "calm" and self.step == 10:
            raise Interrupted

    monkeypatch.setattr(Trainer, "_save", save_then_stop)
    with pytest.raises(Interrupted):
        quickstart(out, corpus_jsonl)
    monkeypatch.setattr(Trainer, "_save", save)
    assert not (out / "calm" / "run_summary.json").exists()
    assert [c.name for c in (out / "calm" / "checkpoints").iterdir()] == [f"step_{10:08d}"]

    # 3. The re-run skips the finished stages and continues the CALM training from step 10.
    restored = []
    restore = Trainer._restore

    def recording_restore(self, folder):
        restored.append((self.kind, folder.name))
        restore(self, folder)

    monkeypatch.setattr(Trainer, "_restore", recording_restore)
    summary, printed = quickstart(out, corpus_jsonl)
    assert restored == [("calm", f"step_{10:08d}")]
    for stage in ("corpus", "tokenizer", "data", "autoencoder"):
        assert summary["stages"][stage]["status"] == "skipped", stage
        assert f"] {stage}: already finished" in printed
    assert summary["stages"]["calm"]["status"] == "ran" and summary["stages"]["ar"]["status"] == "ran"
    assert (out / "tokenizer" / "tokenizer.model").stat().st_mtime_ns == tokenizer_written
    assert autoencoder_checkpoint.is_dir()
    check_outputs(out, summary)


def test_bad_input_is_a_one_line_error(tmp_path):
    runner = CliRunner()

    def quickstart_cli(*args, exit_code=1):
        result = runner.invoke(main, ["-q", "quickstart", *args])
        assert result.exit_code == exit_code and "Traceback" not in result.output, result.output
        return result.output

    assert "nope.jsonl does not exist" in quickstart_cli("--data", str(tmp_path / "nope.jsonl"), "--out",
                                                         str(tmp_path / "qs"))
    assert not (tmp_path / "qs").exists()  # nothing written for a wrong path
    (tmp_path / "a-file").write_text("x")
    assert "is a file" in quickstart_cli("--out", str(tmp_path / "a-file"), exit_code=2)  # click's own check
    assert "'--max-characters'" in quickstart_cli("--max-characters", "-1", "--out", str(tmp_path / "qs"), exit_code=2)

    few = tmp_path / "few.jsonl"
    few.write_text('{"text": "One short document."}\n{"text": "And another one."}\n')
    assert "give more documents" in quickstart_cli("--data", str(few), "--out", str(tmp_path / "qs"))
    # Nothing finished, so the same folder takes other settings without --force.
    wrong_field = quickstart_cli("--data", str(few), "--text-field", "body", "--out", str(tmp_path / "qs"))
    assert "holds a quickstart run" not in wrong_field and "body" in wrong_field
