"""Day 1: a Vision Transformer (ViT) encoder written by hand, trained to tell cats from dogs.

    python transformer.py --data-dir ../shared/data/cats_and_dogs_filtered   # local folder, ~15 min on 2 CPU cores
    python transformer.py                                   # microsoft/cats_vs_dogs from the Hugging Face Hub
    python transformer.py --dataset uoft-cs/cifar10 --image-size 32 --patch-size 4 --stem-channels 48,96
    python transformer.py --predict cat.jpg dog.jpg         # class probabilities from the saved checkpoint
    python transformer.py --eval-only --checkpoint runs/vit/vit_cats_vs_dogs.pth --data-dir DIR
    python transformer.py --pretrained vit_b_16 --finetune head --data-dir DIR   # from torchvision's ImageNet ViT

The file reads top to bottom: config, components (patch embedding, attention, MLP, encoder block), the model,
data (decoded once into an in-memory uint8 cache, augmented on tensors), training and evaluation, the command
line. The architecture is the one of "An Image is Worth 16x16 Words" (Dosovitskiy et al., 2020) and of
torchvision's `VisionTransformer`, whose weights map onto ours one tensor to one tensor
(extras/vit_pretrained.py: `from_torchvision_state_dict`). The plumbing no lesson teaches (precision, torchrun,
stopping and resuming, pictures) is in trainkit/. The tool around the lesson is in extras/: the flags' parser and
checks, --predict and --eval-only (vit_commands.py), the data's checks and one-line errors (vit_data.py), a run's
checkpoints, --resume and curves (vit_run.py), --pretrained and the attention maps.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import random
import sys
import time
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import trainkit
from trainkit import Precision

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
    # (): one patch_size x patch_size projection; else a conv stem of 3x3 stride-2 convolutions with these output
    # channels (Xiao et al. 2021, see PatchEmbedding), which must halve the image down to patch_size exactly
    stem_channels: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # positive sizes, at least two classes, dropouts in [0, 1); then that the sizes fit together
        for name in ("image_size", "patch_size", "dim", "depth", "n_heads", "mlp_dim", "num_classes", "in_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ViTConfig.{name} must be a positive integer, got {value!r}")
        if self.num_classes < 2:
            raise ValueError(f"ViTConfig.num_classes must be at least 2, got {self.num_classes}")
        for name in ("dropout", "attention_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"ViTConfig.{name} must be in [0, 1), got {value!r}")
        if not isinstance(self.stem_channels, (tuple, list)) or not all(
                isinstance(ch, int) and not isinstance(ch, bool) and ch >= 1 for ch in self.stem_channels):
            raise ValueError(f"ViTConfig.stem_channels must be a tuple of positive integers, "
                             f"got {self.stem_channels!r}")
        self.stem_channels = tuple(self.stem_channels)  # a checkpoint's or metrics.json's config holds a list
        if self.image_size % self.patch_size != 0:
            raise ValueError(f"ViTConfig: image_size {self.image_size} is not divisible by patch_size "
                             f"{self.patch_size}")
        if self.dim % self.n_heads != 0:
            raise ValueError(f"ViTConfig: dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.stem_channels and 2 ** len(self.stem_channels) != self.patch_size:
            raise ValueError(f"ViTConfig: stem_channels {self.stem_channels} halves the image "
                             f"{len(self.stem_channels)} times, to patches of {2 ** len(self.stem_channels)} "
                             f"pixels, but patch_size is {self.patch_size}: give log2(patch_size) stem channels, "
                             f"or () for no stem")

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


# --------------------------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------------------------


class PatchEmbedding(nn.Module):
    """Turns an image into tokens: one dim vector per non-overlapping patch_size x patch_size patch.

    Without a stem, `proj` is a Conv2d with kernel = stride = patch_size: exactly "flatten each patch, multiply by
    one shared matrix". With stem_channels, a stack of 3x3 stride-2 convolutions (each followed by BatchNorm and
    ReLU) first halves the image len(stem_channels) times, and `proj` is a 1x1 convolution to dim: the conv stem
    of "Early Convolutions Help Transformers See Better" (Xiao et al., 2021). It hands the transformer local
    features instead of raw pixels and makes the optimisation better conditioned, which counts on small data sets.
    """

    def __init__(self, patch_size: int, dim: int, in_channels: int = 3, stem_channels: tuple[int, ...] = ()) -> None:
        super().__init__()
        if stem_channels and 2 ** len(stem_channels) != patch_size:
            raise ValueError(f"PatchEmbedding: {len(stem_channels)} stride-2 convolutions do not make patches of "
                             f"{patch_size} pixels")
        layers, channels = [], in_channels
        for out in stem_channels:  # no conv bias: the BatchNorm right after adds its own
            layers += [nn.Conv2d(channels, out, kernel_size=3, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(out), nn.ReLU()]
            channels = out
        self.stem = nn.Sequential(*layers) if layers else nn.Identity()
        if stem_channels:
            self.proj = nn.Conv2d(channels, dim, kernel_size=1)
        else:
            self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, N, dim) tokens, N = (H/p)(W/p), patches in row-major order."""
        # EXERCISE patch_embedding: self.stem, then self.proj (B, dim, H/p, W/p), then flatten the grid to (B, N, dim)
        x = self.proj(self.stem(images))
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
        self.patch_embedding = PatchEmbedding(c.patch_size, c.dim, c.in_channels, c.stem_channels)
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
        for module in [m for m in self.modules() if isinstance(m, nn.Linear)] + [self.patch_embedding.proj]:
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        # The conv stem keeps PyTorch's defaults, the init ReLU networks are made for: Kaiming-uniform kernels
        # (without bias), BatchNorm scales 1 and shifts 0, fresh running statistics.
        for module in self.patch_embedding.stem.modules():
            if isinstance(module, (nn.Conv2d, nn.BatchNorm2d)):
                module.reset_parameters()
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

    def num_params(self) -> int:
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


