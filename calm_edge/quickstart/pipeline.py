"""`calm-edge quickstart`: the whole pipeline in one command, resumable stage by stage.

    run_quickstart("quickstart", preset_name="tiny")          # on the embedded demo corpus

Stages, in order, each in its own folder of `out` and finished when its marker exists
(`stages.py`):

  corpus        corpus/corpus.json             a slice of --data (default demo:bible) as JSONL
  tokenizer     tokenizer/tokenizer.json       SentencePiece on the slice
  data          shards/index.json              token shards, a share of documents held out
  autoencoder   autoencoder/reconstruction.json  training, then reconstruction of the held-out text
  calm          calm/run_summary.json          CALM on the frozen autoencoder
  ar            ar/run_summary.json            the token-by-token baseline
  export-calm   packages/calm/manifest.json    validated model packages
  export-ar     packages/ar/manifest.json
  quantize      packages/calm-int8/manifest.json  CALM with int8 graphs (needs the quantize extra)
  evaluate      eval/brierlm.json              BrierLM of every package through the runtime
  generate      samples.json                   a few continuations per package
  benchmark     benchmark.json                 decode tokens/s per package, CALM / AR speed-up

then the summary (`report.py`): summary.json, summary.png and a printed table.

The slice. Training cost depends on the step counts, not on the corpus size, but reading and
tokenizing do: a large --data (a Wikipedia dump) would cost minutes before the first step. So
the quickstart reads whole documents up to `max_characters` of text per preset, and trains the
tokenizer and the models on that. The quickstart's settings of the tiny preset, chosen so that
the whole run stays well under 10 minutes on a 2-core CPU, are in `QUICKSTART_PRESETS`.

Resuming. A killed run loses at most the stage it was in, and a training stage not even that:
it continues from its newest checkpoint. `force` runs every stage again from scratch. The run's
settings (preset, config, data, slice) are kept in `quickstart.json`; a re-run with other
settings into the same folder is refused rather than mixing two runs' outputs.
"""
import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from calm_edge.config import Config, preset
from calm_edge.corpus import expand_sources, is_valid_document, iter_documents
from calm_edge.data import prepare_shards
from calm_edge.errors import CalmEdgeError, ConfigError, DataError
from calm_edge.evaluation.autoencoder import evaluate_autoencoder
from calm_edge.evaluation.package import evaluate_model_package
from calm_edge.evaluation.settings import EvalSettings
from calm_edge.export.exporter import export_package
from calm_edge.export.quantize import quantize_package
from calm_edge.fileio import atomic_output_dir, check_apart, output_lock, reporting_os_errors, write_json_atomic
from calm_edge.quickstart.report import write_summary
from calm_edge.quickstart.stages import Stage, is_finished, run_stages
from calm_edge.runtime import GeneratorParams, Model, generate
from calm_edge.runtime.profiling import measure
from calm_edge.text_source import TextSource
from calm_edge.tokenizer import train_tokenizer
from calm_edge.training import checkpoint
from calm_edge.training.autoencoder import train_autoencoder
from calm_edge.training.language_models import train_ar, train_calm

log = logging.getLogger(__name__)

SETTINGS_FILE = "quickstart.json"
DEFAULT_DATA = ("demo:bible",)


@dataclass
class QuickstartSettings:
    """What the quickstart does beyond the model config: slice, evaluation, samples, benchmark."""

    max_characters: int = 2_000_000  # text read from --data (whole documents); 0: all of it
    valid_fraction: float = 0.02  # documents held out for validation and evaluation
    min_valid_tokens: int = 2_000
    reconstruction_tokens: int = 50_000  # held-out tokens the autoencoder reconstructs
    eval_positions: int = 256  # BrierLM positions per package
    eval_context: int = 128  # tokens of context before each position
    eval_stride: int = 32
    quantization: str = "int8-dynamic"
    sample_prompts: tuple = ("In the beginning", "And the king said", "The river")
    sample_tokens: int = 48
    bench_prompt_tokens: int = 32
    bench_new_tokens: int = 128
    bench_repeats: int = 5  # rounds; the median is kept (tiny models: a round takes well under a second)
    threads: int = 0  # ONNX Runtime threads for evaluation and benchmark; 0: one per core
    # torch threads for training, autoencoder evaluation and export; 0: torch's default (one per
    # core). Models as small as the tiny preset's gain little from a second thread, and on a busy
    # machine threads that wait for each other make a run many times slower (measured here: a
    # tiny autoencoder step took 25 s with two threads, 0.3 s with one).
    torch_threads: int = 0
    seed: int = 0

    def to_dict(self):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def outputs_dict(self):
        """The settings that change what the stages produce: all but thread counts."""
        return {k: v for k, v in self.to_dict().items() if k not in ("threads", "torch_threads")}


