"""The claims of LAMB's sources, each checked directly: You et al. (2019), "Large Batch Optimization for Deep
Learning: Training BERT in 76 minutes"; Ben Mann's post "An intuitive understanding of the LAMB optimizer" (2019, by
the author of cybertronai/pytorch-lamb); and a blog post on a simplified LAMB with an RMS norm it calls "pomero"."""

from __future__ import annotations

import pytest
import torch

from torchlamb import Lamb, Lars

IMPLEMENTATIONS = pytest.mark.parametrize("foreach", [False, True], ids=["single_tensor", "foreach"])


def pomero(t: torch.Tensor) -> torch.Tensor:
    """The "pomero" norm of the blog post on a simplified LAMB: power 2, mean, square root (the RMS norm)."""
    return t.pow(2).mean().sqrt()


@IMPLEMENTATIONS
def test_pomero_rule_without_weight_decay(foreach):
    """The simplified LAMB of the "pomero" post: p ← p − lr·pomero(p)/pomero(step)·step, with step the
    bias-corrected Adam step."""
    torch.manual_seed(0)
    lr, (beta1, beta2), eps = 0.02, (0.9, 0.999), 1e-6
    shapes = [(16, 8), (8,), (3, 4, 5)]
    params = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    optimizer = Lamb(params, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=0.0, foreach=foreach)

    expected = [p.detach().clone() for p in params]
    m = [torch.zeros_like(p) for p in expected]
    v = [torch.zeros_like(p) for p in expected]
    for t in range(1, 6):
        grads = [torch.randn_like(p) for p in expected]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
        for i, g in enumerate(grads):
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            adam_step = (m[i] / (1 - beta1**t)) / ((v[i] / (1 - beta2**t)).sqrt() + eps)
            expected[i] = expected[i] - lr * pomero(expected[i]) / pomero(adam_step) * adam_step
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-12)


@IMPLEMENTATIONS
def test_trust_ratio_clipped_at_ten(foreach):
    """Ben Mann's post: LAMB clips the trust ratio at 10. A layer with ‖θ‖ ≫ ‖u‖ would get a ratio far above it."""
    # ‖θ‖ = 8000; at step 1 ‖u‖ ≈ √64 = 8, so r ≈ 1000. float64 so the small moves are measurable at 1000.
    big = torch.full((64,), 1000.0, dtype=torch.float64, requires_grad=True)
    unclipped = big.detach().clone().requires_grad_()
    grad = torch.randn(64, dtype=torch.float64)
    for p in (big, unclipped):
        p.grad = grad.clone()
    clipped_opt = Lamb([big], lr=1e-3, weight_decay=0.0, trust_clip=(0.0, 10.0), foreach=foreach)
    free_opt = Lamb([unclipped], lr=1e-3, weight_decay=0.0, foreach=foreach)
    clipped_opt.step()
    free_opt.step()
    assert free_opt.trust_stats[0].trust_ratio.item() > 100
    assert clipped_opt.trust_stats[0].trust_ratio.item() == pytest.approx(10.0)
    # The clipped step is exactly 10·lr·u: compare the two moves, which share the direction u.
    clipped_move = (big.detach() - 1000.0).norm()
    free_move = (unclipped.detach() - 1000.0).norm()
    ratio = free_opt.trust_stats[0].trust_ratio.item()
    assert clipped_move.item() == pytest.approx(free_move.item() * 10.0 / ratio, rel=1e-9)


@IMPLEMENTATIONS
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_relative_change_of_each_adapted_tensor_equals_lr(foreach, weight_decay):
    """The trust ratio makes ‖Δθ‖/‖θ‖ = lr for every adapted tensor, whatever its scale (You et al. 2019)."""
    torch.manual_seed(1)
    lr = 0.05
    params = [(scale * torch.randn(shape, dtype=torch.float64)).requires_grad_()
              for scale, shape in [(1e-3, (10, 10)), (1.0, (5, 7)), (1e3, (30,)), (1.0, ())]]
    optimizer = Lamb(params, lr=lr, weight_decay=weight_decay, foreach=foreach)
    for _ in range(5):
        before = [p.detach().clone() for p in params]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-2
        optimizer.step()
        for p, b in zip(params, before):
            relative_change = (p.detach() - b).norm() / b.norm()
            assert relative_change.item() == pytest.approx(lr, rel=1e-10)


@IMPLEMENTATIONS
def test_zero_norm_fallback_gives_ratio_one(foreach):
    """A zero-initialised tensor (‖θ‖ = 0) and an all-zero update (‖u‖ = 0) both get ratio 1, never NaN."""
    zero_bias = torch.zeros(8, requires_grad=True)  # ‖θ‖ = 0, nonzero gradient
    frozen_update = torch.randn(4, 3, requires_grad=True)  # all-zero gradient and no decay: ‖u‖ = 0
    zero_bias.grad = torch.randn(8)
    frozen_update.grad = torch.zeros(4, 3)
    before = frozen_update.detach().clone()
    optimizer = Lamb([zero_bias, frozen_update], lr=0.1, weight_decay=0.0, foreach=foreach)
    optimizer.step()
    stats = optimizer.trust_stats[0]
    assert stats.weight_norm[0].item() == 0.0 and stats.update_norm[1].item() == 0.0
    torch.testing.assert_close(stats.trust_ratio, torch.ones(2))
    assert torch.isfinite(zero_bias).all() and zero_bias.abs().sum() > 0  # it moved, by lr·u
    torch.testing.assert_close(frozen_update.detach(), before)  # u = 0: nothing moves


@IMPLEMENTATIONS
@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_without_adaptation_is_torch_sgd(foreach, nesterov):
    """With the ratio off, LARS is momentum SGD with L2 weight decay: torch.optim.SGD, an independent code base."""
    torch.manual_seed(0)
    start = [torch.randn(6, 5), torch.randn(5)]
    ours = [p.clone().requires_grad_() for p in start]
    theirs = [p.clone().requires_grad_() for p in start]
    lars = Lars([{"params": ours, "adapt": False}], lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=nesterov,
                foreach=foreach)
    sgd = torch.optim.SGD(theirs, lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=nesterov)
    for _ in range(5):
        grads = [torch.randn_like(p) for p in start]
        for a, b, g in zip(ours, theirs, grads):
            a.grad, b.grad = g.clone(), g.clone()
        lars.step()
        sgd.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


@IMPLEMENTATIONS
def test_lars_moves_each_tensor_by_lr_times_eta_times_its_norm(foreach):
    """The LARS of Ben Mann's post: the local lr is η·‖θ‖/‖∇L + λθ‖, so a momentum-free step moves θ by lr·η·‖θ‖."""
    torch.manual_seed(0)
    lr, eta = 2.0, 0.01
    params = [(scale * torch.randn(12, 7, dtype=torch.float64)).requires_grad_() for scale in (1e-2, 1.0, 1e2)]
    optimizer = Lars(params, lr=lr, momentum=0.0, weight_decay=5e-4, trust_coefficient=eta, foreach=foreach)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    for p, b in zip(params, before):
        assert ((p.detach() - b).norm() / b.norm()).item() == pytest.approx(lr * eta, rel=1e-10)
