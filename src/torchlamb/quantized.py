"""Block-wise 8-bit storage of optimizer state (``state_dtype="8bit"``), after Dettmers et al. 2021, "8-bit
Optimizers via Block-wise Quantization".

A state tensor x (a moment, a momentum buffer) is stored as one byte per element plus one float32 per block of
``BLOCK`` = 256 consecutive elements of one row: a row is one index of the first dimension (the rest flattened; a
1-D tensor is one row), the last block of each row may be shorter, and the scales are shaped [rows, blocks per row]
(:func:`absmax_shape`). Blocks never cross rows, so under FSDP2, which shards the first dimension, every process
holds whole blocks of its rows::

    absmax_b = max |x_i| over block b
    code_i   = the index of the entry of the code map nearest to x_i · (1/absmax_b)  (stored as uint8)
    x_i     ≈ map[code_i] · absmax_b                                              (dequantized)

The code map is a sorted table of 256 float32 values in [-1, 1] (signed, for LAMB's first moment and LARS's
momentum) or [0, 1] (unsigned, for LAMB's second moment), with fine resolution near zero: see :func:`code_map`.
"Nearest" is decided against the midpoints between neighbouring entries: the code is the number of midpoints
strictly below x·(1/absmax), so a value exactly on a midpoint takes the lower code. Every path (this module's torch
functions, the fused kernels) computes the block's reciprocal 1/absmax as one correctly rounded float32 division
and x·(1/absmax) as one correctly rounded product (a multiplication per element, not a division: the kernels'
cost), and compares it with the same float32 midpoints, so every path stores the same codes for the same values.
A block whose absmax is 0 stores the code of 0 everywhere and dequantizes to 0 without a division.

LAMB's second moment is stored as s = √v, not v: √v spans half the orders of magnitude of v, so a block needs half
the dynamic range, and u = m̂/(√v̂ + ε) uses √v anyway. And a positive s is never stored as 0: where rounding to
nearest would give the 0 code, it takes the smallest positive one instead. A coordinate whose s rounded to 0 while
its m did not (an embedding row that went many steps without a gradient: v decays like β2^k, m like β1^k, but m
keeps a residue) would make m/(0 + ε) huge and wreck ‖u‖, hence the trust ratio of its whole tensor.

Tensors with fewer than ``MIN_NUMEL`` = 4096 elements keep float32 state: their bytes do not matter, and biases and
norm scales are where quantization would hurt most.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

# Elements per block: each block has its own absmax, so an outlier only coarsens its own block's codes. 256 values
# cost 4/256 = 1.6% extra bytes for the scales (see docs/low-memory-state.md for the measurement behind it).
BLOCK = 256
# Tensors smaller than this keep their state in float32.
MIN_NUMEL = 4096
# How many orders of magnitude below a block's absmax the code maps resolve.
DECADES = 7


@dataclass(frozen=True)
class CodeMap:
    """A sorted table of 256 float32 values and the 255 midpoints between neighbours (the rounding boundaries).

    ``entries`` gives the fused kernels the code in one table read: for each pattern p of a float32's upper 16
    bits, ``entries[p] = start | threshold << 8``, where ``start`` is the number of midpoints below every float
    with that pattern and ``threshold`` places the one midpoint (there is at most one) inside the pattern's range,
    as the ``order_key`` of its lower 16 bits (0xFFFF: none). The code of x is ``start + (order_key(x) >
    threshold)``: floats with the same upper bits are ordered by their lower bits (reversed when negative).
    """

    values: Tensor
    midpoints: Tensor
    entries: Tensor
    signed: bool

    @functools.cached_property
    def zero(self) -> int:
        """The code of 0, found once (the kernels' launches read it every step)."""
        return int((self.values == 0).nonzero()[0, 0])


def _dynamic_magnitudes(bits: int) -> list[float]:
    """The positive values of a dynamic map with ``bits`` bits of magnitude: ``bits`` decades 10^-e (e = 0..bits-1);
    decade e has 2^(bits-1-e) values spread linearly over (0.1, 1]·10^-e, the last one at its top. So the largest
    magnitudes get the most codes (64 in (0.1, 1] for 7 bits) and small ones fewer, down to 10^-(bits-1)."""
    values = []
    for e in range(bits):
        count = 2 ** (bits - 1 - e)
        values += [10.0**-e * (0.1 + 0.9 * (j + 1) / count) for j in range(count)]
    return values


def _log_magnitudes(count: int) -> list[float]:
    """``count`` positive values spaced evenly in log from 10^-DECADES to 1: the same relative spacing everywhere."""
    return [10.0 ** (-DECADES * (1 - k / (count - 1))) for k in range(count)]


@functools.cache
def code_map(signed: bool, kind: str = "dynamic") -> CodeMap:
    """The code map: ``kind`` "dynamic" (Dettmers et al.'s idea of an exponent and a linear fraction: 7 decades for
    the signed map, 8 for the unsigned one) or "log" (evenly spaced in log over ``DECADES`` = 7 decades).

    The signed map holds 0, ±127 magnitudes and, as the 256th value, half the smallest magnitude (the widest gap
    in the table, between 0 and its neighbours); the unsigned map holds 0 and 255 magnitudes. Both hold exactly 1,
    so an element equal to its block's absmax is stored exactly, and 0.
    """
    if kind == "dynamic":
        magnitudes = _dynamic_magnitudes(7 if signed else 8)
    elif kind == "log":
        magnitudes = _log_magnitudes(127 if signed else 255)
    else:
        raise ValueError(f"unknown code map kind {kind!r}: 'dynamic' or 'log'")
    values = [0.0, *magnitudes, *([-m for m in magnitudes] if signed else [])]
    if signed:  # 255 values so far: the 256th halves the widest gap, between 0 and the smallest magnitude
        values.append(min(magnitudes) / 2)
    table = torch.tensor(sorted(values), dtype=torch.float64)
    assert table.numel() == 256 and bool((table[1:] > table[:-1]).all())
    values32 = table.to(torch.float32)
    midpoints = ((values32[1:].double() + values32[:-1].double()) / 2).to(torch.float32)
    return CodeMap(values32, midpoints, _entries(midpoints), signed)


def order_key(bits: Tensor) -> Tensor:
    """The lower 16 bits of float32 bit patterns (int64), reversed for negative floats: among floats with the same
    upper 16 bits, a larger key is a larger float."""
    low = bits & 0xFFFF
    return torch.where(bits & 0x80000000 != 0, 0xFFFF - low, low)


def _entries(midpoints: Tensor) -> Tensor:
    """See :class:`CodeMap`. The smallest float with a given upper half has lower half 0 when it is positive and
    0xFFFF when it is negative (the largest magnitude); a NaN pattern takes the last code, as torch.bucketize."""
    upper = torch.arange(65536, dtype=torch.int64)
    bits = (upper << 16) | torch.where(upper >= 0x8000, 0xFFFF, 0)
    smallest = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)
    starts = torch.bucketize(smallest, midpoints).clamp(max=255)
    thresholds = torch.full((65536,), 0xFFFF, dtype=torch.int64)
    mid_bits = midpoints.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    patterns = mid_bits >> 16
    # The one-read code needs at most one midpoint per pattern: true when neighbouring values differ by more than
    # a float's relative spacing at 7 mantissa bits (1/128), as in both maps.
    if patterns.unique().numel() != patterns.numel():
        raise ValueError("a code map with two midpoints inside one 16-bit float pattern cannot be read in one step")
    thresholds[patterns] = order_key(mid_bits)
    return (starts | thresholds << 8).to(torch.int32)


