"""LARS: momentum SGD's direction, then the layer-wise trust ratio (You, Gitman & Ginsburg, 2017).

This file holds the optimizer's options (the class and its checks), its state, its math — a single-tensor version
that reads like the paper, the 8-bit one, and a multi-tensor (``torch._foreach_*``) one — and its path table, which
adds the fused kernels (torchlamb.kernels) for each implementation and storage.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, Union

import torch
from torch import Tensor

from ._base import Adapt, LayerwiseOptimizer, NonFinite
from ._dispatch import path_table
from ._gradients import effective_grad, effective_grads, weighted, zeroed_if_skipped
from ._validation import check_bool, check_number, where
from .groups import split_exempt
from .presets import LARS_PRESETS, preset_options
from .quantized import QuantizedKey
from .trust import LARS_DECAYED_GRAD, LARS_GRAD, WEIGHT, ClipRange, PendingUpdate, sums_of_squares

Denominator = Literal["combined", "split"]
# Which norm being 0 makes the ratio fall back to 1 (besides φ(‖θ‖)): the ratio's denominator, or the gradient's.
ZeroFallback = Literal["denominator", "grad"]
# LARC's lr-relative clip: off, on every adapting tensor's ratio (timm), or on the ratios computed from norms (apex).
LarcClip = Union[bool, Literal["computed"]]
# The momentum buffer under state_dtype="8bit", in signed codes (see torchlamb.quantized).
BUFFER_8BIT = QuantizedKey("momentum_buffer", "momentum_buffer")


class Lars(LayerwiseOptimizer):
    r"""Layer-wise Adaptive Rate Scaling (LARS), You et al. 2017, "Large Batch Training of Convolutional Networks".

    For every parameter tensor :math:`\theta` with gradient :math:`g` (clipped by ``max_grad_norm`` and negated
    for ``maximize`` as in :class:`~torchlamb.Lamb`):

    .. math::
        u &= g + \lambda\theta \\
        D &= \lVert u \rVert \;(\text{combined}) \text{ or } \lVert g\rVert + \lambda\lVert\theta\rVert
             \;(\text{split}) \\
        r &= \eta \, \phi(\lVert\theta\rVert) / (D + \text{trust\_eps})
             \text{ if } \phi(\lVert\theta\rVert) > 0 \text{ and } Z > 0 \text{ else } 1,
             \text{ then clamped to trust\_clip}; \; Z = D \text{ or } \lVert g\rVert \text{ (zero\_fallback)} \\
        r &\leftarrow \min(r / \text{lr}, 1) \text{ with larc\_clip}; \quad
             r = 1 \text{ if the group has adapt=False} \\
        s &= \text{lr} \cdot r \text{ (lr\_inside\_momentum) or } r, \qquad
             c = 1 \text{ at a tensor's first step, else } 1 - \text{dampening} \\
        b &\leftarrow \mu b + c \, s u, \qquad d = b \;\; (\text{nesterov: } d = s u + \mu b) \\
        \theta &\leftarrow \theta - d \text{ (lr\_inside\_momentum) or } \theta - \text{lr} \cdot d

    :math:`\eta` is ``trust_coefficient``. With ``denominator="split"`` the ratio divides by
    :math:`\lVert g\rVert + \lambda\lVert\theta\rVert`, as in the original LARS paper; the default ``"combined"``
    divides by :math:`\lVert g + \lambda\theta\rVert`, the change LAMB made (it "preserves more information", in
    Ben Mann's words). The trust stage is the one :class:`~torchlamb.Lamb` uses (:mod:`torchlamb.trust`): LAMB and
    LARS differ only in their direction.

    Where the learning rate enters is the difference that matters most between published LARS codes: torch-style
    SGD (and so LARC, Barlow Twins, timm) multiplies the buffer by the current lr, θ ← θ − lr·b; the paper, SimCLR,
    MLPerf and optax put it inside, b ← μb + lr·r·u, θ ← θ − b, so each past step keeps the lr it was taken with.
    The two agree while lr is constant and differ as soon as a schedule moves it. :meth:`from_preset` picks the
    options of each code base (``torchlamb.LARS_PRESETS``, ``docs/presets.md``).

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
        lr_inside_momentum: put the learning rate inside the momentum buffer, b ← μb + lr·r·u, θ ← θ − b (the
            paper, SimCLR, MLPerf, optax), instead of θ ← θ − lr·b (torch-style SGD, the default). The buffer then
            holds lr-scaled steps; it is saved and resumed as it is.
        dampening: torch.optim.SGD's dampening: the buffer adds (1 − dampening)·s·u, except at a tensor's first
            step, which adds s·u undampened (as torch and timm do). In [0, 1]; Nesterov needs 0.
        larc_clip: the lr-relative clip of NVIDIA apex LARC's clip mode: r ← min(r / lr, 1) with the group's current
            lr, so the local rate lr·r never exceeds the global one; stays on the device with a tensor lr, and applies
            to adapting groups only. ``True`` clips every ratio, the fallback r = 1 included (timm's
            ``trust_clip``); ``"computed"`` only ratios computed from nonzero norms, as apex LARC does (a tensor that
            falls back keeps r = 1: with lr > 1 a zero-initialised tensor moves by lr·u, not by u).
        zero_fallback: which norm being 0 makes r = 1 (besides φ(‖θ‖)): ``"denominator"`` (default) or ``"grad"``,
            ‖g‖ (MLPerf, timm, apex LARC): with the split denominator, a tensor with an all-zero gradient then
            moves by its decay λθ at r = 1 rather than at r = η/λ.
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
        lr_inside_momentum: bool = False,
        dampening: float = 0.0,
        larc_clip: LarcClip = False,
        zero_fallback: ZeroFallback = "denominator",
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
                        trust_clip=trust_clip, trust_eps=trust_eps, lr_inside_momentum=lr_inside_momentum,
                        dampening=dampening, larc_clip=larc_clip, zero_fallback=zero_fallback,
                        max_grad_norm=max_grad_norm, adapt=adapt,
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
                             f"got {group['denominator']!r}{where(group_index)}")
        check_bool("lr_inside_momentum", group["lr_inside_momentum"], group_index=group_index)
        check_number("dampening", group["dampening"], low=0.0, high=1.0, group_index=group_index)
        if group["nesterov"] and group["dampening"] != 0:
            raise ValueError(f"nesterov=True requires dampening=0 (as torch.optim.SGD), got dampening="
                             f"{group['dampening']}{where(group_index)}")
        if not (isinstance(group["larc_clip"], bool) or group["larc_clip"] == "computed"):
            raise TypeError(f"larc_clip must be True, False or 'computed' (the ratios computed from norms only, as "
                            f"apex LARC), got {group['larc_clip']!r}{where(group_index)}")
        if group["zero_fallback"] not in ("denominator", "grad"):
            raise ValueError(f"zero_fallback must be 'denominator' (r = 1 when the ratio's denominator is 0) or "
                             f"'grad' (when ‖g‖ is 0), got {group['zero_fallback']!r}{where(group_index)}")

    def _new_state(self, param: Tensor, dtype: torch.dtype) -> dict[str, Tensor]:
        # A zero buffer gives b = r·u at the first step, the same as torch.optim.SGD's copy of the first update.
        return {"momentum_buffer": torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)}

    def _trust_options(self, group: dict[str, Any]) -> dict[str, Any]:
        return {**super()._trust_options(group), "trust_coefficient": group["trust_coefficient"],
                "larc_lr": group["lr"] if group["larc_clip"] else None,
                "larc_clips_fallback": group["larc_clip"] is True}

    def _update_norm(self, group: dict[str, Any], norms: Tensor) -> Tensor:
        if group["denominator"] == "split":
            denominator = norms[:, LARS_GRAD] + group["weight_decay"] * norms[:, WEIGHT]
        else:
            denominator = norms[:, LARS_DECAYED_GRAD]
        if group["zero_fallback"] == "grad":  # a 0 denominator makes trust_ratio fall back to r = 1
            denominator = torch.where(norms[:, LARS_GRAD] > 0, denominator, torch.zeros_like(denominator))
        return denominator

    @classmethod
    def from_preset(cls, name: str, params: Any, **overrides: Any) -> Lars:
        """A Lars whose default update is that of another LARS code base: ``name`` is a key of
        ``torchlamb.LARS_PRESETS`` (``docs/presets.md`` says which options each sets and why).

        ``overrides`` replace single options (``lr``, ``momentum``, ``weight_decay``, ...) and are checked as the
        constructor's arguments are. Presets whose code base exempts tensors by their number of dimensions
        (``barlow_twins``, ``pytorch_optimizer``) put those tensors of each group in a group of their own right after
        it, with ``weight_decay=0`` and ``adapt=False``.
        """
        options, exempt = preset_options(LARS_PRESETS, name)
        return cls(split_exempt(params, exempt), **{**options, **overrides})

    @staticmethod
    def _options(group: dict[str, Any]) -> dict[str, Any]:
        return dict(lr=group["lr"], momentum=group["momentum"], weight_decay=group["weight_decay"],
                    nesterov=group["nesterov"], split_denominator=group["denominator"] == "split",
                    lr_inside_momentum=group["lr_inside_momentum"], dampening=group["dampening"],
                    fallback_on_grad=group["zero_fallback"] == "grad", maximize=group["maximize"])


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


