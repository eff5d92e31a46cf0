"""Data-parallel training over torch.distributed (training/distributed.py), run as users run it:
`torchrun --standalone --nproc_per_node 2 -m calm_edge.cli train ...` on the CPU (gloo).

- 2 processes with grad_accum_steps 1 train the weights 1 process trains with grad_accum_steps 2
  (the same global batches and randomness), for CALM and AR, up to float summation order, with
  whole copies of the model (DDP) and with it sharded (FSDP);
- a checkpoint written under FSDP resumes in one process, and one written under DDP resumes
  under FSDP, to the same weights;
- a 2-process run killed with SIGKILL and resumed ends bit-identical to an uninterrupted one;
- only rank 0 writes: one metrics record per step and split, one checkpoint folder.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from calm_edge.cli import main
from calm_edge.training.checkpoint import WEIGHTS_FILE, list_checkpoints, load_trainer_state
from calm_edge.training.distributed import World, micro_batch_seed, world_from_environment

STEPS = ["batch_size=2", "seq_len=16", "log_every=1", "eval_every=2", "eval_batches=1", "warmup_steps=1", "lr=3e-3"]


def settings(section, *extra):
    return [a for kv in ("tokenizer.vocab_size=512", *(f"{section}.{s}" for s in (*STEPS, *extra)))
            for a in ("--set", kv)]


def torchrun(arguments, **popen):
    """`torchrun --standalone --nproc_per_node 2 -m calm_edge.cli -q ARGUMENTS`, one thread per process."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "calm_edge.cli", "-q", *arguments]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def kill_job(process):
    """SIGKILL torchrun and every process it started (its workers may run in sessions of their own)."""
    family, grew = {process.pid}, True
    while grew:
        grew = False
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) not in family:
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        parent = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                if parent in family:
                    family.add(int(entry))
                    grew = True
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def finished(process, timeout=600):
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output
    return output


def weights(run):
    return load_file(str(list_checkpoints(run)[-1] / WEIGHTS_FILE))


