"""Which arithmetic a run uses: fp32, or autocast to bf16 / fp16, chosen by measuring."""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from dataclasses import dataclass
from typing import Optional

import torch

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



def for_model(flag: str, device: torch.device, tokens: int, dim: int, hidden: int) -> Precision:
    """choose_precision for a model whose largest matmul takes `tokens` rows from width `dim` to `hidden` (a
    batch of tokens through the MLP's first layer); it prints what it chose, so every run says so."""
    precision = choose_precision(flag, device, (tokens, dim, hidden))
    print(precision.describe())
    return precision
