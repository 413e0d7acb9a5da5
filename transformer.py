"""Day 1: a Vision Transformer (ViT) encoder written by hand, trained to tell cats from dogs.

    python transformer.py --data-dir ../shared/data/cats_and_dogs_filtered   # local folder, ~15 min on 2 CPU cores
    python transformer.py                                   # microsoft/cats_vs_dogs from the Hugging Face Hub
    python transformer.py --dataset uoft-cs/cifar10 --image-size 32 --patch-size 4
    python transformer.py --predict cat.jpg dog.jpg         # class probabilities from the saved checkpoint
    python transformer.py --eval-only --checkpoint runs/vit/vit_cats_vs_dogs.pth --data-dir DIR
    python transformer.py --pretrained vit_b_16 --finetune head --data-dir DIR   # from torchvision's ImageNet ViT

The file reads top to bottom: config, components (patch embedding, attention, MLP, encoder block), the model,
data (decoded once into an in-memory uint8 cache, augmented on tensors), training and evaluation, the CLI.
The architecture is the one of "An Image is Worth 16x16 Words" (Dosovitskiy et al., 2020) and of torchvision's
`VisionTransformer`; `from_torchvision_state_dict` maps torchvision's weights onto ours one tensor to one tensor.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import trainkit
from trainkit import PRECISIONS, Precision, choose_precision
from trainkit.pictures import plot_attention_maps, plot_classifier_curves

# --------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ViTConfig:
    """Everything that fixes the shape of the model. `VisionTransformer(config)` builds exactly this."""

    image_size: int = 64  # square images of image_size x image_size pixels
    patch_size: int = 8  # each patch_size x patch_size patch becomes one token
    dim: int = 96  # width of the residual stream (torchvision: hidden_dim)
    depth: int = 4  # number of encoder blocks (torchvision: num_layers)
    n_heads: int = 3  # attention heads; head_dim = dim // n_heads
    mlp_dim: int = 192  # hidden width of the MLP in each block
    dropout: float = 0.0  # after the position embedding, the attention output and inside the MLP
    attention_dropout: float = 0.0  # on the attention probabilities
    num_classes: int = 2
    in_channels: int = 3

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "dim", "depth", "n_heads", "mlp_dim", "num_classes",
                     "in_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ViTConfig.{name} must be a positive integer, got {value!r}")
        if self.num_classes < 2:
            raise ValueError(f"ViTConfig.num_classes must be at least 2, got {self.num_classes}")
        if self.image_size % self.patch_size != 0:
            raise ValueError(f"ViTConfig: image_size {self.image_size} is not divisible by patch_size "
                             f"{self.patch_size}")
        if self.dim % self.n_heads != 0:
            raise ValueError(f"ViTConfig: dim {self.dim} is not divisible by n_heads {self.n_heads}")
        for name in ("dropout", "attention_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"ViTConfig.{name} must be in [0, 1), got {value!r}")

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


# --------------------------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------------------------


class PatchEmbedding(nn.Module):
    """Cuts the image into non-overlapping patch_size x patch_size patches and projects each to a dim vector.

    A Conv2d with kernel = stride = patch_size is exactly "flatten each patch, multiply by one shared matrix".
    """

    def __init__(self, patch_size: int, dim: int, in_channels: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, N, dim) tokens, N = (H/p)(W/p), patches in row-major order."""
        # EXERCISE patch_embedding: apply self.proj (B, dim, H/p, W/p), then flatten the grid to (B, N, dim)
        x = self.proj(images)
        return x.flatten(2).transpose(1, 2)
        # END EXERCISE


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention: softmax(Q K^T / sqrt(head_dim)) V in each head, heads concatenated, projected.

    `qkv` holds W_q, W_k, W_v stacked (the same layout as nn.MultiheadAttention's in_proj_weight), `proj` is W_o.
    """

    def __init__(self, dim: int, n_heads: int, attention_dropout: float = 0.0) -> None:
        super().__init__()
        if dim % n_heads != 0:
            raise ValueError(f"MultiHeadSelfAttention: dim {dim} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(attention_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, dim) -> (B, N, dim)."""
        B, N, D = x.shape
        # one matmul for q, k and v; split dim into (3, heads, head_dim) -> three (B, heads, N, head_dim)
        q, k, v = self.qkv(x).view(B, N, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        # EXERCISE attention: softmax(q k^T / sqrt(head_dim)) @ v per head, heads merged to (B, N, dim), then self.proj
        scores = (q * self.scale) @ k.transpose(-2, -1)  # (B, heads, N, N); scaling q is cheaper than scores
        weights = self.attn_drop(scores.softmax(dim=-1))  # each query's weights over the keys sum to 1
        out = (weights @ v).transpose(1, 2).reshape(B, N, D)  # concatenate the heads again
        return self.proj(out)
        # END EXERCISE


class MLP(nn.Module):
    """Position-wise feed-forward network: Linear(dim, mlp_dim) -> GELU -> Linear(mlp_dim, dim)."""

    def __init__(self, dim: int, mlp_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # exact (erf) GELU, as in the ViT paper and torchvision
        return self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(x)))))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + Attention(LN(x)), then x + MLP(LN(x)).

    Normalising before each sublayer (not after, as in the 2017 Transformer) keeps the residual path an identity,
    which is what lets deep ViTs train without careful warmup tricks.
    """

    def __init__(self, dim: int, n_heads: int, mlp_dim: int, dropout: float = 0.0,
                 attention_dropout: float = 0.0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)  # eps 1e-6 as in the original ViT and torchvision
        self.self_attention = MultiHeadSelfAttention(dim, n_heads, attention_dropout)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, mlp_dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, dim) -> (B, N, dim)."""
        # EXERCISE encoder_block: x = x + dropout(self_attention(ln_1(x))); return x + mlp(ln_2(x))
        x = x + self.dropout(self.self_attention(self.ln_1(x)))
        return x + self.mlp(self.ln_2(x))
        # END EXERCISE


# --------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------


