"""Whether the training step runs through torch.compile, chosen by measuring it on the machine at hand.

torch.compile (the inductor backend) fuses a small model's many little operations into a few generated kernels;
on a CPU it needs a C++ compiler and spends tens of seconds compiling, and whether it then pays depends on the
model and the machine. So "auto" compiles, times compiled and eager training steps against each other during
the first steps of training (real steps: nothing is thrown away), keeps the faster and says so.
"""

from __future__ import annotations

import statistics
import time

import torch

from trainkit.distributed import all_reduce, same_on_all

COMPILE_MODES = ("auto", "on", "off")


class CompiledForward:
    """Calls a model's forward eagerly or through torch.compile, as `mode` says.

    "off": eager. "on": compiled. "auto": compiled first (the call that compiles), then eager and compiled in
    turn for `trials` steps each; each step is timed from one call to the next, so it covers the backward, the
    optimizer and the data as well, and the mode with the lower median step time is kept. Where torch.compile
    fails (no C++ compiler, an unsupported platform), "on" and "auto" print why and go on eagerly. The compiled
    module shares the model's parameters, so the two modes train the same weights.
    """

    def __init__(self, model: torch.nn.Module, mode: str = "auto", trials: int = 5, compile_fn=torch.compile,
                 clock=time.perf_counter) -> None:
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
        self.model, self.mode, self.clock = model, mode, clock
        self.compiled = compile_fn(model) if mode != "off" else None
        self.chosen = {"off": "eager", "on": "compiled", "auto": None}[mode]  # None: still timing
        self.schedule = ["compiled", "eager"] + ["compiled", "eager"] * trials  # the first of each is not timed
        self.times: dict[str, list[float]] = {"eager": [], "compiled": []}
        self.calls, self.previous = 0, None  # calls so far; (which ran, when) at the last one
        self.failed = False  # torch.compile raised: every step runs eagerly
        self.summary = ""  # the line printed when "auto" chose or torch.compile failed

    def __call__(self, *args, **kwargs):
        now = self.clock()
        if self.chosen is None:
            if self.calls >= 3 and not self.failed:  # the step before this call; steps 0 and 1 warm each mode up
                which, start = self.previous
                self.times[which].append(now - start)
            if self.calls == len(self.schedule):
                self._decide()
        which = self.chosen or self.schedule[self.calls]
        if which == "compiled" and not self.failed:
            try:
                out = self.compiled(*args, **kwargs)
            except Exception as error:  # noqa: BLE001  torch.compile's failures have many types
                out = self.model(*args, **kwargs)  # an error of the model itself is raised here, eagerly
                self._give_up(error)
        else:
            out = self.model(*args, **kwargs)
        self.calls += 1
        self.previous = (which, now)
        return out

    def _decide(self) -> None:
        """Keep the mode whose median step was shorter: rank 0's choice under torchrun, and eager everywhere if
        compiling failed in any process. Every process comes here at the same step (all train in lockstep)."""
        if all_reduce([float(self.failed)], op="max")[0] > 0:
            self.chosen = "eager"
            if not self.failed:
                self.summary = "compile: off (torch.compile failed in another process)"
                print(self.summary, flush=True)
            return
        eager, compiled = (statistics.median(self.times[k]) for k in ("eager", "compiled"))
        self.chosen = same_on_all("compiled" if compiled < eager else "eager")
        self.summary = (f"compile: {'on' if self.chosen == 'compiled' else 'off'} (a compiled training step "
                        f"{compiled * 1e3:.0f} ms, an eager one {eager * 1e3:.0f} ms: {eager / compiled:.2f}x)")
        print(self.summary, flush=True)

    def _give_up(self, error: Exception) -> None:
        """torch.compile failed: eager from now on. Under "auto" the choice is still made at the end of the timed
        steps, where every process learns that one failed."""
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        self.failed = True
        if self.mode == "on":
            self.chosen = "eager"
        self.summary = f"compile: off (torch.compile failed here, so the model runs eagerly: {reason})"
        print(self.summary, flush=True)
