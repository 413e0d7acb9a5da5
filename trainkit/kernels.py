"""Which matmul kernels a decoding step's one-row products run on, chosen by measuring."""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from trainkit.precision import synchronize

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


