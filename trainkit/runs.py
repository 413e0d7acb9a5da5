"""Stopping cleanly and resuming: SIGINT/SIGTERM as a request to stop, atomic saves, RNG states, resume checks."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import torch

from trainkit.distributed import all_reduce, launched_by_torchrun

# ----------------------------------------------------------------------------------------------------
# Stopping cleanly and resuming
#
# A cluster that preempts a job, or `docker stop`, sends SIGTERM and a few seconds later SIGKILL; Ctrl-C sends
# SIGINT. Both only raise a flag here: the training loop finishes its step, all processes agree to stop
# (all_reduce), rank 0 saves the `last` checkpoint, and the script exits with 128 + the signal's number
# (130 for SIGINT, 143 for SIGTERM), as a shell reports a process killed by that signal.


class StopRequest:
    """Between stop = StopRequest().install() and stop.remove() (or within `with StopRequest() as stop:`), SIGINT
    and SIGTERM set stop.signum instead of ending the process.

    A second Ctrl-C stops at once (KeyboardInterrupt), except under torchrun, which passes the terminal's
    Ctrl-C on to its processes a second time. Handlers can only be set from the main thread; elsewhere the
    context does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict = {}

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def remove(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    def _handle(self, signum, frame) -> None:
        if self.signum and signum == signal.SIGINT and not launched_by_torchrun():
            raise KeyboardInterrupt
        self.signum = self.signum or signum
        # os.write, not print: a signal may arrive in the middle of another print to the same stream.
        os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step and saving the last "
                    f"checkpoint\n".encode())


class Budget:
    """When a training loop stops: after max_steps, after `minutes` of training, or on SIGINT or SIGTERM (a
    StopRequest), agreed by all processes under torchrun.

        with trainkit.Budget(max_steps, minutes, elapsed_s) as budget:
            while not budget.done(step):
                ... one step, with learning_rate(step, budget.progress(step)) ...
                budget.agree()                # every process, once per step

    elapsed_s: the training time a resumed run had already spent; the clock continues from it."""

    def __init__(self, max_steps: int | None = None, minutes: float | None = None, elapsed_s: float = 0.0) -> None:
        self.max_steps, self.minutes, self.elapsed_s, self.signum = max_steps, minutes, elapsed_s, 0
        self._start = time.perf_counter() - elapsed_s
        self._stop = StopRequest()

    def __enter__(self) -> "Budget":
        self._stop.install()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.remove()

    def progress(self, step: int) -> float:
        """How far along the run is, 0 to 1: the larger of the share of the steps and of the time."""
        return max(step / self.max_steps if self.max_steps else 0.0,
                   self.elapsed_s / (60 * self.minutes) if self.minutes else 0.0)

    def done(self, step: int) -> bool:
        return bool(self.signum) or self.progress(step) >= 1.0

    def agree(self) -> None:
        """The elapsed time is the longest any process has trained (the first to reach the budget stops all),
        and a signal received by any process stops all."""
        self.elapsed_s, signum = all_reduce([time.perf_counter() - self._start, self._stop.signum], op="max")
        self.signum = int(signum)


def stopped_note(signum: int, where: str, last_path: str | Path) -> str:
    """The line a run stopped by a signal ends with: where it stopped, and how to continue it."""
    return (f"stopped by {signal.Signals(signum).name} {where}; {last_path} holds the run: add --resume to the same "
            "command to continue it")


def exit_code(signum: int) -> int:
    """128 + the signal's number: 130 after Ctrl-C (SIGINT), 143 after SIGTERM."""
    return 128 + signum


def atomic_save(obj, path) -> None:
    """torch.save into a temporary file beside `path`, flushed to the disk, then renamed over `path`. A rename
    within one folder is atomic, so a crash or `kill -9` at any moment leaves the previous file or the new one,
    never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def last_checkpoint_path(best: str | Path) -> Path:
    """Where the `last` checkpoint (for --resume) lives beside the best one: model.pth -> model.last.pth."""
    best = Path(best)
    return best.with_name(f"{best.stem}.last{best.suffix or '.pth'}")


def rng_state() -> dict:
    """Every random number generator a training step draws from (dropout, augmentations, MixUp...), as tensors
    and plain values, so the state loads with torch.load(weights_only=True)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's GPU
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(_as_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def _as_tuples(x):
    # random.setstate wants the nested tuples getstate gave; a round trip through some loaders makes lists.
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def resume_changes(saved: dict, now: dict, may_change: tuple[str, ...] = ()) -> list[str]:
    """Compare the settings a run is resumed with against the ones it was saved with. A setting outside
    `may_change` that differs raises ValueError naming it (the run would no longer be the one that was
    stopped); those that may change come back as 'name: old -> new' lines to print."""
    changes = []
    for key in now:
        if key in saved and saved[key] != now[key]:
            if key not in may_change:
                raise ValueError(f"{key} was {saved[key]!r} in the run being resumed and is {now[key]!r} now; "
                                 f"resume with the same {key}, or start a new run without --resume")
            changes.append(f"{key}: {saved[key]!r} -> {now[key]!r}")
    return changes




def read_checkpoint(path: str | Path, hint: str) -> dict:
    """torch.load(weights_only=True) of a checkpoint (tensors and plain values only, so loading cannot run
    code), with one-line errors; `hint` says how to make one when there is none."""
    from trainkit.cli import UserError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}; {hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}); {hint}") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a checkpoint of this course")
    return state


def read_resume_state(path: str | Path, script: str, config: dict, flags: dict, may_change: tuple[str, ...]) -> dict:
    """The `last` checkpoint of a stopped run, for --resume: it must hold the same model config and the same
    training flags as this run's, except those in `may_change` (each change is printed)."""
    from trainkit.cli import UserError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--resume: no last checkpoint at {path}; {script} writes it beside --checkpoint as it "
                        "trains (start without --resume)")
    state = read_checkpoint(path, "start without --resume")
    if "optimizer" not in state or "config" not in state or "flags" not in state:
        raise UserError(f"--resume: {path} is not a last checkpoint written by {script}")
    try:
        resume_changes(state["config"], config)
        changes = resume_changes(state["flags"], flags, may_change)
    except ValueError as e:
        raise UserError(f"--resume {path}: {e}") from None
    for change in changes:
        print(f"resume: {change}")
    return state


class LastCheckpoint:
    """The `last` checkpoint of a run, beside the best one (NAME.last.pth): all a stopped run needs to go on. It
    holds the TrainStep's state (model, optimizer, fp16 scaler), the random generators, the model config and the
    training flags, and whatever the lesson adds (its counters). --resume checks that the run goes on with the
    same config and flags, except those in `may_change`."""

    def __init__(self, best: str | Path, script: str, step, config: dict, flags: dict,
                 may_change: tuple[str, ...] = ()) -> None:
        self.path, self.script, self.step = last_checkpoint_path(best), script, step
        self.config, self.flags, self.may_change = config, flags, may_change

    def save(self, **extra) -> None:
        atomic_save({**self.step.state_dict(), **extra, "config": self.config, "flags": self.flags,
                     "rng": rng_state()}, self.path)

    def resume(self) -> dict:
        """The saved state, after the TrainStep and the random generators were set back to it."""
        state = read_resume_state(self.path, self.script, self.config, self.flags, self.may_change)
        self.step.load_state_dict(state)
        set_rng_state(state["rng"])
        print(f"resuming from {self.path}")
        return state
