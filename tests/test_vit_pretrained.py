"""transformer.py --pretrained, against torchvision's VisionTransformer as the truth: a small randomly
initialised one (ViT-B/16's 12 heads, everything else tiny) saved to a .pth stands in for the ImageNet
download, so the tests run offline in seconds."""

import json

import pytest
import torch

import transformer as T
from extras import vit_pretrained as P
from helpers import call_main
from test_transformer import randomize_, write_image_folder

needs_all = pytest.mark.needs("patch_embedding", "attention", "encoder_block")


def small_torchvision_vit(num_classes=10, seed=0):
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    tv = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=12, hidden_dim=48, mlp_dim=96,
                           num_classes=num_classes)
    return randomize_(tv, std=0.1, seed=seed).eval()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """(path of the saved state_dict, the torchvision model)."""
    tv = small_torchvision_vit()
    path = tmp_path_factory.mktemp("weights") / "vit_small.pth"
    torch.save(tv.state_dict(), path)
    return str(path), tv


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"), per_class=6, val_per_class=3)


def finetune(weights_path, image_folder, out, *flags) -> int:
    """transformer.py --pretrained on the small weights and the image folder, writing to out, quietly."""
    return T.main(["--pretrained", "vit_b_16", "--weights", weights_path, "--data-dir", str(image_folder),
                   "--output-dir", str(out), "--quiet", *flags])


def test_config_is_read_off_the_weights_shapes(weights):
    path, tv = weights
    config = P.vit_config_from_torchvision_state_dict(tv.state_dict(), n_heads=12)
    assert (config.image_size, config.patch_size, config.dim, config.depth, config.mlp_dim, config.num_classes) \
        == (32, 8, 48, 2, 96, 10)


@needs_all
def test_pretrained_model_logits_equal_torchvisions(weights):
    path, tv = weights
    ours = P.pretrained_vit("vit_b_16", path).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (ours(images) - tv(images)).abs().max().item() < 1e-5


def test_weights_normalization_is_what_normalize_uses():
    mean, std = P.weights_normalization("vit_b_16")
    torch.testing.assert_close(torch.tensor(mean), torch.tensor(T.MEAN))
    torch.testing.assert_close(torch.tensor(std), torch.tensor(T.STD))


@needs_all
def test_class_token_features_are_what_the_head_reads(weights):
    path, tv = weights
    model = P.pretrained_vit("vit_b_16", path)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    features = P.class_token_features(model, images, torch.device("cpu"), None)
    assert features.shape == (4, 48)
    expected = T.predict_logits(model, images, torch.device("cpu"), None)
    torch.testing.assert_close(model.head(features), expected, atol=1e-5, rtol=1e-5)
    assert isinstance(model.head, torch.nn.Linear)  # put back


@needs_all
def test_finetune_head_changes_only_the_head_and_learns_the_folder(weights, image_folder, tmp_path):
    path, tv = weights
    out = tmp_path / "run"
    assert finetune(path, image_folder, out, "--finetune", "head", "--epochs", "100", "--lr", "1e-2") == 0
    ckpt = torch.load(out / "vit_cats_vs_dogs.pth", weights_only=True)
    original = P.from_torchvision_state_dict(tv.state_dict())
    for name, tensor in ckpt["model"].items():
        if name.startswith("head."):
            continue
        assert torch.equal(tensor, original[name]), name  # the encoder is frozen
    assert ckpt["model"]["head.weight"].shape == (2, 48) and ckpt["model"]["head.weight"].abs().sum() > 0
    assert ckpt["config"]["image_size"] == 32 and ckpt["config"]["num_classes"] == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finetune"] == "head" and metrics["trained_parameters"] == 2 * 48 + 2
    # cats are red and dogs blue: even random features separate them on the training images
    assert metrics["final_train_loss"] < 0.6 and metrics["final_train_accuracy"] >= 0.9
    assert sum(map(sum, metrics["confusion_matrix"])) == 6


@needs_all
def test_finetuned_checkpoint_predicts_like_any_other(weights, image_folder, tmp_path, capsys):
    path, _ = weights
    out = tmp_path / "run"
    assert finetune(path, image_folder, out, "--epochs", "5") == 0
    capsys.readouterr()
    image = next((image_folder / "validation" / "cats").iterdir())
    code, stdout, err = call_main(T.main, ["--predict", str(image), "--output-dir", str(out)], capsys)
    assert code == 0 and "cats" in stdout and "dogs" in stdout


@needs_all
def test_finetune_all_trains_the_encoder_too(weights, image_folder, tmp_path):
    path, tv = weights
    out = tmp_path / "run"
    assert finetune(path, image_folder, out, "--finetune", "all", "--epochs", "1", "--lr", "1e-3",
                    "--batch-size", "4") == 0
    ckpt = torch.load(out / "vit_cats_vs_dogs.pth", weights_only=True)
    original = P.from_torchvision_state_dict(tv.state_dict())
    assert not torch.equal(ckpt["model"]["layers.0.mlp.fc1.weight"], original["layers.0.mlp.fc1.weight"])
    assert ckpt["config"]["image_size"] == 32 and ckpt["config"]["dim"] == 48


@pytest.mark.parametrize("argv, message", [
    (["--weights", "x.pth"], "--weights needs --pretrained"),
    (["--pretrained", "vit_b_16", "--weights", "missing.pth"], "no such file"),
    (["--pretrained", "vit_b_16", "--weights", "{bad}"], "not a readable PyTorch file"),
    (["--pretrained", "vit_b_16", "--weights", "{other}"], "not a torchvision VisionTransformer"),
])
def test_bad_weights_end_with_one_line(argv, message, image_folder, tmp_path, capsys):
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    torch.save({"conv.weight": torch.zeros(2)}, tmp_path / "other.pth")
    argv = [a.format(bad=tmp_path / "bad.pth", other=tmp_path / "other.pth") for a in argv]
    code, out, err = call_main(T.main, argv + ["--data-dir", str(image_folder), "--output-dir", str(tmp_path)],
                               capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_offline_without_weights_says_to_pass_a_file(monkeypatch, image_folder, tmp_path, capsys):
    from torchvision.models import ViT_B_16_Weights

    def offline(self, *args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(ViT_B_16_Weights, "get_state_dict", offline)
    code, out, err = call_main(T.main, ["--pretrained", "vit_b_16", "--data-dir", str(image_folder),
                                        "--output-dir", str(tmp_path)], capsys)
    assert code == 2 and "--weights PATH" in err and len(err.strip().splitlines()) == 1
