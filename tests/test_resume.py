"""Interrupted runs: SIGTERM (or Ctrl-C) stops after the step and saves a `last` checkpoint, --resume continues
it, and the stopped-and-resumed run ends exactly where a run that was never stopped ends (fp32 on the CPU).
A checkpoint being written when the process is killed leaves the previous one readable."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import llama
import trainkit
import transformer as T
from helpers import call_main

NEEDS_DAY1 = pytest.mark.needs("patch_embedding", "attention", "encoder_block")
NEEDS_DAY2 = pytest.mark.needs("rmsnorm", "swiglu", "causal_mask")


def sigterm_on_call(monkeypatch, module, name, call):
    """Send this process SIGTERM from inside the `call`-th call of module.name (once per training step), as a
    cluster preempting the job would: the signal lands in the middle of a step."""
    real, calls = getattr(module, name), []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return calls


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------------------------------------- helpers


def test_last_checkpoint_sits_beside_the_best_one():
    assert trainkit.last_checkpoint_path("runs/model.pth") == Path("runs/model.last.pth")
    assert trainkit.last_checkpoint_path("x/vit") == Path("x/vit.last.pth")


def test_rng_state_round_trip_repeats_the_same_draws(tmp_path):
    torch.manual_seed(3)
    trainkit.atomic_save(trainkit.rng_state(), tmp_path / "rng.pth")
    first = (torch.rand(5), torch.randn(3))
    torch.manual_seed(99)  # anything in between
    trainkit.set_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True))
    again = (torch.rand(5), torch.randn(3))
    assert all(torch.equal(x, y) for x, y in zip(first, again))


def test_resume_changes_refuses_a_fixed_setting_and_lists_the_free_ones():
    saved = {"dim": 32, "max_steps": 4, "lr": 1e-3}
    with pytest.raises(ValueError, match="dim was 32"):
        trainkit.runs.resume_changes(saved, {"dim": 48, "max_steps": 4, "lr": 1e-3}, may_change=("max_steps",))
    assert trainkit.runs.resume_changes(saved, {"dim": 32, "max_steps": 8, "lr": 1e-3}, ("max_steps",)) == \
        ["max_steps: 4 -> 8"]


def test_stop_request_turns_sigterm_into_a_flag_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    with trainkit.StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM  # still alive: the signal only raised the flag
    assert signal.getsignal(signal.SIGTERM) is before
    assert trainkit.exit_code(signal.SIGTERM) == 143 and trainkit.exit_code(signal.SIGINT) == 130


KILLED_WHILE_SAVING = """
import io, sys, time
import torch
sys.path.insert(0, {root!r})
import trainkit

path = sys.argv[1]
trainkit.atomic_save({{"version": 1, "w": torch.ones(1000)}}, path)
real_save = torch.save

def half_then_hang(obj, f):  # write half of the new checkpoint, then stall as a slow disk would
    buf = io.BytesIO()
    real_save(obj, buf)
    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    f.flush()
    print("writing", flush=True)
    time.sleep(120)

