"""transformer.py's command line and the commands beside training: --predict, --eval-only, the report a run
ends with (metrics.json, the printed summary and confusion matrix, the pictures of predictions and attention).

    python transformer.py --predict cat.jpg dog.jpg
    python transformer.py --eval-only --checkpoint runs/vit/vit_cats_vs_dogs.pth --data-dir DIR
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

import torch

import trainkit
import transformer
from extras import vit_data, vit_run
from trainkit import Precision, UserError


def build_parser() -> argparse.ArgumentParser:
    p = trainkit.OneLineParser(prog="transformer.py", description="Train a hand-written Vision Transformer on "
                               "Cats vs Dogs (or any Hugging Face image-classification dataset) and report its "
                               "accuracy. Flags left out take their --preset's value.")
    d = p.add_argument_group("data")
    d.add_argument("--data-dir", help="local folder with train/ and validation/ class subfolders, e.g. "
                   "../shared/data/cats_and_dogs_filtered (default: the Hub dataset below)")
    d.add_argument("--dataset", default="microsoft/cats_vs_dogs", help="Hugging Face dataset name "
                   "(image + label columns are found automatically); default %(default)s")
    d.add_argument("--val-fraction", type=float, default=0.1,
                   help="validation share carved out when the dataset has no validation split (default 0.1)")
    d.add_argument("--max-train-samples", type=int, default=0, help="use at most this many training images")
    d.add_argument("--workers", type=int, default=0, help="DataLoader worker processes for augmentation")
    m = p.add_argument_group("model")
    for flag in ("--image-size", "--patch-size", "--dim", "--depth", "--mlp-dim"):
        m.add_argument(flag, type=int)
    m.add_argument("--stem-channels", type=stem_channels, metavar="C1,C2,...",
                   help="a convolutional stem: one 3x3 stride-2 convolution (with BatchNorm and ReLU) per entry, "
                   "log2(patch size) of them, e.g. 16,32,64,128 for --patch-size 16; 'none': no stem, one "
                   "patch-sized convolution")
    m.add_argument("--n-heads", "--heads", dest="n_heads", type=int)
    m.add_argument("--dropout", type=float)
    m.add_argument("--attention-dropout", type=float)
    t = p.add_argument_group("training")
    t.add_argument("--preset", choices=sorted(transformer.PRESETS), help="'default': ~15 min on 2 CPU cores; 'smoke': "
                   "seconds, for tests; 'finetune': the default with --pretrained")
    t.add_argument("--epochs", type=int)
    t.add_argument("--time-budget", type=float, metavar="MINUTES",
                   help="stop training after this many minutes (the LR schedule ends on time)")
    t.add_argument("--batch-size", type=int, help="images per step, over all processes: under torchrun each of "
                   "N processes takes batch-size/N of them")
    t.add_argument("--lr", type=float, help="peak learning rate of AdamW")
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--warmup", type=float, help="fraction of training spent warming the LR up")
    t.add_argument("--label-smoothing", type=float)
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--augment", choices=["none", "light", "strong"], help="light: random resized crop and flip; "
                   "strong: also a rotation of up to 20 degrees and brightness, contrast, saturation changes")
    t.add_argument("--augment-kernel", choices=["auto", "torch", "c"], default="auto",
                   help="what runs light and strong augmentation: PyTorch (augment_images), a C kernel that makes "
                        "the same images in one pass (extras/vit_augment.c, built with the machine's C compiler), "
                        "or auto: the faster of the two, timed on the training images (default)")
    t.add_argument("--mixup", type=float, help="MixUp alpha (0: off)")
    t.add_argument("--cutmix", type=float, help="CutMix alpha (0: off)")
    t.add_argument("--mix-prob", type=float, help="share of batches that get MixUp/CutMix")
    t.add_argument("--cache-scale", type=float, help="training images are cached at image_size * this, "
                   "so random crops have pixels to choose from")
    t.add_argument("--eval-every", type=int, metavar="EPOCHS", help="validate after every this many epochs "
                   "(and after the last); validating takes time from training")
    t.add_argument("--eval-crop", type=float, metavar="SHARE", help="validation, --eval-only and --predict images: "
                   "the centre square of this share of the short side, resized to --image-size (0.875: "
                   "torchvision's 224 of 256; 1: the whole short side)")
    t.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="evaluate (and --predict) on each image and its mirror image, averaging the logits")
    t.add_argument("--precision", choices=trainkit.PRECISIONS, default="auto",
                   help="autocast precision. auto: on CUDA bf16 from compute capability 8.0, fp16 with loss "
                        "scaling on 7.x; on a CPU whichever of fp32 and bf16 measures faster; fp32 on MPS")
    t.add_argument("--compile", nargs="?", const="on", choices=trainkit.COMPILE_MODES,
                   help="torch.compile the training forward and backward: on, off, or auto (compile, time compiled "
                        "against eager steps during the first steps of training, keep the faster; eager where "
                        "torch.compile fails). --compile alone: on")
    t.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), or a torch device name")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    o = p.add_argument_group("output and other commands")
    o.add_argument("--output-dir", default="runs/vit", help="metrics.json, the pictures (prediction grid, "
                   "curves, attention maps) and the checkpoint go here (default %(default)s)")
    o.add_argument("--checkpoint", help="checkpoint path (default OUTPUT_DIR/vit_cats_vs_dogs.pth)")
    o.add_argument("--resume", action="store_true",
                   help="continue the run saved in the last checkpoint beside --checkpoint (NAME.last.pth), with "
                        "the same model and training flags; --epochs and --time-budget may change")
    o.add_argument("--predict", nargs="+", metavar="IMAGE", help="print class probabilities for these images "
                   "and draw their attention maps into vit_attention_predict.png beside the checkpoint")
    o.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint on the validation split")
    o.add_argument("--pretrained", metavar="NAME", help="start from torchvision's ImageNet weights of this ViT "
                   "(vit_b_16, vit_b_32, vit_l_16 or vit_l_32; downloaded by torchvision) with a new head")
    o.add_argument("--weights", metavar="PATH", help="with --pretrained: a local state_dict .pth instead of the "
                   "download")
    o.add_argument("--finetune", choices=["head", "all"], default="head", help="with --pretrained. head: encode "
                   "every image once with the frozen encoder and train only the new head (minutes on a CPU); "
                   "all: train everything (for a GPU)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """transformer.parse_args: the flags, the preset's values where a flag was left out (--pretrained: the
    --finetune defaults first), and checks that end in one line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.weights and not args.pretrained:
        parser.error("--weights needs --pretrained NAME (the architecture the weights are for)")
    if args.pretrained:
        from extras import vit_pretrained

        trainkit.fill_preset(args, vit_pretrained.FINETUNE_DEFAULTS[args.finetune])
    args.preset = args.preset or ("finetune" if args.pretrained else "default")
    trainkit.fill_preset(args, transformer.PRESETS[args.preset])
    check_flags(parser, args)
    return args


