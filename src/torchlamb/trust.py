"""The trust stage: layer-wise adaptation shared by every optimizer in torchlamb.

An optimizer computes a *direction* ``u`` for each parameter tensor ``θ`` (Adam's moments for LAMB, momentum
for LARS). The trust stage turns the two per-tensor norms into a scale for that direction:

    w = φ(‖θ‖)           φ = identity, clamped to ``weight_norm_clip = (φ_min, φ_max)`` when given
    r = η · w / (‖u‖ + ε_r)   if w > 0 and ‖u‖ > 0, else 1    (η = ``trust_coefficient``, 1 for LAMB;
                                                              ε_r = ``trust_eps``, 0 unless a preset needs it)
    r ← clamp(r, *trust_clip)                                  when ``trust_clip = (r_min, r_max)`` is given
    r ← 1                                                      when the group has ``adapt=False``

and the optimizer applies ``θ ← θ − lr · r · u``. In seed 000's words ``w`` is ``pom1`` and ``‖u‖`` is
``pom2`` (there with the RMS "pomero" norm, whose √n factors cancel in the ratio); in seed 002's, ``w`` is
``r1``, ``‖u‖`` is ``r2`` and ``r`` is the trust ratio. A "layer" is one parameter tensor.

Everything here works on device tensors and never reads a value back to the host, so an optimizer step that
uses it issues no host-device synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

ClipRange = tuple[float, float]

def norm_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """The dtype of the per-tensor norms and ratios of ``tensors``: float64 if any is float64 (or complex128), else
    float32 — norms are accumulated in at least float32, as a bfloat16 sum of squares loses most digits."""
    return torch.float64 if any(t.dtype in (torch.float64, torch.complex128) for t in tensors) else torch.float32


def tensor_norms(tensors: Sequence[Tensor], *, foreach: bool = False) -> Tensor:
    """Return the L2 norm ``‖x‖`` of each tensor as one 1-D float tensor (float32, or float64 for float64 input).

    The result lives on the tensors' device. An empty tensor has norm 0.
    """
    if not tensors:
        return torch.zeros(0)
    dtype = norm_dtype(tensors)
    if foreach:
        norms = torch._foreach_norm(list(tensors), 2, dtype=dtype)
    else:
        norms = [torch.linalg.vector_norm(t, 2, dtype=dtype) for t in tensors]
    return torch.stack(norms)


def global_norm(tensors: Sequence[Tensor], *, foreach: bool = False) -> Tensor:
    """Return ``sqrt(Σ_i ‖x_i‖²)``, the L2 norm of all tensors taken together, as a 0-dim tensor.

    Tensors may live on several devices; the result lives on the first tensor's device.
    """
    return squared_norm(tensors, device=tensors[0].device, foreach=foreach).sqrt()


def squared_norm(tensors: Sequence[Tensor], *, device: torch.device, foreach: bool = False) -> Tensor:
    """Return ``Σ_i ‖x_i‖²`` as a 0-dim tensor on ``device`` (float32, or float64 with float64 input; 0 for none)."""
    if not tensors:
        return torch.zeros((), device=device)
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    squares = [tensor_norms(ts, foreach=foreach).square().sum().to(device) for ts in by_device.values()]
    return torch.stack(squares).sum()


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
) -> Tensor:
    """Return the trust ratio ``r`` for tensors whose norms are ``weight_norm`` (‖θ‖) and ``update_norm`` (‖u‖).

    Works element-wise on any shape (one element per parameter tensor). See the module docstring for the math;
    the zero-norm fallback keeps ``r = 1`` for a zero-initialised tensor or an all-zero update, never NaN.
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


@dataclass
class FirstPass:
    """A group's update up to the trust stage, from an optimizer's ``_first_pass``.

    ``squares[i]``: this process's float64 sums of squares for tensor i (column 0 ‖θ‖², the others whatever the
    optimizer's ``_update_norm`` reads). ``finish(ratio)`` applies the update with the per-tensor trust ratios.
    """

    squares: Tensor
    finish: Callable[[Tensor], None]
