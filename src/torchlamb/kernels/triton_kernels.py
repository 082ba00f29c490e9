"""The Triton kernels of LAMB and LARS: what runs on the device (torchlamb.kernels.triton_steps launches them).

Float state: one program per chunk of ``BLOCK`` elements of one tensor. Pass 1 reads θ, g and the state, updates the
state (LAMB) and writes the chunk's partial sums of squares, in the columns of torchlamb.trust; pass 2 recomputes the
direction with the same code, so the same values, and applies it with the per-tensor scale or ratio.

8-bit state: one program per block of ``QBLOCK`` values (see the 8-bit section below).

Each program reads the step's scalars from device memory: [gradient factor, step weight, lr] (see ``GRAD_FACTOR``
etc.), so a changing lr or a skipped step compiles nothing new and waits for nothing.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .. import trust

# Elements per program. A program sums its squares in float32 (a reduction tree over BLOCK values, relative error
# ~1e-7), the programs' sums are added in float64: tests/test_triton.py holds the norms to the CPU kernels' at 2e-6.
BLOCK = 1024
# The step's scalars, in this order in one float32 device tensor.
GRAD_FACTOR = tl.constexpr(0)  # ±1 (maximize) × the global clip factor × GradScaler's inverse scale
STEP_WEIGHT = tl.constexpr(1)  # 1, or 0 on a skipped step: every change is weighted by it
LR = tl.constexpr(2)
DECAY_LR = tl.constexpr(3)  # the lr of LAMB's decay outside the ratio or after the step: lr, or lr²/max_lr
# The columns of the partial sums of squares (torchlamb.trust's).
WEIGHT = tl.constexpr(trust.WEIGHT)
LAMB_UPDATE = tl.constexpr(trust.LAMB_UPDATE)
LARS_GRAD = tl.constexpr(trust.LARS_GRAD)
LARS_DECAYED_GRAD = tl.constexpr(trust.LARS_DECAYED_GRAD)
LAMB_MASK_COUNT = tl.constexpr(trust.LAMB_MASK_COUNT)
LAMB_MASKED_CROSS = tl.constexpr(trust.LAMB_MASKED_CROSS)


@triton.jit
def _load(pointers, tensor, offsets, mask, DTYPE: tl.constexpr):
    """Elements ``offsets`` of tensor ``tensor`` in a pointer table, as float32 (0 where masked)."""
    base = tl.load(pointers + tensor).to(tl.pointer_type(DTYPE))
    return tl.load(base + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _rounded(x, DTYPE: tl.constexpr):
    """float32 ``x`` rounded to DTYPE (to nearest even), in DTYPE."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        bits = tl.where(x != x, 0x7FC00000, bits)  # NaN stays a (quiet) NaN: the carry above could flip its sign
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _store(pointers, tensor, offsets, mask, value, DTYPE: tl.constexpr):
    """Stores float32 ``value`` rounded to DTYPE; returns the stored value as float32."""
    stored = _rounded(value, DTYPE)
    base = tl.load(pointers + tensor).to(tl.pointer_type(DTYPE))
    tl.store(base + offsets, stored, mask=mask)
    return stored.to(tl.float32)


@triton.jit
def _this_chunk(numels, chunk_tensors, chunk_starts, BLOCK: tl.constexpr):
    """This program's chunk of the float kernels: (its tensor, its elements' offsets, the mask of those in range)."""
    chunk = tl.program_id(0)
    tensor = tl.load(chunk_tensors + chunk)
    offsets = tl.load(chunk_starts + chunk) + tl.arange(0, BLOCK)
    return tensor, offsets, offsets < tl.load(numels + tensor)


@triton.jit
def _scaled_grad(grad_pointers, tensor, offsets, mask, scalars, GRAD: tl.constexpr):
    """g × the gradient factor (±1 for maximize × the global clip factor × GradScaler's inverse scale), or 0 on a
    skipped step, whose gradient may hold Inf (0·Inf is NaN)."""
    grad = _load(grad_pointers, tensor, offsets, mask, GRAD)
    return tl.where(tl.load(scalars + STEP_WEIGHT) != 0.0, grad * tl.load(scalars + GRAD_FACTOR), 0.0)


