"""The training loop that every model shares (autoencoder, CALM, AR baseline).

A model plugs in by its `forward(batch)`: given an int64 tensor of token windows
[batch_size, seq_len] it returns `(loss, metrics)`, a scalar loss to minimise and a dict of
scalar tensors to log (an `accuracy` entry is shown on the progress bar). `model.train()` /
`model.eval()` switch its training-only randomness on and off.

What the loop does, from the run's TrainConfig section:

- AdamW with (beta1, beta2); weight decay only on matrices (parameters with 2+ dimensions),
  never on norms and biases;
- learning rate: linear warmup to `lr` over `warmup_steps`, then cosine decay to
  `lr * min_lr_ratio` at `max_steps`;
- `grad_accum_steps` batches per optimizer step, gradients clipped to norm `grad_clip`,
  optional bfloat16 autocast, optional `torch.compile` (`compile`), the fused AdamW on CUDA;
- every `log_every` steps a "train" record (averaged over the steps since the last one, with
  tokens/s and model FLOPs utilisation: training/throughput.py), every
  `eval_every` steps and at the end a "valid" record over `eval_batches` fixed batches of the
  data's valid split; both go to metrics.jsonl and curves.png (see metrics.py);
- every `save_every` steps and at the end a checkpoint (see checkpoint.py) holding weights,
  config, optimizer, RNG states and the data loader's position, so that `resume=True` continues
  with exactly the batches, randomness and step count of an uninterrupted run. A resumed run
  may change only its own training section (say, a larger `max_steps`: the cosine then
  stretches to the new end from where it is); the data order settings must stay;
- under `torchrun`, data parallelism: each process trains its share of every step's
  micro-batches, and the run is the one a single process would train, with a whole copy of the
  model in each process or (`fsdp`) a shard of it (training/distributed.py).
"""
import contextlib
import logging
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from calm_edge import flops
from calm_edge.data import TokenShards, WindowLoader
from calm_edge.errors import CalmEdgeError, ConfigError
from calm_edge.fileio import check_apart, output_lock
from calm_edge.training import checkpoint, distributed
from calm_edge.training.metrics import MetricsLog
from calm_edge.training.throughput import Throughput, peak_flops

log = logging.getLogger(__name__)


def learning_rate(step, settings):
    """The learning rate for optimizer step `step` (0-based): linear warmup, then cosine decay."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    decay_steps = max(1, settings.max_steps - settings.warmup_steps)
    progress = min(1.0, (step - settings.warmup_steps) / decay_steps)
    floor = settings.lr * settings.min_lr_ratio
    return floor + (settings.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def parameter_groups(model):
    """The trained parameters as (name, parameter): matrices (weights, embeddings) first, then vectors
    (norms, biases). The optimizer's order, by which its saved state is indexed."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return [[(n, p) for n, p in named if p.dim() >= 2], [(n, p) for n, p in named if p.dim() < 2]]