torch.save = half_then_hang
trainkit.atomic_save({{"version": 2, "w": torch.zeros(1000)}}, path)
"""


def test_kill_9_while_saving_leaves_the_previous_checkpoint_readable(tmp_path):
    script = tmp_path / "save.py"
    script.write_text(KILLED_WHILE_SAVING.format(root=str(Path(trainkit.__file__).parent.parent)))
    path = tmp_path / "model.last.pth"
    proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"  # the second save is half written
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert 0 < (tmp_path / "model.last.pth.tmp").stat().st_size  # the half file exists ...
    ckpt = torch.load(path, weights_only=True)  # ... and the checkpoint is still the whole first one
    assert ckpt["version"] == 1 and torch.equal(ckpt["w"], torch.ones(1000))


# ---------------------------------------------------------------------------------------------------- llama.py


@pytest.fixture
def llama_flags(tiny_wikitext_dir, tiny_tokenizer_dir):
    # Dropout on, so the resumed run only matches if the random generators were restored.
    return ["--preset", "smoke", "--data-dir", tiny_wikitext_dir, "--tokenizer", tiny_tokenizer_dir,
            "--device", "cpu", "--precision", "fp32", "--dropout", "0.1", "--max-steps", "6", "--eval-interval", "2"]


FIGURES = ("steps", "final_train_loss", "best_step", "val_loss", "test_loss", "tokens_seen", "samples")


@NEEDS_DAY2
def test_llama_stopped_by_sigterm_and_resumed_ends_as_a_run_never_stopped(tmp_path, llama_flags, capsys,
                                                                          monkeypatch):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    code, _, err = call_main(llama.main, [*llama_flags, "--checkpoint", str(whole / "m.pth"), "--output-dir",
                                          str(whole)], capsys)
    assert code == 0, err

    flags = [*llama_flags, "--checkpoint", str(parts / "m.pth"), "--output-dir", str(parts)]
    calls = sigterm_on_call(monkeypatch, llama, "learning_rate", 4)  # during step 4 of 6, after a save at 2
    code, _, err = call_main(llama.main, flags, capsys)
    assert code == 143 and len(calls) == 4
    assert "SIGTERM" in err and "--resume" in err.strip().splitlines()[-1] and "Traceback" not in err
    stopped = torch.load(parts / "m.last.pth", weights_only=True)
    assert stopped["step"] == 4  # the step under way was finished, then saved
    assert json.loads((parts / "metrics.json").read_text())["status"] == "interrupted"

    monkeypatch.undo()
    code, out, err = call_main(llama.main, [*flags, "--resume"], capsys)
    assert code == 0, err
    assert "resuming from" in out and "at step 4" in out
    assert_same_weights(weights(whole / "m.last.pth"), weights(parts / "m.last.pth"))
    assert_same_weights(weights(whole / "m.pth"), weights(parts / "m.pth"))  # the best checkpoint too
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (whole, parts))
    for key in FIGURES:
        assert a[key] == b[key], key


@NEEDS_DAY2
def test_llama_resume_refuses_another_model_shape_and_prints_changed_budgets(tmp_path, llama_flags, capsys):
    flags = [*llama_flags, "--checkpoint", str(tmp_path / "m.pth"), "--output-dir", str(tmp_path)]
    code, _, err = call_main(llama.main, [*flags, "--resume"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no last checkpoint" in err

    assert call_main(llama.main, flags, capsys)[0] == 0
    code, _, err = call_main(llama.main, [*flags, "--resume", "--dim", "48"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "dim was 32" in err and "Traceback" not in err
    code, _, err = call_main(llama.main, [*flags, "--resume", "--lr", "0.01"], capsys)
    assert code == 2 and "lr was" in err

    code, out, err = call_main(llama.main, [*flags, "--resume", "--max-steps", "8"], capsys)
    assert code == 0, err
    assert "max_steps: 6 -> 8" in out
    assert torch.load(tmp_path / "m.last.pth", weights_only=True)["step"] == 8


# ---------------------------------------------------------------------------------------------------- transformer.py


def noise_images_in(root: Path) -> Path:
    """24 training and 8 validation images of coloured noise: 3 steps of 8 per epoch."""
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", 12), ("validation", 4)):
        for c, cls in enumerate(("cats", "dogs")):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = torch.randint(0, 256, (40, 44, 3), generator=gen, dtype=torch.uint8)
                pixels[..., 2 * c] //= 3
                Image.fromarray(pixels.numpy()).save(root / split / cls / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def noise_images(tmp_path_factory):
    return noise_images_in(tmp_path_factory.mktemp("noise"))


def vit_flags(data_dir, out):
    # Dropout, augmentation and MixUp/CutMix on: all three draw random numbers the resumed run must repeat.
    # The precision and the augmentation's kernel are pinned: "auto" measures, and could choose another in each run.
    return ["--data-dir", str(data_dir), "--preset", "smoke", "--device", "cpu", "--precision", "fp32",
            "--augment-kernel", "torch", "--epochs", "3", "--dropout", "0.1", "--augment", "strong", "--mixup",
            "0.8", "--cutmix", "1.0",
            "--mix-prob", "0.5", "--output-dir", str(out), "--quiet"]


@NEEDS_DAY1
def test_vit_stopped_mid_epoch_and_resumed_ends_as_a_run_never_stopped(noise_images, tmp_path, capsys,
                                                                       monkeypatch):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert T.main(vit_flags(noise_images, whole)) == 0
    calls = sigterm_on_call(monkeypatch, T, "learning_rate", 5)  # step 5 of 9: the middle of epoch 2
    assert T.main(vit_flags(noise_images, parts)) == 143 and len(calls) == 5
    err = capsys.readouterr().err
    assert "SIGTERM" in err and "--resume" in err and "Traceback" not in err
    stopped = torch.load(parts / "vit_cats_vs_dogs.last.pth", weights_only=True)
    assert (stopped["epoch"], stopped["batch"], stopped["step"]) == (2, 2, 5)

    monkeypatch.undo()
    assert T.main([*vit_flags(noise_images, parts), "--resume"]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert_same_weights(weights(whole / "vit_cats_vs_dogs.last.pth"), weights(parts / "vit_cats_vs_dogs.last.pth"))
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (whole, parts))
    for key in ("history", "val_accuracy", "best_val_accuracy", "final_train_loss", "confusion_matrix", "steps"):
        assert a[key] == b[key], key


@NEEDS_DAY1
def test_vit_resume_refuses_another_model_shape(noise_images, tmp_path, capsys):
    flags = [*vit_flags(noise_images, tmp_path), "--epochs", "1"]
    assert T.main(flags) == 0
    with pytest.raises(SystemExit) as exit_info:
        T.main([*flags, "--resume", "--dim", "64", "--heads", "2"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and "dim was 32" in err
    assert T.main([*flags, "--resume", "--epochs", "2"]) == 0
    assert "epochs: 1 -> 2" in capsys.readouterr().out
