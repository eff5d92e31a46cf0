"""The pipeline's commands end to end through the CLI, on the session's tiny models."""
import json

from click.testing import CliRunner

from calm_edge.cli import main
from conftest import LM_SETTINGS

QUICK = [f"{section}.{kv}" for section in ("train_calm", "train_ar")
         for kv in ("max_steps=12", "batch_size=4", "seq_len=32", "eval_every=6", "save_every=6", "log_every=3",
                    "warmup_steps=2", "eval_batches=1")]


def _sets(values):
    return [arg for value in values for arg in ("--set", value)]


def test_train_calm_and_ar_commands(trained_runs, tmp_path):
    runner = CliRunner()
    calm = runner.invoke(main, ["-q", "train", "calm", "--autoencoder", str(trained_runs["ae"]), "--data",
                                str(trained_runs["shards"]), "--out", str(tmp_path / "calm"),
                                *_sets(LM_SETTINGS + QUICK)])
    assert calm.exit_code == 0, calm.output
    assert calm.stdout.startswith("calm: step 12") and "inference FLOPs/token" in calm.stdout
    ar = runner.invoke(main, ["-q", "train", "ar", "--data", str(trained_runs["shards"]), "--out", str(tmp_path / "ar"),
                              *_sets(LM_SETTINGS + QUICK)])
    assert ar.exit_code == 0, ar.output
    again = runner.invoke(main, ["-q", "train", "ar", "--data", str(trained_runs["shards"]), "--out",
                                 str(tmp_path / "ar"), *_sets(LM_SETTINGS + QUICK)])
    assert again.exit_code == 1 and "already holds a training run" in again.output
    mismatch = runner.invoke(main, ["-q", "train", "calm", "--autoencoder", str(trained_runs["ae"]), "--data",
                                    str(trained_runs["shards"]), "--out", str(tmp_path / "c2"),
                                    *_sets(LM_SETTINGS + QUICK + ["autoencoder.latent_size=8"])])
    assert mismatch.exit_code == 1 and "does not match this CALM config" in mismatch.output
    assert "Traceback" not in mismatch.output


def test_eval_brierlm_command(trained_runs, corpus_jsonl, tmp_path):
    out = tmp_path / "q.json"
    result = CliRunner().invoke(main, ["-q", "eval", "brierlm", "--checkpoint", str(trained_runs["ar"]), "--data",
                                       str(corpus_jsonl), "--max-positions", "16", "--offsets", "0,1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["kind"] == "ar" and set(report["by_offset"]) == {"0", "1"} and "BrierLM" in result.stdout


def test_export_command_refuses_the_wrong_kind_and_keeps_nothing(trained_runs, tmp_path):
    result = CliRunner().invoke(main, ["-q", "export", "--ar", str(trained_runs["calm"]), "--out", str(tmp_path / "p")])
    assert result.exit_code == 1 and "holds a calm checkpoint, not ar; pass it with --calm" in result.output
    assert list(tmp_path.iterdir()) == []
    both = CliRunner().invoke(main, ["export", "--out", str(tmp_path / "p")])
    assert both.exit_code == 1 and "exactly one of --calm DIR or --ar DIR" in both.output


def test_generate_command_streams_and_matches_the_reference(packages, trained_runs):
    runner = CliRunner()
    args = ["In the beginning", "--seed", "5", "--max-new-tokens", "16"]
    streamed = runner.invoke(main, ["generate", "--package", str(packages["calm"]), *args])
    assert streamed.exit_code == 0, streamed.output
    assert streamed.stdout.startswith("In the beginning")
    from_package = json.loads(runner.invoke(main, ["generate", "--package", str(packages["calm"]), *args, "--json"]).stdout)
    from_checkpoint = json.loads(runner.invoke(main, ["generate", "--checkpoint", str(trained_runs["calm"]), *args,
                                                      "--json"]).stdout)
    assert from_package["token_ids"] == from_checkpoint["token_ids"] and from_package["token_ids"]
    assert streamed.stdout == "In the beginning" + from_package["text"] + "\n"
    bad = runner.invoke(main, ["generate", "--package", str(packages["calm"]), "Hi", "--temperature", "0.3"])
    assert bad.exit_code == 1 and "0.3 is not 1/n" in bad.output and "Traceback" not in bad.output