def sqrt_rn(x: Tensor) -> Tensor:
    """√x in float32, correctly rounded as the kernels' (hardware) square root is: torch's CPU sqrt can be one unit
    in the last place off when √x lies within a hair of a rounding boundary, and then the stored s would differ
    from the kernels'. Computed in float64 (correctly rounding a float64 square root to float32 is exact)."""
    return x.double().sqrt().float()


def row_length(shape: Sequence[int]) -> int:
    """The elements in one row of a tensor of ``shape``: a row is one index of its first dimension (the one FSDP2
    shards), flattened; a 1-D tensor is one row. Blocks never cross rows, so each process's shard holds whole
    blocks."""
    return math.prod(shape[1:]) if len(shape) >= 2 else math.prod(shape)


def absmax_shape(shape: Sequence[int], block: int = BLOCK) -> tuple[int, ...]:
    """The shape of the block scales of a state tensor of ``shape``: (rows, blocks per row) for two or more
    dimensions, (blocks,) for one. Each row is cut into blocks of ``block`` elements, its last block shorter."""
    per_row = math.ceil(row_length(shape) / block)
    return (shape[0], per_row) if len(shape) >= 2 else (per_row,)


def quantizes(param: Tensor) -> bool:
    """Whether ``param``'s state is stored in 8 bits under ``state_dtype="8bit"``: real floating tensors of two or
    more dimensions and at least ``MIN_NUMEL`` elements. One-dimensional ones (biases, norm scales) keep float32
    state: they are small, quantization would hurt them most, and FSDP2 cuts them at arbitrary elements."""
    return param.is_floating_point() and param.dim() >= 2 and param.numel() >= MIN_NUMEL


def _padded_blocks(x: Tensor, block: int) -> Tensor:
    """``x`` as [blocks, block] in the order of :func:`absmax_shape`, each row's last block padded with zeros
    (which change no absmax)."""
    rows = x.shape[0] if x.dim() >= 2 else 1
    length = row_length(x.shape)
    per_row = math.ceil(length / block)
    flat = x.reshape(rows, length)
    if per_row * block != length:
        flat = torch.nn.functional.pad(flat, (0, per_row * block - length))
    return flat.reshape(rows * per_row, block)


def _unpadded(blocked: Tensor, shape: Sequence[int], block: int) -> Tensor:
    """The inverse of :func:`_padded_blocks`: [blocks, block] back to ``shape``."""
    rows = shape[0] if len(shape) >= 2 else 1
    length = row_length(shape)
    return blocked.reshape(rows, -1)[:, :length].reshape(shape).contiguous()


