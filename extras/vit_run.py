"""The bookkeeping of a transformer.py training run, around the lesson's loop: where the run stands (Progress),
the progress bar, the `last` checkpoint that --resume goes on from, the best checkpoint, the curves redrawn as
the run goes, and the end of the run (a stop by a signal, the report)."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

import trainkit
import transformer
from trainkit import Precision, UserError

# What a resumed run must share with the stopped one (the model's shape is checked too); the last two may change.
RESUME_FLAGS = ("batch_size", "lr", "weight_decay", "warmup", "label_smoothing", "grad_clip", "augment", "mixup",
                "cutmix", "mix_prob", "cache_scale", "seed", "max_train_samples", "epochs", "time_budget")
# Bookkeeping after an epoch takes time from training (on a 2-core Xeon a drawing ~0.2 s, a save ~12 ms), so:
CURVES_EVERY_S = 60.0  # redraw vit_curves.png when this many seconds have passed since the last drawing
LAST_EVERY_S = 30.0  # save the `last` checkpoint when this many seconds have passed since the last save (and at
#                       the end, and at once on SIGINT or SIGTERM): a crash loses at most this much training


def checkpoint_path(output_dir: str, checkpoint: str | None) -> Path:
    return Path(checkpoint) if checkpoint else Path(output_dir) / "vit_cats_vs_dogs.pth"


def save_checkpoint(path: Path, model: transformer.VisionTransformer, class_names: list[str], extra: dict) -> None:
    """state_dict + config as a plain dict + class names, saved atomically; loads with weights_only=True."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    trainkit.atomic_save({"model": state, "config": asdict(model.config), "class_names": list(class_names), **extra},
                         path)


def draw_curves(s: transformer.TrainConfig, model: transformer.VisionTransformer, device: torch.device,
                precision: Precision, history: list[dict]) -> Path:
    c = model.config
    title = (f"transformer.py: ViT {model.num_params() / 1e6:.2f}M parameters ({c.image_size} px, patch "
             f"{c.patch_size}, dim {c.dim}, {c.depth} blocks), {device.type}, {precision.name}")
    note = "on MixUp/CutMix batches" if s.mixup > 0 or s.cutmix > 0 else ""
    return trainkit.pictures.plot_classifier_curves(Path(s.output_dir) / "vit_curves.png", history, title, note)


def join_processes(s: transformer.TrainConfig) -> tuple[torch.device, int]:
    """The device, and the images per step of this process: under torchrun it joins the other processes, and
    each takes its share of every batch."""
    try:
        device = trainkit.init_distributed(trainkit.pick_device(s.device))
        return device, trainkit.per_process_batch(s.batch_size)
    except ValueError as e:
        raise UserError(str(e)) from None


@dataclass
class Progress:
    """Where a run stands: what the `last` checkpoint keeps and --resume starts from."""

    epoch: int = 1
    batch: int = 0  # batches of this epoch done
    sums: tuple = (0.0, 0, 0)  # this epoch's loss sum, correct predictions and images, over all processes
    step: int = 0
    images_seen: int = 0
    train_seconds: float = 0.0
    elapsed: float = 0.0  # the clock the time budget reads
    history: list = field(default_factory=list)  # one dict per finished epoch
    best_acc: float = -1.0

    def end_epoch(self, val_accuracy: float | None, lr: float) -> dict:
        """Adds the epoch to the history and starts the next one (an epoch cut short by the time budget counts)."""
        loss_sum, correct, count = self.sums
        self.history.append({"epoch": self.epoch, "train_loss": loss_sum / max(1, count),
                             "train_accuracy": correct / max(1, count), "val_accuracy": val_accuracy, "lr": lr})
        self.epoch, self.batch, self.sums, self.images_seen = self.epoch + 1, 0, (0.0, 0, 0), self.images_seen + count
        return self.history[-1]


