"""The fused GPU steps of LAMB and LARS in Triton: two launches per dtype group instead of a dozen foreach passes.

Pass 1 (one launch over every tensor of a dtype group, one program per chunk of ``BLOCK`` elements) updates the
moments in place and writes the chunk's partial sums of ‖θ‖² and ‖u‖², u = (m·c1) / (√v·c2 + ε) + λθ, without
storing u. The partial sums are summed per tensor in float64 with a scan (no atomics: the result is bitwise the
same from run to run) and handed to the optimizer's trust stage as a :class:`~torchlamb.trust.PendingUpdate` — so the
ratio follows :func:`torchlamb.trust.trust_ratio` exactly, and sharded (FSDP2) tensors get their one all-reduce
in between, as on the other paths. Pass 2 (one launch) recomputes u from θ, m and v with the same code, so the same
values, and applies θ ← θ − lr·r·u.

LARS: pass 1 reads θ and g for ‖θ‖², ‖g‖² and ‖g + λθ‖²; pass 2 reads θ, g and the momentum buffer b and writes
b ← μb + r·(g + λθ) and θ ← θ − lr·b (Nesterov: θ − lr·(r·(g + λθ) + μb)). With the lr inside the momentum,
b ← μb + lr·r·(g + λθ) and θ ← θ − b; with dampening, the buffer's increment is times 1 − dampening after a tensor's
first step: the per-tensor factors are computed on the device from the step counts (_lars_ratios).

The kernels are in ``triton_kernels``; the tables through which they reach the tensors of a launch (pointers, chunks,
blocks; built once and cached) in ``triton_tables``; this module launches them for a step. Everything
that changes from step to step — lr, the step counts and bias corrections, the global clip factor with GradScaler's
inverse scale, the step weight — is read from device memory, so ``step()`` never waits for the device and a changing
lr compiles nothing new.

8-bit state (``state_dtype="8bit"``) has kernels of its own, one program per block of 256 values (see below):
pass 1 decodes the codes, updates the values, stores new codes and scales and sums ‖u‖² from the values as stored;
pass 2 decodes them again. LARS's pass 1 does not read its buffer and is the float one.

Stored values are rounded to their dtype before pass 1 uses them (as the other paths round a moment before using
it); bfloat16 is rounded to nearest even with bit operations, since Triton's interpreter truncates on that cast.

Under ``TRITON_INTERPRET=1`` (set before this module is imported) the kernels run on CPU tensors: that is how the
tests prove them without a GPU.
"""


from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from .. import quantized
from ..bias_correction import BiasCorrection, moment_corrections, step_count, step_size_factor
from ..trust import PendingUpdate, cautious_update
from .triton_kernels import (
    BLOCK,
    QBLOCK,
    _lamb8_pass1,
    _lamb8_pass2,
    _lamb_pass1,
    _lamb_pass2,
    _lars8_pass2,
    _lars_pass1,
    _lars_pass2,
)
from .triton_tables import TRITON_DTYPES, Launch, code_tables, launches, sums_per_tensor


def supports(tensors: list[Tensor]) -> bool:
    """Whether the Triton kernels can take these tensors: dense, contiguous, of a dtype they know."""
    return all(t.layout == torch.strided and t.is_contiguous() and t.dtype in TRITON_DTYPES for t in tensors)


def _step_scalars(params: list[Tensor], grads: list[Tensor], steps: list[Tensor], lr: float | Tensor,
                  maximize: bool, grad_factor: Tensor | None, step_weight: Tensor | None,
                  decay_lr: float | Tensor | None = None) -> tuple[Tensor, Tensor, list[Tensor]]:
    """What the kernels read from the device each step: [gradient factor, step weight, lr, the lr of LAMB's decay
    (``decay_lr``, lr when None)] as float32 (the factor
    is ±1 for maximize times the global clip factor and GradScaler's inverse scale; the weight is 0 on a skipped
    step), the step weight alone, and the contiguous gradients; counts the steps (by the weight)."""
    device = params[0].device
    grads = [g if g.is_contiguous() else g.contiguous() for g in grads]  # read with their parameters' offsets
    one = torch.ones((), dtype=torch.float32, device=device)
    factor = one if grad_factor is None else grad_factor.to(device, torch.float32).reshape(())
    if maximize:
        factor = -factor
    weight = one if step_weight is None else step_weight.to(device, torch.float32).reshape(())
    lr_value = lr.to(device, torch.float32).reshape(()) if isinstance(lr, Tensor) else one * lr
    if decay_lr is None or decay_lr is lr:
        decay_value = lr_value
    else:
        decay_value = decay_lr.to(device, torch.float32).reshape(()) if isinstance(decay_lr, Tensor) else one * decay_lr
    torch._foreach_add_(steps, 1 if step_weight is None else [step_weight.to(device)] * len(steps))
    return torch.stack([factor, weight, lr_value, decay_value]), weight, grads


