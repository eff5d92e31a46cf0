"""The `calm-edge` command line.

One group per stage of the pipeline, in the pipeline's order. A stage's command is registered
here only once it works, so `calm-edge --help` lists nothing that is not implemented.

Errors a user can fix are `CalmEdgeError`s: printed as one line, without a traceback, and the
exit code is 1 (2 for a usage error that click itself catches).

Each command imports its stage when it runs, not when this module loads: most stages need torch,
and `calm-edge --help` or `calm-edge generate --package` must start quickly on a device that
has none.
"""
import functools
import json
import logging
import sys

import click
from click.core import ParameterSource

from calm_edge import __version__
from calm_edge.config import PRESETS, resolve_config
from calm_edge.errors import CalmEdgeError
from calm_edge.fileio import check_apart, check_writable, write_json_atomic
from calm_edge.runtime.limits import MAX_CANDIDATES, MAX_NEW_TOKENS, SEED_MAX, max_threads

# Whole-number options bounded as the runtimes bound them (runtime/limits.py): a value out of
# range is a usage error (exit 2) before any work, in the C++ program alike.
SEED = click.IntRange(0, SEED_MAX)
NEW_TOKENS = click.IntRange(1, MAX_NEW_TOKENS)
CANDIDATES = click.IntRange(1, MAX_CANDIDATES)
THREADS = click.IntRange(1, max_threads())
COUNT = click.IntRange(1)

log = logging.getLogger("calm_edge")


class _EchoHandler(logging.Handler):
    """Log records to stderr through click, so they interleave cleanly with tqdm and tests see them."""

    def emit(self, record):
        click.echo(self.format(record), err=True)


def _setup_logging(level):
    for handler in [h for h in log.handlers if isinstance(h, _EchoHandler)]:
        log.removeHandler(handler)
    handler = _EchoHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


# The parameters that name what a command writes; every other path parameter is one of its inputs.
OUTPUT_PARAMETERS = ("out", "plot_path", "work_dir")


def _is_path(parameter):
    return isinstance(parameter.type, click.Path) or parameter.metavar in ("PATH", "PATH_OR_ID")


def _check_outputs_apart(ctx):
    """No output of the command may be, hold or lie inside one of its inputs (`fileio.check_apart`),
    checked before any work starts, so every command (a new one too) has the guarantee."""
    params = [p for p in ctx.command.params if ctx.params.get(p.name)]
    inputs = {p.opts[0]: ctx.params[p.name] for p in params if p.name not in OUTPUT_PARAMETERS and _is_path(p)}
    for p in params:
        if p.name in OUTPUT_PARAMETERS:
            is_file = isinstance(p.type, click.Path) and not p.type.dir_okay
            check_apart(ctx.params[p.name], inputs, folder=not is_file)
            check_writable(ctx.params[p.name])


class _Command(click.Command):
    """A command whose outputs are checked against its inputs before it runs."""

    def invoke(self, ctx):
        _check_outputs_apart(ctx)
        return super().invoke(ctx)


class _Group(click.Group):
    """A click group that turns `CalmEdgeError` into a one-line message and exit code 1.

    An `OSError` no write primitive reported (`fileio.os_error`) is still one line, naming the file.
    """
    command_class = _Command

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CalmEdgeError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            raise click.ClickException(f"{e.filename or 'a file'}: {e.strerror or e}; check that path "
                                       "(its space and permissions) and try again") from None

    def group(self, *args, **kwargs):
        kwargs.setdefault("cls", _Group)
        return super().group(*args, **kwargs)


def _progress(ctx):
    """Whether to draw progress bars: not under --quiet."""
    return not ctx.find_root().obj.get("quiet", False)


def config_options(command):
    """The options that build a `Config`: --preset, then --config FILE, then --set key=value."""
    command = click.option(
        "--set", "overrides", multiple=True, metavar="KEY=VALUE",
        help="Override one config value, e.g. --set tokenizer.vocab_size=4096 (repeatable).",
    )(command)
    command = click.option(
        "--config", "config_file", type=click.Path(dir_okay=False), default=None,
        help="A JSON or YAML file with config sections, applied on top of the preset.",
    )(command)
    command = click.option(
        "--preset", type=click.Choice(list(PRESETS)), default="tiny", show_default=True,
        help="Starting configuration: tiny (minutes on a CPU), small (hours on a CPU), base (the paper's sizes).",
    )(command)
    return command


def _bundle(options, build, name):
    """A decorator adding `options` to a command and handing it one object, `name=build(**their values)`."""
    keys = [option(lambda: None).__click_params__[0].name for option in options]

    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            kwargs[name] = build(**{key: kwargs.pop(key) for key in keys})
            return command(*args, **kwargs)

        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper
    return decorate


def _text_source(data, text_field, detokenize, split):
    from calm_edge.text_source import TextSource

    return TextSource(tuple(data), text_field=text_field, detokenize=detokenize, split=split)


# --data, --text-field, --detokenize, --split: the evaluation text, handed to the command as `text`.
text_source_options = _bundle([
    click.option("--data", "data", multiple=True, required=True, metavar="PATH",
                 help="Text (.txt/.jsonl/.jsonl.gz/.jsonl.xz, a folder, demo:bible) or a prepared shard folder "
                      "(repeatable)."),
    click.option("--text-field", default="text", show_default=True, help="JSONL field that holds the text."),
    click.option("--detokenize", type=click.Choice(["none", "wikitext"]), default="none", show_default=True,
                 help="Undo WikiText's tokenized spacing (' @-@ ' -> '-', ' ,' -> ',') before encoding text."),
    click.option("--split", default="valid", show_default=True, help="Split of a prepared shard folder to use."),
], _text_source, "text")


