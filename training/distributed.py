"""Data parallelism on PyTorch's own engine: what one process of a `torchrun` job is and does.

    torchrun --nproc_per_node 2 -m calm_edge.cli train ar --data runs/shards --out runs/ar

torchrun starts N copies of the command and tells each its RANK, WORLD_SIZE and LOCAL_RANK in
the environment (several machines: the same command with torchrun's --nnodes and rendezvous
options on each). A process without them is a world of one, and everything here is then a
no-op, so the trainer has one code path.

The trainer keeps one rule that makes N processes train exactly what one process trains: the
run is a sequence of *micro-batches* with global indices 0, 1, 2, ... (the window loader's
order, the same in every process), optimizer step t consumes indices t*M .. t*M + M - 1 where
M = grad_accum_steps * world size, process r takes every world-size-th of them starting at r,
and each micro-batch's randomness (masking, latent noise, energy-head noise) is seeded by its
global index alone (`micro_batch_seed`). So 2 processes with grad_accum_steps 1 compute the same
gradients as 1 process with grad_accum_steps 2 (up to float summation order), and a run
resumed at another world size with the same M continues with the very batches and randomness
it would have had.

Each process holds a whole copy of the weights (DistributedDataParallel), or with the training
section's `fsdp` a 1/N shard of weights, gradients and optimizer state (PyTorch's FSDP,
`fully_shard`: each backbone block gathers its weights only while it runs). Checkpoints are the
same files either way: whole weights and optimizer state, gathered to rank 0, which writes them.
"""
import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from calm_edge.errors import CalmEdgeError
from calm_edge.models.backbone import Block


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank `rank` of `size`, `local_rank` on its machine."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self):
        """Rank 0, the one process that writes (checkpoints, metrics, plots, summaries)."""
        return self.rank == 0

    @property
    def parallel(self):
        return self.size > 1


def world_from_environment(environ=os.environ):
    """The World torchrun describes in `environ`, or a world of one."""
    values = {}
    for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
        text = environ.get(name, str(default))
        if not text.isdigit():
            raise CalmEdgeError(f"environment variable {name}={text!r} is not a whole number; start the job with "
                                "torchrun, which sets it")
        values[name] = int(text)
    world = World(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])
    if world.size < 1 or world.rank >= world.size:
        raise CalmEdgeError(f"RANK={world.rank} with WORLD_SIZE={world.size}: the rank must be below the world "
                            "size; start the job with torchrun")
    return world


def device_of(world):
    """The process's device: its own GPU (LOCAL_RANK) where CUDA is, else the CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return torch.device("cpu")


def start(world, device):
    """Join the job's process group (NCCL on GPUs, gloo on CPUs), once per process."""
    if world.parallel and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def barrier(world):
    if world.parallel:
        dist.barrier()


def mean_over_ranks(world, values, device):
    """{name: float}, each averaged over the ranks (every rank must pass the same names)."""
    if not world.parallel or not values:
        return values
    names = sorted(values)
    packed = torch.tensor([float(values[n]) for n in names], dtype=torch.float64, device=device)
    dist.all_reduce(packed)
    return {n: float(v) / world.size for n, v in zip(names, packed.tolist())}


def from_main(world, compute):
    """Run `compute()` on rank 0 alone and give every rank its result; a CalmEdgeError it raises is
    raised on every rank, so no rank waits forever for one that stopped."""
    if not world.parallel:
        return compute()
    outcome = [None, None]
    if world.is_main:
        try:
            outcome = [compute(), None]
        except CalmEdgeError as e:
            outcome = [None, str(e)]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        raise CalmEdgeError(outcome[1])
    return outcome[0]


def micro_batch_seed(seed, index):
    """The torch seed of global micro-batch `index` of a run seeded `seed` (the same at any world size)."""
    return (seed * 1_000_003 + index) % (2**63 - 1)


# ----- the model across the processes --------------------------------------------------------


def parallelize(model, world, shard):
    """What the trainer calls for a forward pass: `model` itself in a world of one; else wrapped in
    DistributedDataParallel, or (`shard`) sharded in place by FSDP and returned. Under FSDP the
    optimizer must be made afterwards, from the sharded parameters."""
    if not world.parallel:
        return model
    if not shard:
        return DistributedDataParallel(model)
    for module in model.modules():
        if isinstance(module, Block):
            fully_shard(module)
    fully_shard(model)
    return model


def gradient_sync(wrapped, sync):
    """The context of one micro-batch's forward and backward: its gradients averaged over the ranks
    when `sync` (the step's last micro-batch), else only added up locally."""
    if isinstance(wrapped, DistributedDataParallel):
        return contextlib.nullcontext() if sync else wrapped.no_sync()
    if isinstance(wrapped, FSDPModule):
        wrapped.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def whole_state(model, optimizer):
    """(weights, optimizer state) whole, for a checkpoint. Under FSDP they are gathered from every
    rank, so every rank must call this, and rank 0 alone receives them (the others get empty dicts);
    the optimizer state is then keyed by parameter name, not by index."""
    if not isinstance(model, FSDPModule):
        return model.state_dict(), optimizer.state_dict()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=options),
            get_optimizer_state_dict(model, optimizer, options=options))


def load_optimizer_state(model, optimizer, state, names):
    """Load a checkpoint's whole optimizer state, whichever way it was written (by index, or by
    name under FSDP) and whether `model` is sharded now or not. `names`: the parameter names in the
    optimizer's order (an index-keyed state is renamed with them)."""
    by_name = all(isinstance(key, str) for key in state["state"])
    if not by_name and not isinstance(model, FSDPModule):
        optimizer.load_state_dict(state)
        return
    if not by_name:
        state = {"state": {names[index]: values for index, values in state["state"].items()},
                 "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                                  for group in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
