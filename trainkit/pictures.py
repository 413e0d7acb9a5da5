"""Pictures: loss and accuracy curves, attention maps and predictions over images, as PNGs written atomically."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence


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
        validated = [h for h in history if h["val_accuracy"] is not None]  # not every epoch is validated
        val_epochs, val = [h["epoch"] for h in validated], [100 * h["val_accuracy"] for h in validated]
        if len(validated) <= 30:
            ax_acc.plot(val_epochs, val, color="tab:orange", linewidth=1.2, label="validation accuracy",
                        marker="o", markersize=3)
        else:
            ax_acc.plot(val_epochs, val, color="tab:orange", linewidth=0.8, alpha=0.35, label="validation accuracy")
            ax_acc.plot(val_epochs, smooth(val), color="tab:orange", linewidth=1.8,
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


def plot_prediction_grid(path: Path | str, images, labels, preds, class_names: Sequence[str], n: int = 16,
                         seed: int = 0) -> Path:
    """A grid of n images drawn at random (seeded), 4 a row, each titled 'predicted (true)', green when right
    and red when wrong. images: uint8 (N, 3, H, W); labels, preds: (N,) class indices."""
    import torch

    idx = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    cols = 4
    rows = max(1, math.ceil(len(idx) / cols))
    fig = new_figure(2.2 * cols, 2.4 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, idx):
        p, t = int(preds[i]), int(labels[i])
        ax.imshow(images[i].permute(1, 2, 0).cpu().numpy())
        ax.set_title(f"{class_names[p]} ({class_names[t]})", color="green" if p == t else "red", fontsize=9)
    fig.suptitle("predicted (true)", fontsize=10)
    return save_figure(fig, path, dpi=100)