def _eval_settings(context, stride, max_positions, offsets, seed, protocol, block_tokens, other_context):
    from calm_edge.evaluation.settings import EvalSettings

    try:
        offset_list = tuple(int(o) for o in offsets.split(","))
    except ValueError:
        raise CalmEdgeError(f"--offsets {offsets!r} must be comma-separated whole numbers, e.g. 0,1,2,3") from None
    return EvalSettings(context=context, stride=stride, max_positions=max_positions, offsets=offset_list, seed=seed,
                        protocol=protocol, block_tokens=block_tokens, other_context=other_context)


# --context, --stride, --max-positions, --offsets, --seed: where BrierLM is estimated, handed over as `settings`.
eval_settings_options = _bundle([
    click.option("--context", type=int, default=256, show_default=True, help="Tokens of context before each position."),
    click.option("--stride", type=int, default=32, show_default=True,
                 help="Tokens between evaluated positions (a multiple of K)."),
    click.option("--max-positions", type=int, default=2000, show_default=True, help="Positions to evaluate at most."),
    click.option("--offsets", default="0", show_default=True,
                 help="Comma-separated offsets within a chunk to evaluate at, e.g. 0,1,2,3 (partial-chunk prompts)."),
    click.option("--seed", type=SEED, default=0, show_default=True),
    click.option("--protocol", type=click.Choice(["calm-edge", "official"]), default="calm-edge", show_default=True,
                 help="calm-edge: two sampled continuations at the positions above; official: the released models' "
                      "teacher-forced protocol over whole blocks (README: Run the official CALM models)."),
    click.option("--other-context", is_flag=True,
                 help="The context diagnostic: also score each target after another position's context (a "
                      "model that ignores its context scores the same)."),
    click.option("--block-tokens", type=int, default=8192, show_default=True,
                 help="--protocol official: tokens per evaluated block (the official 8192; capped at the context)."),
], _eval_settings, "settings")


def _check_utf8(arguments):
    """Every argument must be text: bytes that are not UTF-8 reach Python as surrogates, which no file
    name, prompt or option value can use (they fail deep inside, when encoded)."""
    for argument in arguments:
        try:
            argument.encode("utf-8")
        except UnicodeEncodeError:
            shown = argument.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            raise click.UsageError(f"argument {shown!r} is not valid UTF-8; pass prompts and paths as UTF-8 text")


class _MainGroup(_Group):
    """The top-level group: checks every argument is UTF-8 before any command parses it, and closes
    progress bars before an error is printed, so the error line is never glued to a bar."""

    def parse_args(self, ctx, args):
        _check_utf8(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.ClickException:
            _close_progress_bars()
            raise


def _close_progress_bars():
    """Close every open tqdm bar (a bar left by a loop that raised ends its line only when collected)."""
    tqdm_module = sys.modules.get("tqdm")
    if tqdm_module is None:
        return
    for bar in list(getattr(tqdm_module.tqdm, "_instances", ())):
        bar.close()


@click.group(cls=_MainGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="calm-edge")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors and results: no progress bars or info logs.")
@click.pass_context
def main(ctx, verbose, quiet):
    """calm-edge: train Continuous Autoregressive Language Models and run them on edge devices."""
    ctx.ensure_object(dict)
    ctx.obj["quiet"] = quiet
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    _setup_logging(level)


# ----- config ---------------------------------------------------------------------------------


@main.group()
def config():
    """Show and save configurations (presets plus your changes)."""


@config.command("show")
@config_options
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Also write the config to this .json or .yaml file.")
@click.option("--format", "fmt", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True)
def config_show(preset, config_file, overrides, out, fmt):
    """Print the configuration that --preset, --config and --set build."""
    import yaml

    resolved = resolve_config(preset, config_file, overrides)
    data = resolved.to_dict()
    click.echo(json.dumps(data, indent=2) if fmt == "json" else yaml.safe_dump(data, sort_keys=False), nl=fmt == "json")
    if out:
        resolved.save(out)
        click.echo(f"wrote {out}", err=True)


# ----- tokenizer -----------------------------------------------------------------------------


@main.group()
def tokenizer():
    """Train and inspect the SentencePiece tokenizer."""


@tokenizer.command("train")
@click.option("--data", "data", multiple=True, required=True, metavar="PATH",
              help="A .txt/.jsonl/.jsonl.gz/.jsonl.xz file, a folder of them, or demo:bible (repeatable).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write the tokenizer to.")
@click.option("--vocab-size", type=click.IntRange(1), default=None, help="Vocabulary size (default: the preset's).")
@click.option("--text-field", default="text", show_default=True, help="JSONL field that holds the text.")
@click.option("--force", is_flag=True, help="Replace an existing tokenizer folder.")
@config_options
@click.pass_context
def tokenizer_train(ctx, data, out, vocab_size, text_field, force, preset, config_file, overrides):
    """Train a SentencePiece BPE tokenizer with byte fallback.

    Example: calm-edge tokenizer train --data ../shared/data/wiki-train.jsonl.xz --vocab-size 8192 --out tok
    """
    from calm_edge.tokenizer import train_tokenizer

    if vocab_size is not None:
        overrides = (*overrides, f"tokenizer.vocab_size={vocab_size}")
    settings = resolve_config(preset, config_file, overrides).tokenizer
    info = train_tokenizer(data, out, settings, text_field=text_field, force=force, progress=_progress(ctx))
    click.echo(
        f"tokenizer: vocab {info['vocab_size']}, trained on {info['lines_sampled']:,} of {info['lines']:,} lines "
        f"in {info['train_seconds']:.1f}s -> {out}"
    )


@tokenizer.command("encode")
@click.option("--tokenizer", "tokenizer_dir", required=True, type=click.Path(exists=True),
              help="Tokenizer folder or tokenizer.model file.")
@click.argument("text")
def tokenizer_encode(tokenizer_dir, text):
    """Print the token ids and pieces of TEXT."""
    from calm_edge.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_dir)
    ids = tok.encode(text)
    click.echo(json.dumps({"ids": ids, "pieces": [tok.id_to_piece(i) for i in ids]}, ensure_ascii=False))