@functools.lru_cache(maxsize=16)
def _numels(numels: tuple[int, ...], device: torch.device) -> Tensor:
    """The tensors' numbers of elements as a float64 [n, 1] device tensor (caution's LAMB_NUMEL column), copied once."""
    return torch.tensor(numels, dtype=torch.float64).reshape(-1, 1).to(device)


def _lamb_pending(squares: Tensor, apply: Callable[..., None], params: list[Tensor], caution: bool,
                  decay: float) -> PendingUpdate:
    """The PendingUpdate of LAMB's pass 1 (with caution: its columns and the number of elements, completed by
    torchlamb.trust.cautious_update, which hands apply the factors k)."""
    if not caution:
        return PendingUpdate(squares, apply)
    numels = _numels(tuple(p.numel() for p in params), squares.device)
    return cautious_update(torch.cat([squares, numels], 1), apply, decay)


def _lamb_corrections(steps: list[Tensor], beta1: float, beta2: float,
                      bias_correction: BiasCorrection) -> tuple[Tensor, Tensor]:
    """(the step counts t, float32 [n, 2] of c1 = 1/(1−β1^t) and c2 = 1/√(1−β2^t) per tensor, or ones without
    bias correction inside u)."""
    t = step_count(torch.stack(steps))
    if bias_correction is True:
        correction1, correction2 = moment_corrections(beta1, beta2, t)
        corrections = torch.stack([1 / correction1, correction2.rsqrt()], 1)
    else:
        corrections = torch.ones(len(steps), 2, dtype=torch.float64, device=t.device)
    return t, corrections.to(torch.float32)


def _lamb_scale(ratio: Tensor, lr: float | Tensor, weight: Tensor, t: Tensor, beta1: float, beta2: float,
                bias_correction: BiasCorrection) -> Tensor:
    """Pass 2's −lr·r per tensor in float64, times the step-size factor and the step weight, as float32."""
    lr64 = lr.to(weight.device, torch.float64) if isinstance(lr, Tensor) else lr  # a float keeps all its digits
    scale = ratio.to(weight.device, torch.float64) * -lr64
    factor = step_size_factor(bias_correction, beta1, beta2, t)
    if factor is not None:
        scale = scale * factor
    return (scale * weight.double()).to(torch.float32)


def _lars_ratios(ratio: Tensor, weight: Tensor, steps: list[Tensor], lr: float | Tensor, lr_inside_momentum: bool,
                 dampening: float) -> Tensor:
    """What LARS's pass 2 multiplies u by on its way into the buffer, per tensor, in float64 then as float32: the
    ratio r (lr·r with the lr inside the momentum), times 1 − dampening after a tensor's first step (its count, this
    step included, is 1 at the first: torch.optim.SGD adds the first step undampened), times the step weight. All on
    the device: nothing is read on the host. By default r × the step weight, as before these options."""
    scale = ratio.to(weight.device, torch.float64)
    if lr_inside_momentum:
        scale = scale * (lr.to(weight.device, torch.float64) if isinstance(lr, Tensor) else lr)
    if dampening != 0:
        first = torch.stack([step.to(weight.device) for step in steps]) == 1
        scale = scale * torch.full_like(scale, 1.0 - dampening).masked_fill_(first, 1.0)
    return (scale * weight.double()).to(torch.float32)