@triton.jit
def _lamb_direction(m, v, theta, c1, c2, eps, decay):
    """u = (m·c1) / (√v·c2 + ε) + decay·θ: one function for both passes, so both compute the same u."""
    # Correctly rounded sqrt and division, as torch's (a GPU's default ones are approximate).
    return tl.div_rn(m * c1, tl.sqrt_rn(v) * c2 + eps) + decay * theta


@triton.jit
def _lamb_adam(m, v, c1, c2, eps):
    """Adam's a = (m·c1) / (√v·c2 + ε), before caution's mask and the decay: one function for both passes."""
    return tl.div_rn(m * c1, tl.sqrt_rn(v) * c2 + eps)


@triton.jit
def _cautious_partials(partials, theta, a, grad, mask):
    """Caution's four partial sums of a program (torchlamb.trust's columns): ‖θ‖², ‖a⊙M‖², Σ M, Σ (a⊙M)·θ."""
    keep = (a * grad > 0) & mask
    masked = tl.where(keep, a, 0.0)
    row = partials + 4 * tl.program_id(0)
    tl.store(row + WEIGHT, tl.sum(theta * theta, axis=0))
    tl.store(row + LAMB_UPDATE, tl.sum(masked * masked, axis=0))
    tl.store(row + LAMB_MASK_COUNT, tl.sum(keep.to(tl.float32), axis=0))
    tl.store(row + LAMB_MASKED_CROSS, tl.sum(masked * theta, axis=0))


@triton.jit
def _lamb_pass1(param_pointers, grad_pointers, m_pointers, v_pointers, numels, chunk_tensors, chunk_starts,
                corrections, scalars, partials, one_minus_beta1, one_minus_beta2, eps, decay, outside_decay,
                PARAM: tl.constexpr, GRAD: tl.constexpr, STATE: tl.constexpr, DECAY_OUTSIDE: tl.constexpr,
                BLOCK: tl.constexpr, CAUTION: tl.constexpr = False):
    tensor, offsets, mask = _this_chunk(numels, chunk_tensors, chunk_starts, BLOCK)
    step_weight = tl.load(scalars + STEP_WEIGHT)  # 0 on a skipped step: nothing changes
    c1 = tl.load(corrections + 2 * tensor)
    c2 = tl.load(corrections + 2 * tensor + 1)

    theta = _load(param_pointers, tensor, offsets, mask, PARAM)
    if DECAY_OUTSIDE:  # θ ← θ·(1 − lr·λ) before the update (decay outside the ratio)
        lr = tl.load(scalars + DECAY_LR)
        theta = _store(param_pointers, tensor, offsets, mask, theta * (1.0 - lr * outside_decay * step_weight),
                       PARAM)
    grad = _scaled_grad(grad_pointers, tensor, offsets, mask, scalars, GRAD)
    m = _load(m_pointers, tensor, offsets, mask, STATE)
    v = _load(v_pointers, tensor, offsets, mask, STATE)
    m = _store(m_pointers, tensor, offsets, mask, m + one_minus_beta1 * step_weight * (grad - m), STATE)
    v = _store(v_pointers, tensor, offsets, mask, v + one_minus_beta2 * step_weight * (grad * grad - v), STATE)

    if CAUTION:
        _cautious_partials(partials, theta, _lamb_adam(m, v, c1, c2, eps), grad, mask)
    else:
        update = tl.where(mask, _lamb_direction(m, v, theta, c1, c2, eps, decay), 0.0)
        tl.store(partials + 2 * tl.program_id(0) + WEIGHT, tl.sum(theta * theta, axis=0))
        tl.store(partials + 2 * tl.program_id(0) + LAMB_UPDATE, tl.sum(update * update, axis=0))


