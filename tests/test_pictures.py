"""The pictures the scripts write: each PNG exists, opens with PIL and has a size, after the smoke runs of both
training scripts and after `transformer.py --predict`; and the plumbing in trainkit/ (smoothing, atomic
writes, pyplot's backend left alone)."""

import json
import math

import pytest
import torch
from PIL import Image

import llama
import trainkit
import transformer as T
from helpers import call_main
from test_transformer import write_image_folder

NEEDS_DAY1 = pytest.mark.needs("patch_embedding", "attention", "encoder_block")
NEEDS_DAY2 = pytest.mark.needs("rmsnorm", "swiglu", "causal_mask")


def assert_png(path):
    """The file exists, is a PNG that PIL decodes completely, and is not empty."""
    assert path.is_file(), f"{path} was not written"
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.verify()
    with Image.open(path) as img:
        img.load()
        assert img.size[0] > 100 and img.size[1] > 100, img.size
    assert not path.with_name(path.name + ".tmp").exists()  # the temporary file was renamed, not left behind


# ---------------------------------------------------------------------------------------------------- trainkit


def test_smooth_is_adams_debiased_ema():
    values = [4.0, 2.0, 6.0, 1.0]
    beta = 0.5
    expected, s = [], 0.0  # written out: s_t = beta s_{t-1} + (1 - beta) x_t, then / (1 - beta^t)
    for t, x in enumerate(values, start=1):
        s = beta * s + (1 - beta) * x
        expected.append(s / (1 - beta ** t))
    assert trainkit.pictures.smooth(values, beta) == pytest.approx(expected)
    assert trainkit.pictures.smooth([3.0] * 20, 0.9) == pytest.approx([3.0] * 20)  # no pull towards zero at the start
    assert trainkit.pictures.smooth(values, 0.0) == pytest.approx(values)
    assert trainkit.pictures.smooth([]) == []


def test_curve_pictures_are_pngs_and_leave_pyplots_backend_alone(tmp_path):
    import matplotlib

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # stands for a user's interactive backend: drawing our pictures must not switch it
    try:
        train = [(i * 100, 5 + math.exp(-i / 20)) for i in range(1, 80)]
        val = [(i * 100, 5.5 + math.exp(-i / 20)) for i in (20, 40, 60, 79)]
        assert_png(trainkit.pictures.plot_lm_curves(tmp_path / "lm.png", train, val, title="t"))
        assert_png(trainkit.pictures.plot_lm_curves(tmp_path / "lm_empty.png", [], []))  # before the first step
        history = [{"epoch": e, "train_loss": 1 / e, "train_accuracy": 0.5, "val_accuracy": 0.6} for e in range(1, 5)]
        assert_png(trainkit.pictures.plot_classifier_curves(tmp_path / "vit.png", history))
        images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
        assert_png(trainkit.pictures.plot_attention_maps(tmp_path / "att.png", images, {"a": torch.rand(2, 4, 4)}, ["x", "y"]))
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)


def test_save_figure_replaces_the_file_in_one_rename(tmp_path, monkeypatch):
    renames = []
    real_replace = trainkit.pictures.os.replace

    def spy(src, dst):
        renames.append((str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(trainkit.pictures.os, "replace", spy)
    for _ in range(2):  # a second write replaces the first
        trainkit.pictures.plot_lm_curves(tmp_path / "x.png", [(1, 2.0), (2, 1.0)], [(2, 1.5)])
    assert renames == [(str(tmp_path / "x.png.tmp"), str(tmp_path / "x.png"))] * 2
    assert_png(tmp_path / "x.png")


# ---------------------------------------------------------------------------------------------------- llama.py


@NEEDS_DAY2
def test_llama_smoke_run_writes_loss_curves_beside_metrics_at_every_validation(tmp_path, tiny_wikitext_dir,
                                                                              tiny_tokenizer_dir, capsys,
                                                                              monkeypatch):
    drawn = []
    real_plot = trainkit.pictures.plot_lm_curves

    def spy(path, train, val, **kw):
        drawn.append((len(train), len(val)))
        return real_plot(path, train, val, **kw)

    monkeypatch.setattr(trainkit.pictures, "plot_lm_curves", spy)
    out = tmp_path / "run"
    code, stdout, err = call_main(llama.main, ["--preset", "smoke", "--data-dir", tiny_wikitext_dir, "--tokenizer",
                                               tiny_tokenizer_dir, "--checkpoint", str(tmp_path / "m.pth"),
                                               "--output-dir", str(out), "--max-steps", "5", "--eval-interval", "2",
                                               "--precision", "fp32"], capsys)
    assert code == 0, err
    assert drawn == [(2, 1), (4, 2), (5, 3)]  # validations at steps 2, 4 and the last; each sees every step so far
    assert_png(out / "loss_curves.png")
    assert json.loads((out / "metrics.json").read_text())["loss_curves"] == str(out / "loss_curves.png")


# ---------------------------------------------------------------------------------------------------- transformer.py


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    folder = write_image_folder(tmp_path_factory.mktemp("images"), per_class=6, val_per_class=3)
    out = tmp_path_factory.mktemp("vit")
    assert T.main(["--data-dir", str(folder), "--preset", "smoke", "--epochs", "2", "--output-dir", str(out),
                   "--quiet"]) == 0
    return folder, out


@NEEDS_DAY1
def test_vit_smoke_run_writes_curves_and_attention_maps(vit_run):
    _, out = vit_run
    assert_png(out / "vit_curves.png")
    assert_png(out / "vit_attention.png")
    assert_png(out / "vit_predictions.png")


@NEEDS_DAY1
def test_vit_predict_writes_attention_maps_of_the_predicted_images(vit_run, capsys):
    folder, out = vit_run
    images = sorted((folder / "validation").rglob("*.*"))[:3]
    code, stdout, err = call_main(T.main, ["--predict", *map(str, images), "--output-dir", str(out)], capsys)
    assert code == 0, err
    assert_png(out / "vit_attention_predict.png")
    assert str(out / "vit_attention_predict.png") in err  # a note on stderr: stdout holds only the predictions
    assert stdout.strip().splitlines()[-1].startswith(str(images[-1]))
    with Image.open(out / "vit_attention_predict.png") as img:  # one row per image: taller than the 1-image case
        three_rows = img.size[1]
    code, _, err = call_main(T.main, ["--predict", str(images[0]), "--output-dir", str(out)], capsys)
    assert code == 0, err
    with Image.open(out / "vit_attention_predict.png") as img:
        assert img.size[1] < three_rows
