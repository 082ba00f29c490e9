"""The processes test_distributed.py starts: short training runs under DDP, FSDP2 and ZeRO, gloo on the CPU.

Every run trains the same small model on the same data for a few steps: a global batch split evenly among the
processes, so that the averaged gradients equal the one-process full-batch gradients. Rank 0 saves the final
parameters (whole tensors) with torch.save for the test to compare with a one-process run.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

# Imported here, before any process group exists: torch._dynamo (which they import) holds the groups that exist when
# it is first imported, and destroy_process_group could not free them.
if dist.is_available():
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.nn.parallel import DistributedDataParallel

    with warnings.catch_warnings():  # its import scripts functional optimizers with the deprecated torch.jit.script
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.distributed.optim import ZeroRedundancyOptimizer

import switches
import torchlamb
from torchlamb import quantized
from torchlamb.distributed import clear_dtensor_caches

GLOBAL_BATCH = 12  # divisible by 1, 2 and 3 processes
OPTIMIZERS = {
    "lamb": (torchlamb.Lamb, dict(lr=0.02, max_grad_norm=0.5)),
    # With the options of other code bases' LARS whose numbers depend on whole-tensor norms or on each tensor's
    # step count (the dampening's undampened first step), summed or kept per shard.
    "lars": (torchlamb.Lars, dict(lr=1.0, momentum=0.9, trust_coefficient=0.02, max_grad_norm=0.5,
                                  lr_inside_momentum=True, dampening=0.1, larc_clip=True, zero_fallback="grad")),
}
PATHS = {"single_tensor": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
# 8-bit state (state_dtype="8bit"), run by its own tests: the mesh tests' tensor parallelism splits columns.
PATH_OPTIONS = {**PATHS, "8bit": {"state_dtype": "8bit"}}


@contextlib.contextmanager
def options_for(path: str) -> Iterator[dict[str, Any]]:
    """The optimizer options of ``path``. Under "8bit" every weight keeps 8-bit state for the block: the model's
    weights are far below torchlamb.quantized.MIN_NUMEL (rows of 6 and 5 elements: blocks of one row each)."""
    saved = quantized.MIN_NUMEL
    quantized.MIN_NUMEL = 1 if path == "8bit" else saved
    try:
        yield PATH_OPTIONS[path]
    finally:
        quantized.MIN_NUMEL = saved


def make_model() -> nn.Module:
    """First dimensions 5 and 3: uneven over 2 and 3 processes (one 3-way shard of the last bias is empty)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    nn.init.zeros_(model[2].bias)  # a zero-initialised tensor: the zero-norm fallback
    return model


def groups(model: nn.Module) -> list[dict[str, Any]]:
    """Weights with weight decay and the trust ratio; biases without either (an adapt=False group)."""
    weights = [p for name, p in model.named_parameters() if name.endswith("weight")]
    biases = [p for name, p in model.named_parameters() if name.endswith("bias")]
    return [{"params": weights, "weight_decay": 0.01}, {"params": biases, "weight_decay": 0.0, "adapt": False}]


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, 6, generator=generator), torch.randn(GLOBAL_BATCH, 3, generator=generator)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range, rank: int = 0, world: int = 1) -> None:
    share = GLOBAL_BATCH // world
    for step in steps:
        x, y = batch(step)
        x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def full_parameters(model: nn.Module) -> list[torch.Tensor]:
    return [(p.full_tensor() if torchlamb.distributed.is_sharded(p) else p).detach().clone()
            for p in model.parameters()]


def one_process(name: str, path: str, steps: int, extra: dict[str, Any] | None = None) -> list[torch.Tensor]:
    """The reference: the same training in one process, no torch.distributed (``extra``: more options)."""
    model = make_model()
    optimizer_class, options = OPTIMIZERS[name]
    with options_for(path) as path_options:
        train(model, optimizer_class(groups(model), **options, **(extra or {}), **path_options), range(steps))
    return full_parameters(model)


