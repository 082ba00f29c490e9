"""Layer-wise norms when a model is spread over processes.

The trust ratio needs each tensor's *whole* ‖θ‖ and ‖u‖. Under FSDP2 (``torch.distributed.fsdp.fully_shard``) a
parameter is a DTensor of which each process holds a shard (dim 0, possibly uneven or empty); summing squares over
the local shard alone gives a per-shard ratio, the silent error of most distributed LAMBs. torchlamb computes every
tensor's local sums of squares, packs them into one tensor, sums them over the processes that hold the other pieces
of each tensor, then updates the local shards with the global ratios.

Over which processes: a DTensor lives on a device mesh with one placement per mesh dimension. Its squares are summed
over the process group of every mesh dimension that splits it — ``Shard`` or ``_StridedShard`` (FSDP2 over tensor
parallelism), which in torch 2.13 is not a ``Shard`` subclass, so the rule is "neither Replicate nor Partial" — and
over no other: a ``Replicate`` dimension holds copies, and summing over it would count the tensor once per copy. ::

    FSDP2, 1-D mesh          (Shard(0),)                       summed over the mesh: 1 all-reduce per step
    HSDP, fully_shard on a   (Replicate(), Shard(0))           summed over the shard dimension only: 1
    2-D (replicate, shard) mesh
    FSDP2 × tensor parallel  (_StridedShard(0), Shard(0)) colwise, (Shard(0), Shard(1)) rowwise weights: dp and tp;
                             (Shard(0), Replicate()) rowwise biases, SequenceParallel norms: dp only. 2 all-reduces

Each distinct process group gets one all-reduce per step, of the packed rows of the tensors summed over it. Sums over
different mesh dimensions commute, so summing over dp and then over tp is exactly the sum over the dp × tp processes.
The other rule, one all-reduce per distinct *set* of mesh dimensions over a flattened sub-mesh, would take 1 instead
of 2 collectives where every tensor is split on both dimensions, but up to 2^d − 1 on a d-dimensional mesh where the
sets differ; and it needs a new process group per set, created by every process in the same order (on GPUs, an NCCL
communicator and its buffers each), through the private ``DeviceMesh._flatten``. Per process group, the count is
at most the number of mesh dimensions, and the groups already exist. The messages are a few KB (one float64 per tensor
per column): latency, not bandwidth, is the cost either way. :func:`sum_over_shards_` (the trust stage),
:func:`grad_norm` (``max_grad_norm``) and :func:`agree_` (skipping a step) all use this one rule.

A gradient may be ``Partial`` (each process holds a summand) under tensor parallelism without FSDP2, e.g. the norms of
``SequenceParallel``; FSDP2 reduces those itself. :func:`local` sums such a gradient (DTensor's redistribute to
Replicate, one all-reduce per tensor each time it is read) before the update uses it, as torch's own optimizers do.

Under ``ZeroRedundancyOptimizer`` each process's optimizer owns whole tensors, so their norms are already whole; only
the global gradient norm (``max_grad_norm``) must sum over processes: pass ``partition_group``.
Under DDP every process holds every tensor whole and the same gradients: nothing to do.

FSDP1 (``FullyShardedDataParallel``) flattens tensors into flat parameters and hides their boundaries: the
optimizers refuse its parameters (see :func:`check_not_fsdp1`).
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from .trust import norm_dtype, squared_norm

try:  # torch.distributed is absent from some builds (e.g. some macOS wheels)
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate
except ImportError:  # pragma: no cover - depends on the torch build
    dist = None
    DTensor = None
    Replicate = None
try:  # private modules whose caches clear_dtensor_caches empties; the import above has already loaded them
    from torch.distributed.tensor import _collective_utils, _redistribute
except ImportError:  # pragma: no cover - depends on the torch build and version
    _collective_utils = None
    _redistribute = None


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (FSDP2, tensor parallelism): each process holds part of it."""
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensors: Sequence[Tensor]) -> list[Tensor]:
    """This process's part of each tensor: the local shard of a DTensor (a view: in-place updates reach the DTensor),
    the tensor itself otherwise. A DTensor with a ``Partial`` placement (a gradient under tensor parallelism) is first
    summed over those mesh dimensions: its part is then the whole sum, not this process's summand."""
    return [_local(t) for t in tensors]


def _local(tensor: Tensor) -> Tensor:
    if not is_sharded(tensor):
        return tensor
    if any(p.is_partial() for p in tensor.placements):
        tensor = tensor.redistribute(placements=[Replicate() if p.is_partial() else p for p in tensor.placements])
    return tensor.to_local()


def shards_only_rows(tensor: Tensor) -> bool:
    """Whether every process holds whole rows (indices of the first dimension) of ``tensor``: a plain tensor, or a
    DTensor split along its first dimension only (FSDP2), or replicated."""
    return not is_sharded(tensor) or all(p.is_replicate() or (p.is_shard() and p.dim == 0)
                                         for p in tensor.placements)


