"""The shared trainer's checkpoints: a SIGKILLed run resumes exactly; bad folders give clear errors."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from calm_edge.cli import main
from calm_edge.config import preset
from calm_edge.training import checkpoint
from calm_edge.training.trainer import learning_rate, make_optimizer

MAX_STEPS = 240
# Small and quick: a checkpoint every 20 steps, so a kill always lands between two of them.
RUN_SETTINGS = [
    "tokenizer.vocab_size=512", "autoencoder.latent_size=32", f"train_autoencoder.max_steps={MAX_STEPS}",
    "train_autoencoder.batch_size=8", "train_autoencoder.seq_len=32", "train_autoencoder.save_every=20",
    "train_autoencoder.eval_every=120", "train_autoencoder.log_every=10", "train_autoencoder.grad_accum_steps=2",
]


def cli_command(data, out, *extra):
    sets = [arg for setting in RUN_SETTINGS for arg in ("--set", setting)]
    # One thread in every run, so that the interrupted and the uninterrupted one compute alike.
    return [sys.executable, "-c", "import torch; torch.set_num_threads(1); from calm_edge.cli import main; main()",
            "-q", "train", "autoencoder", "--data", str(data), "--out", str(out), *sets, *extra]


def run_cli(data, out, *extra):
    done = subprocess.run(cli_command(data, out, *extra), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done


def kill_when(process, condition, timeout=300):
    """SIGKILL `process` as soon as `condition()` holds. Returns whether it was still running then."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "the run ended before the kill: " + process.stderr.read()
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.01)
    running = process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.wait()
    return running


def steps_saved(out):
    return [int(p.name.split("_")[1]) for p in checkpoint.list_checkpoints(out)]


def assert_every_checkpoint_is_complete(out):
    root = out / checkpoint.CHECKPOINTS_DIR
    for folder in root.iterdir():
        if folder.name.startswith("."):
            continue  # a hidden temporary folder, never read by anything
        assert folder.name.startswith("step_"), folder
        checkpoint.load_checkpoint(folder, "autoencoder")  # checks every file and its sha256
        checkpoint.load_trainer_state(folder)


@pytest.mark.slow  # trains
def test_sigkilled_run_resumes_to_the_same_result(ae_shards, tmp_path):
    reference = tmp_path / "reference"
    run_cli(ae_shards, reference)

    out = tmp_path / "interrupted"
    # First kill: as soon as the first checkpoint exists.
    process = subprocess.Popen(cli_command(ae_shards, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert kill_when(process, lambda: steps_saved(out))
    first = steps_saved(out)[-1]
    assert first < MAX_STEPS
    assert_every_checkpoint_is_complete(out)

    # Second kill: in the resumed run, while a checkpoint is being written if the poll catches
    # one (its hidden temporary folder exists), else a few checkpoints further on.
    def saving_or_far_enough():
        saved = steps_saved(out)
        if saved and saved[-1] >= first + 100:
            return True
        partial = any(p.name.endswith(".partial") for p in (out / checkpoint.CHECKPOINTS_DIR).iterdir())
        return partial and saved[-1] > first

    process = subprocess.Popen(cli_command(ae_shards, out, "--resume"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert kill_when(process, saving_or_far_enough)
    second = steps_saved(out)[-1]
    assert first < second < MAX_STEPS
    assert_every_checkpoint_is_complete(out)

    run_cli(ae_shards, out, "--resume")
    assert steps_saved(out) == [MAX_STEPS]
    assert_every_checkpoint_is_complete(out)
    final = checkpoint.list_checkpoints(out)[-1]
    expected = checkpoint.list_checkpoints(reference)[-1]
    got, want = load_file(final / "model.safetensors"), load_file(expected / "model.safetensors")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[name], want[name]) for name in want)
    assert json.loads((final / "trainer.json").read_text())["tokens_seen"] == MAX_STEPS * 2 * 8 * 32

    # The metrics log reads as one uninterrupted run: the same steps and the same losses.
    def losses(run):
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["split"], r["loss"]) for r in records]

    assert losses(out) == losses(reference)


@pytest.mark.slow  # trains
def test_resume_without_a_checkpoint_and_reuse_of_a_run_folder(ae_shards, tmp_path):
    out = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(main, ["-q", "train", "autoencoder", "--data", str(ae_shards), "--out", str(out), "--resume"])
    assert result.exit_code == 1 and "nothing to resume" in result.output
    sets = ["--set", "tokenizer.vocab_size=512", "--set", "train_autoencoder.max_steps=2"]
    args = ["-q", "train", "autoencoder", "--data", str(ae_shards), "--out", str(out), *sets]
    assert runner.invoke(main, args).exit_code == 0
    again = runner.invoke(main, args)
    assert again.exit_code == 1 and "--resume" in again.output and "--force" in again.output
    assert runner.invoke(main, [*args, "--force"]).exit_code == 0
    # Resuming with another model size is refused, naming the key.
    other = runner.invoke(main, [*args, "--resume", "--set", "autoencoder.hidden_size=32"])
    assert other.exit_code == 1 and "autoencoder.hidden_size" in other.output