# --------------------------------------------------------------------------------------------------------------
# Data: Hugging Face datasets -> decoded once into a uint8 tensor cache -> augmented on tensors
# --------------------------------------------------------------------------------------------------------------

MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics; any fixed per-channel scaling works for training from scratch
STD = (0.229, 0.224, 0.225)


@dataclass
class ImageCache:
    """A split decoded once: uint8 images (N, 3, S, S), int64 labels (N,), and how many files were unreadable."""

    images: torch.Tensor
    labels: torch.Tensor
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.labels)


def decode_image(source: object, size: int, crop: float = 1.0):
    """Any image (path, bytes or PIL) -> RGB uint8 tensor (3, size, size): the centre square of `crop` of the
    short side, resized to size (crop 0.875: torchvision's resize to 256 and centre crop of 224).

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
    # bleed trims (1 - crop) / 2 of the image from each edge; fit then centre-crops the long side to a square
    img = ImageOps.fit(img.convert("RGB"), (size, size), Image.Resampling.BICUBIC, bleed=(1 - crop) / 2)
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)


def load_splits(data_dir: str | None, dataset: str, val_fraction: float = 0.1, seed: int = 0,
                max_train_samples: int = 0):
    """(train split, validation split, image column, label column, class names) as Hugging Face datasets, from
    a local folder with train/ and validation/ class subfolders (data_dir), or else from the Hub (dataset)."""
    from extras import vit_data  # a folder's usual mistakes, a missing package or an unreachable Hub: one line

    with vit_data.loading_errors(data_dir, dataset):
        from datasets import load_dataset

        splits = load_dataset("imagefolder", data_dir=str(data_dir)) if data_dir else load_dataset(dataset)
    image_col, label_col, class_names = vit_data.find_columns(splits, data_dir, dataset)
    val_name = next((s for s in ("validation", "valid", "val", "test") if s in splits), None)
    if val_name is not None:
        train, val = splits["train"], splits[val_name]
    else:  # one split only (microsoft/cats_vs_dogs): carve a seeded validation set with the same class balance
        parts = splits["train"].train_test_split(test_size=val_fraction, seed=seed, stratify_by_column=label_col)
        train, val = parts["train"], parts["test"]
    if max_train_samples and len(train) > max_train_samples:
        train = train.shuffle(seed=seed).select(range(max_train_samples))
    return train, val, image_col, label_col, class_names


AUGMENTATIONS = ("none", "light", "strong")
N_RANDOM = 9  # uniform numbers each image's augmentation draws (see augment_images)


def crop_flip_rotate(u: torch.Tensor, strong: bool) -> torch.Tensor:
    """The affine maps (B, 2, 3) of a batch's random resized crops, flips and (strong) rotations, from the rows of
    u: output coordinates in [-1, 1] -> where to read the input, as F.affine_grid takes them."""
    area, log_ratio = 0.35 + 0.65 * u[:, 0], (2 * u[:, 1] - 1) * math.log(4 / 3)
    w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)  # the crop's width and height, as shares of the image
    h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    cx, cy = (2 * u[:, 2] - 1) * (1 - w), (2 * u[:, 3] - 1) * (1 - h)  # its centre, kept inside the image
    flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0)
    angle = (2 * u[:, 5] - 1) * math.radians(20) if strong else torch.zeros_like(w)
    cos, sin = angle.cos(), angle.sin()
    return torch.stack([torch.stack([w * flip * cos, -h * sin, cx], 1),
                        torch.stack([w * flip * sin, h * cos, cy], 1)], 1)


def augment_images(images: torch.Tensor, u: torch.Tensor, size: int, augment: str = "light") -> torch.Tensor:
    """A batch of uint8 images (B, 3, S, S) -> augmented images (B, 3, size, size), float in [0, 255], in a few
    tensor ops for the whole batch.

    Each image's random choices come from its row of u (B, N_RANDOM), uniform numbers in [0, 1):
    'light' is a random resized crop (a share 0.35..1 of the area, aspect ratio 3/4..4/3, anywhere in the
    image) and a horizontal flip; 'strong' also rotates by up to 20 degrees and jitters brightness, contrast and
    saturation by up to 40%; 'none' only resizes. The crop, flip and rotation are one affine map per image
    (crop_flip_rotate), sampled bilinearly with F.grid_sample.
    """
    if augment == "none":
        return F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True).clamp_(0, 255)
    theta = crop_flip_rotate(u, augment == "strong")
    grid = F.affine_grid(theta, [len(images), 3, size, size], align_corners=False)
    x = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if augment == "strong":
        x = jitter_colors(x, *color_factors(u).unbind(1))
    return x.clamp_(0, 255)


def color_factors(u: torch.Tensor) -> torch.Tensor:
    """(B, 3) brightness, contrast and saturation factors in [0.6, 1.4) from the rows of u."""
    return 0.6 + 0.8 * u[:, 6:9]


LUMA = (0.2989, 0.587, 0.114)  # the grey value g = LUMA . rgb of a pixel (ITU-R 601), as torchvision uses


def jitter_colors(x: torch.Tensor, b: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Brightness b, contrast c and saturation s (one factor per image, (B,)) of float images (B, 3, H, W).

    Saturation mixes each pixel with its grey value g, contrast with the image's mean grey m, brightness
    scales: b (c (s x + (1 - s) g) + (1 - c) m). That is linear in x, so it is one 3x3 matrix A and one offset t
    per image, A = b c (s I + (1 - s) 1 LUMA^T) and t = b (1 - c) m, applied to all pixels in one batched matmul.
    """
    B, C, H, W = x.shape
    luma = torch.tensor(LUMA, device=x.device)
    A = (b * c * s).view(B, 1, 1) * torch.eye(3, device=x.device) + (b * c * (1 - s)).view(B, 1, 1) * luma
    m = x.mean(dim=(2, 3)) @ luma  # (B,), the mean grey: the mean of g over the pixels
    t = (b * (1 - c) * m).view(B, 1, 1).expand(B, 3, 1)
    return torch.baddbmm(t, A, x.reshape(B, C, H * W)).view(B, C, H, W)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """Pixel values (B, 3, H, W) in [0, 255], uint8 or float -> float, per-channel standardised."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return torch.addcmul(-mean / std, images.float(), 1 / (255.0 * std))  # (x / 255 - mean) / std in one pass


class AugmentedImages(torch.utils.data.Dataset):
    """Training images from the uint8 cache, augmented a batch at a time and standardised, ready for the model.

    Items are asked for as (epoch, index) (trainkit.EpochSampler). Each image draws its random numbers from a
    generator seeded by the seed, the epoch and its index: an image gets the same crop whichever process or
    DataLoader worker draws it, so N processes train on exactly the images one would, and a resumed run on
    those the stopped run would have. `kernel` (extras/vit_augment.py) makes the same images in one pass of
    C where that measured faster; None: augment_images and normalize."""

    def __init__(self, cache: ImageCache, size: int, augment: str = "light", seed: int = 0, kernel=None) -> None:
        self.cache, self.size, self.augment, self.seed, self.kernel = cache, size, augment, seed, kernel

    def __len__(self) -> int:
        return len(self.cache)

    def __getitems__(self, keys: list) -> tuple[torch.Tensor, torch.Tensor]:
        """The DataLoader asks for a whole batch at once: (augmented, standardised images, labels)."""
        keys = [key if isinstance(key, tuple) else (0, key) for key in keys]
        gen, n = torch.Generator(), len(self)  # one generator, seeded afresh for each image
        u = torch.stack([torch.rand(N_RANDOM, generator=gen.manual_seed((self.seed * 1_000_003 + epoch) * n + i))
                         for epoch, i in keys])
        index = torch.tensor([i for _, i in keys])
        if self.kernel is not None:
            return self.kernel(self.cache.images, index, u, self.size, self.augment), self.cache.labels[index]
        images = self.cache.images.index_select(0, index)  # whole rows: several times faster than images[index]
        return normalize(augment_images(images, u, self.size, self.augment)), self.cache.labels[index]

    def __getitem__(self, key) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.__getitems__([key])
        return images[0], labels[0]


def whole_batch(batch):
    """The DataLoader's collate_fn: AugmentedImages.__getitems__ returns the batch ready."""
    return batch