class VisionTransformer(nn.Module):
    """ViT: patch tokens + a learned class token, plus learned position embeddings, through `depth` encoder
    blocks, a final LayerNorm, and a linear head that reads the class token. `forward(images)` returns logits."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.patch_embedding = PatchEmbedding(c.patch_size, c.dim, c.in_channels)
        self.class_token = nn.Parameter(torch.zeros(1, 1, c.dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, c.n_patches + 1, c.dim))  # +1: the class token
        self.dropout = nn.Dropout(c.dropout)
        self.layers = nn.ModuleList(
            EncoderBlock(c.dim, c.n_heads, c.mlp_dim, c.dropout, c.attention_dropout) for _ in range(c.depth))
        self.ln = nn.LayerNorm(c.dim, eps=1e-6)
        self.head = nn.Linear(c.dim, c.num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # truncated normal(0.02) for the projections and the position embedding (BERT/timm), zero biases,
        # and a zero head so every class starts at the same logit.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.pos_embedding, std=0.02)
        nn.init.zeros_(self.class_token)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, image_size, image_size) float images -> (B, num_classes) logits."""
        c = self.config
        if images.dim() != 4 or images.shape[1:] != (c.in_channels, c.image_size, c.image_size):
            raise ValueError(f"VisionTransformer expects images of shape (B, {c.in_channels}, {c.image_size}, "
                             f"{c.image_size}), got {tuple(images.shape)}")
        x = self.patch_embedding(images)  # (B, N, dim)
        cls = self.class_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embedding  # (B, N+1, dim)
        x = self.dropout(x)
        for layer in self.layers:
            x = layer(x)
        x = self.ln(x)
        return self.head(x[:, 0])  # classify from the class token only

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def configure_optimizer(self, lr: float, weight_decay: float) -> torch.optim.AdamW:
        """AdamW that decays only the matrices (and conv kernels); biases, LayerNorms, the class token and the
        position embedding are not pulled towards zero."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.dim() >= 2 and name not in ("class_token", "pos_embedding"):
                decay.append(p)
            else:
                no_decay.append(p)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))


def from_torchvision_state_dict(tv_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames the tensors of a `torchvision.models.vision_transformer.VisionTransformer` to ours (same shapes,
    nothing else changes), so `model.load_state_dict(from_torchvision_state_dict(tv.state_dict()))` works."""
    renames = [
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
        for old, new in renames:
            name = name.replace(old, new)
        ours[name] = tensor
    return ours


# --------------------------------------------------------------------------------------------------------------
# Data: Hugging Face datasets -> decoded once into a uint8 tensor cache -> augmented on tensors
# --------------------------------------------------------------------------------------------------------------

MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics; any fixed per-channel scaling works for training from scratch
STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class UserError(Exception):
    """A problem with the user's input: main() prints its message on one line and exits non-zero."""


@dataclass
class ImageCache:
    """A split decoded once: uint8 images (N, 3, S, S), int64 labels (N,), and how many files were unreadable."""

    images: torch.Tensor
    labels: torch.Tensor
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.labels)


def decode_image(source: object, size: int):
    """Any image (path, bytes or PIL) -> RGB uint8 tensor (3, size, size): short side resized, centre cropped.

    Grayscale, palette, RGBA and CMYK all go through convert("RGB"). Raises OSError/ValueError when unreadable."""
    from PIL import Image, ImageOps

    if isinstance(source, (bytes, bytearray)):
        img = Image.open(io.BytesIO(source))
    elif isinstance(source, (str, os.PathLike)):
        img = Image.open(source)
    else:
        img = source
    if getattr(img, "format", None) == "JPEG":
        img.draft("RGB", (size * 2, size * 2))  # let libjpeg decode at 1/2..1/8 scale: several times faster
    img = ImageOps.fit(img.convert("RGB"), (size, size), Image.Resampling.BICUBIC)
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)


def cache_split(ds, image_col: str, label_col: str, size: int, desc: str) -> ImageCache:
    """Decodes every image of a Hugging Face split once; unreadable files are skipped and counted."""
    from datasets import Image as ImageFeature
    from tqdm.auto import tqdm

    ds = ds.cast_column(image_col, ImageFeature(decode=False))  # we decode ourselves, so bad files can't crash
    images, labels, skipped = [], [], 0
    for row in tqdm(ds, desc=f"decoding {desc}", unit="img", leave=False, mininterval=1.0,
                    disable=not sys.stderr.isatty()):
        item = row[image_col]
        try:
            source = item["bytes"] if item.get("bytes") else item["path"]
            images.append(decode_image(source, size))
            labels.append(int(row[label_col]))
        except (OSError, ValueError, SyntaxError, TypeError, KeyError, AttributeError):
            skipped += 1  # corrupt, truncated or not an image at all
    if not images:
        raise UserError(f"no readable images in the {desc} split ({skipped} files could not be decoded)")
    return ImageCache(torch.stack(images), torch.tensor(labels, dtype=torch.long), skipped)


def check_image_folder(data_dir: Path) -> None:
    """Clear errors for the usual mistakes before `datasets` sees the folder."""
    if not data_dir.exists():
        raise UserError(f"--data-dir {data_dir}: no such folder")
    if not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir}: not a folder")
    train = data_dir / "train"
    if not train.is_dir():
        raise UserError(f"--data-dir {data_dir}: expected a train/ folder with one subfolder per class "
                        f"(train/cats/*.jpg, train/dogs/*.jpg, ...)")
    classes = [d.name for d in sorted(train.iterdir())
               if d.is_dir() and any(f.suffix.lower() in IMAGE_EXTENSIONS for f in d.iterdir())]
    if not classes:
        raise UserError(f"--data-dir {data_dir}: train/ has no class subfolders with images "
                        f"(expected train/<class name>/<image files>)")
    if len(classes) < 2:
        raise UserError(f"--data-dir {data_dir}: train/ has only one class ({classes[0]}); "
                        f"a classifier needs at least two")


def find_columns(features) -> tuple[str, str]:
    """The image column (an Image feature) and the label column (a ClassLabel) of a Hugging Face dataset."""
    from datasets import ClassLabel, Image as ImageFeature

    image_cols = [k for k, f in features.items() if isinstance(f, ImageFeature)]
    label_cols = [k for k, f in features.items() if isinstance(f, ClassLabel)]
    if not image_cols or not label_cols:
        raise UserError(f"dataset has no image column with a class-label column (features: {list(features)}); "
                        f"expected an image-classification dataset")
    prefer = [c for c in label_cols if c in ("label", "labels")]
    return image_cols[0], (prefer or label_cols)[0]


