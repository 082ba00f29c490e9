"""LAMB: Adam's direction, decoupled weight decay, then the layer-wise trust ratio (You et al., 2019).

This file holds the optimizer's options (the class and its checks), its state, its math — a single-tensor version
that reads like the paper, the 8-bit one, and a multi-tensor (``torch._foreach_*``) one — and its path table, which
adds the fused kernels (torchlamb.kernels) for each implementation and storage.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ._base import Adapt, LayerwiseOptimizer, NonFinite
from ._dispatch import path_table
from ._gradients import effective_grad, effective_grads, weighted, zeroed_if_skipped
from ._validation import check_bool, check_number, where
from .bias_correction import STEP_SIZE_MODES, BiasCorrection, moment_corrections, step_count, step_size_factor
from .presets import PRESETS, preset_options
from .quantized import QuantizedKey, sqrt_rn
from .trust import LAMB_UPDATE, ClipRange, PendingUpdate, cautious_update, squares_of

# The moments under state_dtype="8bit": m as signed codes, v as √v in unsigned codes (see torchlamb.quantized).
MOMENTS_8BIT = (QuantizedKey("exp_avg", "exp_avg"), QuantizedKey("exp_avg_sq", "exp_avg_sqrt", sqrt=True))


class Lamb(LayerwiseOptimizer):
    r"""Layer-wise Adaptive Moments for Batch training (LAMB), You et al. 2019, "Large Batch Optimization for
    Deep Learning: Training BERT in 76 minutes".

    For every parameter tensor :math:`\theta` (one "layer") with gradient :math:`g` at step :math:`t`:

    .. math::
        g &\leftarrow c \cdot g \quad (c = \min(1, \text{max\_grad\_norm} / \lVert g_{\text{all}} \rVert);
             \; -g \text{ if maximize}) \\
        m &\leftarrow \beta_1 m + (1 - \beta_1) g, \qquad v \leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
        \hat m &= m / (1 - \beta_1^t), \qquad \hat v = v / (1 - \beta_2^t)
             \quad \text{(only with bias\_correction)} \\
        a &= \hat m / (\sqrt{\hat v} + \epsilon) \\
        a &\leftarrow a \odot M / \max(\overline{M}, 10^{-3}), \quad M = \mathbb{1}[a \odot g > 0]
             \quad \text{(only with caution; } \overline{M} \text{ the mean over the whole tensor)} \\
        u &= a + \lambda \theta \\
        w &= \phi(\lVert\theta\rVert) = \text{clamp}(\lVert\theta\rVert, \text{weight\_norm\_clip}) \\
        r &= \eta_r \, w / (\lVert u \rVert + \text{trust\_eps}) \text{ if } w > 0 \text{ and } \lVert u \rVert > 0
             \text{ else } 1,
             \text{ then clamped to trust\_clip}; \; r = 1 \text{ if the group has adapt=False} \\
        \theta &\leftarrow \theta - \eta \, r \, u

    Weight decay :math:`\lambda` is decoupled (AdamW-style, not folded into :math:`g`) and sits inside
    :math:`u`, so the trust ratio divides by :math:`\lVert \hat m/(\sqrt{\hat v}+\epsilon) + \lambda\theta \rVert`
    as in the paper. :math:`\eta` is the learning rate, :math:`\eta_r` the ``trust_coefficient`` (1 by default).
    Two other places for the decay: ``decay_outside_ratio`` (before the norms:
    :math:`\theta \leftarrow \theta(1 - \eta_d\lambda)`, :math:`u = a`, with :math:`\eta_d = \eta`, or
    :math:`\eta^2/\eta_{\max}` with ``corrected_weight_decay``) and ``decay_after_step`` (after it:
    :math:`u = a`, the norms of :math:`\theta` before any decay, then
    :math:`\theta \leftarrow (\theta - \eta\, r\, u)(1 - \eta\lambda)`). Use :func:`torchlamb.param_groups` to
    exempt biases and normalisation parameters from both weight decay and the trust ratio.

    Args:
        params: parameters or parameter groups, as for any ``torch.optim`` optimizer. Groups accept every
            option below plus ``adapt``: whether the trust ratio applies to the group: True (default), False, or
            ``"if_decayed"`` (only when the group's ``weight_decay`` is not 0, as apex and timm do).
        lr: learning rate :math:`\eta` (a float or a one-element tensor), ``>= 0``.
        betas: :math:`(\beta_1, \beta_2)`, each in ``[0, 1)``.
        eps: :math:`\epsilon > 0`, added to :math:`\sqrt{\hat v}`.
        weight_decay: decoupled weight decay :math:`\lambda \ge 0`.
        bias_correction: True divides the moments by :math:`1 - \beta^t` (Adam's debiasing) inside :math:`u`.
            False uses raw moments. ``"step_size"`` leaves :math:`u = m/(\sqrt v+\epsilon)` uncorrected and
            multiplies the step by :math:`\sqrt{1-\beta_2^t}/(1-\beta_1^t)` outside the ratio (DeepSpeed);
            ``"step_size_first_moment"`` multiplies it by :math:`1/(1-\beta_1^t)` only (pytorch_optimizer).
        weight_norm_clip: ``(min, max)`` range for :math:`\phi(\lVert\theta\rVert)`, or None for the identity.
        trust_clip: ``(min, max)`` range for the ratio :math:`r` (Ben Mann's LAMB clips at 10: ``(0, 10)``), or None.
        trust_eps: added to :math:`\lVert u\rVert` in the ratio's denominator (pytorch_optimizer), default 0.
        decay_outside_ratio: apply weight decay as :math:`\theta \leftarrow \theta(1 - \eta\lambda)` before the
            norms instead of adding :math:`\lambda\theta` to :math:`u` (pytorch_optimizer's default; timm's
            ``decoupled_decay``).
        corrected_weight_decay: with ``decay_outside_ratio`` only (else ValueError): the decay factor is
            :math:`1 - \lambda\,\eta^2/\eta_{\max}` (timm's ``corrected_weight_decay``, arXiv 2506.02285), where
            :math:`\eta_{\max}` is the group's ``max_lr``: the constructor's ``lr`` as a float, kept in every group
            (and in ``state_dict``); a group may set its own. It must be > 0. A tensor lr is never read on the host.
        decay_after_step: weight decay after the step, as bitsandbytes' 32-bit LAMB kernel: :math:`u = a` (no
            :math:`\lambda\theta`), :math:`\lVert\theta\rVert` before any decay, then
            :math:`\theta \leftarrow (\theta - \eta\, r\, u)(1 - \eta\lambda)`. Not with ``decay_outside_ratio``.
        caution: cautious LAMB (timm's ``caution``; Liang et al., "Cautious Optimizers", arXiv 2411.16085): before
            the weight decay, :math:`a` (uncorrected, :math:`m/(\sqrt v+\epsilon)`, in the ``"step_size"`` modes) is
            masked by :math:`M = \mathbb{1}[a \odot g > 0]` (strict; :math:`g` the effective gradient the moments
            saw: clipped, unscaled, negated under ``maximize``) and divided by :math:`\max(\overline{M}, 10^{-3})`,
            the mask's mean over the whole tensor, also when it is sharded over processes.
        trust_coefficient: :math:`\eta_r > 0`, the ratio's numerator factor (bitsandbytes' ``max_unorm``; 1 as in
            the paper).
        max_grad_norm: if set, gradients are scaled by :math:`\min(1, \text{max\_grad\_norm}/\lVert g\rVert)`,
            :math:`\lVert g\rVert` the L2 norm of all the optimizer's gradients together, before the moments.
            ``p.grad`` is left untouched.
        adapt: the default of every group's ``adapt`` (see ``params``).
        maximize: maximize the objective instead of minimizing it.
        foreach: use the multi-tensor (``torch._foreach_*``) implementation; False: a Python loop over tensors.
        fused: use the fused two-pass kernels: C++ on the CPU (``torchlamb.kernels.cpu``: compiled at first use,
            about 30 s, and cached across processes), Triton on CUDA (``torchlamb.kernels.triton_steps``; needs
            triton, else fused=True raises). With ``fused`` and ``foreach`` both None (the default) the fused
            kernels run wherever they apply — dense contiguous CPU tensors, dense float32/bfloat16/float16 CUDA
            tensors where triton imports — and foreach elsewhere. Where the CPU kernels cannot be built, one
            warning says so and foreach runs.
        master_weights: for float16/bfloat16 parameters, keep a float32 master copy and float32 moments in the
            state (saved by ``state_dict``, restored exactly by ``load_state_dict``); the update runs on the master
            and the parameter is written from it, rounded. Without it the update runs in the parameter's dtype.
        state_dtype: the dtype the moments are stored in (e.g. ``torch.bfloat16`` to halve their memory); the
            update still computes in the parameter's (or master's) dtype. None: that dtype. The fused kernels
            read and write bfloat16/float16 moments of float32 tensors in place and compute u from the moments as
            stored; the other paths compute u in float32 and store the moments rounded (one rounding apart).
            ``"8bit"``: block-wise 8-bit moments (:mod:`torchlamb.quantized`; a quarter of float32's memory) for
            tensors of two or more dimensions and at least 4096 elements, float for the others; under FSDP2 each
            process keeps those of its rows. The state then holds ``exp_avg_codes``/``exp_avg_absmax`` and, for
            √v, ``exp_avg_sqrt_codes``/``exp_avg_sqrt_absmax``; u and its norm are computed from the moments as
            stored, so the trust ratio is that of the update applied.
        partition_group: under ``torch.distributed.optim.ZeroRedundancyOptimizer``, whose optimizer on each process
            holds a disjoint share of the model's tensors: the process group, so that ``max_grad_norm`` clips the
            norm of all the model's gradients, not of this share. Not needed for DDP or FSDP2 (whose sharded
            DTensor parameters are handled by themselves: see :mod:`torchlamb.distributed`).
        nonfinite: ``"propagate"`` (default, as torch's optimizers): NaN/Inf gradients flow into the update.
            ``"skip"``: a step in which any gradient holds NaN or Inf changes nothing — parameters, moments and
            step counts stay as they were; decided on the device, without a host synchronisation.

    With ``torch.amp.GradScaler``, ``scaler.step(optimizer)`` hands the loss scale and the overflow flag to
    :meth:`~torchlamb._base.LayerwiseOptimizer.step`, which unscales the gradients itself and, after an overflow,
    changes nothing (no host sync). Calling ``scaler.unscale_(optimizer)`` first (e.g. to clip by hand) works too.

    After each step, :attr:`~torchlamb._base.LayerwiseOptimizer.trust_stats` holds the per-tensor ‖θ‖, ‖u‖ and ratio
    as device tensors.
    :meth:`from_preset` reproduces the default update of other LAMB libraries (``torchlamb.PRESETS``).

    8-bit state here keeps a true trust ratio, computed from the moments as stored. bitsandbytes' ``LAMB8bit``
    (0.50.x) applies none on tensors of 4096 or more elements: its block-wise 8-bit kernel has no trust ratio or
    update-norm clip at all (it runs 8-bit AdamW on the CPU backends; see docs/preset-sources).
    """

    _state_keys = ("exp_avg", "exp_avg_sq")
    _quantized = MOMENTS_8BIT

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        *,
        bias_correction: BiasCorrection = True,
        weight_norm_clip: ClipRange | None = None,
        trust_clip: ClipRange | None = None,
        trust_eps: float = 0.0,
        decay_outside_ratio: bool = False,
        corrected_weight_decay: bool = False,
        decay_after_step: bool = False,
        caution: bool = False,
        trust_coefficient: float = 1.0,
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
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
                        weight_norm_clip=weight_norm_clip, trust_clip=trust_clip, trust_eps=trust_eps,
                        decay_outside_ratio=decay_outside_ratio, corrected_weight_decay=corrected_weight_decay,
                        max_lr=_max_lr_snapshot(lr), decay_after_step=decay_after_step, caution=caution,
                        trust_coefficient=trust_coefficient, max_grad_norm=max_grad_norm, adapt=adapt,
                        maximize=maximize, foreach=foreach, fused=fused,
                        master_weights=master_weights, state_dtype=state_dtype)
        super().__init__(params, defaults, partition_group, nonfinite)

    @classmethod
    def from_preset(cls, name: str, params: Any, **overrides: Any) -> Lamb:
        """A Lamb whose default update is that of another library: ``name`` is a key of ``torchlamb.PRESETS``.

        ``overrides`` replace single options (e.g. ``lr``, ``weight_decay``); see ``docs/presets.md``.
        """
        options, _ = preset_options(PRESETS, name)
        return cls(params, **{**options, **overrides})

    def _validate_group(self, group: dict[str, Any], group_index: int | None) -> None:
        super()._validate_group(group, group_index)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        for i, beta in enumerate(betas):
            check_number(f"betas[{i}]", beta, low=0.0, high=1.0, high_open=True, group_index=group_index)
        check_number("eps", group["eps"], low=0.0, low_open=True, group_index=group_index)
        if not (isinstance(group["bias_correction"], bool) or group["bias_correction"] in STEP_SIZE_MODES):
            raise TypeError(f"bias_correction must be True, False, 'step_size' or 'step_size_first_moment', "
                            f"got {group['bias_correction']!r}")
        check_bool("decay_outside_ratio", group["decay_outside_ratio"], group_index=group_index)
        for name in ("corrected_weight_decay", "decay_after_step", "caution"):
            check_bool(name, group[name], group_index=group_index)
        check_number("trust_coefficient", group["trust_coefficient"], low=0.0, low_open=True,
                     group_index=group_index)
        corrected = group["corrected_weight_decay"]
        if isinstance(group["max_lr"], Tensor):
            raise TypeError(f"max_lr must be a float (the peak lr corrected_weight_decay divides by), got a Tensor"
                            f"{where(group_index)}")
        check_number("max_lr", group["max_lr"], low=0.0, low_open=corrected, group_index=group_index)
        if corrected and not group["decay_outside_ratio"]:
            raise ValueError(f"corrected_weight_decay=True needs decay_outside_ratio=True (timm: only with "
                             f"decoupled_decay){where(group_index)}")
        if group["decay_after_step"] and group["decay_outside_ratio"]:
            raise ValueError(f"decay_after_step and decay_outside_ratio cannot both be True: the decay goes before "
                             f"the norms or after the step{where(group_index)}")

    def _new_state(self, param: Tensor, dtype: torch.dtype) -> dict[str, Tensor]:
        return {
            "exp_avg": torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format),
        }

    def _update_norm(self, group: dict[str, Any], norms: Tensor) -> Tensor:
        return norms[:, LAMB_UPDATE]  # ‖u‖

    def _trust_options(self, group: dict[str, Any]) -> dict[str, Any]:
        return {**super()._trust_options(group), "trust_coefficient": group["trust_coefficient"]}

    @staticmethod
    def _options(group: dict[str, Any]) -> dict[str, Any]:
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        # The lr of the weight decay: lr, or lr²/max_lr (corrected; a tensor lr stays a device tensor).
        decay_lr = lr * lr / group["max_lr"] if group["corrected_weight_decay"] else lr
        return dict(lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                    bias_correction=group["bias_correction"], decay_outside_ratio=group["decay_outside_ratio"],
                    maximize=group["maximize"], caution=group["caution"], decay_after_step=group["decay_after_step"],
                    decay_lr=decay_lr)


def _max_lr_snapshot(lr: Any) -> Any:
    """The constructor's lr as a float (timm's max_lr_snapshot: a tensor lr changed in place later does not change
    it); anything that is not one number is left for the lr check to refuse."""
    if isinstance(lr, Tensor) and lr.numel() == 1 and not lr.is_complex():
        return float(lr.detach().cpu())
    if isinstance(lr, (int, float)) and not isinstance(lr, bool):
        return float(lr)
    return 0.0


def _per_tensor(values: Tensor, tensors: list[Tensor]) -> list[Tensor]:
    """``values[i]`` as a 0-dim tensor of ``tensors[i]``'s dtype. Dividing a 0-dim float32 tensor (a scalar
    parameter's moment) by a float64 0-dim correction would give a float64 update, and float64 norms for the group."""
    by_dtype = {dtype: values.to(dtype) for dtype in {t.dtype for t in tensors}}
    return [by_dtype[t.dtype][i] for i, t in enumerate(tensors)]


def _single_tensor_lamb(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                        exp_avg_sqs: list[Tensor], steps: list[Tensor], *, lr: float | Tensor, beta1: float,
                        beta2: float, eps: float, weight_decay: float, bias_correction: BiasCorrection,
                        decay_outside_ratio: bool, maximize: bool, grad_factor: Tensor | None,
                        step_weight: Tensor | None = None, caution: bool = False, decay_after_step: bool = False,
                        decay_lr: float | Tensor | None = None) -> PendingUpdate:
    """LAMB one tensor at a time, written as the math reads; the updates u wait for their ratios in a list.
    With a ``step_weight`` (see torchlamb._gradients), every change is weighted by it."""
    weight1, weight2 = weighted(step_weight, 1 - beta1, 0.0), weighted(step_weight, 1 - beta2, 0.0)
    decay_lr = lr if decay_lr is None else decay_lr
    decay_factor = weighted(step_weight, 1 - decay_lr * weight_decay, 1.0) if decay_outside_ratio else 1.0
    decay_inside = weight_decay != 0 and not decay_outside_ratio and not decay_after_step
    updates, masks = [], []
    for param, grad, exp_avg, exp_avg_sq, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        grad = zeroed_if_skipped([effective_grad(grad, maximize, grad_factor)], step_weight)[0]
        step += 1 if step_weight is None else step_weight
        if decay_outside_ratio and weight_decay != 0:
            param.mul_(decay_factor)
        exp_avg.lerp_(grad, weight1)
        if step_weight is None:
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        else:  # v + (1−β2)·(g² − v): v itself when the weight is 0
            exp_avg_sq.lerp_(grad * grad, weight2)
        m_hat, v_hat = exp_avg, exp_avg_sq
        if bias_correction is True:
            # corrections in float64, then in the tensor's dtype (see _per_tensor)
            correction1, correction2 = moment_corrections(beta1, beta2, step_count(step))
            m_hat = exp_avg / correction1.to(param.dtype)
            v_hat = exp_avg_sq / correction2.to(param.dtype)
        update = m_hat / (v_hat.sqrt() + eps)
        if caution:  # a⊙M; its factor k and λθ wait for the whole tensor's mask count (see _awaiting_ratios)
            masks.append(update * grad > 0)
            update = update * masks[-1]
        elif decay_inside:
            update = update.add(param, alpha=weight_decay)
        updates.append(update)
    return _awaiting_ratios(params, updates, steps, lr, beta1, beta2, bias_correction, step_weight,
                            _after_step(decay_after_step, decay_lr, weight_decay, step_weight),
                            masks if caution else None, weight_decay if decay_inside else 0.0)


def _after_step(decay_after_step: bool, decay_lr: float | Tensor, weight_decay: float,
                step_weight: Tensor | None) -> float | Tensor | None:
    """The factor 1 − lr·λ θ is multiplied by after the step (decay_after_step), or None."""
    if not decay_after_step or weight_decay == 0:
        return None
    return weighted(step_weight, 1 - decay_lr * weight_decay, 1.0)


def _awaiting_ratios(params: list[Tensor], updates: list[Tensor], steps: list[Tensor], lr: float | Tensor,
                     beta1: float, beta2: float, bias_correction: BiasCorrection, step_weight: Tensor | None,
                     after: float | Tensor | None = None, masks: list[Tensor] | None = None,
                     decay: float = 0.0) -> PendingUpdate:
    """The PendingUpdate of updates u computed one tensor at a time: ‖θ‖², ‖u‖², and θ ← θ − lr·r·u to apply (then
    θ ← θ·after, decay after the step). With caution's ``masks``, ``updates`` hold a⊙M: u = k·(a⊙M) + decay·θ is
    completed in apply, k from the whole tensor's mask count (torchlamb.trust.cautious_update)."""
    def apply(ratio: Tensor, caution_scales: Tensor | None = None) -> None:
        for i, (param, update, step, r) in enumerate(zip(params, updates, steps, ratio.unbind(0))):
            scale = r.to(param.device) * -lr
            factor = step_size_factor(bias_correction, beta1, beta2, step)
            if factor is not None:
                scale = scale * factor
            if step_weight is not None:
                scale = scale * step_weight.to(param.device)
            if caution_scales is not None:
                update = update * caution_scales[i].to(param.device, update.dtype)
                if decay != 0:
                    update = update.add(param, alpha=decay)
            param.add_(update * scale)
            if after is not None:
                param.mul_(after)

    if masks is None:
        return PendingUpdate(squares_of(params, updates), apply)
    return cautious_update(_caution_columns(params, updates, masks), apply, decay)


def _caution_columns(params: list[Tensor], masked: list[Tensor], masks: list[Tensor]) -> Tensor:
    """This process's float64 sums of a cautious update (torchlamb.trust's LAMB_MASK_COUNT etc.): ‖θ‖², ‖a⊙M‖²,
    Σ M, Σ (a⊙M)·θ and the number of elements, per tensor."""
    device = params[0].device
    counts = torch.stack([m.sum(dtype=torch.float64).to(device) for m in masks])
    cross = torch.stack([(a.double() * p.double()).sum().to(device) for a, p in zip(masked, params)])
    numels = torch.stack([torch.full((), float(p.numel()), dtype=torch.float64, device=device) for p in params])
    return torch.cat([squares_of(params, masked), torch.stack([counts, cross, numels], 1)], 1)


def _quantized_lamb(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]],
                    steps: list[Tensor], *, moments: tuple[QuantizedKey, QuantizedKey], lr: float | Tensor,
                    beta1: float, beta2: float, eps: float, weight_decay: float, bias_correction: BiasCorrection,
                    decay_outside_ratio: bool, maximize: bool, grad_factor: Tensor | None,
                    step_weight: Tensor | None = None, caution: bool = False, decay_after_step: bool = False,
                    decay_lr: float | Tensor | None = None) -> PendingUpdate:
    """LAMB with 8-bit moments, one tensor at a time: m and s = √v are dequantized, updated in float32
    (v = s², then s = √v) and stored; u is then computed from the moments *as stored*, dequantized again, so that
    ‖u‖ — hence the trust ratio — is that of the update the parameter receives. A skipped step stores nothing."""
    first, second = moments
    weight1, weight2 = weighted(step_weight, 1 - beta1, 0.0), weighted(step_weight, 1 - beta2, 0.0)
    decay_lr = lr if decay_lr is None else decay_lr
    decay_factor = weighted(step_weight, 1 - decay_lr * weight_decay, 1.0) if decay_outside_ratio else 1.0
    decay_inside = weight_decay != 0 and not decay_outside_ratio and not decay_after_step
    updates, masks = [], []
    for param, grad, state, step in zip(params, grads, states, steps):
        grad = zeroed_if_skipped([effective_grad(grad, maximize, grad_factor)], step_weight)[0].float()
        step += 1 if step_weight is None else step_weight
        if decay_outside_ratio and weight_decay != 0:
            param.mul_(decay_factor)
        exp_avg = first.load(state).lerp_(grad, weight1)
        exp_avg_sq = second.load(state).square_().lerp_(grad * grad, weight2)
        first.save_(state, exp_avg, step_weight)
        second.save_(state, sqrt_rn(exp_avg_sq), step_weight)
        exp_avg, root = first.load(state), second.load(state)
        if bias_correction is True:
            correction1, correction2 = moment_corrections(beta1, beta2, step_count(step))
            exp_avg = exp_avg / correction1.float()
            root = root / correction2.sqrt().float()
        update = exp_avg / (root + eps)
        if caution:
            masks.append(update * grad > 0)
            update = update * masks[-1]
        elif decay_inside:
            update = update.add(param, alpha=weight_decay)
        updates.append(update)
    return _awaiting_ratios(params, updates, steps, lr, beta1, beta2, bias_correction, step_weight,
                            _after_step(decay_after_step, decay_lr, weight_decay, step_weight),
                            masks if caution else None, weight_decay if decay_inside else 0.0)


