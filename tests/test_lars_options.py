"""Lars's options for other code bases' LARS (lr inside the momentum, dampening, LARC's clip, the zero fallback on
‖g‖) and ``Lars.from_preset``: what each option does on a case small enough to compute by hand, the presets' groups,
bad input, and checkpoints. The presets against the libraries themselves: tests/test_library_presets.py."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchlamb
from torchlamb import LARS_PRESETS, Lars

# The fused C++ kernels (fused=True on CPU tensors) take every option too.
PATHS = [{"foreach": False}, {"foreach": True}, {"fused": True}]


def one_tensor(grad_values, **options):
    """A 2-element tensor θ = (3, 4) (‖θ‖ = 5) stepped with the given gradients; returns θ after each step."""
    theta = torch.tensor([3.0, 4.0], dtype=torch.float64, requires_grad=True)
    optimizer = Lars([theta], **options)
    seen = []
    for values, lr in grad_values:
        optimizer.param_groups[0]["lr"] = lr
        theta.grad = torch.tensor(values, dtype=torch.float64)
        optimizer.step()
        seen.append(theta.detach().clone())
    return seen, optimizer


@pytest.mark.parametrize("path", PATHS, ids=["single_tensor", "foreach", "fused"])
def test_lr_inside_the_momentum_keeps_each_steps_lr(path):
    # g = (0.6, 0.8): ‖g‖ = 1, η = 1, λ = 0: r = ‖θ‖/‖g‖ = 5, r·u = (3, 4). Two steps at lr 0.1 then 0.01, μ = 0.5.
    steps = [([0.6, 0.8], 0.1), ([0.6, 0.8], 0.01)]
    ratio_u = torch.tensor([3.0, 4.0], dtype=torch.float64)
    inside, _ = one_tensor(steps, momentum=0.5, trust_coefficient=1.0, lr_inside_momentum=True, **path)
    outside, _ = one_tensor(steps, momentum=0.5, trust_coefficient=1.0, **path)
    theta0 = torch.tensor([3.0, 4.0], dtype=torch.float64)
    b1 = 0.1 * ratio_u  # inside: b ← μb + lr·r·u, θ ← θ − b
    theta1 = theta0 - b1
    r2 = float(theta1.norm())  # ‖g‖ = 1
    b2 = 0.5 * b1 + 0.01 * r2 * torch.tensor([0.6, 0.8], dtype=torch.float64)
    torch.testing.assert_close(inside[1], theta1 - b2, rtol=1e-14, atol=0)
    c1 = ratio_u  # outside: b ← μb + r·u, θ ← θ − lr·b
    o1 = theta0 - 0.1 * c1
    c2 = 0.5 * c1 + float(o1.norm()) * torch.tensor([0.6, 0.8], dtype=torch.float64)
    torch.testing.assert_close(outside[1], o1 - 0.01 * c2, rtol=1e-14, atol=0)
    assert torch.equal(inside[0], outside[0])  # the same first step at the same lr
    assert (inside[1] - outside[1]).abs().max() > 1e-3  # and different once the lr moved


@pytest.mark.parametrize("path", PATHS, ids=["single_tensor", "foreach", "fused"])
def test_dampening_leaves_the_first_step_undampened(path):
    steps = [([0.6, 0.8], 0.1)] * 3
    dampened, optimizer = one_tensor(steps, momentum=0.9, dampening=0.5, trust_coefficient=1.0, **path)
    sgd_theta = torch.tensor([3.0, 4.0], dtype=torch.float64, requires_grad=True)
    sgd = torch.optim.SGD([sgd_theta], lr=0.1, momentum=0.9, dampening=0.5)
    for expected in dampened:
        # torch SGD on the same scaled gradient r·u: what LARC hands to SGD
        ratio = float(sgd_theta.detach().norm()) / 1.0
        sgd_theta.grad = ratio * torch.tensor([0.6, 0.8], dtype=torch.float64)
        sgd.step()
        torch.testing.assert_close(expected, sgd_theta.detach(), rtol=1e-14, atol=0)


@pytest.mark.parametrize("path", PATHS, ids=["single_tensor", "foreach", "fused"])
def test_larc_clip_caps_the_local_rate_at_the_global_one(path):
    # r = 5 with η = 1: at lr 0.1 < r the clip gives r/lr → 1, so the step is lr·u; at lr 10 > r it keeps r/lr = 0.5.
    for larc_clip in (True, "computed"):
        for lr, expected_ratio in [(0.1, 1.0), (10.0, 0.5), (0.0, 1.0)]:
            _, optimizer = one_tensor([([0.6, 0.8], lr)], momentum=0.0, trust_coefficient=1.0, larc_clip=larc_clip,
                                      **path)
            assert optimizer.trust_stats[0].trust_ratio.item() == pytest.approx(expected_ratio, rel=1e-14)


@pytest.mark.parametrize("path", PATHS, ids=["single_tensor", "foreach", "fused"])
def test_larc_clip_of_the_fallback_ratio_is_timms_not_apexs(path):
    # A zero-initialised tensor falls back to r = 1; at lr 4 timm's clip still divides (r = 1/4), apex's does not.
    for larc_clip, expected_ratio in [(True, 0.25), ("computed", 1.0)]:
        theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        optimizer = Lars([theta], lr=4.0, momentum=0.0, larc_clip=larc_clip, **path)
        theta.grad = torch.tensor([0.6, 0.8], dtype=torch.float64)
        optimizer.step()
        assert optimizer.trust_stats[0].trust_ratio.item() == expected_ratio
        torch.testing.assert_close(theta.detach(), -4.0 * expected_ratio * theta.grad, rtol=1e-15, atol=0)


@pytest.mark.parametrize("path", PATHS, ids=["single_tensor", "foreach", "fused"])
def test_larc_clip_with_a_tensor_lr_stays_on_the_device(path):
    _, optimizer = one_tensor([([0.6, 0.8], torch.tensor(10.0, dtype=torch.float64))], momentum=0.0,
                              trust_coefficient=1.0, larc_clip=True, **path)
    assert optimizer.trust_stats[0].trust_ratio.item() == pytest.approx(0.5, rel=1e-14)


@pytest.mark.parametrize("path", PATHS, ids=["single_tensor", "foreach", "fused"])
def test_zero_fallback_on_the_gradient(path):
    # g = 0, λ = 0.1: the split denominator λ‖θ‖ = 0.5 is not 0, so "denominator" gives r = η‖θ‖/0.5 = 10, "grad"
    # falls back to r = 1 (MLPerf, timm, LARC).
    options = dict(momentum=0.0, weight_decay=0.1, trust_coefficient=1.0, denominator="split", **path)
    _, by_denominator = one_tensor([([0.0, 0.0], 0.1)], **options)
    _, by_grad = one_tensor([([0.0, 0.0], 0.1)], zero_fallback="grad", **options)
    assert by_denominator.trust_stats[0].trust_ratio.item() == pytest.approx(10.0, rel=1e-14)
    assert by_grad.trust_stats[0].trust_ratio.item() == 1.0
    assert by_grad.trust_stats[0].update_norm.item() == 0.0  # the ratio's denominator, as the fallback saw it


def test_every_lars_preset_builds_and_steps():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    for name in LARS_PRESETS:
        optimizer = Lars.from_preset(name, model.parameters())
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()


def test_ndim_exemptions_split_each_group():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    scalar = nn.Parameter(torch.tensor(2.0))
    named = [*model.named_parameters(), ("scale", scalar)]
    barlow = Lars.from_preset("barlow_twins", named, weight_decay=1e-6)
    assert [(g["param_names"], g["weight_decay"], g["adapt"]) for g in barlow.param_groups] == [
        (["0.weight", "scale"], 1e-6, True), (["0.bias", "1.weight", "1.bias"], 0.0, False)]  # ndim == 1 only
    kozistr = Lars.from_preset("pytorch_optimizer", named, weight_decay=1e-6)
    assert [g["param_names"] for g in kozistr.param_groups] == [["0.weight"], ["0.bias", "1.weight", "1.bias",
                                                                               "scale"]]
    # Groups given by the caller keep their own options, and each gets its exempt companion right after it.
    groups = [{"params": [model[0].weight, model[0].bias], "lr": 0.5}, {"params": list(model[1].parameters())}]
    split = Lars.from_preset("barlow_twins", groups)
    assert [(len(g["params"]), g["lr"], g["adapt"]) for g in split.param_groups] == [
        (1, 0.5, True), (1, 0.5, False), (2, split.defaults["lr"], False)]


def test_presets_without_exemptions_keep_the_groups_as_given():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    groups = torchlamb.param_groups(model, weight_decay=1e-4)
    optimizer = Lars.from_preset("mlperf", groups)
    assert [len(g["params"]) for g in optimizer.param_groups] == [len(g["params"]) for g in groups]
    assert optimizer.param_groups[0]["lr_inside_momentum"] and optimizer.param_groups[0]["zero_fallback"] == "grad"


def test_bad_preset_input_is_named():
    params = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="unknown preset 'simclr2'.*'barlow_twins'"):
        Lars.from_preset("simclr2", params)
    with pytest.raises(ValueError, match="dampening"):
        Lars.from_preset("larc", params, dampening=1.5)
    with pytest.raises(ValueError, match="nesterov=True requires dampening=0"):
        Lars.from_preset("timm", params, momentum=0.9, nesterov=True, dampening=0.1)
    with pytest.raises(ValueError, match="zero_fallback"):
        Lars(params, zero_fallback="theta")
    with pytest.raises(TypeError, match="larc_clip must be True, False or 'computed'"):
        Lars(params, larc_clip="yes")
    with pytest.raises(TypeError, match="lr_inside_momentum"):
        Lars(params, lr_inside_momentum=1)
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        Lars.from_preset("optax", params, lr=torch.tensor([0.1, 0.2]))


@pytest.mark.parametrize("path", PATHS, ids=["single_tensor", "foreach", "fused"])
def test_resuming_with_the_lr_inside_the_momentum_is_exact(path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 1))
    data = [torch.randn(8, 5) for _ in range(6)]

    def train(model, optimizer, batches, first_step):
        for k, x in enumerate(batches):
            for group in optimizer.param_groups:
                group["lr"] = 0.5 / (1 + first_step + k)  # moves every step
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()

    options = dict(lr=0.5, weight_decay=1e-3, dampening=0.3, larc_clip=True, **path)
    straight = copy.deepcopy(model)
    straight_opt = Lars.from_preset("simclr", straight.parameters(), **options)
    train(straight, straight_opt, data, 0)

    first = copy.deepcopy(model)
    first_opt = Lars.from_preset("simclr", first.parameters(), **options)
    train(first, first_opt, data[:3], 0)
    saved = copy.deepcopy((first.state_dict(), first_opt.state_dict()))
    resumed = copy.deepcopy(model)
    resumed.load_state_dict(saved[0])
    resumed_opt = Lars.from_preset("simclr", resumed.parameters(), lr=1.0)  # options come from the checkpoint
    resumed_opt.load_state_dict(saved[1])
    assert resumed_opt.param_groups[0]["dampening"] == 0.3
    train(resumed, resumed_opt, data[3:], 3)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
