"""More than one process: two CPU processes under torchrun (gloo) train the same model as one process with the
same global batch, and agree on when to stop. Each run is a subprocess with a timeout, so a process left
waiting at a collective fails the test instead of hanging it."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llama
import transformer as T
from helpers import call_main

NEEDS_DAY1 = pytest.mark.needs("patch_embedding", "attention", "encoder_block")
NEEDS_DAY2 = pytest.mark.needs("rmsnorm", "swiglu", "causal_mask")
SCRIPTS = Path(llama.__file__).parent  # the copy under test (the solutions, or a student's with --impl)

# Runs `script` (llama or transformer) as torchrun's worker; with CLOCK_SPEEDUP set, rank 1's clock runs that many
# times faster, so it reaches any time budget long before rank 0; with SIGTERM_RANK1_AT_STEP, rank 1 alone gets
# SIGTERM during that step.
WORKER = """
import os, sys, time
sys.path.insert(0, {scripts!r})
speedup = float(os.environ.get("CLOCK_SPEEDUP", 1))
if os.environ["RANK"] == "1" and speedup != 1:
    real, t0 = time.perf_counter, time.perf_counter()
    time.perf_counter = lambda: t0 + speedup * (real() - t0)
import {script} as script
term_at = int(os.environ.get("SIGTERM_RANK1_AT_STEP", 0))
if os.environ["RANK"] == "1" and term_at:  # a preemption notice that reaches one process only
    import signal
    real_lr, calls = script.learning_rate, []
    def learning_rate(*args):
        calls.append(1)
        if len(calls) == term_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_lr(*args)
    script.learning_rate = learning_rate
sys.exit(script.main(sys.argv[1:]))
"""


def torchrun(tmp_path, script, argv, nproc=2, timeout=150, **env):
    worker = tmp_path / f"run_{script}.py"
    worker.write_text(WORKER.format(scripts=str(SCRIPTS), script=script))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", **env}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(worker), *argv]
    # A session of its own, so a timeout ends torchrun and its workers together, leaving no orphan behind.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"the {nproc} processes did not finish within {timeout}s: one waits at a collective")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def max_difference(a, b):
    a, b = (torch.load(p, weights_only=True)["model"] for p in (a, b))
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture
def llama_flags(tiny_wikitext_dir, tiny_tokenizer_dir):
    return ["--preset", "smoke", "--data-dir", tiny_wikitext_dir, "--tokenizer", tiny_tokenizer_dir,
            "--device", "cpu", "--precision", "fp32"]


# Run in a fresh interpreter: whether torch.distributed.nn was imported before the group existed must not
# depend on which tests ran earlier in this process.
TEARDOWN = """
import os, socket, sys, torch
sys.path.insert(0, {scripts!r})
import trainkit
def gloo_threads():  # Linux names each thread in /proc; gloo's are pt_gloo_runloop and gloo_tcp_loop
    return sum("gloo" in open(f"/proc/self/task/{{t}}/comm").read() for t in os.listdir("/proc/self/task"))
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
trainkit.init_distributed(torch.device("cpu"))
ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))  # what wrap_ddp does with 2+ processes
ddp(torch.ones(1, 2)).sum().backward()
during = gloo_threads()
del ddp
trainkit.teardown_distributed()
print(during, gloo_threads())
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in Linux's /proc")
def test_teardown_releases_the_process_group_and_its_threads(tmp_path):
    # A group still alive after teardown keeps gloo's threads running into the interpreter's exit, where they
    # made a process abort (SIGABRT) now and then after a run that had finished its work.
    script = tmp_path / "teardown.py"
    script.write_text(TEARDOWN.format(scripts=str(SCRIPTS)))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    during, after = map(int, run.stdout.split())
    assert during > 0, "no gloo thread while the group was up: the test no longer sees what it checks"
    assert after == 0, (f"{after} gloo thread(s) still running after teardown_distributed: something holds the "
                        "process group (e.g. a default argument group=group.WORLD evaluated after it was made)")


