"""Plumbing that both training scripts need and that no lesson teaches.

    Precision       which arithmetic a run uses (fp32, bf16 or fp16 autocast), chosen by measuring
    Decoding        which matmul kernels a decoding step's one-row products run on, chosen by measuring
    Distributed     torchrun's processes: init/teardown, each process's share of a batch, agreeing on a number
    Stop and resume SIGINT/SIGTERM as a request to stop after the step, atomic saves, RNG states, resume checks
    Pictures        loss and accuracy curves, attention maps over images: PNGs written atomically

The lessons (transformer.py, llama.py) import what they need from here; a student reads one lesson file and
can treat this module as a library.
"""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import math
import os
import random
import signal
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch.utils.data.distributed import DistributedSampler

# ----------------------------------------------------------------------------------------------------
# Precision: fp32, or autocast to bf16 / fp16
#
# Autocast runs matmuls and convolutions in a 16-bit type while weights, the optimizer and reductions stay in
# fp32. bf16 keeps fp32's exponent range, so nothing else changes. fp16 has 5 exponent bits: small gradients
# underflow to zero unless the loss is multiplied by a large factor before backward and the gradients divided
# by it afterwards (loss scaling; Micikevicius et al., 2018), which `torch.amp.GradScaler` does, skipping any
# step whose gradients overflowed.

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    name: str  # "fp32" | "bf16" | "fp16"
    device_type: str  # "cpu" | "cuda" | "mps"
    reason: str  # why this one, printed and written to metrics.json

    @property
    def dtype(self) -> Optional[torch.dtype]:
        """The autocast dtype; None for plain fp32."""
        return AUTOCAST_DTYPES[self.name]

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling for fp16; for fp32 and bf16 a disabled scaler whose calls pass straight through."""
        return torch.amp.GradScaler(self.device_type, enabled=self.name == "fp16")

    def describe(self) -> str:
        return f"precision: {self.name} ({self.reason})"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer reads when it finished (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def matmul_timer(dtype: Optional[torch.dtype], shape: tuple[int, int, int], device: torch.device):
    """A function that times one (m, k) @ (k, n) product of fp32 tensors, plain (dtype None) or under autocast
    to `dtype`, which includes the casts autocast makes, as in training; it returns seconds."""
    m, k, n = shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device)
    b = torch.randn(k, n, generator=gen).to(device)
    ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def time_once() -> float:
        t0 = time.perf_counter()
        with ctx:
            a @ b
        synchronize(device)
        return time.perf_counter() - t0

    time_once()  # the first call pays for kernel selection and allocation
    return time_once


def matmul_speed(dtype: Optional[torch.dtype], shape: tuple[int, int, int], device: torch.device,
                 seconds: float = 0.1) -> float:
    """Measured FLOP/s of an (m, k) @ (k, n) matmul, fp32 or under autocast to `dtype` (see matmul_timer): the
    best of repeated timings, what the hardware does when nothing else is running."""
    time_once, deadline = matmul_timer(dtype, shape, device), time.perf_counter() + seconds
    best = min(time_once() for _ in range(3))
    while time.perf_counter() < deadline:
        best = min(best, time_once())
    return 2 * shape[0] * shape[1] * shape[2] / best


def median_ratio(time_a, time_b, seconds: float, min_pairs: int = 5) -> float:
    """time_a() / time_b(), the two called in turn, pair after pair for about `seconds`; the median of the
    pairs' ratios. A busy moment of the machine slows one call of a pair, not the verdict."""
    ratios, deadline = [], time.perf_counter() + seconds
    while len(ratios) < min_pairs or (time.perf_counter() < deadline and len(ratios) < 1000):
        ratios.append(time_a() / time_b())
    return statistics.median(ratios)


@functools.lru_cache(maxsize=None)
def cpu_bf16_speedup(shape: tuple[int, int, int], seconds: float = 0.2) -> float:
    """bf16 autocast's speed over fp32 for a matmul of this shape on this CPU, measured once per process."""
    cpu = torch.device("cpu")
    return median_ratio(matmul_timer(None, shape, cpu), matmul_timer(torch.bfloat16, shape, cpu), seconds)


# bf16 must beat fp32 by this much on the probe to be chosen: a training step also pays for casts and for
# elementwise work that bf16 does not speed up, so a matmul that is barely faster makes a step that is not.
CPU_BF16_MARGIN = 1.1