# ----- data ----------------------------------------------------------------------------------


@main.group()
def data():
    """Turn text corpora into token shards for training."""


@data.command("prepare")
@click.option("--data", "data", multiple=True, required=True, metavar="PATH",
              help="A .txt/.jsonl/.jsonl.gz/.jsonl.xz file, a folder of them, or demo:bible (repeatable).")
@click.option("--tokenizer", "tokenizer_dir", required=True, type=click.Path(),
              help="Tokenizer folder (from `calm-edge tokenizer train`).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write the shards to.")
@click.option("--text-field", default="text", show_default=True, help="JSONL field that holds the text.")
@click.option("--valid-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.01, show_default=True,
              help="Fraction of documents (chosen by a hash of their text) held out for validation.")
@click.option("--workers", type=click.IntRange(1, max_threads()), default=None, help="Tokenizer processes (default: one per CPU core).")
@click.option("--shard-tokens", type=click.IntRange(1, 1 << 31), default=1 << 28, show_default=True, help="Tokens per shard file.")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.pass_context
def data_prepare(ctx, data, tokenizer_dir, out, text_field, valid_fraction, workers, shard_tokens, force):
    """Tokenize documents (eos after each) into memory-mapped shards plus index.json.

    Example: calm-edge data prepare --data ../shared/data/wiki-train.jsonl.xz --tokenizer tok --out shards
    """
    from calm_edge.data import prepare_shards

    result = prepare_shards(data, tokenizer_dir, out, text_field=text_field, valid_fraction=valid_fraction,
                            workers=workers, shard_tokens=shard_tokens, force=force, progress=_progress(ctx))
    splits = result["splits"]
    click.echo(
        f"prepared {splits['train']['tokens']:,} train and {splits['valid']['tokens']:,} valid tokens "
        f"({result['dtype']}, {result['characters_per_token']:.2f} chars/token) in {result['seconds']:.1f}s "
        f"with {result['workers']} workers -> {out}"
    )


# ----- training ------------------------------------------------------------------------------


@main.group()
def train():
    """Train models on prepared token shards."""


def _explicit_config(ctx):
    """Whether --preset, --config or --set was given on the command line."""
    return any(ctx.get_parameter_source(name) != ParameterSource.DEFAULT
               for name in ("preset", "config_file", "overrides"))


def train_options(command):
    """The options every `train` command shares, after --data and --out."""
    command = click.option("--force", is_flag=True, help="Delete the run already in --out and start over.")(command)
    command = click.option(
        "--resume", is_flag=True,
        help="Continue from the newest checkpoint in --out (with its config unless --preset/--config/--set).")(command)
    command = click.option("--tokenizer", "tokenizer_dir", default=None, type=click.Path(),
                           help="Tokenizer the shards were prepared with (default: from their index.json).")(command)
    command = click.option("--out", required=True, type=click.Path(file_okay=False),
                           help="Run folder: checkpoints/step_*, metrics.jsonl, curves.png (and run_summary.json).")(command)
    command = click.option("--data", required=True, type=click.Path(file_okay=False),
                           help="Prepared token shards (from `calm-edge data prepare`).")(command)
    return command


def _training_config(ctx, resume, force, preset, config_file, overrides):
    """The run's Config; None when resuming without --preset/--config/--set (reuse the checkpoint's)."""
    if resume and force:
        raise click.UsageError("--resume and --force contradict each other; pass one of them")
    return resolve_config(preset, config_file, overrides) if (_explicit_config(ctx) or not resume) else None


@train.command("autoencoder")
@train_options
@config_options
@click.pass_context
def train_autoencoder_command(ctx, data, out, tokenizer_dir, resume, force, preset, config_file, overrides):
    """Train the autoencoder: K tokens to one latent vector and back.

    Example: calm-edge train autoencoder --preset small --data runs/shards --out runs/ae
    """
    from calm_edge.training.autoencoder import train_autoencoder

    config = _training_config(ctx, resume, force, preset, config_file, overrides)
    result = train_autoencoder(config, data, out, tokenizer=tokenizer_dir, resume=resume, force=force,
                               progress=_progress(ctx))
    if not _main_process():
        return
    valid = result["valid"]
    scores = (f"valid token accuracy {valid['accuracy']:.4f}, chunk accuracy {valid['chunk_accuracy']:.4f}, "
              if valid else "")
    click.echo(
        f"autoencoder: step {result['step']}, {scores}{result['parameters']:,} parameters, "
        f"{result['tokens_seen']:,} tokens in {result['elapsed_seconds']:.0f}s -> {result['checkpoint']}"
    )


def _main_process():
    """Whether this process prints a training run's result: rank 0 of a torchrun job, or the only one."""
    from calm_edge.training.distributed import world_from_environment

    return world_from_environment().is_main