@triton.jit
def _lamb_stepped(theta, scale, update, scalars, after_decay, PARAM: tl.constexpr, DECAY_AFTER: tl.constexpr):
    """θ + scale·u; with the decay after the step, rounded to PARAM, then × (1 − lr·λ) (1 on a skipped step)."""
    stepped = theta + scale * update
    if DECAY_AFTER:
        weight = tl.load(scalars + STEP_WEIGHT)
        stepped = _rounded(stepped, PARAM).to(tl.float32) * (1.0 - tl.load(scalars + DECAY_LR) * after_decay * weight)
    return stepped


@triton.jit
def _lamb_pass2(param_pointers, m_pointers, v_pointers, copy_pointers, numels, chunk_tensors, chunk_starts,
                corrections, scales, eps, decay, PARAM: tl.constexpr, STATE: tl.constexpr, COPY: tl.constexpr,
                HAS_COPY: tl.constexpr, BLOCK: tl.constexpr, grad_pointers=None, scalars=None, caution_scales=None,
                after_decay=0.0, GRAD: tl.constexpr = tl.float32, CAUTION: tl.constexpr = False,
                DECAY_AFTER: tl.constexpr = False):
    """θ ← θ + scale·u, u as in pass 1; with caution u = k·(a⊙M) + decay·θ (M from g as in pass 1, k per tensor in
    ``caution_scales``); with DECAY_AFTER θ ← (θ + scale·u)·(1 − lr·λ)."""
    tensor, offsets, mask = _this_chunk(numels, chunk_tensors, chunk_starts, BLOCK)
    c1 = tl.load(corrections + 2 * tensor)
    c2 = tl.load(corrections + 2 * tensor + 1)
    scale = tl.load(scales + tensor)  # −lr·r (× the step-size factor, × the step weight)

    theta = _load(param_pointers, tensor, offsets, mask, PARAM)
    m = _load(m_pointers, tensor, offsets, mask, STATE)
    v = _load(v_pointers, tensor, offsets, mask, STATE)
    if CAUTION:
        grad = _scaled_grad(grad_pointers, tensor, offsets, mask, scalars, GRAD)
        a = _lamb_adam(m, v, c1, c2, eps)
        update = tl.where(a * grad > 0, a * tl.load(caution_scales + tensor), 0.0) + decay * theta
    else:
        update = _lamb_direction(m, v, theta, c1, c2, eps, decay)
    if CAUTION or DECAY_AFTER:
        theta = _store(param_pointers, tensor, offsets, mask,
                       _lamb_stepped(theta, scale, update, scalars, after_decay, PARAM, DECAY_AFTER), PARAM)
    else:
        theta = _store(param_pointers, tensor, offsets, mask, theta + scale * update, PARAM)
    if HAS_COPY:  # master weights: the low-precision parameter, written from the float32 master
        _store(copy_pointers, tensor, offsets, mask, theta, COPY)


@triton.jit
def _lars_pass1(param_pointers, grad_pointers, numels, chunk_tensors, chunk_starts, scalars, partials, weight_decay,
                PARAM: tl.constexpr, GRAD: tl.constexpr, BLOCK: tl.constexpr):
    tensor, offsets, mask = _this_chunk(numels, chunk_tensors, chunk_starts, BLOCK)
    theta = _load(param_pointers, tensor, offsets, mask, PARAM)
    grad = _scaled_grad(grad_pointers, tensor, offsets, mask, scalars, GRAD)
    update = grad + weight_decay * theta
    tl.store(partials + 3 * tl.program_id(0) + WEIGHT, tl.sum(theta * theta, axis=0))
    tl.store(partials + 3 * tl.program_id(0) + LARS_GRAD, tl.sum(grad * grad, axis=0))
    tl.store(partials + 3 * tl.program_id(0) + LARS_DECAYED_GRAD, tl.sum(update * update, axis=0))


