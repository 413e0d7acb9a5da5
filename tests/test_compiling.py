"""Choosing between torch.compile and eager for the training step (trainkit/compiling.py): the schedule and the
choice with the clock faked, the fall-back where torch.compile cannot build (also when it fails in one of two
processes under torchrun), and a real compile that trains the same weights as eager."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import trainkit
from trainkit import CompiledForward


class Recorder(nn.Module):
    """A model whose forward notes which of the two modes ran it (CompiledForward calls one or the other)."""

    def __init__(self, ran: list, name: str, fail: Exception | None = None) -> None:
        super().__init__()
        self.ran, self.name, self.fail = ran, name, fail

    def forward(self, x):
        self.ran.append(self.name)
        if self.fail is not None:
            raise self.fail
        return x * 2


def drive(seconds: dict, steps: int, compiled_fails: Exception | None = None, mode: str = "auto"):
    """Calls a CompiledForward `steps` times on a fake clock: each step takes seconds[mode that ran]."""
    ran, now = [], [0.0]
    forward = CompiledForward(Recorder(ran, "eager"), mode, trials=3,
                              compile_fn=lambda model: Recorder(ran, "compiled", compiled_fails),
                              clock=lambda: now[0])
    for _ in range(steps):
        assert torch.equal(forward(torch.ones(2)), torch.full((2,), 2.0))
        now[0] += seconds[ran[-1]]
    return forward, ran


def test_auto_times_each_mode_after_its_first_step_and_keeps_the_faster(capsys):
    forward, ran = drive({"compiled": 0.05, "eager": 0.1}, steps=12)
    assert ran == ["compiled", "eager"] + ["compiled", "eager"] * 3 + ["compiled"] * 4
    assert forward.times == {"compiled": pytest.approx([0.05] * 3), "eager": pytest.approx([0.1] * 3)}  # no warm-ups
    assert forward.chosen == "compiled"
    assert capsys.readouterr().out.strip() == ("compile: on (a compiled training step 50 ms, an eager one 100 ms: "
                                               "2.00x)")


def test_auto_goes_back_to_eager_when_compiled_steps_are_slower(capsys):
    forward, ran = drive({"compiled": 0.3, "eager": 0.1}, steps=12)
    assert ran[8:] == ["eager"] * 4 and forward.chosen == "eager"
    assert capsys.readouterr().out.startswith("compile: off (a compiled training step 300 ms, an eager one 100 ms")


def test_the_median_decides_so_one_slow_step_does_not(capsys):
    seconds = {"compiled": 0.05, "eager": 0.1}
    ran, now = [], [0.0]
    forward = CompiledForward(Recorder(ran, "eager"), "auto", trials=3,
                              compile_fn=lambda model: Recorder(ran, "compiled"), clock=lambda: now[0])
    for step in range(10):
        forward(torch.ones(1))
        now[0] += seconds[ran[-1]] + (5.0 if step == 4 else 0.0)  # an evaluation between two compiled steps
    assert forward.chosen == "compiled"


def test_off_never_compiles_and_on_never_times():
    compiled = []
    forward = CompiledForward(nn.Identity(), "off", compile_fn=lambda model: compiled.append(model))
    forward(torch.ones(1))
    assert compiled == [] and forward.chosen == "eager"
    _, ran = drive({"compiled": 1.0, "eager": 0.1}, steps=5, mode="on")
    assert ran == ["compiled"] * 5


@pytest.mark.parametrize("mode", ["auto", "on"])
def test_a_failing_compile_falls_back_to_eager_and_says_why(mode, capsys):
    error = RuntimeError("InvalidCxxCompiler: No working C++ compiler found\n(a long traceback)")
    forward, ran = drive({"compiled": 0.05, "eager": 0.1}, steps=10, compiled_fails=error, mode=mode)
    assert ran == ["compiled"] + ["eager"] * 10  # tried once, then eager from that step on
    assert forward.chosen == "eager"  # under auto, decided where the timing would have ended, by all processes
    assert capsys.readouterr().out.strip() == ("compile: off (torch.compile failed here, so the model runs eagerly: "
                                               "InvalidCxxCompiler: No working C++ compiler found)")


def test_an_error_of_the_model_itself_is_raised_not_taken_for_a_compile_failure(capsys):
    ran = []
    forward = CompiledForward(Recorder(ran, "eager", ValueError("bad shape")), "auto",
                              compile_fn=lambda model: Recorder(ran, "compiled", ValueError("bad shape")))
    with pytest.raises(ValueError, match="bad shape"):
        forward(torch.ones(1))
    assert "compile:" not in capsys.readouterr().out


def test_unknown_mode_is_a_clear_error():
    with pytest.raises(ValueError, match=r"compile mode must be one of \('auto', 'on', 'off'\)"):
        CompiledForward(nn.Identity(), "yes")


# ----------------------------------------------------------------------------------------------- real torch.compile


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 3))


def test_real_compile_trains_the_same_weights_as_eager():
    """Three AdamW steps through torch.compile (inductor) against three eager steps from the same start."""
    x, y = torch.randn(5, 8), torch.tensor([0, 1, 2, 0, 1])
    results = []
    for mode in ("off", "on"):
        model = tiny_model()
        forward, optimizer = CompiledForward(model, mode), torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(3):
            optimizer.zero_grad()
            nn.functional.cross_entropy(forward(x), y).backward()
            optimizer.step()
        assert forward.chosen == ("eager" if mode == "off" else "compiled")  # it did compile
        results.append(model.state_dict())
    for name, tensor in results[0].items():
        torch.testing.assert_close(results[1][name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_real_compile_without_a_cpp_compiler_falls_back_to_eager(monkeypatch, capsys):
    """What a machine without a C++ compiler sees: inductor cannot build its kernels; the run goes on eagerly."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)  # a cached build would not need the compiler
    torch._dynamo.reset()
    model = tiny_model()
    x = torch.randn(5, 8)
    forward = CompiledForward(model, "auto")
    out = forward(x)
    torch.testing.assert_close(out, model(x))
    assert forward.failed  # every later step runs eagerly
    assert capsys.readouterr().out.startswith("compile: off (torch.compile failed here, so the model runs eagerly: ")
    torch._dynamo.reset()