def placed_like(local: Tensor, like: Tensor, shape: Sequence[int]) -> Tensor:
    """``local`` as this process's part of a DTensor of ``shape`` placed as ``like`` (its mesh and placements), or
    ``local`` itself when ``like`` is a plain tensor. For state whose rows follow the parameter's rows."""
    if not is_sharded(like):
        return local
    stride = [1] * len(shape)
    for dim in range(len(shape) - 2, -1, -1):
        stride[dim] = stride[dim + 1] * shape[dim + 1]
    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False, shape=torch.Size(shape),
                              stride=tuple(stride))


def check_not_fsdp1(tensor: Tensor, where: str) -> None:
    """Raise for FSDP1 flat parameters (and the views FSDP1 makes of original parameters): their tensor boundaries are
    lost or each process sees a flattened slice, so per-tensor norms would silently be per-shard."""
    if getattr(tensor, "_is_flat_param", False) or getattr(tensor, "_fsdp_flattened", False):
        raise TypeError(f"{where} is an FSDP1 (FullyShardedDataParallel) flattened parameter: layer-wise optimizers "
                        "need each tensor's whole norm, which FSDP1's flat shards hide. Use FSDP2 "
                        "(torch.distributed.fsdp.fully_shard), which torchlamb supports, or DDP.")


def summed_over(tensor: Tensor) -> tuple[Any, ...]:
    """The process groups over which the local sums of squares of ``tensor`` add up to the whole tensor's: one per
    mesh dimension that splits it (its placement is neither Replicate nor Partial, which :func:`local` makes
    Replicate), none for a plain tensor. Dimensions of size 1 are left out: there is nothing to sum."""
    if not is_sharded(tensor):
        return ()
    mesh = tensor.device_mesh
    return tuple(mesh.get_group(dim) for dim, placement in enumerate(tensor.placements)
                 if not (placement.is_replicate() or placement.is_partial()) and mesh.size(dim) > 1)


def _all_reduce_rows_(values: Tensor, groups: Sequence[tuple[Any, ...]], op: str) -> Tensor:
    """Reduce (``op``: "SUM" or "MAX") row ``i`` of ``values`` over each process group in ``groups[i]``, in place: one
    all-reduce per distinct group, of the rows that need it (packed with index_select when not all do). Every process
    of a group must pass the same groups in the same order, which holds as they hold the same tensors."""
    for group in dict.fromkeys(group for row in groups for group in row):
        reduce_op = getattr(dist.ReduceOp, op)  # here: without torch.distributed there is no group to reach this
        rows = [i for i, row in enumerate(groups) if group in row]
        if len(rows) == len(groups):
            dist.all_reduce(values, op=reduce_op, group=group)
        else:
            index = torch.tensor(rows, device=values.device)
            packed = values.index_select(0, index)
            dist.all_reduce(packed, op=reduce_op, group=group)
            values.index_copy_(0, index, packed)
    return values


def sum_over_shards_(squares: Tensor, params: Sequence[Tensor]) -> Tensor:
    """Turn per-tensor local sums of squares (rows of ``squares``, one per parameter) into whole-tensor sums, in place.

    Each row is summed over the process groups of :func:`summed_over`: one all-reduce per distinct group for all the
    tensors (one per step under FSDP2 and HSDP, two under FSDP2 × tensor parallelism). Other rows stay as they are.
    """
    return _all_reduce_rows_(squares, [summed_over(p) for p in params], "SUM")


def any_sharded(params: Sequence[Tensor]) -> bool:
    # By the set of types first: plain tensors are passed over without a Python call each (2000 tensors: 0.05 ms
    # against 0.29 ms calling is_sharded on each; best of 300 calls).
    if DTensor is None or not any(issubclass(kind, DTensor) for kind in {type(param) for param in params}):
        return False
    return any(map(summed_over, filter(is_sharded, params)))


def grad_norm(grads: Sequence[Tensor], *, partition_group: Any | None, device: torch.device) -> Tensor:
    """The L2 norm of all the model's gradients, wherever they live, as a 0-dim tensor on ``device``.

    Sharded gradients' squares are summed over their shards; with ``partition_group`` (ZeroRedundancyOptimizer: each
    process holds a disjoint share of whole tensors) the plain ones are summed over the group. Every process must call
    this, even one without gradients, as the collectives need every process.
    """
    plain = () if partition_group is None else (partition_group,)
    keys = [summed_over(g) if is_sharded(g) else plain for g in grads]
    # One row per way of summing; the plain row always, so that a process without gradients joins the collective.
    rows = list(dict.fromkeys([plain, *keys]))
    squares = torch.stack([squared_norm(local([g for g, k in zip(grads, keys) if k == row]), device=device)
                           .to(torch.float64) for row in rows])
    total = _all_reduce_rows_(squares, rows, "SUM").sum()
    return total.sqrt().to(norm_dtype(grads))


