"""The fused GPU steps of LAMB and LARS in Triton: two launches per dtype group instead of a dozen foreach passes.

Pass 1 (one launch over every tensor of a dtype group, one program per chunk of ``BLOCK`` elements) updates the
moments in place and writes the chunk's partial sums of ‖θ‖² and ‖u‖², u = (m·c1) / (√v·c2 + ε) + λθ, without
storing u. The partial sums are summed per tensor in float64 with a scan (no atomics: the result is bitwise the
same from run to run) and handed to the optimizer's trust stage as a :class:`~torchlamb.trust.FirstPass` — so the
ratio follows :func:`torchlamb.trust.trust_ratio` exactly, and sharded (FSDP2) tensors get their one all-reduce
in between, as on the other paths. Pass 2 (one launch) recomputes u from θ, m and v with the same code, so the same
values, and applies θ ← θ − lr·r·u.

LARS: pass 1 reads θ and g for ‖θ‖², ‖g‖² and ‖g + λθ‖²; pass 2 reads θ, g and the momentum buffer b and writes
b ← μb + r·(g + λθ) and θ ← θ − lr·b (Nesterov: θ − lr·(r·(g + λθ) + μb)).

The tensors of a launch are reached through tables: one of int64 data pointers per operand (cast to typed pointers
in the kernel, the dtype a compile-time constant) and one of (tensor index, chunk start) per program, each built
once and cached (by the tensors' addresses and sizes), so a step with the same tensors copies nothing. Everything
that changes from step to step — lr, the step counts and bias corrections, the global clip factor with GradScaler's
inverse scale, the skip flag — is read from device memory, so ``step()`` never waits for the device and a changing
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
import math
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import quantized
from ..trust import FirstPass

# Elements per program. A program sums its squares in float32 (a reduction tree over BLOCK values, relative error
# ~1e-7), the programs' sums are added in float64: tests/test_triton.py holds the norms to the CPU kernels' at 2e-6.
BLOCK = 1024

_TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def supports(tensors: list[Tensor]) -> bool:
    """Whether the Triton kernels can take these tensors: dense, contiguous, of a dtype they know."""
    return all(t.layout == torch.strided and t.is_contiguous() and t.dtype in _TRITON_DTYPES for t in tensors)


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
def _lamb_direction(m, v, theta, c1, c2, eps, decay):
    """u = (m·c1) / (√v·c2 + ε) + decay·θ: one function for both passes, so both compute the same u."""
    # Correctly rounded sqrt and division, as torch's (a GPU's default ones are approximate).
    return tl.div_rn(m * c1, tl.sqrt_rn(v) * c2 + eps) + decay * theta


@triton.jit
def _lamb_pass1(param_pointers, grad_pointers, m_pointers, v_pointers, numels, chunk_tensors, chunk_starts,
                corrections, scalars, partials, one_minus_beta1, one_minus_beta2, eps, decay, outside_decay,
                PARAM: tl.constexpr, GRAD: tl.constexpr, STATE: tl.constexpr, DECAY_OUTSIDE: tl.constexpr,
                BLOCK: tl.constexpr):
    chunk = tl.program_id(0)
    tensor = tl.load(chunk_tensors + chunk)
    offsets = tl.load(chunk_starts + chunk) + tl.arange(0, BLOCK)
    mask = offsets < tl.load(numels + tensor)
    grad_factor = tl.load(scalars)  # ±1 (maximize) × the global clip factor × GradScaler's inverse scale
    keep = tl.load(scalars + 1)  # 0 on a skipped step: nothing changes
    c1 = tl.load(corrections + 2 * tensor)
    c2 = tl.load(corrections + 2 * tensor + 1)

    theta = _load(param_pointers, tensor, offsets, mask, PARAM)
    if DECAY_OUTSIDE:  # θ ← θ·(1 − lr·λ) before the update (decay outside the ratio)
        lr = tl.load(scalars + 2)
        theta = _store(param_pointers, tensor, offsets, mask, theta * (1.0 - lr * outside_decay * keep), PARAM)
    grad = _load(grad_pointers, tensor, offsets, mask, GRAD)
    grad = tl.where(keep != 0.0, grad * grad_factor, 0.0)  # a skipped step's gradient may hold Inf: 0·Inf is NaN
    m = _load(m_pointers, tensor, offsets, mask, STATE)
    v = _load(v_pointers, tensor, offsets, mask, STATE)
    m = _store(m_pointers, tensor, offsets, mask, m + one_minus_beta1 * keep * (grad - m), STATE)
    v = _store(v_pointers, tensor, offsets, mask, v + one_minus_beta2 * keep * (grad * grad - v), STATE)

    update = tl.where(mask, _lamb_direction(m, v, theta, c1, c2, eps, decay), 0.0)
    tl.store(partials + 2 * chunk, tl.sum(theta * theta, axis=0))
    tl.store(partials + 2 * chunk + 1, tl.sum(update * update, axis=0))


@triton.jit
def _lamb_pass2(param_pointers, m_pointers, v_pointers, copy_pointers, numels, chunk_tensors, chunk_starts,
                corrections, scales, eps, decay, PARAM: tl.constexpr, STATE: tl.constexpr, COPY: tl.constexpr,
                HAS_COPY: tl.constexpr, BLOCK: tl.constexpr):
    chunk = tl.program_id(0)
    tensor = tl.load(chunk_tensors + chunk)
    offsets = tl.load(chunk_starts + chunk) + tl.arange(0, BLOCK)
    mask = offsets < tl.load(numels + tensor)
    c1 = tl.load(corrections + 2 * tensor)
    c2 = tl.load(corrections + 2 * tensor + 1)
    scale = tl.load(scales + tensor)  # −lr·r (× the step-size factor, × keep)

    theta = _load(param_pointers, tensor, offsets, mask, PARAM)
    m = _load(m_pointers, tensor, offsets, mask, STATE)
    v = _load(v_pointers, tensor, offsets, mask, STATE)
    update = _lamb_direction(m, v, theta, c1, c2, eps, decay)
    theta = _store(param_pointers, tensor, offsets, mask, theta + scale * update, PARAM)
    if HAS_COPY:  # master weights: the low-precision parameter, written from the float32 master
        _store(copy_pointers, tensor, offsets, mask, theta, COPY)


@triton.jit
def _lars_pass1(param_pointers, grad_pointers, numels, chunk_tensors, chunk_starts, scalars, partials, weight_decay,
                PARAM: tl.constexpr, GRAD: tl.constexpr, BLOCK: tl.constexpr):
    chunk = tl.program_id(0)
    tensor = tl.load(chunk_tensors + chunk)
    offsets = tl.load(chunk_starts + chunk) + tl.arange(0, BLOCK)
    mask = offsets < tl.load(numels + tensor)
    theta = _load(param_pointers, tensor, offsets, mask, PARAM)
    grad = _lars_grad(grad_pointers, tensor, offsets, mask, scalars, GRAD)
    update = grad + weight_decay * theta
    tl.store(partials + 3 * chunk, tl.sum(theta * theta, axis=0))
    tl.store(partials + 3 * chunk + 1, tl.sum(grad * grad, axis=0))
    tl.store(partials + 3 * chunk + 2, tl.sum(update * update, axis=0))


@triton.jit
def _lars_grad(grad_pointers, tensor, offsets, mask, scalars, GRAD: tl.constexpr):
    """g × the gradient factor, or 0 on a skipped step (whose gradient may hold Inf: 0·Inf is NaN)."""
    grad = _load(grad_pointers, tensor, offsets, mask, GRAD)
    return tl.where(tl.load(scalars + 1) != 0.0, grad * tl.load(scalars), 0.0)


@triton.jit
def _lars_pass2(param_pointers, grad_pointers, buffer_pointers, copy_pointers, numels, chunk_tensors, chunk_starts,
                scalars, ratios, weight_decay, momentum, NESTEROV: tl.constexpr, PARAM: tl.constexpr,
                GRAD: tl.constexpr, STATE: tl.constexpr, COPY: tl.constexpr, HAS_COPY: tl.constexpr,
                BLOCK: tl.constexpr):
    """b ← μb + r·u, θ ← θ − lr·(b, or r·u + μb with Nesterov); u = g + λθ recomputed as in pass 1. On a skipped
    step (keep 0, so r = 0 here) b ← b and θ ← θ."""
    chunk = tl.program_id(0)
    tensor = tl.load(chunk_tensors + chunk)
    offsets = tl.load(chunk_starts + chunk) + tl.arange(0, BLOCK)
    mask = offsets < tl.load(numels + tensor)
    keep = tl.load(scalars + 1)
    lr = tl.load(scalars + 2)
    ratio = tl.load(ratios + tensor)  # r × keep
    theta = _load(param_pointers, tensor, offsets, mask, PARAM)
    grad = _lars_grad(grad_pointers, tensor, offsets, mask, scalars, GRAD)
    scaled = ratio * (grad + weight_decay * theta)
    buffer = _load(buffer_pointers, tensor, offsets, mask, STATE)
    buffer = _store(buffer_pointers, tensor, offsets, mask, (keep * momentum + (1.0 - keep)) * buffer + scaled, STATE)
    if NESTEROV:
        direction = scaled + momentum * buffer
    else:
        direction = buffer
    theta = _store(param_pointers, tensor, offsets, mask, theta - (lr * keep) * direction, PARAM)
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
def _encode_store(x, code_pointers, absmax_pointers, tensor, offsets, mask, block, keep, values, entries,
                  ZERO: tl.constexpr, FLOOR: tl.constexpr):
    """Quantize a block's float32 values ``x``, store codes and absmax (nothing where ``keep`` is 0), and return the
    values as stored."""
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
    codes = tl.where(keep != 0.0, codes, old_codes)
    absmax = tl.where(keep != 0.0, absmax, old_absmax)
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
                 QBLOCK: tl.constexpr):
    tensor, block, offsets, mask = _this_block(block_tensors, block_starts, block_lengths, block_indices, QBLOCK)
    grad_factor = tl.load(scalars)
    keep = tl.load(scalars + 1)
    c1 = tl.load(corrections + 2 * tensor)
    c2 = tl.load(corrections + 2 * tensor + 1)

    theta = _load(param_pointers, tensor, offsets, mask, PARAM)
    if DECAY_OUTSIDE:
        lr = tl.load(scalars + 2)
        theta = _store(param_pointers, tensor, offsets, mask, theta * (1.0 - lr * outside_decay * keep), PARAM)
    grad = _load(grad_pointers, tensor, offsets, mask, GRAD)
    grad = tl.where(keep != 0.0, grad * grad_factor, 0.0)
    m = _decode(m_codes, m_absmax, tensor, offsets, mask, block, m_values)
    s = _decode(s_codes, s_absmax, tensor, offsets, mask, block, s_values)
    v = s * s
    m = m + one_minus_beta1 * (grad - m)
    s = tl.sqrt_rn(v + one_minus_beta2 * (grad * grad - v))
    m = _encode_store(m, m_codes, m_absmax, tensor, offsets, mask, block, keep, m_values, m_entries, M_ZERO, False)
    s = _encode_store(s, s_codes, s_absmax, tensor, offsets, mask, block, keep, s_values, s_entries, S_ZERO, True)
    update = tl.where(mask, _lamb8_direction(m, s, theta, c1, c2, eps, decay), 0.0)
    tl.store(partials + 2 * tl.program_id(0), tl.sum(theta * theta, axis=0))
    tl.store(partials + 2 * tl.program_id(0) + 1, tl.sum(update * update, axis=0))


@triton.jit
def _lamb8_pass2(param_pointers, m_codes, m_absmax, s_codes, s_absmax, copy_pointers, block_tensors, block_starts,
                 block_lengths, block_indices, corrections, scales, m_values, s_values, eps, decay,
                 PARAM: tl.constexpr, COPY: tl.constexpr, HAS_COPY: tl.constexpr, QBLOCK: tl.constexpr):
    tensor, block, offsets, mask = _this_block(block_tensors, block_starts, block_lengths, block_indices, QBLOCK)
    c1 = tl.load(corrections + 2 * tensor)
    c2 = tl.load(corrections + 2 * tensor + 1)
    scale = tl.load(scales + tensor)

    theta = _load(param_pointers, tensor, offsets, mask, PARAM)
    m = _decode(m_codes, m_absmax, tensor, offsets, mask, block, m_values)
    s = _decode(s_codes, s_absmax, tensor, offsets, mask, block, s_values)
    theta = _store(param_pointers, tensor, offsets, mask,
                   theta + scale * _lamb8_direction(m, s, theta, c1, c2, eps, decay), PARAM)
    if HAS_COPY:
        _store(copy_pointers, tensor, offsets, mask, theta, COPY)


@triton.jit
def _lars8_pass2(param_pointers, grad_pointers, b_codes, b_absmax, copy_pointers, block_tensors, block_starts,
                 block_lengths, block_indices, scalars, ratios, values, entries, weight_decay, momentum,
                 NESTEROV: tl.constexpr, PARAM: tl.constexpr, GRAD: tl.constexpr, ZERO: tl.constexpr,
                 COPY: tl.constexpr, HAS_COPY: tl.constexpr, QBLOCK: tl.constexpr):
    tensor, block, offsets, mask = _this_block(block_tensors, block_starts, block_lengths, block_indices, QBLOCK)
    grad_factor = tl.load(scalars)
    keep = tl.load(scalars + 1)
    lr = tl.load(scalars + 2)
    ratio = tl.load(ratios + tensor)

    theta = _load(param_pointers, tensor, offsets, mask, PARAM)
    grad = _load(grad_pointers, tensor, offsets, mask, GRAD)
    grad = tl.where(keep != 0.0, grad * grad_factor, 0.0)
    scaled = (grad + weight_decay * theta) * ratio
    b = _decode(b_codes, b_absmax, tensor, offsets, mask, block, values)
    b = _encode_store(momentum * b + scaled, b_codes, b_absmax, tensor, offsets, mask, block, keep, values, entries,
                      ZERO, False)
    direction = scaled + momentum * b if NESTEROV else b
    theta = _store(param_pointers, tensor, offsets, mask, theta - lr * keep * direction, PARAM)
    if HAS_COPY:
        _store(copy_pointers, tensor, offsets, mask, theta, COPY)


# -- tables ----------------------------------------------------------------------------------------------------

class _Chunks:
    """Which program handles which elements, for tensors of these sizes: chunk c covers elements
    [starts[c], starts[c] + BLOCK) of tensor tensors[c]; tensor i's chunks are offsets[i] .. offsets[i+1]."""

    def __init__(self, numels: tuple[int, ...], device: torch.device) -> None:
        counts = [-(-n // BLOCK) for n in numels]
        self.count = sum(counts)
        self.numels = torch.tensor(numels, dtype=torch.int64, device=device)
        self.tensors = torch.repeat_interleave(torch.arange(len(numels)), torch.tensor(counts)).to(torch.int32)
        self.starts = torch.cat([torch.arange(c, dtype=torch.int64) * BLOCK for c in counts] or [torch.empty(0)])
        self.tensors, self.starts = self.tensors.to(device), self.starts.to(torch.int64).to(device)
        self.offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int64, device=device)


@functools.lru_cache(maxsize=16)
def _chunks(numels: tuple[int, ...], device: torch.device) -> _Chunks:
    """Built once per list of sizes (an optimizer's parameter list keeps its sizes), then reused."""
    return _Chunks(numels, device)


def _pointers(tensors: list[Tensor], device: torch.device) -> Tensor:
    """The int64 table of the tensors' data pointers on ``device``."""
    return _pointer_table(tuple(t.data_ptr() for t in tensors), device)


@functools.lru_cache(maxsize=64)
def _pointer_table(pointers: tuple[int, ...], device: torch.device) -> Tensor:
    """Built once per list of addresses (parameters and state keep theirs; the caching allocator mostly hands the
    gradients the same ones each step), copied to the device without making the host wait."""
    table = torch.tensor(pointers, dtype=torch.int64)
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table


def _sums_per_tensor(partials: Tensor, chunks: _Chunks) -> Tensor:
    """The float64 [n, k] sums of each tensor's chunk partial sums: a scan, then differences at the tensors'
    boundaries (deterministic, unlike atomics; a tensor whose partials are all 0 sums to exactly 0)."""
    scanned = torch.cat([partials.new_zeros(1, partials.shape[1], dtype=torch.float64), partials.double().cumsum(0)])
    return scanned[chunks.offsets[1:]] - scanned[chunks.offsets[:-1]]


class _Blocks:
    """Which program handles which block of 8-bit state, for tensors of these shapes: program k covers elements
    [starts[k], starts[k] + lengths[k]) of tensor tensors[k], whose scale is absmax entry indices[k]; tensor i's
    programs are offsets[i] .. offsets[i+1] (blocks as torchlamb.quantized.absmax_shape lays them out)."""

    def __init__(self, shapes: tuple[tuple[int, ...], ...], device: torch.device) -> None:
        tensors, starts, lengths, indices, counts = [], [], [], [], []
        for i, shape in enumerate(shapes):
            row = quantized.row_length(shape)
            rows = math.prod(shape) // row if row else 0
            per_row = -(-row // QBLOCK)
            block = torch.arange(rows * per_row, dtype=torch.int64)
            within = block % per_row * QBLOCK
            tensors.append(torch.full_like(block, i))
            starts.append(block // per_row * row + within)
            lengths.append((row - within).clamp(max=QBLOCK))
            indices.append(block)
            counts.append(rows * per_row)
        self.count = sum(counts)
        empty = torch.empty(0, dtype=torch.int64)
        self.tensors = torch.cat(tensors or [empty]).to(torch.int32).to(device)
        self.starts = torch.cat(starts or [empty]).to(device)
        self.lengths = torch.cat(lengths or [empty]).to(torch.int32).to(device)
        self.indices = torch.cat(indices or [empty]).to(device)
        self.offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int64, device=device)

    @property
    def table(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.tensors, self.starts, self.lengths, self.indices


@functools.lru_cache(maxsize=16)
def _blocks(shapes: tuple[tuple[int, ...], ...], device: torch.device) -> _Blocks:
    return _Blocks(shapes, device)


@functools.lru_cache(maxsize=8)
def _code_tables(stored: quantized.Stored, device: torch.device) -> tuple[Tensor, Tensor]:
    """A code map's values and entries on ``device``, copied once."""
    return stored.code.values.to(device), stored.code.entries.to(device)


# -- the step --------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _index(positions: tuple[int, ...], device: torch.device) -> Tensor:
    """A launch's positions in its group as a device tensor, copied to the device once."""
    return torch.tensor(positions, dtype=torch.int64, device=device)


class _Launch:
    """The tensors of one launch (one combination of parameter, gradient, state and copy dtypes): their positions in
    the group, their chunks (``blocks``: the blocks of their 8-bit state) and pointer tables, and the Triton dtypes.
    ``copy``: the pass-2 arguments of the low-precision parameters written from float32 masters (a placeholder table
    and HAS_COPY False where none)."""

    def __init__(self, positions: list[int], operands: list[list[Tensor]], copies: list[Tensor | None], kind: tuple,
                 device: torch.device, blocks: bool = False):
        self.index = _index(tuple(positions), device)
        self.chunks = (_blocks(tuple(tuple(operands[0][i].shape) for i in positions), device) if blocks
                       else _chunks(tuple(operands[0][i].numel() for i in positions), device))
        # The launch holds the tensors its pointer tables point into: a gradient copy made for this step (of another
        # dtype, or contiguous) must outlive pass 2, which may run after the other groups' pass 1 made their own.
        self.operands = [[tensors[i] for i in positions] for tensors in operands]
        self.pointers = [_pointers(tensors, device) for tensors in self.operands]
        self.kind = kind
        self.grid = (self.chunks.count,)
        copy_dtype = kind[3]
        self.copy = dict(copy_pointers=self.pointers[0] if copy_dtype is None
                         else _pointers([copies[i] for i in positions], device),
                         COPY=kind[0] if copy_dtype is None else copy_dtype, HAS_COPY=copy_dtype is not None)


def _launches(params: list[Tensor], grads: list[Tensor], states: list[list[Tensor]], device: torch.device,
              copies: list[Tensor | None] | None = None, blocks: bool = False) -> list[_Launch]:
    """One launch per (parameter, gradient, state, copy) dtype combination, operands in the order params, grads,
    states; ``copies[i]``: the low-precision parameter pass 2 writes from master ``params[i]``, or None. With
    ``blocks`` (8-bit state: codes and scales) or no states, the state takes no part in the dtypes."""
    copies = copies or [None] * len(params)
    by_kind: dict[tuple, list[int]] = {}
    for i, (p, g, c) in enumerate(zip(params, grads, copies)):
        state = None if blocks or not states else _TRITON_DTYPES[states[0][i].dtype]
        kind = (_TRITON_DTYPES[p.dtype], _TRITON_DTYPES[g.dtype], state, None if c is None else _TRITON_DTYPES[c.dtype])
        by_kind.setdefault(kind, []).append(i)
    return [_Launch(positions, [params, grads, *states], copies, kind, device, blocks)
            for kind, positions in by_kind.items()]


def _step_scalars(params: list[Tensor], grads: list[Tensor], steps: list[Tensor], lr: float | Tensor,
                  maximize: bool, grad_factor: Tensor | None, keep: Tensor | None) -> tuple:
    """What the kernels read from the device each step: [gradient factor, keep, lr] as float32 (the factor is ±1
    for maximize times the global clip factor and GradScaler's inverse scale; keep is 0 on a skipped step), and the
    contiguous gradients; counts the steps (by keep)."""
    device = params[0].device
    grads = [g if g.is_contiguous() else g.contiguous() for g in grads]  # read with their parameters' offsets
    one = torch.ones((), dtype=torch.float32, device=device)
    factor = one if grad_factor is None else grad_factor.to(device, torch.float32).reshape(())
    if maximize:
        factor = -factor
    kept = one if keep is None else keep.to(device, torch.float32).reshape(())
    lr_value = lr.to(device, torch.float32).reshape(()) if isinstance(lr, Tensor) else one * lr
    torch._foreach_add_(steps, 1 if keep is None else [keep.to(device)] * len(steps))
    return torch.stack([factor, kept, lr_value]), kept, grads


def _lr64(lr: float | Tensor, device: torch.device) -> float | Tensor:
    """lr for float64 arithmetic on the device: a float keeps all its digits."""
    return lr.to(device, torch.float64) if isinstance(lr, Tensor) else lr


def _lamb_corrections(steps: list[Tensor], beta1: float, beta2: float, bias_correction: Any) -> tuple[Tensor, Tensor]:
    """(the step counts t as lamb._precise gives them, float32 [n, 2] of c1 = 1/(1−β1^t) and c2 = 1/√(1−β2^t) per
    tensor, or ones without bias correction inside u)."""
    # Imported here: the optimizers import this package, and these are the bias-correction rules every path shares.
    from ..lamb import _precise

    t = _precise(torch.stack(steps))
    if bias_correction is True:
        corrections = torch.stack([1 / (1 - beta1**t), (1 - beta2**t).rsqrt()], 1)
    else:
        corrections = torch.ones(len(steps), 2, dtype=torch.float64, device=t.device)
    return t, corrections.to(torch.float32)


def _lamb_scale(ratio: Tensor, lr: float | Tensor, kept: Tensor, t: Tensor, beta1: float, beta2: float,
                bias_correction: Any) -> Tensor:
    """Pass 2's −lr·r per tensor in float64, times the step-size factor and the skip flag, as float32."""
    from ..lamb import _step_size_factor

    scale = ratio.to(kept.device, torch.float64) * -_lr64(lr, kept.device)
    step_size_factor = _step_size_factor(bias_correction, beta1, beta2, t)
    if step_size_factor is not None:
        scale = scale * step_size_factor
    return (scale * kept.double()).to(torch.float32)


def lamb_first_pass(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                    steps: list[Tensor], *, lr: float | Tensor, beta1: float, beta2: float, eps: float,
                    weight_decay: float, bias_correction: Any, decay_outside_ratio: bool, maximize: bool,
                    grad_factor: Tensor | None, keep: Tensor | None = None,
                    copies: list[Tensor | None] | None = None) -> FirstPass:
    """LAMB's pass 1 in Triton for tensors on one device (the arguments of ``lamb._multi_tensor_lamb``), one launch
    per combination of dtypes; the FirstPass's ``finish(ratio)`` runs pass 2, which also writes ``copies[i]`` (a
    bfloat16/float16 parameter whose float32 master is ``params[i]``) from the updated master, rounded to nearest
    even."""
    device = params[0].device
    scalars, kept, grads = _step_scalars(params, grads, steps, lr, maximize, grad_factor, keep)
    t, corrections = _lamb_corrections(steps, beta1, beta2, bias_correction)
    decay_inside = 0.0 if decay_outside_ratio else weight_decay
    decay_outside = bool(decay_outside_ratio and weight_decay != 0)

    launches = _launches(params, grads, [exp_avgs, exp_avg_sqs], device, copies)
    squares = torch.zeros(len(params), 2, dtype=torch.float64, device=device)
    for launch in launches:
        launch.corrections = corrections[launch.index].contiguous()
        if launch.chunks.count:
            partials = torch.empty(launch.chunks.count, 2, dtype=torch.float32, device=device)
            _lamb_pass1[launch.grid](
                *launch.pointers, launch.chunks.numels, launch.chunks.tensors, launch.chunks.starts,
                launch.corrections, scalars, partials, 1.0 - beta1, 1.0 - beta2, eps, decay_inside, weight_decay,
                PARAM=launch.kind[0], GRAD=launch.kind[1], STATE=launch.kind[2], DECAY_OUTSIDE=decay_outside,
                BLOCK=BLOCK)
            squares[launch.index] = _sums_per_tensor(partials, launch.chunks)

    def finish(ratio: Tensor) -> None:
        scale = _lamb_scale(ratio, lr, kept, t, beta1, beta2, bias_correction)
        for launch in launches:
            if launch.chunks.count:
                param_pointers, _, m_pointers, v_pointers = launch.pointers
                _lamb_pass2[launch.grid](
                    param_pointers, m_pointers, v_pointers, launch.copy["copy_pointers"], launch.chunks.numels,
                    launch.chunks.tensors, launch.chunks.starts, launch.corrections, scale[launch.index].contiguous(),
                    eps, decay_inside, PARAM=launch.kind[0], STATE=launch.kind[2], COPY=launch.copy["COPY"],
                    HAS_COPY=launch.copy["HAS_COPY"], BLOCK=BLOCK)

    return FirstPass(squares, finish)


def lars_first_pass(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], steps: list[Tensor],
                    *, lr: float | Tensor, momentum: float, weight_decay: float, nesterov: bool,
                    split_denominator: bool, maximize: bool, grad_factor: Tensor | None,
                    keep: Tensor | None = None, copies: list[Tensor | None] | None = None) -> FirstPass:
    """LARS's pass 1 in Triton (the arguments of ``lars._multi_tensor_lars``): ‖θ‖², ‖g‖², ‖g + λθ‖² per tensor,
    reading θ and g only; the FirstPass's ``finish(ratio)`` runs pass 2 (momentum buffer and θ, and ``copies`` as
    for :func:`lamb_first_pass`)."""
    device = params[0].device
    scalars, kept, grads = _step_scalars(params, grads, steps, lr, maximize, grad_factor, keep)
    launches = _launches(params, grads, [momentum_buffers], device, copies)
    squares = torch.zeros(len(params), 3, dtype=torch.float64, device=device)
    for launch in launches:
        if launch.chunks.count:
            partials = torch.empty(launch.chunks.count, 3, dtype=torch.float32, device=device)
            param_pointers, grad_pointers, _ = launch.pointers
            _lars_pass1[launch.grid](
                param_pointers, grad_pointers, launch.chunks.numels, launch.chunks.tensors, launch.chunks.starts,
                scalars, partials, weight_decay, PARAM=launch.kind[0], GRAD=launch.kind[1], BLOCK=BLOCK)
            squares[launch.index] = _sums_per_tensor(partials, launch.chunks)

    def finish(ratio: Tensor) -> None:
        ratios = (ratio.to(device, torch.float64) * kept.double()).to(torch.float32)
        for launch in launches:
            if launch.chunks.count:
                _lars_pass2[launch.grid](
                    *launch.pointers, launch.copy["copy_pointers"], launch.chunks.numels, launch.chunks.tensors,
                    launch.chunks.starts, scalars, ratios[launch.index].contiguous(), weight_decay, momentum,
                    NESTEROV=bool(nesterov), PARAM=launch.kind[0], GRAD=launch.kind[1], STATE=launch.kind[2],
                    COPY=launch.copy["COPY"], HAS_COPY=launch.copy["HAS_COPY"], BLOCK=BLOCK)

    return FirstPass(squares, finish)


def _codes(states: list[dict[str, Tensor]], stored: quantized.Stored) -> list[list[Tensor]]:
    return [[state[stored.codes_key] for state in states], [state[stored.absmax_key] for state in states]]


def lamb_first_pass_8bit(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]],
                         steps: list[Tensor], moments: tuple[quantized.Stored, quantized.Stored], *,
                         lr: float | Tensor, beta1: float, beta2: float, eps: float, weight_decay: float,
                         bias_correction: Any, decay_outside_ratio: bool, maximize: bool,
                         grad_factor: Tensor | None, keep: Tensor | None = None,
                         copies: list[Tensor | None] | None = None) -> FirstPass:
    """LAMB's pass 1 in Triton on 8-bit moments (``states``: each tensor's state, with the codes and scales
    ``moments`` name), one program per block: m and √v are decoded, updated, stored as codes and scales, and ‖u‖²
    summed from the values as stored; the FirstPass's ``finish(ratio)`` runs pass 2, which decodes them again."""
    device = params[0].device
    scalars, kept, grads = _step_scalars(params, grads, steps, lr, maximize, grad_factor, keep)
    t, corrections = _lamb_corrections(steps, beta1, beta2, bias_correction)
    decay_inside = 0.0 if decay_outside_ratio else weight_decay
    first, second = moments
    (m_values, m_entries), (s_values, s_entries) = _code_tables(first, device), _code_tables(second, device)
    launches = _launches(params, grads, [*_codes(states, first), *_codes(states, second)], device, copies,
                         blocks=True)
    squares = torch.zeros(len(params), 2, dtype=torch.float64, device=device)
    for launch in launches:
        launch.corrections = corrections[launch.index].contiguous()
        if launch.chunks.count:
            partials = torch.empty(launch.chunks.count, 2, dtype=torch.float32, device=device)
            _lamb8_pass1[launch.grid](
                *launch.pointers, *launch.chunks.table, launch.corrections, scalars, partials, m_values, m_entries,
                s_values, s_entries, 1.0 - beta1, 1.0 - beta2, eps, decay_inside, weight_decay,
                PARAM=launch.kind[0], GRAD=launch.kind[1], M_ZERO=first.code.zero, S_ZERO=second.code.zero,
                DECAY_OUTSIDE=bool(decay_outside_ratio and weight_decay != 0), QBLOCK=QBLOCK)
            squares[launch.index] = _sums_per_tensor(partials, launch.chunks)

    def finish(ratio: Tensor) -> None:
        scale = _lamb_scale(ratio, lr, kept, t, beta1, beta2, bias_correction)
        for launch in launches:
            if launch.chunks.count:
                param_pointers, _, m_codes, m_absmax, s_codes, s_absmax = launch.pointers
                _lamb8_pass2[launch.grid](
                    param_pointers, m_codes, m_absmax, s_codes, s_absmax, launch.copy["copy_pointers"],
                    *launch.chunks.table, launch.corrections, scale[launch.index].contiguous(), m_values, s_values,
                    eps, decay_inside, PARAM=launch.kind[0], COPY=launch.copy["COPY"],
                    HAS_COPY=launch.copy["HAS_COPY"], QBLOCK=QBLOCK)

    return FirstPass(squares, finish)