def make_optimizer(model, settings, device=torch.device("cpu")):
    """AdamW that decays matrices but not vectors; on CUDA one fused kernel updates them all."""
    matrices, vectors = parameter_groups(model)
    groups = [
        {"params": [p for _, p in matrices], "weight_decay": settings.weight_decay},
        {"params": [p for _, p in vectors], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(settings.beta1, settings.beta2),
                             fused=device.type == "cuda")


class Trainer:
    """Trains `build_model(config)` on the token shards in `data`, writing the run to `out`.

    kind: the model kind recorded in checkpoints ("autoencoder", "calm", "ar").
    section: the config section with this run's TrainConfig ("train_autoencoder", ...).
    files: {name: path} copied into every checkpoint (the tokenizer).
    inputs: {option: path} the run also reads (the frozen autoencoder), beside `data` and `files`:
    `out` must be apart from all of them (`fileio.check_apart`).
    """

    def __init__(self, kind, build_model, config, section, data, out, files=None, progress=True, inputs=None):
        self.kind, self.build_model, self.config, self.section = kind, build_model, config, section
        self.settings = getattr(config, section)
        self.out = Path(out)
        self.files = dict(files or {})
        self.inputs = {"--data": data, "--tokenizer": list(self.files.values()), **(inputs or {})}
        self.world = distributed.world_from_environment()  # one process, or one rank of a torchrun job
        self.progress = progress and self.world.is_main
        self.shards = TokenShards(data)
        self.device = distributed.device_of(self.world)
        self.metrics = MetricsLog(self.out)
        self.chunk_size = config.autoencoder.chunk_size

    # ----- the run ---------------------------------------------------------------------------

    def run(self, resume=False, force=False):
        """Train to `max_steps` (from the newest checkpoint when `resume`). Returns a summary.

        One run at a time writes a run folder: a second is refused while this one holds its lock.
        In a torchrun job every rank trains and rank 0 alone writes (training/distributed.py).
        """
        check_apart(self.out, self.inputs)
        distributed.start(self.world, self.device)
        with contextlib.ExitStack() as held:
            def claim():  # rank 0's: the lock for the whole run, then the folder checked against --resume/--force
                held.enter_context(output_lock(self.out))
                return self._prepare_out(resume, force)

            resume_from = distributed.from_main(self.world, claim)
            return self._run(resume_from)

    def _run(self, resume_from):
        s = self.settings
        torch.manual_seed(s.seed)  # the same initial weights in every rank
        self.model = self.build_model(self.config).to(self.device)
        self.loader = WindowLoader(self.shards, "train", s.seq_len, s.batch_size, seed=s.seed,
                                   chunk_size=self.chunk_size)
        self.step, self.tokens_seen, self.elapsed = 0, 0, 0.0
        self.last_valid = {}
        saved_state = self._restore(resume_from) if resume_from is not None else None
        # The optimizer's parameter names, taken before FSDP (if on) shards the model in place.
        self.parameter_names = [name for group in parameter_groups(self.model) for name, _ in group]
        # Gradients averaged over the ranks at the last micro-batch of each step (training/distributed.py).
        self.parallel = distributed.parallelize(self.model, self.world, s.fsdp)
        self.optimizer = make_optimizer(self.model, s, self.device)
        if saved_state is not None:
            distributed.load_optimizer_state(self.model, self.optimizer, saved_state["optimizer"],
                                             self.parameter_names)
        self.forward = torch.compile(self.parallel) if s.compile else self.parallel
        self.meter = Throughput(flops.training_flops_per_token(self.config, self.kind),
                                peak_flops(self.device, s.peak_flops) * self.world.size, self.tokens_seen)
        if self.step >= s.max_steps:
            log.info("%s is already at step %d of %d; nothing to train", self.out, self.step, s.max_steps)
        if self.shards.tokens("valid") < s.seq_len:
            log.warning("%s has fewer than %d valid tokens: no validation; prepare it with --valid-fraction > 0",
                        self.shards.folder, s.seq_len)

        self.model.train()
        started = time.perf_counter() - self.elapsed
        sums, count = {}, 0
        bar = tqdm(total=s.max_steps, initial=self.step, desc=f"train {self.kind}", unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        try:
            while self.step < s.max_steps:
                for name, value in self._train_step().items():
                    sums[name] = sums.get(name, 0.0) + value
                count += 1
                self.step += 1
                self.elapsed = time.perf_counter() - started
                bar.update(1)
                last = self.step == s.max_steps
                if self.step % s.log_every == 0 or last:
                    record = {name: total / count for name, total in sums.items()}
                    record.update(self.meter.since_last(self.tokens_seen))
                    self._log("train", record)
                    bar.set_postfix(self._postfix(record), refresh=False)
                    sums, count = {}, 0
                if self.step % s.eval_every == 0 or last:
                    self.last_valid = self._validate()
                    if self.last_valid:
                        self._log("valid", self.last_valid)
                    if self.world.is_main:
                        self.metrics.plot(f"{self.kind}: {self.out.name}")
                if self.step % s.save_every == 0 or last:
                    self._save()  # every rank takes part (FSDP gathers the state), rank 0 writes
                if self.step % s.eval_every == 0 or self.step % s.save_every == 0:
                    self.meter.restart(self.tokens_seen)
        finally:
            bar.close()
        distributed.barrier(self.world)  # every rank sees the last checkpoint
        latest = checkpoint.list_checkpoints(self.out)
        return {
            "kind": self.kind,
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "elapsed_seconds": round(self.elapsed, 2),
            "parameters": sum(p.numel() for p in self.model.parameters()),  # whole sizes, also under FSDP
            "valid": self.last_valid,
            "checkpoint": str(latest[-1]) if latest else None,
        }

    def _train_step(self):
        s = self.settings
        lr = learning_rate(self.step, s)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sums = {}
        world, accum = self.world, s.grad_accum_steps
        for micro in range(accum):
            # Global micro-batch index (training/distributed.py): this rank's share of the step's
            # accum * world micro-batches, its data and its randomness fixed by the index alone.
            index = (self.step * accum + micro) * world.size + world.rank
            self.loader.skip(world.rank)
            batch = torch.from_numpy(self.loader.next_batch()).to(self.device)
            self.loader.skip(world.size - 1 - world.rank)
            torch.manual_seed(distributed.micro_batch_seed(s.seed, index))
            with distributed.gradient_sync(self.parallel, micro == accum - 1):
                with self._autocast():
                    loss, metrics = self.forward(batch)
                (loss / accum).backward()
            self.tokens_seen += batch.numel() * world.size
            sums["loss"] = sums.get("loss", 0.0) + loss.item()
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + float(value)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # under FSDP, a norm over every rank's shards
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        record = distributed.mean_over_ranks(world, {name: total / accum for name, total in sums.items()}, self.device)
        return {**record, "grad_norm": float(grad_norm), "lr": lr}

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.settings.bf16)

    @torch.no_grad()
    def _validate(self):
        """Mean metrics over the first `eval_batches` batches of the valid split (the same each time)."""
        s = self.settings
        if self.shards.tokens("valid") < s.seq_len:
            return {}
        loader = WindowLoader(self.shards, "valid", s.seq_len, s.batch_size, chunk_size=self.chunk_size,
                              shuffle=False)
        batches = min(s.eval_batches, max(1, math.ceil(loader.num_windows / s.batch_size)))
        self.model.eval()
        sums = {}
        # Validation must not move the training RNG, or a run with other eval settings diverges;
        # its own randomness is seeded alike in every rank, so its figures do not depend on the world.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(s.seed)
            for _ in range(batches):
                batch = torch.from_numpy(loader.next_batch()).to(self.device)
                with self._autocast():
                    loss, metrics = self.model(batch)
                sums["loss"] = sums.get("loss", 0.0) + loss.item()
                for name, value in metrics.items():
                    sums[name] = sums.get(name, 0.0) + float(value)
        self.model.train()
        return {name: total / batches for name, total in sums.items()}

    def _log(self, split, values):
        record = {"step": self.step, "split": split, **{k: round(v, 6) for k, v in values.items()},
                  "tokens": self.tokens_seen, "elapsed_seconds": round(self.elapsed, 2)}
        if self.world.is_main:
            self.metrics.append(record)

    @staticmethod
    def _postfix(record):
        shown = {"loss": f"{record['loss']:.4f}"}
        if "accuracy" in record:
            shown["acc"] = f"{record['accuracy']:.4f}"
        return shown

    # ----- checkpoints -----------------------------------------------------------------------

    def _prepare_out(self, resume, force):
        """Check the output folder against --resume / --force. Returns the checkpoint to resume."""
        if resume:
            newest = checkpoint.newest_to_resume(self.out)
            checkpoint.remove_leftovers(self.out)
            return newest
        existing = checkpoint.list_checkpoints(self.out)
        if not existing and self.metrics.path.exists():
            # A run stopped before its first checkpoint: nothing can resume it, so it is started
            # over (refusing would leave --resume and a plain run each pointing at the other).
            log.info("%s holds no checkpoint of an earlier run (it stopped before its first); starting over", self.out)
        if existing or self.metrics.path.exists():
            if existing and not force:
                raise CalmEdgeError(
                    f"{self.out} already holds a training run; pass --resume to continue it or --force to start over"
                )
            for folder in existing:
                checkpoint.remove_folder(folder)
            for path in (self.metrics.path, self.metrics.plot_path):
                path.unlink(missing_ok=True)
        checkpoint.remove_leftovers(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        return None

    def _save(self):
        weights, optimizer_state = distributed.whole_state(self.model, self.optimizer)
        if not self.world.is_main:
            return
        state = {
            "optimizer": optimizer_state,
            "torch_rng": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        info = {
            "tokens_seen": self.tokens_seen,
            "elapsed_seconds": round(self.elapsed, 3),
            "data": str(self.shards.folder.resolve()),
            "data_tokenizer_sha256": self.shards.index["tokenizer"]["sha256"],
            "loader": self.loader.state_dict(),
            "valid": self.last_valid,
            "world_size": self.world.size,
        }
        folder = checkpoint.save_checkpoint(self.out, self.step, self.kind, self.config, self.model, info, state,
                                            files=self.files, weights=weights)
        log.info("saved %s", folder)

    def _restore(self, folder):
        """Weights, data position, counters and RNG from `folder`; returns its trainer state, whose
        optimizer state is loaded once the optimizer exists."""
        saved = checkpoint.load_checkpoint(folder, self.kind)
        _check_resume_info(saved.trainer, folder)
        self._check_same_model(saved)
        checkpoint.load_weights_into(self.model, saved)
        state = checkpoint.load_trainer_state(folder)
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        info = saved.trainer
        if info.get("data_tokenizer_sha256") != self.shards.index["tokenizer"]["sha256"]:
            raise CalmEdgeError(
                f"{folder} was trained on data tokenized by another tokenizer than {self.shards.folder}; "
                "resume with the same --data"
            )
        self.loader.load_state_dict(info["loader"])
        self.step, self.tokens_seen = int(info["step"]), int(info["tokens_seen"])
        self.elapsed = float(info["elapsed_seconds"])
        self.last_valid = info.get("valid", {})
        if self.world.is_main:
            self.metrics.keep_until(self.step)
        log.info("resumed %s at step %d", folder, self.step)
        return state

    def _check_same_model(self, saved):
        """Resuming may change the run's own training section (e.g. more steps), nothing else."""
        mine, theirs = self.config.to_dict(), saved.config.to_dict()
        for section, values in mine.items():
            if section.startswith("train_"):
                continue
            for key, value in values.items():
                if theirs[section][key] != value:
                    raise ConfigError(
                        f"cannot resume {saved.folder}: it was trained with {section}.{key}={theirs[section][key]!r} "
                        f"but this run has {value!r}; resume with the same --preset/--config/--set (or none, "
                        "to reuse the checkpoint's config)"
                    )
        for key in ("batch_size", "seq_len", "seed"):
            ours, old = getattr(self.settings, key), theirs[self.section][key]
            if ours != old:
                raise ConfigError(
                    f"cannot resume {saved.folder}: it was trained with {self.section}.{key}={old!r} but this run "
                    f"has {ours!r}; the data order depends on it, so resume with the same value"
                )
        # Micro-batches per step over all ranks fix the data order (training/distributed.py); the
        # world size may change if grad_accum_steps changes with it.
        world = saved.trainer.get("world_size", 1)
        old_accum = theirs[self.section]["grad_accum_steps"]
        if old_accum * world != self.settings.grad_accum_steps * self.world.size:
            raise ConfigError(
                f"cannot resume {saved.folder}: it took {old_accum} x {world} micro-batches per step "
                f"(grad_accum_steps x processes), this run {self.settings.grad_accum_steps} x {self.world.size}; the "
                f"data order depends on it: choose grad_accum_steps so that the product is {old_accum * world}")


def _check_resume_info(info, folder):
    """The keys of trainer.json a resume reads, each of its type, so a damaged file names its key."""
    expected = {"step": int, "tokens_seen": int, "elapsed_seconds": (int, float), "loader": dict}
    if "world_size" in info:  # since data parallelism (older checkpoints: one process)
        expected["world_size"] = int
    for key, kind in expected.items():
        value = info.get(key)
        if isinstance(value, bool) or not isinstance(value, kind) or (not isinstance(value, dict) and value < 0):
            raise CalmEdgeError(f"{folder / checkpoint.TRAINER_FILE}: {key} is {value!r}; the checkpoint is damaged "
                                "or edited, resume from an intact one or start over with --force")