def _echo_lm_summary(summary):
    if not _main_process():
        return
    valid = summary.get("valid") or {}
    score = f"valid loss {valid['loss']:.4f}, " if "loss" in valid else ""
    click.echo(
        f"{summary['kind']}: step {summary['step']}, {score}{summary['parameters']:,} parameters, "
        f"{summary['tokens_seen']:,} tokens, {summary['training_flops']:.3g} training FLOPs, "
        f"{summary['inference_flops_per_token']:.3g} inference FLOPs/token -> {summary['checkpoint']}"
    )


@train.command("calm")
@click.option("--autoencoder", required=True, type=click.Path(),
              help="Run folder of `calm-edge train autoencoder` (its newest checkpoint) or a checkpoint folder.")
@train_options
@config_options
@click.pass_context
def train_calm_command(ctx, autoencoder, data, out, tokenizer_dir, resume, force, preset, config_file, overrides):
    """Train the CALM model (energy loss) on top of a frozen autoencoder.

    Example: calm-edge train calm --preset small --autoencoder runs/ae --data runs/shards --out runs/calm
    """
    from calm_edge.training.language_models import train_calm

    config = _training_config(ctx, resume, force, preset, config_file, overrides)
    _echo_lm_summary(train_calm(config, autoencoder, data, out, tokenizer=tokenizer_dir, resume=resume,
                                force=force, progress=_progress(ctx)))


@train.command("ar")
@train_options
@config_options
@click.pass_context
def train_ar_command(ctx, data, out, tokenizer_dir, resume, force, preset, config_file, overrides):
    """Train the token-by-token baseline (same backbone, softmax head).

    Example: calm-edge train ar --preset small --data runs/shards --out runs/ar
    """
    from calm_edge.training.language_models import train_ar

    config = _training_config(ctx, resume, force, preset, config_file, overrides)
    _echo_lm_summary(train_ar(config, data, out, tokenizer=tokenizer_dir, resume=resume, force=force,
                              progress=_progress(ctx)))


# ----- import ---------------------------------------------------------------------------------


@main.command("import")
@click.option("--calm", "calm_source", required=True, metavar="PATH_OR_ID",
              help="The released CALM model: its downloaded folder, or a Hugging Face id (cccczshao/CALM-M).")
@click.option("--autoencoder", default=None, metavar="PATH_OR_ID",
              help="Its autoencoder: folder or id (cccczshao/CALM-Autoencoder); default: the config's ae_path, "
                   "if that folder exists here.")
@click.option("--tokenizer", default=None, metavar="PATH_OR_ID",
              help="The Llama-3 tokenizer folder (default: the CALM folder's own tokenizer.json).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder to write.")
@click.option("--force", is_flag=True, help="Replace an existing --out.")
def import_command(calm_source, autoencoder, tokenizer, out, force):
    """Import a released CALM model (CALM-M, -L, -XL) and its autoencoder as a calm-edge run.

    Example: calm-edge import --calm downloads/CALM-M --autoencoder downloads/CALM-Autoencoder
    --tokenizer ../shared/data/llama3-tokenizer --out runs/calm-m
    """
    from calm_edge.training.official import import_official

    summary = import_official(calm_source, autoencoder, tokenizer, out=out, force=force)
    click.echo(f"imported CALM ({summary['parameters']:,} parameters, autoencoder "
               f"{summary['autoencoder_parameters']:,}) -> {summary['checkpoint']}")


# ----- evaluation ----------------------------------------------------------------------------


@main.group("eval")
def eval_group():
    """Evaluate trained models."""


@eval_group.command("autoencoder")
@click.option("--checkpoint", required=True, type=click.Path(),
              help="Run folder of `calm-edge train autoencoder` (its newest checkpoint) or one checkpoint folder.")
@text_source_options
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Write the results to this JSON file (default: print them).")
@click.option("--max-tokens", type=COUNT, default=None, help="Evaluate at most this many tokens.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the latent noise.")
@click.pass_context
def eval_autoencoder_command(ctx, checkpoint, text, out, max_tokens, seed):
    """Reconstruction accuracy of an autoencoder, and its accuracy under latent noise.

    Example: calm-edge eval autoencoder --checkpoint runs/ae --data ../shared/data/wikitext103-test-doc.jsonl
    --detokenize wikitext --out ae_eval.json
    """
    from calm_edge.evaluation.autoencoder import evaluate_autoencoder

    result = evaluate_autoencoder(checkpoint, text, max_tokens=max_tokens, seed=seed, progress=_progress(ctx))
    if out is None:
        click.echo(json.dumps(result, indent=2))
        return
    write_json_atomic(out, result)
    noise = ", ".join(f"{r['scale']}: {r['token_accuracy']:.4f}" for r in result["noise_robustness"])
    click.echo(
        f"autoencoder {result['checkpoint']}: {result['tokens_evaluated']:,} tokens, token accuracy "
        f"{result['token_accuracy']:.4f}, chunk accuracy {result['chunk_accuracy']:.4f}; "
        f"under latent noise {{{noise}}} -> {out}"
    )


@eval_group.command("brierlm")
@click.option("--checkpoint", required=True, type=click.Path(),
              help="Run folder of `calm-edge train calm` or `train ar`, or one of its checkpoint folders.")