def _pass1(launches_: list[Launch], n: int, columns: int, device: torch.device,
           launch: Callable[[Launch, Tensor], None]) -> Tensor:
    """Run a pass-1 kernel over each launch that has programs (``launch(launch, partials)``, the programs writing
    ``columns`` partial sums each) and return the float64 [n, columns] sums of squares per tensor."""
    squares = torch.zeros(n, columns, dtype=torch.float64, device=device)
    for each in launches_:
        if each.chunks.count:
            partials = torch.empty(each.chunks.count, columns, dtype=torch.float32, device=device)
            launch(each, partials)
            squares[each.index] = sums_per_tensor(partials, each.chunks)
    return squares


def _codes(states: list[dict[str, Tensor]], key: quantized.QuantizedKey) -> list[list[Tensor]]:
    return [[state[key.codes_key] for state in states], [state[key.absmax_key] for state in states]]


def lamb_first_pass(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                    steps: list[Tensor], *, lr: float | Tensor, beta1: float, beta2: float, eps: float,
                    weight_decay: float, bias_correction: BiasCorrection, decay_outside_ratio: bool, maximize: bool,
                    grad_factor: Tensor | None, step_weight: Tensor | None = None,
                    copies: list[Tensor | None] | None = None, caution: bool = False, decay_after_step: bool = False,
                    decay_lr: float | Tensor | None = None) -> PendingUpdate:
    """LAMB's pass 1 in Triton for tensors on one device (the arguments of ``lamb._multi_tensor_lamb``), one launch
    per combination of dtypes; the PendingUpdate's ``apply(ratio)`` runs pass 2, which also writes ``copies[i]`` (a
    bfloat16/float16 parameter whose float32 master is ``params[i]``) from the updated master, rounded to nearest
    even."""
    device = params[0].device
    scalars, weight, grads = _step_scalars(params, grads, steps, lr, maximize, grad_factor, step_weight, decay_lr)
    t, corrections = _lamb_corrections(steps, beta1, beta2, bias_correction)
    decay_inside = 0.0 if decay_outside_ratio or decay_after_step else weight_decay
    decay_outside = bool(decay_outside_ratio and weight_decay != 0)
    decay_after = bool(decay_after_step and weight_decay != 0)
    groups = launches(params, grads, [exp_avgs, exp_avg_sqs], device, copies)
    launch_corrections = {id(each): corrections[each.index].contiguous() for each in groups}

    def pass1(each: Launch, partials: Tensor) -> None:
        _lamb_pass1[each.grid](
            *each.pointers, each.chunks.numels, each.chunks.tensors, each.chunks.starts, launch_corrections[id(each)],
            scalars, partials, 1.0 - beta1, 1.0 - beta2, eps, decay_inside, weight_decay, PARAM=each.kind[0],
            GRAD=each.kind[1], STATE=each.kind[2], DECAY_OUTSIDE=decay_outside, BLOCK=BLOCK, CAUTION=caution)

    def apply(ratio: Tensor, caution_scales: Tensor | None = None) -> None:
        scale = _lamb_scale(ratio, lr, weight, t, beta1, beta2, bias_correction)
        factors = scale if caution_scales is None else caution_scales.to(device, torch.float32)
        for each in groups:
            if each.chunks.count:
                param_pointers, grad_pointers, m_pointers, v_pointers = each.pointers
                _lamb_pass2[each.grid](
                    param_pointers, m_pointers, v_pointers, each.copy["copy_pointers"], each.chunks.numels,
                    each.chunks.tensors, each.chunks.starts, launch_corrections[id(each)],
                    scale[each.index].contiguous(), eps, decay_inside, PARAM=each.kind[0], STATE=each.kind[2],
                    COPY=each.copy["COPY"], HAS_COPY=each.copy["HAS_COPY"], BLOCK=BLOCK,
                    grad_pointers=grad_pointers, scalars=scalars, caution_scales=factors[each.index].contiguous(),
                    after_decay=weight_decay, GRAD=each.kind[1], CAUTION=caution, DECAY_AFTER=decay_after)

    return _lamb_pending(_pass1(groups, len(params), 4 if caution else 2, device, pass1), apply, params, caution,
                         decay_inside)