def agree_(flag: Tensor, grads: Sequence[Tensor], partition_group: Any | None) -> Tensor:
    """Make a 0-dim float flag the maximum over the processes that share the model with this one, in place: over
    ``partition_group`` and over the mesh dimensions the gradients are sharded on. A single process: unchanged."""
    plain = () if partition_group is None else (partition_group,)
    _all_reduce_rows_(flag.view(1), [plain + tuple(group for g in grads for group in summed_over(g))], "MAX")
    return flag


def clear_dtensor_caches() -> None:
    """Empty DTensor's caches of sharding specs and meshes, so that ``destroy_process_group`` can free the group.

    Why: ``torch.distributed.destroy_process_group`` frees a process group only if nothing else holds it; otherwise
    gloo's group and its threads are torn down during interpreter shutdown, and a process can die with SIGABRT
    ("terminate called without an active exception") after a run that finished. DTensor memoizes its planning in
    caches keyed by sharding specs, which hold DeviceMeshes and through them the process groups, long after the
    model and optimizer are gone. Call this at teardown, once the DTensors (model, optimizer state) are released,
    then ``gc.collect()``, ``dist.barrier()`` and ``dist.destroy_process_group()``: see ``examples/fsdp_train.py``.

    What it clears, as of torch 2.13; all are private torch APIs, and one that a torch build lacks is skipped:

    * the sharding-propagation caches, the Python one
      (``DTensor._op_dispatcher.sharding_propagator.propagate_op_sharding``) and the C++ fast path's
      (``torch._C._clear_DTensor_sharding_propagator_cache``, this thread's): what
      ``torch.distributed.tensor.debug._clear_sharding_prop_cache`` clears, called here directly because importing
      ``torch.distributed.tensor.debug`` imports ``torch._dynamo``, which holds every process group that exists
      when it is first imported;
    * the redistribution planner's: ``_redistribute._gen_transform_infos`` and
      ``_redistribute.clear_redistribute_planner_cache()``;
    * ``_collective_utils.MeshTopoInfo.build_from_mesh``'s, keyed by mesh.

    Does nothing without torch.distributed; harmless where DTensor was never used.
    """
    for clear in (lambda: DTensor._op_dispatcher.sharding_propagator.propagate_op_sharding.cache_clear(),
                  lambda: torch._C._clear_DTensor_sharding_propagator_cache(),
                  lambda: _redistribute._gen_transform_infos.cache_clear(),
                  lambda: _redistribute.clear_redistribute_planner_cache(),
                  lambda: _collective_utils.MeshTopoInfo.build_from_mesh.cache_clear()):
        with contextlib.suppress(AttributeError):  # absent from this torch (or None: no torch.distributed)
            clear()


@contextlib.contextmanager
def process_group(backend: str, timeout: datetime.timedelta | None = None) -> Iterator[None]:
    """The default process group for a ``with`` block: safe to restart under torchrun, really destroyed at its end.

    ``with process_group("gloo"): train(...)``, the model, optimizer and scheduler living inside ``train``.

    Restarts: ``torchrun --max-restarts`` starts the new processes on the store the old ones used (one store for the
    job, torch 2.13's static and c10d rendezvous alike), where the old processes' addresses are still written; a new
    process that reads one before its peer overwrites it connects to a dead process, and gloo fails or hangs (seen
    here, 2026-12-07: the first restart failed or hung in 2 of 3 tries). Under torchrun the group's keys are
    therefore put under the attempt's number (``TORCHELASTIC_RESTART_COUNT``; the same on every process of a
    one-node job, and of a multi-node job whose nodes all restart together).

    Teardown: ``destroy_process_group`` frees the group only if nothing else holds it; otherwise gloo's group and
    threads are torn down during interpreter shutdown, and a process can die with SIGABRT ("terminate called without
    an active exception") after training finished. Holders: FSDP2 modules (reference cycles), DTensor parameters and
    optimizer state through their DeviceMesh, DTensor's caches of sharding specs, and ``torch._dynamo`` if first
    imported while the group exists (import ``torch.distributed.fsdp`` before entering). So the objects live in a
    function that returns inside the block; the block then empties the caches (:func:`clear_dtensor_caches`),
    collects the cycles, waits for every process and destroys the group, which joins gloo's threads. After an
    exception it only destroys the group: the other processes may never reach a barrier.
    """
    options: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is not None:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        # A client of the agent's store, or (agent store not shared) served by rank 0 as init_process_group would.
        serves = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and rank == 0
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, serves,
                              **options)
        options.update(store=dist.PrefixStore(f"torchlamb/attempt{attempt}", store), rank=rank, world_size=world)
    dist.init_process_group(backend, **options)
    try:
        yield
    except BaseException:
        dist.destroy_process_group()
        raise
    clear_dtensor_caches()
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
