"""torchrun's processes: init and teardown, each process's share of a batch, agreeing on a number."""

from __future__ import annotations

import contextlib
import io
import itertools
import os

import torch
import torch.distributed as dist
from torch.utils.data.distributed import DistributedSampler

# More than one process: torchrun and DistributedDataParallel
#
# `torchrun --nproc_per_node=N script.py ...` starts N copies of the script and tells each who it is in
# environment variables: RANK (0 .. WORLD_SIZE-1 over all machines), LOCAL_RANK (which GPU of this machine)
# and WORLD_SIZE. Without torchrun none is set and everything below is a no-op: one process, as before.
# Every process holds the whole model; each runs forward and backward on its own share of the global batch,
# and DistributedDataParallel averages the gradients during backward, so every process takes the same
# optimizer step as one process would on the whole batch.


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: torch.device) -> torch.device:
    """Join the process group torchrun prepared (NCCL between GPUs, gloo on CPUs) and return this process's
    device: cuda:LOCAL_RANK on GPUs. Without torchrun: nothing to join, the device is returned unchanged."""
    if not launched_by_torchrun():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"torchrun: no distributed backend for {device.type}; use --device cuda or cpu")
    # Imported before the group exists, not first by DistributedDataParallel: its functions take
    # group=group.WORLD as a default, evaluated at import, which would keep the group alive after
    # destroy_process_group, and its gloo threads running into the interpreter's exit (a rare SIGABRT there).
    import torch.distributed.nn as _  # noqa: F401  (binds no local `torch`)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0 alone writes files and shows progress; the others would only repeat it."""
    return rank() == 0


def quiet_unless_main():
    """Within it, print() of every process but rank 0 goes nowhere: one copy of each line, not N."""
    if is_main():
        return contextlib.nullcontext()
    return contextlib.redirect_stdout(io.StringIO())


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (downloads, tokenizing into the datasets cache), then the others, which find
    the cache filled, so no two processes write the same cache file at once. (If rank 0 fails, torchrun stops
    the others.)"""
    if not is_main():
        dist.barrier()
    yield
    if is_main() and world_size() > 1:
        dist.barrier()


def per_process_batch(global_batch: int) -> int:
    """Each process's share of a global batch; the flags give the global batch whatever the process count."""
    if global_batch % world_size():
        raise ValueError(f"the batch of {global_batch} does not split evenly over {world_size()} processes; "
                         f"use a --batch-size divisible by {world_size()}")
    return global_batch // world_size()


def local_share(*batches: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """This process's rows of each global batch: process r of N takes the r-th of N equal blocks, so no row is
    used twice and all rows are used once."""
    n = world_size()
    return tuple(b.chunk(n)[rank()] if n > 1 else b for b in batches)


class EpochSampler(DistributedSampler):
    """torch's DistributedSampler (this process's share of a shuffle seeded by seed + epoch; set_epoch before
    each epoch) that hands out (epoch, index) pairs, so a dataset can seed each item's augmentation by both,
    and that can begin an epoch part-way (`start`, in this process's items) for a resumed run.

    Process r of N takes the shuffled indices r, r + N, r + 2N, ...; its k-th batch of B/N indices and the
    other processes' k-th batches together hold exactly the k-th batch of B of one process."""

    def __init__(self, n_items: int, seed: int) -> None:
        super().__init__(range(n_items), num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed,
                         drop_last=True)
        self.start = 0

    def __iter__(self):
        return ((self.epoch, i) for i in itertools.islice(super().__iter__(), self.start, None))

    def __len__(self) -> int:
        return super().__len__() - self.start


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The module to call in training: DistributedDataParallel around `model` under torchrun (it shares the
    parameters, so `model` itself still serves evaluation and checkpoints), `model` itself otherwise."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def sync_gradients(model: torch.nn.Module, now: bool):
    """DDP all-reduces the gradients in every backward; while accumulating micro-batches only the last backward
    of a step needs to (model.no_sync() skips the others). Put the backward inside this context."""
    if now or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def same_on_all(obj):
    """Rank 0's value of a picklable object on every process: for a choice made by measuring (the precision on a
    CPU), which could come out differently in each process."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _collective_device() -> torch.device:
    # NCCL moves CUDA tensors only; gloo CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """A few numbers combined over all processes ("sum" or "max"), the same answer on every one. Anything that
    decides whether to stop goes through here, so all processes stop at the same step and none waits forever
    at a collective the others have left. One process: the values unchanged."""
    if world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def shard_rows(n: int) -> slice:
    """The rows of an n-row job that this process does (every N-th row, from its rank)."""
    return slice(rank(), n, world_size())


def gather_rows(local: torch.Tensor, n: int) -> torch.Tensor:
    """The whole n-row result on every process, from each process's rows shard_rows(n) (summed into zeros)."""
    if world_size() == 1:
        return local
    full = torch.zeros((n, *local.shape[1:]), dtype=local.dtype, device=_collective_device())
    full[shard_rows(n)] = local.to(full.device)
    dist.all_reduce(full)
    return full.to(local.device)


