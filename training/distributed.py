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
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from calm_edge.errors import CalmEdgeError


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