def load_splits(args: argparse.Namespace, need_train: bool = True):
    """(train split or None, validation split, image column, label column, class names) as HF datasets."""
    try:
        from datasets import load_dataset
    except ImportError as e:
        raise UserError(f"the `datasets` package is needed ({e}); pip install datasets") from None

    if args.data_dir:
        data_dir = Path(args.data_dir)
        check_image_folder(data_dir)
        source = f"--data-dir {data_dir}"
        try:
            splits = load_dataset("imagefolder", data_dir=str(data_dir))
        except Exception as e:  # datasets raises many types; the user only needs the first line
            raise UserError(f"{source}: could not be loaded as an image folder: {str(e).splitlines()[0]}") from None
    else:
        name = args.dataset
        source = f"dataset {name!r}"
        try:
            import huggingface_hub

            huggingface_hub.utils.logging.set_verbosity_error()  # one error line below, not a page of retries
            splits = load_dataset(name)
        except Exception as e:
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise UserError(f"could not load {source} from the Hugging Face Hub ({type(e).__name__}: {first}); "
                            f"offline? use --data-dir DIR with train/ and validation/ class subfolders") from None
    if "train" not in splits:
        raise UserError(f"{source} has no 'train' split (splits: {list(splits)})")
    image_col, label_col = find_columns(splits["train"].features)
    class_names = list(splits["train"].features[label_col].names)
    val_name = next((s for s in ("validation", "valid", "val", "test") if s in splits), None)
    if val_name is not None:
        train, val = splits["train"], splits[val_name]
    else:  # one split only (microsoft/cats_vs_dogs): carve a seeded validation set with the same class balance
        parts = splits["train"].train_test_split(test_size=args.val_fraction, seed=args.seed,
                                                 stratify_by_column=label_col)
        train, val = parts["train"], parts["test"]
    if args.max_train_samples and len(train) > args.max_train_samples:
        train = train.shuffle(seed=args.seed).select(range(args.max_train_samples))
    return (train if need_train else None), val, image_col, label_col, class_names


class AugmentedImages(torch.utils.data.Dataset):
    """Training images from the uint8 cache, each augmented on its own (random crop, flip, colour).

    Items are asked for as (epoch, index) (trainkit.EpochSampler) and each augmentation is seeded by the seed, the
    epoch and the index: an image gets the same crop whichever process or DataLoader worker draws it, so N
    processes train on exactly the images one would, and a resumed run on those the stopped run would have."""

    def __init__(self, cache: ImageCache, transform, seed: int = 0) -> None:
        self.cache, self.transform, self.seed = cache, transform, seed

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        # torchvision's transforms draw from the global CPU generator: seed it for this image, then put its
        # state back. (The generator's own calls take microseconds; torch.manual_seed and fork_rng, which also
        # visit the GPU generators, cost ~0.1 ms an image, a fifth of the default run's time per image.)
        generator = torch.random.default_generator
        state = generator.get_state()
        generator.manual_seed((self.seed * 1_000_003 + epoch) * len(self) + i)
        try:
            return self.transform(self.cache.images[i]), self.cache.labels[i]
        finally:
            generator.set_state(state)


def train_transform(image_size: int, augment: str):
    """torchvision.transforms.v2 on uint8 tensors. 'light': random resized crop + flip; 'strong' adds
    TrivialAugment (one random photometric/geometric op per image, Mueller & Hutter 2021)."""
    from torchvision.transforms import v2

    if augment == "none":
        return v2.Resize((image_size, image_size), antialias=True)
    ops = [v2.RandomResizedCrop(image_size, scale=(0.35, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    if augment == "strong":
        ops.append(v2.TrivialAugmentWide())
    return v2.Compose(ops)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float, per-channel standardised."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


# --------------------------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_precision(flag: str, device: torch.device, config: ViTConfig, batch_size: int) -> Precision:
    """--precision on this device; auto times a matmul shaped like the model's MLP on a batch of tokens,
    see trainkit.choose_precision."""
    tokens = min(batch_size * (config.n_patches + 1), 4096)
    return choose_precision(flag, device, (tokens, config.dim, config.mlp_dim))


def lr_at(progress: float, base_lr: float, warmup: float, min_ratio: float = 0.01) -> float:
    """Linear warmup over the first `warmup` fraction of training, then cosine decay to min_ratio * base_lr.
    `progress` in [0, 1] is max(steps done / all steps, time used / time budget), so a time budget still ends
    on a fully decayed learning rate."""
    if progress < warmup:
        return base_lr * (progress + 1e-3) / warmup
    t = min(1.0, (progress - warmup) / max(1e-8, 1.0 - warmup))
    return base_lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t)))


@torch.no_grad()
def predict_logits(model: VisionTransformer, images: torch.Tensor, device: torch.device,
                   precision: Precision | None = None, batch_size: int = 256, tta: bool = False) -> torch.Tensor:
    """Logits (float32, on CPU) for uint8 images; with tta the logits of the image and its mirror are averaged."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = normalize(images[i:i + batch_size].to(device))
        with precision.autocast() if precision else contextlib.nullcontext():
            logits = model(x).float()
            if tta:
                logits = 0.5 * (logits + model(x.flip(-1)).float())
        out.append(logits.cpu())
    return torch.cat(out)


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor, n: int) -> list[list[int]]:
    """m[i][j] = number of images of true class i predicted as class j."""
    m = torch.zeros(n, n, dtype=torch.long)
    m.index_put_((labels, preds), torch.ones_like(labels), accumulate=True)
    return m.tolist()


def evaluate(model: VisionTransformer, cache: ImageCache, class_names: list[str], device: torch.device,
             precision: Precision | None = None, tta: bool = False) -> dict:
    """Accuracy, per-class accuracy and confusion matrix of `model` on a cached split."""
    part = trainkit.shard_rows(len(cache))  # under torchrun each process predicts every N-th image
    preds = trainkit.gather_rows(predict_logits(model, cache.images[part], device, precision, tta=tta).argmax(-1),
                                 len(cache))
    cm = confusion_matrix(cache.labels, preds, len(class_names))
    per_class = {name: (row[i] / sum(row) if sum(row) else float("nan")) for i, (name, row) in
                 enumerate(zip(class_names, cm))}
    return {"accuracy": (preds == cache.labels).float().mean().item(), "per_class_accuracy": per_class,
            "confusion_matrix": cm, "predictions": preds}


def save_checkpoint(path: Path, model: VisionTransformer, class_names: list[str], extra: dict) -> None:
    """state_dict + config as a plain dict + class names, written to a temporary file and renamed, so a
    crash or Ctrl-C never leaves half a checkpoint behind. Loads with torch.load(weights_only=True)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    trainkit.atomic_save({"model": state, "config": asdict(model.config), "class_names": list(class_names), **extra},
                         path)


def load_checkpoint(path: Path, device: torch.device) -> tuple[VisionTransformer, list[str]]:
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; train first (python transformer.py ...) or pass "
                        f"--checkpoint PATH")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model = VisionTransformer(ViTConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["model"])
    except Exception as e:
        raise UserError(f"checkpoint {path} could not be loaded: {str(e).splitlines()[0]}") from None
    return model.to(device).eval(), list(ckpt["class_names"])