@pytest.fixture(scope="module")
def autoencoder(ae_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "ae"
    result = CliRunner().invoke(main, ["-q", "train", "autoencoder", "--data", str(ae_shards), "--out", str(out),
                                       *settings("train_autoencoder", "max_steps=2", "save_every=2")])
    assert result.exit_code == 0, result.output
    return out


def one_process(arguments):
    """`calm-edge -q ARGUMENTS` in this process, on one thread like each torchrun worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(main, ["-q", *arguments])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return result


def largest_difference(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("kind,sharding", [("ar", "ddp"), ("calm", "ddp"), ("ar", "fsdp"), ("calm", "fsdp")])
def test_two_processes_train_what_one_process_with_accumulation_trains(kind, sharding, ae_shards, autoencoder,
                                                                        tmp_path):
    source = ["--autoencoder", str(autoencoder)] if kind == "calm" else []
    base = ["train", kind, *source, "--data", str(ae_shards)]
    section = f"train_{kind}"
    ranks = torchrun([*base, "--out", str(tmp_path / "two"), *settings(section, "max_steps=4", "save_every=4",
                                                                       "grad_accum_steps=1",
                                                                       f"fsdp={str(sharding == 'fsdp').lower()}")])
    one_process([*base, "--out", str(tmp_path / "one"),
                 *settings(section, "max_steps=4", "save_every=4", "grad_accum_steps=2")])
    finished(ranks)
    worst = largest_difference(weights(tmp_path / "two"), weights(tmp_path / "one"))
    assert worst < 1e-4, f"largest weight difference {worst}"
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in trained] == [1, 2, 3, 4]  # rank 0 alone writes: each step once
    assert trained[-1]["tokens"] == 4 * 2 * 2 * 16  # steps x ranks x batch x seq_len, counted globally
    assert len(list_checkpoints(tmp_path / "two")) == 1


def test_a_killed_two_process_run_resumes_bit_identical(ae_shards, tmp_path):
    base = ["train", "ar", "--data", str(ae_shards)]
    options = settings("train_ar", "max_steps=60", "save_every=10", "eval_every=1000")
    uninterrupted = torchrun([*base, "--out", str(tmp_path / "whole"), *options])
    finished(uninterrupted)

    killed = torchrun([*base, "--out", str(tmp_path / "killed"), *options])
    deadline = time.monotonic() + 300
    while not list_checkpoints(tmp_path / "killed") and time.monotonic() < deadline and killed.poll() is None:
        time.sleep(0.05)
    kill_job(killed)
    killed.communicate()
    saved = list_checkpoints(tmp_path / "killed")
    assert saved, "no checkpoint before the kill"
    step = int(saved[-1].name.split("_")[1])
    assert step < 60, "the run finished before it was killed; nothing was resumed"

    finished(torchrun([*base, "--out", str(tmp_path / "killed"), "--resume"]))
    resumed, whole = weights(tmp_path / "killed"), weights(tmp_path / "whole")
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)
    records = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["split"] == "train"]
    assert steps == list(range(1, 61))  # the killed steps after the checkpoint are logged once, when redone


def test_the_world_comes_from_torchruns_environment():
    assert world_from_environment({}) == World(0, 1, 0)
    assert world_from_environment({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == World(1, 2, 1)
    with pytest.raises(Exception, match="rank must be below the world size"):
        world_from_environment({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(Exception, match="WORLD_SIZE='two' is not a whole number"):
        world_from_environment({"WORLD_SIZE": "two"})
    assert micro_batch_seed(0, 5) != micro_batch_seed(0, 6) != micro_batch_seed(1, 5)


def test_a_run_resumes_at_another_world_size_with_the_same_micro_batches(ae_shards, tmp_path):
    base = ["train", "ar", "--data", str(ae_shards)]
    for name in ("two-two", "two-one"):
        finished(torchrun([*base, "--out", str(tmp_path / name), *settings("train_ar", "max_steps=2", "save_every=2")]))
    finished(torchrun([*base, "--out", str(tmp_path / "two-two"), "--resume",
                       *settings("train_ar", "max_steps=4", "save_every=2")]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = CliRunner().invoke(main, ["-q", *base, "--out", str(tmp_path / "two-one"), "--resume",
                                        *settings("train_ar", "max_steps=4", "save_every=2", "grad_accum_steps=2")])
        refused = CliRunner().invoke(main, ["-q", *base, "--out", str(tmp_path / "two-two"), "--resume",
                                            *settings("train_ar", "max_steps=6", "save_every=2")])
    finally:
        torch.set_num_threads(threads)
    assert one.exit_code == 0, one.output
    a, b = weights(tmp_path / "two-two"), weights(tmp_path / "two-one")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    assert refused.exit_code == 1 and "1 x 2 micro-batches per step" in refused.output, refused.output


def test_checkpoints_resume_across_ddp_and_fsdp(ae_shards, tmp_path):
    base = ["train", "ar", "--data", str(ae_shards)]
    for name, first, then in (("fsdp-then-one", "true", None), ("ddp-then-fsdp", "false", "true")):
        finished(torchrun([*base, "--out", str(tmp_path / name),
                           *settings("train_ar", "max_steps=2", "save_every=2", f"fsdp={first}")]))
        saved = load_trainer_state(list_checkpoints(tmp_path / name)[-1])["optimizer"]["state"]
        assert all(isinstance(key, str if first == "true" else int) for key in saved)  # FSDP's state is by name
        more = settings("train_ar", "max_steps=4", "save_every=2")
        if then is None:  # one process takes up the sharded run's checkpoint
            one_process([*base, "--out", str(tmp_path / name), "--resume", *more,
                         "--set", "train_ar.grad_accum_steps=2"])
        else:
            finished(torchrun([*base, "--out", str(tmp_path / name), "--resume", *more,
                               "--set", f"train_ar.fsdp={then}"]))
    one_process([*base, "--out", str(tmp_path / "one"),
                 *settings("train_ar", "max_steps=4", "save_every=2", "grad_accum_steps=2")])
    reference = weights(tmp_path / "one")
    for name in ("fsdp-then-one", "ddp-then-fsdp"):
        worst = largest_difference(weights(tmp_path / name), reference)
        assert worst < 1e-4, f"{name}: largest weight difference {worst}"
