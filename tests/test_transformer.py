"""Tests for transformer.py (Day 1), each against an independent truth named in the test's name:
torch's nn.MultiheadAttention, torchvision's VisionTransformer and EncoderBlock, F.unfold, PIL, and the files the
CLI must write. A tiny image folder is built in tmp_path, so no test needs the network or the course data.
A test of one exercise alone carries its name (`pytest -m attention`); whole-model tests carry
`needs("patch_embedding", "attention", "encoder_block")`."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import grading
from grading import randomize_  # torchvision zero-initialises its head and some biases
import transformer as T
from extras import vit_data
from extras.vit_pretrained import from_torchvision_state_dict

# whole-model tests: green once all three Day 1 exercises are
needs_all = pytest.mark.needs("patch_embedding", "attention", "encoder_block")


def small_config(**overrides) -> T.ViTConfig:
    base = dict(image_size=32, patch_size=8, dim=48, depth=2, n_heads=4, mlp_dim=96, num_classes=5)
    return T.ViTConfig(**{**base, **overrides})


def torchvision_vit(c: T.ViTConfig) -> nn.Module:
    from torchvision.models.vision_transformer import ConvStemConfig, VisionTransformer

    stem = [ConvStemConfig(channels, kernel_size=3, stride=2) for channels in c.stem_channels] or None
    return VisionTransformer(image_size=c.image_size, patch_size=c.patch_size, num_layers=c.depth,
                             num_heads=c.n_heads, hidden_dim=c.dim, mlp_dim=c.mlp_dim, num_classes=c.num_classes,
                             conv_stem_configs=stem)


# ---------------------------------------------------------------------------------------------------- components


# The exercises' graded tests: the checks live in tests/grading.py (shared with the battery of correct and
# wrong solutions in tests/test_grading.py) and say what is wrong in the exercise's terms.


@pytest.mark.patch_embedding
def test_patch_embedding_matches_unfold_and_matmul():
    grading.check_patch_embedding(T.PatchEmbedding)


@pytest.mark.patch_embedding
def test_patch_embedding_with_stem_matches_torchvision_conv_proj_in_eval_and_training_mode():
    grading.check_patch_embedding_stem(T.PatchEmbedding)


@pytest.mark.attention
def test_attention_matches_nn_multiheadattention():
    grading.check_attention(T.MultiHeadSelfAttention)


@pytest.mark.attention
def test_attention_rows_mix_values_like_explicit_softmax_formula():
    grading.check_attention_formula(T.MultiHeadSelfAttention)


@pytest.mark.encoder_block
def test_encoder_block_matches_torchvision_encoderblock():
    grading.check_encoder_block(T.EncoderBlock)


@pytest.mark.encoder_block
def test_encoder_block_drops_both_branches_with_dropout_one_in_training():
    grading.check_encoder_block_dropout(T.EncoderBlock)


# ---------------------------------------------------------------------------------------------------- whole model


@needs_all
@pytest.mark.parametrize("batch", [1, 5])
def test_model_matches_torchvision_visiontransformer(batch):
    torch.manual_seed(0)
    c = small_config()
    ref = randomize_(torchvision_vit(c)).eval()
    ours = T.VisionTransformer(c).eval()
    ours.load_state_dict(from_torchvision_state_dict(ref.state_dict()))  # strict: every tensor maps, none left
    images = torch.randn(batch, 3, c.image_size, c.image_size)
    with torch.no_grad():
        expected, got = ref(images), ours(images)
    assert got.shape == (batch, c.num_classes)
    assert (got - expected).abs().max().item() < 1e-5


@needs_all
def test_conv_stem_model_matches_torchvision_conv_stem_configs_in_eval_and_training_mode_with_same_gradients():
    torch.manual_seed(0)
    c = small_config(stem_channels=(6, 12, 16))
    ref = randomize_(torchvision_vit(c))
    g = torch.Generator().manual_seed(1)
    for bn in [m for m in ref.modules() if isinstance(m, nn.BatchNorm2d)]:  # running statistics far from 0 and 1
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g))
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) + 0.5)
    ours = T.VisionTransformer(c)
    ours.load_state_dict(from_torchvision_state_dict(ref.state_dict()))  # strict: every tensor maps, none left
    images = torch.randn(4, 3, c.image_size, c.image_size)
    with torch.no_grad():  # eval: BatchNorm normalises with its running statistics
        eval_logits = ours.eval()(images)
        assert (eval_logits - ref.eval()(images)).abs().max().item() < 1e-5
    ref.train(), ours.train()  # training: with the batch's statistics, which also update the running ones
    expected, logits = ref(images), ours(images)
    r = torch.randn(expected.shape, generator=g)
    (expected * r).sum().backward()
    (logits * r).sum().backward()
    assert (logits - expected).abs().max().item() < 1e-5
    assert (logits - eval_logits).abs().max().item() > 1e-3  # the two modes differ: both were compared
    theirs = from_torchvision_state_dict({k: v.grad for k, v in ref.named_parameters()})
    for name, p in ours.named_parameters():
        assert torch.allclose(p.grad, theirs[name], rtol=1e-4, atol=1e-6), name
    theirs = from_torchvision_state_dict(dict(ref.named_buffers()))
    for name, buffer in ours.named_buffers():
        assert torch.allclose(buffer.double(), theirs[name].double(), atol=1e-6), name


@pytest.mark.parametrize("stem_channels", [(), (6, 12, 16)])
def test_parameter_names_and_shapes_match_torchvision_one_to_one(stem_channels):
    c = small_config(stem_channels=stem_channels)
    ours = {k: v.shape for k, v in T.VisionTransformer(c).state_dict().items()}
    theirs = {k: v.shape for k, v in from_torchvision_state_dict(torchvision_vit(c).state_dict()).items()}
    assert ours == theirs


@needs_all
@pytest.mark.parametrize("batch", [1, 2, 7])
def test_output_shape_is_batch_by_classes_for_batch_1_and_many(batch):
    c = small_config(image_size=24, patch_size=6, num_classes=3)
    logits = T.VisionTransformer(c)(torch.randn(batch, 3, 24, 24))
    assert logits.shape == (batch, 3)
    assert torch.isfinite(logits).all()


@needs_all
def test_every_parameter_receives_a_gradient():
    torch.manual_seed(0)
    model = T.VisionTransformer(small_config())
    nn.init.normal_(model.head.weight, std=0.02)  # the zero-initialised head would block gradients to the rest
    F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_conv_stem_keeps_pytorchs_default_init_and_the_projection_its_truncated_normal():
    torch.manual_seed(0)
    emb = T.VisionTransformer(small_config(dim=96, stem_channels=(32, 64, 64))).patch_embedding
    convs = [m for m in emb.stem if isinstance(m, nn.Conv2d)]
    norms = [m for m in emb.stem if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == len(norms) == 3 and all(conv.bias is None for conv in convs)  # BatchNorm shifts instead
    for conv in convs:  # Kaiming-uniform (a = sqrt 5): uniform in +-1/sqrt(fan_in), std 1/sqrt(3 fan_in)
        fan_in = conv.weight[0].numel()
        assert abs(conv.weight.std().item() * (3 * fan_in) ** 0.5 - 1) < 0.1
    assert all((bn.weight == 1).all() and (bn.bias == 0).all() for bn in norms)
    assert emb.proj.kernel_size == (1, 1) and abs(emb.proj.weight.std().item() - 0.02) < 0.003
    assert (emb.proj.bias == 0).all()


def test_wrong_image_size_is_a_clear_error_like_torchvision():
    model = T.VisionTransformer(small_config())
    with pytest.raises(ValueError, match=r"expects images of shape \(B, 3, 32, 32\)"):
        model(torch.randn(1, 3, 24, 32))


@pytest.mark.parametrize("overrides, message", [
    (dict(image_size=30, patch_size=8), "not divisible by patch_size"),
    (dict(dim=50, n_heads=4), "not divisible by n_heads"),
    (dict(depth=0), "depth must be a positive integer"),
    (dict(num_classes=1), "num_classes must be at least 2"),
    (dict(dropout=1.5), "dropout must be in"),
    (dict(stem_channels=(8, 8)), r"halves the image 2 times, to patches of 4 pixels, but patch_size is 8"),
    (dict(stem_channels=(8, 0, 8)), "stem_channels must be a tuple of positive integers"),
    (dict(stem_channels=8), "stem_channels must be a tuple of positive integers"),
])
def test_config_validation_raises_clear_valueerror(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_config(**overrides)


def test_stem_channels_from_a_saved_config_become_a_tuple():
    c = small_config(stem_channels=[6, 12, 16])  # as json (metrics.json) gives them back
    assert c.stem_channels == (6, 12, 16) and c == small_config(stem_channels=(6, 12, 16))


@pytest.mark.parametrize("argv, expected", [
    ([], (16, 32, 64, 128, 256)),  # the default preset has a stem
    (["--preset", "smoke"], ()),
    (["--stem-channels", "none"], ()),
    (["--stem-channels", ""], ()),
    (["--patch-size", "8", "--stem-channels", "16,32,64"], (16, 32, 64)),
    (["--patch-size", "4", "--stem-channels", "16,32"], (16, 32)),
])
def test_stem_channels_flag_takes_comma_separated_channels_or_none(argv, expected):
    assert T.model_config(T.parse_args(argv)).stem_channels == expected


@pytest.mark.parametrize("argv, compile_mode", [
    ([], "auto"),  # the default preset: torch.compile where it measures faster
    (["--preset", "smoke"], "off"),
    (["--compile", "off"], "off"),
    (["--compile"], "on"),  # --compile alone, as before it took a value
])
def test_compile_flag_and_presets(argv, compile_mode):
    assert T.train_config(T.parse_args(argv)).compile == compile_mode


# ---------------------------------------------------------------------------------------------------- data


def write_image_folder(root, per_class=4, val_per_class=2):
    """train/ and validation/ with cats (reddish) and dogs (bluish) in several modes, plus one corrupt JPEG."""
    colors = {"cats": (200, 40, 40), "dogs": (40, 40, 200)}
    modes = ["RGB", "L", "RGBA", "CMYK", "P"]
    for split, n in (("train", per_class), ("validation", val_per_class)):
        for cls, rgb in colors.items():
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                mode = modes[i % len(modes)]
                img = Image.new("RGB", (40 + 3 * i, 36), rgb).convert(mode)
                img.save(folder / f"{cls}_{i}.{'jpg' if mode in ('RGB', 'CMYK') else 'png'}")
    good = (root / "train" / "cats" / "cats_0.jpg").read_bytes()
    (root / "train" / "dogs" / "corrupt.jpg").write_bytes(good[: len(good) // 3])  # truncated JPEG
    return root


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"), per_class=6, val_per_class=3)


def data_args(data_dir, **kw):
    return T.parse_args(["--data-dir", str(data_dir), "--preset", "smoke", *kw.get("extra", [])])


def split_flags(args):
    return {k: getattr(args, k) for k in ("data_dir", "dataset", "val_fraction", "seed", "max_train_samples")}


def test_decode_image_matches_pil_rgb_for_gray_rgba_cmyk(tmp_path):
    for mode, color in [("L", 90), ("RGBA", (10, 200, 30, 128)), ("CMYK", (0, 255, 255, 0)), ("RGB", (1, 2, 3))]:
        path = tmp_path / f"x_{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
        Image.new(mode, (20, 10), color).save(path)
        expected = torch.tensor(Image.open(path).convert("RGB").getpixel((5, 5)), dtype=torch.uint8)
        out = T.decode_image(path, 8)
        assert out.shape == (3, 8, 8) and out.dtype == torch.uint8
        assert (out[:, 4, 4].int() - expected.int()).abs().max() <= 2, mode


@pytest.mark.parametrize("crop", [1.0, 0.875, 0.6])
def test_decode_image_centre_crop_is_torchvisions_resize_then_centre_crop(tmp_path, crop):
    from torchvision.transforms.v2 import functional as TF

    # a smooth picture whose red channel codes x and green codes y, so a misplaced crop shows in the values
    x, y = torch.meshgrid(torch.arange(150.0), torch.arange(300.0), indexing="ij")
    pixels = torch.stack([y / 299 * 255, x / 149 * 255, torch.full_like(x, 128)]).round().to(torch.uint8)
    path = tmp_path / "wide.png"
    TF.to_pil_image(pixels).save(path)
    expected = TF.center_crop(TF.resize(TF.pil_to_tensor(Image.open(path)), round(48 / crop)), [48, 48])
    out = T.decode_image(path, 48, crop)
    assert out.shape == (3, 48, 48) and out.dtype == torch.uint8
    diff = (out.int() - expected.int()).abs().max().item()
    assert diff <= 4, f"decode_image(crop={crop}) differs from Resize({round(48 / crop)}) + CenterCrop(48) by {diff}"


@needs_all
def test_tta_averages_the_logits_of_each_image_and_its_left_right_mirror():
    torch.manual_seed(0)
    model = randomize_(T.VisionTransformer(T.ViTConfig(image_size=16, patch_size=4, dim=16, depth=1, n_heads=2,
                                                       mlp_dim=32)))  # its head starts at zero: all logits 0
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    plain = T.predict_logits(model, images, torch.device("cpu"))
    mirrored = T.predict_logits(model, images.flip(3), torch.device("cpu"))  # columns reversed
    torch.testing.assert_close(T.predict_logits(model, images, torch.device("cpu"), tta=True),
                               (plain + mirrored) / 2)
    assert not torch.allclose(plain, mirrored)  # the mirror matters to this model, so the check can fail


def test_image_folder_loads_via_datasets_and_skips_the_corrupt_file(image_folder):
    train, val, image_col, label_col, classes = T.load_splits(**split_flags(data_args(image_folder)))
    assert classes == ["cats", "dogs"]
    cache = vit_data.cache_split(train, image_col, label_col, 16, "train")
    assert cache.skipped == 1  # the truncated JPEG, counted and skipped
    assert cache.images.shape == (12, 3, 16, 16) and cache.images.dtype == torch.uint8
    assert cache.labels.tolist().count(0) == 6 and cache.labels.tolist().count(1) == 6
    # cats are red, dogs are blue (grayscale files: equal), whatever mode the file was saved in
    red = cache.images[:, 0].float().mean((1, 2))
    blue = cache.images[:, 2].float().mean((1, 2))
    assert (red[cache.labels == 0] >= blue[cache.labels == 0]).all()
    assert (blue[cache.labels == 1] >= red[cache.labels == 1]).all()
    assert (red != blue).sum() >= 8
    val_cache = vit_data.cache_split(val, image_col, label_col, 16, "validation")
    assert len(val_cache) == 6 and val_cache.skipped == 0


# ---------------------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def trained(image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert T.main(["--data-dir", str(image_folder), "--preset", "smoke", "--epochs", "2", "--output-dir", str(out),
                   "--mixup", "0.8", "--cutmix", "1.0", "--mix-prob", "1.0", "--quiet"]) == 0  # the default's mixing
    return out


@needs_all
def test_main_smoke_writes_metrics_checkpoint_and_grid(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    for key in ("final_train_loss", "final_train_accuracy", "val_accuracy", "per_class_accuracy",
                "confusion_matrix", "train_images_per_second", "wall_seconds"):
        assert key in metrics, key
    assert metrics["skipped_files"] == 1
    assert metrics["epochs"] == 2
    assert sum(map(sum, metrics["confusion_matrix"])) == 6  # every validation image counted once
    assert (trained / "vit_predictions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = torch.load(trained / "vit_cats_vs_dogs.pth", weights_only=True)
    assert ckpt["class_names"] == ["cats", "dogs"]
    model = T.VisionTransformer(T.ViTConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    assert not list(trained.glob("*.tmp"))  # written atomically, no leftovers


@needs_all
def test_checkpoint_with_a_conv_stem_loads_back_with_the_stem_and_its_running_statistics(image_folder, tmp_path,
                                                                                         capsys):
    from extras.vit_commands import load_checkpoint

    assert T.main(["--data-dir", str(image_folder), "--preset", "smoke", "--stem-channels", "4,8,8", "--output-dir",
                   str(tmp_path), "--quiet"]) == 0
    path = tmp_path / "vit_cats_vs_dogs.pth"
    saved = torch.load(path, weights_only=True)
    model, class_names = load_checkpoint(path, torch.device("cpu"))
    assert model.config.stem_channels == (4, 8, 8) and class_names == ["cats", "dogs"]
    assert [type(m).__name__ for m in model.patch_embedding.stem][:3] == ["Conv2d", "BatchNorm2d", "ReLU"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved["model"][name]), name
    assert not torch.equal(saved["model"]["patch_embedding.stem.1.running_var"], torch.ones(4))  # trained stats
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert T.ViTConfig(**metrics["config"]) == model.config  # the json list becomes the tuple again
    image = image_folder / "validation" / "cats" / "cats_0.jpg"
    assert T.main(["--predict", str(image), "--checkpoint", str(path)]) == 0  # attention maps with a stem too
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(str(image))


@needs_all
def test_predict_prints_probabilities_that_sum_to_one(trained, image_folder, capsys):
    image = image_folder / "validation" / "dogs" / "dogs_0.jpg"
    assert T.main(["--predict", str(image), "--checkpoint", str(trained / "vit_cats_vs_dogs.pth")]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(str(image))
    probs = {w: float(p) for w, p in zip(line.split()[1::2], line.split()[2::2])}
    assert set(probs) == {"cats", "dogs"} and abs(sum(probs.values()) - 1) < 2e-3


@needs_all
def test_eval_only_reports_the_same_accuracy_as_metrics_json(trained, image_folder, capsys):
    assert T.main(["--eval-only", "--checkpoint", str(trained / "vit_cats_vs_dogs.pth"), "--data-dir",
                   str(image_folder)]) == 0
    out = capsys.readouterr().out
    assert "validation accuracy" in out and "confusion matrix" in out
    best = json.loads((trained / "metrics.json").read_text())["best_val_accuracy"]
    assert f"validation accuracy {best:.4f}" in out


@needs_all
def test_ctrl_c_in_the_final_evaluation_keeps_the_checkpoint_and_exits_130(image_folder, tmp_path, monkeypatch,
                                                                          capsys):
    calls, real_evaluate = [], T.evaluate

    def interrupt_the_final_evaluation(*args, **kwargs):  # one epoch: its validation, then the final one
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(T, "evaluate", interrupt_the_final_evaluation)
    with pytest.raises(SystemExit) as exit_info:
        T.main(["--data-dir", str(image_folder), "--preset", "smoke", "--output-dir", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 130 and len(calls) == 2
    assert "interrupted" in err.strip().splitlines()[-1] and "Traceback" not in err  # after the progress bars
    assert torch.load(tmp_path / "vit_cats_vs_dogs.pth", weights_only=True)["class_names"] == ["cats", "dogs"]


@needs_all
def test_ctrl_c_during_training_still_saves_checkpoint_and_report(image_folder, tmp_path, monkeypatch):
    calls = []

    def interrupt_on_third_step(*args, **kwargs):  # the LR schedule runs once per step: press Ctrl-C there
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return 1e-3

    monkeypatch.setattr(T, "learning_rate", interrupt_on_third_step)
    assert T.main(["--data-dir", str(image_folder), "--preset", "smoke", "--epochs", "5", "--output-dir",
                   str(tmp_path), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["interrupted"] is True and metrics["steps"] == 2
    assert (tmp_path / "vit_cats_vs_dogs.pth").is_file() and (tmp_path / "vit_predictions.png").is_file()


def bad_folders(root):
    (root / "empty").mkdir()
    (root / "flat" / "train").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "flat" / "train" / "a.png")
    (root / "one" / "train" / "cats").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "one" / "train" / "cats" / "a.png")
    return root


@pytest.mark.parametrize("argv, message", [
    (["--data-dir", "{root}/missing"], "no such folder"),
    (["--data-dir", "{root}/empty"], "expected a train/ folder"),
    (["--data-dir", "{root}/flat"], "no class subfolders"),
    (["--data-dir", "{root}/one"], "only one class"),
    (["--predict", "x.jpg", "--checkpoint", "{root}/nothing.pth"], "no checkpoint at"),
    (["--eval-only", "--checkpoint", "{root}/nothing.pth", "--data-dir", "{root}/one"], "no checkpoint at"),
    (["--image-size", "30", "--patch-size", "8"], "not divisible by patch_size"),
    (["--dim", "50", "--heads", "4"], "not divisible by n_heads"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--epochs", "many"], "invalid int value"),
    (["--eval-crop", "1.2"], "--eval-crop must be in (0.5, 1]"),
    (["--stem-channels", "8,x"], "argument --stem-channels: expected channel counts separated by commas"),
    (["--stem-channels", "8,8"], "halves the image 2 times, to patches of 4 pixels, but patch_size is 8"),
])
def test_bad_input_exits_nonzero_with_one_line_and_no_traceback(argv, message, tmp_path, capsys):
    bad_folders(tmp_path)
    argv = [a.format(root=tmp_path) for a in argv] + ["--preset", "smoke", "--output-dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exit_info:
        T.main(argv)
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert message in err and "Traceback" not in err


def test_hub_dataset_unreachable_is_one_clear_line(tmp_path, capsys, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # as in CI; never touches the network
    with pytest.raises(SystemExit) as exit_info:
        T.main(["--dataset", "course-test/no-such-dataset", "--preset", "smoke", "--output-dir", str(tmp_path)])
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--data-dir" in err and "Traceback" not in err