@contextlib.contextmanager
def process_group(rank: int, world: int, port: int, timeout: float = 60.0) -> Iterator[None]:
    """A gloo process group for the ``with`` block: ``with process_group(rank, world, port): result = work(...)``.

    ``destroy_process_group`` frees the group only if nothing else holds it; otherwise gloo's group and threads are
    torn down during interpreter shutdown, and a process can die with SIGABRT after its work succeeded. So do the
    work in a function called inside the block: the FSDP2/DDP modules, DTensors and optimizers that hold the group
    are then gone by the block's end. The block then empties DTensor's caches (they hold DeviceMeshes), collects
    the modules' reference cycles, waits for every process and destroys the group, which joins gloo's threads; a
    gloo thread still alive after that fails the run, every time instead of at random.
    """
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    # A short timeout: a collective that one process skips fails the test instead of hanging it.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout))
    try:
        yield
    except BaseException:
        dist.destroy_process_group()  # no barrier: the other processes may never reach it
        raise
    clear_dtensor_caches()
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    if threads := _gloo_threads():  # what would abort at random at exit fails here every time
        raise RuntimeError(f"gloo threads {threads} outlived destroy_process_group: something still holds the "
                           "process group (see distributed_worker.process_group)")


def _gloo_threads() -> list[str]:
    """This process's threads named after gloo (pt_gloo_runloop, gloo_tcp_loop in torch 2.13); Linux only."""
    names = []
    for task in Path("/proc/self/task").glob("*"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            names.append((task / "comm").read_text().strip())
    return [name for name in names if "gloo" in name]


def _distributed_run(mode: str, name: str, path: str, rank: int, world: int, steps: int,
                     extra: dict[str, Any] | None = None) -> list[torch.Tensor]:
    with options_for(path) as path_options:
        return _distributed_training(mode, name, {**OPTIMIZERS[name][1], **(extra or {}), **path_options}, rank,
                                     world, steps)


def _distributed_training(mode: str, name: str, options: dict[str, Any], rank: int, world: int,
                          steps: int) -> list[torch.Tensor]:
    model = make_model()
    optimizer_class = OPTIMIZERS[name][0]
    if mode == "fsdp2":
        fully_shard(model)
        optimizer = optimizer_class(groups(model), **options)
        trained = model
    else:
        trained = DistributedDataParallel(model)
        if mode == "ddp":
            optimizer = optimizer_class(groups(model), **options)
        else:  # zero: each process's optimizer holds a share of the tensors
            optimizer = ZeroRedundancyOptimizer(groups(model), optimizer_class=optimizer_class,
                                                partition_group=dist.group.WORLD, **options)
    train(trained, optimizer, range(steps), rank, world)
    return full_parameters(model)


CAUTION = {"caution": True}  # with OPTIMIZERS["lamb"]'s options
CHECKPOINTS = [("lamb", "fused"), ("lars", "foreach"), ("lamb", "8bit")]  # (optimizer, path) of the resharding runs


def two_process_runs(rank: int, world: int, port: int, out: str, steps: int, directory: str, first: int) -> None:
    """Everything the tests run on 2 processes, in one process group (each spawn costs seconds of imports):
    every mode × optimizer × path for ``steps`` steps, the collectives of one FSDP2 step, the skip agreement, the
    FSDP1 refusals, and ``first`` steps of each checkpointed run saved under ``directory``. Rank 0 saves a dict."""
    with process_group(rank, world, port):
        results = {
            "equivalence": {f"{mode}/{name}/{path}": _distributed_run(mode, name, path, rank, world, steps)
                            for mode in ("ddp", "fsdp2", "zero") for name in OPTIMIZERS for path in PATH_OPTIONS},
            "counts": {f"{name}/{path}/clip={clip}": _count_one_step(name, path, clip, rank, world)
                       for name in OPTIMIZERS for path in PATH_OPTIONS for clip in (None, 0.5)},
            "skips": {f"{mode}/{name}": _skip_one_step(mode, name, rank, world)
                      for mode in ("zero", "fsdp2") for name in OPTIMIZERS},
            "fsdp1": {f"{name}/use_orig_params={use_orig_params}": _fsdp1_error(name, use_orig_params)
                      for use_orig_params in (False, True) for name in OPTIMIZERS},
            # Lamb's caution divides by the mean of a mask over the whole tensor: its count travels with the norms.
            "caution": {path: _distributed_run("fsdp2", "lamb", path, rank, world, steps, CAUTION)
                        for path in PATH_OPTIONS},
            "noise_scale": _noise_scale_run(rank, world, steps),
            "batch_ramp": _batch_ramp_run(rank, world),
            "eight_bit": _eight_bit_layout(rank, world),
        }
        # The Triton kernels under FSDP2, in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 comes from the
        # tests' environment): each shard's partial sums, one all-reduce, then pass 2.
        if torchlamb.kernels.triton_module() is not None:
            results["triton"] = {name: _triton_fsdp2_run(name, rank, world, steps) for name in OPTIMIZERS}
        for name, path in CHECKPOINTS:
            _checkpoint_run(f"{directory}/{name}-{path}", range(first), False, name, path, rank, world)
    if rank == 0:
        torch.save(results, out)


def _eight_bit_layout(rank: int, world: int) -> dict[str, Any]:
    """How FSDP2 keeps 8-bit state: the first weight's codes and scales after one step (types and shapes), and
    the error for a weight split along its second dimension."""
    with options_for("8bit") as path_options:
        model = make_model()
        fully_shard(model)
        optimizer = torchlamb.Lamb(groups(model), **path_options)
        train(model, optimizer, range(1), rank, world)
        state = optimizer.state[model[0].weight]
        layout = {key: (type(value).__name__, tuple(value.shape), tuple(value.to_local().shape))
                  for key, value in state.items() if key.endswith(("_codes", "_absmax"))}
        layout["bias_keys"] = sorted(optimizer.state[model[0].bias])
        mesh = init_device_mesh("cpu", (world,))
        weight = nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)]))
        weight.grad = distribute_tensor(torch.ones(4, 6), mesh, [Shard(1)])
        try:
            torchlamb.Lamb([weight], **path_options).step()
            layout["column_error"] = None
        except ValueError as error:
            layout["column_error"] = str(error)
    return layout


