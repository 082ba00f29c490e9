"""Lamb and Lars on two-dimensional meshes (2 × 2 gloo processes on the CPU), as large runs use them: HSDP
(replicate × shard), FSDP2 × tensor parallelism, and tensor parallelism alone (Partial gradients).

Each run equals one process: its parameters, and the trust stage's per-tensor norms, which a sum over the wrong mesh
dimensions would change even where the parameters barely notice. One all-reduce per step per process group that some
tensor's squares are summed over. A checkpoint of the 2 × 2 mesh resumes under 1-D FSDP2 on 2 processes.

The runs live in mesh_worker.py: one spawn of 4 processes for all of them (imports dominate the time on 2 cores).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

import distributed_worker as worker
import mesh_worker
from test_distributed import assert_parameters_close, spawn

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

STEPS = 4
# The process groups the trust stage sums over, so its all-reduces per step: HSDP the shard dimension (not the
# replicate one); FSDP2 × TP dp and tp; TP alone tp.
PROCESS_GROUPS = {"hsdp": 1, "fsdp_tp": 2, "tp": 1}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("mesh")
    spawn(mesh_worker.mesh_runs, 4, str(directory / "runs.pt"), STEPS, str(directory / "checkpoint"))
    return torch.load(directory / "runs.pt"), directory / "checkpoint"


def mismatched_norms(run, reference) -> list[str]:
    """The parameters whose ‖θ‖, ‖u‖ or trust ratio in the last step differ from the one-process run's."""
    return [name for name, expected in reference["norms"].items()
            if not all(torch.allclose(a, e, rtol=1e-5, atol=1e-7) for a, e in zip(run["norms"][name], expected))]


def test_placements_are_those_of_large_runs(runs):
    results, _ = runs
    hsdp = results["hsdp/lamb/foreach"]
    assert set(hsdp["placements"].values()) == set(hsdp["gradient_placements"].values()) == {("R", "S(0)")}
    fsdp_tp = results["fsdp_tp/lamb/foreach"]
    for name, (dp, tp) in fsdp_tp["placements"].items():
        assert dp.startswith(("S(", "_S(")), name  # every tensor sharded on dp by FSDP2
        # Replicate on tp: the SequenceParallel norm and the RowwiseParallel bias; _StridedShard: the ColwiseParallel
        # tensors, whose dim 0 both FSDP2 and TP split (not a Shard subclass in torch 2.13).
        assert (tp == "R") == (name in ("norm.weight", "norm.bias", "down.bias")), name
        assert dp.startswith("_S(") == name.startswith("up."), name
    assert fsdp_tp["gradient_placements"] == fsdp_tp["placements"]  # FSDP2 reduced the Partial norm gradients
    tp_alone = results["tp/lamb/foreach"]["gradient_placements"]
    assert tp_alone["norm.weight"] == tp_alone["norm.bias"] == ("P(sum)",)


@pytest.mark.parametrize("mode", mesh_worker.MODES)
@pytest.mark.parametrize("name", list(worker.OPTIMIZERS))
@pytest.mark.parametrize("path", list(worker.PATHS))
def test_two_by_two_mesh_equals_one_process(runs, mode, name, path):
    results, _ = runs
    run, reference = results[f"{mode}/{name}/{path}"], mesh_worker.one_process(mode, name, path, STEPS)
    start = worker.full_parameters(mesh_worker.make_model(mode))
    assert any(not torch.equal(a, b) for a, b in zip(reference["parameters"], start))  # the run moved the parameters
    assert_parameters_close(run["parameters"], reference["parameters"], f"{mode} {name} {path}")
    assert mismatched_norms(run, reference) == []
    torch.testing.assert_close(run["grad_norm"], reference["grad_norm"], rtol=1e-5, atol=1e-7)


def test_summing_over_the_wrong_mesh_dimensions_would_be_caught(runs):
    results, _ = runs
    reference = mesh_worker.one_process("hsdp", "lamb", "foreach", STEPS)
    # Summed over the replicate dimension too: every norm √2 too large. The parameters barely notice (the ratio
    # ‖θ‖/‖u‖ is unchanged; only max_grad_norm's clip moves), the per-tensor norms do.
    counted_twice = results["hsdp/lamb/foreach/wrong rule"]
    assert sorted(mismatched_norms(counted_twice, reference)) == sorted(reference["norms"])
    for name, (weight_norm, update_norm, _) in reference["norms"].items():
        wrong_weight_norm, wrong_update_norm, _ = counted_twice["norms"][name]
        torch.testing.assert_close(wrong_weight_norm, weight_norm * math.sqrt(2), rtol=1e-3, atol=1e-7)
        torch.testing.assert_close(wrong_update_norm, update_norm * math.sqrt(2), rtol=1e-3, atol=1e-7)
    # Summed over Shard placements only: the ColwiseParallel tensors' _StridedShard dp dimension is missed (the rule
    # torchlamb had before meshes of two dimensions were tested).
    reference = mesh_worker.one_process("fsdp_tp", "lamb", "foreach", STEPS)
    missed = results["fsdp_tp/lamb/foreach/wrong rule"]
    assert {"up.weight", "up.bias"} <= set(mismatched_norms(missed, reference))
    assert max((a - b).abs().max().item() for a, b in zip(missed["parameters"], reference["parameters"])) > 1e-4


@pytest.mark.parametrize("mode", mesh_worker.MODES)
def test_one_all_reduce_per_step_per_process_group(runs, mode):
    results, _ = runs
    groups = PROCESS_GROUPS[mode]
    for key, run in results.items():
        if not key.startswith(f"{mode}/") or key.endswith("wrong rule"):
            continue
        # The norms', then max_grad_norm's (the equivalence runs) or the skip flag's agreement (the "skip" runs).
        assert run["all_reduce_calls"] == 2 * groups, key
        assert run["dispatched"].count("c10d.allreduce_.default") == 2 * groups, key
        others = [op for op in run["dispatched"] if op != "c10d.allreduce_.default"]
        if mode == "tp":
            # The two Partial LayerNorm gradients are summed (DTensor's redistribute) each time the step reads them:
            # for the update, and for the gradient norm or the skip flag.
            assert others.count("_c10d_functional.all_reduce.default") == 2 * 2, (key, others)
            assert {op.split(".")[0] for op in others} == {"_c10d_functional"}, (key, others)
            assert not any("gather" in op or "scatter" in op for op in others), (key, others)
        else:
            assert others == [], (key, others)  # no DTensor collective on the parameters


def test_checkpoint_of_the_two_by_two_mesh_resumes_on_one_dimension(runs, tmp_path):
    _, directory = runs
    then = 2
    out = tmp_path / "resumed.pt"
    spawn(mesh_worker.resume, 2, str(out), str(directory), then)
    resumed = torch.load(out)
    for mode, name, path in mesh_worker.CHECKPOINTS:
        reference = mesh_worker.one_process(mode, name, path, mesh_worker.CHECKPOINT_STEPS + then)
        assert_parameters_close(resumed[mode], reference["parameters"], f"{mode} {name} {path} resumed on 2")
