"""Does --precision auto pick the faster precision? Real training steps of both scripts' default models.

For llama.py's and transformer.py's default models, a few training steps (forward, the script's loss,
backward with its gradient scaler, clipping, the script's optimizer) on synthetic batches of the default
shapes are timed in fp32 and in bf16 autocast, alternating, median of the repetitions. Then `--precision auto`
as each script asks for it (trainkit.choose_precision with that model's matmul shape) says what a run would use,
and the ratio of that choice's speed to the faster of the two is printed (the target: >= 0.95x).

    python benchmarks/bench_precision.py [--reps 5] [--steps 3] [--models llama vit] [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
try:
    import trainkit  # noqa: E402
except ImportError:
    sys.exit("error: bench_precision.py needs the trainkit package (the --precision policy) at the repository root; "
             "update your checkout")
import llama  # noqa: E402
import transformer as T  # noqa: E402
from machine import describe_machine, print_header, write_json  # noqa: E402
from trainkit.precision import synchronize  # noqa: E402

TARGET = 0.95  # the auto choice trains at least this fast, relative to the faster of fp32 and bf16


def llama_step(precision: trainkit.Precision, device: torch.device, seed: int = 0):
    """One training step of llama.py's default preset as its train() makes it, on a fixed random batch."""
    preset = llama.PRESETS["default"]
    torch.manual_seed(seed)
    params = llama.ModelArgs(dim=preset["dim"], n_layers=preset["n_layers"], n_heads=preset["n_heads"],
                             n_kv_heads=preset["n_kv_heads"], max_seq_len=preset["max_seq_len"],
                             dropout=preset["dropout"])
    model = llama.Transformer(params).to(device).train()
    cfg = llama.TrainConfig(batch_size=preset["batch_size"], lr=preset["lr"], weight_decay=preset["weight_decay"],
                            label_smoothing=preset["label_smoothing"], max_steps=preset["max_steps"])
    optimizer = llama.configure_optimizer(model, cfg)
    scaler = precision.grad_scaler()
    tokens = torch.randint(0, params.vocab_size, (cfg.batch_size, params.max_seq_len + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step():
        with precision.autocast():
            logits = model(x)
        loss = llama.cross_entropy(logits, y, cfg.label_smoothing)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    tokens = min(cfg.batch_size * params.max_seq_len, 2048)  # as llama.py measures it
    auto = lambda: trainkit.precision.for_model("auto", device, tokens, params.dim, params.hidden_dim)  # noqa: E731
    return step, x.numel(), "tokens", auto


def vit_step(precision: trainkit.Precision, device: torch.device, seed: int = 0):
    """One training step of transformer.py's default preset (without the data augmentation, the same in both)."""
    preset = T.PRESETS["default"]
    torch.manual_seed(seed)
    config = T.model_config(T.parse_args([]))  # the default preset's model, built as a run builds it
    model = T.VisionTransformer(config).to(device).train()
    optimizer = model.configure_optimizer(preset["lr"], preset["weight_decay"])
    scaler = precision.grad_scaler()
    batch = preset["batch_size"]
    x = torch.randn(batch, 3, config.image_size, config.image_size, device=device)
    y = torch.randint(0, config.num_classes, (batch,), device=device)

    def step():
        with precision.autocast():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=preset["label_smoothing"])
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()

    auto = lambda: T.pick_precision("auto", device, config, batch)  # noqa: E731
    return step, batch, "images", auto


MODELS = {"llama": ("llama.py default", llama_step), "vit": ("transformer.py default", vit_step)}


def measure(make_step, device: torch.device, reps: int, steps: int) -> dict:
    _, _, unit, pick_auto = make_step(trainkit.choose_precision("fp32", device), device)
    auto = pick_auto()
    names = ["fp32", "bf16"] + ([auto.name] if auto.name not in ("fp32", "bf16") else [])
    runners = {}
    for name in names:
        step, per_step, _, _ = make_step(trainkit.choose_precision(name, device), device)
        step(), step()  # warm-up: allocation, kernel choice, the optimizer's state
        runners[name] = step
    rates = {name: [] for name in names}
    for rep in range(reps):
        for name in (names if rep % 2 == 0 else names[::-1]):  # alternate who goes first
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                runners[name]()
            synchronize(device)
            rates[name].append(per_step * steps / (time.perf_counter() - t0))
    med = {name: statistics.median(r) for name, r in rates.items()}
    fastest = max(("fp32", "bf16"), key=med.get)
    return {"unit": f"{unit}/s", "rates": med, "all_rates": rates, "auto": auto.name, "auto_reason": auto.reason,
            "faster_of_fp32_bf16": fastest, "auto_vs_faster": med[auto.name] / med[fastest]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--reps", type=int, default=5, help="alternating repetitions per precision")
    p.add_argument("--steps", type=int, default=3, help="timed training steps per repetition")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    p.add_argument("--json", metavar="PATH", help="also write the figures and the machine header to PATH")
    args = p.parse_args(argv)
    try:
        device = trainkit.pick_device(args.device)
    except trainkit.UserError as e:
        sys.exit(f"error: {e}")
    machine = describe_machine(device)
    print_header(machine)
    results = {"setup": {"reps": args.reps, "steps": args.steps, "device": str(device), "target": TARGET}}
    for key in args.models:
        label, make_step = MODELS[key]
        r = measure(make_step, device, args.reps, args.steps)
        results[key] = r
        verdict = "ok" if r["auto_vs_faster"] >= TARGET else f"BELOW the {TARGET}x target"
        print(f"\n{label}: " + ", ".join(f"{name} {rate:,.0f} {r['unit']}" for name, rate in r["rates"].items())
              + f"  (bf16 {r['rates']['bf16'] / r['rates']['fp32']:.2f}x fp32)")
        print(f"  auto picks {r['auto']} ({r['auto_reason']}): {r['auto_vs_faster']:.2f}x the faster "
              f"({r['faster_of_fp32_bf16']}), {verdict}")
    write_json(args.json, machine, results)


if __name__ == "__main__":
    main()