@text_source_options
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write the results to this JSON file.")
@eval_settings_options
@click.pass_context
def eval_brierlm_command(ctx, checkpoint, text, out, settings):
    """BrierLM (Brier-1..4) of a CALM or AR checkpoint, from two samples per position.

    Example: calm-edge eval brierlm --checkpoint runs/calm --data ../shared/data/wikitext103-test-doc.jsonl
    --detokenize wikitext --out quality.json
    """
    from calm_edge.evaluation.language_model import evaluate_checkpoint

    result = evaluate_checkpoint(checkpoint, text, settings, progress=_progress(ctx))
    if out:
        write_json_atomic(out, result)
    briers = ", ".join(f"Brier-{n} {result[f'brier_{n}']:.4f}" for n in (1, 2, 3, 4))
    other = result.get("other_context")
    shown = (f"; another position's context: Brier-1 {other['brier_1']:.4f} +/- {other['brier_1_stderr']:.4f} "
             f"(true context {result['brier_1']:.4f} +/- {result['brier_1_stderr']:.4f})" if other else "")
    click.echo(f"{result['kind']} {result['checkpoint']}: BrierLM {result['brierlm']:.2f} ({briers}){shown}"
               + (f" -> {out}" if out else ""))


def package_eval_options(command):
    """The options `eval package` and `eval compare` share: the text, the positions, reconstruction, threads."""
    options = [
        text_source_options,
        click.option("--autoencoder", type=click.Path(), default=None,
                     help="CALM: the autoencoder run whose encoder gives the latents for reconstruction accuracy "
                          "(default: the one in the package's provenance, if present)."),
        eval_settings_options,
        click.option("--reconstruction-tokens", type=COUNT, default=None, help="Tokens for reconstruction accuracy at most."),
        click.option("--threads", type=THREADS, default=None, help="ONNX Runtime intra-op threads (default: all cores)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@eval_group.command("package")
@click.option("--package", "package_dir", required=True, type=click.Path(), help="Model package folder.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write the results to this JSON file.")
@package_eval_options
@click.pass_context
def eval_package_command(ctx, package_dir, out, text, autoencoder, settings, reconstruction_tokens, threads):
    """BrierLM of a model package through its ONNX graphs; CALM: also reconstruction by its decoder graph.

    Example: calm-edge eval package --package packages/calm-small-int8 --data ../shared/data/wikitext103-test-doc.jsonl
    --detokenize wikitext --out calm-int8.json
    """
    from calm_edge.evaluation.package import evaluate_model_package

    result = evaluate_model_package(package_dir, text, settings, autoencoder=autoencoder,
                                    reconstruction_tokens=reconstruction_tokens, threads=threads,
                                    progress=_progress(ctx))
    if out:
        write_json_atomic(out, result)
    briers = ", ".join(f"Brier-{n} {result[f'brier_{n}']:.4f}" for n in (1, 2, 3, 4))
    recon = result.get("reconstruction") or {}
    recon_text = (f", reconstruction {recon['token_accuracy']:.4f}" if "token_accuracy" in recon else "")
    click.echo(f"{result['kind']} {result['quantization']} {package_dir}: BrierLM {result['brierlm']:.2f} ({briers})"
               f"{recon_text}" + (f" -> {out}" if out else ""))


@eval_group.command("compare")
@click.argument("packages", nargs=-1, required=True, type=click.Path())
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write the table to this JSON file.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Draw relative BrierLM against decode speed-up to this PNG.")
@click.option("--speed-tokens", type=COUNT, default=128, show_default=True, help="Tokens generated per speed run.")
@click.option("--speed-repeats", type=COUNT, default=5, show_default=True, help="Speed runs per package (median).")
@package_eval_options
@click.pass_context
def eval_compare_command(ctx, packages, out, plot_path, speed_tokens, speed_repeats, text, autoencoder, settings,
                         reconstruction_tokens, threads):
    """Compare PACKAGES (e.g. one model in every quantization mode) against their fp32 package.

    One row per package: sizes, BrierLM, reconstruction accuracy, decode tokens/s at batch 1 on the CPU,
    each also relative to the fp32 package of the same kind.

    Example: calm-edge eval compare packages/calm packages/calm-int8 packages/calm-int4 --data test.jsonl
    --out quantization.json --plot quantization.png
    """
    from calm_edge.evaluation.compare import compare_packages, plot, table

    report = compare_packages(list(packages), text, settings, autoencoder=autoencoder,
                              reconstruction_tokens=reconstruction_tokens, threads=threads, speed_tokens=speed_tokens,
                              speed_repeats=speed_repeats, progress=_progress(ctx))
    if out:
        write_json_atomic(out, report)
    if plot_path:
        plot(report, plot_path)
    click.echo(table(report))


# ----- export ---------------------------------------------------------------------------------


@main.command("export")
@click.option("--calm", "calm_dir", type=click.Path(), default=None, help="CALM run or checkpoint folder to export.")
@click.option("--ar", "ar_dir", type=click.Path(), default=None, help="AR baseline run or checkpoint folder to export.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Package folder to write.")
@click.option("--force", is_flag=True, help="Replace an existing package (only once the new one validated).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the end-to-end validation.")
@click.option("--format", "out_format", type=click.Choice(["onnx", "hf"]), default="onnx", show_default=True,
              help="onnx: calm-edge model package; hf: the AR baseline as a Hugging Face Llama checkpoint (for peer runtimes).")
@click.option("--optimize", is_flag=True,
              help="Apply ONNX Runtime's transformer fusions (RMSNorm) to the backbone / ar graph offline.")
@click.option("--fused-attention", is_flag=True,
              help="Write each layer's attention and rotary embeddings as ONNX Runtime's GroupQueryAttention and "
                   "RotaryEmbedding operators (see README: export).")
@click.option("--decoder-layout", type=click.Choice(["split", "whole"]), default="split", show_default=True,
              help="CALM: split decodes only the tokens a low-temperature step needs (package format 3); whole is "
                   "format 1/2's single decoder graph, for runtimes older than format 3.")
@click.pass_context
def export_command(ctx, calm_dir, ar_dir, out, force, seed, out_format, optimize, fused_attention, decoder_layout):
    """Export a trained CALM or AR model to a validated model package (ONNX graphs + manifest).

    Example: calm-edge export --calm runs/calm --out packages/calm-small

    Example: calm-edge export --ar runs/ar --format hf --out hf/ar-small
    """
    from calm_edge.export.exporter import export_package

    if (calm_dir is None) == (ar_dir is None):
        raise CalmEdgeError("pass exactly one of --calm DIR or --ar DIR")
    if out_format == "hf":
        from calm_edge.export.huggingface import export_hf

        if ar_dir is None:
            raise CalmEdgeError("--format hf exports the token-by-token baseline (a Llama model); pass --ar DIR")
        report = export_hf(ar_dir, out, force=force)
        worst = max(r["max_abs_diff"] for r in report["logits"].values())
        click.echo(f"exported Hugging Face Llama checkpoint -> {out}; transformers' logits differ by at most "
                   f"{worst:.2e}, tokenizer identical on sample text")
        return
    manifest = export_package(calm_dir or ar_dir, out, force=force, kind="calm" if calm_dir else "ar", seed=seed,
                              progress=_progress(ctx), optimize=optimize, fused_attention=fused_attention,
                              decoder_layout=decoder_layout)
    worst = max((r.get("max_abs_diff", 0.0) for cases in manifest.validation["graphs"].values()
                 for outputs in cases.values() for r in outputs.values()), default=0.0)
    sizes = ", ".join(f"{name} {g.total_bytes / 1e6:.1f} MB" for name, g in manifest.graphs.items())
    ties = sum(len(run["sampling_ties"]) for run in manifest.validation["end_to_end"].values())
    same = "generation identical to PyTorch at T=1 and T=1/2" + (
        f" but for {ties} sampling tie(s) within float rounding (see the manifest's validation)" if ties else "")
    click.echo(f"exported {manifest.kind} package -> {out} ({sizes}); largest graph difference {worst:.2e}, {same}")


@main.command("upgrade")
@click.option("--package", "package_dir", required=True, type=click.Path(), help="A CALM package with a whole decoder.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Package folder to write.")
@click.option("--force", is_flag=True, help="Replace an existing package (only once the new one validated).")
@click.pass_context
def upgrade_command(ctx, package_dir, out, force):
    """Rewrite a CALM package's decoder as a split one (format 3), the layout lazy decoding needs.

    The graphs keep their weights and operators (quantized ones too); the new package must decode
    and generate exactly the tokens of the old one before it is written.

    Example: calm-edge upgrade --package models/calm-small-int4 --out packages/calm-small-int4-split
    """
    from calm_edge.export.split_decoder import upgrade_package

    manifest = upgrade_package(package_dir, out, force=force)
    checks = manifest.validation["upgrade"]["identical_to_source"]
    click.echo(f"upgraded {package_dir} -> {out} (format {manifest.format_version}, split decoder: "
               f"decoder {manifest.graphs['decoder'].bytes / 1e6:.1f} MB + head "
               f"{manifest.graphs['decoder_head'].bytes / 1e6:.1f} MB); tokens identical to the original "
               f"({', '.join(checks)})")


# ----- quantization ---------------------------------------------------------------------------


@main.command("quantize")
@click.option("--package", "package_dir", required=True, type=click.Path(), help="The fp32 model package to quantize.")
@click.option("--mode", required=True, metavar="MODE",
              help="int8-dynamic, int8-static (needs --calibration-data), fp16 or int4 (see README: Quantization).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder of the quantized package.")
@click.option("--keep-fp32", "keep_fp32", multiple=True, metavar="GRAPH",
              help="Leave this graph in fp32, e.g. --keep-fp32 decoder (repeatable).")
@click.option("--calibration-data", "calibration_data", multiple=True, metavar="PATH",
              help="Real text (.txt/.jsonl[.gz|.xz], a folder, or prepared shards) to calibrate and validate on.")
@click.option("--calibration-windows", type=click.IntRange(1, 100000), default=32, show_default=True,
              help="Windows of 64 tokens run through the fp32 package for int8-static calibration.")
@click.option("--text-field", default="text", show_default=True, help="JSONL field that holds the text.")
@click.option("--force", is_flag=True, help="Replace an existing --out (only once the new package validated).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the energy-head noise and validation.")
@click.pass_context
def quantize_command(ctx, package_dir, mode, out, keep_fp32, calibration_data, calibration_windows, text_field, force,
                     seed):
    """Quantize a model package's graphs with ONNX Runtime's tools; writes a package of the same format.

    Example: calm-edge quantize --package packages/calm-small --mode int8-dynamic --out packages/calm-small-int8
    """
    from calm_edge.export.quantize import quantize_package
    from calm_edge.export.quantizers import check_mode

    check_mode(mode)
    if calibration_windows < 1:
        raise CalmEdgeError(f"--calibration-windows {calibration_windows} must be at least 1")
    manifest = quantize_package(package_dir, out, mode, keep_fp32=keep_fp32, calibration_data=calibration_data,
                                calibration_windows=calibration_windows, text_field=text_field, force=force, seed=seed,
                                progress=_progress(ctx))
    sizes = ", ".join(f"{name} {manifest.graph_modes[name]} {g.total_bytes / 1e6:.2f} MB"
                      for name, g in manifest.graphs.items())
    generation = manifest.validation["generation"]
    click.echo(f"quantized {manifest.kind} package -> {out} ({sizes}); generation: "
               f"{generation['identical_tokens']} of {generation['tokens']} tokens identical to fp32")


# ----- generation -----------------------------------------------------------------------------


@main.command("generate")
@click.option("--package", "package_dir", type=click.Path(), default=None, help="Model package folder.")
@click.option("--checkpoint", type=click.Path(), default=None,
              help="A CALM or AR training run instead of a package (PyTorch reference; needs the train extra).")
@click.argument("prompt")
@click.option("--max-new-tokens", type=NEW_TOKENS, default=64, show_default=True)
@click.option("--temperature", type=float, default=1.0, show_default=True, help="T = 1/n: 1, 0.5, 0.333, ...")
@click.option("--method", type=click.Choice(["batch", "exact"]), default="batch", show_default=True,
              help="CALM temperature sampling: batch approximation or exact rejection.")
@click.option("--candidates", type=CANDIDATES, default=16, show_default=True, help="Chunks drawn per step by the batch approximation.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--stop", "stop_sequences", multiple=True, help="Stop before this text (repeatable).")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True)
@click.option("--threads", type=THREADS, default=None, help="ONNX Runtime intra-op threads (default: all cores).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
def generate_command(package_dir, checkpoint, prompt, max_new_tokens, temperature, method, candidates, seed,
                     stop_sequences, provider, threads, as_json):
    """Continue PROMPT, streaming the text as each step's tokens arrive.

    Example: calm-edge generate --package models/calm-small-int4 "The history of" --seed 3
    """
    from calm_edge.runtime.generator import GeneratorParams

    if (package_dir is None) == (checkpoint is None):
        raise click.UsageError("pass exactly one of --package PKG or --checkpoint DIR")
    params = GeneratorParams(max_new_tokens=max_new_tokens, temperature=temperature, method=method,
                             candidates=candidates, seed=seed, stop_sequences=tuple(stop_sequences))
    params.check()  # every bound before the package loads or the prompt is echoed
    if package_dir is not None:
        from calm_edge.runtime import Model

        model = Model(package_dir, provider=provider, threads=threads)
    else:
        from calm_edge.export.reference import TorchModel

        model = TorchModel.load(checkpoint)
    if as_json:
        from calm_edge.runtime import generate

        result = generate(model, prompt, params)
        click.echo(json.dumps({"prompt": prompt, "text": result.text, "token_ids": result.token_ids,
                               "stopped_by": result.stopped_by, "seed": seed, "temperature": temperature}))
        return
    from calm_edge.runtime import stream

    click.echo(prompt, nl=False)
    try:
        for piece in stream(model, prompt, params):
            click.echo(piece, nl=False)
    finally:
        click.echo()  # so that an error's line starts on a line of its own, after the streamed text


# ----- serving --------------------------------------------------------------------------------


@main.command("serve")
@click.option("--package", "package_dir", type=click.Path(), required=True, help="Model package folder (CALM or AR).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--max-batch", type=click.IntRange(1, 256), default=16, show_default=True,
              help="Rows of the running batch: requests generated at once.")
@click.option("--max-queue", type=click.IntRange(0, 100000), default=256, show_default=True,
              help="Requests that may wait for a row; beyond them the server answers 429.")
@click.option("--batching", type=click.Choice(["continuous", "static"]), default="continuous", show_default=True,
              help="continuous: requests join the running batch between steps; static: only an empty batch.")
@click.option("--request-timeout", type=click.FloatRange(0, min_open=True), default=600.0, show_default=True,
              help="Seconds a request may take from arrival to its last token; then 504.")
@click.option("--shutdown-timeout", type=click.FloatRange(0), default=30.0, show_default=True,
              help="On SIGTERM, seconds in-flight requests get to finish before they are ended (503).")
@click.option("--model-name", default=None, help="The model id /v1/models reports (default: the package folder's name).")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True)
@click.option("--threads", type=click.IntRange(1, 1024), default=None, help="ONNX Runtime intra-op threads (default: all cores).")
def serve_command(package_dir, host, port, max_batch, max_queue, batching, request_timeout, shutdown_timeout,
                  model_name, provider, threads):
    """Serve a package over the OpenAI API: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics.

    Example: calm-edge serve --package models/calm-small-int4 --port 8000
    """
    from calm_edge.runtime import Model
    from calm_edge.serve.app import serve

    model = Model(package_dir, provider=provider, threads=threads)

    def ready(server):
        click.echo(f"serving {model.kind} package {package_dir} as {model_name or model.path.name} on "
                   f"http://{host}:{port}/v1 (max batch {max_batch}, {batching} batching)", err=True)

    serve(model, host=host, port=port, shutdown_timeout=shutdown_timeout, on_ready=ready, max_batch=max_batch,
          max_queue=max_queue, batching=batching, request_timeout=request_timeout, model_name=model_name)


# ----- benchmarks -----------------------------------------------------------------------------


@main.command("bench")
@click.option("--package", "packages", multiple=True, type=click.Path(),
              help="Model package to measure, CALM or AR (repeatable).")
@click.option("--peer", "peers", multiple=True, type=click.Choice(["optimum", "ort-genai"]),
              help="Also run the AR weights of --hf through optimum or onnxruntime-genai (repeatable).")
@click.option("--hf", "hf_dirs", multiple=True, type=click.Path(file_okay=False),
              help="The AR baseline as a Hugging Face folder (calm-edge export --ar RUN --format hf), for --peer "
                   "(repeatable: each peer runs each folder).")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Report JSON; the CSV and PNG plots are written beside it.")
@click.option("--prompt-lengths", default="64,512", show_default=True, help="Prompt lengths in tokens.")
@click.option("--new-tokens", default="256", show_default=True, help="New tokens per sequence.")
@click.option("--batch-sizes", default="1,4,16", show_default=True)
@click.option("--threads", default="1,2", show_default=True, help="ONNX Runtime intra-op threads.")
@click.option("--temperatures", default="1,1/2", show_default=True, help="T = 1/n values.")
@click.option("--repeats", type=click.IntRange(1, 10000), default=5, show_default=True, help="Timed runs per cell (median, p90, p99).")
@click.option("--warmup", type=click.IntRange(0, 10000), default=1, show_default=True, help="Untimed runs per cell first.")
@click.option("--rounds", type=click.IntRange(1, 1000), default=1, show_default=True,
              help="Times the runners take turns (each with --repeats runs per cell); ratios are then the "
                   "median of the rounds' ratios, robust to the machine's drift.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--candidates", type=CANDIDATES, default=16, show_default=True,
              help="CALM's batch approximation at T < 1: chunks drawn per step.")
@click.option("--text", type=click.Path(dir_okay=False), default=None,
              help="JSONL documents to cut the prompts from (default: built-in prose).")
@click.option("--work-dir", type=click.Path(file_okay=False), default="bench-work", show_default=True,
              help="Peers' converted models and the workers' logs (reused between runs).")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True,
              help="Execution provider of every runner (GPU: see benchmarks/README.md; keep its results apart).")