def _buffer_scales(ratio: Tensor, steps: list[Tensor], lr: float | Tensor, lr_inside_momentum: bool,
                   dampening: float, step_weight: Tensor | None) -> Tensor:
    """Per tensor, what multiplies u on its way into the buffer: s = r (or lr·r with the lr inside the momentum),
    times 1 − dampening after a tensor's first step (torch.optim.SGD adds the first step undampened), times the step
    weight. Nesterov has no dampening, so its d = s·u + μb may use the same s."""
    scale = ratio.to(steps[0].device) if steps else ratio
    if lr_inside_momentum:
        scale = scale * (lr.to(scale.device) if isinstance(lr, Tensor) else lr)
    if dampening != 0:
        first = torch.stack([step.to(scale.device) for step in steps]) == 1  # counted already: 1 at the first step
        # Full tensors of the scale's dtype: torch.where of two Python floats would round 1 − dampening to float32.
        scale = scale * torch.where(first, torch.ones_like(scale), torch.full_like(scale, 1.0 - dampening))
    if step_weight is not None:
        scale = scale * step_weight.to(scale.device)
    return scale


def _parameter_lr(lr: float | Tensor, lr_inside_momentum: bool, step_weight: Tensor | None) -> float | Tensor:
    """What multiplies d in θ ← θ − (·)·d: lr, or 1 with the lr inside the momentum; times the step weight (a
    skipped step moves nothing: b stays, and θ ← θ − 0·b)."""
    factor = 1.0 if lr_inside_momentum else lr
    return factor if step_weight is None else factor * step_weight


