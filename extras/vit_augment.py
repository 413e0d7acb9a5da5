"""Day 1's training augmentation in one pass of C (extras/vit_augment.c), used where it measures faster.

    images = augmented(cache.images, rows, u, size, "strong")   # = normalize(augment_images(cache.images[rows], u, size))
    kernel = choose("auto", cache, size, "strong", batch)       # augmented, or None for PyTorch's, and it says which

On a machine whose training step is fast (bf16 on a CPU with AMX, say) PyTorch's seven passes over each batch
take a large share of the step; the kernel reads the cached uint8 pixels once and writes the model's input once.
It computes the same images as transformer.augment_images followed by transformer.normalize, to float32
rounding; it is checked against them once per process before it is used. 'none' (a plain resize) stays in
PyTorch.
"""

from __future__ import annotations

import ctypes
import statistics
import time
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

import torch

import trainkit
import transformer as T
from extras import native

SOURCE = Path(__file__).with_name("vit_augment.c")
MODES = ("auto", "torch", "c")


@lru_cache(maxsize=None)
def library(builds: tuple = native.BUILDS) -> tuple[Optional[ctypes.CDLL], str]:
    """The compiled kernel and how it was built, or None and why there is none; `builds` as native.build takes
    them (the tests build the kernel's other paths with them)."""
    lib, how = native.build(SOURCE, builds)
    if lib is not None:
        lib.augment.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_long] * 2 + [ctypes.c_void_p] * 5 + \
                               [ctypes.c_long, ctypes.c_void_p, ctypes.c_int]
        lib.augment.restype = None
    return lib, how


def stored_for_kernel(images: torch.Tensor) -> torch.Tensor:
    """The same (N, 3, S, S) uint8 images stored as the kernel reads them: channels last (a pixel's three values
    side by side), with one byte more after the last pixel (its vector loads read four bytes a pixel)."""
    n, c, h, w = images.shape
    flat = torch.zeros(images.numel() + 1, dtype=torch.uint8)
    stored = flat[:images.numel()].view(n, h, w, c).permute(0, 3, 1, 2)
    stored.copy_(images)
    return stored


def augmented(images: torch.Tensor, rows: torch.Tensor, u: torch.Tensor, size: int, augment: str,
              lib: Optional[ctypes.CDLL] = None) -> torch.Tensor:
    """normalize(augment_images(images[rows], u, size, augment)) in one pass: images the (N, 3, S, S) uint8 cache
    as stored_for_kernel stores it, rows (B,) the batch's rows of it, u (B, N_RANDOM) their random numbers;
    'light' or 'strong'. lib: the kernel as library() built it, by default."""
    if augment not in ("light", "strong"):
        raise ValueError(f"the C augmentation does 'light' and 'strong', not {augment!r}")
    if not (images.dtype == torch.uint8 and images.dim() == 4 and images.shape[1] == 3
            and images.shape[2] == images.shape[3] and images.device.type == "cpu"
            and images.is_contiguous(memory_format=torch.channels_last)
            and images.untyped_storage().nbytes() > images.storage_offset() + images.numel()):
        raise ValueError(f"the C augmentation reads an (N, 3, S, S) uint8 cache on the CPU as stored_for_kernel "
                         f"stores it, got {images.dtype} {tuple(images.shape)}")
    rows = rows.to(torch.int64).contiguous()
    if len(rows) and not 0 <= int(rows.min()) <= int(rows.max()) < len(images):
        raise IndexError(f"rows out of the cache's {len(images)} images")
    strong = augment == "strong"
    theta = T.crop_flip_rotate(u, strong).float().contiguous()
    jitter = T.color_factors(u).float().contiguous() if strong else None
    std, mean = torch.tensor(T.STD), torch.tensor(T.MEAN)
    scale, shift = 1 / (255.0 * std), -mean / std  # normalize: x * scale + shift
    luma = torch.tensor(T.LUMA)
    out = torch.empty(len(rows), 3, size, size)
    (lib or library()[0]).augment(images.data_ptr(), rows.data_ptr(), len(rows), images.shape[2], theta.data_ptr(),
                         None if jitter is None else jitter.data_ptr(), luma.data_ptr(), scale.data_ptr(),
                         shift.data_ptr(), size, out.data_ptr(), torch.get_num_threads())
    return out


def reference(images: torch.Tensor, rows: torch.Tensor, u: torch.Tensor, size: int, augment: str) -> torch.Tensor:
    """What augmented computes, with the lesson's PyTorch code."""
    return T.normalize(T.augment_images(images.index_select(0, rows), u, size, augment))


@lru_cache(maxsize=None)
def available() -> tuple[bool, str]:
    """Whether the kernel can be used here (built, and the same images as PyTorch's on a few batches), and why."""
    return native.verified(library(), differences)


def differences() -> Optional[str]:
    """What of the kernel's images differs from the lesson's PyTorch code on a few batches, or None."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 23, 23), generator=gen, dtype=torch.uint8)
    stored = stored_for_kernel(images)
    rows = torch.tensor([4, 0, 2, 2])
    u = torch.rand(4, T.N_RANDOM, generator=gen)
    u[0, 0], u[1, 4], u[2, 5] = 1.0, 0.1, 0.0  # the whole image; a flip; the largest rotation (corners reflected)
    for size, augment in ((16, "light"), (16, "strong"), (29, "strong")):
        if not torch.allclose(augmented(stored, rows, u, size, augment),
                              reference(images, rows, u, size, augment), rtol=0, atol=2e-3):
            return "its images differ from PyTorch's"
    return None


def seconds_per_batch(fn: Callable, images: torch.Tensor, size: int, augment: str, batch: int,
                      reps: int = 5) -> float:
    """Median seconds of fn on batches of the cached images (a first call untimed)."""
    gen = torch.Generator().manual_seed(0)
    times = []
    for rep in range(reps + 1):
        rows = torch.randint(0, len(images), (batch,), generator=gen)
        u = torch.rand(batch, T.N_RANDOM, generator=gen)
        start = time.perf_counter()
        fn(images, rows, u, size, augment)
        if rep:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def choose(mode: str, cache: T.ImageCache, size: int, augment: str, batch: int) -> Optional[Callable]:
    """The kernel for AugmentedImages (augmented), or None for PyTorch's code, as `mode` says, and a line saying
    which: "c" where the kernel is available, "auto" where it is also faster on batches of this cache. With the
    kernel, the cache holds its images as stored_for_kernel stores them (the same values). Under torchrun rank
    0's choice is every process's."""
    if mode not in MODES:
        raise ValueError(f"augment kernel must be one of {MODES}, got {mode!r}")
    ok, how = available() if mode != "torch" and augment in ("light", "strong") else (False, "")
    stored = stored_for_kernel(cache.images) if ok else None
    if mode == "torch" or augment == "none":
        use, why = False, "PyTorch" + (" (the C kernel does 'light' and 'strong')" if mode != "torch" else "")
    elif not ok:
        use, why = False, f"PyTorch (no C kernel: {how})"
    elif mode == "c":
        use, why = True, f"C kernel ({how})"
    else:
        c = seconds_per_batch(augmented, stored, size, augment, batch)
        torch_s = seconds_per_batch(reference, cache.images, size, augment, batch)
        use = c < torch_s
        why = (f"{'C kernel' if use else 'PyTorch'} (a batch of {batch}: {c * 1e3:.1f} ms in C, "
               f"{torch_s * 1e3:.1f} ms in PyTorch)")
    use = trainkit.same_on_all(use)
    print(f"augmentation: {why}", flush=True)
    if use:
        cache.images = stored
    return augmented if use else None