# --------------------------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """How a run trains (a preset fills in the recipe), where its data comes from and where its results go."""

    data_dir: str | None = None  # a folder with train/ and validation/ class subfolders; None: `dataset`
    dataset: str = "microsoft/cats_vs_dogs"  # a Hugging Face image-classification dataset
    val_fraction: float = 0.1  # carved out of train when the dataset has no validation split
    max_train_samples: int = 0  # 0: all
    workers: int = 0  # DataLoader processes for the augmentation
    epochs: int = 1
    time_budget: float | None = None  # minutes; the learning-rate schedule then ends on time
    batch_size: int = 64  # images per step over all processes
    lr: float = 5e-4  # the peak learning rate
    weight_decay: float = 0.05
    warmup: float = 0.05  # the share of training spent warming the learning rate up
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    augment: str = "light"  # none, light or strong
    augment_kernel: str = "auto"  # torch, c, or auto: the faster here (extras/vit_augment.py)
    mixup: float = 0.0  # MixUp's alpha (0: off)
    cutmix: float = 0.0  # CutMix's alpha (0: off)
    mix_prob: float = 0.5  # the share of batches that get MixUp or CutMix
    cache_scale: float = 1.25  # training images are cached larger, so random crops have pixels to choose from
    eval_crop: float = 1.0  # validation images: the centre of this share of the short side (decode_image)
    tta: bool = False  # evaluate on each image and its mirror image
    eval_every: int = 1  # validate after every this many epochs (and after the last)
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto, fp32, bf16 or fp16 (trainkit.choose_precision)
    compile: str = "off"  # torch.compile the forward and backward: on, off, or auto (timed, trainkit.CompiledForward)
    quiet: bool = False  # no progress bars
    output_dir: str = "runs/vit"
    checkpoint: str | None = None  # None: output_dir/vit_cats_vs_dogs.pth
    resume: bool = False  # go on from the `last` checkpoint of a stopped run


