"""The trust stage: layer-wise adaptation shared by every optimizer in torchlamb.

An optimizer computes a *direction* ``u`` for each parameter tensor ``θ`` (Adam's moments for LAMB, momentum
for LARS). The trust stage turns the two per-tensor norms into a scale for that direction::

    w = φ(‖θ‖)           φ = identity, clamped to ``weight_norm_clip = (φ_min, φ_max)`` when given
    r = η · w / (‖u‖ + ε_r)   if w > 0 and ‖u‖ > 0, else 1    (η = ``trust_coefficient``, 1 by default for LAMB;
                                                              ε_r = ``trust_eps``, 0 unless a preset needs it)
    r ← clamp(r, *trust_clip)                                  when ``trust_clip = (r_min, r_max)`` is given
    r ← min(r / lr, 1)                                         LARS with ``larc_clip`` (apex LARC's clip mode)
    r ← 1                                                      when the group has ``adapt=False``

and the optimizer applies ``θ ← θ − lr · r · u``. Simplified LAMBs written with an RMS norm ("pomero": power,
mean, square root) call ``w`` ``pom1`` and ``‖u‖`` ``pom2``; the √n factors of the RMS cancel in the ratio. Ben
Mann's "An intuitive understanding of the LAMB optimizer" (2019) calls them ``r1`` and ``r2``, and ``r`` the trust
ratio. A "layer" is one parameter tensor.

Everything here works on device tensors and never reads a value back to the host, so an optimizer step that
uses it issues no host-device synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

ClipRange = tuple[float, float]

def norm_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """The dtype of the per-tensor norms and ratios of ``tensors``: float64 if any is float64 (or complex128), else
    float32 — norms are accumulated in at least float32, as a bfloat16 sum of squares loses most digits."""
    return torch.float64 if {t.dtype for t in tensors} & {torch.float64, torch.complex128} else torch.float32


# Rows of this many elements are the partial sums of a norm: short enough that float32 accumulation stays exact to
# about 1e-7 within a row, long enough that the row norms are a small temporary (1/1024 of the tensor).
_ROW = 1024


def _partial_norms(tensor: Tensor) -> Tensor:
    """The L2 norms of consecutive pieces of ``tensor`` (rows of ``_ROW`` elements, or its last dimension when it is
    not contiguous, which needs no copy), accumulated in the tensor's dtype, at least float32, as a 1-D tensor.
    Σ over the pieces of their squares is ‖tensor‖²."""
    dtype = torch.float64 if tensor.dtype in (torch.float64, torch.complex128) else torch.float32
    if tensor.ndim >= 2 and not tensor.is_contiguous():
        return torch.linalg.vector_norm(tensor, 2, dim=-1, dtype=dtype).reshape(-1)
    flat = tensor.reshape(-1)  # a view: the tensor is contiguous or has at most one dimension
    whole = flat.numel() - flat.numel() % _ROW
    tail = torch.linalg.vector_norm(flat[whole:], 2, dtype=dtype).reshape(1)
    if whole == 0:
        return tail
    rows = torch.linalg.vector_norm(flat[:whole].unfold(0, _ROW, _ROW), 2, dim=1, dtype=dtype)
    return torch.cat([rows, tail])


def sums_of_squares(tensors: Sequence[Tensor]) -> Tensor:
    """Return ``‖x‖²`` of each tensor as one 1-D float64 tensor on the first tensor's device.

    torch's CPU ``vector_norm`` and ``_foreach_norm`` accumulate a float32 tensor in float32: on a 3072×768 update
    of entries ≈ ±1 that is 7e-4 relative off. Here partial norms over short rows (see ``_partial_norms``) are
    squared and summed in float64, which is as exact as a float64 accumulation without a float64 copy of the tensor.
    An empty tensor gives 0.
    """
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    partials = [_partial_norms(t) for t in tensors]
    device = tensors[0].device
    return torch.stack([n.to(device) for n in torch._foreach_norm(partials, 2, dtype=torch.float64)]).square()


def tensor_norms(tensors: Sequence[Tensor]) -> Tensor:
    """Return the L2 norm ``‖x‖`` of each tensor as one 1-D tensor (float32, or float64 for float64 input),
    accumulated as exactly as :func:`sums_of_squares`. The result lives on the first tensor's device."""
    return sums_of_squares(tensors).sqrt().to(norm_dtype(tensors))


