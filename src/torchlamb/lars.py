"""LARS: momentum SGD's direction, then the layer-wise trust ratio (You, Gitman & Ginsburg, 2017).

This file holds the optimizer's options (the class and its checks), its state, its math — a single-tensor version
that reads like the paper, the 8-bit one, and a multi-tensor (``torch._foreach_*``) one — and its path table, which
adds the fused kernels (torchlamb.kernels) for each implementation and storage.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor

from ._base import Adapt, LayerwiseOptimizer, NonFinite
from ._dispatch import path_table
from ._gradients import effective_grad, effective_grads, weighted, zeroed_if_skipped
from ._validation import check_bool, check_number
from .quantized import QuantizedKey
from .trust import LARS_DECAYED_GRAD, LARS_GRAD, WEIGHT, ClipRange, PendingUpdate, sums_of_squares

Denominator = Literal["combined", "split"]
# The momentum buffer under state_dtype="8bit", in signed codes (see torchlamb.quantized).
BUFFER_8BIT = QuantizedKey("momentum_buffer", "momentum_buffer")


class Lars(LayerwiseOptimizer):
    r"""Layer-wise Adaptive Rate Scaling (LARS), You et al. 2017, "Large Batch Training of Convolutional Networks".

    For every parameter tensor :math:`\theta` with gradient :math:`g` (clipped by ``max_grad_norm`` and negated
    for ``maximize`` as in :class:`~torchlamb.Lamb`):

    .. math::
        u &= g + \lambda\theta \\
        r &= \eta \, \phi(\lVert\theta\rVert) / \lVert u \rVert
             \text{ if both norms are } > 0 \text{ else } 1, \text{ then clamped to trust\_clip};
             \; r = 1 \text{ if the group has adapt=False} \\
        b &\leftarrow \mu b + r u \\
        \theta &\leftarrow \theta - \text{lr} \cdot b
             \qquad (\text{nesterov: } \theta \leftarrow \theta - \text{lr} \cdot (r u + \mu b))

    :math:`\eta` is ``trust_coefficient``. With ``denominator="split"`` the ratio divides by
    :math:`\lVert g\rVert + \lambda\lVert\theta\rVert`, as in the original LARS paper; the default ``"combined"``
    divides by :math:`\lVert g + \lambda\theta\rVert`, the change LAMB made (it "preserves more information", in
    Ben Mann's words). The trust stage is the one :class:`~torchlamb.Lamb` uses (:mod:`torchlamb.trust`): LAMB and
    LARS differ only in their direction.

    Args:
        params: parameters or parameter groups; groups accept every option below plus ``adapt``: True (default),
            False, or ``"if_decayed"`` (only when the group's ``weight_decay`` is not 0).
        lr: learning rate (a float or a one-element tensor), ``>= 0``.
        momentum: :math:`\mu \in [0, 1)`.
        weight_decay: :math:`\lambda \ge 0`, added to the gradient before the ratio.
        trust_coefficient: :math:`\eta > 0` (0.001 in the paper).
        nesterov: use Nesterov momentum.
        denominator: ``"combined"`` (‖g + λθ‖) or ``"split"`` (‖g‖ + λ‖θ‖).
        weight_norm_clip: ``(min, max)`` range for :math:`\phi(\lVert\theta\rVert)`, or None.
        trust_clip: ``(min, max)`` range for :math:`r`, or None.
        trust_eps: added to the ratio's denominator (many LARS codes use a small ε there), default 0.
        max_grad_norm: clip the global gradient norm to this before the update (``p.grad`` is left untouched).
        adapt: the default of every group's ``adapt`` (see ``params``).
        maximize: maximize the objective instead of minimizing it.
        foreach: use the multi-tensor (``torch._foreach_*``) implementation; False: a Python loop over tensors.
        fused: use the fused two-pass kernels, C++ on the CPU and Triton on CUDA, as for :class:`~torchlamb.Lamb`
            (the default, None, picks them where they apply and foreach elsewhere).
        master_weights: float32 master copies (and momentum buffers) for float16/bfloat16 parameters, as for
            :class:`~torchlamb.Lamb`.
        state_dtype: the dtype the momentum buffers are stored in, as for :class:`~torchlamb.Lamb`; ``"8bit"``
            keeps them block-wise in 8 bits (``momentum_buffer_codes``/``momentum_buffer_absmax``), and the
            parameter moves by the buffer as stored.
        partition_group: the process group under ``ZeroRedundancyOptimizer``, as for :class:`~torchlamb.Lamb`.
        nonfinite: ``"propagate"`` or ``"skip"``, and ``torch.amp.GradScaler`` support, as for
            :class:`~torchlamb.Lamb`.

    After each step, :attr:`~torchlamb._base.LayerwiseOptimizer.trust_stats` holds the per-tensor ‖θ‖, the ratio's
    denominator and the ratio.
    Use :func:`torchlamb.param_groups` to exempt biases and normalisation parameters.
    """

    _state_keys = ("momentum_buffer",)
    _quantized = (BUFFER_8BIT,)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]],
        lr: float | Tensor = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        *,
        trust_coefficient: float = 0.001,
        nesterov: bool = False,
        denominator: Denominator = "combined",
        weight_norm_clip: ClipRange | None = None,
        trust_clip: ClipRange | None = None,
        trust_eps: float = 0.0,
        max_grad_norm: float | None = None,
        adapt: Adapt = True,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        master_weights: bool = False,
        state_dtype: torch.dtype | None = None,
        partition_group: Any | None = None,
        nonfinite: NonFinite = "propagate",
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                        nesterov=nesterov, denominator=denominator, weight_norm_clip=weight_norm_clip,
                        trust_clip=trust_clip, trust_eps=trust_eps, max_grad_norm=max_grad_norm, adapt=adapt,
                        maximize=maximize, foreach=foreach, fused=fused,
                        master_weights=master_weights, state_dtype=state_dtype)
        super().__init__(params, defaults, partition_group, nonfinite)

    def _validate_group(self, group: dict[str, Any], group_index: int | None) -> None:
        super()._validate_group(group, group_index)
        check_number("momentum", group["momentum"], low=0.0, high=1.0, high_open=True, group_index=group_index)
        check_number("trust_coefficient", group["trust_coefficient"], low=0.0, low_open=True,
                     group_index=group_index)
        check_bool("nesterov", group["nesterov"], group_index=group_index)
        if group["denominator"] not in ("combined", "split"):
            raise ValueError(f"denominator must be 'combined' (‖g + λθ‖) or 'split' (‖g‖ + λ‖θ‖), "
                             f"got {group['denominator']!r}")

    def _new_state(self, param: Tensor, dtype: torch.dtype) -> dict[str, Tensor]:
        # A zero buffer gives b = r·u at the first step, the same as torch.optim.SGD's copy of the first update.
        return {"momentum_buffer": torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)}

    def _trust_options(self, group: dict[str, Any]) -> dict[str, Any]:
        return {**super()._trust_options(group), "trust_coefficient": group["trust_coefficient"]}

    def _update_norm(self, group: dict[str, Any], norms: Tensor) -> Tensor:
        if group["denominator"] == "split":
            return norms[:, LARS_GRAD] + group["weight_decay"] * norms[:, WEIGHT]
        return norms[:, LARS_DECAYED_GRAD]

    @staticmethod
    def _options(group: dict[str, Any]) -> dict[str, Any]:
        return dict(lr=group["lr"], momentum=group["momentum"], weight_decay=group["weight_decay"],
                    nesterov=group["nesterov"], split_denominator=group["denominator"] == "split",
                    maximize=group["maximize"])


def _directions(params: list[Tensor], grads: list[Tensor], steps: list[Tensor], weight_decay: float, maximize: bool,
                grad_factor: Tensor | None, step_weight: Tensor | None) -> tuple[list[Tensor], list[Tensor]]:
    """One tensor at a time: the gradients g as the update uses them and the directions u = g + λθ; counts the
    steps."""
    effective, updates = [], []
    for param, grad, step in zip(params, grads, steps):
        grad = zeroed_if_skipped([effective_grad(grad, maximize, grad_factor)], step_weight)[0]
        step += 1 if step_weight is None else step_weight
        effective.append(grad)
        updates.append(grad.add(param, alpha=weight_decay) if weight_decay != 0 else grad)
    return effective, updates


def _single_tensor_lars(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor],
                        steps: list[Tensor], *, lr: float | Tensor, momentum: float, weight_decay: float,
                        nesterov: bool, split_denominator: bool, maximize: bool,
                        grad_factor: Tensor | None, step_weight: Tensor | None = None) -> PendingUpdate:
    """LARS one tensor at a time, written as the math reads; the directions u wait for their ratios in a list.
    With a ``step_weight`` (see torchlamb._gradients), every change is weighted by it."""
    effective, updates = _directions(params, grads, steps, weight_decay, maximize, grad_factor, step_weight)

    def apply(ratio: Tensor) -> None:
        # Skipped: b ← 1·b + 0, θ ← θ − 0.
        buffer_factor = weighted(step_weight, momentum, 1.0)
        step_lr = lr if step_weight is None else lr * step_weight
        for param, update, buffer, r in zip(params, updates, momentum_buffers, ratio.unbind(0)):
            scaled_update = update * r.to(param.device)
            if step_weight is not None:
                scaled_update = scaled_update * step_weight.to(param.device)
            buffer.mul_(buffer_factor).add_(scaled_update)
            direction = scaled_update.add(buffer, alpha=momentum) if nesterov else buffer
            _subtract_scaled_([param], [direction], step_lr)

    return PendingUpdate(_squares(params, effective, updates, split_denominator), apply)


def _quantized_lars(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]], steps: list[Tensor],
                    *, buffer: QuantizedKey, lr: float | Tensor, momentum: float, weight_decay: float,
                    nesterov: bool, split_denominator: bool, maximize: bool, grad_factor: Tensor | None,
                    step_weight: Tensor | None = None) -> PendingUpdate:
    """LARS with an 8-bit momentum buffer, one tensor at a time: b is dequantized, updated in float32 and stored,
    and θ moves by the buffer as stored (dequantized again), the one the next step continues from. A skipped step
    stores nothing and moves nothing."""
    effective, updates = _directions(params, grads, steps, weight_decay, maximize, grad_factor, step_weight)

    def apply(ratio: Tensor) -> None:
        step_lr = lr if step_weight is None else lr * step_weight
        for param, update, state, r in zip(params, updates, states, ratio.unbind(0)):
            scaled_update = update.float() * r.to(param.device, torch.float32)
            value = buffer.load(state).mul_(momentum).add_(scaled_update)
            buffer.save_(state, value, step_weight)
            value = buffer.load(state)
            direction = scaled_update.add(value, alpha=momentum) if nesterov else value
            if step_weight is not None:
                direction = direction * step_weight.to(param.device)  # the skipped step's update may hold NaN
            _subtract_scaled_([param], [direction.to(param.dtype)], step_lr)

    return PendingUpdate(_squares(params, effective, updates, split_denominator), apply)


def _multi_tensor_lars(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor],
                       steps: list[Tensor], *, lr: float | Tensor, momentum: float, weight_decay: float,
                       nesterov: bool, split_denominator: bool, maximize: bool,
                       grad_factor: Tensor | None, step_weight: Tensor | None = None) -> PendingUpdate:
    """The same update with ``torch._foreach_*`` ops."""
    grads = zeroed_if_skipped(effective_grads(grads, maximize, grad_factor), step_weight)
    # A list of 0-dim tensors: the single-tensor overload of _foreach_add_ reads the value on the host.
    torch._foreach_add_(steps, 1 if step_weight is None else [step_weight] * len(steps))
    # A new list: p.grad itself is never modified.
    updates = torch._foreach_add(grads, params, alpha=weight_decay) if weight_decay != 0 else grads

    def apply(ratio: Tensor) -> None:
        scale = ratio.to(params[0].device)
        if step_weight is not None:
            scale = scale * step_weight.to(scale.device)
        scaled_updates = torch._foreach_mul(updates, list(scale.unbind(0)))
        torch._foreach_mul_(momentum_buffers, momentum if step_weight is None else  # skipped: b ← 1·b + 0
                            [weighted(step_weight, momentum, 1.0)] * len(momentum_buffers))
        torch._foreach_add_(momentum_buffers, scaled_updates)
        if nesterov:
            torch._foreach_add_(scaled_updates, momentum_buffers, alpha=momentum)
            directions = scaled_updates
        else:
            directions = momentum_buffers
        _subtract_scaled_(params, directions, lr if step_weight is None else lr * step_weight)

    return PendingUpdate(_squares(params, grads, updates, split_denominator), apply)


def _squares(params: list[Tensor], grads: list[Tensor], updates: list[Tensor], split_denominator: bool) -> Tensor:
    """The [n, 3] float64 columns ‖θ‖², ‖g‖², ‖g + λθ‖² (torchlamb.trust's LARS columns); only the denominator in
    use is computed, the other column stays 0."""
    columns = [sums_of_squares(params), None, None]
    used = LARS_GRAD if split_denominator else LARS_DECAYED_GRAD
    columns[used] = sums_of_squares(grads if split_denominator else updates)
    columns[LARS_DECAYED_GRAD if split_denominator else LARS_GRAD] = torch.zeros_like(columns[WEIGHT])
    return torch.stack(columns, 1)


def _subtract_scaled_(params: list[Tensor], directions: list[Tensor], lr: float | Tensor) -> None:
    """θ ← θ − lr·d. A float lr goes in as ``alpha``, which the kernel applies without rounding lr·d first."""
    if isinstance(lr, Tensor):
        torch._foreach_sub_(params, torch._foreach_mul(directions, lr))
    else:
        torch._foreach_add_(params, directions, alpha=-lr)


# (implementation, 8-bit state) -> the functions that compute a group's update (see torchlamb._dispatch).
Lars._PATHS = path_table("lars", _single_tensor_lars, _multi_tensor_lars, _quantized_lars, buffer=BUFFER_8BIT)