def _noise_scale_run(rank: int, world: int, steps: int) -> dict[str, torch.Tensor]:
    """NoiseScale's estimates after a DDP run of Lamb: each process's gradient (b = its share of the batch) against
    the averaged one (B = the global batch), every step's estimates in one EMA (ema 0.5)."""
    model = make_model()
    optimizer = torchlamb.Lamb(groups(model), **OPTIMIZERS["lamb"][1])
    noise = torchlamb.NoiseScale(model, optimizer, batch_size=GLOBAL_BATCH // world, ema=0.5, every=1)
    train(DistributedDataParallel(model), optimizer, range(steps), rank, world)
    noise.remove()
    return {**noise.estimates(), "large_batch": torch.tensor(noise.large_batch)}


def _batch_ramp_run(rank: int, world: int) -> dict[str, Any]:
    """A measured BatchRamp under DDP whose processes would decide differently on their own: rank 0 targets 1000 ×
    B_simple (it grows at every decision), rank 1 a thousandth of it (it would never grow). Returns every process's
    change records and final micro-batch counts (all-gathered), and how many optimizer steps ran."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    accumulation = torchlamb.GradientAccumulation(optimizer, 1)
    noise = torchlamb.NoiseScale(model, optimizer, batch_size=3, ema=0.5, every=1)  # b = 3, B = 3 · K · 2
    ramp = torchlamb.BatchRamp(accumulation, noise, max_batch=48, interval=2, factor=1000.0 if rank == 0 else 1e-3)
    ddp = DistributedDataParallel(model)
    generator = torch.Generator().manual_seed(rank)
    while accumulation.steps < 10:
        x = torch.randn(3, 6, generator=generator)
        accumulation.backward(nn.functional.mse_loss(ddp(x), x[:, :3].sin()))
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, (ramp.records, accumulation.micro_batches, noise.large_batch))
    noise.remove()
    return {"per_rank": gathered, "steps": accumulation.steps}


def _triton_fsdp2_run(name: str, rank: int, world: int, steps: int) -> tuple[list[torch.Tensor], int]:
    """(parameters, how many first passes ran in Triton) of an FSDP2 run on the Triton path."""
    module = torchlamb.kernels.triton_module()
    first_pass_name = "lamb_first_pass" if name == "lamb" else "lars_first_pass"
    first_pass, calls = getattr(module, first_pass_name), []

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return first_pass(*args, **kwargs)

    setattr(module, first_pass_name, counted)
    try:
        with switches.triton_on_cpu():
            return _distributed_run("fsdp2", name, "fused", rank, world, steps), len(calls)
    finally:
        setattr(module, first_pass_name, first_pass)


def resume(rank: int, world: int, port: int, out: str, directory: str, first: int, then: int) -> None:
    """Loads each checkpoint of ``two_process_runs`` (saved after ``first`` steps) at this world size and trains
    ``then`` more steps; rank 0 saves {"optimizer-path": parameters}."""
    with process_group(rank, world, port):
        parameters = {f"{name}-{path}": _checkpoint_run(f"{directory}/{name}-{path}", range(first, first + then),
                                                        True, name, path, rank, world)
                      for name, path in CHECKPOINTS}
    if rank == 0:
        torch.save(parameters, out)


class _CollectiveCounter(TorchDispatchMode):
    """Counts collective ops that reach the dispatcher (DTensor's implicit ones among them)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional", "c10d_functional"):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _count_one_step(name: str, path: str, clip: float | None, rank: int, world: int) -> tuple[int, list[str]]:
    """(calls to dist.all_reduce, collectives dispatched) in one FSDP2 step with existing state."""
    with options_for(path) as path_options:
        return _count_collectives(name, {**OPTIMIZERS[name][1], "max_grad_norm": clip, **path_options}, rank, world)


def _count_collectives(name: str, options: dict[str, Any], rank: int, world: int) -> tuple[int, list[str]]:
    model = make_model()
    fully_shard(model)
    optimizer = OPTIMIZERS[name][0](groups(model), **options)
    train(model, optimizer, range(1), rank, world)  # creates the state
    x, y = batch(1)
    nn.functional.mse_loss(model(x), y).backward()
    with counting_collectives() as (calls, counter):
        optimizer.step()
    return len(calls), counter.ops


@contextlib.contextmanager
def counting_collectives() -> Iterator[tuple[list[str], Any]]:
    """Within the block: the dist.all_reduce calls (a list) and every collective dispatched (a counter's ops)."""
    calls: list[str] = []
    original = dist.all_reduce

    def counting_all_reduce(*args: Any, **kwargs: Any) -> Any:
        calls.append("all_reduce")
        return original(*args, **kwargs)

    dist.all_reduce = counting_all_reduce
    try:
        with _CollectiveCounter() as counter:
            yield calls, counter
    finally:
        dist.all_reduce = original


def _checkpoint_run(directory: str, steps: range, load: bool, name: str, path: str, rank: int,
                    world: int) -> list[torch.Tensor] | None:
    """FSDP2 training with torch.distributed.checkpoint: trains ``steps`` and saves to ``directory``, or (``load``)
    loads from it at this world size, trains ``steps`` and returns the parameters."""
    with options_for(path) as path_options:
        return _checkpoint_training(directory, steps, load, name, path_options, rank, world)


def _checkpoint_training(directory: str, steps: range, load: bool, name: str, path_options: dict[str, Any],
                         rank: int, world: int) -> list[torch.Tensor] | None:
    model = make_model()
    fully_shard(model)
    optimizer_class, options = OPTIMIZERS[name]
    optimizer = optimizer_class(groups(model), **options, **path_options)
    if load:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=directory)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    train(model, optimizer, steps, rank, world)
    if load:
        return full_parameters(model)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=directory)
    return None


