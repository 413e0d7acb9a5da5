"""Training-step throughput of our hand-written ViT against torchvision's VisionTransformer.

    python benchmarks/bench_vit.py                      # the default preset's model, batch 64, fp32 and bf16
    python benchmarks/bench_vit.py --reps 7 --steps 10 --precisions bf16
    python benchmarks/bench_vit.py --json runs/bench_vit.json   # the figures and the machine, for comparing machines

Both models get the identical configuration, batch and optimizer (AdamW). One training step = forward, cross
entropy, backward, optimizer step. The two are measured in the same process, alternating (ours, theirs, ours,
...) so that drift of a shared machine hits both alike; each repetition times `--steps` steps after warm-up
steps, and the median images/s over repetitions is reported with the ratio ours / torchvision.
Not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import transformer as T  # noqa: E402
from extras import vit_commands  # noqa: E402
from machine import describe_machine, print_header, write_json  # noqa: E402


def torchvision_model(c: T.ViTConfig) -> torch.nn.Module:
    from torchvision.models.vision_transformer import ConvStemConfig, VisionTransformer

    stem = [ConvStemConfig(channels, kernel_size=3, stride=2) for channels in c.stem_channels] or None
    return VisionTransformer(image_size=c.image_size, patch_size=c.patch_size, num_layers=c.depth,
                             num_heads=c.n_heads, hidden_dim=c.dim, mlp_dim=c.mlp_dim, dropout=c.dropout,
                             attention_dropout=c.attention_dropout, num_classes=c.num_classes,
                             conv_stem_configs=stem)


def make_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, amp: torch.dtype | None):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step() -> None:
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def time_steps(step, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        step()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    preset = T.PRESETS["default"]
    p.add_argument("--batch-size", type=int, default=preset["batch_size"])
    p.add_argument("--image-size", type=int, default=preset["image_size"])
    p.add_argument("--patch-size", type=int, default=preset["patch_size"])
    p.add_argument("--stem-channels", type=vit_commands.stem_channels, default=preset["stem_channels"],
                   help="as transformer.py's: comma-separated, or 'none' for the single patch projection")
    p.add_argument("--dim", type=int, default=preset["dim"])
    p.add_argument("--depth", type=int, default=preset["depth"])
    p.add_argument("--n-heads", type=int, default=preset["n_heads"])
    p.add_argument("--mlp-dim", type=int, default=preset["mlp_dim"])
    p.add_argument("--reps", type=int, default=5, help="alternating repetitions per model and precision")
    p.add_argument("--steps", type=int, default=8, help="timed training steps per repetition")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--json", metavar="PATH", help="also write the figures and the machine header to PATH")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = describe_machine("cpu")
    print_header(machine)

    c = T.ViTConfig(image_size=args.image_size, patch_size=args.patch_size, dim=args.dim, depth=args.depth,
                    n_heads=args.n_heads, mlp_dim=args.mlp_dim, num_classes=2, stem_channels=args.stem_channels)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, c.image_size, c.image_size)
    y = torch.randint(0, 2, (args.batch_size,))
    print(f"config {c}\nbatch {args.batch_size}, {args.reps} reps x {args.steps} steps")
    results = {"setup": {"config": str(c), "batch_size": args.batch_size, "reps": args.reps, "steps": args.steps,
                         "compile": args.compile}}
    for precision in args.precisions:
        amp = torch.bfloat16 if precision == "bf16" else None
        models = {"ours": T.VisionTransformer(c), "torchvision": torchvision_model(c)}
        if args.compile:
            models = {name: torch.compile(m) for name, m in models.items()}
        steps = {name: make_step(m, x, y, amp) for name, m in models.items()}
        for name, step in steps.items():
            time_steps(step, args.warmup_steps)
        rates = {name: [] for name in steps}
        for rep in range(args.reps):
            order = list(steps) if rep % 2 == 0 else list(reversed(steps))  # alternate who goes first
            for name in order:
                rates[name].append(args.batch_size * args.steps / time_steps(steps[name], args.steps))
        med = {name: statistics.median(r) for name, r in rates.items()}
        results[precision] = {"ours_images_per_s": med["ours"], "torchvision_images_per_s": med["torchvision"],
                              "ratio": med["ours"] / med["torchvision"]}
        print(f"{precision}: ours {med['ours']:.1f} img/s, torchvision {med['torchvision']:.1f} img/s, "
              f"ratio {med['ours'] / med['torchvision']:.3f}x   "
              f"(ours {[round(r) for r in rates['ours']]}, torchvision {[round(r) for r in rates['torchvision']]})")
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {results['peak_rss_mb']:.0f} MB")
    write_json(args.json, machine, results)


if __name__ == "__main__":
    main()