@triton.jit
def _lars_pass2(param_pointers, grad_pointers, buffer_pointers, copy_pointers, numels, chunk_tensors, chunk_starts,
                scalars, ratios, weight_decay, momentum, NESTEROV: tl.constexpr, PARAM: tl.constexpr,
                GRAD: tl.constexpr, STATE: tl.constexpr, COPY: tl.constexpr, HAS_COPY: tl.constexpr,
                BLOCK: tl.constexpr, LR_INSIDE: tl.constexpr):
    """b ← μb + r·u, θ ← θ − lr·(b, or r·u + μb with Nesterov); u = g + λθ recomputed as in pass 1. On a skipped
    step (step weight 0, so r = 0 here) b ← b and θ ← θ. The per-tensor ``ratios`` are what multiplies u on its way
    into the buffer (r, or c·lr·r with the lr inside the momentum and dampening; × the step weight); LR_INSIDE: θ moves
    by the direction itself, θ ← θ − d."""
    tensor, offsets, mask = _this_chunk(numels, chunk_tensors, chunk_starts, BLOCK)
    step_weight = tl.load(scalars + STEP_WEIGHT)
    lr = tl.load(scalars + LR)
    ratio = tl.load(ratios + tensor)  # r × the step weight
    theta = _load(param_pointers, tensor, offsets, mask, PARAM)
    grad = _scaled_grad(grad_pointers, tensor, offsets, mask, scalars, GRAD)
    scaled = ratio * (grad + weight_decay * theta)
    buffer = _load(buffer_pointers, tensor, offsets, mask, STATE)
    buffer = _store(buffer_pointers, tensor, offsets, mask,
                    (step_weight * momentum + (1.0 - step_weight)) * buffer + scaled, STATE)
    if NESTEROV:
        direction = scaled + momentum * buffer
    else:
        direction = buffer
    if LR_INSIDE:
        theta = _store(param_pointers, tensor, offsets, mask, theta - step_weight * direction, PARAM)
    else:
        theta = _store(param_pointers, tensor, offsets, mask, theta - (lr * step_weight) * direction, PARAM)
    if HAS_COPY:  # master weights: the low-precision parameter, written from the float32 master
        _store(copy_pointers, tensor, offsets, mask, theta, COPY)


# -- 8-bit state (torchlamb.quantized) ----------------------------------------------------------------------------
# One program per block of 8-bit state (QBLOCK = 256 elements of one row, the last of a row shorter), so that each
# program finds its block's absmax by itself. The rules are the CPU kernels': q = x·(1/absmax) with a correctly
# rounded reciprocal; the code is one read of the map's entries (the midpoints below q's 16-bit pattern, plus one if
# q lies above the midpoint inside it); a block's absmax is the largest of its magnitudes' bit patterns (NaN above
# everything); a positive √v is never stored as the code of 0; u is computed from the moments as stored.
QBLOCK = 256


@triton.jit
def _decode(code_pointers, absmax_pointers, tensor, offsets, mask, block, values):
    """The float32 values a block's codes and absmax stand for (0 where masked)."""
    codes = tl.load(tl.load(code_pointers + tensor).to(tl.pointer_type(tl.uint8)) + offsets, mask=mask, other=0)
    absmax = tl.load(tl.load(absmax_pointers + tensor).to(tl.pointer_type(tl.float32)) + block)
    return tl.where(mask, tl.load(values + codes.to(tl.int32)) * absmax, 0.0)


@triton.jit
def _absmax(x):
    """The largest |x| (NaN if any is NaN), from the bit patterns as the CPU kernels take it."""
    magnitudes = (x.to(tl.uint32, bitcast=True) & 0x7FFFFFFF).to(tl.int32)
    return tl.max(magnitudes, axis=0).to(tl.float32, bitcast=True)


