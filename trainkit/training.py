"""What a training step needs around forward, loss, backward and the optimizer step, in one object.

    step = trainkit.TrainStep(model, optimizer, precision, device, grad_clip)
    with step.forward_context(last_micro_batch):      # autocast; under torchrun, no gradient sync until the last
        loss = loss_fn(step.model(inputs), targets)    # step.model: DistributedDataParallel under torchrun
    step.backward(loss)                                # fp16: the loss scaled first
    step.update(lr)                                    # unscale, clip, optimizer step, zero the gradients
"""

from __future__ import annotations

import contextlib

import torch

from trainkit.distributed import sync_gradients, wrap_ddp
from trainkit.precision import Precision


class TrainStep:
    """The optimizer step of a training loop with the plumbing a lesson does not teach: the precision's
    autocast, fp16's loss scaling (torch.amp.GradScaler; a pass-through for fp32 and bf16) and, under
    torchrun, DistributedDataParallel averaging the gradients over the processes."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, precision: Precision,
                 device: torch.device, grad_clip: float) -> None:
        self.module, self.optimizer, self.precision, self.grad_clip = model, optimizer, precision, grad_clip
        self.model = wrap_ddp(model, device)  # shares the parameters: `module` still serves eval and checkpoints
        self.scaler = precision.grad_scaler()
        self._sync = True

    @contextlib.contextmanager
    def forward_context(self, sync: bool = True):
        """Autocast for the forward; with sync False (micro-batches before the last of a step) DDP keeps the
        gradients local, so they are averaged once per step. The backward must follow inside or right after."""
        self._sync = sync
        with sync_gradients(self.model, sync), self.precision.autocast():
            yield

    def backward(self, loss: torch.Tensor) -> None:
        with sync_gradients(self.model, self._sync):
            self.scaler.scale(loss).backward()

    def update(self, lr: float) -> torch.Tensor:
        """Set the learning rate, clip the gradients' global norm to grad_clip and take the optimizer step;
        returns the norm before clipping. fp16: the step is skipped when a gradient overflowed."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