@click.option("--spinning", type=click.Choice(["default", "off", "run", "on"]), default="default", show_default=True,
              help="How ONNX Runtime's worker threads wait: each runtime's own default (calm-edge run, the "
                   "peers on), or one policy in every runner alike (README: The Python runtime).")
@click.pass_context
def bench_command(ctx, packages, peers, hf_dirs, out, prompt_lengths, new_tokens, batch_sizes, threads, temperatures,
                  repeats, warmup, rounds, seed, candidates, text, work_dir, provider, spinning):
    """Measure latency, throughput and memory of packages and peer runtimes on the same prompts.

    Example: calm-edge bench --package packages/calm-small --package packages/ar-small
    --hf hf/ar-small --peer optimum --peer ort-genai --out benchmarks/results/bench_small.json
    """
    from calm_edge.bench.harness import run_bench

    matrix = {"prompt_lengths": prompt_lengths, "new_tokens": new_tokens, "batch_sizes": batch_sizes,
              "threads": threads, "temperatures": temperatures}
    report = run_bench(packages=packages, peers=peers, hf=hf_dirs, out=out, work_dir=work_dir, repeats=repeats,
                       warmup=warmup, seed=seed, candidates=candidates, text=text, matrix_options=matrix,
                       provider=provider, progress=_progress(ctx), log=log.info,
                       spinning=None if spinning == "default" else spinning, rounds=rounds)
    for runner in report["runners"]:
        if runner["status"] != "ok":
            click.echo(f"{runner['name']}: {runner['status']}: {runner['reason']}", err=True)
    for row in report["comparisons"]:
        if row.get("ratio") is not None and row["cell"].endswith("-T1") and "-b1-" in row["cell"]:
            click.echo(f"{row['cell']}: {row['calm']} / {row['ar']}: {row['ratio']}x decode tokens/s "
                       f"(ideal {row['ideal_ratio']}x)")
    click.echo(f"-> {out} (+ .csv, _throughput.png, _latency.png, _split.png)")