def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """Return ``sqrt(Σ_i ‖x_i‖²)``, the L2 norm of all tensors taken together, as a 0-dim tensor (float32, or
    float64 for float64 input). Tensors may live on several devices; the result lives on the first tensor's."""
    return squared_norm(tensors, device=tensors[0].device).sqrt().to(norm_dtype(tensors))


def squared_norm(tensors: Sequence[Tensor], *, device: torch.device) -> Tensor:
    """Return ``Σ_i ‖x_i‖²`` as a 0-dim float64 tensor on ``device`` (0 for no tensors)."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    for ts in by_device.values():
        total = total + sums_of_squares(ts).sum().to(device)
    return total


def clip_factor(total_norm: Tensor, max_norm: float | None) -> Tensor | None:
    """Return the factor ``min(1, max_norm / total_norm)`` that scales gradients down to ``max_norm``.

    ``None`` means no clipping. Computed with ``torch.where`` so that it never syncs with the host.
    """
    if max_norm is None:
        return None
    return torch.where(total_norm > max_norm, max_norm / total_norm, torch.ones_like(total_norm))


def trust_ratio(
    weight_norm: Tensor,
    update_norm: Tensor,
    *,
    adapt: bool = True,
    weight_norm_clip: ClipRange | None = None,
    trust_clip: ClipRange | None = None,
    trust_coefficient: float = 1.0,
    trust_eps: float = 0.0,
    larc_lr: float | Tensor | None = None,
    larc_clips_fallback: bool = True,
) -> Tensor:
    """Return the trust ratio ``r`` for tensors whose norms are ``weight_norm`` (‖θ‖) and ``update_norm`` (‖u‖).

    Works element-wise on any shape (one element per parameter tensor). See the module docstring for the math;
    the zero-norm fallback keeps ``r = 1`` for a zero-initialised tensor or an all-zero update, never NaN.
    ``larc_lr``: the learning rate of apex LARC's clip, r ← min(r / lr, 1) (1 where lr is 0), read on the device;
    applied to the fallback r = 1 too unless ``larc_clips_fallback`` is False (as apex, unlike timm).
    """
    if not adapt:
        return torch.ones_like(weight_norm)
    weight = weight_norm if weight_norm_clip is None else weight_norm.clamp(*weight_norm_clip)
    both_positive = (weight > 0) & (update_norm > 0)
    # Divide by a safe denominator so the branch torch.where discards holds no inf/NaN either.
    safe_update_norm = torch.where(both_positive, update_norm, torch.ones_like(update_norm))
    ratio = torch.where(both_positive, trust_coefficient * weight / (safe_update_norm + trust_eps),
                        torch.ones_like(weight))
    if trust_clip is not None:
        ratio = ratio.clamp(*trust_clip)
    if larc_lr is not None:
        lr = larc_lr.to(ratio.device, ratio.dtype) if isinstance(larc_lr, Tensor) else larc_lr
        clipped = torch.where(ratio < lr, ratio / lr, torch.ones_like(ratio))  # min(r/lr, 1), and 1 at lr = 0
        ratio = clipped if larc_clips_fallback else torch.where(both_positive, clipped, ratio)
    return ratio


@dataclass
class TrustStats:
    """What the trust stage saw for one parameter group in the last step, as device tensors (no host sync).

    ``params[i]`` was updated with ``weight_norm[i]`` (‖θ‖ before the step), ``update_norm[i]`` (‖u‖) and
    ``trust_ratio[i]`` (r). Read these every N steps for telemetry; reading them forces a sync, holding them does
    not. They are not part of the optimizer's ``state_dict``.
    """

    params: list[Tensor]
    weight_norm: Tensor
    update_norm: Tensor
    trust_ratio: Tensor


# The columns of a PendingUpdate's sums of squares: what each direction reports for its ratio. Column 0 is ‖θ‖² for
# every direction; the kernels (C++ and Triton) write the same columns in the same places.
WEIGHT = 0
LAMB_UPDATE = 1  # LAMB: ‖u‖², u = m̂/(√v̂ + ε) + λθ
LARS_GRAD, LARS_DECAYED_GRAD = 1, 2  # LARS: ‖g‖² (the split denominator ‖g‖ + λ‖θ‖) and ‖g + λθ‖² (the combined)
# LAMB with caution (see cautious_update): LAMB_UPDATE holds ‖a⊙M‖² instead, and three more columns follow, all of
# them sums over the tensor's elements, so that sharded tensors' are summed by the same all-reduce: Σ M (the mask's
# count), Σ (a⊙M)·θ, and the number of elements.
LAMB_MASK_COUNT, LAMB_MASKED_CROSS, LAMB_NUMEL = 2, 3, 4


@dataclass
class PendingUpdate:
    """A group's update computed up to the trust stage, waiting for its ratios.

    ``squares[i]``: this process's float64 sums of squares for tensor i, in the columns above (``WEIGHT`` first).
    ``apply(ratio)`` completes the update with the per-tensor trust ratios (pass 2 of the fused kernels).
    """

    squares: Tensor
    apply: Callable[[Tensor], None]
    # For an update whose norm needs the whole tensor's sums themselves (LAMB's caution): called by the trust stage
    # with them (after the all-reduce), returns the [n, 2] ‖θ‖², ‖u‖² the ratio is computed from. None: the squares
    # are those already.
    complete: Callable[[Tensor], Tensor] | None = None


def squares_of(*columns: Sequence[Tensor]) -> Tensor:
    """The float64 [n, k] sums of squares of a PendingUpdate: column j holds ‖x‖² of each tensor of ``columns[j]``."""
    return torch.stack([sums_of_squares(column) for column in columns], 1)


def trust_stage(pending: PendingUpdate, squares: Tensor, params: list[Tensor],
                update_norm: Callable[[Tensor], Tensor], trust_options: dict[str, Any]) -> TrustStats:
    """Turn a group's whole-tensor sums of squares (``squares``: its pending update's, summed over the processes a
    tensor is sharded over) into trust ratios, apply the update, and return what the stage saw. ``update_norm``
    reads the ratio's denominator from the norms (the square roots of the columns)."""
    if pending.complete is not None:
        squares = pending.complete(squares)
    norms = squares.sqrt().to(norm_dtype(params))
    weight_norm, denominator = norms[:, WEIGHT], update_norm(norms)
    ratio = trust_ratio(weight_norm, denominator, **trust_options)
    pending.apply(ratio)
    return TrustStats(params, weight_norm, denominator, ratio)


