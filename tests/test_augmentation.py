"""Day 1's batched augmentation (transformer.augment_images) against torchvision's own crop, flip and colour
functions, one operation at a time, and the per-image seeding that makes N processes and resumed runs draw
the same augmentations as one uninterrupted process."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

import transformer as T


def neutral(batch: int) -> torch.Tensor:
    """Random numbers that leave an image as it is: the whole image, no flip, no rotation, factors of 1."""
    u = torch.full((batch, T.N_RANDOM), 0.5)
    u[:, 0] = 1.0  # the whole area
    u[:, 4] = 0.9  # no flip
    return u


def area_share(share: float) -> float:
    """u[:, 0] for a crop of this share of the image's area."""
    return (share - 0.35) / 0.65


@pytest.fixture
def images():
    """Smooth images (bilinear reading between pixels is then close to any other resampling), away from 0 and
    255 (no colour change clips)."""
    g = torch.Generator().manual_seed(0)
    small = torch.rand(3, 3, 8, 8, generator=g)
    return (F.interpolate(small, size=(80, 80), mode="bicubic").clamp(0, 1) * 150 + 50).round().byte()


@pytest.mark.parametrize("augment", ["light", "strong"])
def test_neutral_numbers_give_the_image_back(images, augment):
    out = T.augment_images(images, neutral(3), 80, augment)
    assert out.shape == (3, 3, 80, 80)
    torch.testing.assert_close(out, images.float(), atol=0.01, rtol=0)


def test_a_crop_without_scaling_is_a_slice_and_a_flip_is_torchvisions(images):
    u = neutral(3)
    u[:, 0] = area_share(0.64)  # 0.8 of each side: 64 of 80 pixels, read at 64 pixels, so no resampling
    u[0, 2] = 0.5  # centred: pixels 8..71
    u[1, 2] = 1.0  # as far right as the crop goes: pixels 16..79
    u[2, 4] = 0.1  # flipped
    out = T.augment_images(images, u, 64, "light")
    torch.testing.assert_close(out[0], images[0, :, 8:72, 8:72].float(), atol=0.01, rtol=0)
    torch.testing.assert_close(out[1], images[1, :, 8:72, 16:80].float(), atol=0.01, rtol=0)
    torch.testing.assert_close(out[2], TF.horizontal_flip(images[2, :, 8:72, 8:72]).float(), atol=0.01, rtol=0)


def test_a_smaller_crop_is_torchvisions_resized_crop(images):
    u = neutral(1)
    u[:, 0] = area_share(0.4)
    side = math.sqrt(0.4) * 80
    out = T.augment_images(images[:1], u, 32, "light")
    top = (80 - side) / 2
    ref = TF.resized_crop(images[:1].float(), round(top), round(top), round(side), round(side), [32, 32],
                          antialias=False)
    # the same bilinear reading of the same window, up to where the window's edges fall between pixels
    assert (out - ref).abs().mean() < 5.0
    assert (out - images[:1, :, :32, :32].float()).abs().mean() > 20.0  # and not merely the image's corner


@pytest.mark.parametrize("k, adjust", [(6, TF.adjust_brightness), (7, TF.adjust_contrast), (8, TF.adjust_saturation)])
def test_each_colour_factor_is_torchvisions(images, k, adjust):
    u = neutral(3)
    u[:, k] = torch.tensor([0.3, 0.6, 0.8])  # factors 0.84, 1.08, 1.24
    out = T.augment_images(images, u, 80, "strong")
    for i, factor in enumerate((0.6 + 0.8 * u[:, k]).tolist()):
        ref = adjust(images[i].float() / 255, factor).clamp(0, 1) * 255
        torch.testing.assert_close(out[i], ref, atol=0.05, rtol=0)


def test_light_changes_no_colour_and_strong_rotates(images):
    u = neutral(1)
    u[:, 6:] = 0.9
    torch.testing.assert_close(T.augment_images(images[:1], u, 80, "light"), images[:1].float(), atol=0.01, rtol=0)
    u = neutral(1)
    u[:, 5] = 1.0  # 20 degrees
    rotated = T.augment_images(images[:1], u, 80, "strong")
    ref = TF.rotate(images[:1].float(), 20.0, interpolation=TF.InterpolationMode.BILINEAR)
    centre = slice(25, 55)  # away from the corners, where the two fill differently
    torch.testing.assert_close(rotated[..., centre, centre], ref[..., centre, centre], atol=0.01, rtol=0)


def test_an_image_draws_the_same_augmentation_in_any_batch():
    g = torch.Generator().manual_seed(1)
    cache = T.ImageCache(torch.randint(0, 256, (10, 3, 40, 40), generator=g, dtype=torch.uint8),
                         torch.arange(10) % 2)
    data = T.AugmentedImages(cache, 32, "strong", seed=3)
    whole, labels = data.__getitems__([(2, i) for i in range(10)])
    part, part_labels = data.__getitems__([(2, 7), (2, 1)])
    torch.testing.assert_close(part, whole[[7, 1]])
    assert part_labels.tolist() == labels[[7, 1]].tolist()
    other_epoch, _ = data.__getitems__([(3, 7)])
    assert not torch.equal(other_epoch[0], whole[7])
    single, label = data[(2, 4)]
    torch.testing.assert_close(single, whole[4])
    assert int(label) == int(labels[4])
