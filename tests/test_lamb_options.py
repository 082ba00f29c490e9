"""Lamb's options from other libraries (issue 26): caution, corrected_weight_decay, decay_after_step and
trust_coefficient. Their math is held to the float64 reference by test_matrix.py (every path and dtype), the 8-bit
state by test_quantized_state.py and Triton by test_triton.py; here: caution's mask mean over a whole tensor that is
split into shards (each path's two-pass form, the sums added as the all-reduce would), a bitwise resume from a
state_dict, and the checks of the options."""

from __future__ import annotations

import pytest
import torch

from switches import set_triton_on_cpu
from torchlamb import Lamb, _storage, kernels, quantized
from torchlamb._storage import StepScratch
from torchlamb.trust import trust_stage

PATHS = [("single_tensor", False), ("foreach", False), ("fused", False), ("triton", False), ("foreach", True),
         ("fused", True), ("triton", True)]
OPTIONS = [dict(caution=True, weight_decay=0.05, maximize=True),
           dict(caution=True, decay_outside_ratio=True, corrected_weight_decay=True, weight_decay=0.1),
           dict(caution=True, decay_after_step=True, weight_decay=0.1, trust_coefficient=0.5)]


def _path_options(implementation, eight_bit, monkeypatch):
    if implementation == "triton":
        if kernels.triton_module() is None:
            pytest.skip("triton is not installed")
        set_triton_on_cpu(monkeypatch)
    selected = {"single_tensor": dict(foreach=False), "foreach": dict(foreach=True)}.get(implementation,
                                                                                         dict(fused=True))
    return {**selected, **(dict(state_dtype="8bit") if eight_bit else {})}


ROWS = 8  # small: the Triton cases run in its interpreter


