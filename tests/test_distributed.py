"""Lamb and Lars across processes (gloo on the CPU): DDP, FSDP2 (also on the Triton path, in Triton's interpreter)
and ZeRO equal one process; FSDP2 norms cost one all-reduce per step; FSDP2 checkpoints reshard from 2 processes to
3 and to 1; FSDP1 is refused clearly.

The training runs live in distributed_worker.py: one spawn of 2 processes runs everything the 2-process tests check,
then one spawn per world size resumes the checkpoints (imports dominate the time on 2 cores).
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import distributed_worker as worker
import torchlamb
from torchlamb.distributed import clear_dtensor_caches

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

STEPS = 4
FIRST, THEN = 3, 2  # checkpointed runs: steps before the checkpoint, steps after resuming


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(function, world: int, *args) -> None:
    mp.spawn(function, args=(world, free_port(), *args), nprocs=world, join=True)


def assert_parameters_close(actual: list[torch.Tensor], expected: list[torch.Tensor], what: str) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def two_processes(directory):
    out = directory / "two_processes.pt"
    spawn(worker.two_process_runs, 2, str(out), STEPS, str(directory / "checkpoints"), FIRST)
    return torch.load(out)


@pytest.fixture(scope="module")
def runs(two_processes):
    return two_processes["equivalence"]


@pytest.mark.parametrize("mode", ["ddp", "fsdp2", "zero"])
@pytest.mark.parametrize("name", list(worker.OPTIMIZERS))
@pytest.mark.parametrize("path", list(worker.PATH_OPTIONS))
def test_two_processes_equal_one(runs, mode, name, path):
    reference = worker.one_process(name, path, STEPS)
    start = worker.full_parameters(worker.make_model())
    assert any(not torch.equal(a, b) for a, b in zip(reference, start))  # the run moved the parameters
    assert_parameters_close(runs[f"{mode}/{name}/{path}"], reference, f"{mode} {name} {path}")


@pytest.mark.parametrize("path", list(worker.PATH_OPTIONS))
def test_fsdp2_cautious_lamb_equals_one_process(two_processes, path):
    # The mask's mean is over the whole tensor, not over each process's shard: its count is summed with the norms.
    reference = worker.one_process("lamb", path, STEPS, worker.CAUTION)
    assert_parameters_close(two_processes["caution"][path], reference, f"fsdp2 lamb caution {path}")
    plain = worker.one_process("lamb", path, STEPS)
    assert any(not torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(reference, plain))  # caution acted


@pytest.mark.parametrize("name", list(worker.OPTIMIZERS))
def test_fsdp2_on_the_triton_path_equals_one_process(two_processes, name):
    if "triton" not in two_processes:
        pytest.skip("triton is not installed")
    parameters, triton_steps = two_processes["triton"][name]
    # Every step's first pass of every group ran in the Triton kernels (on this process's shards).
    assert triton_steps == STEPS * len(worker.groups(worker.make_model()))
    assert_parameters_close(parameters, worker.one_process(name, "foreach", STEPS), f"fsdp2 {name} triton")


def test_per_shard_norms_would_be_caught():
    # The comparison above can fail: ratios from per-shard norms (each tensor's two dim-0 halves updated with their
    # own ratios, as a per-shard implementation would) end far from the correct run.
    correct = worker.one_process("lamb", "foreach", STEPS)
    model = worker.make_model()
    worker.train(model, _PerShardLamb(model), range(STEPS))
    difference = max((a - b).abs().max().item() for a, b in zip(worker.full_parameters(model), correct))
    assert difference > 1e-3


class _PerShardLamb:
    """Lamb over leaf tensors that are the dim-0 halves of each parameter, copied back into the model each step."""

    def __init__(self, model):
        self.model = model
        self.pieces = []  # (parameter, rows, leaf)
        groups = []
        for group in worker.groups(model):
            leaves = []
            for p in group["params"]:
                middle = (p.shape[0] + 1) // 2
                for rows in (slice(0, middle), slice(middle, p.shape[0])):
                    leaf = p.detach()[rows].clone().requires_grad_()
                    self.pieces.append((p, rows, leaf))
                    leaves.append(leaf)
            groups.append({**group, "params": leaves})
        optimizer_class, options = worker.OPTIMIZERS["lamb"]
        self.optimizer = optimizer_class(groups, **options, foreach=True)

    def zero_grad(self):
        self.model.zero_grad()

    def step(self):
        for p, rows, leaf in self.pieces:
            leaf.grad = p.grad[rows].clone()
        self.optimizer.step()
        with torch.no_grad():
            for p, rows, leaf in self.pieces:
                p[rows] = leaf


def test_fsdp2_step_issues_one_all_reduce_for_the_norms(two_processes):
    counts = two_processes["counts"]
    assert len(counts) == len(worker.OPTIMIZERS) * len(worker.PATH_OPTIONS) * 2
    for key, (all_reduces, dispatched) in counts.items():
        # One for the norms of all groups; one more for the global gradient norm when max_grad_norm is set.
        expected = 1 if key.endswith("clip=None") else 2
        assert all_reduces == expected, key
        # No other collective: DTensor ops on the parameters would add their own.
        assert all(op.startswith("c10d.allreduce") for op in dispatched), (key, dispatched)
        assert len(dispatched) == expected, (key, dispatched)


@pytest.mark.parametrize("world", [3, 1])
def test_checkpoint_reshards_from_two_processes_to_three_and_one(two_processes, directory, world):
    out = directory / f"world{world}.pt"
    spawn(worker.resume, world, str(out), str(directory / "checkpoints"), FIRST, THEN)
    resumed = torch.load(out)
    assert set(resumed) == {f"{name}-{path}" for name, path in worker.CHECKPOINTS}
    for name, path in worker.CHECKPOINTS:
        reference = worker.one_process(name, path, FIRST + THEN)
        assert_parameters_close(resumed[f"{name}-{path}"], reference, f"{name} {path} resumed at world size {world}")


def test_fsdp2_keeps_8bit_state_as_dtensors_of_each_process_rows(two_processes):
    layout = two_processes["eight_bit"]
    # The first weight is 5 × 6: rows 0-2 on rank 0; one block per row of 6 elements.
    for name in ("exp_avg", "exp_avg_sqrt"):
        assert layout[f"{name}_codes"] == ("DTensor", (5, 6), (3, 6))
        assert layout[f"{name}_absmax"] == ("DTensor", (5, 1), (3, 1))
    assert layout["bias_keys"] == ["exp_avg", "exp_avg_sq", "step"]  # 1-D: float state
    assert "other than its first" in layout["column_error"] and "Shard(dim=1)" in layout["column_error"]


def test_every_process_skips_when_one_sees_an_inf(two_processes):
    # A disagreement would hang a collective: the 60 s timeout fails the spawn.
    changed = two_processes["skips"]
    assert set(changed) == {f"{mode}/{name}" for mode in ("zero", "fsdp2") for name in worker.OPTIMIZERS}
    for key, flags in changed.items():
        assert not any(flags), key


def test_fsdp1_parameters_are_refused(two_processes):
    errors = two_processes["fsdp1"]
    assert len(errors) == 4
    for key, message in errors.items():
        assert message is not None and "FSDP1" in message and "fully_shard" in message, key


def test_batch_ramp_under_ddp_takes_the_same_decision_at_the_same_step_on_every_process(two_processes):
    """Rank 0 alone would grow at every decision, rank 1 alone never (their factors differ 10⁶-fold): both follow
    rank 0, so the accumulations stay in step (a process that grew alone would hang or mix batches)."""
    run = two_processes["batch_ramp"]
    (records_0, micro_0, large_0), (records_1, micro_1, large_1) = run["per_rank"]
    assert [row["batch"] for row in records_0] == [6, 12, 24, 48]  # decisions at steps 2, 4, 6: 3 · K · 2 processes
    assert [row["step"] for row in records_0] == [0, 2, 4, 6]
    assert repr(records_0) == repr(records_1)  # every field, the B_simple that triggered each change included
    assert micro_0 == micro_1 == 8 and large_0 == large_1 == 48


def test_noise_scale_under_ddp_takes_each_process_gradient_against_the_averaged_one(two_processes):
    """The reference, in one process and float64: per step, each process's share of the batch gives the small-batch
    gradient (b = 6), their mean the large-batch one (B = 12); the estimators and their EMAs as in
    tests/test_noise_scale.py."""
    from test_noise_scale import reference

    measured = two_processes["noise_scale"]
    assert measured.pop("large_batch").item() == worker.GLOBAL_BATCH
    model = worker.make_model()
    optimizer = torchlamb.Lamb(worker.groups(model), **worker.OPTIMIZERS["lamb"][1])
    share = worker.GLOBAL_BATCH // 2
    small, large = [], []
    for step in range(STEPS):
        x, y = worker.batch(step)
        grads = [torch.autograd.grad(torch.nn.functional.mse_loss(model(x[r * share:(r + 1) * share]),
                                                                  y[r * share:(r + 1) * share]),
                                     list(model.parameters())) for r in range(2)]
        squares = torch.stack([torch.stack([g.double().square().sum() for g in rank]) for rank in grads])
        averaged = [(a.double() + b.double()) / 2 for a, b in zip(*grads)]
        small.append(squares.mean(0))
        large.append(torch.stack([g.square().sum() for g in averaged]))
        for p, g in zip(model.parameters(), averaged):
            p.grad = g.float()
        optimizer.step()
    small, large = torch.stack(small), torch.stack(large)
    # Per tensor, then all tensors together (the last entry).
    expected = reference(torch.cat([small, small.sum(1, keepdim=True)], 1),
                         torch.cat([large, large.sum(1, keepdim=True)], 1), share, worker.GLOBAL_BATCH, 0.5)
    for quantity, value in expected.items():
        torch.testing.assert_close(measured[quantity], value, rtol=1e-4, atol=1e-9, msg=quantity)


def test_clear_dtensor_caches_reaches_every_cache_it_names():
    # Private torch 2.13 names, each skipped where absent: this says when a torch upgrade renames one. The workers'
    # teardown (no gloo thread may outlive destroy_process_group) checks that clearing them is enough.
    from torch.distributed.tensor import DTensor, _collective_utils, _redistribute

    caches = [DTensor._op_dispatcher.sharding_propagator.propagate_op_sharding, _redistribute._gen_transform_infos,
              _collective_utils.MeshTopoInfo.build_from_mesh]
    clear_dtensor_caches()
    assert [cache.cache_info().currsize for cache in caches] == [0, 0, 0]
    assert not _redistribute._planner_cache
    assert callable(torch._C._clear_DTensor_sharding_propagator_cache)


def test_fsdp_example_runs_under_torchrun():
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).parent.parent / "examples" / "fsdp_train.py"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-port", str(free_port()), str(example), "--steps", "3", "--batch", "16"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step    2  loss" in result.stdout
