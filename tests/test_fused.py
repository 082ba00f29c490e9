"""Lamb(fused=True): the fused CPU kernel against the foreach path, and its fallbacks.

The float64 reference tests (test_reference.py) run the fused path on random problems as well.
"""

from __future__ import annotations

import pytest
import torch

from torchlamb import PRESETS, Lamb, _fused

pytestmark = pytest.mark.skipif(_fused.kernels() is None, reason="the fused kernel could not be built here")


def run(params, grads_per_step, **options):
    tensors = [p.clone().requires_grad_() for p in params]
    optimizer = Lamb(tensors, **options)
    for grads in grads_per_step:
        for t, g in zip(tensors, grads):
            t.grad = g.clone()
        optimizer.step()
    return tensors, optimizer


def problem(dtype=torch.float32, steps=4):
    torch.manual_seed(0)
    params = [torch.randn(64, 33, dtype=dtype), torch.randn(33, dtype=dtype), torch.zeros(17, dtype=dtype),
              30 * torch.randn(2, 3, 4, dtype=dtype), torch.randn((), dtype=dtype)]
    grads = [[torch.randn_like(p) for p in params] for _ in range(steps)]
    grads[1][1].zero_()  # an all-zero gradient
    return params, grads


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_equals_foreach_for_every_preset(preset, dtype):
    params, grads = problem(dtype)
    fused, fused_opt = run(params, grads, **{**PRESETS[preset], "lr": 0.02, "max_grad_norm": 1.0, "fused": True})
    multi, multi_opt = run(params, grads, **{**PRESETS[preset], "lr": 0.02, "max_grad_norm": 1.0, "foreach": True})
    tolerance = 1e-6 if dtype == torch.float32 else 1e-12
    for a, b in zip(fused, multi):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance * max(1.0, b.abs().max().item()))
    torch.testing.assert_close(fused_opt.trust_stats[0].trust_ratio, multi_opt.trust_stats[0].trust_ratio,
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("options", [dict(maximize=True), dict(adapt=False), dict(weight_decay=0.0),
                                     dict(decay_outside_ratio=True, weight_decay=0.1),
                                     dict(bias_correction=False, trust_clip=(0.0, 10.0))])
def test_fused_equals_foreach_with_options(options):
    params, grads = problem()
    fused, _ = run(params, grads, lr=0.01, fused=True, **options)
    multi, _ = run(params, grads, lr=0.01, foreach=True, **options)
    for a, b in zip(fused, multi):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * max(1.0, b.abs().max().item()))


def test_non_contiguous_parameters_fall_back_to_foreach_with_one_warning():
    params, grads = problem()
    transposed = [params[0].t().contiguous().t()]  # same values, column-major
    with pytest.warns(RuntimeWarning, match="dense CPU tensors"):
        fused, _ = run(transposed, [[g[0]] for g in grads], lr=0.01, fused=True)
    multi, _ = run(transposed, [[g[0]] for g in grads], lr=0.01, foreach=True)
    torch.testing.assert_close(fused[0], multi[0], rtol=0, atol=0)


def test_fused_and_foreach_together_are_rejected():
    with pytest.raises(ValueError, match="foreach and fused"):
        Lamb([torch.zeros(2, requires_grad=True)], foreach=True, fused=True)
