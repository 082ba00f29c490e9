"""Layer-wise norms when a model is spread over processes.

The trust ratio needs each tensor's *whole* ‖θ‖ and ‖u‖. Under FSDP2 (``torch.distributed.fsdp.fully_shard``) a
parameter is a DTensor of which each process holds a shard (dim 0, possibly uneven or empty); summing squares over
the local shard alone gives a per-shard ratio, the silent error of most distributed LAMBs. torchlamb computes every
tensor's local sums of squares, packs them into one tensor and all-reduces it once per step over the mesh dimensions
the parameters are sharded on, then updates the local shards with the global ratios.

Under ``ZeroRedundancyOptimizer`` each process's optimizer owns whole tensors, so their norms are already whole; only
the global gradient norm (``max_grad_norm``) must sum over processes: pass ``partition_group``.
Under DDP every process holds every tensor whole and the same gradients: nothing to do.

FSDP1 (``FullyShardedDataParallel``) flattens tensors into flat parameters and hides their boundaries: the
optimizers refuse its parameters (see :func:`check_not_fsdp1`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .trust import squared_norm

try:  # torch.distributed is absent from some builds (e.g. some macOS wheels)
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import Shard
except ImportError:  # pragma: no cover - depends on the torch build
    dist = None
    DTensor = None
    Shard = None


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (FSDP2, tensor parallelism): each process holds part of it."""
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensors: Sequence[Tensor]) -> list[Tensor]:
    """This process's part of each tensor: the local shard of a DTensor (a view: in-place updates reach the DTensor),
    the tensor itself otherwise."""
    return [t.to_local() if is_sharded(t) else t for t in tensors]


def check_not_fsdp1(tensor: Tensor, where: str) -> None:
    """Raise for FSDP1 flat parameters (and the views FSDP1 makes of original parameters): their tensor boundaries are
    lost or each process sees a flattened slice, so per-tensor norms would silently be per-shard."""
    if getattr(tensor, "_is_flat_param", False) or getattr(tensor, "_fsdp_flattened", False):
        raise TypeError(f"{where} is an FSDP1 (FullyShardedDataParallel) flattened parameter: layer-wise optimizers "
                        "need each tensor's whole norm, which FSDP1's flat shards hide. Use FSDP2 "
                        "(torch.distributed.fsdp.fully_shard), which torchlamb supports, or DDP.")


def _shard_key(tensor: Tensor) -> tuple[Any, tuple[int, ...]] | None:
    """(mesh, mesh dims the tensor is sharded on) for a DTensor with some Shard placement, else None."""
    if not is_sharded(tensor):
        return None
    dims = tuple(i for i, placement in enumerate(tensor.placements) if isinstance(placement, Shard))
    return (tensor.device_mesh, dims) if dims else None


def _all_reduce_sum_(values: Tensor, mesh: Any, dims: tuple[int, ...]) -> None:
    for dim in dims:
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=mesh.get_group(dim))


def sum_over_shards_(squares: Tensor, params: Sequence[Tensor]) -> Tensor:
    """Turn per-tensor local sums of squares (rows of ``squares``, one per parameter) into whole-tensor sums, in place.

    Rows of sharded parameters are summed over the processes holding their shards: one all-reduce for all the
    tensors sharded alike (the usual FSDP2 case: one per step). Other rows are left as they are.
    """
    keys = [_shard_key(p) for p in params]
    for key in dict.fromkeys(k for k in keys if k is not None):
        rows = [i for i, k in enumerate(keys) if k == key]
        if len(rows) == len(keys):
            _all_reduce_sum_(squares, *key)
        else:
            index = torch.tensor(rows, device=squares.device)
            packed = squares.index_select(0, index)
            _all_reduce_sum_(packed, *key)
            squares.index_copy_(0, index, packed)
    return squares


def any_sharded(params: Sequence[Tensor]) -> bool:
    return any(_shard_key(p) is not None for p in params)


def grad_norm(grads: Sequence[Tensor], *, partition_group: Any | None, device: torch.device) -> Tensor:
    """The L2 norm of all the model's gradients, wherever they live, as a 0-dim tensor on ``device``.

    Sharded gradients' squares are summed over their shards; with ``partition_group`` (ZeroRedundancyOptimizer: each
    process holds a disjoint share of whole tensors) the plain ones are summed over the group. Every process must call
    this, even one without gradients, as the collectives need every process.
    """
    keys = [_shard_key(g) for g in grads]
    total = squared_norm([g for g, k in zip(grads, keys) if k is None], device=device)
    if partition_group is not None:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=partition_group)
    for key in dict.fromkeys(k for k in keys if k is not None):
        part = squared_norm([g.to_local() for g, k in zip(grads, keys) if k == key], device=device)
        _all_reduce_sum_(part, *key)
        total = total + part
    return total.sqrt()


def agree_(flag: Tensor, grads: Sequence[Tensor], partition_group: Any | None) -> Tensor:
    """Make a 0-dim float flag the maximum over the processes that share the model with this one, in place: over
    ``partition_group`` and over the mesh dimensions the gradients are sharded on. A single process: unchanged."""
    if partition_group is not None:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=partition_group)
    for mesh, dims in dict.fromkeys(k for k in (_shard_key(g) for g in grads) if k is not None):
        for dim in dims:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))
    return flag
