"""Plumbing that both training scripts need and that no lesson teaches.

    Precision       which arithmetic a run uses (fp32, bf16 or fp16 autocast), chosen by measuring
    Pictures        loss and accuracy curves, attention maps over images: PNGs written atomically

The lessons (transformer.py, llama.py) import what they need from here; a student reads one lesson file and
can treat this module as a library.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

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


def matmul_speed(dtype: Optional[torch.dtype], shape: tuple[int, int, int], device: torch.device,
                 seconds: float = 0.1) -> float:
    """Measured FLOP/s of an (m, k) @ (k, n) product of fp32 tensors, plain (dtype None) or under autocast to
    `dtype`, which includes the casts autocast makes, as in training. The best of repeated timings within
    `seconds`, so a busy moment on a shared machine does not decide."""
    m, k, n = shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device)
    b = torch.randn(k, n, generator=gen).to(device)
    ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def run():
        with ctx:
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    run()  # the first call pays for kernel selection and allocation
    best, deadline = float("inf"), time.perf_counter() + seconds
    for i in range(100):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
        if i >= 2 and time.perf_counter() > deadline:
            break
    return 2 * m * k * n / best


@functools.lru_cache(maxsize=None)
def cpu_bf16_speedup(shape: tuple[int, int, int]) -> float:
    """bf16 autocast's speed over fp32 for a matmul of this shape on this CPU, measured once per process.

    fp32 and bf16 are timed in alternation, twice each, and each keeps its best, so a moment when the other
    core is busy does not decide."""
    cpu = torch.device("cpu")
    fp32 = max(matmul_speed(None, shape, cpu, 0.05), matmul_speed(None, shape, cpu, 0.05))
    bf16 = max(matmul_speed(torch.bfloat16, shape, cpu, 0.05), matmul_speed(torch.bfloat16, shape, cpu, 0.05))
    return bf16 / fp32


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
        ax.set_xlabel("tokens seen")
        ax.xaxis.set_major_formatter(EngFormatter())
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


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
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
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