@triton.jit
def _encode_store(x, code_pointers, absmax_pointers, tensor, offsets, mask, block, step_weight, values, entries,
                  ZERO: tl.constexpr, FLOOR: tl.constexpr):
    """Quantize a block's float32 values ``x``, store codes and absmax (nothing where the step weight is 0), and
    return the values as stored."""
    code_base = tl.load(code_pointers + tensor).to(tl.pointer_type(tl.uint8))
    absmax_base = tl.load(absmax_pointers + tensor).to(tl.pointer_type(tl.float32))
    old_codes = tl.load(code_base + offsets, mask=mask, other=0).to(tl.int32)
    old_absmax = tl.load(absmax_base + block)
    absmax = _absmax(tl.where(mask, x, 0.0))
    inverse = tl.div_rn(1.0, tl.where(absmax > 0, absmax, 1.0))
    bits = (x * inverse).to(tl.uint32, bitcast=True)
    entry = tl.load(entries + (bits >> 16).to(tl.int32))
    key = (bits & 0xFFFF) ^ tl.where((bits >> 31) != 0, 0xFFFF, 0)
    codes = (entry & 0xFF) + (key.to(tl.int32) > (entry >> 8)).to(tl.int32)
    codes = tl.where(absmax > 0, codes, ZERO)
    if FLOOR:
        codes = tl.where((codes == ZERO) & (x > 0), ZERO + 1, codes)
    codes = tl.where(step_weight != 0.0, codes, old_codes)
    absmax = tl.where(step_weight != 0.0, absmax, old_absmax)
    tl.store(code_base + offsets, codes.to(tl.uint8), mask=mask)
    tl.store(absmax_base + block, absmax)
    return tl.where(mask, tl.load(values + codes) * absmax, 0.0)


@triton.jit
def _this_block(block_tensors, block_starts, block_lengths, block_indices, QBLOCK: tl.constexpr):
    """This program's block: (its tensor, its absmax's index, its elements' offsets, the mask of its length)."""
    program = tl.program_id(0)
    within = tl.arange(0, QBLOCK)
    return (tl.load(block_tensors + program), tl.load(block_indices + program),
            tl.load(block_starts + program) + within, within < tl.load(block_lengths + program))


@triton.jit
def _lamb8_direction(m, s, theta, c1, c2, eps, decay):
    """u = (m·c1) / (s·c2 + ε) + decay·θ from m and s = √v as stored: one function for both passes."""
    return tl.div_rn(m * c1, s * c2 + eps) + decay * theta


@triton.jit
def _lamb8_pass1(param_pointers, grad_pointers, m_codes, m_absmax, s_codes, s_absmax, block_tensors, block_starts,
                 block_lengths, block_indices, corrections, scalars, partials, m_values, m_entries, s_values,
                 s_entries, one_minus_beta1, one_minus_beta2, eps, decay, outside_decay, PARAM: tl.constexpr,
                 GRAD: tl.constexpr, M_ZERO: tl.constexpr, S_ZERO: tl.constexpr, DECAY_OUTSIDE: tl.constexpr,
                 QBLOCK: tl.constexpr, CAUTION: tl.constexpr = False):
    tensor, block, offsets, mask = _this_block(block_tensors, block_starts, block_lengths, block_indices, QBLOCK)
    step_weight = tl.load(scalars + STEP_WEIGHT)
    c1 = tl.load(corrections + 2 * tensor)
    c2 = tl.load(corrections + 2 * tensor + 1)

    theta = _load(param_pointers, tensor, offsets, mask, PARAM)
    if DECAY_OUTSIDE:
        lr = tl.load(scalars + DECAY_LR)
        theta = _store(param_pointers, tensor, offsets, mask, theta * (1.0 - lr * outside_decay * step_weight),
                       PARAM)
    grad = _scaled_grad(grad_pointers, tensor, offsets, mask, scalars, GRAD)
    m = _decode(m_codes, m_absmax, tensor, offsets, mask, block, m_values)
    s = _decode(s_codes, s_absmax, tensor, offsets, mask, block, s_values)
    v = s * s
    m = m + one_minus_beta1 * (grad - m)
    s = tl.sqrt_rn(v + one_minus_beta2 * (grad * grad - v))
    m = _encode_store(m, m_codes, m_absmax, tensor, offsets, mask, block, step_weight, m_values, m_entries, M_ZERO,
                      False)
    s = _encode_store(s, s_codes, s_absmax, tensor, offsets, mask, block, step_weight, s_values, s_entries, S_ZERO,
                      True)
    if CAUTION:
        _cautious_partials(partials, theta, tl.div_rn(m * c1, s * c2 + eps), grad, mask)
    else:
        update = tl.where(mask, _lamb8_direction(m, s, theta, c1, c2, eps, decay), 0.0)
        tl.store(partials + 2 * tl.program_id(0) + WEIGHT, tl.sum(theta * theta, axis=0))
        tl.store(partials + 2 * tl.program_id(0) + LAMB_UPDATE, tl.sum(update * update, axis=0))