def choose_precision(flag: str, device: torch.device, matmul_shape: tuple[int, int, int] = (1024, 256, 1024)) -> Precision:
    """What `--precision flag` means on this device.

    auto on CUDA: bf16 from compute capability 8.0 (Ampere), where it is native; fp16 with loss scaling on
    7.x (V100, T4, RTX 20xx), whose tensor cores do fp16 but emulate bf16; fp32 below. auto on a CPU: a matmul
    shaped like the model's is timed in fp32 and in bf16 autocast (about 0.2 s) and the faster is used; CPU
    flags such as avx512_bf16 do not tell, as some CPUs that report them run bf16 slower. auto on Apple MPS:
    fp32 (fp16 autocast there is untested by this course; ask for it with --precision fp16).
    """
    if flag not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {flag!r}")
    kind = device.type
    if flag != "auto":
        note = "asked for with --precision"
        if kind == "cuda" and flag == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
            note += "; this GPU emulates bf16, so it is slow here"
        return Precision(flag, kind, note)
    if kind == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        cap = f"compute capability {major}.{minor}"
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return Precision("bf16", kind, f"{cap}: native bf16")
        if major >= 7:
            return Precision("fp16", kind, f"{cap}: fp16 tensor cores, bf16 only emulated; with loss scaling")
        return Precision("fp32", kind, f"{cap}: no fast 16-bit matmuls")
    if kind == "cpu":
        ratio = cpu_bf16_speedup(tuple(matmul_shape))
        shape = "x".join(map(str, matmul_shape))
        if ratio >= CPU_BF16_MARGIN:
            return Precision("bf16", kind, f"bf16 autocast measured {ratio:.2f}x fp32 on this CPU, {shape} matmul")
        return Precision("fp32", kind, f"bf16 autocast measured {ratio:.2f}x fp32 on this CPU, {shape} matmul")
    return Precision("fp32", kind, f"the default on {kind}; try --precision fp16")


# ----------------------------------------------------------------------------------------------------
# Decoding kernels: the products of a few rows by the weight matrices
#
# A decoding step of a batch of one multiplies a single row by every weight matrix: it reads each matrix once
# and is bound by memory, not arithmetic. Which kernel does that fastest depends on the CPU and the dtype.
# PyTorch hands bf16 matmuls on a CPU to oneDNN, whose per-call cost dominates such small products; with
# oneDNN switched off, PyTorch's own matrix-vector kernel runs them (on one AMD EPYC, 256x256: 22 us through
# oneDNN, 9 us without). From two rows on, PyTorch's own bf16 kernel is the slower one. And the output
# matrix (vocab x dim) may be read faster transposed. So the choice is measured, once per process.


@contextlib.contextmanager
def onednn(enabled: Optional[bool]):
    """PyTorch's oneDNN matmuls on (True) or off (False) inside, the setting before restored after; None leaves
    it alone."""
    if enabled is None:
        yield
        return
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


@dataclass(frozen=True)
class RowKernels:
    """How a decoding step's products of `rows` rows by the weight matrices run fastest on this machine."""
    onednn: Optional[bool]  # on a CPU, PyTorch's default oneDNN matmuls (True) or its own kernels; else None
    transposed_output: bool  # read the output matrix as a (dim, vocab) copy instead of as nn.Linear stores it
    ms_per_step: dict  # (onednn, transposed_output) -> measured milliseconds of a step's products

    def active(self):
        """oneDNN on or off for the products inside, as chosen; the setting before is restored after."""
        return onednn(self.onednn)

    @staticmethod
    def name(key: tuple[Optional[bool], bool]) -> str:
        """A short name for a (onednn, transposed_output) candidate."""
        kernels = {True: "oneDNN, ", False: "own, ", None: ""}[key[0]]
        return kernels + ("transposed" if key[1] else "as stored")

    def describe(self) -> str:
        best = self.ms_per_step[(self.onednn, self.transposed_output)]
        kernels = {True: "oneDNN, ", False: "PyTorch's own (oneDNN off), ", None: ""}[self.onednn]
        layout = "transposed" if self.transposed_output else "as stored"
        others = ", ".join(f"{self.name(k)} {ms:.2f} ms" for k, ms in self.ms_per_step.items()
                           if k != (self.onednn, self.transposed_output))
        return (f"decoding kernels: {kernels}output matrix {layout} ({best:.2f} ms of matrix products per step, "
                f"measured; {others})")


_ROW_KERNELS: dict[tuple, RowKernels] = {}


