"""How much of Day 1's training time goes to the model: the whole training loop against the model step alone.

    python benchmarks/bench_vit_loop.py --data-dir ../shared/data/cats_and_dogs_filtered   # the default preset
    python benchmarks/bench_vit_loop.py --compile off --reps 3
    python benchmarks/bench_vit_loop.py --augment-kernel torch   # the augmentation in PyTorch, not in C
    python benchmarks/bench_vit_loop.py --json runs/bench_vit_loop.json

"Loop" is transformer.train_epoch on the default preset's DataLoader: the batched augmentation of the uint8
cache and its normalisation (in C or in PyTorch, as --augment-kernel says; auto: the faster), MixUp/CutMix, the
step and its bookkeeping, plus the validation the preset runs every `eval_every` epochs (with its mirror images,
--tta), its time shared out over the steps in between, and the bookkeeping after epochs (the `last` checkpoint
every vit_run.LAST_EVERY_S seconds, the curves every CURVES_EVERY_S, each timed here), shared out alike. "Step"
is the same model's training step (forward, loss, backward, clipping, AdamW) on one batch prepared beforehand:
what the loop would run at if everything else were free. The two alternate in the same process, so the drift of
a shared machine hits both alike; the medians over repetitions and their ratio are printed. Without --data-dir
the cache holds random pixels (the augmentation costs the same). Not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import trainkit  # noqa: E402
import transformer as T  # noqa: E402
from extras import vit_run  # noqa: E402
from machine import describe_machine, print_header, write_json  # noqa: E402


class Counter:
    """What train_epoch needs of a run (extras/vit_run.Run) and of its budget, without a progress bar or files:
    counts the steps, reads each loss as the real run's bookkeeping does, and stops after `steps`."""

    def __init__(self, steps: int) -> None:
        self.step, self.steps = 0, steps

    def progress_bar(self, loader):
        return contextlib.nullcontext(loader)

    def count(self, loss, logits, labels) -> None:
        self.step += 1
        self.sums = trainkit.all_reduce([loss.item() * len(labels), (logits.argmax(-1) == labels).sum().item(),
                                         len(labels)])

    def progress(self, step: int) -> float:
        return 0.5

    def agree(self) -> None:
        pass

    def done(self, step: int) -> bool:
        return step >= self.steps


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", help="a folder with train/ and validation/ (default: random pixels)")
    p.add_argument("--compile", choices=["on", "off"], default="on",
                   help="torch.compile the step in both (the default preset's auto chooses on where it pays)")
    p.add_argument("--augment-kernel", choices=["auto", "torch", "c"], default="auto",
                   help="what augments the training images (transformer.py's flag of the same name)")
    p.add_argument("--steps", type=int, default=24, help="training steps per repetition")
    p.add_argument("--reps", type=int, default=5, help="alternating repetitions of loop and step")
    p.add_argument("--json", metavar="PATH", help="also write the figures and the machine header to PATH")
    args = p.parse_args(argv)
    machine = describe_machine("cpu")
    print_header(machine)

    # the configs transformer.py builds from these flags and the default preset
    flags = T.parse_args(["--compile", args.compile, "--augment-kernel", args.augment_kernel] +
                         (["--data-dir", args.data_dir] if args.data_dir else []))
    s, config = T.train_config(flags), T.model_config(flags)
    torch.manual_seed(0)
    if args.data_dir:
        data = T.load_data(s, config.image_size)
    else:
        cache = round(config.image_size * s.cache_scale)
        data = T.Data(T.ImageCache(torch.randint(0, 256, (2000, 3, cache, cache), dtype=torch.uint8),
                                   torch.arange(2000) % 2),
                      T.ImageCache(torch.randint(0, 256, (500, 3, config.image_size, config.image_size),
                                             dtype=torch.uint8), torch.arange(500) % 2), ["cats", "dogs"])
    device = torch.device("cpu")
    model = T.VisionTransformer(replace(config, num_classes=len(data.class_names)))
    precision = T.pick_precision(s.precision, device, model.config, s.batch_size)
    step = trainkit.TrainStep(model, model.configure_optimizer(s.lr, s.weight_decay), precision, device,
                              s.grad_clip)
    forward = trainkit.CompiledForward(step.model, s.compile)
    loader = T.train_loader(data.train, config.image_size, s, s.batch_size)
    mix = T.Mixing(s, model.config.num_classes)
    steps_between_evals = s.eval_every * len(loader)
    images, labels = next(iter(loader))
    x = images  # augmented and standardised by the loader

    def model_step() -> None:
        with step.forward_context():
            loss = F.cross_entropy(forward(x).float(), labels, label_smoothing=s.label_smoothing)
        step.backward(loss)
        step.update(s.lr)

    def loop(epoch: int) -> float:
        counter = Counter(args.steps)
        loader.sampler.set_epoch(epoch)
        t = time.perf_counter()
        T.train_epoch(step, forward, loader, mix, counter, s, counter, device)
        train_s = time.perf_counter() - t
        t = time.perf_counter()
        T.evaluate(model, data.val, data.class_names, device, precision, tta=s.tta)
        model.train()
        return train_s + (time.perf_counter() - t) * args.steps / steps_between_evals

    def bookkeeping() -> float:
        """Seconds of bookkeeping per second of training: the `last` checkpoint and the curves (drawn from a history
        as long as a default run's), each timed and divided by how often the run does it."""
        with tempfile.TemporaryDirectory() as out:
            run = vit_run.Run(replace(s, output_dir=out), model, step, data, mix, device, precision)
            run.history = [{"epoch": e, "train_loss": 0.5, "train_accuracy": 0.8, "lr": s.lr,
                            "val_accuracy": 0.8 if e % s.eval_every == 0 else None} for e in range(1, 471)]
            save = statistics.median(timed(run.save_last) for _ in range(5))
            draw = statistics.median(timed(lambda: vit_run.draw_curves(run.s, model, device, precision, run.history))
                                     for _ in range(3))
        print(f"bookkeeping: the last checkpoint {save * 1e3:.0f} ms every {vit_run.LAST_EVERY_S:.0f} s, the curves "
              f"{draw * 1e3:.0f} ms every {vit_run.CURVES_EVERY_S:.0f} s")
        return save / vit_run.LAST_EVERY_S + draw / vit_run.CURVES_EVERY_S

    for _ in range(3):  # warm up (and compile)
        model_step()
    loop(0)
    share = bookkeeping()
    print(f"default preset, batch {s.batch_size}, {precision.name}, compile {args.compile}, augmentation "
          f"{'C kernel' if loader.dataset.kernel else 'PyTorch'}, {args.reps} reps x "
          f"{args.steps} steps; validation ({len(data.val)} images) every {steps_between_evals} steps")
    rates = {"loop": [], "step": []}
    for rep in range(args.reps):
        t = time.perf_counter()
        for _ in range(args.steps):
            model_step()
        rates["step"].append(args.steps * s.batch_size / (time.perf_counter() - t))
        rates["loop"].append(args.steps * s.batch_size / (loop(rep + 1) * (1 + share)))
    med = {name: statistics.median(r) for name, r in rates.items()}
    print(f"loop {med['loop']:.0f} images/s, step {med['step']:.0f} images/s: the loop runs at "
          f"{med['loop'] / med['step']:.0%} of the step   (loop {[round(r) for r in rates['loop']]}, "
          f"step {[round(r) for r in rates['step']]})")
    write_json(args.json, machine, {"loop_images_per_s": med["loop"], "step_images_per_s": med["step"],
                                    "ratio": med["loop"] / med["step"], "compile": args.compile,
                                    "augment_kernel": "c" if loader.dataset.kernel else "torch",
                                    "precision": precision.name})


if __name__ == "__main__":
    main()