def lars_first_pass_8bit(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]],
                         steps: list[Tensor], buffer: quantized.Stored, *, lr: float | Tensor, momentum: float,
                         weight_decay: float, nesterov: bool, split_denominator: bool, maximize: bool,
                         grad_factor: Tensor | None, keep: Tensor | None = None,
                         copies: list[Tensor | None] | None = None) -> FirstPass:
    """LARS's pass 1 in Triton (the norms; it does not read the buffer), then, in ``finish(ratio)``, pass 2 on the
    8-bit momentum buffer, one program per block: b decoded, b ← μb + r·u stored as codes and a scale, θ moved by
    the buffer as stored."""
    device = params[0].device
    scalars, kept, grads = _step_scalars(params, grads, steps, lr, maximize, grad_factor, keep)
    squares = torch.zeros(len(params), 3, dtype=torch.float64, device=device)
    for launch in _launches(params, grads, [], device):
        if launch.chunks.count:
            partials = torch.empty(launch.chunks.count, 3, dtype=torch.float32, device=device)
            param_pointers, grad_pointers = launch.pointers
            _lars_pass1[launch.grid](
                param_pointers, grad_pointers, launch.chunks.numels, launch.chunks.tensors, launch.chunks.starts,
                scalars, partials, weight_decay, PARAM=launch.kind[0], GRAD=launch.kind[1], BLOCK=BLOCK)
            squares[launch.index] = _sums_per_tensor(partials, launch.chunks)
    values, entries = _code_tables(buffer, device)
    launches = _launches(params, grads, _codes(states, buffer), device, copies, blocks=True)

    def finish(ratio: Tensor) -> None:
        ratios = (ratio.to(device, torch.float64) * kept.double()).to(torch.float32)
        for launch in launches:
            if launch.chunks.count:
                _lars8_pass2[launch.grid](
                    *launch.pointers, launch.copy["copy_pointers"], *launch.chunks.table, scalars,
                    ratios[launch.index].contiguous(), values, entries, weight_decay, momentum,
                    NESTEROV=bool(nesterov), PARAM=launch.kind[0], GRAD=launch.kind[1], ZERO=buffer.code.zero,
                    COPY=launch.copy["COPY"], HAS_COPY=launch.copy["HAS_COPY"], QBLOCK=QBLOCK)

    return FirstPass(squares, finish)