def _problem(steps=3):
    generator = torch.Generator().manual_seed(11)
    whole = torch.randn(ROWS, 300, generator=generator)
    # Gradients the moments agree with on most of the first half and on few of the second: the two halves' masks
    # have different means, so a mean per shard would give another update.
    grads = []
    for _ in range(steps):
        grad = torch.randn(ROWS, 300, generator=generator)
        grad[:ROWS // 2] = grad[:ROWS // 2].abs() + 0.1
        grads.append(grad)
    return whole, grads


@pytest.mark.parametrize("options", OPTIONS, ids=["coupled", "decoupled_corrected", "after_step"])
@pytest.mark.parametrize(("implementation", "eight_bit"), PATHS, ids=[f"{i}{'-8bit' if e else ''}" for i, e in PATHS])
def test_caution_takes_the_mask_mean_of_the_whole_sharded_tensor(implementation, eight_bit, options, monkeypatch):
    monkeypatch.setattr(quantized, "MIN_NUMEL", 1024)  # each half (4 x 300) keeps 8-bit state
    path = _path_options(implementation, eight_bit, monkeypatch)
    whole, grads = _problem()
    lr = 0.02 if not options.get("corrected_weight_decay") else 0.01
    # The whole tensor, stepped as usual.
    tensor = whole.clone().requires_grad_()
    optimizer = Lamb([{"params": [tensor], "max_lr": 0.05}], lr=lr, **options, **path)
    for grad in grads:
        tensor.grad = grad.clone()
        optimizer.step()
    # Its two halves as the shards of one tensor: each path's pass 1 on both, their sums added (what the all-reduce
    # makes of them), and the trust stage with the whole tensor's sums on each.
    shards = [whole[:ROWS // 2].clone().requires_grad_(), whole[ROWS // 2:].clone().requires_grad_()]
    sharded = Lamb([{"params": shards, "max_lr": 0.05}], lr=lr, **options, **path)
    group = sharded.param_groups[0]
    for grad in grads:
        for shard, part in zip(shards, grad.split(ROWS // 2)):
            shard.grad = part.clone()
            if not sharded.state[shard]:
                sharded.state[shard] = _storage.initial_state("Lamb", group, shard, "shard", sharded._quantized,
                                                              sharded._new_state)
        with torch.no_grad():
            _sharded_stage(sharded, group, shards, implementation)
    torch.testing.assert_close(torch.cat([s.detach() for s in shards]), tensor.detach(), rtol=2e-6, atol=2e-7)
    assert not torch.equal(tensor.detach(), whole)


def _sharded_stage(sharded, group, shards, implementation):
    """One step of ``shards`` as the shards of one tensor (what LayerwiseOptimizer.step does for sharded tensors)."""
    targets, target_grads = _storage.targets(sharded.state, shards, [s.grad for s in shards])
    scratch = StepScratch()
    pending = sharded._first_pass(group, shards, targets, target_grads, None, implementation, None, scratch)
    assert pending.complete is not None and pending.squares.shape[1] == 5
    summed = pending.squares.sum(0, keepdim=True).expand(2, -1).contiguous()
    trust_stage(pending, summed, shards, lambda norms: sharded._update_norm(group, norms),
                sharded._trust_options(group))
    scratch.finish(sharded.state, shards)


@pytest.mark.parametrize("path", [dict(foreach=False), dict(foreach=True), dict(fused=True),
                                  dict(state_dtype="8bit", fused=True)], ids=["single", "foreach", "fused", "8bit"])
@pytest.mark.parametrize("options", [dict(caution=True, decay_outside_ratio=True, corrected_weight_decay=True),
                                     dict(caution=True, decay_after_step=True, trust_coefficient=0.5)],
                         ids=["caution_corrected", "caution_after_step"])
def test_a_resume_from_a_state_dict_is_bitwise_identical(path, options):
    torch.manual_seed(0)
    start = [torch.randn(80, 64), torch.randn(64), torch.randn(5, 3)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(6)]
    lrs = [0.01 * (1 + i) for i in range(6)]  # a schedule: the corrected decay's lr²/max_lr changes every step

    def make(params):
        return Lamb([{"params": params[:2]}, {"params": params[2:], "max_lr": 0.5, "weight_decay": 0.2}], lr=0.03,
                    weight_decay=0.1, **options, **path)

    def train(params, optimizer, steps):
        for i in steps:
            for group in optimizer.param_groups:
                group["lr"] = lrs[i]
            for p, g in zip(params, grads[i]):
                p.grad = g.clone()
            optimizer.step()

    straight = [p.clone().requires_grad_() for p in start]
    train(straight, make(straight), range(6))
    first = [p.clone().requires_grad_() for p in start]
    optimizer = make(first)
    train(first, optimizer, range(3))
    saved = optimizer.state_dict()
    assert [g["max_lr"] for g in saved["param_groups"]] == [0.03, 0.5]
    resumed = [p.detach().clone().requires_grad_() for p in first]
    other = Lamb([{"params": resumed[:2]}, {"params": resumed[2:]}], lr=1.0, weight_decay=0.1, **options, **path)
    other.load_state_dict(saved)
    assert [g["max_lr"] for g in other.param_groups] == [0.03, 0.5]
    train(resumed, other, range(3, 6))
    assert all(torch.equal(a, b) for a, b in zip(resumed, straight))


def test_max_lr_is_the_constructors_lr_as_a_float_for_every_group():
    lr = torch.tensor(0.25)
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    optimizer = Lamb([a], lr=lr, decay_outside_ratio=True, corrected_weight_decay=True)
    lr.fill_(0.5)  # the snapshot does not follow the tensor
    optimizer.add_param_group({"params": [b], "lr": 0.1})
    assert [g["max_lr"] for g in optimizer.param_groups] == [0.25, 0.25]
    assert isinstance(optimizer.param_groups[0]["max_lr"], float)


def test_a_tensor_lr_gives_the_corrected_decay_of_a_float_lr():
    results = []
    for lr in (0.02, torch.tensor(0.02)):
        param = torch.ones(4, 3).requires_grad_()
        optimizer = Lamb([param], lr=0.05, weight_decay=0.3, decay_outside_ratio=True, corrected_weight_decay=True,
                         foreach=True)
        optimizer.param_groups[0]["lr"] = lr
        param.grad = torch.full_like(param, 0.5)
        optimizer.step()
        results.append(param.detach())
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=0)


@pytest.mark.parametrize(("options", "error", "message"), [
    (dict(caution=1), TypeError, "caution must be True or False"),
    (dict(decay_after_step="yes"), TypeError, "decay_after_step must be True or False"),
    (dict(corrected_weight_decay=None), TypeError, "corrected_weight_decay must be True or False"),
    (dict(corrected_weight_decay=True), ValueError, "corrected_weight_decay=True needs decay_outside_ratio=True"),
    (dict(decay_after_step=True, decay_outside_ratio=True), ValueError, "decay_after_step and decay_outside_ratio"),
    (dict(trust_coefficient=0.0), ValueError, "trust_coefficient must be in"),
    (dict(trust_coefficient=-1.0), ValueError, "trust_coefficient must be in"),
    (dict(trust_coefficient="1"), TypeError, "trust_coefficient must be a number"),
    (dict(lr=0.0, decay_outside_ratio=True, corrected_weight_decay=True), ValueError, "max_lr must be in"),
])
def test_bad_options_are_refused_by_name(options, error, message):
    with pytest.raises(error, match=message):
        Lamb([torch.zeros(2, requires_grad=True)], **options)


def test_a_group_with_a_bad_max_lr_is_refused():
    optimizer = Lamb([torch.zeros(2, requires_grad=True)], lr=0.1, decay_outside_ratio=True,
                     corrected_weight_decay=True)
    with pytest.raises(ValueError, match=r"max_lr must be in \(0.0, inf\].*param group 1"):
        optimizer.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "max_lr": 0.0})
    with pytest.raises(TypeError, match="max_lr must be a float"):
        optimizer.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "max_lr": torch.tensor(0.1)})