def _single_tensor_lars(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor],
                        steps: list[Tensor], *, lr: float | Tensor, momentum: float, weight_decay: float,
                        nesterov: bool, split_denominator: bool, lr_inside_momentum: bool, dampening: float,
                        fallback_on_grad: bool, maximize: bool, grad_factor: Tensor | None,
                        step_weight: Tensor | None = None) -> PendingUpdate:
    """LARS one tensor at a time, written as the math reads; the directions u wait for their ratios in a list.
    With a ``step_weight`` (see torchlamb._gradients), every change is weighted by it."""
    effective, updates = _directions(params, grads, steps, weight_decay, maximize, grad_factor, step_weight)

    def apply(ratio: Tensor) -> None:
        # Skipped: b ← 1·b + 0, θ ← θ − 0.
        buffer_factor = weighted(step_weight, momentum, 1.0)
        scales = _buffer_scales(ratio, steps, lr, lr_inside_momentum, dampening, step_weight)
        step_lr = _parameter_lr(lr, lr_inside_momentum, step_weight)
        for param, update, buffer, scale in zip(params, updates, momentum_buffers, scales.unbind(0)):
            scaled_update = update * scale.to(param.device)
            buffer.mul_(buffer_factor).add_(scaled_update)
            direction = scaled_update.add(buffer, alpha=momentum) if nesterov else buffer
            _subtract_scaled_([param], [direction], step_lr)

    return PendingUpdate(_squares(params, effective, updates, split_denominator, fallback_on_grad), apply)