def _fsdp1_error(name: str, use_orig_params: bool) -> str | None:
    model = FullyShardedDataParallel(make_model(), device_id=torch.device("cpu"), use_orig_params=use_orig_params)
    optimizer_class, options = OPTIMIZERS[name]
    try:
        optimizer_class(model.parameters(), **options)
    except TypeError as error:
        return str(error)
    return None


def _skip_one_step(mode: str, name: str, rank: int, world: int) -> list[bool]:
    """Whether each parameter changed in a step where rank 0's first owned gradient holds an Inf. Under FSDP2 the
    flag stays a tensor, as on an accelerator (the step weight path)."""
    with switches.skip_flag_on_device(mode != "zero"):
        return _skip_one_step_here(mode, name, rank, world)


def _skip_one_step_here(mode: str, name: str, rank: int, world: int) -> list[bool]:
    optimizer_class, options = OPTIMIZERS[name]
    model = make_model()
    if mode == "zero":
        trained = DistributedDataParallel(model)
        optimizer = ZeroRedundancyOptimizer(groups(model), optimizer_class=optimizer_class,
                                            partition_group=dist.group.WORLD, nonfinite="skip", **options)
        owned = optimizer.optim.param_groups[0]["params"]  # this process's share
    else:
        fully_shard(model)
        trained = model
        optimizer = optimizer_class(groups(model), nonfinite="skip", **options)
        owned = list(model.parameters())
    train(trained, optimizer, range(1), rank, world)
    before = full_parameters(model)
    x, y = batch(1)
    share = GLOBAL_BATCH // world
    optimizer.zero_grad()
    nn.functional.mse_loss(trained(x[rank * share:(rank + 1) * share]), y[rank * share:(rank + 1) * share]).backward()
    if rank == 0 and owned:
        grad = owned[0].grad
        (grad.to_local() if torchlamb.distributed.is_sharded(grad) else grad).view(-1)[0] = float("inf")
    optimizer.step()
    after = full_parameters(model)
    return [not torch.equal(a, b) for a, b in zip(before, after)]
