"""transformer.py --pretrained: torchvision's ImageNet ViTs in our VisionTransformer, with a new head for our
classes. `--finetune head` trains a linear probe on the frozen encoder's class tokens (minutes on a CPU);
`--finetune all` trains everything with transformer.train.

    python transformer.py --pretrained vit_b_16 --finetune head --data-dir DIR
    python transformer.py --pretrained vit_b_16 --weights vit_b_16.pth --data-dir DIR   # offline: a saved state_dict
"""

from __future__ import annotations

import argparse
import math
import re
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import trainkit
import transformer
from extras import vit_data, vit_run
from trainkit import Precision, UserError
from transformer import ViTConfig, VisionTransformer


# The head count cannot be read off the weights' shapes (it only splits dim into heads), so it comes from the
# architecture; every other size is read off the tensors.
# head: a linear probe on features computed once, so many cheap epochs; all: a few epochs at a small lr, so
# the pretrained encoder is adjusted rather than overwritten. The rest comes from the "finetune" preset.
FINETUNE_DEFAULTS = {"head": dict(epochs=50, lr=1e-3), "all": dict(epochs=3, lr=5e-5)}


def from_torchvision_state_dict(tv_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames the tensors of a `torchvision.models.vision_transformer.VisionTransformer` to ours (same shapes,
    nothing else changes), so `model.load_state_dict(from_torchvision_state_dict(tv.state_dict()))` works: the
    two are the same architecture, module for module. A conv stem (torchvision's conv_stem_configs) maps too:
    conv_proj.conv_bn_relu_{i}'s conv (.0) and BatchNorm (.1) are our stem's modules 3i and 3i+1 (3i+2 is its
    ReLU), conv_proj.conv_last our 1x1 proj."""
    stem = re.compile(r"^conv_proj\.conv_bn_relu_(\d+)\.([01])\.")
    renames = [
        ("conv_proj.conv_last.", "patch_embedding.proj."),
        ("conv_proj.", "patch_embedding.proj."),
        ("encoder.pos_embedding", "pos_embedding"),
        ("encoder.layers.encoder_layer_", "layers."),
        ("self_attention.in_proj_", "self_attention.qkv."),  # in_proj_weight -> qkv.weight
        ("self_attention.out_proj.", "self_attention.proj."),
        ("mlp.0.", "mlp.fc1."),
        ("mlp.3.", "mlp.fc2."),
        ("encoder.ln.", "ln."),
        ("heads.head.", "head."),
    ]
    ours = {}
    for name, tensor in tv_state.items():
        name = stem.sub(lambda m: f"patch_embedding.stem.{3 * int(m[1]) + int(m[2])}.", name)
        for old, new in renames:
            name = name.replace(old, new)
        ours[name] = tensor
    return ours


PRETRAINED_HEADS = {"vit_b_16": 12, "vit_b_32": 12, "vit_l_16": 16, "vit_l_32": 16}


def vit_config_from_torchvision_state_dict(tv_state: dict[str, torch.Tensor], n_heads: int) -> ViTConfig:
    """The ViTConfig of a torchvision VisionTransformer's state_dict: image size from the position embedding
    (one per patch, plus the class token), patch size and width from the patch projection, depth from the
    blocks, MLP width from the first MLP layer, classes from the head."""
    try:
        dim, in_channels, patch_size, _ = tv_state["conv_proj.weight"].shape
        grid = math.isqrt(tv_state["encoder.pos_embedding"].shape[1] - 1)
        depth = len([k for k in tv_state if k.startswith("encoder.layers.") and k.endswith(".ln_1.weight")])
        mlp_dim = tv_state["encoder.layers.encoder_layer_0.mlp.0.weight"].shape[0]
        num_classes = tv_state["heads.head.weight"].shape[0]
        return ViTConfig(image_size=grid * patch_size, patch_size=patch_size, dim=dim, depth=depth, n_heads=n_heads,
                         mlp_dim=mlp_dim, num_classes=num_classes, in_channels=in_channels)
    except (KeyError, ValueError, AttributeError, IndexError) as e:
        raise UserError(f"the weights are not a torchvision VisionTransformer's state_dict ({type(e).__name__}: "
                        f"{e})") from None


def load_torchvision_weights(name: str, weights_path: str | None) -> dict[str, torch.Tensor]:
    """The ImageNet weights of torchvision's `name` (IMAGENET1K_V1: 224 px), downloaded by torchvision, or a
    state_dict saved with torch.save(model.state_dict(), PATH)."""
    if weights_path is not None:
        if not Path(weights_path).is_file():
            raise UserError(f"--weights {weights_path}: no such file")
        try:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"--weights {weights_path}: not a readable PyTorch file ({type(e).__name__})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise UserError(f"--weights {weights_path}: expected a state_dict (torch.save(model.state_dict(), ...))")
        return state
    from torchvision.models import get_model_weights

    try:
        return get_model_weights(name).IMAGENET1K_V1.get_state_dict(progress=True)
    except Exception as e:  # URLError / OSError offline
        raise UserError(f"could not download torchvision's {name} weights ({type(e).__name__}); offline, pass "
                        f"--weights PATH to a saved state_dict") from None


def weights_normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std the weights were trained with, from torchvision's preset for them (no download)."""
    from torchvision.models import get_model_weights

    preset = get_model_weights(name).IMAGENET1K_V1.transforms()
    return tuple(preset.mean), tuple(preset.std)


def pretrained_vit(name: str, weights_path: str | None = None) -> VisionTransformer:
    """torchvision's pretrained `name` as our VisionTransformer, its ImageNet head included: through
    from_torchvision_state_dict, tensor for tensor, so it computes exactly what torchvision's model computes."""
    if name not in PRETRAINED_HEADS:
        raise UserError(f"--pretrained {name}: choose one of {', '.join(PRETRAINED_HEADS)}")
    mean, std = weights_normalization(name)
    if not (torch.allclose(torch.tensor(mean), torch.tensor(transformer.MEAN))
            and torch.allclose(torch.tensor(std), torch.tensor(transformer.STD))):
        raise UserError(f"{name}'s weights expect mean {mean} and std {std}; normalize() uses "
                        f"{transformer.MEAN}, {transformer.STD}")
    tv_state = load_torchvision_weights(name, weights_path)
    model = VisionTransformer(vit_config_from_torchvision_state_dict(tv_state, PRETRAINED_HEADS[name]))
    try:
        model.load_state_dict(from_torchvision_state_dict(tv_state))
    except RuntimeError as e:
        raise UserError(f"the {name} weights do not fit: {str(e).splitlines()[1].strip()[:160]}") from None
    return model


def with_new_head(model: VisionTransformer, num_classes: int) -> VisionTransformer:
    """The same encoder with a fresh zero head for num_classes classes (every class starts at the same logit)."""
    model.config = replace(model.config, num_classes=num_classes)
    model.head = nn.Linear(model.config.dim, num_classes)
    nn.init.zeros_(model.head.weight)
    nn.init.zeros_(model.head.bias)
    return model


def class_token_features(model: VisionTransformer, images: torch.Tensor, device: torch.device,
                         precision: Precision | None, batch_size: int = 64) -> torch.Tensor:
    """(N, dim) float32: the final LayerNorm's class token, what the head reads, for uint8 images."""
    head = model.head
    model.head = nn.Identity()  # forward() then returns the class token itself
    try:
        return transformer.predict_logits(model, images, device, precision, batch_size)
    finally:
        model.head = head


def train_linear_head(head: nn.Linear, features: torch.Tensor, labels: torch.Tensor, epochs: int, lr: float,
                      weight_decay: float, batch_size: int, label_smoothing: float, seed: int) -> float:
    """A linear classifier on frozen features (a "linear probe"): AdamW over shuffled mini-batches, cosine
    learning rate. Seconds on a CPU, since the encoder ran once. Returns the last epoch's mean loss."""
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(labels) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    loss_sum = 0.0
    for _ in range(epochs):
        loss_sum = 0.0
        for idx in torch.randperm(len(labels), generator=g).split(batch_size):
            loss = F.cross_entropy(head(features[idx]), labels[idx], label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(idx)
    return loss_sum / len(labels)


def run_finetune_head(args: argparse.Namespace, model: VisionTransformer) -> dict:
    """--finetune head: the frozen encoder computes each image's class token once; only a new head is trained
    on them. No augmentation (each image is seen once by the encoder)."""
    from extras import vit_commands

    transformer.seed_everything(args.seed)
    device = trainkit.pick_device(args.device)
    ckpt_path = vit_run.checkpoint_path(args.output_dir, args.checkpoint)
    t_start = time.perf_counter()
    train_ds, val_ds, image_col, label_col, class_names = transformer.load_splits(
        args.data_dir, args.dataset, args.val_fraction, args.seed, args.max_train_samples)
    model = with_new_head(model, len(class_names)).to(device).eval()
    size = model.config.image_size
    train_cache = vit_data.cache_split(train_ds, image_col, label_col, size, "train")
    val_cache = vit_data.cache_split(val_ds, image_col, label_col, size, "validation")
    precision = transformer.pick_precision(args.precision, device, model.config, args.batch_size)
    print(f"model: {args.pretrained}, {model.num_params():,} parameters, {size}x{size} images; "
          f"encoding {len(train_cache)} train and {len(val_cache)} validation images once")
    t_features = time.perf_counter()
    train_features = class_token_features(model, train_cache.images, device, precision)
    val_features = class_token_features(model, val_cache.images, device, precision)
    feature_seconds = time.perf_counter() - t_features
    head = nn.Linear(model.config.dim, len(class_names))  # trained on the CPU copy of the features
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    train_loss = train_linear_head(head, train_features, train_cache.labels, args.epochs, args.lr,
                                   args.weight_decay, args.batch_size, args.label_smoothing, args.seed)
    model.head.load_state_dict(head.state_dict())
    with torch.no_grad():
        train_acc = (head(train_features).argmax(-1) == train_cache.labels).float().mean().item()
        preds = head(val_features).argmax(-1)
    cm = transformer.confusion_matrix(val_cache.labels, preds, len(class_names))
    val_acc = (preds == val_cache.labels).float().mean().item()
    vit_run.save_checkpoint(ckpt_path, model, class_names, {"pretrained": args.pretrained, "finetune": "head",
                                                                "val_accuracy": val_acc})
    metrics = {
        "pretrained": args.pretrained, "finetune": "head", "final_train_loss": train_loss,
        "final_train_accuracy": train_acc, "val_accuracy": val_acc, "best_val_accuracy": val_acc,
        "per_class_accuracy": {name: (row[i] / sum(row) if sum(row) else float("nan"))
                               for i, (name, row) in enumerate(zip(class_names, cm))},
        "confusion_matrix": cm, "class_names": class_names, "epochs": args.epochs,
        # the encoder is the only real work here: "train images/s" in the report is images through it per second
        "feature_seconds": feature_seconds, "train_images_per_second": (len(train_cache) + len(val_cache))
        / max(feature_seconds, 1e-9),
        "wall_seconds": time.perf_counter() - t_start, "peak_rss_mb": vit_commands.peak_rss_mb(),
        "train_images": len(train_cache), "val_images": len(val_cache),
        "skipped_files": train_cache.skipped + val_cache.skipped, "parameters": model.num_params(),
        "trained_parameters": sum(p.numel() for p in head.parameters()), "config": asdict(model.config),
        "device": device.type, "precision": precision.name, "precision_reason": precision.reason,
    }
    metrics_path = trainkit.write_metrics(metrics, Path(args.output_dir) / "metrics.json")
    vit_commands.print_report(metrics, class_names)
    print(f"saved {ckpt_path}, {metrics_path}")
    return metrics


def run(args: argparse.Namespace) -> dict:
    """--pretrained NAME: the weights in our model, then --finetune head (here) or all (transformer.train)."""
    try:
        trainkit.init_distributed(trainkit.pick_device(args.device))  # under torchrun: join the other processes
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.finetune == "head" and trainkit.world_size() > 1:
        raise UserError("--finetune head trains in one process (the features are computed once): run it without "
                        "torchrun")
    model = pretrained_vit(args.pretrained, args.weights)
    print(f"loaded {args.pretrained} ({'--weights ' + args.weights if args.weights else 'torchvision ImageNet'}"
          f"): {model.config.image_size}x{model.config.image_size} images, dim {model.config.dim}, "
          f"{model.config.depth} blocks")
    if args.finetune == "head":
        return run_finetune_head(args, model)
    return transformer.train(transformer.model_config(args), transformer.train_config(args), pretrained=model)
