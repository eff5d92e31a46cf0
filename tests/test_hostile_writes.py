"""Hostile places to write: every command that writes (`--out`) is run against its own inputs, a
full disk, a read-only filesystem, a path under /proc, a second writer of the same output and
the leftovers of a killed one. Each case asserts the exit code, one `Error:` line that names the
path and the cause, no traceback, and that every input and every pre-existing output is
byte-identical afterwards (README: Guarantees).

The cases are tables: WRITERS (one row per writing command) x the faults. The last test walks
the CLI and fails if a command with an --out is missing from WRITERS, so a new command gets all
of these cases by adding its row.
"""
import contextlib
import errno
import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from conftest import SHARED_DATA
from calm_edge import fileio
from calm_edge.cli import OUTPUT_PARAMETERS, main
from calm_edge.training.checkpoint import list_checkpoints

LLAMA3 = SHARED_DATA / "llama3-tokenizer"
# One optimizer step, saved and evaluated at once: training reaches its first write quickly.
QUICK_TRAINING = ["max_steps=1", "save_every=1", "eval_every=1", "log_every=1", "batch_size=2", "seq_len=16",
                  "eval_batches=1", "warmup_steps=0"]
TINY_EVAL = ["--max-positions", "2", "--context", "16"]


def quick_training(section):
    return [a for kv in ["tokenizer.vocab_size=512", *(f"{section}.{s}" for s in QUICK_TRAINING)]
            for a in ("--set", kv)]


def _out_parameter(command):
    group = main
    for word in command.split():
        group = group.commands[word]
    return next(p for p in group.params if p.name == "out")


@dataclass
class Writer:
    command: str  # as typed after calm-edge, e.g. "data prepare"
    arguments: object  # (sources, out) -> the arguments after the command, --out included
    aimed_at: str  # the key of `sources` the overlap cases point --out at
    force: bool = True  # whether the command takes --force

    @property
    def writes_a_file(self):
        return _out_parameter(self.command).type.dir_okay is False

    def argv(self, sources, out):
        return [*self.command.split(), *self.arguments(sources, str(out)), *(["--force"] if self.force else [])]


WRITERS = [
    Writer("config show", lambda s, out: ["--config", s["config"], "--out", out], "config", force=False),
    Writer("tokenizer train", lambda s, out: ["--data", s["corpus"], "--vocab-size", "400", "--out", out], "corpus"),
    Writer("data prepare", lambda s, out: ["--data", s["corpus"], "--tokenizer", s["tokenizer"], "--workers", "1",
                                           "--out", out], "tokenizer"),
    Writer("train autoencoder", lambda s, out: ["--data", s["shards"], *quick_training("train_autoencoder"),
                                                "--out", out], "shards"),
    Writer("train calm", lambda s, out: ["--autoencoder", s["ae"], "--data", s["shards"],
                                         *quick_training("train_calm"), "--out", out], "ae"),
    Writer("train ar", lambda s, out: ["--data", s["shards"], *quick_training("train_ar"), "--out", out], "shards"),
    Writer("import", lambda s, out: ["--calm", s["released_calm"], "--autoencoder", s["released_ae"],
                                     "--tokenizer", str(LLAMA3), "--out", out], "released_calm"),
    Writer("eval autoencoder", lambda s, out: ["--checkpoint", s["ae"], "--data", s["text"], "--max-tokens", "64",
                                               "--out", out], "ae", force=False),
    Writer("eval brierlm", lambda s, out: ["--checkpoint", s["ar_run"], "--data", s["text"], *TINY_EVAL,
                                           "--out", out], "ar_run", force=False),
    Writer("eval package", lambda s, out: ["--package", s["ar"], "--data", s["text"], *TINY_EVAL, "--out", out],
           "ar", force=False),
    Writer("eval compare", lambda s, out: [s["ar"], "--data", s["text"], *TINY_EVAL, "--speed-tokens", "4",
                                           "--speed-repeats", "1", "--out", out], "ar", force=False),
    Writer("export", lambda s, out: ["--calm", s["calm_run"], "--out", out], "calm_run"),
    Writer("quantize", lambda s, out: ["--package", s["ar"], "--mode", "int8-dynamic", "--out", out], "ar"),
    Writer("upgrade", lambda s, out: ["--package", s["whole_calm"], "--out", out], "whole_calm"),
    Writer("bench", lambda s, out: ["--package", s["ar"], "--prompt-lengths", "4", "--new-tokens", "4",
                                    "--batch-sizes", "1", "--threads", "1", "--temperatures", "1", "--repeats", "1",
                                    "--warmup", "0", "--rounds", "1", "--out", out], "ar", force=False),
    Writer("quickstart", lambda s, out: ["--data", s["corpus"], "--max-characters", "4000", "--out", out], "corpus"),
]
FOLDER_WRITERS = [w for w in WRITERS if not w.writes_a_file]


