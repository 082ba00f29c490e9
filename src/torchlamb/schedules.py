"""The learning-rate schedules and scaling rules large-batch training needs.

Large batches need two things besides a layer-wise optimizer (You et al. 2019, "Large Batch Optimization for Deep
Learning: Training BERT in 76 minutes"):

* a **warmup**: the trust ratio tames each layer's step, but early moments are noisy; ramp the lr up linearly, then
  decay it polynomially to the end of training (:func:`~torchlamb.warmup_poly`);
* a **scaling rule** for the peak lr when the batch grows: LAMB's paper scales it with the square root of the
  batch size, Goyal et al.'s rule for SGD/LARS linearly (:func:`~torchlamb.scale_lr`).

:data:`BERT_LAMB_PHASES` records the paper's two-phase BERT recipe (see ``docs/schedules.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
from torch.optim.lr_scheduler import LRScheduler

from ._validation import check_number


def _check_steps(name: str, value: Any, *, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


class WarmupPolyLR(LRScheduler):
    r"""Linear warmup, then polynomial decay: the schedule of BERT with LAMB. Use :func:`warmup_poly` to build it.

    With :math:`w` = ``warmup_steps``, :math:`T` = ``total_steps``, :math:`p` = ``power`` and
    :math:`e` = ``end_factor``, the lr after :math:`t` calls of ``scheduler.step()`` is ``base_lr`` times

    .. math::
        f(t) = \begin{cases}
            t / w & t < w \\
            e + (1 - e)\,\bigl(1 - \frac{t - w}{T - w}\bigr)^{p} & w \le t \le T \\
            e & t > T
        \end{cases}

    so the first step runs at lr 0 when ``warmup_steps > 0`` (as in BERT's and NVIDIA's recipes), the peak is
    reached after ``warmup_steps`` steps, and the lr ends at ``end_factor · base_lr`` after ``total_steps``.
    ``power=1`` is linear decay (the BERT/LAMB recipe); NVIDIA's BERT recipe uses ``power=0.5``.

    **Progress in examples.** When the batch size changes during training (:class:`~torchlamb.BatchRamp`), a step is
    no longer a fixed amount of data, and the schedule should follow the data seen. With ``progress`` (a function
    returning the progress so far, such as ``ramp.examples_seen``), :math:`t` is its value when ``scheduler.step()``
    is called instead of the number of calls, and ``warmup_steps`` and ``total_steps`` are in its unit (examples).
    The function is not part of ``state_dict()``: the object it reads saves its own state.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, power: float = 1.0,
                 end_factor: float = 0.0, last_epoch: int = -1,
                 progress: Callable[[], int] | None = None) -> None:
        _check_steps("warmup_steps", warmup_steps, low=0)
        _check_steps("total_steps", total_steps, low=1)
        if warmup_steps > total_steps:
            raise ValueError(f"warmup_steps must be <= total_steps, got {warmup_steps} > {total_steps}")
        check_number("power", power, low=0.0, low_open=True)
        check_number("end_factor", end_factor, low=0.0, high=1.0)
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.power = power
        self.end_factor = end_factor
        self.progress = progress
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        """The multiplier :math:`f(t)` of the base lr after ``step`` scheduler steps."""
        if step < self.warmup_steps:
            return step / self.warmup_steps
        if step >= self.total_steps:
            return self.end_factor
        remaining = 1.0 - (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return self.end_factor + (1.0 - self.end_factor) * remaining**self.power

    def get_lr(self) -> list[float | torch.Tensor]:
        factor = self.factor(self.last_epoch if self.progress is None else self.progress())
        return [base_lr * factor for base_lr in self.base_lrs]

    _get_closed_form_lr = get_lr

    def state_dict(self) -> dict[str, Any]:
        return {key: value for key, value in super().state_dict().items() if key != "progress"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        progress = self.progress  # a function of this run's objects, never taken from a checkpoint
        super().load_state_dict(state_dict)
        self.progress = progress


def warmup_poly(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, power: float = 1.0,
                end_factor: float = 0.0, progress: Callable[[], int] | None = None) -> WarmupPolyLR:
    """Linear warmup over ``warmup_steps``, then polynomial decay to ``end_factor · lr`` at ``total_steps``.
    With ``progress`` (e.g. ``ramp.examples_seen``) both are counted in its unit, examples, instead of steps.

    Returns a :class:`torch.optim.lr_scheduler.LRScheduler` (its ``state_dict`` round-trips); call
    ``scheduler.step()`` after each ``optimizer.step()``. See :class:`WarmupPolyLR` for the formula.
    """
    return WarmupPolyLR(optimizer, warmup_steps, total_steps, power=power, end_factor=end_factor, progress=progress)


def scale_lr(base_lr: float, base_batch: int, batch: int, rule: Literal["sqrt", "linear"] = "sqrt") -> float:
    r"""The peak lr for ``batch`` given one that works at ``base_batch``.

    ``"sqrt"``: :math:`\text{lr} = \text{base\_lr} \sqrt{\text{batch}/\text{base\_batch}}`, LAMB's rule (You et al.
    2019 tune nothing else: their "untuned" lr is :math:`5/(2^k \cdot 10^3)`, ×√2 per doubling of the batch up to
    0.005 at 32K). ``"linear"``: :math:`\text{lr} = \text{base\_lr} \cdot \text{batch}/\text{base\_batch}`, Goyal et
    al.'s rule for SGD with momentum, used with LARS.
    """
    check_number("base_lr", base_lr, low=0.0)
    _check_steps("base_batch", base_batch, low=1)
    _check_steps("batch", batch, low=1)
    if rule == "sqrt":
        return base_lr * (batch / base_batch) ** 0.5
    if rule == "linear":
        return base_lr * batch / base_batch
    raise ValueError(f"rule must be 'sqrt' or 'linear', got {rule!r}")


class Phase(NamedTuple):
    """One phase of a pre-training recipe."""

    seq_len: int
    batch: int
    lr: float
    warmup_fraction: float
    steps: int

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup_fraction * self.steps)


#: You et al. 2019's BERT-Large recipe with LAMB (76 minutes on 1024 TPUv3 chips). Each phase restarts the schedule.
BERT_LAMB_PHASES: tuple[Phase, Phase] = (
    Phase(seq_len=128, batch=65536, lr=6e-3, warmup_fraction=0.2843, steps=7038),
    Phase(seq_len=512, batch=32768, lr=4e-3, warmup_fraction=0.128, steps=1563),
)