# The quickstart's own settings per preset: config overrides applied on top of the preset (before
# the user's --config/--set), and the settings above.
# tiny: a 32-dimensional latent instead of the preset's 16 and 500 autoencoder steps instead of
# 300: measured on the demo corpus, the preset's autoencoder reconstructs only 68 % of held-out
# tokens after 300 steps (with latent dropout 0.15, 16 dimensions leave too little redundancy to
# learn quickly), which would make every CALM figure after it meaningless. CALM and AR keep the
# preset's 300 steps. One thread for torch and for ONNX Runtime (see torch_threads).
# Measured on this 2-core CPU, idle: the whole tiny quickstart on demo:bible in 69 s (46 s user
# CPU): autoencoder 24 s, CALM 27 s, AR 13 s, everything else 3 s. While the CPU was shared with
# a priority training job the same run took 18 minutes. At 300 steps both language models are
# too weak for a BrierLM above 0 (their Brier-2..4 are 0), so the summary also shows Brier-1;
# there is time left in the budget for more CALM and AR steps (not measured yet).
QUICKSTART_PRESETS = {
    "tiny": (["autoencoder.latent_size=32", "train_autoencoder.max_steps=500"],
             QuickstartSettings(torch_threads=1, threads=1)),
    "small": ([], QuickstartSettings(max_characters=0, valid_fraction=0.01, eval_positions=1000, eval_context=256,
                                     bench_new_tokens=256)),
    "base": ([], QuickstartSettings(max_characters=0, valid_fraction=0.01, eval_positions=2000, eval_context=512,
                                    bench_new_tokens=256)),
}


def quickstart_config(preset_name, config_file=None, overrides=()):
    """The preset, then the quickstart's overrides of it, then the user's --config and --set."""
    config = preset(preset_name).with_overrides(QUICKSTART_PRESETS[preset_name][0])
    if config_file is not None:
        config = Config.load(config_file, base=config)
    return config.with_overrides(overrides)


@dataclass
class Run:
    """Everything the stages need: the config, the data, the settings, and where outputs go."""

    out: Path
    preset_name: str
    config: object
    data: tuple
    settings: QuickstartSettings
    text_field: str = "text"

    @property
    def threads(self):
        return self.settings.threads or os.cpu_count()

    def path(self, *parts):
        return self.out.joinpath(*parts)

    @property
    def held_out(self):
        """The held-out documents of the token shards (their valid split): evaluation and benchmark text."""
        return TextSource((self.path("shards"),), split="valid")

    @property
    def package_names(self):
        """The packages the later stages use: calm and ar, and calm-int8 when quantization is installed."""
        names = ["calm", "ar"]
        if quantization_missing() is None:
            names.append(f"calm-{self.settings.quantization.split('-')[0]}")
        return names

    def describe(self):
        """What `quickstart.json` records, and what a re-run must match."""
        return {"preset": self.preset_name, "data": [str(d) for d in self.data], "text_field": self.text_field,
                "config": self.config.to_dict(), "settings": self.settings.outputs_dict()}


def quantization_missing():
    """None when the quantize stage can run, else why not: ONNX Runtime's quantizers need the quantize extra."""
    missing = [module for module in ("onnx", "onnx_ir") if importlib.util.find_spec(module) is None]
    if missing:
        return f"quantization needs {', '.join(missing)}: pip install 'calm-edge[quantize]'"
    return None


# ----- the stages ----------------------------------------------------------------------------