def test_the_modes_are_the_flags_choices():
    assert trainkit.COMPILE_MODES == ("auto", "on", "off")


# Two processes under torchrun (gloo): compiling fails in rank 1 only, rank 0 compiles and finds it faster.
TWO_PROCESSES = """
import os, sys, torch
sys.path.insert(0, {root!r})
import trainkit
trainkit.init_distributed(torch.device("cpu"))
rank, now = int(os.environ["RANK"]), [0.0]
def compile_fn(model):
    def compiled(x):
        if rank == 1:
            raise RuntimeError("no C++ compiler in this process")
        return model(x)
    return compiled
forward = trainkit.CompiledForward(torch.nn.Identity(), "auto", trials=3, compile_fn=compile_fn, clock=lambda: now[0])
for _ in range(10):
    forward(torch.ones(1))
    now[0] += 0.1
with open(os.path.join({out!r}, f"rank{{rank}}.txt"), "w") as f:  # a file each: the two stdouts interleave
    f.write(f"{{forward.chosen}} {{forward.summary}}")
trainkit.teardown_distributed()
"""


def test_under_torchrun_a_compile_failing_in_one_process_makes_every_process_eager(tmp_path):
    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESSES.format(root=str(Path(trainkit.__file__).parent.parent), out=str(tmp_path)))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "rank0.txt").read_text() == "eager compile: off (torch.compile failed in another process)"
    assert (tmp_path / "rank1.txt").read_text() == ("eager compile: off (torch.compile failed here, so the model "
                                                    "runs eagerly: no C++ compiler in this process)")