def _quantized_lars(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]], steps: list[Tensor],
                    *, buffer: QuantizedKey, lr: float | Tensor, momentum: float, weight_decay: float,
                    nesterov: bool, split_denominator: bool, lr_inside_momentum: bool, dampening: float,
                    fallback_on_grad: bool, maximize: bool, grad_factor: Tensor | None,
                    step_weight: Tensor | None = None) -> PendingUpdate:
    """LARS with an 8-bit momentum buffer, one tensor at a time: b is dequantized, updated in float32 and stored,
    and θ moves by the buffer as stored (dequantized again), the one the next step continues from. A skipped step
    stores nothing and moves nothing."""
    effective, updates = _directions(params, grads, steps, weight_decay, maximize, grad_factor, step_weight)

    def apply(ratio: Tensor) -> None:
        scales = _buffer_scales(ratio, steps, lr, lr_inside_momentum, dampening, None)
        step_lr = _parameter_lr(lr, lr_inside_momentum, None)
        for param, update, state, scale in zip(params, updates, states, scales.unbind(0)):
            scaled_update = update.float() * scale.to(param.device, torch.float32)
            value = buffer.load(state).mul_(momentum).add_(scaled_update)
            buffer.save_(state, value, step_weight)
            value = buffer.load(state)
            direction = scaled_update.add(value, alpha=momentum) if nesterov else value
            if step_weight is not None:
                direction = direction * step_weight.to(param.device)  # the skipped step's update may hold NaN
            _subtract_scaled_([param], [direction.to(param.dtype)], step_lr)

    return PendingUpdate(_squares(params, effective, updates, split_denominator, fallback_on_grad), apply)


def _multi_tensor_lars(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor],
                       steps: list[Tensor], *, lr: float | Tensor, momentum: float, weight_decay: float,
                       nesterov: bool, split_denominator: bool, lr_inside_momentum: bool, dampening: float,
                       fallback_on_grad: bool, maximize: bool, grad_factor: Tensor | None,
                       step_weight: Tensor | None = None) -> PendingUpdate:
    """The same update with ``torch._foreach_*`` ops."""
    grads = zeroed_if_skipped(effective_grads(grads, maximize, grad_factor), step_weight)
    # A list of 0-dim tensors: the single-tensor overload of _foreach_add_ reads the value on the host.
    torch._foreach_add_(steps, 1 if step_weight is None else [step_weight] * len(steps))
    # A new list: p.grad itself is never modified.
    updates = torch._foreach_add(grads, params, alpha=weight_decay) if weight_decay != 0 else grads

    def apply(ratio: Tensor) -> None:
        scale = _buffer_scales(ratio.to(params[0].device), steps, lr, lr_inside_momentum, dampening, step_weight)
        scaled_updates = torch._foreach_mul(updates, list(scale.unbind(0)))
        torch._foreach_mul_(momentum_buffers, momentum if step_weight is None else  # skipped: b ← 1·b + 0
                            [weighted(step_weight, momentum, 1.0)] * len(momentum_buffers))
        torch._foreach_add_(momentum_buffers, scaled_updates)
        if nesterov:
            torch._foreach_add_(scaled_updates, momentum_buffers, alpha=momentum)
            directions = scaled_updates
        else:
            directions = momentum_buffers
        _subtract_scaled_(params, directions, _parameter_lr(lr, lr_inside_momentum, step_weight))

    return PendingUpdate(_squares(params, grads, updates, split_denominator, fallback_on_grad), apply)


def _squares(params: list[Tensor], grads: list[Tensor], updates: list[Tensor], split_denominator: bool,
             fallback_on_grad: bool) -> Tensor:
    """The [n, 3] float64 columns ‖θ‖², ‖g‖², ‖g + λθ‖² (torchlamb.trust's LARS columns); only the columns in use
    (the denominator's, and ‖g‖² for zero_fallback="grad") are computed, the others stay 0."""
    weight = sums_of_squares(params)
    zeros = torch.zeros_like(weight)
    grad = sums_of_squares(grads) if split_denominator or fallback_on_grad else zeros
    decayed = zeros if split_denominator else sums_of_squares(updates)
    columns = [None, None, None]
    columns[WEIGHT], columns[LARS_GRAD], columns[LARS_DECAYED_GRAD] = weight, grad, decayed
    return torch.stack(columns, 1)


def _subtract_scaled_(params: list[Tensor], directions: list[Tensor], lr: float | Tensor) -> None:
    """θ ← θ − lr·d. A float lr goes in as ``alpha``, which the kernel applies without rounding lr·d first."""
    if isinstance(lr, Tensor):
        torch._foreach_sub_(params, torch._foreach_mul(directions, lr))
    else:
        torch._foreach_add_(params, directions, alpha=-lr)


# (implementation, 8-bit state) -> the functions that compute a group's update (see torchlamb._dispatch).
Lars._PATHS = path_table("lars", _single_tensor_lars, _multi_tensor_lars, _quantized_lars, buffer=BUFFER_8BIT)
