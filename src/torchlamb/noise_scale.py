r"""NoiseScale: the gradient noise scale, measured during training from two batch sizes, at no extra backward pass.

The "simple" noise scale of McCandlish et al. (2018, "An Empirical Model of Large-Batch Training") is

.. math::
    B_\text{simple} = \operatorname{tr}(\Sigma) / \lvert G\rvert^2

with :math:`G` the true gradient and :math:`\Sigma` the per-example gradient covariance. Batches much smaller than
:math:`B_\text{simple}` are dominated by noise (doubling the batch nearly halves the steps); batches much larger
waste examples. It predicts the *critical batch size* where steps to a target stop falling as 1/B.

A gradient averaged over :math:`b` examples has :math:`E\lvert G_b\rvert^2 = \lvert G\rvert^2 + \operatorname{tr}
(\Sigma)/b`. Two batch sizes :math:`b < B` give unbiased estimates of both terms (McCandlish et al., appendix A):

.. math::
    \lvert G\rvert^2 \approx \frac{B\lvert G_B\rvert^2 - b\lvert G_b\rvert^2}{B - b}, \qquad
    \operatorname{tr}(\Sigma) \approx \frac{\lvert G_b\rvert^2 - \lvert G_B\rvert^2}{1/b - 1/B}.

Training already has both sizes: the gradient of one backward pass on one process (:math:`b` = the micro-batch)
and the gradient the optimizer steps with (:math:`B` = micro-batch × accumulated micro-batches × processes).
:class:`NoiseScale` reads the first in a tensor hook as each backward pass produces it, and the second in the
optimizer's step pre-hook. :math:`\lvert G_b\rvert^2` is the mean of the micro-batches' *squared* norms (squaring a
mean of norms would bias tr(Σ) low, by Jensen's inequality). Each step's estimates are noisy and the one of
:math:`\lvert G\rvert^2` can be negative, so numerator and denominator are smoothed separately by bias-corrected
exponential moving averages and :math:`B_\text{simple}` is their ratio.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, TypedDict

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._validation import check_count
from .records import Recorder, new_figure, save_figure, series_by_name, summary_writer, write_csv
from .trust import sums_of_squares

#: The name of the records that take all tensors together.
ALL = "(all)"
#: The quantities of a record, in the order of the CSV columns after step and name.
QUANTITIES = ("b_simple", "grad_sq", "trace")


class NoiseRecord(TypedDict):
    """One row of :attr:`NoiseScale.records`: the smoothed estimates for one tensor (or :data:`ALL`) at one step."""

    step: int
    name: str
    b_simple: float  # tr(Σ)/|G|², in examples
    grad_sq: float  # |G|², the squared norm of the true gradient
    trace: float  # tr(Σ), the per-example gradient variance summed over the tensor's elements


class NoiseScale(Recorder):
    r"""Measure the gradient noise scale :math:`B_\text{simple}` of a model while it trains, globally and per tensor.

    Attach it to the model and the optimizer before training; it hooks into each parameter's gradient (one extra
    read of the gradient per backward pass) and into ``optimizer.step`` (one read of the final gradients per step).
    Nothing is read back to the host until :attr:`b_simple` is read or a record step comes (step 1 and every
    ``every``-th step), when one transfer takes all estimates.

    The two batch sizes (see the module docstring): ``b = batch_size``, the examples in one backward pass on one
    process, and ``B = batch_size · micro_batches · world size``, the examples behind the gradient the optimizer
    steps with. They must differ: accumulate micro-batches (:class:`~torchlamb.GradientAccumulation`) or train
    data-parallel (DDP), or both.

    Conventions it relies on, which :class:`~torchlamb.GradientAccumulation` and DDP follow: each loss is a mean
    over its micro-batch and is divided by ``micro_batches`` before its backward pass, so that the gradient the
    optimizer sees is the mean over the large batch; under DDP that gradient is averaged over the processes.
    :math:`B_\text{simple}` itself does not depend on a constant factor on the loss (it cancels in the ratio);
    ``grad_sq`` and ``trace`` do. The large-batch gradient must reach ``optimizer.step`` unclipped: clip inside the
    step (Lamb's and Lars's ``max_grad_norm``, or :class:`~torchlamb.GradientAccumulation`'s, which clips after the
    step's other pre-hooks), not with ``clip_grad_norm_`` before it (a clipped ``|G_B|²`` would read as noise). With a
    ``torch.amp.GradScaler`` pass it as ``scaler``: the backward passes' gradients carry its scale, which is divided
    out (read as a device tensor, without a sync), from the large-batch gradient too where the optimizer unscales
    inside its own step (Lamb, Lars). A step the scaler skips (inf/NaN gradients) does not call ``optimizer.step``
    for other optimizers; its micro-batches stay in the small-batch mean of the next step, and a tensor whose mean
    is not finite is left out of that step's update (and so is the global estimate). Lamb and Lars are called and
    skip the step themselves; its estimates are not finite and left out the same way.

    Under DDP the small-batch squares are summed over the processes of ``group`` (one all-reduce of 2·T + 2
    numbers per step, T tensors), so every process holds the same estimates. Sharded parameters (FSDP2) are not
    supported: their per-process gradients are never whole.

    Args:
        model: the model whose parameters are measured (those with ``requires_grad``), named by
            ``named_parameters()``.
        optimizer: the optimizer whose ``step`` ends a large batch.
        batch_size: examples in one micro-batch on one process (b).
        micro_batches: backward passes accumulated per optimizer step on each process.
        scaler: the GradScaler whose scale the backward passes carry, if any.
        ema: β of the moving averages, in [0, 1); 0 keeps only the last step's estimates.
        every: record every this many steps (and at step 1).
        group: the data-parallel process group; default: the world group when torch.distributed is initialized.

    Attributes:
        names: the measured tensors' names, in the order of the per-tensor estimates.
        small_batch: b, examples behind one backward pass's gradient.
        large_batch: B, examples behind the gradient the optimizer steps with.
        records: :class:`NoiseRecord` dicts, one per tensor and one for all of them (``name`` :data:`ALL`) at
            each record step.
        step: optimizer steps seen.

    Example::

        accumulation = torchlamb.GradientAccumulation(optimizer, micro_batches=8)
        noise = torchlamb.NoiseScale(model, optimizer, batch_size=32, micro_batches=8, every=50)
        for inputs, targets in loader:                       # micro-batches of 32, large batches of 256
            accumulation.backward(loss_fn(model(inputs), targets))
        print(noise.b_simple)                                 # examples; compare with 256
        noise.plot("noise_scale.png")
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, batch_size: int,
                 micro_batches: int = 1, scaler: torch.amp.GradScaler | None = None, ema: float = 0.95,
                 every: int = 10, group: Any = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        for name, value in (("batch_size", batch_size), ("micro_batches", micro_batches), ("every", every)):
            check_count(name, value)
        if isinstance(ema, bool) or not isinstance(ema, (int, float)) or not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must be a number in [0, 1), got {ema!r}")
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("model has no parameters that require gradients")
        if any(type(p).__name__ == "DTensor" for _, p in named):
            raise ValueError("NoiseScale does not support sharded (DTensor, FSDP2) parameters: a process never "
                             "holds a whole micro-batch gradient of them")
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.optimizer, self.scaler, self.ema, self.every = optimizer, scaler, float(ema), every
        self.group = group
        world = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
        self.small_batch = batch_size
        self.large_batch = batch_size * micro_batches * world
        if self.large_batch == self.small_batch:
            raise ValueError("NoiseScale needs two batch sizes, but one backward pass already makes the whole "
                             f"batch ({batch_size} examples, 1 micro-batch, 1 process): accumulate micro-batches "
                             "(micro_batches > 1) or train data-parallel")
        self._gradient_factor = float(micro_batches)  # a backward pass's gradient is the micro-batch's / K
        self._world = world
        self.records: list[NoiseRecord] = []
        self.step = 0
        device = self.params[0].device
        count = len(self.params)
        # Per tensor, since the last step: the sum of the micro-batch gradients' squared norms (device) and how many
        # backward passes gave the tensor a gradient (host: the hooks run on the host anyway).
        self._small_sum = torch.zeros(count, dtype=torch.float64, device=device)
        self._small_count = [0] * count
        # Moving averages of |G|² and tr(Σ), and how many updates each took: per tensor, then all tensors (last).
        self._ema_grad_sq = torch.zeros(count + 1, dtype=torch.float64, device=device)
        self._ema_trace = torch.zeros(count + 1, dtype=torch.float64, device=device)
        self._updates = torch.zeros(count + 1, dtype=torch.float64, device=device)
        self._handles = [p.register_hook(functools.partial(self._on_gradient, i)) for i, p in enumerate(self.params)]
        self._handles.append(optimizer.register_step_pre_hook(self._before_step))

    # -- hooks -----------------------------------------------------------------------------------------------------
    def _on_gradient(self, index: int, grad: Tensor) -> None:
        """A backward pass's gradient of tensor ``index``, before it is accumulated: one micro-batch's (/ K)."""
        square = sums_of_squares([grad.detach()])[0].to(self._small_sum.device)
        factor = self._gradient_factor
        if self.scaler is not None and self.scaler.is_enabled() and self.scaler._get_scale_async() is not None:
            square = square / self.scaler._get_scale_async().double().square()  # the scale: a device tensor, no sync
        self._small_sum[index] += square * factor * factor
        self._small_count[index] += 1

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.step += 1
        present = [i for i, p in enumerate(self.params) if p.grad is not None and self._small_count[i] > 0]
        small_sum = self._small_sum
        counts = torch.tensor(self._small_count, dtype=torch.float64).to(small_sum.device, non_blocking=True)
        if self._world > 1:
            packed = torch.cat([small_sum, counts])
            dist.all_reduce(packed, group=self.group)
            small_sum, counts = packed.split(len(self.params))
        # GradScaler.step hands an optimizer that unscales inside its own step (Lamb, Lars) the scale as
        # ``grad_scale``: the gradients this hook reads still carry it.
        self._update(present, small_sum, counts, getattr(optimizer, "grad_scale", None))
        self._small_sum.zero_()
        self._small_count = [0] * len(self.params)
        if self.step == 1 or self.step % self.every == 0:
            self._record()

    def _update(self, present: list[int], small_sum: Tensor, counts: Tensor, carried_scale: Tensor | None) -> None:
        """One step's estimates from the small- and large-batch squared norms, into the moving averages;
        ``carried_scale``: a loss scale the gradients still carry."""
        count = len(self.params)
        mask = torch.zeros(count, dtype=torch.bool, device=small_sum.device)
        large = torch.zeros(count, dtype=torch.float64, device=small_sum.device)
        if present:
            mask[present] = True
            large[present] = sums_of_squares([self.params[i].grad.detach() for i in present]).to(large.device)
        if carried_scale is not None:
            large = large / carried_scale.to(large.device, torch.float64).square()
        small = small_sum / counts.clamp(min=1)
        # The last entry takes all present tensors together: sums of squares add up over tensors.
        small = torch.cat([small, torch.where(mask, small, 0).sum().reshape(1)])
        large = torch.cat([large, large.sum().reshape(1)])
        mask = torch.cat([mask, mask.any().reshape(1)])
        b, big = float(self.small_batch), float(self.large_batch)
        grad_sq = (big * large - b * small) / (big - b)
        trace = (small - large) / (1.0 / b - 1.0 / big)
        valid = mask & grad_sq.isfinite() & trace.isfinite()
        beta = self.ema
        self._ema_grad_sq.copy_(torch.where(valid, beta * self._ema_grad_sq + (1 - beta) * grad_sq, self._ema_grad_sq))
        self._ema_trace.copy_(torch.where(valid, beta * self._ema_trace + (1 - beta) * trace, self._ema_trace))
        self._updates += valid

    # -- a batch that changes, and checkpoints ----------------------------------------------------------------------
    @property
    def micro_batches(self) -> int:
        """Backward passes accumulated per optimizer step on each process."""
        return round(self._gradient_factor)

    def set_micro_batches(self, micro_batches: int) -> None:
        """The accumulation now takes ``micro_batches`` backward passes per step (a :class:`~torchlamb.BatchRamp`
        grew it): B and the factor each backward pass's gradient is multiplied by follow. Call it between steps.
        The moving averages carry over: each step's estimates are unbiased for whatever b and B it had."""
        check_count("micro_batches", micro_batches)
        if any(self._small_count):
            raise RuntimeError("NoiseScale.set_micro_batches must be called between optimizer steps: "
                               f"{max(self._small_count)} backward pass(es) of this step were already measured")
        large_batch = self.small_batch * micro_batches * self._world
        if large_batch == self.small_batch:
            raise ValueError("NoiseScale needs two batch sizes: micro_batches=1 on one process leaves one")
        self.large_batch, self._gradient_factor = large_batch, float(micro_batches)

    def state_dict(self) -> dict[str, Any]:
        """What resumes the estimates exactly: the moving averages, the step, the micro-batch count and the records.
        Checkpoint between optimizer steps."""
        return {"names": list(self.names), "small_batch": self.small_batch, "micro_batches": self.micro_batches,
                "step": self.step, "ema_grad_sq": self._ema_grad_sq.clone(), "ema_trace": self._ema_trace.clone(),
                "updates": self._updates.clone(), "records": [dict(row) for row in self.records]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; the model's tensors, the micro-batch size and the micro-batch count
        must match (with a :class:`~torchlamb.BatchRamp`, load the ramp's state first: it restores the count)."""
        for key, mine in (("names", self.names), ("small_batch", self.small_batch),
                          ("micro_batches", self.micro_batches)):
            if state.get(key) != mine:
                raise ValueError(f"NoiseScale checkpoint does not match: its {key} is {state.get(key)!r}, this "
                                 f"NoiseScale's {mine!r}" + (" (with a BatchRamp, load the ramp's state_dict first)"
                                                            if key == "micro_batches" else ""))
        device = self._ema_grad_sq.device
        for name in ("ema_grad_sq", "ema_trace", "updates"):
            getattr(self, f"_{name}").copy_(state[name].to(device))
        self.step = int(state["step"])
        self.records = [NoiseRecord(**row) for row in state["records"]]

    # -- estimates -------------------------------------------------------------------------------------------------
    def estimates(self) -> dict[str, Tensor]:
        """The bias-corrected moving averages as device tensors (no sync): ``grad_sq`` (``|G|²``), ``trace``
        (``tr(Σ)``) and ``b_simple`` (their ratio), each with one entry per tensor (in the order of ``names``) and
        all tensors last. NaN where no step has been measured yet."""
        correction = 1.0 - self.ema ** self._updates  # 0 before the first update: 0/0 gives NaN, as it should
        grad_sq = self._ema_grad_sq / correction
        trace = self._ema_trace / correction
        return {"b_simple": trace / grad_sq, "grad_sq": grad_sq, "trace": trace}

    @property
    def b_simple(self) -> float:
        """The current estimate of B_simple for all tensors together, in examples; reading it syncs with the device."""
        return self.estimates()["b_simple"][-1].item()

    def _record(self) -> None:
        values = torch.stack(list(self.estimates().values()), dim=1).tolist()  # one transfer
        for name, row in zip([*self.names, ALL], values):
            self.records.append(NoiseRecord(step=self.step, name=name, **dict(zip(QUANTITIES, row))))

    def series(self, name: str = ALL, quantity: str = "b_simple") -> list[tuple[int, float]]:
        """The recorded (step, value) points of one tensor (or :data:`ALL`) for one of :data:`QUANTITIES`."""
        if quantity not in QUANTITIES:
            raise ValueError(f"quantity must be one of {QUANTITIES}, got {quantity!r}")
        return [(row["step"], row[quantity]) for row in self.records if row["name"] == name]

    # -- export ----------------------------------------------------------------------------------------------------
    def to_csv(self, path: str | Path) -> Path:
        """Write the records as CSV: ``step, name, b_simple, grad_sq, trace``. Parent directories are created."""
        return write_csv(path, ("step", "name", *QUANTITIES), self.records)

    def to_tensorboard(self, log_dir: str | Path) -> None:
        """Write the records as TensorBoard scalars ``noise_scale/<quantity>/<name>``; needs ``tensorboard``."""
        writer = summary_writer(log_dir, "NoiseScale.to_tensorboard")
        try:
            for row in self.records:
                for quantity in QUANTITIES:
                    writer.add_scalar(f"noise_scale/{quantity}/{row['name']}", row[quantity], global_step=row["step"])
        finally:
            writer.close()

    def plot(self, path: str | Path, monitor: Any = None, title: str | None = None) -> Path:
        """Plot B_simple against the step (all tensors, thick, and each tensor, thin; log y) with the two batch sizes
        as dashed lines; with a :class:`~torchlamb.TrustMonitor` as ``monitor``, its trust ratios beside it on a
        second panel. Non-positive estimates cannot sit on a log axis and are left out. Returns the path."""
        if not self.records:
            raise RuntimeError("NoiseScale has no records to plot yet: step the optimizer first")
        figure = new_figure(figsize=(13.0 if monitor is not None else 7.0, 4.5))
        axes = figure.subplots(1, 2 if monitor is not None else 1, squeeze=False)[0]
        left = axes[0]
        for name in self.names:
            steps, values = _positive(self.series(name))
            left.plot(steps, values, linewidth=0.8, alpha=0.5)
        steps, values = _positive(self.series(ALL))
        left.plot(steps, values, color="black", linewidth=2.0, label="all tensors")
        for batch, label in ((self.small_batch, "b (micro-batch)"), (self.large_batch, "B (optimizer batch)")):
            left.axhline(batch, color="0.4", linestyle="--", linewidth=0.8)
            left.annotate(label, (0.01, batch), xycoords=("axes fraction", "data"), fontsize="small", color="0.3")
        left.set(yscale="log", xlabel="optimizer step", ylabel="B_simple = tr(Σ)/|G|² (examples, log scale)",
                 title=title if title is not None else "Gradient noise scale (thin: per tensor)")
        left.grid(True, which="major", alpha=0.3)
        left.legend(loc="best", fontsize="small")
        if monitor is not None:
            right = axes[1]
            ratios = series_by_name(monitor.records)
            for name, points in ratios.items():
                right.plot([s for s, _ in points], [r if r > 0 else math.nan for _, r in points], linewidth=1.0,
                           label=name)
            right.axhline(1.0, color="0.4", linestyle="--", linewidth=0.8)
            right.set(yscale="log", xlabel="optimizer step", ylabel="trust ratio r (log scale)",
                      title="Trust ratio per tensor")
            right.grid(True, which="major", alpha=0.3)
            if len(ratios) <= 12:
                right.legend(loc="best", fontsize="x-small")
        return save_figure(figure, path)


def _positive(points: list[tuple[int, float]]) -> tuple[list[int], list[float]]:
    return [s for s, _ in points], [v if v > 0 else math.nan for _, v in points]