def learning_rate(progress: float, base_lr: float, warmup: float, min_ratio: float = 0.01) -> float:
    """Linear warmup over the first `warmup` fraction of training, then cosine decay to min_ratio * base_lr.
    `progress` in [0, 1] is max(steps done / all steps, time used / time budget), so a time budget still ends
    on a fully decayed learning rate."""
    if progress < warmup:
        return base_lr * (progress + 1e-3) / warmup
    t = min(1.0, (progress - warmup) / max(1e-8, 1.0 - warmup))
    return base_lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t)))


def pick_precision(flag: str, device: torch.device, config: ViTConfig, batch_size: int) -> Precision:
    """--precision on this device, printed; auto times a matmul shaped like the model's MLP on a batch of tokens."""
    tokens = min(batch_size * (config.n_patches + 1), 4096)
    return trainkit.precision.for_model(flag, device, tokens, config.dim, config.mlp_dim)


@torch.no_grad()
def predict_logits(model: VisionTransformer, images: torch.Tensor, device: torch.device,
                   precision: Precision | None = None, batch_size: int = 128, tta: bool = False) -> torch.Tensor:
    """Logits (float32, on CPU) for uint8 images; with tta the logits of the image and its mirror are averaged.
    Batches of 128: on a CPU the conv stem's activations for 256 images outgrow the cache and run slower."""
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