def stem_channels(text: str) -> tuple[int, ...]:
    """--stem-channels: "24,48,96" -> (24, 48, 96); "none" or "" -> () (no stem)."""
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        return tuple(int(c) for c in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected channel counts separated by commas (e.g. 16,32,64,128) or "
                                         f"'none', got {text!r}") from None


def check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Values no run can use end in one line (argparse's error, exit status 2) before anything is loaded."""
    checks = [(args.epochs >= 1, "--epochs must be at least 1"),
              (args.batch_size >= 1, "--batch-size must be at least 1"),
              (args.eval_every >= 1, "--eval-every must be at least 1"),
              (args.time_budget is None or args.time_budget > 0, "--time-budget must be positive (minutes)"),
              (args.lr > 0, "--lr must be positive"),
              (0 <= args.warmup < 1, "--warmup must be in [0, 1)"),
              (0 <= args.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
              (0 < args.val_fraction < 1, "--val-fraction must be in (0, 1)"),
              (args.workers >= 0, "--workers must be >= 0"),
              (args.cache_scale >= 1, "--cache-scale must be >= 1"),
              (0.5 < args.eval_crop <= 1, "--eval-crop must be in (0.5, 1]")]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    try:
        transformer.model_config(args)  # ViTConfig checks the model's shape
    except ValueError as e:
        parser.error(f"invalid model config: {e}")


def load_checkpoint(path: Path, device: torch.device) -> tuple[transformer.VisionTransformer, list[str]]:
    """The model and class names of a checkpoint transformer.py saved."""
    ckpt = trainkit.read_checkpoint(path, "train first (python transformer.py ...) or pass --checkpoint PATH")
    try:
        model = transformer.VisionTransformer(transformer.ViTConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["model"])
        class_names = list(ckpt["class_names"])
    except Exception as e:
        raise UserError(f"checkpoint {path} could not be loaded: {str(e).splitlines()[0]}") from None
    return model.to(device).eval(), class_names


def predict(args: argparse.Namespace) -> int:
    """--predict IMAGE...: each image's class probabilities on stdout, the attention maps of the first few in
    vit_attention_predict.png beside the checkpoint."""
    from extras import vit_attention

    device = trainkit.pick_device(args.device)
    checkpoint = vit_run.checkpoint_path(args.output_dir, args.checkpoint)
    model, class_names = load_checkpoint(checkpoint, device)
    shown, titles = [], []
    for path in args.predict:
        try:
            image = transformer.decode_image(path, model.config.image_size, args.eval_crop).unsqueeze(0)
        except (OSError, ValueError, SyntaxError) as e:
            raise UserError(f"cannot read image {path}: {e}") from None
        probs = transformer.predict_logits(model, image, device, None, tta=args.tta)[0].softmax(-1)
        ranked = sorted(zip(class_names, probs.tolist()), key=lambda t: -t[1])
        print(f"{path}: " + "  ".join(f"{name} {p:.3f}" for name, p in ranked))
        if len(shown) < vit_attention.ATTENTION_MAX_PREDICT:
            shown.append(image)
            titles.append(f"{Path(path).name[:18]}: {ranked[0][0]} {ranked[0][1]:.2f}")
    # a note on stderr keeps stdout to the predictions
    picture = vit_attention.save_attention_picture(checkpoint.parent / "vit_attention_predict.png", model,
                                                   torch.cat(shown), titles, device, "where the class token looks")
    more = f" (the first {len(shown)} images)" if len(args.predict) > len(shown) else ""
    print(f"attention maps{more}: {picture}", file=sys.stderr)
    return 0


def eval_only(args: argparse.Namespace) -> int:
    """--eval-only: the checkpoint's accuracy and confusion matrix on the validation split."""
    device = trainkit.pick_device(args.device)
    model, class_names = load_checkpoint(vit_run.checkpoint_path(args.output_dir, args.checkpoint), device)
    _, val_ds, image_col, label_col, data_classes = transformer.load_splits(
        args.data_dir, args.dataset, args.val_fraction, args.seed, args.max_train_samples)
    if data_classes != class_names:
        raise UserError(f"checkpoint classes {class_names} differ from the data's classes {data_classes}")
    cache = vit_data.cache_split(val_ds, image_col, label_col, model.config.image_size, "validation", args.eval_crop)
    precision = transformer.pick_precision(args.precision, device, model.config, args.batch_size)
    result = transformer.evaluate(model, cache, class_names, device, precision, tta=args.tta)
    print(f"validation accuracy {result['accuracy']:.4f} on {len(cache)} images ({cache.skipped} unreadable skipped)")
    print("per-class accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in result["per_class_accuracy"].items()))
    print_confusion(result["confusion_matrix"], class_names)
    return 0


def report_training(model: transformer.VisionTransformer, data: transformer.Data, run: vit_run.Run,
                    final: dict, s: transformer.TrainConfig, device: torch.device, precision: Precision,
                    interrupted: bool, wall_seconds: float) -> dict:
    """The end of a training run on rank 0: metrics.json, the printed report, the prediction grid, the curves
    and the attention maps of a few validation images. Returns the metrics."""
    from extras import vit_attention

    out_dir = Path(s.output_dir)
    last = run.history[-1] if run.history else {"train_loss": float("nan"), "train_accuracy": float("nan")}
    metrics = {
        "final_train_loss": last["train_loss"], "final_train_accuracy": last["train_accuracy"],
        "val_accuracy": final["accuracy"], "best_val_accuracy": run.best_acc,
        "per_class_accuracy": final["per_class_accuracy"], "confusion_matrix": final["confusion_matrix"],
        "class_names": data.class_names, "epochs": len(run.history), "steps": run.step,
        "train_images_per_second": run.images_seen / max(run.train_seconds, 1e-9),
        "train_seconds": run.train_seconds, "data_seconds": data.seconds, "wall_seconds": wall_seconds,
        "peak_rss_mb": peak_rss_mb(), "train_images": len(data.train), "val_images": len(data.val),
        "skipped_files": data.train.skipped + data.val.skipped, "parameters": model.num_params(),
        "config": asdict(model.config), "device": device.type, "precision": precision.name,
        "precision_reason": precision.reason, "interrupted": interrupted, "history": run.history,
        "settings": asdict(s),
    }
    metrics_path = trainkit.write_metrics(metrics, out_dir / "metrics.json")
    print_report(metrics, data.class_names)
    grid = trainkit.pictures.plot_prediction_grid(out_dir / "vit_predictions.png", data.val.images, data.val.labels,
                                                  final["predictions"], data.class_names, seed=s.seed)
    print(f"saved {vit_run.checkpoint_path(s.output_dir, s.checkpoint)}, {metrics_path}, {grid}")
    curves = vit_run.draw_curves(s, model, device, precision, run.history) if run.history else None
    idx = torch.randperm(len(data.val), generator=torch.Generator().manual_seed(s.seed))
    idx = idx[:vit_attention.ATTENTION_IMAGES]
    titles = [f"{data.class_names[int(final['predictions'][i])]} ({data.class_names[int(data.val.labels[i])]})"
              for i in idx]
    attention = vit_attention.save_attention_picture(out_dir / "vit_attention.png", model, data.val.images[idx],
                                                     titles, device, "validation images, predicted (true)")
    print(f"pictures: {curves or '(no epoch finished: no curves)'}, {attention}")
    return metrics


def peak_rss_mb() -> float:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    except (ImportError, AttributeError):
        return float("nan")


def print_report(m: dict, class_names: list[str]) -> None:
    print(f"\nvalidation accuracy {m['val_accuracy']:.4f} (best epoch {m['best_val_accuracy']:.4f}); final train loss "
          f"{m['final_train_loss']:.3f}, train accuracy {m['final_train_accuracy']:.3f}")
    print("per-class accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in m["per_class_accuracy"].items()))
    print_confusion(m["confusion_matrix"], class_names)
    print(f"{m['epochs']} epochs, {m['train_images_per_second']:.0f} train images/s, wall {m['wall_seconds']:.0f}s, "
          f"peak RSS {m['peak_rss_mb']:.0f} MB")


def print_confusion(cm: list[list[int]], class_names: list[str]) -> None:
    width = max(8, *(len(c) + 1 for c in class_names))
    print("confusion matrix (rows: true, columns: predicted)")
    print(" " * width + "".join(f"{c:>{width}}" for c in class_names))
    for name, row in zip(class_names, cm):
        print(f"{name:>{width}}" + "".join(f"{v:>{width}}" for v in row))
