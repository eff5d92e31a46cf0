"""The command line as a whole: every listed command works, errors are one clean line."""
import click
from click.testing import CliRunner

from calm_edge import __version__
from calm_edge.cli import main


def _all_commands(group, prefix=()):
    for name, command in group.commands.items():
        yield (*prefix, name), command
        if isinstance(command, click.Group):
            yield from _all_commands(command, (*prefix, name))


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_every_listed_command_has_working_help_and_none_is_a_stub():
    runner = CliRunner()
    commands = dict(_all_commands(main))
    assert {("data",), ("tokenizer",), ("config",), ("data", "prepare"), ("tokenizer", "train")} <= set(commands)
    for path, command in commands.items():
        result = runner.invoke(main, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        text = (result.output + (command.help or "")).lower()
        assert "not implemented" not in text and "todo" not in text, path
        if isinstance(command, click.Group):
            assert command.commands, f"group {path} lists no commands"


def test_quiet_hides_progress_and_verbose_shows_logs(tmp_path, corpus_jsonl):
    runner = CliRunner()
    quiet = runner.invoke(main, ["-q", "tokenizer", "train", "--data", str(corpus_jsonl), "--vocab-size", "400",
                                 "--out", str(tmp_path / "a")])
    assert quiet.exit_code == 0 and quiet.stderr == ""
    verbose = runner.invoke(main, ["-v", "tokenizer", "train", "--data", str(corpus_jsonl), "--vocab-size", "400",
                                   "--out", str(tmp_path / "b")])
    assert verbose.exit_code == 0 and "training SentencePiece BPE" in verbose.stderr


def test_usage_errors_exit_2():
    result = CliRunner().invoke(main, ["data", "prepare"])
    assert result.exit_code == 2 and "Missing option" in result.output