@torch.no_grad()
def fastest_row_kernels(layer: Sequence[torch.Tensor], n_layers: int, output: torch.Tensor, rows: int = 1,
                        repeats: int = 5) -> RowKernels:
    """Time one decoding step's products, `rows` rows times each of one layer's weight matrices (counted
    n_layers times) and times the output matrix, with oneDNN on and off (CPU only) and the output matrix in
    both layouts; return the fastest. Measured once per process for each device, dtype, shapes and rows.

    The candidates take turns, round after round, so a busy moment of the machine hits all alike; a candidate
    more than three times as slow as the best in the first round is not timed again (on one machine, bf16
    with oneDNN off read the transposed output matrix 15 times slower than as stored). PyTorch's defaults
    (oneDNN on, the matrix as stored) are kept unless another candidate is more than 5% faster.
    """
    output = output.detach()
    device, dtype = output.device, output.dtype
    key = (str(device), dtype, tuple(tuple(w.shape) for w in layer), n_layers, tuple(output.shape), rows)
    if key in _ROW_KERNELS:
        return _ROW_KERNELS[key]
    gen = torch.Generator(device="cpu").manual_seed(0)
    inputs = [torch.randn(rows, w.shape[1], generator=gen).to(device, dtype) for w in layer]
    h = torch.randn(rows, output.shape[1], generator=gen).to(device, dtype)
    output_t = output.t().contiguous()
    switchable = device.type == "cpu" and torch.backends.mkldnn.is_available()
    candidates = [(onednn, transposed) for onednn in ((True, False) if switchable else (None,))
                  for transposed in (False, True)]

    def step_seconds(use_onednn: Optional[bool], transposed: bool) -> float:
        with onednn(use_onednn):
            synchronize(device)
            t0 = time.perf_counter()
            for x, w in zip(inputs, layer):
                torch.nn.functional.linear(x, w.detach())
            synchronize(device)
            t1 = time.perf_counter()
            if transposed:
                h @ output_t
            else:
                torch.nn.functional.linear(h, output)
            synchronize(device)
            return n_layers * (t1 - t0) + time.perf_counter() - t1

    for candidate in candidates:  # the first call of each pays for kernel selection and allocation
        step_seconds(*candidate)
    times = {c: [step_seconds(*c)] for c in candidates}
    fastest = min(t[0] for t in times.values())
    timed = [c for c in candidates if times[c][0] <= 3 * fastest]
    for _ in range(repeats - 1):
        for candidate in timed:
            times[candidate].append(step_seconds(*candidate))
    ms = {c: 1e3 * statistics.median(times[c]) for c in candidates}
    _ROW_KERNELS[key] = RowKernels(*first_within(ms, timed), ms)
    return _ROW_KERNELS[key]


# A candidate within this factor of the fastest counts as a tie; ties go to PyTorch's defaults, so that noise
# does not flip the choice from one process to the next.
KERNEL_TIE = 1.05


def first_within(ms: dict, order: Sequence) -> tuple:
    """The first key of `order` whose time in `ms` is within KERNEL_TIE of the fastest of them."""
    fastest = min(ms[k] for k in order)
    return next(k for k in order if ms[k] <= KERNEL_TIE * fastest)


# ----------------------------------------------------------------------------------------------------
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
    import torch.distributed.nn  # noqa: F401
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


# ----------------------------------------------------------------------------------------------------
# Stopping cleanly and resuming
#
# A cluster that preempts a job, or `docker stop`, sends SIGTERM and a few seconds later SIGKILL; Ctrl-C sends
# SIGINT. Both only raise a flag here: the training loop finishes its step, all processes agree to stop
# (all_reduce), rank 0 saves the `last` checkpoint, and the script exits with 128 + the signal's number
# (130 for SIGINT, 143 for SIGTERM), as a shell reports a process killed by that signal.


class StopRequest:
    """Between stop = StopRequest().install() and stop.remove() (or within `with StopRequest() as stop:`), SIGINT
    and SIGTERM set stop.signum instead of ending the process.

    A second Ctrl-C stops at once (KeyboardInterrupt), except under torchrun, which passes the terminal's
    Ctrl-C on to its processes a second time. Handlers can only be set from the main thread; elsewhere the
    context does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict = {}

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def remove(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    def _handle(self, signum, frame) -> None:
        if self.signum and signum == signal.SIGINT and not launched_by_torchrun():
            raise KeyboardInterrupt
        self.signum = self.signum or signum
        # os.write, not print: a signal may arrive in the middle of another print to the same stream.
        os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step and saving the last "
                    f"checkpoint\n".encode())


def exit_code(signum: int) -> int:
    """128 + the signal's number: 130 after Ctrl-C (SIGINT), 143 after SIGTERM."""
    return 128 + signum