@dataclass
class Data:
    train: ImageCache
    val: ImageCache
    class_names: list[str]
    seconds: float = 0.0  # loading and decoding


def load_data(s: TrainConfig, image_size: int) -> Data:
    """Both splits decoded once: training images at image_size * cache_scale, for the random crops; validation
    images zoomed in to their centre (eval_crop), as large as the random crops made the objects in training."""
    from extras import vit_data  # decodes a split with decode_image, skipping (and counting) unreadable files

    t0 = time.perf_counter()
    with trainkit.main_first():  # under torchrun: one process fills the datasets cache, the others read it
        train_ds, val_ds, image_col, label_col, class_names = load_splits(
            s.data_dir, s.dataset, s.val_fraction, s.seed, s.max_train_samples)
    cache_size = max(image_size, round(image_size * s.cache_scale))
    data = Data(vit_data.cache_split(train_ds, image_col, label_col, cache_size, "train"),
                vit_data.cache_split(val_ds, image_col, label_col, image_size, "validation", s.eval_crop),
                class_names)
    data.seconds = time.perf_counter() - t0
    print(f"data: {len(data.train)} train / {len(data.val)} validation images, classes {class_names}, "
          f"{data.train.skipped + data.val.skipped} unreadable files skipped, decoded in {data.seconds:.1f}s")
    return data


def train_loader(cache: ImageCache, image_size: int, s: TrainConfig, local_batch: int):
    """Batches of augmented training images; trainkit.EpochSampler shuffles by seed and epoch, and under
    torchrun gives each process its share of every batch."""
    from extras import vit_augment  # the same augmentation in one pass of C, where it measures faster

    kernel = vit_augment.choose(s.augment_kernel, cache, image_size, s.augment, local_batch)
    return torch.utils.data.DataLoader(
        AugmentedImages(cache, image_size, s.augment, s.seed, kernel), batch_size=local_batch,
        collate_fn=whole_batch, sampler=trainkit.EpochSampler(len(cache), s.seed),
        drop_last=len(cache) > s.batch_size, generator=torch.Generator().manual_seed(s.seed),
        num_workers=s.workers, persistent_workers=s.workers > 0)