@triton.jit
def _lamb8_pass2(param_pointers, m_codes, m_absmax, s_codes, s_absmax, copy_pointers, block_tensors, block_starts,
                 block_lengths, block_indices, corrections, scales, m_values, s_values, eps, decay,
                 PARAM: tl.constexpr, COPY: tl.constexpr, HAS_COPY: tl.constexpr, QBLOCK: tl.constexpr,
                 grad_pointers=None, scalars=None, caution_scales=None, after_decay=0.0,
                 GRAD: tl.constexpr = tl.float32, CAUTION: tl.constexpr = False, DECAY_AFTER: tl.constexpr = False):
    tensor, block, offsets, mask = _this_block(block_tensors, block_starts, block_lengths, block_indices, QBLOCK)
    c1 = tl.load(corrections + 2 * tensor)
    c2 = tl.load(corrections + 2 * tensor + 1)
    scale = tl.load(scales + tensor)

    theta = _load(param_pointers, tensor, offsets, mask, PARAM)
    m = _decode(m_codes, m_absmax, tensor, offsets, mask, block, m_values)
    s = _decode(s_codes, s_absmax, tensor, offsets, mask, block, s_values)
    if CAUTION or DECAY_AFTER:
        if CAUTION:
            grad = _scaled_grad(grad_pointers, tensor, offsets, mask, scalars, GRAD)
            a = tl.div_rn(m * c1, s * c2 + eps)
            update = tl.where(a * grad > 0, a * tl.load(caution_scales + tensor), 0.0) + decay * theta
        else:
            update = _lamb8_direction(m, s, theta, c1, c2, eps, decay)
        theta = _store(param_pointers, tensor, offsets, mask,
                       _lamb_stepped(theta, scale, update, scalars, after_decay, PARAM, DECAY_AFTER), PARAM)
    else:
        theta = _store(param_pointers, tensor, offsets, mask,
                       theta + scale * _lamb8_direction(m, s, theta, c1, c2, eps, decay), PARAM)
    if HAS_COPY:
        _store(copy_pointers, tensor, offsets, mask, theta, COPY)


@triton.jit
def _lars8_pass2(param_pointers, grad_pointers, b_codes, b_absmax, copy_pointers, block_tensors, block_starts,
                 block_lengths, block_indices, scalars, ratios, values, entries, weight_decay, momentum,
                 NESTEROV: tl.constexpr, PARAM: tl.constexpr, GRAD: tl.constexpr, ZERO: tl.constexpr,
                 COPY: tl.constexpr, HAS_COPY: tl.constexpr, QBLOCK: tl.constexpr, LR_INSIDE: tl.constexpr):
    """_lars_pass2 on an 8-bit buffer: θ moves by the buffer as stored (``ratios`` and LR_INSIDE as there)."""
    tensor, block, offsets, mask = _this_block(block_tensors, block_starts, block_lengths, block_indices, QBLOCK)
    step_weight = tl.load(scalars + STEP_WEIGHT)
    lr = tl.load(scalars + LR)
    ratio = tl.load(ratios + tensor)

    theta = _load(param_pointers, tensor, offsets, mask, PARAM)
    grad = _scaled_grad(grad_pointers, tensor, offsets, mask, scalars, GRAD)
    scaled = (grad + weight_decay * theta) * ratio
    b = _decode(b_codes, b_absmax, tensor, offsets, mask, block, values)
    b = _encode_store(momentum * b + scaled, b_codes, b_absmax, tensor, offsets, mask, block, step_weight, values,
                      entries, ZERO, False)
    direction = scaled + momentum * b if NESTEROV else b
    if LR_INSIDE:
        theta = _store(param_pointers, tensor, offsets, mask, theta - step_weight * direction, PARAM)
    else:
        theta = _store(param_pointers, tensor, offsets, mask, theta - lr * step_weight * direction, PARAM)
    if HAS_COPY:
        _store(copy_pointers, tensor, offsets, mask, theta, COPY)