def save_prediction_grid(path: Path, cache: ImageCache, preds: torch.Tensor, class_names: list[str],
                         n: int = 16, seed: int = 0) -> None:
    """A 4x4 grid of validation images titled 'predicted (true)', green when right and red when wrong."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(cache), generator=g)[:n].tolist()
    cols = 4
    rows = max(1, math.ceil(len(idx) / cols))
    fig = trainkit.pictures.new_figure(2.2 * cols, 2.4 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, idx):
        p, t = int(preds[i]), int(cache.labels[i])
        ax.imshow(cache.images[i].permute(1, 2, 0).numpy())
        ax.set_title(f"{class_names[p]} ({class_names[t]})", color="green" if p == t else "red", fontsize=9)
    fig.suptitle("predicted (true)", fontsize=10)
    trainkit.pictures.save_figure(fig, path, dpi=100)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def train(args: argparse.Namespace, config: ViTConfig, pretrained: VisionTransformer | None = None) -> dict:
    """Trains, validates after each epoch, keeps the best checkpoint, writes metrics.json and the grid.
    pretrained: start from this model (its size and image size, a new head for the data's classes)."""
    from tqdm.auto import tqdm

    seed_everything(args.seed)
    device = trainkit.init_distributed(pick_device(args.device))  # under torchrun: join the other processes
    out_dir = Path(args.output_dir)
    ckpt_path = Path(args.checkpoint) if args.checkpoint else out_dir / "vit_cats_vs_dogs.pth"

    t_start = time.perf_counter()
    with trainkit.main_first():  # under torchrun: one process fills the datasets cache, the others read it
        train_ds, val_ds, image_col, label_col, class_names = load_splits(args)
    if pretrained is not None:
        pretrained = with_new_head(pretrained, len(class_names))
        config = pretrained.config
    if len(class_names) != config.num_classes:
        config = ViTConfig(**{**asdict(config), "num_classes": len(class_names)})
    cache_size = max(config.image_size, round(config.image_size * args.cache_scale))
    train_cache = cache_split(train_ds, image_col, label_col, cache_size, "train")
    val_cache = cache_split(val_ds, image_col, label_col, config.image_size, "validation")
    data_seconds = time.perf_counter() - t_start
    skipped = train_cache.skipped + val_cache.skipped
    print(f"data: {len(train_cache)} train / {len(val_cache)} validation images, classes {class_names}, "
          f"{skipped} unreadable files skipped, decoded in {data_seconds:.1f}s")

    try:
        local_batch = trainkit.per_process_batch(args.batch_size)
    except ValueError as e:
        raise UserError(str(e)) from None
    # Measured on rank 0 and used by all: every process must compute in the same precision.
    precision = trainkit.same_on_all(pick_precision(args.precision, device, config, local_batch))
    print(precision.describe())
    print(f"batch: {args.batch_size} images per step, {trainkit.world_size()} process(es) x {local_batch}")
    model = (VisionTransformer(config) if pretrained is None else pretrained).to(device)
    print(f"model: {model.num_parameters() / 1e6:.2f}M parameters, {config.n_patches + 1} tokens, device "
          f"{device.type}, {precision.name}, threads {torch.get_num_threads()}")
    optimizer = model.configure_optimizer(args.lr, args.weight_decay)
    scaler = precision.grad_scaler()  # fp16 only: loss scaling; for fp32 and bf16 it passes calls through
    g = torch.Generator().manual_seed(args.seed)
    last_path = trainkit.last_checkpoint_path(ckpt_path)
    state = read_resume_state(last_path, config, args) if args.resume else None
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state["scaler"] and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
    # Under torchrun, DistributedDataParallel averages the gradients over the processes in backward.
    # torch.compile fuses the small elementwise ops (LayerNorm, GELU, softmax) between the matmuls; the compiled
    # module shares its parameters with `model`, so checkpoints and evaluation use `model` as usual.
    forward = trainkit.wrap_ddp(model, device)
    forward = torch.compile(forward) if args.compile else forward

    # Each process draws its share of every global batch: the sampler shuffles by seed and epoch.
    sampler = trainkit.EpochSampler(len(train_cache), args.seed)
    loader = torch.utils.data.DataLoader(
        AugmentedImages(train_cache, train_transform(config.image_size, args.augment), args.seed),
        batch_size=local_batch, sampler=sampler, drop_last=len(train_cache) > args.batch_size,
        generator=torch.Generator().manual_seed(args.seed), num_workers=args.workers,
        persistent_workers=args.workers > 0)
    mix = None
    if args.mixup > 0 or args.cutmix > 0:
        from torchvision.transforms import v2

        choices = ([v2.MixUp(alpha=args.mixup, num_classes=config.num_classes)] if args.mixup > 0 else []) + \
                  ([v2.CutMix(alpha=args.cutmix, num_classes=config.num_classes)] if args.cutmix > 0 else [])
        mix = v2.RandomChoice(choices)

    steps_total = args.epochs * len(loader)
    budget_s = args.time_budget * 60 if args.time_budget else None
    history, best_acc, step, images_seen, train_seconds = [], -1.0, 0, 0, 0.0
    first_epoch, first_batch, sums, elapsed = 1, 0, (0.0, 0, 0), 0.0
    if state:  # continue the stopped run where it stopped: epoch, batch, counts, clock and random generators
        history, best_acc, step, images_seen, train_seconds = (state[k] for k in (
            "history", "best_acc", "step", "images_seen", "train_seconds"))
        first_epoch, first_batch, sums, elapsed = state["epoch"], state["batch"], tuple(state["sums"]), state["elapsed"]
        trainkit.set_rng_state(state["rng"])
        g.set_state(state["mix_rng"])
    train_loss = train_acc = float("nan")
    if history:  # a resumed run that has no epoch left still reports the last one's figures
        train_loss, train_acc = history[-1]["train_loss"], history[-1]["train_accuracy"]
    t_train = time.perf_counter() - elapsed  # a resumed run's clock starts where the stopped one ended
    interrupted, signum = False, 0
    stop = trainkit.StopRequest().install()  # until stop.remove(): SIGINT and SIGTERM only raise a flag
    curves_path, curves_drawn = out_dir / "vit_curves.png", -math.inf
    train_note = "on MixUp/CutMix batches" if mix is not None else ""

    def snapshot(epoch, batch, sums):
        """Everything a resumed run needs to go on from batch `batch` of epoch `epoch`."""
        return {"model": model.state_dict(), "config": asdict(config), "class_names": class_names,
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch, "batch": batch,
                "sums": list(sums), "step": step, "images_seen": images_seen, "train_seconds": train_seconds,
                "elapsed": elapsed, "history": history, "best_acc": best_acc, "rng": trainkit.rng_state(),
                "mix_rng": g.get_state(), "args": {k: getattr(args, k) for k in RESUME_FLAGS}}

    try:
        for epoch in range(first_epoch, args.epochs + 1):
            model.train()
            sampler.set_epoch(epoch)
            sampler.start = first_batch * local_batch if epoch == first_epoch else 0
            loss_sum, correct, count = sums if epoch == first_epoch else (0.0, 0, 0)
            batch, t_epoch = sampler.start // local_batch, time.perf_counter()
            bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, mininterval=1.0,
                       disable=args.quiet or not sys.stderr.isatty() or not trainkit.is_main())
            for images, labels in bar:
                progress = step / steps_total
                if budget_s:
                    progress = max(progress, elapsed / budget_s)
                lr = lr_at(min(progress, 1.0), args.lr, args.warmup)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x, y = normalize(images.to(device)), labels.to(device)
                target = y
                if mix is not None and torch.rand((), generator=g).item() < args.mix_prob:
                    x, target = mix(x, y)  # soft targets: a blend of two images and of their labels
                with precision.autocast():
                    logits = forward(x)
                loss = F.cross_entropy(logits.float(), target, label_smoothing=args.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
                scaler.step(optimizer)  # fp16: skipped when a gradient overflowed (the scale then shrinks)
                scaler.update()
                step, batch = step + 1, batch + 1
                # Sums over all processes, and agreed stops: the first to reach the time budget, or a signal
                # to any process, stops them all after this step.
                batch_sums = trainkit.all_reduce([loss.item() * len(y), (logits.argmax(-1) == y).sum().item(), len(y)])
                loss_sum, correct, count = (a + b for a, b in zip((loss_sum, correct, count), batch_sums))
                elapsed, signum = trainkit.all_reduce([time.perf_counter() - t_train, stop.signum], op="max")
                rate = count / (time.perf_counter() - t_epoch)
                bar.set_postfix(loss=f"{loss_sum / count:.3f}", acc=f"{correct / count:.3f}", img_s=f"{rate:.0f}")
                if signum or (budget_s and elapsed >= budget_s):
                    break
            bar.close()
            if signum:  # SIGTERM or Ctrl-C: keep the run where it stopped; evaluation waits for the resumed run
                train_seconds += time.perf_counter() - t_epoch
                if trainkit.is_main():
                    trainkit.atomic_save(snapshot(epoch, batch, (loss_sum, correct, count)), last_path)
                    print(f"stopped by {signal.Signals(int(signum)).name} in epoch {epoch}; {last_path} holds the "
                          f"run: add --resume to the same command to continue it", file=sys.stderr)
                # Rank 0 reports the stop; another rank exiting non-zero would make torchrun kill rank 0 mid-save.
                return {"signal": int(signum)} if trainkit.is_main() else {}
            train_seconds += time.perf_counter() - t_epoch
            images_seen += count
            train_loss, train_acc = loss_sum / max(1, count), correct / max(1, count)
            val = evaluate(model, val_cache, class_names, device, precision, tta=args.tta)
            history.append({"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_acc,
                            "val_accuracy": val["accuracy"], "lr": optimizer.param_groups[0]["lr"]})
            print(f"epoch {epoch:3d}  train loss {train_loss:.3f} acc {train_acc:.3f}  val acc "
                  f"{val['accuracy']:.3f}  {count / (time.perf_counter() - t_epoch):.0f} img/s  "
                  f"{time.perf_counter() - t_train:.0f}s", flush=True)
            if trainkit.is_main() and time.perf_counter() - curves_drawn >= CURVES_EVERY_S:  # ~0.2 s a drawing
                plot_classifier_curves(curves_path, history, curves_title(model, device, precision), train_note)
                curves_drawn = time.perf_counter()
            if val["accuracy"] > best_acc:
                best_acc = val["accuracy"]
                if trainkit.is_main():
                    save_checkpoint(ckpt_path, model, class_names, {"epoch": epoch, "val_accuracy": best_acc})
            if trainkit.is_main():  # an epoch ended on the time budget counts as done: a resumed run starts the next
                trainkit.atomic_save(snapshot(epoch + 1, 0, (0.0, 0, 0)), last_path)
            if budget_s and elapsed >= budget_s:
                break
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: saving and reporting what was trained so far", file=sys.stderr)
    finally:
        stop.remove()

    final = evaluate(model, val_cache, class_names, device, precision, tta=args.tta)
    if not trainkit.is_main():  # rank 0 alone writes the checkpoint, the grid and metrics.json
        return {}
    if final["accuracy"] > best_acc or not ckpt_path.exists():
        best_acc = final["accuracy"]
        save_checkpoint(ckpt_path, model, class_names, {"epoch": len(history), "val_accuracy": best_acc})
    grid_path = out_dir / "vit_predictions.png"
    save_prediction_grid(grid_path, val_cache, final["predictions"], class_names, seed=args.seed)
    metrics = {
        "final_train_loss": train_loss, "final_train_accuracy": train_acc,
        "val_accuracy": final["accuracy"], "best_val_accuracy": best_acc,
        "per_class_accuracy": final["per_class_accuracy"], "confusion_matrix": final["confusion_matrix"],
        "class_names": class_names, "epochs": len(history), "steps": step,
        "train_images_per_second": images_seen / max(train_seconds, 1e-9),
        "train_seconds": train_seconds, "data_seconds": data_seconds,
        "wall_seconds": time.perf_counter() - t_start, "peak_rss_mb": peak_rss_mb(),
        "train_images": len(train_cache), "val_images": len(val_cache), "skipped_files": skipped,
        "parameters": model.num_parameters(), "config": asdict(config), "device": device.type,
        "precision": precision.name, "precision_reason": precision.reason, "interrupted": interrupted, "history": history,
        "args": {k: v for k, v in vars(args).items() if k not in ("predict",)},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print_report(metrics, class_names)
    print(f"saved {ckpt_path}, {out_dir / 'metrics.json'}, {grid_path}")
    if history:
        plot_classifier_curves(curves_path, history, curves_title(model, device, precision), train_note)
    idx = torch.randperm(len(val_cache), generator=torch.Generator().manual_seed(args.seed))[:ATTENTION_IMAGES]
    titles = [f"{class_names[int(final['predictions'][i])]} ({class_names[int(val_cache.labels[i])]})" for i in idx]
    attention_path = save_attention_picture(out_dir / "vit_attention.png", model, val_cache.images[idx], titles,
                                            device, "validation images, predicted (true)")
    print(f"pictures: {curves_path if history else '(no epoch finished: no curves)'}, {attention_path}")
    return metrics


CURVES_EVERY_S = 10.0  # redraw vit_curves.png after an epoch when this many seconds have passed since the last


def curves_title(model: VisionTransformer, device: torch.device, precision: Precision) -> str:
    c = model.config
    return (f"transformer.py: ViT {model.num_parameters() / 1e6:.2f}M parameters ({c.image_size} px, patch "
            f"{c.patch_size}, dim {c.dim}, {c.depth} blocks), {device.type}, {precision.name}")


def read_resume_state(path: Path, config: ViTConfig, args: argparse.Namespace) -> dict:
    """The last checkpoint of a stopped run, checked against the model and training flags of this one."""
    if not path.is_file():
        raise UserError(f"--resume: no last checkpoint at {path}; it is written beside --checkpoint after every "
                        f"epoch (start without --resume)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved_config, saved_args = state["config"], state["args"]
    except Exception as e:
        raise UserError(f"--resume: {path} is not a last checkpoint written by transformer.py "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    try:
        trainkit.runs.resume_changes(saved_config, asdict(config))
        changes = trainkit.runs.resume_changes(saved_args, {k: getattr(args, k) for k in RESUME_FLAGS},
                                          may_change=("epochs", "time_budget"))
    except ValueError as e:
        raise UserError(f"--resume {path}: {e}") from None
    for change in changes:
        print(f"resume: {change}")
    print(f"resuming from {path} at epoch {state['epoch']}, step {state['step']} "
          f"({state['elapsed']:.0f}s trained so far)")
    return state


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


def run_predict(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    checkpoint = Path(args.checkpoint or Path(args.output_dir) / "vit_cats_vs_dogs.pth")
    model, class_names = load_checkpoint(checkpoint, device)
    size = model.config.image_size
    shown, titles = [], []
    for path in args.predict:
        try:
            image = decode_image(path, size).unsqueeze(0)
        except (OSError, ValueError, SyntaxError) as e:
            raise UserError(f"cannot read image {path}: {e}") from None
        probs = predict_logits(model, image, device, None)[0].softmax(-1)
        ranked = sorted(zip(class_names, probs.tolist()), key=lambda t: -t[1])
        print(f"{path}: " + "  ".join(f"{name} {p:.3f}" for name, p in ranked))
        if len(shown) < ATTENTION_MAX_PREDICT:
            shown.append(image)
            titles.append(f"{Path(path).name[:18]}: {ranked[0][0]} {ranked[0][1]:.2f}")
    # beside the checkpoint (by default in --output-dir); a note on stderr keeps stdout to the predictions
    picture = save_attention_picture(checkpoint.parent / "vit_attention_predict.png", model, torch.cat(shown),
                                     titles, device, "where the class token looks")
    more = f" (the first {ATTENTION_MAX_PREDICT} images)" if len(args.predict) > ATTENTION_MAX_PREDICT else ""
    print(f"attention maps{more}: {picture}", file=sys.stderr)


def run_eval_only(args: argparse.Namespace) -> dict:
    device = pick_device(args.device)
    model, class_names = load_checkpoint(Path(args.checkpoint or Path(args.output_dir) / "vit_cats_vs_dogs.pth"),
                                         device)
    _, val_ds, image_col, label_col, data_classes = load_splits(args, need_train=False)
    if data_classes != class_names:
        raise UserError(f"checkpoint classes {class_names} differ from the data's classes {data_classes}")
    cache = cache_split(val_ds, image_col, label_col, model.config.image_size, "validation")
    precision = pick_precision(args.precision, device, model.config, args.batch_size)
    print(precision.describe())
    result = evaluate(model, cache, class_names, device, precision, tta=args.tta)
    print(f"validation accuracy {result['accuracy']:.4f} on {len(cache)} images ({cache.skipped} unreadable skipped)")
    print("per-class accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in result["per_class_accuracy"].items()))
    print_confusion(result["confusion_matrix"], class_names)
    return result


# --------------------------------------------------------------------------------------------------------------
# Looking inside: where the class token attends
# --------------------------------------------------------------------------------------------------------------
# The maps are computed from each block's own W_q and W_k and the input its attention received, captured by a
# forward pre-hook; MultiHeadSelfAttention.forward is not asked for its weights, so the maps are the same however
# it is written (an explicit softmax, F.scaled_dot_product_attention, ...).

ATTENTION_IMAGES = 4  # validation images in the attention picture written after training
ATTENTION_MAX_PREDICT = 8  # --predict draws the maps of at most this many images


def attention_probabilities(x: torch.Tensor, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor | None,
                            n_heads: int) -> torch.Tensor:
    """softmax(Q K^T / sqrt(head_dim)) of each head, (B, heads, N, N), for attention inputs x (B, N, dim).

    qkv_weight (3 dim, dim) stacks W_q, W_k, W_v as nn.MultiheadAttention's in_proj_weight does; V is not
    needed for the weights, so only the first 2 dim rows are used."""
    B, N, D = x.shape
    head_dim = D // n_heads
    bias = qkv_bias[:2 * D] if qkv_bias is not None else None
    q, k = F.linear(x.float(), qkv_weight[:2 * D].float(), bias.float() if bias is not None else None) \
        .view(B, N, 2, n_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
    return (q @ k.transpose(-2, -1) / math.sqrt(head_dim)).softmax(dim=-1)


@torch.no_grad()
def attention_inputs(model: VisionTransformer, images: torch.Tensor) -> list[torch.Tensor]:
    """What each block's self-attention receives (LN_1 of its input), (B, N+1, dim) per block, from one forward
    pass over normalised images; forward pre-hooks on the attention modules catch it on the way in."""
    captured: list[torch.Tensor] = []

    def catch(module, args, kwargs):
        captured.append((args[0] if args else next(iter(kwargs.values()))).detach().float())

    hooks = [layer.self_attention.register_forward_pre_hook(catch, with_kwargs=True) for layer in model.layers]
    try:
        model.eval()
        model(images)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


@torch.no_grad()
def attention_weights(model: VisionTransformer, images: torch.Tensor) -> list[torch.Tensor]:
    """The attention probabilities of every block, a list of (B, heads, N+1, N+1); index 0 is the class token."""
    return [attention_probabilities(x, layer.self_attention.qkv.weight, layer.self_attention.qkv.bias,
                                    layer.self_attention.n_heads)
            for x, layer in zip(attention_inputs(model, images), model.layers)]


def attention_rollout(attentions: list[torch.Tensor]) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): how much each output token draws on each input token through
    all the blocks. Per block: average the heads, add the identity for the residual connection and renormalise
    each row, A = (mean_h A_h + I) / 2; then multiply the blocks in order, R = A_L ... A_2 A_1. (B, N, N)."""
    n = attentions[0].shape[-1]
    rollout = torch.eye(n, device=attentions[0].device).expand(attentions[0].shape[0], n, n)
    for a in attentions:
        a = a.float().mean(dim=1) + torch.eye(n, device=a.device)
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a @ rollout
    return rollout


def class_token_maps(model: VisionTransformer, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Where the class token looks, as (B, grid, grid) maps over the patches: in the last block (heads
    averaged) and through all the blocks (rollout). images: normalised floats, on the model's device."""
    attentions = attention_weights(model, images)
    grid = model.config.image_size // model.config.patch_size
    last = attentions[-1].mean(dim=1)[:, 0, 1:]  # the class token's row, without its weight on itself
    rolled = attention_rollout(attentions)[:, 0, 1:]
    return {"class token, last block": last.reshape(-1, grid, grid).cpu(),
            "attention rollout, all blocks": rolled.reshape(-1, grid, grid).cpu()}


def save_attention_picture(path: Path, model: VisionTransformer, images: torch.Tensor, titles: list[str],
                           device: torch.device, title: str = "") -> Path:
    """Draws the class token's maps over uint8 images (B, 3, H, W) into a PNG: one row per image."""
    maps = class_token_maps(model, normalize(images.to(device)))
    title = (title + "; " if title else "") + "bright: where the class token attends most"
    return plot_attention_maps(path, images.cpu(), maps, titles, title)


# --------------------------------------------------------------------------------------------------------------
# Starting from pretrained weights: torchvision's ImageNet ViTs in our model, a new head for our classes
# --------------------------------------------------------------------------------------------------------------

# The head count cannot be read off the weights' shapes (it only splits dim into heads), so it comes from the
# architecture; every other size is read off the tensors.
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
    if not (torch.allclose(torch.tensor(mean), torch.tensor(MEAN)) and torch.allclose(torch.tensor(std), torch.tensor(STD))):
        raise UserError(f"{name}'s weights expect mean {mean} and std {std}; normalize() uses {MEAN}, {STD}")
    tv_state = load_torchvision_weights(name, weights_path)
    model = VisionTransformer(vit_config_from_torchvision_state_dict(tv_state, PRETRAINED_HEADS[name]))
    try:
        model.load_state_dict(from_torchvision_state_dict(tv_state))
    except RuntimeError as e:
        raise UserError(f"the {name} weights do not fit: {str(e).splitlines()[1].strip()[:160]}") from None
    return model


def with_new_head(model: VisionTransformer, num_classes: int) -> VisionTransformer:
    """The same encoder with a fresh zero head for num_classes classes (every class starts at the same logit)."""
    model.config = ViTConfig(**{**asdict(model.config), "num_classes": num_classes})
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
        return predict_logits(model, images, device, precision, batch_size)
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
    seed_everything(args.seed)
    device = pick_device(args.device)
    out_dir = Path(args.output_dir)
    ckpt_path = Path(args.checkpoint) if args.checkpoint else out_dir / "vit_cats_vs_dogs.pth"
    t_start = time.perf_counter()
    train_ds, val_ds, image_col, label_col, class_names = load_splits(args)
    model = with_new_head(model, len(class_names)).to(device).eval()
    size = model.config.image_size
    train_cache = cache_split(train_ds, image_col, label_col, size, "train")
    val_cache = cache_split(val_ds, image_col, label_col, size, "validation")
    precision = pick_precision(args.precision, device, model.config, args.batch_size)
    print(precision.describe())
    print(f"model: {args.pretrained}, {model.num_parameters():,} parameters, {size}x{size} images; "
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
    cm = confusion_matrix(val_cache.labels, preds, len(class_names))
    val_acc = (preds == val_cache.labels).float().mean().item()
    save_checkpoint(ckpt_path, model, class_names, {"pretrained": args.pretrained, "finetune": "head",
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
        "wall_seconds": time.perf_counter() - t_start, "peak_rss_mb": peak_rss_mb(),
        "train_images": len(train_cache), "val_images": len(val_cache),
        "skipped_files": train_cache.skipped + val_cache.skipped, "parameters": model.num_parameters(),
        "trained_parameters": sum(p.numel() for p in head.parameters()), "config": asdict(model.config),
        "device": device.type, "precision": precision.name, "precision_reason": precision.reason,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print_report(metrics, class_names)
    print(f"saved {ckpt_path}, {out_dir / 'metrics.json'}")
    return metrics


def run_pretrained(args: argparse.Namespace, config: ViTConfig) -> dict:
    model = pretrained_vit(args.pretrained, args.weights)
    print(f"loaded {args.pretrained} ({'--weights ' + args.weights if args.weights else 'torchvision ImageNet'}"
          f"): {model.config.image_size}x{model.config.image_size} images, dim {model.config.dim}, "
          f"{model.config.depth} blocks")
    if args.finetune == "head":
        return run_finetune_head(args, model)
    return train(args, config, pretrained=model)


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------

# Presets fill in every flag the user did not give. "default" finishes in ~15 minutes on 2 CPU cores. On 2,000
# training images a small model wins at a fixed budget: in 3-minute runs dim 96 x 4 blocks (0.33M parameters)
# reached 72% where dim 192 x 6 blocks (1.8M) reached 61%: it sees more epochs and has less to overfit with.
# MixUp/CutMix on half the batches then added about 5 points over epochs 350-400 (see the README).
PRESETS: dict[str, dict] = {
    "default": dict(image_size=64, patch_size=8, dim=96, depth=4, n_heads=3, mlp_dim=192, dropout=0.0,
                    attention_dropout=0.0, epochs=1000, time_budget=14.0, batch_size=64, lr=5e-4,
                    weight_decay=0.05, warmup=0.05, label_smoothing=0.1, augment="strong", mixup=0.8,
                    cutmix=1.0, mix_prob=0.5, cache_scale=1.25, tta=False),
    "smoke": dict(image_size=32, patch_size=8, dim=32, depth=1, n_heads=2, mlp_dim=64, dropout=0.0,
                  attention_dropout=0.0, epochs=1, time_budget=None, batch_size=8, lr=1e-3, weight_decay=0.05,
                  warmup=0.1, label_smoothing=0.1, augment="light", mixup=0.0, cutmix=0.0, mix_prob=0.5,
                  cache_scale=1.25, tta=False),
    # --pretrained (the model's sizes come from the weights). Epochs and lr depend on --finetune: see
    # FINETUNE_DEFAULTS. Not tuned: a starting point, to be measured.
    "finetune": dict(image_size=64, patch_size=8, dim=96, depth=4, n_heads=3, mlp_dim=192, dropout=0.0,
                     attention_dropout=0.0, time_budget=None, batch_size=32, weight_decay=0.05, warmup=0.1,
                     label_smoothing=0.1, augment="light", mixup=0.0, cutmix=0.0, mix_prob=0.5,
                     cache_scale=1.15, tta=False),
}
# What a resumed run must share with the stopped one (the model's shape is checked too); the last two may change.
RESUME_FLAGS = ("batch_size", "lr", "weight_decay", "warmup", "label_smoothing", "grad_clip", "augment", "mixup",
                "cutmix", "mix_prob", "cache_scale", "seed", "max_train_samples", "epochs", "time_budget")
# head: a linear probe on features computed once, so many cheap epochs; all: a few epochs at a small lr, so
# the pretrained encoder is adjusted rather than overwritten.
FINETUNE_DEFAULTS = {"head": dict(epochs=50, lr=1e-3), "all": dict(epochs=3, lr=5e-5)}
CONFIG_FLAGS = ("image_size", "patch_size", "dim", "depth", "n_heads", "mlp_dim", "dropout", "attention_dropout")


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (no usage dump), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="transformer.py", description="Train a hand-written Vision Transformer on Cats vs "
                      "Dogs (or any Hugging Face image-classification dataset) and report its accuracy.")
    d = p.add_argument_group("data")
    d.add_argument("--data-dir", help="local folder with train/ and validation/ class subfolders, e.g. "
                   "../shared/data/cats_and_dogs_filtered (default: the Hub dataset below)")
    d.add_argument("--dataset", default="microsoft/cats_vs_dogs", help="Hugging Face dataset name "
                   "(image + label columns are found automatically); default %(default)s")
    d.add_argument("--val-fraction", type=float, default=0.1,
                   help="validation share carved out when the dataset has no validation split (default 0.1)")
    d.add_argument("--max-train-samples", type=int, default=0, help="use at most this many training images")
    d.add_argument("--workers", type=int, default=0, help="DataLoader worker processes for augmentation")
    m = p.add_argument_group("model (defaults come from --preset)")
    m.add_argument("--image-size", type=int)
    m.add_argument("--patch-size", type=int)
    m.add_argument("--dim", type=int)
    m.add_argument("--depth", type=int)
    m.add_argument("--n-heads", "--heads", dest="n_heads", type=int)
    m.add_argument("--mlp-dim", type=int)
    m.add_argument("--dropout", type=float)
    m.add_argument("--attention-dropout", type=float)
    t = p.add_argument_group("training (defaults come from --preset)")
    t.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="'default': ~15 min on 2 CPU cores; 'smoke': seconds, for tests; 'finetune': the "
                   "default with --pretrained")
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
    t.add_argument("--augment", choices=["none", "light", "strong"])
    t.add_argument("--mixup", type=float, help="MixUp alpha (0: off)")
    t.add_argument("--cutmix", type=float, help="CutMix alpha (0: off)")
    t.add_argument("--mix-prob", type=float, help="share of batches that get MixUp/CutMix")
    t.add_argument("--cache-scale", type=float, help="training images are cached at image_size * this, "
                   "so random crops have pixels to choose from")
    t.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="evaluate on each image and its mirror image, averaging the logits")
    t.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="autocast precision. auto: on CUDA bf16 from compute capability 8.0, fp16 with loss "
                        "scaling on 7.x; on a CPU whichever of fp32 and bf16 measures faster; fp32 on MPS")
    t.add_argument("--compile", action="store_true", help="torch.compile the training forward/backward")
    t.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), or a torch device name")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    o = p.add_argument_group("output and inference")
    o.add_argument("--output-dir", default="runs/vit", help="metrics.json, the pictures (prediction grid, "
                   "curves, attention maps) and the checkpoint go here (default %(default)s)")
    o.add_argument("--checkpoint", help="checkpoint path (default OUTPUT_DIR/vit_cats_vs_dogs.pth)")
    o.add_argument("--predict", nargs="+", metavar="IMAGE", help="print class probabilities for these images "
                   "and draw their attention maps into vit_attention_predict.png beside the checkpoint")
    o.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint on the validation split")
    o.add_argument("--resume", action="store_true",
                   help="continue the run saved in the last checkpoint beside --checkpoint (NAME.last.pth), with "
                        "the same model and training flags; --epochs and --time-budget may change")
    w = p.add_argument_group("pretrained weights")
    w.add_argument("--pretrained", choices=sorted(PRETRAINED_HEADS), help="start from torchvision's ImageNet "
                   "weights of this ViT (downloaded by torchvision), at their image size (224) with a new head")
    w.add_argument("--weights", metavar="PATH", help="with --pretrained: a local state_dict .pth instead of the "
                   "download")
    w.add_argument("--finetune", choices=["head", "all"], default="head", help="head: encode every image once "
                   "with the frozen encoder and train only the new head (minutes on a CPU); all: train everything "
                   "(for a GPU)")
    return p


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, ViTConfig]:
    args = build_parser().parse_args(argv)
    if args.weights and not args.pretrained:
        raise UserError("--weights needs --pretrained NAME (the architecture the weights are for)")
    args.preset = args.preset or ("finetune" if args.pretrained else "default")
    if args.pretrained:
        for key, value in FINETUNE_DEFAULTS[args.finetune].items():
            if getattr(args, key, None) is None:
                setattr(args, key, value)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    checks = [(args.epochs >= 1, "--epochs must be at least 1"),
              (args.batch_size >= 1, "--batch-size must be at least 1"),
              (args.time_budget is None or args.time_budget > 0, "--time-budget must be positive (minutes)"),
              (args.lr > 0, "--lr must be positive"),
              (0 <= args.warmup < 1, "--warmup must be in [0, 1)"),
              (0 <= args.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
              (0 < args.val_fraction < 1, "--val-fraction must be in (0, 1)"),
              (args.workers >= 0, "--workers must be >= 0"),
              (args.cache_scale >= 1, "--cache-scale must be >= 1")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    try:
        config = ViTConfig(**{k: getattr(args, k) for k in CONFIG_FLAGS})
    except ValueError as e:
        raise UserError(f"invalid model config: {e}") from None
    return args, config


def main(argv: list[str] | None = None) -> int:
    try:
        args, config = parse_args(argv)
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.predict:
            run_predict(args)
        elif args.eval_only:
            run_eval_only(args)
        else:
            try:
                trainkit.init_distributed(pick_device(args.device))  # under torchrun: join the other processes
            except ValueError as e:
                raise UserError(str(e)) from None
            if args.pretrained and args.finetune == "head" and trainkit.world_size() > 1:
                raise UserError("--finetune head trains in one process (the features are computed once): "
                                "run it without torchrun")
            with trainkit.quiet_unless_main():
                metrics = run_pretrained(args, config) if args.pretrained else train(args, config)
            if metrics.get("signal"):
                return trainkit.exit_code(metrics["signal"])
    except UserError as e:
        print(f"transformer.py: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:  # outside the training loop (which saves and reports on its own)
        print("transformer.py: interrupted; checkpoints already saved are kept", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        trainkit.teardown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