def _multi_tensor_lamb(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                       exp_avg_sqs: list[Tensor], steps: list[Tensor], *, lr: float | Tensor, beta1: float,
                       beta2: float, eps: float, weight_decay: float, bias_correction: BiasCorrection,
                       decay_outside_ratio: bool, maximize: bool, grad_factor: Tensor | None,
                       step_weight: Tensor | None = None, caution: bool = False, decay_after_step: bool = False,
                       decay_lr: float | Tensor | None = None) -> PendingUpdate:
    """The same update with ``torch._foreach_*`` ops: a few kernels for all tensors instead of a Python loop."""
    grads = zeroed_if_skipped(effective_grads(grads, maximize, grad_factor), step_weight)
    decay_lr = lr if decay_lr is None else decay_lr
    decay_inside = weight_decay != 0 and not decay_outside_ratio and not decay_after_step
    if step_weight is None:
        torch._foreach_add_(steps, 1)
        if decay_outside_ratio and weight_decay != 0:
            torch._foreach_mul_(params, 1 - decay_lr * weight_decay)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    else:
        # Weighted, with lists of 0-dim tensors: the single-tensor overloads of _foreach_add_ and _foreach_lerp_
        # read the value on the host.
        n = len(params)
        torch._foreach_add_(steps, [step_weight] * n)
        if decay_outside_ratio and weight_decay != 0:
            torch._foreach_mul_(params, [weighted(step_weight, 1 - decay_lr * weight_decay, 1.0)] * n)
        torch._foreach_lerp_(exp_avgs, grads, [weighted(step_weight, 1 - beta1, 0.0)] * n)
        # v + (1−β2)·(g² − v): v itself when the weight is 0
        torch._foreach_lerp_(exp_avg_sqs, torch._foreach_mul(grads, grads),
                             [weighted(step_weight, 1 - beta2, 0.0)] * n)

    denom = torch._foreach_sqrt(exp_avg_sqs)
    if bias_correction is True:
        # m̂/(√v̂+ε) = (m/(1−β1^t)) / (√v/√(1−β2^t) + ε), with each tensor's own t kept on the device. The
        # corrections of all tensors are one vector op rather than a handful of tiny ops per tensor.
        correction1, correction2 = moment_corrections(beta1, beta2, step_count(torch.stack(steps)))
        torch._foreach_div_(denom, _per_tensor(correction2.sqrt(), params))
        torch._foreach_add_(denom, eps)
        updates = torch._foreach_div(exp_avgs, _per_tensor(correction1, params))
        torch._foreach_div_(updates, denom)
    else:
        torch._foreach_add_(denom, eps)
        updates = torch._foreach_div(exp_avgs, denom)
    del denom
    masks = None
    if caution:  # a⊙M; its factor k and λθ wait for the whole tensor's mask count
        masks = [update * grad > 0 for update, grad in zip(updates, grads)]
        torch._foreach_mul_(updates, [mask.to(update.dtype) for mask, update in zip(masks, updates)])
    elif decay_inside:
        torch._foreach_add_(updates, params, alpha=weight_decay)
    after = _after_step(decay_after_step, decay_lr, weight_decay, step_weight)
    decay = weight_decay if decay_inside else 0.0

    def apply(ratio: Tensor, caution_scales: Tensor | None = None) -> None:
        scale = ratio.to(params[0].device) * -lr
        factor = step_size_factor(bias_correction, beta1, beta2, torch.stack(steps))
        if factor is not None:
            scale = scale * factor
        if step_weight is not None:
            scale = scale * step_weight.to(scale.device)
        if caution_scales is not None:
            torch._foreach_mul_(updates, _per_tensor(caution_scales.to(params[0].device), params))
            if decay != 0:
                torch._foreach_add_(updates, params, alpha=decay)
        torch._foreach_mul_(updates, list(scale.unbind(0)))
        torch._foreach_add_(params, updates)
        if after is not None:
            torch._foreach_mul_(params, [after] * len(params) if isinstance(after, Tensor) else after)

    if masks is None:
        return PendingUpdate(squares_of(params, updates), apply)
    return cautious_update(_caution_columns(params, updates, masks), apply, decay)


# (implementation, 8-bit state) -> the functions that compute a group's update (see torchlamb._dispatch).
Lamb._PATHS = path_table("lamb", _single_tensor_lamb, _multi_tensor_lamb, _quantized_lamb, moments=MOMENTS_8BIT)