class Run(Progress):
    """A training run's Progress (the fields the `last` checkpoint keeps) with the files around it. Made after
    the TrainStep: with --resume it sets the weights, the optimizer, the random generators and the counters back
    to where the stopped run left them."""

    def __init__(self, s: transformer.TrainConfig, model: transformer.VisionTransformer, step: trainkit.TrainStep,
                 data: transformer.Data, mix: transformer.Mixing, device: torch.device, precision: Precision) -> None:
        super().__init__()
        self.s, self.model, self.data, self.mix, self.device, self.precision = s, model, data, mix, device, precision
        self.best_path = checkpoint_path(s.output_dir, s.checkpoint)
        self.last = trainkit.runs.LastCheckpoint(self.best_path, "transformer.py", step, asdict(model.config),
                                                 {k: getattr(s, k) for k in RESUME_FLAGS}, ("epochs", "time_budget"))
        self.interrupted, self.bar, self.epoch_start = False, None, 0.0
        self.curves_drawn = self.last_saved = -math.inf
        if s.resume:
            state = self.last.resume()
            for f in fields(Progress):
                setattr(self, f.name, state[f.name])
            mix.generator.set_state(state["mix_rng"])

    def save_last(self) -> None:
        self.last_saved = time.perf_counter()
        progress = {f.name: getattr(self, f.name) for f in fields(Progress)}
        self.last.save(**progress, class_names=self.data.class_names, mix_rng=self.mix.generator.get_state())

    @contextlib.contextmanager
    def progress_bar(self, loader):
        """The epoch's batches behind a progress bar (on rank 0, in a terminal, without --quiet); times the epoch."""
        from tqdm.auto import tqdm

        self.epoch_start = time.perf_counter()
        self.bar = tqdm(loader, desc=f"epoch {self.epoch}", leave=False, mininterval=1.0,
                        disable=self.s.quiet or not sys.stderr.isatty() or not trainkit.is_main())
        try:
            yield self.bar
        finally:
            self.bar.close()
        self.train_seconds += time.perf_counter() - self.epoch_start

    def count(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """One step done: the epoch's loss and accuracy so far, summed over all processes, on the bar."""
        self.step, self.batch = self.step + 1, self.batch + 1
        counts = trainkit.all_reduce([loss.item() * len(labels), (logits.argmax(-1) == labels).sum().item(),
                                      len(labels)])
        self.sums = tuple(a + b for a, b in zip(self.sums, counts))
        loss_sum, correct, n = self.sums
        self.bar.set_postfix(loss=f"{loss_sum / n:.3f}", acc=f"{correct / n:.3f}",
                             img_s=f"{n / (time.perf_counter() - self.epoch_start):.0f}")

    def stopped(self, signum: int) -> dict:
        """A signal stopped the run: rank 0 saves it for --resume (evaluation waits for the resumed run)."""
        if not trainkit.is_main():  # another rank exiting non-zero would make torchrun kill rank 0 mid-save
            return {}
        self.save_last()
        print(trainkit.stopped_note(signum, f"in epoch {self.epoch}", self.last.path), file=sys.stderr)
        return {"signal": signum}

    def epoch_done(self, val: dict | None, lr: float, elapsed_s: float) -> None:
        """Prints the epoch; rank 0 saves the best checkpoint when val beats it, and when their time has come the
        `last` one and the curves."""
        done = self.end_epoch(val and val["accuracy"], lr)
        print(f"epoch {done['epoch']:3d}  train loss {done['train_loss']:.3f} acc {done['train_accuracy']:.3f}"
              + (f"  val acc {val['accuracy']:.3f}" if val else "") + f"  {elapsed_s:.0f}s", flush=True)
        if val and val["accuracy"] > self.best_acc:
            self.best_acc = val["accuracy"]
            if trainkit.is_main():
                save_checkpoint(self.best_path, self.model, self.data.class_names,
                                {"epoch": done["epoch"], "val_accuracy": self.best_acc})
        if trainkit.is_main():
            if time.perf_counter() - self.last_saved >= LAST_EVERY_S:
                self.save_last()
            if time.perf_counter() - self.curves_drawn >= CURVES_EVERY_S:
                draw_curves(self.s, self.model, self.device, self.precision, self.history)
                self.curves_drawn = time.perf_counter()

    def finish(self, final: dict, wall_seconds: float) -> dict:
        """Rank 0 keeps the final model when it beats the best checkpoint (or none was saved) and reports:
        metrics.json, the printed report, the pictures. Returns the metrics ({} on the other ranks)."""
        if not trainkit.is_main():
            return {}
        self.save_last()  # where the run ended: --resume with more epochs or time goes on from here
        if final["accuracy"] > self.best_acc or not self.best_path.exists():
            self.best_acc = final["accuracy"]
            save_checkpoint(self.best_path, self.model, self.data.class_names,
                            {"epoch": len(self.history), "val_accuracy": self.best_acc})
        from extras import vit_commands

        return vit_commands.report_training(self.model, self.data, self, final, self.s, self.device, self.precision,
                                            self.interrupted, wall_seconds)