def _lars_pass1_launcher(scalars: Tensor, weight_decay: float) -> Callable[[Launch, Tensor], None]:
    """LARS's pass 1 over a launch: ‖θ‖², ‖g‖², ‖g + λθ‖² from θ and g (float and 8-bit state alike)."""
    def pass1(each: Launch, partials: Tensor) -> None:
        param_pointers, grad_pointers = each.pointers[:2]
        _lars_pass1[each.grid](
            param_pointers, grad_pointers, each.chunks.numels, each.chunks.tensors, each.chunks.starts, scalars,
            partials, weight_decay, PARAM=each.kind[0], GRAD=each.kind[1], BLOCK=BLOCK)

    return pass1


def lars_first_pass(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], steps: list[Tensor],
                    *, lr: float | Tensor, momentum: float, weight_decay: float, nesterov: bool,
                    split_denominator: bool, lr_inside_momentum: bool,
                    dampening: float, fallback_on_grad: bool, maximize: bool, grad_factor: Tensor | None,
                    step_weight: Tensor | None = None, copies: list[Tensor | None] | None = None) -> PendingUpdate:
    """LARS's pass 1 in Triton (the arguments of ``lars._multi_tensor_lars``; both denominators' columns are
    summed, ``split_denominator`` is the trust stage's to read): ‖θ‖², ‖g‖², ‖g + λθ‖² per tensor, reading θ and g
    only; the PendingUpdate's ``apply(ratio)`` runs pass 2 (momentum buffer and θ, and ``copies`` as for
    :func:`lamb_first_pass`). ``fallback_on_grad`` is the trust stage's too (pass 1 sums ‖g‖² always)."""
    device = params[0].device
    scalars, weight, grads = _step_scalars(params, grads, steps, lr, maximize, grad_factor, step_weight)
    groups = launches(params, grads, [momentum_buffers], device, copies)

    def apply(ratio: Tensor) -> None:
        ratios = _lars_ratios(ratio, weight, steps, lr, lr_inside_momentum, dampening)
        for each in groups:
            if each.chunks.count:
                _lars_pass2[each.grid](
                    *each.pointers, each.copy["copy_pointers"], each.chunks.numels, each.chunks.tensors,
                    each.chunks.starts, scalars, ratios[each.index].contiguous(), weight_decay, momentum,
                    NESTEROV=bool(nesterov), PARAM=each.kind[0], GRAD=each.kind[1], STATE=each.kind[2],
                    COPY=each.copy["COPY"], HAS_COPY=each.copy["HAS_COPY"], BLOCK=BLOCK,
                    LR_INSIDE=bool(lr_inside_momentum))

    return PendingUpdate(_pass1(groups, len(params), 3, device, _lars_pass1_launcher(scalars, weight_decay)), apply)