# ----- quickstart -----------------------------------------------------------------------------


@main.command("quickstart")
@click.option("--data", "data", multiple=True, metavar="PATH",
              help="Text to train on: .txt/.jsonl/.jsonl.gz/.jsonl.xz, a folder, or demo:bible (default; repeatable).")
@click.option("--out", default="quickstart", show_default=True, type=click.Path(file_okay=False),
              help="Folder for every stage's outputs, summary.json and summary.png.")
@click.option("--force", is_flag=True, help="Run every stage again, replacing the outputs already in --out.")
@click.option("--max-characters", type=click.IntRange(0), default=None,
              help="Read whole documents of --data up to this many characters (default: the preset's; 0: all).")
@click.option("--text-field", default="text", show_default=True, help="JSONL field that holds the text.")
@config_options
@click.pass_context
def quickstart_command(ctx, data, out, force, max_characters, text_field, preset, config_file, overrides):
    """The whole pipeline in one command: tokenizer, autoencoder, CALM and AR models, packages,
    quantization, BrierLM, samples and a CALM-vs-AR speed benchmark. A re-run skips finished stages.

    Example: calm-edge quickstart --preset tiny --out quickstart
    """
    import dataclasses

    from calm_edge.quickstart import DEFAULT_DATA, QUICKSTART_PRESETS, format_table, run_quickstart

    if max_characters is not None and max_characters < 0:
        raise CalmEdgeError(f"--max-characters {max_characters} must be 0 (all the text) or more")
    settings = QUICKSTART_PRESETS[preset][1]
    if max_characters is not None:
        settings = dataclasses.replace(settings, max_characters=max_characters)
    # Under --quiet only the summary table, the result, is printed; not the line per stage.
    echo = click.echo if _progress(ctx) else (lambda line: None)
    summary = run_quickstart(out, preset, data or DEFAULT_DATA, config_file=config_file, overrides=overrides,
                             settings=settings, text_field=text_field, force=force, progress=_progress(ctx), echo=echo)
    click.echo(format_table(summary))


if __name__ == "__main__":
    main()