def atomic_save(obj, path) -> None:
    """torch.save into a temporary file beside `path`, flushed to the disk, then renamed over `path`. A rename
    within one folder is atomic, so a crash or `kill -9` at any moment leaves the previous file or the new one,
    never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def last_checkpoint_path(best: str | Path) -> Path:
    """Where the `last` checkpoint (for --resume) lives beside the best one: model.pth -> model.last.pth."""
    best = Path(best)
    return best.with_name(f"{best.stem}.last{best.suffix or '.pth'}")


def rng_state() -> dict:
    """Every random number generator a training step draws from (dropout, augmentations, MixUp...), as tensors
    and plain values, so the state loads with torch.load(weights_only=True)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's GPU
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(_as_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def _as_tuples(x):
    # random.setstate wants the nested tuples getstate gave; a round trip through some loaders makes lists.
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def resume_changes(saved: dict, now: dict, may_change: tuple[str, ...] = ()) -> list[str]:
    """Compare the settings a run is resumed with against the ones it was saved with. A setting outside
    `may_change` that differs raises ValueError naming it (the run would no longer be the one that was
    stopped); those that may change come back as 'name: old -> new' lines to print."""
    changes = []
    for key in now:
        if key in saved and saved[key] != now[key]:
            if key not in may_change:
                raise ValueError(f"{key} was {saved[key]!r} in the run being resumed and is {now[key]!r} now; "
                                 f"resume with the same {key}, or start a new run without --resume")
            changes.append(f"{key}: {saved[key]!r} -> {now[key]!r}")
    return changes


# ----------------------------------------------------------------------------------------------------
# Pictures: PNGs of the training curves and of attention maps
#
# Figures are drawn with matplotlib's object-oriented API on an Agg canvas of their own, never through pyplot,
# so importing a lesson does not change the backend of a notebook or a desktop session that uses matplotlib.
# Each file is written to a temporary name and renamed, so an image viewer that refreshes it during training
# never sees half a PNG.


def smooth(values: Sequence[float], beta: float = 0.9) -> list[float]:
    """Exponential moving average with the bias correction of Adam (Kingma & Ba, 2015): s_t = beta s_{t-1} +
    (1 - beta) x_t, divided by 1 - beta^t so the first points are not pulled towards zero."""
    out, s = [], 0.0
    for t, x in enumerate(values, start=1):
        s = beta * s + (1.0 - beta) * x
        out.append(s / (1.0 - beta ** t))
    return out


def new_figure(width: float, height: float):
    """A matplotlib Figure on its own Agg canvas (pyplot and its global backend stay untouched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: Path | str, dpi: int = 110) -> Path:
    """Write fig as a PNG: to path + '.tmp' first, then renamed over path (atomic on one file system)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=dpi)
    os.replace(tmp, path)
    return path


def plot_lm_curves(path: Path | str, train: Sequence[tuple[int, float]], val: Sequence[tuple[int, float]],
                   title: str = "", train_label: str = "training loss") -> Path:
    """Language-model curves against tokens seen: left the training loss (each step, faint, and smoothed)
    with the validation loss, right the validation perplexity exp(loss) on a log scale.

    train: (tokens seen, training loss) per step; val: (tokens seen, validation loss) per validation."""
    from matplotlib.ticker import EngFormatter, FuncFormatter, LogLocator, NullFormatter

    fig = new_figure(11, 4.2)
    ax_loss, ax_ppl = fig.subplots(1, 2)
    if train:
        x, y = zip(*train)
        ax_loss.plot(x, y, color="tab:blue", alpha=0.25, linewidth=0.8, label=f"{train_label}, each step")
        ax_loss.plot(x, smooth(y), color="tab:blue", linewidth=1.8, label=f"{train_label}, smoothed")
    if val:
        vx, vy = zip(*val)
        ax_loss.plot(vx, vy, "o-", color="tab:orange", markersize=4, label="validation loss")
        ppl = [math.exp(v) for v in vy]
        ax_ppl.plot(vx, ppl, "o-", color="tab:orange", markersize=4,
                    label=f"validation perplexity (best {min(ppl):,.1f})")
        ax_ppl.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:,.0f}")  # 700, not 7 x 10^2
        ax_ppl.yaxis.set_major_formatter(plain)
        ax_ppl.yaxis.set_minor_locator(LogLocator(subs=(2, 3, 5)))
        # label the 2, 3, 5 ticks too when the curve spans little more than a decade, else they crowd
        ax_ppl.yaxis.set_minor_formatter(plain if max(ppl) / min(ppl) < 30 else NullFormatter())
    ax_loss.set_ylabel("cross-entropy (nats per token)")
    ax_loss.set_title("loss")
    ax_ppl.set_ylabel("perplexity (log scale)")
    ax_ppl.set_title("validation perplexity")
    for ax in (ax_loss, ax_ppl):
        ax.xaxis.set_major_formatter(EngFormatter())
    return finish_curves(fig, (ax_loss, ax_ppl), "tokens seen", title, path)


