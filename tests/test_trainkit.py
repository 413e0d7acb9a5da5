"""The precision policy (trainkit/precision.py) with the hardware faked, and the fp16 training path on the CPU.

CPU autocast supports float16 and `torch.amp.GradScaler("cpu")` scales losses there, so the fp16 path a T4 or
V100 takes is tested here without a GPU.
"""

import json

import pytest
import torch
import torch.nn.functional as F

import llama
import trainkit
from helpers import call_main
from trainkit import Precision, choose_precision

NEEDS_DAY2 = pytest.mark.needs("rmsnorm", "swiglu", "causal_mask")


# ---------------------------------------------------------------------------------------------------- the policy


def fake_gpu(monkeypatch, capability):
    native = capability >= (8, 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    # Like torch: with emulation counted (its default) every recent GPU "supports" bf16.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)


@pytest.mark.parametrize("capability, expected", [((7, 5), "fp16"), ((7, 0), "fp16"), ((8, 0), "bf16"),
                                                  ((9, 0), "bf16"), ((6, 1), "fp32")])
def test_auto_on_cuda_follows_the_compute_capability(monkeypatch, capability, expected):
    fake_gpu(monkeypatch, capability)
    p = choose_precision("auto", torch.device("cuda"))
    assert p.name == expected, p.reason
    assert f"{capability[0]}.{capability[1]}" in p.reason
    assert p.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[expected]


def test_bf16_asked_for_on_a_gpu_that_emulates_it_says_so(monkeypatch):
    fake_gpu(monkeypatch, (7, 5))
    p = choose_precision("bf16", torch.device("cuda"))
    assert p.name == "bf16" and "emulates" in p.reason


def fake_cpu_speeds(monkeypatch, fp32_flops, bf16_flops):
    monkeypatch.setattr(trainkit.precision, "cpu_bf16_speedup", lambda shape: bf16_flops / fp32_flops)
    yield


@pytest.fixture
def bf16_slower(monkeypatch):
    yield from fake_cpu_speeds(monkeypatch, 271e9, 166e9)  # a CPU where bf16 autocast measures 0.61x fp32


@pytest.fixture
def bf16_faster(monkeypatch):
    yield from fake_cpu_speeds(monkeypatch, 216e9, 961e9)


def test_auto_on_a_cpu_where_bf16_measures_slower_is_fp32(bf16_slower):
    p = choose_precision("auto", torch.device("cpu"), (512, 64, 128))
    assert p.name == "fp32"
    assert "bf16 autocast measured 0.61x fp32" in p.describe()
    assert p.describe().startswith("precision: fp32 (")


def test_auto_on_a_cpu_where_bf16_measures_faster_is_bf16(bf16_faster):
    p = choose_precision("auto", torch.device("cpu"), (512, 64, 128))
    assert p.name == "bf16" and "4.45x" in p.reason


def test_auto_needs_a_clear_margin_before_it_takes_bf16(monkeypatch):
    for _ in fake_cpu_speeds(monkeypatch, 100e9, 104e9):  # 1.04x on a matmul: casts eat that in a real step
        assert choose_precision("auto", torch.device("cpu")).name == "fp32"


def test_explicit_flags_win_and_mps_defaults_to_fp32(bf16_slower):
    assert choose_precision("bf16", torch.device("cpu")).name == "bf16"
    assert choose_precision("fp16", torch.device("cpu")).name == "fp16"
    assert choose_precision("auto", torch.device("mps")).name == "fp32"
    with pytest.raises(ValueError):
        choose_precision("fp8", torch.device("cpu"))


def test_the_real_measurement_runs_quickly_and_is_positive():
    trainkit.precision.cpu_bf16_speedup.cache_clear()
    assert trainkit.precision.cpu_bf16_speedup((64, 32, 64), 0.01) > 0
    assert trainkit.precision.matmul_speed(None, (64, 32, 64), torch.device("cpu"), 0.01) > 0


def test_median_ratio_takes_turns_and_ignores_one_slowed_call():
    calls = []
    a = iter([2.0, 2.0, 50.0, 2.0, 2.0])  # one call of a slowed down by a busy moment
    b = iter([1.0, 1.0, 1.0, 40.0, 1.0])  # and one of b

    def timer(name, times):
        return lambda: calls.append(name) or next(times)

    assert trainkit.precision.median_ratio(timer("a", a), timer("b", b), seconds=0, min_pairs=5) == 2.0
    assert calls == ["a", "b"] * 5


def test_only_fp16_scales_the_loss():
    assert Precision("fp16", "cpu", "").grad_scaler().is_enabled()
    assert not Precision("bf16", "cpu", "").grad_scaler().is_enabled()
    assert not Precision("fp32", "cpu", "").grad_scaler().is_enabled()
    with Precision("fp16", "cpu", "").autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float16
    with Precision("fp32", "cpu", "").autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


# ---------------------------------------------------------------------------------------------------- fp16 training


def test_chunked_cross_entropy_keeps_tiny_fp16_gradients_for_the_loss_scale():
    # 2,048 rows over 4,000 classes: most softmax / N entries are ~1e-7, under fp16's smallest normal number.
    torch.manual_seed(0)
    logits32 = torch.randn(2048, 4000) * 2
    targets = torch.randint(0, 4000, (2048,))
    logits16 = logits32.half().requires_grad_()
    ref = logits16.detach().float().requires_grad_()
    F.cross_entropy(ref, targets).backward()

    scale = 2.0 ** 16
    loss = trainkit.losses.ChunkedCrossEntropy.apply(logits16, targets, 0.0)
    (loss * scale).backward()
    assert logits16.grad.dtype == torch.float16
    assert loss.item() == pytest.approx(F.cross_entropy(logits16.float(), targets).item(), rel=1e-5)
    unscaled = logits16.grad.float() / scale
    assert (unscaled != 0).float().mean() > 0.999, "gradients underflowed to zero before the loss scale"
    torch.testing.assert_close(unscaled, ref.grad, rtol=1e-3, atol=1e-9)


@pytest.fixture
def data_flags(tiny_wikitext_dir, tiny_tokenizer_dir):
    return ["--data-dir", tiny_wikitext_dir, "--tokenizer", tiny_tokenizer_dir]


@NEEDS_DAY2
def test_llama_trains_in_fp16_with_loss_scaling_on_the_cpu(tmp_path, data_flags, capsys):
    out_dir = tmp_path / "run"
    code, out, err = call_main(llama.main, ["--preset", "smoke", *data_flags, "--checkpoint", str(tmp_path / "m.pth"),
                                            "--output-dir", str(out_dir), "--max-steps", "40", "--eval-interval", "20",
                                            "--dim", "48", "--n-heads", "4", "--max-seq-len", "24",
                                            "--precision", "fp16"], capsys)
    assert code == 0, err
    assert "precision: fp16 (asked for with --precision)" in out
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["precision"] == "fp16" and metrics["status"] == "completed"
    assert metrics["val_perplexity"] < 320 / 4  # it learned: far below a uniform guess over 320 tokens


@NEEDS_DAY2
def test_llama_auto_prints_and_records_the_measured_choice(tmp_path, data_flags, capsys, bf16_slower):
    out_dir = tmp_path / "run"
    code, out, err = call_main(llama.main, ["--preset", "smoke", *data_flags, "--checkpoint", str(tmp_path / "m.pth"),
                                            "--output-dir", str(out_dir), "--max-steps", "2"], capsys)
    assert code == 0, err
    line = next(l for l in out.splitlines() if l.startswith("precision:"))
    assert line.startswith("precision: fp32 (bf16 autocast measured 0.61x fp32 on this CPU")
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["precision"] == "fp32" and "0.61x" in metrics["precision_reason"]


@NEEDS_DAY2
def test_an_overflowing_fp16_step_is_skipped_not_applied(tiny_wikitext_dir, tiny_tokenizer_dir, monkeypatch):
    tokenizer = llama.load_tokenizer(tiny_tokenizer_dir)
    streams = llama.tokenize_splits(llama.load_wikitext(tiny_wikitext_dir), tokenizer)
    params = llama.ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=len(tokenizer), max_seq_len=16)
    cfg = llama.TrainConfig(batch_size=2, max_steps=1, eval_interval=100, warmup_steps=1)
    fp16 = Precision("fp16", "cpu", "test")

    def one_step(scaler_init):
        torch.manual_seed(0)
        model = llama.Transformer(params)
        before = [p.detach().clone() for p in model.parameters()]
        monkeypatch.setattr(Precision, "grad_scaler", lambda self: torch.amp.GradScaler("cpu", init_scale=scaler_init))
        log = llama.train(model, streams, cfg, torch.device("cpu"), fp16)
        changed = any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
        return log, changed

    log, changed = one_step(2.0 ** 40)  # scaled gradients overflow fp16: the step is skipped
    assert log["status"] == "completed" and not changed
    log, changed = one_step(2.0 ** 10)
    assert changed


@pytest.mark.needs("patch_embedding", "attention", "encoder_block")
def test_vit_trains_in_fp16_with_loss_scaling_on_the_cpu(tmp_path, capsys):
    import math

    import transformer as T
    from test_transformer import write_image_folder

    data = write_image_folder(tmp_path / "images", per_class=6, val_per_class=3)
    code, out, err = call_main(T.main, ["--data-dir", str(data), "--preset", "smoke", "--epochs", "2", "--quiet",
                                        "--output-dir", str(tmp_path / "run"), "--precision", "fp16"], capsys)
    assert code in (0, None), err
    assert "precision: fp16 (asked for with --precision)" in out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["precision"] == "fp16" and math.isfinite(metrics["final_train_loss"])