@NEEDS_DAY2
def test_llama_two_processes_train_the_same_weights_as_one(tmp_path, llama_flags, capsys):
    # A global batch of 4 windows x 2 micro-batches: each process takes 2 windows of each micro-batch.
    flags = [*llama_flags, "--batch-size", "4", "--grad-accum", "2", "--max-steps", "4", "--eval-interval", "2"]
    one, two = tmp_path / "one", tmp_path / "two"
    code, _, err = call_main(llama.main, [*flags, "--checkpoint", str(one / "m.pth"), "--output-dir", str(one)],
                             capsys)
    assert code == 0, err
    run = torchrun(tmp_path, "llama", [*flags, "--checkpoint", str(two / "m.pth"), "--output-dir", str(two)])
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 process(es) x 2 windows per micro-batch" in run.stdout
    assert run.stdout.count("batch: 8 windows per step") == 1  # rank 0 prints, the other is quiet
    assert max_difference(one / "m.last.pth", two / "m.last.pth") <= 1e-5
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert a["tokens_seen"] == b["tokens_seen"] and a["best_step"] == b["best_step"]
    for key in ("val_loss", "test_loss", "final_train_loss"):  # sharded evaluation sums to the same figures
        assert b[key] == pytest.approx(a[key], rel=1e-5), key


@NEEDS_DAY2
def test_llama_rank_reaching_the_time_budget_first_stops_both(tmp_path, llama_flags):
    # Rank 1's clock runs 1000x fast: it reaches the 1-minute budget after its first step, rank 0 would need a
    # minute. Both must stop at the same step; otherwise rank 0 waits for rank 1 forever.
    out = tmp_path / "run"
    run = torchrun(tmp_path, "llama", [*llama_flags, "--max-steps", "100000", "--time-budget", "1",
                                       "--eval-interval", "100000", "--checkpoint", str(out / "m.pth"),
                                       "--output-dir", str(out)], CLOCK_SPEEDUP="1000")
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "completed" and 1 <= metrics["steps"] <= 20  # rank 0 alone would run ~1000s


@NEEDS_DAY1
def test_vit_two_processes_train_the_same_weights_as_one(tmp_path):
    from test_resume import noise_images_in  # the same small folder of noise images

    data = noise_images_in(tmp_path / "images")
    # Random crops and flips on: each image's augmentation must not depend on which process draws it. The
    # augmentation's kernel is pinned as the precision is: "auto" measures, and the two runs could choose apart.
    flags = ["--data-dir", str(data), "--preset", "smoke", "--device", "cpu", "--precision", "fp32", "--epochs",
             "2", "--augment", "light", "--augment-kernel", "torch", "--mixup", "0", "--cutmix", "0", "--quiet"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert T.main([*flags, "--output-dir", str(one)]) == 0
    run = torchrun(tmp_path, "transformer", [*flags, "--output-dir", str(two)])
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 process(es) x 4" in run.stdout
    assert max_difference(one / "vit_cats_vs_dogs.last.pth", two / "vit_cats_vs_dogs.last.pth") <= 1e-5
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert a["confusion_matrix"] == b["confusion_matrix"] and a["steps"] == b["steps"]
    for x, y in zip(a["history"], b["history"]):
        assert y["train_loss"] == pytest.approx(x["train_loss"], rel=1e-5)
        assert y["train_accuracy"] == x["train_accuracy"] and y["val_accuracy"] == x["val_accuracy"]


@NEEDS_DAY2
def test_llama_sigterm_to_one_rank_stops_both_after_the_step_and_saves(tmp_path, llama_flags):
    out = tmp_path / "run"
    run = torchrun(tmp_path, "llama", [*llama_flags, "--max-steps", "100000", "--eval-interval", "100000",
                                       "--checkpoint", str(out / "m.pth"), "--output-dir", str(out)],
                   SIGTERM_RANK1_AT_STEP="3")
    # Rank 0 finishes its report and exits 143 (torchrun then fails with 1); rank 1 ends quietly with 0, or is
    # stopped by torchrun if it is still shutting down when rank 0 exits.
    assert run.returncode != 0
    assert re.search(r"rank\s*: 0 \(local_rank: 0\)\s+exitcode\s*: 143", run.stderr), run.stderr[-2000:]
    assert "stopped by SIGTERM at step 3" in run.stderr
    assert torch.load(out / "m.last.pth", weights_only=True)["step"] == 3
    assert json.loads((out / "metrics.json").read_text())["status"] == "interrupted"
