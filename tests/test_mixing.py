"""Day 1's MixUp and CutMix (transformer.mixup, transformer.cutmix, transformer.Mixing) against torchvision's
v2.MixUp and v2.CutMix: with torch's generator seeded alike they draw the same lam and the same box, so the mixed
images and soft labels must be theirs."""

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

import transformer as T


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.rand(6, 3, 20, 24, generator=g) * 255, torch.tensor([0, 1, 1, 0, 2, 1])


@pytest.mark.parametrize("alpha", [0.8, 0.2])
def test_mixup_is_torchvisions(batch, alpha):
    images, labels = batch
    torch.manual_seed(3)
    theirs = v2.MixUp(alpha=alpha, num_classes=3)(images.clone(), labels)
    torch.manual_seed(3)
    lam = float(torch.distributions.Beta(torch.tensor([alpha]), torch.tensor([alpha])).sample(()))
    ours = T.mixup(images.clone(), F.one_hot(labels, 3).float(), lam)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("seed", range(6))
def test_cutmix_is_torchvisions_box_and_labels(batch, seed):
    images, labels = batch
    torch.manual_seed(seed)
    theirs = v2.CutMix(alpha=1.0, num_classes=3)(images.clone(), labels)
    torch.manual_seed(seed)
    lam = float(torch.distributions.Beta(torch.tensor([1.0]), torch.tensor([1.0])).sample(()))
    ours = T.cutmix(images.clone(), F.one_hot(labels, 3).float(), lam)
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=0)  # the same pixels, copied
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-6, atol=1e-6)


def test_mixing_mixes_a_share_of_the_batches_with_both_and_leaves_the_rest(batch):
    images, labels = batch
    s = T.TrainConfig(mixup=0.8, cutmix=1.0, mix_prob=0.5, seed=1)
    mix = T.Mixing(s, 3)
    kinds = []
    for _ in range(40):
        x, target = mix(images.clone(), labels)
        if target.dim() == 1:  # left alone: the images and the class indices as they were
            assert torch.equal(x, images) and torch.equal(target, labels)
            kinds.append("none")
        else:
            assert target.shape == (6, 3) and torch.allclose(target.sum(1), torch.ones(6))
            changed = (x != images).any(dim=(0, 1))  # which pixels differ in some image
            kinds.append("mixup" if changed.all() else "cutmix")
    assert 10 <= kinds.count("none") <= 30 and kinds.count("mixup") >= 3 and kinds.count("cutmix") >= 3
    off = T.Mixing(T.TrainConfig(mixup=0.0, cutmix=0.0, mix_prob=1.0), 3)
    assert off(images, labels)[1] is labels