def quantize(x: Tensor, code: CodeMap, floor: bool = False, block: int = BLOCK) -> tuple[Tensor, Tensor]:
    """(codes, absmax) of ``x`` (float32): uint8 codes of ``x``'s shape and one float32 absmax per block, shaped
    as :func:`absmax_shape`.

    ``floor``: a positive value never takes the code of 0 (for the unsigned map of √v, see the module docstring).
    """
    rows = _padded_blocks(x.detach().float(), block)
    absmax = rows.abs().amax(dim=1)
    scale = absmax.unsqueeze(1)
    inverse = 1.0 / torch.where(scale > 0, scale, 1.0)  # one division per block
    normalized = torch.where(scale > 0, rows * inverse, 0.0)
    midpoints = code.midpoints.to(x.device)
    codes = torch.bucketize(normalized, midpoints)  # the number of midpoints strictly below: ties go down
    if floor:
        codes = torch.where((rows > 0) & (codes == code.zero), code.zero + 1, codes)
    return _unpadded(codes.to(torch.uint8), x.shape, block), absmax.reshape(absmax_shape(x.shape, block))


def dequantize(codes: Tensor, absmax: Tensor, code: CodeMap, block: int = BLOCK) -> Tensor:
    """The float32 values that ``codes`` and ``absmax`` stand for, in ``codes``' shape."""
    values = code.values.to(codes.device)[codes.long()]
    return _unpadded(_padded_blocks(values, block) * absmax.reshape(-1, 1), codes.shape, block)


@dataclass(frozen=True)
class QuantizedKey:
    """How one float state key (e.g. LAMB's ``"exp_avg_sq"``) is kept in 8 bits: as ``{name}_codes`` (uint8, the
    parameter's shape) and ``{name}_absmax`` (float32, one per block: :func:`absmax_shape`) in the parameter's
    state.

    ``sqrt``: the stored quantity is √x (LAMB's second moment), with unsigned codes that never round a positive
    value to 0; else x itself, with signed codes.
    """

    key: str
    name: str
    sqrt: bool = False

    @property
    def codes_key(self) -> str:
        return f"{self.name}_codes"

    @property
    def absmax_key(self) -> str:
        return f"{self.name}_absmax"

    @property
    def code(self) -> CodeMap:
        return code_map(signed=not self.sqrt)

    def global_shape(self, key: str, shape: Sequence[int]) -> tuple[int, ...]:
        """The shape of state ``key`` (codes or absmax) for a parameter of ``shape``."""
        return tuple(shape) if key == self.codes_key else absmax_shape(shape)

    def zeros(self, param: Tensor) -> dict[str, Tensor]:
        """The state of a zero tensor shaped like ``param``."""
        codes = torch.full(param.shape, self.code.zero, dtype=torch.uint8, device=param.device)
        return {self.codes_key: codes,
                self.absmax_key: torch.zeros(absmax_shape(param.shape), dtype=torch.float32, device=param.device)}

    def load(self, state: dict[str, Tensor]) -> Tensor:
        """The stored quantity (x, or √x), dequantized to float32."""
        return dequantize(state[self.codes_key], state[self.absmax_key], self.code)

    def save_(self, state: dict[str, Tensor], stored: Tensor, step_weight: Tensor | None = None) -> None:
        """Quantize ``stored`` (x, or √x) into ``state``'s codes and absmax, in place; with a ``step_weight``
        (0-dim, 0 on a skipped step, else 1), nothing changes where it is 0."""
        codes, absmax = quantize(stored, self.code, floor=self.sqrt)
        if step_weight is not None:
            applies = step_weight.bool()
            codes = torch.where(applies, codes, state[self.codes_key])
            absmax = torch.where(applies, absmax, state[self.absmax_key])
        state[self.codes_key].copy_(codes)
        state[self.absmax_key].copy_(absmax)

    def to_float(self, state: dict[str, Tensor]) -> Tensor:
        """The float32 value of the state key (x = (√x)² where √x is stored)."""
        stored = self.load(state)
        return stored.square() if self.sqrt else stored

    def from_float(self, value: Tensor) -> dict[str, Tensor]:
        """The 8-bit state of a float state value (√ taken first where √x is stored)."""
        value = value.float()
        codes, absmax = quantize(sqrt_rn(value.clamp(min=0)) if self.sqrt else value, self.code, floor=self.sqrt)
        return {self.codes_key: codes, self.absmax_key: absmax}

    def check(self, state: dict[str, Any], param: Tensor, label: str) -> None:
        """Raise ValueError unless ``state`` holds this key's codes and absmax as ``param``'s 8-bit state would."""
        expected = {self.codes_key: (tuple(param.shape), torch.uint8),
                    self.absmax_key: (absmax_shape(param.shape), torch.float32)}
        for key, (shape, dtype) in expected.items():
            value = state[key]
            if not isinstance(value, Tensor) or tuple(value.shape) != shape or value.dtype != dtype:
                got = (f"shape {tuple(value.shape)} and dtype {value.dtype}" if isinstance(value, Tensor)
                       else type(value).__name__)
                raise ValueError(f"state of {label}: {key!r} has {got}, expected shape {shape} and dtype {dtype}")