def _corpus(run, ctx):
    """Whole documents of --data up to max_characters, as JSONL, with counts in corpus.json."""
    limit = run.settings.max_characters
    documents, characters, held_out, truncated = 0, 0, 0, False
    with atomic_output_dir(ctx.folder, force=True, what="corpus slice") as tmp:
        with open(tmp / "corpus.jsonl", "w", encoding="utf-8") as f:
            for document in iter_documents(run.data, text_field=run.text_field, progress=ctx.progress,
                                           desc="reading"):
                if not document.text.strip():
                    continue
                text = document.text
                if limit and characters + len(text) > limit:
                    truncated = True
                    if documents:
                        break
                    text = text[:limit]  # one huge document (a whole .txt file): keep its start
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                documents += 1
                characters += len(text)
                held_out += is_valid_document(text, run.settings.valid_fraction)
        if documents == 0:
            raise DataError(f"no text found in {', '.join(map(str, run.data))}; give the quickstart a non-empty --data")
        if held_out == 0:
            raise DataError(
                f"the quickstart holds out {run.settings.valid_fraction:.0%} of the documents for evaluation, but the "
                f"{documents} documents read from {', '.join(map(str, run.data))} leave none; give more documents "
                "(a .jsonl file with one document per line, or a folder of .txt files)"
            )
        write_json_atomic(tmp / "corpus.json", {
            "sources": [str(d) for d in run.data], "documents": documents, "characters": characters,
            "held_out_documents": held_out, "max_characters": limit, "truncated": truncated,
        })
    return f"{documents:,} documents, {characters:,} characters"


def _tokenizer(run, ctx):
    info = train_tokenizer([run.path("corpus", "corpus.jsonl")], ctx.folder, run.config.tokenizer, force=True,
                           progress=ctx.progress)
    return f"{info['vocab_size']:,} pieces"


def _data(run, ctx):
    result = prepare_shards([run.path("corpus", "corpus.jsonl")], run.path("tokenizer"), ctx.folder,
                            valid_fraction=run.settings.valid_fraction, workers=run.threads, force=True,
                            progress=ctx.progress)
    valid = result["splits"]["valid"]["tokens"]
    if valid < run.settings.min_valid_tokens:
        # Checked here as well as in the corpus stage: a few very short documents may be held out.
        shutil.rmtree(ctx.folder)
        raise DataError(f"only {valid} tokens of {', '.join(map(str, run.data))} were held out for evaluation (at "
                        f"least {run.settings.min_valid_tokens} needed); give the quickstart more or longer documents")
    return f"{result['splits']['train']['tokens']:,} train / {valid:,} held-out tokens"


@contextlib.contextmanager
def _torch_threads(run):
    """Run torch with the quickstart's thread count, then give the caller's setting back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(run.settings.torch_threads or threads)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _train(run, ctx, train, *inputs):
    """Train one model into the stage folder: continue from its newest checkpoint unless forced."""
    resume = bool(checkpoint.list_checkpoints(ctx.folder)) and not ctx.force
    if resume:
        log.info("continuing %s from its newest checkpoint", ctx.folder)
    try:
        with _torch_threads(run):
            return train(run.config, *inputs, ctx.folder, resume=resume, force=not resume, progress=ctx.progress)
    except ConfigError as e:
        raise ConfigError(f"{e}; or pass --force to run the quickstart again from scratch") from None


def _autoencoder(run, ctx):
    _train(run, ctx, train_autoencoder, run.path("shards"))
    with _torch_threads(run):
        report = evaluate_autoencoder(ctx.folder, run.held_out, max_tokens=run.settings.reconstruction_tokens,
                                      seed=run.settings.seed, progress=ctx.progress)
    write_json_atomic(ctx.folder / "reconstruction.json", report)
    return f"token reconstruction {report['token_accuracy']:.2%} on held-out text"


def _calm(run, ctx):
    summary = _train(run, ctx, train_calm, run.path("autoencoder"), run.path("shards"))
    return f"step {summary['step']}"


def _ar(run, ctx):
    summary = _train(run, ctx, train_ar, run.path("shards"))
    return f"step {summary['step']}"


def _export(kind):
    def export(run, ctx):
        with _torch_threads(run):
            manifest = export_package(run.path(kind), ctx.folder, force=True, kind=kind, seed=run.settings.seed,
                                      progress=ctx.progress)
        return f"{manifest.total_graph_bytes / 1e6:.2f} MB of graphs"
    return export


def _quantize(run, ctx):
    manifest = quantize_package(run.path("packages", "calm"), ctx.folder, run.settings.quantization, force=True,
                                calibration_data=[run.path("shards")], seed=run.settings.seed,
                                progress=ctx.progress)
    return f"{manifest.total_graph_bytes / 1e6:.2f} MB of graphs"


def _evaluate(run, ctx):
    """BrierLM of each package on the held-out text; a package's report is kept, so a re-run continues."""
    s = run.settings
    reports = {}
    for name in run.package_names:
        path = ctx.folder / f"{name}.json"
        manifest = run.path("packages", name, "manifest.json")
        # A report is reused only if it is newer than the package it scored.
        if path.is_file() and not ctx.force and path.stat().st_mtime >= manifest.stat().st_mtime:
            reports[name] = json.loads(path.read_text(encoding="utf-8"))
        else:
            settings = EvalSettings(context=s.eval_context, stride=s.eval_stride, max_positions=s.eval_positions,
                                    seed=s.seed)
            reports[name] = evaluate_model_package(
                run.path("packages", name), run.held_out, settings, autoencoder=run.path("autoencoder"),
                reconstruction_tokens=s.reconstruction_tokens, threads=run.threads, progress=ctx.progress)
            write_json_atomic(path, reports[name])
        ctx.advance(note=f"{name}: BrierLM {reports[name]['brierlm']:.2f}")
    write_json_atomic(ctx.folder / "brierlm.json", {
        "data": "the held-out documents of shards/ (valid split)",
        "packages": {name: {k: r[k] for k in ("brierlm", "brier_1", "brier_2", "brier_3", "brier_4")}
                     for name, r in reports.items()}})


