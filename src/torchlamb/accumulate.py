"""Large batches from small ones: average the gradients of several micro-batches, then take one optimizer step."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ._validation import check_count, check_number

if TYPE_CHECKING:
    from .batch_ramp import BatchRamp


class GradientAccumulation:
    """Accumulate ``micro_batches`` backward passes, then step the optimizer (and the scheduler) once.

    Each loss is divided by ``micro_batches`` before its backward pass, so with equal micro-batches and mean losses
    the accumulated gradient is the mean gradient of the large batch they make up: K micro-batches of B behave as
    one batch of K·B (tested against it). With a ``torch.amp.GradScaler`` the scaled loss is used and the scaler
    steps and updates; a step the scaler skips (inf/NaN gradients) still counts in :attr:`steps` and still steps the
    scheduler, as a large batch was consumed. ``max_grad_norm`` clips the accumulated gradient's global norm at the
    start of the step (after unscaling and after the optimizer's other step pre-hooks, which see it unclipped), for
    optimizers without their own clipping; :class:`~torchlamb.Lamb` and
    :class:`~torchlamb.Lars` clip inside their step (``max_grad_norm=``), in the same pass and correctly for shards.

    Example::

        accumulation = torchlamb.GradientAccumulation(optimizer, micro_batches=8, scheduler=scheduler)
        for inputs, targets in loader:                      # batches of B; the optimizer sees batches of 8·B
            loss = loss_fn(model(inputs), targets)
            if accumulation.backward(loss):                 # True when this call took an optimizer step
                print(accumulation.steps, loss.item())

    Under DDP, run the forward and backward of all micro-batches but the last inside ``model.no_sync()`` to save the
    gradient all-reduce (``accumulation.will_step`` says which micro-batch is the last).

    Attributes:
        steps: large batches completed: ``optimizer.step`` calls, any a GradScaler skipped included.
        count: micro-batches accumulated since the last step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, micro_batches: int, *,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                 scaler: torch.amp.GradScaler | None = None, max_grad_norm: float | None = None) -> None:
        check_count("micro_batches", micro_batches)
        if max_grad_norm is not None:
            check_number("max_grad_norm", max_grad_norm, low=0.0, low_open=True)
        self.optimizer, self.micro_batches, self.scheduler, self.scaler = optimizer, micro_batches, scheduler, scaler
        self.max_grad_norm = max_grad_norm
        self.count = 0  # micro-batches accumulated since the last step
        self.steps = 0  # large batches completed: optimizer.step calls, any a GradScaler skipped included
        self.ramp: BatchRamp | None = None  # set by a BatchRamp that grows micro_batches

    @property
    def will_step(self) -> bool:
        """Whether the next :meth:`backward` completes a large batch and steps."""
        return self.count + 1 == self.micro_batches

    def backward(self, loss: Tensor) -> bool:
        """Backward ``loss / micro_batches``; after the last micro-batch, step, and clear the gradients.
        Returns True when this call stepped."""
        loss = loss / self.micro_batches
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        self.count += 1
        if self.count < self.micro_batches:
            return False
        # Clipping runs inside the step, as its last pre-hook: after the pre-hooks registered earlier, so that
        # telemetry (NoiseScale) reads the gradient as accumulated. The gradients are unscaled first: an optimizer
        # that unscales inside its own step (Lamb, Lars) would otherwise be clipped on scaled gradients.
        clip = None
        if self.max_grad_norm is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            clip = self.optimizer.register_step_pre_hook(self._clip)
        # A BatchRamp's lr factor holds for this step only: the scheduler and the checkpoints never see it.
        lrs = self.ramp.scale_lr() if self.ramp is not None else None
        try:
            if self.scaler is None:
                self.optimizer.step()
            else:
                self.scaler.step(self.optimizer)
                self.scaler.update()
        finally:
            if clip is not None:
                clip.remove()
            if lrs is not None:
                self.ramp.restore_lr(lrs)
        self.count = 0
        self.steps += 1
        if self.ramp is not None:
            self.ramp.after_step()  # may grow micro_batches; before the scheduler, which may count its examples
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad()
        return True

    def set_micro_batches(self, micro_batches: int) -> None:
        """Accumulate ``micro_batches`` backward passes per step from now on (a :class:`~torchlamb.BatchRamp` grows
        it). Call it between steps, when no micro-batch of the next large batch has been accumulated yet."""
        check_count("micro_batches", micro_batches)
        if self.count:
            raise RuntimeError("GradientAccumulation.set_micro_batches must be called between optimizer steps: "
                               f"{self.count} micro-batch(es) of the next step are already accumulated")
        self.micro_batches = micro_batches

    def _clip(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)

    def state_dict(self) -> dict[str, Any]:
        """Where the accumulation stands, to checkpoint beside the optimizer. Checkpoint right after a step: the
        gradients accumulated since the last step live in ``p.grad`` and are not part of this (or of the
        optimizer's) state."""
        return {"count": self.count, "steps": self.steps, "micro_batches": self.micro_batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("micro_batches") != self.micro_batches:
            raise ValueError(f"checkpoint accumulates {state.get('micro_batches')!r} micro-batches, "
                             f"this GradientAccumulation {self.micro_batches} (with a BatchRamp, load the ramp's "
                             "state_dict first: it restores the count)")
        self.count, self.steps = int(state["count"]), int(state["steps"])