def lamb_first_pass_8bit(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]],
                         steps: list[Tensor], moments: tuple[quantized.QuantizedKey, quantized.QuantizedKey], *,
                         lr: float | Tensor, beta1: float, beta2: float, eps: float, weight_decay: float,
                         bias_correction: BiasCorrection, decay_outside_ratio: bool, maximize: bool,
                         grad_factor: Tensor | None, step_weight: Tensor | None = None,
                         copies: list[Tensor | None] | None = None, caution: bool = False,
                         decay_after_step: bool = False, decay_lr: float | Tensor | None = None) -> PendingUpdate:
    """LAMB's pass 1 in Triton on 8-bit moments (``states``: each tensor's state, with the codes and scales
    ``moments`` name), one program per block: m and √v are decoded, updated, stored as codes and scales, and ‖u‖²
    summed from the values as stored; the PendingUpdate's ``apply(ratio)`` runs pass 2, which decodes them again."""
    device = params[0].device
    scalars, weight, grads = _step_scalars(params, grads, steps, lr, maximize, grad_factor, step_weight, decay_lr)
    t, corrections = _lamb_corrections(steps, beta1, beta2, bias_correction)
    decay_inside = 0.0 if decay_outside_ratio or decay_after_step else weight_decay
    decay_after = bool(decay_after_step and weight_decay != 0)
    first, second = moments
    (m_values, m_entries), (s_values, s_entries) = code_tables(first, device), code_tables(second, device)
    groups = launches(params, grads, [*_codes(states, first), *_codes(states, second)], device, copies,
                      by_block=True)
    launch_corrections = {id(each): corrections[each.index].contiguous() for each in groups}

    def pass1(each: Launch, partials: Tensor) -> None:
        _lamb8_pass1[each.grid](
            *each.pointers, *each.chunks.table, launch_corrections[id(each)], scalars, partials, m_values, m_entries,
            s_values, s_entries, 1.0 - beta1, 1.0 - beta2, eps, decay_inside, weight_decay, PARAM=each.kind[0],
            GRAD=each.kind[1], M_ZERO=first.code.zero, S_ZERO=second.code.zero,
            DECAY_OUTSIDE=bool(decay_outside_ratio and weight_decay != 0), QBLOCK=QBLOCK, CAUTION=caution)

    def apply(ratio: Tensor, caution_scales: Tensor | None = None) -> None:
        scale = _lamb_scale(ratio, lr, weight, t, beta1, beta2, bias_correction)
        factors = scale if caution_scales is None else caution_scales.to(device, torch.float32)
        for each in groups:
            if each.chunks.count:
                param_pointers, grad_pointers, m_codes, m_absmax, s_codes, s_absmax = each.pointers
                _lamb8_pass2[each.grid](
                    param_pointers, m_codes, m_absmax, s_codes, s_absmax, each.copy["copy_pointers"],
                    *each.chunks.table, launch_corrections[id(each)], scale[each.index].contiguous(), m_values,
                    s_values, eps, decay_inside, PARAM=each.kind[0], COPY=each.copy["COPY"],
                    HAS_COPY=each.copy["HAS_COPY"], QBLOCK=QBLOCK, grad_pointers=grad_pointers, scalars=scalars,
                    caution_scales=factors[each.index].contiguous(), after_decay=weight_decay, GRAD=each.kind[1],
                    CAUTION=caution, DECAY_AFTER=decay_after)

    return _lamb_pending(_pass1(groups, len(params), 4 if caution else 2, device, pass1), apply, params, caution,
                         decay_inside)


def lars_first_pass_8bit(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]],
                         steps: list[Tensor], buffer: quantized.QuantizedKey, *, lr: float | Tensor, momentum: float,
                         weight_decay: float, nesterov: bool, split_denominator: bool, lr_inside_momentum: bool,
                         dampening: float, fallback_on_grad: bool, maximize: bool, grad_factor: Tensor | None,
                         step_weight: Tensor | None = None,
                         copies: list[Tensor | None] | None = None) -> PendingUpdate:
    """LARS's pass 1 in Triton (the norms; it does not read the buffer), then, in ``apply(ratio)``, pass 2 on the
    8-bit momentum buffer, one program per block: b decoded, b ← μb + r·u stored as codes and a scale, θ moved by
    the buffer as stored (the options as for :func:`lars_first_pass`)."""
    device = params[0].device
    scalars, weight, grads = _step_scalars(params, grads, steps, lr, maximize, grad_factor, step_weight)
    squares = _pass1(launches(params, grads, [], device), len(params), 3, device,
                     _lars_pass1_launcher(scalars, weight_decay))
    values, entries = code_tables(buffer, device)
    groups = launches(params, grads, _codes(states, buffer), device, copies, by_block=True)

    def apply(ratio: Tensor) -> None:
        ratios = _lars_ratios(ratio, weight, steps, lr, lr_inside_momentum, dampening)
        for each in groups:
            if each.chunks.count:
                _lars8_pass2[each.grid](
                    *each.pointers, each.copy["copy_pointers"], *each.chunks.table, scalars,
                    ratios[each.index].contiguous(), values, entries, weight_decay, momentum,
                    NESTEROV=bool(nesterov), PARAM=each.kind[0], GRAD=each.kind[1], ZERO=buffer.code.zero,
                    COPY=each.copy["COPY"], HAS_COPY=each.copy["HAS_COPY"], QBLOCK=QBLOCK,
                    LR_INSIDE=bool(lr_inside_momentum))

    return PendingUpdate(squares, apply)