def _generate(run, ctx):
    s = run.settings
    params = GeneratorParams(max_new_tokens=s.sample_tokens, temperature=1.0, seed=s.seed)
    samples = {}
    for name in run.package_names:
        model = Model(run.path("packages", name), threads=run.threads)
        results = generate(model, list(s.sample_prompts), params)
        samples[name] = [{"prompt": r.prompt, "text": r.text, "stopped_by": r.stopped_by} for r in results]
        ctx.advance(note=name)
    write_json_atomic(run.path("samples.json"), {"temperature": 1.0, "seed": s.seed,
                                                 "max_new_tokens": s.sample_tokens, "samples": samples})


def _benchmark(run, ctx):
    """Decode tokens/s of each package at batch 1 (T = 1) on a held-out prompt, as benchmarks/runtime.py measures it.

    The packages take turns, one generation each per round, so that a change in the machine's
    load (other work on a shared CPU) hits all of them alike rather than one; each package's
    figure is its median round.
    """
    s = run.settings
    models, prompts = {}, {}
    for name in run.package_names:
        models[name] = Model(run.path("packages", name), threads=run.threads)
        tokens, _ = run.held_out.load_tokens(models[name].tokenizer, max_tokens=s.bench_prompt_tokens)
        prompts[name] = tokens.tolist()
        measure(models[name], prompts[name], GeneratorParams(max_new_tokens=8, seed=s.seed, stop_at_eos=False), 1)
    params = GeneratorParams(max_new_tokens=s.bench_new_tokens, seed=s.seed, stop_at_eos=False)
    rounds = {name: [] for name in models}
    for _ in range(s.bench_repeats):
        for name, model in models.items():
            rounds[name].append(measure(model, prompts[name], params, 1))
    results = {}
    for name, model in models.items():
        by_speed = sorted(rounds[name], key=lambda r: r["decode_tokens_per_second"])
        median = by_speed[len(by_speed) // 2]
        results[name] = {"kind": model.kind, "chunk_size": model.chunk_size, **median,
                         "all_rounds_tokens_per_second": [r["decode_tokens_per_second"] for r in rounds[name]]}
        del results[name]["all_runs_seconds"]  # one run per round: the rounds' figures say it
        ctx.advance(note=f"{name}: {median['decode_tokens_per_second']:.0f} tokens/s")
    write_json_atomic(run.path("benchmark.json"), {
        "provider": "cpu", "batch": 1, "temperature": 1.0, "threads": run.threads, "cpu_cores": os.cpu_count(),
        "prompt_tokens": s.bench_prompt_tokens, "new_tokens": s.bench_new_tokens, "rounds": s.bench_repeats,
        "packages": results,
        "definition": "tokens after the first step / their time (calm_edge.runtime.timing); the median of rounds "
                      "in which the packages take turns",
    })


def build_stages(run):
    """The quickstart's stages, in order, bound to `run`."""
    int8 = f"calm-{run.settings.quantization.split('-')[0]}"
    names = set(run.package_names)

    def covers(key):
        # Evaluation, samples and benchmark are redone when there is a package they lack.
        return lambda marker: set(marker[key]) == names

    def bound(function):
        return lambda ctx: function(run, ctx)

    return [
        Stage("corpus", "slice of the text", "corpus", "corpus/corpus.json", bound(_corpus)),
        Stage("tokenizer", "SentencePiece tokenizer", "tokenizer", "tokenizer/tokenizer.json", bound(_tokenizer)),
        Stage("data", "token shards", "shards", "shards/index.json", bound(_data)),
        Stage("autoencoder", "autoencoder + reconstruction", "autoencoder", "autoencoder/reconstruction.json",
              bound(_autoencoder)),
        Stage("calm", "CALM model", "calm", "calm/run_summary.json", bound(_calm)),
        Stage("ar", "AR baseline", "ar", "ar/run_summary.json", bound(_ar)),
        Stage("export-calm", "CALM package", "packages/calm", "packages/calm/manifest.json", bound(_export("calm"))),
        Stage("export-ar", "AR package", "packages/ar", "packages/ar/manifest.json", bound(_export("ar"))),
        Stage("quantize", f"CALM {run.settings.quantization}", f"packages/{int8}", f"packages/{int8}/manifest.json",
              bound(_quantize), available=quantization_missing()),
        Stage("evaluate", "BrierLM through the runtime", "eval", "eval/brierlm.json", bound(_evaluate),
              items=len(names), check=covers("packages")),
        Stage("generate", "samples", ".", "samples.json", bound(_generate), items=len(names),
              check=covers("samples")),
        Stage("benchmark", "decode tokens/s", ".", "benchmark.json", bound(_benchmark), items=len(names),
              check=covers("packages")),
    ]


# ----- the command ---------------------------------------------------------------------------


def _check_same_run(run, stages, force):
    """Refuse to mix two runs' outputs: once a stage has finished, a re-run must have its settings."""
    path = run.path(SETTINGS_FILE)
    mine = run.describe()
    if path.is_file() and not force:
        try:
            theirs = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            raise CalmEdgeError(f"{path} is corrupt; pass --force to run the quickstart again from scratch") from None
        differences = [key for key in mine if theirs.get(key) != mine[key]]
        # Before any stage finished there is nothing to mix: a run that failed on a wrong --data
        # path can simply be started again with the right one.
        if differences and any(is_finished(run.out, stage) for stage in stages):
            raise CalmEdgeError(
                f"{run.out} holds a quickstart run with other {' and '.join(differences)}; pass --force to replace it, "
                "or choose another --out"
            )
    elif not path.is_file() and any(run.out.iterdir()) and not force:
        raise CalmEdgeError(f"{run.out} is not empty and holds no quickstart run; choose another --out, "
                            "or pass --force to use it anyway")
    write_json_atomic(path, mine)


def run_quickstart(out, preset_name="tiny", data=DEFAULT_DATA, config_file=None, overrides=(), settings=None,
                   text_field="text", force=False, progress=True, echo=print, after_stage=None):
    """Run (or continue) the quickstart into folder `out`; returns the summary dict.

    echo: prints one line per stage (done, skipped, not available); the caller prints the
    summary table (`report.format_table`).

    settings: a QuickstartSettings replacing the preset's (tests use a very small one).
    after_stage: see `stages.run_stages`.
    """
    if preset_name not in QUICKSTART_PRESETS:
        raise ConfigError(f"unknown preset {preset_name!r}; choose one of: {', '.join(QUICKSTART_PRESETS)}")
    config = quickstart_config(preset_name, config_file, overrides)
    run = Run(Path(out), preset_name, config, tuple(data) or DEFAULT_DATA, settings or QUICKSTART_PRESETS[preset_name][1],
              text_field)
    if run.out.exists() and not run.out.is_dir():
        raise CalmEdgeError(f"--out {run.out} is a file; give a folder for the quickstart's outputs")
    expand_sources(run.data)  # a wrong --data path fails here, before anything is written
    check_apart(run.out, {"--data": list(run.data)})
    with output_lock(run.out):  # two quickstarts into one folder would mix their stages
        with reporting_os_errors(run.out):
            run.out.mkdir(parents=True, exist_ok=True)
        stages = build_stages(run)
        _check_same_run(run, stages, force)
        results = run_stages(stages, run.out, force=force, progress=progress, echo=echo,
                             after_stage=after_stage)
        return write_summary(run, results)
