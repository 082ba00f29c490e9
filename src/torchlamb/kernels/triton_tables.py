"""How the Triton kernels reach their tensors: tables built on the host, cached, and copied to the device once.

A launch covers the tensors of one dtype combination. Its kernels get one int64 table of data pointers per operand
(cast to typed pointers in the kernel, the dtype a compile-time constant) and one table of which program handles
which elements: chunks of ``BLOCK`` elements (float state) or blocks of ``QBLOCK`` values within rows (8-bit state).
Tables are cached by the tensors' addresses and sizes, so a step with the same tensors copies nothing.
"""

from __future__ import annotations

import functools
import math

import torch
import triton.language as tl
from torch import Tensor

from .. import quantized
from .triton_kernels import BLOCK, QBLOCK

TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


class Chunks:
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
def chunks(numels: tuple[int, ...], device: torch.device) -> Chunks:
    """Built once per list of sizes (an optimizer's parameter list keeps its sizes), then reused."""
    return Chunks(numels, device)


def pointers(tensors: list[Tensor], device: torch.device) -> Tensor:
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


def sums_per_tensor(partials: Tensor, chunks: Chunks) -> Tensor:
    """The float64 [n, k] sums of each tensor's chunk partial sums: a scan, then differences at the tensors'
    boundaries (deterministic, unlike atomics; a tensor whose partials are all 0 sums to exactly 0)."""
    scanned = torch.cat([partials.new_zeros(1, partials.shape[1], dtype=torch.float64), partials.double().cumsum(0)])
    return scanned[chunks.offsets[1:]] - scanned[chunks.offsets[:-1]]


class Blocks:
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
def blocks(shapes: tuple[tuple[int, ...], ...], device: torch.device) -> Blocks:
    return Blocks(shapes, device)


@functools.lru_cache(maxsize=8)
def code_tables(stored: quantized.QuantizedKey, device: torch.device) -> tuple[Tensor, Tensor]:
    """A code map's values and entries on ``device``, copied once."""
    return stored.code.values.to(device), stored.code.entries.to(device)


@functools.lru_cache(maxsize=64)
def _index(positions: tuple[int, ...], device: torch.device) -> Tensor:
    """A launch's positions in its group as a device tensor, copied to the device once."""
    return torch.tensor(positions, dtype=torch.int64, device=device)


class Launch:
    """The tensors of one launch (one combination of parameter, gradient, state and copy dtypes): their positions in
    the group, their chunks (``by_block``: the blocks of their 8-bit state) and pointer tables, and the Triton dtypes.
    ``copy``: the pass-2 arguments of the low-precision parameters written from float32 masters (a placeholder table
    and HAS_COPY False where none)."""

    def __init__(self, positions: list[int], operands: list[list[Tensor]], copies: list[Tensor | None], kind: tuple,
                 device: torch.device, by_block: bool = False):
        self.index = _index(tuple(positions), device)
        self.chunks = (blocks(tuple(tuple(operands[0][i].shape) for i in positions), device) if by_block
                       else chunks(tuple(operands[0][i].numel() for i in positions), device))
        # The launch holds the tensors its pointer tables point into: a gradient copy made for this step (of another
        # dtype, or contiguous) must outlive pass 2, which may run after the other groups' pass 1 made their own.
        self.operands = [[tensors[i] for i in positions] for tensors in operands]
        self.pointers = [pointers(tensors, device) for tensors in self.operands]
        self.kind = kind
        self.grid = (self.chunks.count,)
        copy_dtype = kind[3]
        self.copy = dict(copy_pointers=self.pointers[0] if copy_dtype is None
                         else pointers([copies[i] for i in positions], device),
                         COPY=kind[0] if copy_dtype is None else copy_dtype, HAS_COPY=copy_dtype is not None)


def launches(params: list[Tensor], grads: list[Tensor], states: list[list[Tensor]], device: torch.device,
              copies: list[Tensor | None] | None = None, by_block: bool = False) -> list[Launch]:
    """One launch per (parameter, gradient, state, copy) dtype combination, operands in the order params, grads,
    states; ``copies[i]``: the low-precision parameter pass 2 writes from master ``params[i]``, or None. With
    ``by_block`` (8-bit state: codes and scales) or no states, the state takes no part in the dtypes."""
    copies = copies or [None] * len(params)
    by_kind: dict[tuple, list[int]] = {}
    for i, (p, g, c) in enumerate(zip(params, grads, copies)):
        state = None if by_block or not states else TRITON_DTYPES[states[0][i].dtype]
        kind = (TRITON_DTYPES[p.dtype], TRITON_DTYPES[g.dtype], state, None if c is None else TRITON_DTYPES[c.dtype])
        by_kind.setdefault(kind, []).append(i)
    return [Launch(positions, [params, grads, *states], copies, kind, device, by_block)
            for kind, positions in by_kind.items()]
