"""The processes test_mesh.py starts: Lamb and Lars on a two-dimensional (2 × 2) mesh of gloo processes on the CPU.

Three ways of spreading a model over the mesh, as large runs do:

    hsdp     fully_shard(model, mesh=mesh) on a ("replicate", "shard") mesh: every parameter (Replicate(), Shard(0));
             distributed_worker's model (uneven first dimensions), the global batch split over the 4 processes
    fsdp_tp  parallelize_module on "tp" (a SequenceParallel LayerNorm, ColwiseParallel, RowwiseParallel), then
             fully_shard on "dp": (_StridedShard(0), Shard(0)), (Shard(0), Shard(1)) and (Shard(0), Replicate());
             the batch split over dp, the sequence over tp
    tp       the same tensor parallelism without FSDP2, each "dp" row a replica training on the whole batch: the
             LayerNorm's gradients are Partial(sum)

Rank 0 saves, for each run, the final parameters, what the trust stage saw in the last step (per-tensor ‖θ‖, ‖u‖,
ratio, the global gradient norm) and the collectives that step issued, for the test to compare with one process.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import distributed_worker as worker
import torchlamb

MODES = ("hsdp", "fsdp_tp", "tp")
BATCH, SEQUENCE, WIDTH, HIDDEN = 4, 4, 5, 8  # WIDTH 5: uneven over the 2 dp shards
# (mode, optimizer, path) saved with torch.distributed.checkpoint after CHECKPOINT_STEPS steps on the 2 × 2 mesh.
CHECKPOINTS = (("hsdp", "lamb", "fused"), ("fsdp_tp", "lars", "foreach"))
CHECKPOINT_STEPS = 3


class Block(nn.Module):
    """A transformer block's MLP with its norm, on (batch, sequence, width) inputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(WIDTH)
        self.up = nn.Linear(WIDTH, HIDDEN)
        self.down = nn.Linear(HIDDEN, WIDTH)
        nn.init.zeros_(self.down.bias)  # a zero-initialised tensor: the zero-norm fallback

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(self.norm(x))))


def make_model(mode: str) -> nn.Module:
    return worker.make_model() if mode == "hsdp" else Block()


def block_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(200 + step)
    return (torch.randn(BATCH, SEQUENCE, WIDTH, generator=generator),
            torch.randn(BATCH, SEQUENCE, WIDTH, generator=generator))


# This process's share of each step's data: (batch piece, batch pieces, sequence piece, sequence pieces).
Share = tuple[int, int, int, int]
WHOLE: Share = (0, 1, 0, 1)