def ids(writers):
    return [w.command.replace(" ", "-") for w in writers]


def tree_hash(folder):
    """sha256 over every file's name and bytes under `folder` (links not followed)."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and not path.is_symlink():
            digest.update(str(path).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def run(writer, sources, out):
    if writer.command == "import" and not (LLAMA3 / "tokenizer.json").is_file():
        pytest.skip("the import row needs ../shared/data/llama3-tokenizer")
    return CliRunner().invoke(main, ["-q", *writer.argv(sources, out)])


def one_error_line(result, *expected):
    """The command failed (exit 1) with one `Error:` line holding every `expected` text; returns it."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if "Error:" in line]
    assert len(errors) == 1 and errors[0].startswith("Error: "), result.output
    for text in expected:
        assert text in errors[0], result.output
    return errors[0]


@pytest.fixture(scope="module")
def sources(tmp_path_factory, corpus_jsonl, tokenizer_dir, ae_shards, random_packages, released):
    """Copies of every input a writer reads, so a writer that destroyed one would hurt no other test."""
    from calm_edge.config import preset
    from calm_edge.training.autoencoder import train_autoencoder

    root = tmp_path_factory.mktemp("sources")
    (root / "corpus").mkdir()
    lines = corpus_jsonl.read_text(encoding="utf-8").splitlines()[:20]
    (root / "corpus" / "text.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "config.yaml").write_text("train_ar:\n  lr: 0.001\n", encoding="utf-8")
    shutil.copytree(tokenizer_dir, root / "tokenizer")
    shutil.copytree(ae_shards, root / "shards")
    for name, source in (("calm_run", random_packages["root"] / "runs" / "calm"),
                         ("ar_run", random_packages["root"] / "runs" / "ar"), ("ar", random_packages["ar"]),
                         ("released_calm", released["calm"]), ("released_ae", released["ae"])):
        shutil.copytree(source, root / name)
    config = preset("tiny").with_overrides(["tokenizer.vocab_size=512",
                                            *(f"train_autoencoder.{s}" for s in QUICK_TRAINING)])
    train_autoencoder(config, root / "shards", root / "ae", progress=False)
    from calm_edge.export.exporter import export_package

    export_package(root / "calm_run", root / "whole_calm", progress=False, e2e_prompts=1, e2e_tokens=8,
                   decoder_layout="whole")  # what `upgrade` reads
    found = {name: str(root / name) for name in ("corpus", "tokenizer", "shards", "ae", "calm_run", "ar_run", "ar",
                                                  "released_calm", "released_ae", "whole_calm")}
    return {**found, "root": root, "text": str(root / "corpus" / "text.jsonl"), "config": str(root / "config.yaml")}


# ----- the output must not destroy an input ---------------------------------------------------


def overlapping_outputs(writer, sources):
    """(relation, --out) pairs that aim --out at the writer's input: it, its folder, a place inside it."""
    aimed = Path(sources[writer.aimed_at])
    if writer.writes_a_file:
        if aimed.is_file():
            return [("is", aimed)]
        return [("lies inside", sorted(p for p in aimed.rglob("*") if p.is_file())[0])]
    pairs = [("is", aimed), ("holds", aimed.parent)]
    return pairs + ([("lies inside", aimed / "out")] if aimed.is_dir() else [])


@pytest.mark.parametrize("writer", WRITERS, ids=ids(WRITERS))
def test_an_output_that_is_holds_or_lies_inside_an_input_is_refused(writer, sources):
    before = tree_hash(sources["root"])
    for relation, out in overlapping_outputs(writer, sources):
        line = one_error_line(run(writer, sources, out), "--out", relation, "choose an --out outside every input")
        assert str(out) in line
        assert tree_hash(sources["root"]) == before, f"--out {relation} the input changed it"


def test_the_python_api_refuses_the_same(sources, tmp_path):
    from calm_edge.errors import CalmEdgeError
    from calm_edge.export.exporter import export_package

    before = tree_hash(sources["root"])
    with pytest.raises(CalmEdgeError, match="is the input --calm"):
        export_package(sources["calm_run"], sources["calm_run"], force=True, progress=False)
    with pytest.raises(CalmEdgeError, match="holds the input --calm"):
        export_package(sources["calm_run"], sources["root"], force=True, progress=False)
    assert tree_hash(sources["root"]) == before


# ----- the operating system says no ------------------------------------------------------------


@contextlib.contextmanager
def mounted_tmpfs(folder, options):
    """A small tmpfs at `folder` (yields True), or False where this machine does not let us mount."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        yield False
        return
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def fill(folder):
    """Write into `folder` until its filesystem is full."""
    with open(folder / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)


@contextlib.contextmanager
def injected(monkeypatch, code):
    """The machine cannot mount: the write primitive's final rename fails with `code` instead."""
    def fail(source, target):
        raise OSError(code, os.strerror(code), str(target))

    monkeypatch.setattr(fileio, "_replace", fail)
    yield


def old_output(writer, out):
    """A pre-existing output the failed command must leave byte-identical (None: the command has none to keep)."""
    if writer.command.startswith("train "):
        return None  # --force on a run deletes the old one by design (README); a new run is written instead
    if writer.writes_a_file:
        out.write_text("the old result\n")
    else:
        out.mkdir()
        (out / "old.txt").write_text("the old result\n")
    return tree_hash(out.parent)


def assert_nothing_half_written(out, old):
    if old is None:  # a new run: no checkpoint, at most the metrics log (read up to its last whole line)
        written = [p for p in out.rglob("*") if p.is_file() and p.name != "metrics.jsonl"] if out.exists() else []
        assert not written, written
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not leftovers, leftovers


@pytest.mark.parametrize("writer", WRITERS, ids=ids(WRITERS))
def test_a_full_disk_is_one_error_and_the_old_output_survives(writer, sources, tmp_path, monkeypatch):
    disk = tmp_path / "disk"
    with mounted_tmpfs(disk, "size=256k") as mounted:
        out = disk / "result"
        old = old_output(writer, out)
        with contextlib.ExitStack() as stack:
            if mounted:
                fill(disk)
            else:
                stack.enter_context(injected(monkeypatch, errno.ENOSPC))
            before_inputs = tree_hash(sources["root"])
            line = one_error_line(run(writer, sources, out), "No space left on device", "free some space")
            assert str(disk) in line
            assert "--keep-fp32" not in line  # the disk is full, not the graph unquantizable
            (disk / "filler").unlink(missing_ok=True)
        if old is not None:
            assert tree_hash(disk) == old
        assert_nothing_half_written(out, old)
        assert tree_hash(sources["root"]) == before_inputs


@pytest.mark.parametrize("writer", WRITERS, ids=ids(WRITERS))
def test_a_read_only_filesystem_is_refused_before_any_work(writer, sources, tmp_path, monkeypatch):
    disk = tmp_path / "ro"
    with mounted_tmpfs(disk, "size=64k,ro") as mounted, contextlib.ExitStack() as stack:
        if not mounted:
            stack.enter_context(injected(monkeypatch, errno.EROFS))
        out = disk / "result"
        before = tree_hash(sources["root"])
        line = one_error_line(run(writer, sources, out), "Read-only file system")
        assert str(disk) in line
        assert tree_hash(sources["root"]) == before
        if mounted:  # found before any work (an injected fault can only strike when the output is published)
            assert not out.exists()


@pytest.mark.parametrize("writer", WRITERS, ids=ids(WRITERS))
def test_a_path_under_proc_is_one_error(writer, sources):
    out = Path("/proc/calm-edge-test/result")
    before = tree_hash(sources["root"])
    line = one_error_line(run(writer, sources, out))
    assert "/proc" in line
    assert tree_hash(sources["root"]) == before


# ----- one writer at a time, and what a killed one left ------------------------------------------


HOLDER = """
import sys, time
from calm_edge.fileio import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


@contextlib.contextmanager
def held_by_another_process(out):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("writer", FOLDER_WRITERS, ids=ids(FOLDER_WRITERS))
def test_a_second_writer_of_one_output_is_refused_at_once(writer, sources, tmp_path):
    out = tmp_path / "result"
    with held_by_another_process(out):
        one_error_line(run(writer, sources, out), str(out), "being written by another calm-edge command")
        assert not out.exists()


def test_the_lock_of_a_killed_writer_is_free(tmp_path):
    out = tmp_path / "result"
    with held_by_another_process(out):
        pass  # killed while holding it
    with fileio.output_lock(out):
        pass


LEFTOVER_WRITERS = [w for w in WRITERS if w.command in ("tokenizer train", "data prepare", "export")]


@pytest.mark.parametrize("writer", LEFTOVER_WRITERS, ids=ids(LEFTOVER_WRITERS))
def test_the_leftovers_of_a_killed_writer_are_removed_by_the_next(writer, sources, tmp_path):
    out = tmp_path / "result"
    for name in (".result.abcd1234.partial", ".result.efgh_678.trash", ".result.v2.abcd1234.partial"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "half-written").write_text("x")
    result = run(writer, sources, out)
    assert result.exit_code == 0, result.output
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert left == [".result.v2.abcd1234.partial"]  # another output's (result.v2) is not this one's to remove


def test_a_folder_moved_aside_by_a_killed_writer_is_put_back(tmp_path):
    out = tmp_path / "package"
    aside = tmp_path / ".package.abcd1234.old" / "package"
    aside.mkdir(parents=True)
    (aside / "manifest.json").write_text("{}")
    with pytest.raises(fileio.CalmEdgeError, match="already exists"):
        with fileio.atomic_output_dir(out):
            pass
    assert (out / "manifest.json").read_text() == "{}"
    assert not (tmp_path / ".package.abcd1234.old").exists()


def test_a_run_killed_before_its_first_checkpoint_starts_over_without_a_circle(sources, tmp_path):
    writer = next(w for w in WRITERS if w.command == "train ar")
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"split": "train", "step": 1}\n')
    resumed = CliRunner().invoke(main, ["-q", "train", "ar", "--data", sources["shards"], "--out", str(out),
                                        "--resume"])
    one_error_line(resumed, "nothing to resume", "run without --resume")
    plain = CliRunner().invoke(main, ["-q", *writer.argv(sources, out)[:-1]])  # no --force: nothing to force
    assert plain.exit_code == 0, plain.output
    assert [p.name for p in list_checkpoints(out)] == ["step_00000001"]


# ----- every writing command is in the table ---------------------------------------------------


def test_every_command_that_writes_is_in_the_table():
    def commands(group, prefix=()):
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                yield from commands(command, (*prefix, name))
            else:
                yield " ".join((*prefix, name)), command

    writing = {name for name, command in commands(main) if any(p.name in OUTPUT_PARAMETERS for p in command.params)}
    assert writing == {w.command for w in WRITERS}