def mixup(images: torch.Tensor, target: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp (Zhang et al., 2018), in place: each image and its soft label become lam of themselves and 1 - lam of
    the previous ones in the batch (the batch is shuffled, so that is a random partner)."""
    return images.lerp_(images.roll(1, 0), 1 - lam), target.lerp_(target.roll(1, 0), 1 - lam)


def cutmix(images: torch.Tensor, target: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix (Yun et al., 2019), in place: a box of about 1 - lam of the area, centred at a random pixel (and
    clipped to the image), is pasted from the previous image in the batch; the labels mix by the box's area."""
    H, W = images.shape[-2:]
    cx, cy = int(torch.randint(W, (1,))), int(torch.randint(H, (1,)))
    r = 0.5 * math.sqrt(1.0 - lam)  # half the box's side, as a share of the image's
    x1, x2 = max(cx - int(r * W), 0), min(cx + int(r * W), W)
    y1, y2 = max(cy - int(r * H), 0), min(cy + int(r * H), H)
    images[..., y1:y2, x1:x2] = images[..., y1:y2, x1:x2].roll(1, 0)  # roll copies: no overlap in the paste
    pasted = (x2 - x1) * (y2 - y1) / (W * H)
    return images, target.lerp_(target.roll(1, 0), pasted)


class Mixing:
    """MixUp or CutMix (a blend of two images and of their labels: soft targets) on a share of the batches. Its
    own seeded generator picks the batches and which of the two, so a resumed run mixes the ones the stopped run
    would have; lam ~ Beta(alpha, alpha) and the CutMix box come from torch's generator (saved with the run)."""

    def __init__(self, s: TrainConfig, num_classes: int) -> None:
        self.choices = [(f, torch.distributions.Beta(torch.tensor([alpha]), torch.tensor([alpha])))
                        for f, alpha in ((mixup, s.mixup), (cutmix, s.cutmix)) if alpha > 0]
        self.num_classes, self.prob = num_classes, s.mix_prob
        self.generator = torch.Generator().manual_seed(s.seed)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.choices or torch.rand((), generator=self.generator).item() >= self.prob:
            return images, labels
        mix, beta = self.choices[int(torch.randint(len(self.choices), (), generator=self.generator))]
        return mix(images, F.one_hot(labels, self.num_classes).float(), float(beta.sample(())))


def train_epoch(step: trainkit.TrainStep, forward, loader, mix: Mixing, run, s: TrainConfig,
                budget: trainkit.Budget, device: torch.device) -> None:
    """One epoch (the rest of it, when resumed): schedule, forward, loss, backward, clip and step, batch after
    batch. Ends early when the budget says the run must stop (a signal, the time budget or the last step)."""
    with run.progress_bar(loader) as bar:  # the running loss and accuracy; it also times the epoch
        for images, labels in bar:
            lr = learning_rate(budget.progress(run.step), s.lr, s.warmup)
            x, y = images.to(device), labels.to(device)  # augmented and standardised by the loader
            x, target = mix(x, y)
            with step.forward_context():  # autocast in the run's precision
                logits = forward(x)
                loss = F.cross_entropy(logits.float(), target, label_smoothing=s.label_smoothing)
            step.backward(loss)
            step.update(lr)  # clip the gradients' norm to grad_clip, then AdamW's step at this learning rate
            run.count(loss, logits, y)  # the step, and the epoch's loss and accuracy over all processes
            budget.agree()  # the time and any stop signal, agreed by every process
            if budget.done(run.step):  # every process stops after the same step
                break


def train(config: ViTConfig, s: TrainConfig, pretrained: VisionTransformer | None = None) -> dict:
    """Trains, validates every eval_every epochs, keeps the best checkpoint and reports; returns the metrics
    on rank 0 ({"signal": n} when SIGINT or SIGTERM stopped the run, saved for --resume). pretrained: start from
    this model (--pretrained, extras/vit_pretrained.py) with a new head for the data's classes."""
    from extras import vit_run  # the run's bookkeeping: progress bar, checkpoints, --resume, curves, the report

    seed_everything(s.seed)
    t_start = time.perf_counter()
    device, local_batch = vit_run.join_processes(s)  # under torchrun each process takes its share of a batch
    data = load_data(s, (pretrained.config if pretrained else config).image_size)
    if pretrained is not None:  # the pretrained encoder, a new head for our classes
        from extras import vit_pretrained

        model = vit_pretrained.with_new_head(pretrained, len(data.class_names))
    else:
        model = VisionTransformer(replace(config, num_classes=len(data.class_names)))
    config = model.config
    # Measured on rank 0 and used by all: every process must compute in the same precision.
    precision = trainkit.same_on_all(pick_precision(s.precision, device, config, local_batch))
    print(f"batch: {s.batch_size} images per step, {trainkit.world_size()} process(es) x "
          f"{local_batch}\nmodel: {model.num_params() / 1e6:.2f}M parameters, {config.n_patches + 1} tokens, "
          f"device {device.type}, {precision.name}, threads {torch.get_num_threads()}")
    # TrainStep: autocast, fp16 loss scaling, and under torchrun DDP averaging the gradients over the processes.
    step = trainkit.TrainStep(model.to(device), model.configure_optimizer(s.lr, s.weight_decay), precision, device,
                              s.grad_clip)
    # torch.compile fuses LayerNorm, GELU, softmax...; "auto" times compiled against eager steps and keeps the faster
    forward = trainkit.CompiledForward(step.model, s.compile)
    loader = train_loader(data.train, config.image_size, s, local_batch)
    mix = Mixing(s, config.num_classes)
    run = vit_run.Run(s, model, step, data, mix, device, precision)  # with --resume: where the stopped run was
    # SIGINT and SIGTERM only set budget.signum: the step ends, then the run is saved
    with trainkit.Budget(s.epochs * len(loader), s.time_budget, run.elapsed) as budget:
        try:
            while run.epoch <= s.epochs and not budget.done(run.step):
                model.train()
                loader.sampler.set_epoch(run.epoch)
                loader.sampler.start = run.batch * local_batch  # a resumed epoch goes on from its next batch
                train_epoch(step, forward, loader, mix, run, s, budget, device)
                run.elapsed = budget.elapsed_s
                if budget.signum:  # saved for --resume; evaluation waits for the resumed run
                    return run.stopped(budget.signum)
                val = None  # validation takes time from training: every eval_every epochs and after the last
                if run.epoch % s.eval_every == 0 or run.epoch >= s.epochs or budget.done(run.step):
                    val = evaluate(model, data.val, data.class_names, device, precision, tta=s.tta)
                # prints the epoch; saves the best checkpoint, the `last` one and the curves
                run.epoch_done(val, step.optimizer.param_groups[0]["lr"], budget.elapsed_s)
        except KeyboardInterrupt:  # a second Ctrl-C: report what was trained so far
            run.interrupted = True
            print("\ninterrupted: saving and reporting what was trained so far", file=sys.stderr)
    final = evaluate(model, data.val, data.class_names, device, precision, tta=s.tta)
    # rank 0: the final model if it is the best, metrics.json, the report, the pictures
    return run.finish(final, wall_seconds=time.perf_counter() - t_start)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------

# Presets fill in every flag the user did not give. "default" finishes in about 15 minutes on 2 CPU cores: on
# 2,000 training images a small model wins at a fixed budget (it sees more epochs and has less to overfit with),
# and MixUp/CutMix on half the batches keeps it from memorising them. Its conv stem (five stride-2 convolutions
# for patches of 32) gives the small ViT the local features it would otherwise have to learn from those few
# images (Xiao et al. 2021); at 128x128 pixels that leaves 4x4 = 16 tokens, each a 32x32 region the convolutions
# have summarised, for the blocks to relate (the ViT paper's hybrid: a transformer on a CNN's feature map).
# Validation (every 24 epochs: each takes about as long as 6 training steps) sees each image as torchvision
# evaluates ImageNet models, zoomed in to its centre 87.5% (random crops made the objects in training larger than
# in the whole image; Touvron et al. 2019, "Fixing the train-test resolution discrepancy"), and with its mirror
# image (tta).
# compile="auto": torch.compile where it builds and trains faster (trainkit/compiling.py).
# Measurements: docs/results.md and the README.
PRESETS: dict[str, dict] = {
    "default": dict(image_size=128, patch_size=32, stem_channels=(16, 32, 64, 128, 256), dim=96, depth=4,
                    n_heads=3, mlp_dim=192, dropout=0.0, attention_dropout=0.0, epochs=1000, time_budget=14.0,
                    batch_size=64, lr=5e-4, weight_decay=0.05, warmup=0.05, label_smoothing=0.1, augment="strong",
                    mixup=0.8, cutmix=1.0, mix_prob=0.5, cache_scale=1.25, eval_crop=0.875, tta=True, eval_every=24,
                    compile="auto"),
    "smoke": dict(image_size=32, patch_size=8, stem_channels=(), dim=32, depth=1, n_heads=2, mlp_dim=64,
                  dropout=0.0, attention_dropout=0.0, epochs=1, time_budget=None, batch_size=8, lr=1e-3,
                  weight_decay=0.05, warmup=0.1, label_smoothing=0.1, augment="light", mixup=0.0, cutmix=0.0,
                  mix_prob=0.5, cache_scale=1.25, eval_crop=0.875, tta=True, eval_every=1, compile="off"),
    # --pretrained: the model's sizes come from the weights; epochs and lr from --finetune
    # (extras/vit_pretrained.py). A starting point, not tuned.
    "finetune": dict(image_size=64, patch_size=8, stem_channels=(), dim=96, depth=4, n_heads=3, mlp_dim=192,
                     dropout=0.0, attention_dropout=0.0, time_budget=None, batch_size=32, weight_decay=0.05,
                     warmup=0.1, label_smoothing=0.1, augment="light", mixup=0.0, cutmix=0.0, mix_prob=0.5,
                     cache_scale=1.15, eval_crop=1.0, tta=False, eval_every=1, compile="off"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, each one left out taking its preset's value (PRESETS); a value no run can use ends in one line."""
    from extras import vit_commands  # the argparse parser with each flag's help, and the checks

    return vit_commands.parse_args(argv)


def model_config(args: argparse.Namespace) -> ViTConfig:
    return ViTConfig(**{f.name: getattr(args, f.name) for f in fields(ViTConfig) if hasattr(args, f.name)})


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with trainkit.one_line_errors("transformer.py", "interrupted; checkpoints already saved are kept"):
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.predict or args.eval_only:
            from extras import vit_commands

            return vit_commands.predict(args) if args.predict else vit_commands.eval_only(args)
        try:
            with trainkit.quiet_unless_main():  # under torchrun, rank 0 alone prints
                if args.pretrained:
                    from extras import vit_pretrained

                    metrics = vit_pretrained.run(args)
                else:
                    metrics = train(model_config(args), train_config(args))
        finally:
            trainkit.teardown_distributed()
        return trainkit.exit_code(metrics["signal"]) if metrics.get("signal") else 0


if __name__ == "__main__":
    import transformer

    sys.exit(transformer.main())