def loss(mode: str, model: nn.Module, step: int, share: Share) -> torch.Tensor:
    """The loss whose gradients, averaged over data-parallel processes (FSDP2) and summed over tensor-parallel ones
    (each holds a piece of the sequence), are the one-process full-batch mean squared error's."""
    piece, pieces, sequence_piece, sequence_pieces = share
    if mode == "hsdp":
        x, y = worker.batch(step)
        rows = slice(piece * len(x) // pieces, (piece + 1) * len(x) // pieces)
        return nn.functional.mse_loss(model(x[rows]), y[rows])
    x, y = block_batch(step)
    rows = slice(piece * BATCH // pieces, (piece + 1) * BATCH // pieces)
    columns = slice(sequence_piece * SEQUENCE // sequence_pieces, (sequence_piece + 1) * SEQUENCE // sequence_pieces)
    output = model(x[rows, columns])
    return (output - y[rows, columns]).square().sum() / (output.numel() * sequence_pieces)


def meshes() -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh

    return {"hsdp": init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard")),
            "tp": init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))}


def parallelize(mode: str, model: nn.Module, mesh: dict[str, Any]) -> Share:
    """Spread ``model`` over the mesh as ``mode`` says; return this process's share of the data."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    if mode == "hsdp":
        fully_shard(model, mesh=mesh["hsdp"])
        return (dist.get_rank(), dist.get_world_size(), 0, 1)
    mesh_2d = mesh["tp"]
    parallelize_module(model, mesh_2d["tp"], {"norm": SequenceParallel(),
                                              "up": ColwiseParallel(input_layouts=Shard(1)),
                                              "down": RowwiseParallel(output_layouts=Shard(1))})
    tp_piece = mesh_2d.get_local_rank("tp")
    if mode == "tp":
        return (0, 1, tp_piece, 2)
    fully_shard(model, mesh=mesh_2d["dp"])
    return (mesh_2d.get_local_rank("dp"), 2, tp_piece, 2)


def last_step_seen(model: nn.Module, optimizer: torchlamb.Lamb | torchlamb.Lars) -> dict[str, Any]:
    """{parameter name: (‖θ‖, ‖u‖, ratio)} of the last step, and its global gradient norm."""
    names = {id(p): name for name, p in model.named_parameters()}
    norms = {names[id(p)]: (stats.weight_norm[i], stats.update_norm[i], stats.trust_ratio[i])
             for stats in optimizer.trust_stats for i, p in enumerate(stats.params)}
    return {"norms": norms, "grad_norm": optimizer.grad_norm}


def one_process(mode: str, name: str, path: str, steps: int) -> dict[str, Any]:
    """The reference: the same training in one process, no torch.distributed."""
    model = make_model(mode)
    optimizer_class, options = worker.OPTIMIZERS[name]
    optimizer = optimizer_class(worker.groups(model), **options, **worker.PATHS[path])
    for step in range(steps):
        optimizer.zero_grad()
        loss(mode, model, step, WHOLE).backward()
        optimizer.step()
    return {"parameters": worker.full_parameters(model), **last_step_seen(model, optimizer)}


def _run(mode: str, name: str, path: str, steps: int, mesh: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """Train ``steps`` steps on the mesh, counting the collectives of the last step."""
    model = make_model(mode)
    share = parallelize(mode, model, mesh)
    optimizer_class, options = worker.OPTIMIZERS[name]
    optimizer = optimizer_class(worker.groups(model), **{**options, **worker.PATHS[path], **changes})
    for step in range(steps):
        optimizer.zero_grad()
        loss(mode, model, step, share).backward()
        if step < steps - 1:
            optimizer.step()
            continue
        gradient_placements = {n: tuple(map(str, p.grad.placements)) for n, p in model.named_parameters()}
        with worker.counting_collectives() as (calls, counter):
            optimizer.step()
    return {"parameters": worker.full_parameters(model), **last_step_seen(model, optimizer),
            "all_reduce_calls": len(calls), "dispatched": counter.ops,
            "placements": {n: tuple(map(str, p.placements)) for n, p in model.named_parameters()},
            "gradient_placements": gradient_placements}


def _every_mesh_dimension(tensor: torch.Tensor) -> tuple[Any, ...]:
    """A wrong rule: sum over every mesh dimension, Replicate ones included."""
    if not torchlamb.distributed.is_sharded(tensor):
        return ()
    mesh = tensor.device_mesh
    return tuple(mesh.get_group(dim) for dim in range(mesh.ndim))


def _shard_placements_only(tensor: torch.Tensor) -> tuple[Any, ...]:
    """A wrong rule: sum over the dimensions whose placement is a Shard, missing _StridedShard (not a subclass)."""
    from torch.distributed.tensor import Shard

    if not torchlamb.distributed.is_sharded(tensor):
        return ()
    return tuple(tensor.device_mesh.get_group(dim) for dim, p in enumerate(tensor.placements) if isinstance(p, Shard))


WRONG_RULES = {"hsdp": _every_mesh_dimension, "fsdp_tp": _shard_placements_only}


def _mesh_runs(steps: int, directory: str) -> dict[str, Any]:
    mesh = meshes()
    results: dict[str, Any] = {}
    for mode in MODES:
        for name in worker.OPTIMIZERS:
            for path in worker.PATHS:
                results[f"{mode}/{name}/{path}"] = _run(mode, name, path, steps, mesh)
            # The other collectives of a step: the skip flag's agreement, without the gradient norm's.
            results[f"{mode}/{name}/skip"] = _run(mode, name, "fused", 2, mesh, max_grad_norm=None, nonfinite="skip")
    right_rule = torchlamb.distributed.summed_over
    for mode, wrong_rule in WRONG_RULES.items():
        torchlamb.distributed.summed_over = wrong_rule
        try:
            results[f"{mode}/lamb/foreach/wrong rule"] = _run(mode, "lamb", "foreach", steps, mesh)
        finally:
            torchlamb.distributed.summed_over = right_rule
    for mode, name, path in CHECKPOINTS:
        _save_checkpoint(mode, name, path, mesh, f"{directory}/{mode}")
    return results


def _save_checkpoint(mode: str, name: str, path: str, mesh: dict[str, Any], directory: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = make_model(mode)
    share = parallelize(mode, model, mesh)
    optimizer_class, options = worker.OPTIMIZERS[name]
    optimizer = optimizer_class(worker.groups(model), **options, **worker.PATHS[path])
    for step in range(CHECKPOINT_STEPS):
        optimizer.zero_grad()
        loss(mode, model, step, share).backward()
        optimizer.step()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=directory)


def mesh_runs(rank: int, world: int, port: int, out: str, steps: int, directory: str) -> None:
    """Every mode × optimizer × path on the 2 × 2 mesh, the wrong rules, and the checkpoints of CHECKPOINTS saved in
    ``directory``; rank 0 saves {key: run} to ``out``."""
    with worker.process_group(rank, world, port):
        results = _mesh_runs(steps, directory)
        if rank == 0:
            torch.save(results, out)
        del results


def _resume(mode: str, name: str, path: str, directory: str, then: int) -> list[torch.Tensor]:
    """Load a checkpoint of the 2 × 2 mesh into FSDP2 on a 1-D mesh of every process, train ``then`` more steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    model = make_model(mode)
    fully_shard(model)
    optimizer_class, options = worker.OPTIMIZERS[name]
    optimizer = optimizer_class(worker.groups(model), **options, **worker.PATHS[path])
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=f"{directory}/{mode}")
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    share = (dist.get_rank(), dist.get_world_size(), 0, 1)
    for step in range(CHECKPOINT_STEPS, CHECKPOINT_STEPS + then):
        optimizer.zero_grad()
        loss(mode, model, step, share).backward()
        optimizer.step()
    return worker.full_parameters(model)


def resume(rank: int, world: int, port: int, out: str, directory: str, then: int) -> None:
    """Each checkpoint of CHECKPOINTS resumed on ``world`` processes (1-D FSDP2); rank 0 saves {mode: parameters}."""
    with worker.process_group(rank, world, port):
        parameters = {mode: _resume(mode, name, path, directory, then) for mode, name, path in CHECKPOINTS}
        if rank == 0:
            torch.save(parameters, out)
        del parameters
