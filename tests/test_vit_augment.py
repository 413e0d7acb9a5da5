"""extras/vit_augment.c against the lesson's PyTorch augmentation (transformer.augment_images then normalize, itself
tested against torchvision in test_augmentation.py): the same images for crops, flips, the largest rotations
(corners read through the reflection), colour changes that clip, image sizes that are not multiples of the
kernel's 8 lanes, and the cache's last image. And how the choice between the two is made and said. No timing is
asserted."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # extras/ of this repository

import transformer as T  # noqa: E402
from extras import vit_augment as va  # noqa: E402

BUILT, WHY = va.available()
needs_kernel = pytest.mark.skipif(not BUILT, reason=f"no C augmentation here: {WHY}")


@pytest.fixture(scope="module")
def cache():
    g = torch.Generator().manual_seed(0)
    return T.ImageCache(torch.randint(0, 256, (12, 3, 41, 41), generator=g, dtype=torch.uint8), torch.arange(12) % 2)


def random_numbers(batch, seed=1):
    u = torch.rand(batch, T.N_RANDOM, generator=torch.Generator().manual_seed(seed))
    u[0, 0], u[0, 5] = 1.0, 1.0  # the whole image turned by 20 degrees: its corners come from outside
    u[1, 0], u[1, 5] = 0.0, 0.0  # the smallest crop turned the other way
    u[2, 4] = 0.1  # flipped
    u[3, 6:] = torch.tensor([0.99, 0.0, 0.99])  # brightness 1.39, contrast 0.6, saturation 1.39: values clip
    return u


@needs_kernel
@pytest.mark.parametrize("augment", ["light", "strong"])
@pytest.mark.parametrize("size", [32, 29, 8, 50])
def test_the_kernel_makes_the_lessons_images(cache, augment, size):
    rows = torch.tensor([11, 0, 5, 11, 3, 7, 2, 9, 1])  # the last image of the cache among them, twice
    u = random_numbers(len(rows))
    ours = va.augmented(va.stored_for_kernel(cache.images), rows, u, size, augment)
    theirs = T.normalize(T.augment_images(cache.images[rows], u, size, augment))
    assert ours.shape == (len(rows), 3, size, size) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-3)  # 1e-3 of a standard deviation: ~0.06 of a level


# The kernel's vector paths: AVX-512 and AVX2 gathers where the build has them, and plain C; each one built and run
# here where the compiler can make it and the processor has its instructions, whatever -march=native would choose.
PATHS = {"avx512": ("-O3", "-mavx512f", "-mavx2", "-mfma", "-fopenmp"),
         "avx2": ("-O3", "-mavx2", "-mfma", "-mno-avx512f", "-fopenmp"), "plain C": ("-O3",)}
NEEDS = {"avx512": {"avx512f", "avx2", "fma"}, "avx2": {"avx2", "fma"}, "plain C": set()}


def cpu_flags() -> set:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))


@needs_kernel
@pytest.mark.parametrize("path", PATHS)
def test_each_of_the_kernels_paths_makes_the_lessons_images(cache, path):
    if not NEEDS[path] <= cpu_flags():
        pytest.skip(f"this processor has not the {path} path's instructions")
    lib, how = va.library((PATHS[path],))
    if lib is None:
        pytest.skip(f"cannot build the {path} path here: {how}")
    rows = torch.tensor([11, 0, 5, 11, 3, 7, 2, 9, 1])
    u = random_numbers(len(rows))
    for size, augment in ((37, "strong"), (16, "light")):  # lanes of 16 and 8 and a remainder; none but the rest
        ours = va.augmented(va.stored_for_kernel(cache.images), rows, u, size, augment, lib=lib)
        theirs = T.normalize(T.augment_images(cache.images[rows], u, size, augment))
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-3)


@needs_kernel
def test_the_kernel_clips_colours_as_the_lesson_does(cache):
    rows, u = torch.tensor([3, 4]), random_numbers(4)[2:]
    out = va.augmented(va.stored_for_kernel(cache.images), rows, u, 20, "strong")
    pixels = out * torch.tensor(T.STD).view(1, 3, 1, 1) * 255 + torch.tensor(T.MEAN).view(1, 3, 1, 1) * 255
    assert pixels.min() > -0.05 and pixels.max() < 255.05
    assert (pixels[1] > 254.9).any()  # brightened and saturated: some values reach the top


@needs_kernel
def test_the_dataset_gives_the_same_batch_with_the_kernel_or_without(cache):
    keys = [(4, i) for i in (3, 11, 0, 6)]
    plain = T.AugmentedImages(cache, 24, "strong", seed=2)
    fast = T.AugmentedImages(T.ImageCache(va.stored_for_kernel(cache.images), cache.labels), 24, "strong", seed=2,
                             kernel=va.augmented)
    (a, la), (b, lb) = plain.__getitems__(keys), fast.__getitems__(keys)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-3)
    assert la.tolist() == lb.tolist()


@needs_kernel
def test_the_kernel_refuses_a_cache_it_cannot_read(cache):
    rows, u = torch.tensor([0]), random_numbers(4)[:1]
    with pytest.raises(ValueError, match="stored_for_kernel"):
        va.augmented(cache.images, rows, u, 16, "light")  # not channels last
    with pytest.raises(ValueError, match="stored_for_kernel"):
        va.augmented(cache.images.contiguous(memory_format=torch.channels_last), rows, u, 16, "light")  # no spare byte
    with pytest.raises(IndexError):
        va.augmented(va.stored_for_kernel(cache.images), torch.tensor([12]), u, 16, "light")
    with pytest.raises(ValueError, match="'light' and 'strong'"):
        va.augmented(va.stored_for_kernel(cache.images), rows, u, 16, "none")


def test_torch_and_none_keep_pytorchs_code_and_say_so(cache, capsys):
    assert va.choose("torch", cache, 16, "strong", 4) is None
    assert capsys.readouterr().out.strip() == "augmentation: PyTorch"
    assert va.choose("auto", cache, 16, "none", 4) is None
    assert "the C kernel does 'light' and 'strong'" in capsys.readouterr().out
    with pytest.raises(ValueError, match="auto"):
        va.choose("fast", cache, 16, "strong", 4)


@needs_kernel
def test_c_uses_the_kernel_and_stores_the_cache_for_it(capsys):
    images = torch.randint(0, 256, (6, 3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    cache = T.ImageCache(images.clone(), torch.arange(6) % 2)
    assert va.choose("c", cache, 16, "light", 4) is va.augmented
    assert capsys.readouterr().out.startswith("augmentation: C kernel (")
    assert cache.images.is_contiguous(memory_format=torch.channels_last) and torch.equal(cache.images, images)


@needs_kernel
def test_auto_keeps_whichever_measured_faster(monkeypatch, capsys):
    cache = T.ImageCache(torch.zeros(4, 3, 20, 20, dtype=torch.uint8), torch.arange(4) % 2)
    times = {va.augmented: 0.002, va.reference: 0.009}
    monkeypatch.setattr(va, "seconds_per_batch", lambda fn, *args: times[fn])
    assert va.choose("auto", cache, 16, "strong", 4) is va.augmented
    assert "C kernel (a batch of 4: 2.0 ms in C, 9.0 ms in PyTorch)" in capsys.readouterr().out
    times = {va.augmented: 0.009, va.reference: 0.002}
    cache = T.ImageCache(torch.zeros(4, 3, 20, 20, dtype=torch.uint8), torch.arange(4) % 2)
    assert va.choose("auto", cache, 16, "strong", 4) is None
    assert "PyTorch (a batch of 4: 9.0 ms in C, 2.0 ms in PyTorch)" in capsys.readouterr().out
    assert cache.images.is_contiguous()  # left as it was


def test_without_a_compiler_pytorch_augments_and_the_reason_is_printed(monkeypatch, cache, capsys):
    monkeypatch.setattr(va, "available", lambda: (False, "no C compiler found (set CC to one)"))
    assert va.choose("auto", cache, 16, "strong", 4) is None
    assert "PyTorch (no C kernel: no C compiler found (set CC to one))" in capsys.readouterr().out


def test_a_kernel_that_makes_other_images_is_not_used_and_the_reason_says_so():
    from extras import native

    assert native.verified((None, "no C compiler found"), lambda: None) == (False, "no C compiler found")
    assert native.verified((object(), "cc -O3"), lambda: None) == (True, "cc -O3")
    assert native.verified((object(), "cc -O3"), lambda: "its images differ from PyTorch's") == \
        (False, "built (cc -O3) but its images differ from PyTorch's; not used")