def test_wrong_vocabulary_and_missing_tokenizer_are_clear_errors(ae_shards, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["-q", "train", "autoencoder", "--data", str(ae_shards), "--out", str(tmp_path / "a")])
    assert result.exit_code == 1 and "tokenizer.vocab_size=512" in result.output
    result = runner.invoke(main, ["-q", "train", "autoencoder", "--data", str(ae_shards), "--out", str(tmp_path / "b"),
                                  "--set", "tokenizer.vocab_size=512", "--tokenizer", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "--tokenizer" in result.output


# ----- bad checkpoint folders ----------------------------------------------------------------


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, ae_shards):
    from calm_edge.training.autoencoder import train_autoencoder

    out = tmp_path_factory.mktemp("bad") / "run"
    config = preset("tiny").with_overrides(["tokenizer.vocab_size=512", "train_autoencoder.max_steps=2"])
    train_autoencoder(config, ae_shards, out, progress=False)
    return checkpoint.list_checkpoints(out)[-1]


def copy_of(folder, tmp_path):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def eval_error(folder, data):
    result = CliRunner().invoke(main, ["-q", "eval", "autoencoder", "--checkpoint", str(folder), "--data", str(data)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.output.startswith("Error: ")
    assert len(result.output.strip().splitlines()) == 1
    return result.output


def test_missing_checkpoint_folder(tmp_path, ae_shards):
    message = eval_error(tmp_path / "nowhere", ae_shards)
    assert "nowhere does not exist" in message and "--out folder" in message


def test_folder_that_is_not_a_checkpoint(tmp_path, ae_shards):
    (tmp_path / "empty").mkdir()
    message = eval_error(tmp_path / "empty", ae_shards)
    assert "is not a checkpoint" in message


def test_checkpoint_of_another_kind(small_run, tmp_path, ae_shards):
    folder = copy_of(small_run, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["kind"] = "calm"
    (folder / "config.json").write_text(json.dumps(config))
    message = eval_error(folder, ae_shards)
    assert "config.json" in message and "kind 'calm'" in message and "calm-edge train autoencoder" in message


@pytest.mark.parametrize("with_checksums", [True, False])
def test_truncated_weights(small_run, tmp_path, ae_shards, with_checksums):
    folder = copy_of(small_run, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    if not with_checksums:
        (folder / "trainer.json").unlink()  # then safetensors itself must notice
    message = eval_error(folder, ae_shards)
    assert "model.safetensors is truncated or corrupt" in message


def test_corrupt_config_and_missing_tokenizer(small_run, tmp_path, ae_shards):
    folder = copy_of(small_run, tmp_path)
    (folder / "config.json").write_text("{not json")
    assert "config.json" in eval_error(folder, ae_shards)
    folder = copy_of(small_run, tmp_path / "second")
    (folder / "tokenizer.model").unlink()
    assert "tokenizer.model is missing" in eval_error(folder, ae_shards)


# ----- optimizer and schedule ----------------------------------------------------------------


def test_learning_rate_schedule():
    settings = preset("tiny").train_autoencoder  # lr 3e-3, warmup 20, 300 steps, min ratio 0.1
    assert learning_rate(0, settings) == pytest.approx(3e-3 / 20)
    assert learning_rate(19, settings) == pytest.approx(3e-3)
    assert learning_rate(20, settings) == pytest.approx(3e-3)
    assert learning_rate(160, settings) == pytest.approx(3e-3 * (0.1 + 0.9 * 0.5))
    assert learning_rate(300, settings) == pytest.approx(3e-4)
    rates = [learning_rate(s, settings) for s in range(20, 301)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))


def test_weight_decay_only_on_matrices():
    from calm_edge.models import Autoencoder

    config = preset("tiny")
    model = Autoencoder(config)
    optimizer = make_optimizer(model, config.train_autoencoder)
    decayed, plain = optimizer.param_groups
    assert optimizer.defaults["fused"] is False  # fused only where the device is CUDA
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    assert model.embed.weight in [p for p in decayed["params"]]
    assert optimizer.defaults["betas"] == (0.9, 0.95)