def plot_classifier_curves(path: Path | str, history: Sequence[dict], title: str = "", train_note: str = "") -> Path:
    """Classifier curves per epoch from rows with epoch, train_loss, train_accuracy and val_accuracy: left the
    training loss, right the training and validation accuracy (in %). Past 30 epochs the validation accuracy,
    noisy on a small set, is drawn faint with its moving average over it. train_note: how the training
    figures were measured, added to their labels (e.g. on MixUp/CutMix batches)."""
    from matplotlib.ticker import MaxNLocator

    fig = new_figure(11, 4.2)
    ax_loss, ax_acc = fig.subplots(1, 2)
    note = f" ({train_note})" if train_note else ""
    if history:
        epochs = [h["epoch"] for h in history]
        few = len(history) <= 30
        marker = dict(marker="o", markersize=3) if few else {}
        ax_loss.plot(epochs, [h["train_loss"] for h in history], color="tab:blue", linewidth=1.2,
                     label="training loss" + note, **marker)
        ax_acc.plot(epochs, [100 * h["train_accuracy"] for h in history], color="tab:blue", linewidth=1.2,
                    label="training accuracy" + note, **marker)
        val = [100 * h["val_accuracy"] for h in history]
        if few:
            ax_acc.plot(epochs, val, color="tab:orange", linewidth=1.2, label="validation accuracy", **marker)
        else:
            ax_acc.plot(epochs, val, color="tab:orange", linewidth=0.8, alpha=0.35, label="validation accuracy")
            ax_acc.plot(epochs, smooth(val), color="tab:orange", linewidth=1.8,
                        label="validation accuracy, smoothed")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.set_title("training loss")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_title("accuracy")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return finish_curves(fig, (ax_loss, ax_acc), "epoch", title, path)


def finish_curves(fig, axes, xlabel: str, title: str, path: Path | str) -> Path:
    """What every curve picture has: the x label, a light grid, a legend where something was drawn, the
    title; then it is saved."""
    for ax in axes:
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


def plot_attention_maps(path: Path | str, images, maps: dict, titles: Sequence[str] = (), title: str = "") -> Path:
    """One row per image: the image, then each map laid over it as a heat map.

    images: uint8 (B, 3, H, W); maps: column title -> (B, h, w) non-negative weights over a grid of patches,
    each scaled to [0, 1] per image and stretched to the image's size; titles: one line per row."""
    import torch.nn.functional as F

    n = images.shape[0]
    H, W = images.shape[-2:]
    cols = 1 + len(maps)
    fig = new_figure(2.3 * cols, 2.3 * n + 0.4)
    axes = fig.subplots(n, cols, squeeze=False)
    for c, (name, m) in enumerate(maps.items(), start=1):
        m = m.detach().float().cpu()
        lo = m.flatten(1).min(1).values.view(-1, 1, 1)
        hi = m.flatten(1).max(1).values.view(-1, 1, 1)
        m = (m - lo) / (hi - lo).clamp_min(1e-12)
        m = F.interpolate(m[:, None], size=(H, W), mode="bilinear", align_corners=False)[:, 0]
        for r in range(n):
            ax = axes[r][c]
            ax.imshow(images[r].permute(1, 2, 0).cpu().numpy())
            ax.imshow(m[r].numpy(), cmap="inferno", alpha=0.6, vmin=0, vmax=1)
            if r == 0:
                ax.set_title(name, fontsize=9)
    for r in range(n):
        ax = axes[r][0]
        ax.imshow(images[r].permute(1, 2, 0).cpu().numpy())
        if r < len(titles):
            ax.set_title(titles[r], fontsize=9)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