# The least mean of a caution mask that the update is divided by (timm's clamp, arXiv 2411.16085).
CAUTION_FLOOR = 1e-3


def caution_scale(count: Tensor, numel: Tensor) -> Tensor:
    """``1 / max(count / numel, 1e-3)``: the factor a cautious direction a⊙M is multiplied by, per tensor, from the
    whole tensor's mask count and size (float64); 1 for an empty tensor."""
    mean = torch.where(numel > 0, count / numel.clamp(min=1), torch.ones_like(count))
    return 1 / mean.clamp(min=CAUTION_FLOOR)


def cautious_squares(squares: Tensor, decay: float) -> tuple[Tensor, Tensor]:
    """From the whole-tensor columns of a cautious LAMB update (``LAMB_MASK_COUNT`` etc. above): ([n, 2] ‖θ‖², ‖u‖²,
    the factor k per tensor) for u = k·(a⊙M) + decay·θ, ‖u‖² = k²‖a⊙M‖² + 2k·decay·Σ(a⊙M)·θ + decay²‖θ‖² (float64,
    each sum exact to float64 rounding; never below 0)."""
    scale = caution_scale(squares[:, LAMB_MASK_COUNT], squares[:, LAMB_NUMEL])
    update = scale.square() * squares[:, LAMB_UPDATE]
    if decay != 0:
        update = update + 2 * decay * scale * squares[:, LAMB_MASKED_CROSS] + decay**2 * squares[:, WEIGHT]
    return torch.stack([squares[:, WEIGHT], update.clamp(min=0)], 1), scale


def cautious_update(squares: Tensor, apply: Callable[[Tensor, Tensor], None], decay: float) -> PendingUpdate:
    """The PendingUpdate of a cautious LAMB update: ``squares`` in the columns above (this process's sums),
    ``apply(ratio, scale)`` completes it with the ratios and the factors k of :func:`cautious_squares`, which the trust
    stage finds from the whole-tensor sums first."""
    held: list[Tensor] = []

    def complete(whole: Tensor) -> Tensor:
        assembled, scale = cautious_squares(whole, decay)
        held[:] = [scale]
        return assembled

    return PendingUpdate(squares, lambda ratio: apply(ratio, held[0]), complete)
