"""GradientAccumulation: K micro-batches behave as one batch K times larger."""

from __future__ import annotations

import pytest
import torch

import torchlamb


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def batches(steps, size):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 6, generator=generator), torch.randn(size, 2, generator=generator))
            for _ in range(steps)]


@pytest.mark.parametrize("optimizer_class", [torchlamb.Lamb, torch.optim.SGD, torch.optim.AdamW])
def test_the_accumulated_gradient_is_the_large_batchs_gradient_in_scale(optimizer_class):
    # p.grad as the optimizer's step sees it, against one backward pass over the whole batch. Lamb, Lars at zero decay
    # and the ratio B_simple are blind to a constant factor of the gradient, so the parameters alone cannot show a
    # loss divided by the number of micro-batches twice (issue 27); AdamW's ε and SGD's step are not, nor is this.
    model = make_model()
    optimizer = optimizer_class(model.parameters(), lr=0.01)
    seen = []
    optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.append([p.grad.clone() for p in model.parameters()]))
    accumulation = torchlamb.GradientAccumulation(optimizer, micro_batches=4)
    for x, y in batches(2, 32):
        expected_model = make_model()
        expected_model.load_state_dict(model.state_dict())
        torch.nn.functional.mse_loss(expected_model(x), y).backward()
        for part_x, part_y in zip(x.chunk(4), y.chunk(4)):
            accumulation.backward(torch.nn.functional.mse_loss(model(part_x), part_y))
        for got, expected in zip(seen[-1], expected_model.parameters()):
            torch.testing.assert_close(got, expected.grad, rtol=1e-5, atol=1e-7)
    assert len(seen) == 2


@pytest.mark.parametrize("optimizer_class", [torchlamb.Lamb, torchlamb.Lars])
def test_micro_batches_equal_one_large_batch(optimizer_class):
    large, small = make_model(), make_model()
    large_opt = optimizer_class(large.parameters(), lr=0.01, max_grad_norm=1.0)
    small_opt = optimizer_class(small.parameters(), lr=0.01, max_grad_norm=1.0)
    large_sched = torchlamb.warmup_poly(large_opt, warmup_steps=1, total_steps=3)
    small_sched = torchlamb.warmup_poly(small_opt, warmup_steps=1, total_steps=3)
    accumulation = torchlamb.GradientAccumulation(small_opt, micro_batches=4, scheduler=small_sched)
    stepped = []
    for x, y in batches(3, 32):
        large_opt.zero_grad()
        torch.nn.functional.mse_loss(large(x), y).backward()
        large_opt.step()
        large_sched.step()
        for part_x, part_y in zip(x.chunk(4), y.chunk(4)):
            stepped.append(accumulation.will_step)
            assert accumulation.backward(torch.nn.functional.mse_loss(small(part_x), part_y)) == stepped[-1]
    assert stepped == [False, False, False, True] * 3
    assert accumulation.steps == 3 and small_sched.last_epoch == large_sched.last_epoch == 3
    for a, b in zip(large.parameters(), small.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in small.parameters())  # cleared after the step


def test_with_a_grad_scaler_and_a_checkpoint():
    model = make_model()
    optimizer = torchlamb.Lamb(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)
    accumulation = torchlamb.GradientAccumulation(optimizer, micro_batches=2, scaler=scaler)
    (x, y), = batches(1, 8)
    assert not accumulation.backward(torch.nn.functional.mse_loss(model(x[:4]), y[:4]))
    saved = accumulation.state_dict()
    resumed = torchlamb.GradientAccumulation(optimizer, micro_batches=2, scaler=scaler)
    resumed.load_state_dict(saved)
    assert resumed.backward(torch.nn.functional.mse_loss(model(x[4:]), y[4:]))
    assert all(optimizer.state[p]["step"].item() == 1 for p in model.parameters())
    assert scaler.get_scale() == 2.0**9  # the scaler stepped and updated: a finite step grows the scale
    with pytest.raises(ValueError, match="micro-batches"):
        torchlamb.GradientAccumulation(optimizer, micro_batches=3).load_state_dict(saved)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_bad_micro_batches_are_named(bad):
    with pytest.raises(ValueError, match="micro_batches"):
        torchlamb.GradientAccumulation(torchlamb.Lamb(make_model().parameters()), micro_batches=bad)


@pytest.mark.parametrize("optimizer_class", [torchlamb.Lamb, torch.optim.SGD])
def test_an_overflow_skips_the_step(optimizer_class):
    model = make_model()
    optimizer = optimizer_class(model.parameters(), lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    accumulation = torchlamb.GradientAccumulation(optimizer, micro_batches=2, scaler=scaler)
    (x, y), = batches(1, 8)
    accumulation.backward(torch.nn.functional.mse_loss(model(x[:4]), y[:4]))
    assert accumulation.backward(torch.nn.functional.mse_loss(model(x[4:]), y[4:]) * float("inf"))
    assert accumulation.steps == 1 and scaler.get_scale() == 2.0**7  # counted, and the scale backed off
    for old, new in zip(before, model.parameters()):
        assert torch.equal(old, new)


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("optimizer_class", [torch.optim.SGD, torchlamb.Lamb])
def test_max_grad_norm_clips_the_accumulated_gradient(scaled, optimizer_class):
    """An optimizer through the accumulation with max_grad_norm equals it on the large batch with clip_grad_norm_;
    with a GradScaler the clip sees unscaled gradients, also for Lamb, which would otherwise unscale them itself
    inside its step (after the clip)."""
    large, small = make_model(), make_model()
    large_opt, small_opt = optimizer_class(large.parameters(), lr=0.1), optimizer_class(small.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if scaled else None
    accumulation = torchlamb.GradientAccumulation(small_opt, micro_batches=4, scaler=scaler, max_grad_norm=0.05)
    for x, y in batches(3, 32):
        large_opt.zero_grad()
        torch.nn.functional.mse_loss(large(x), y).backward()
        assert torch.nn.utils.clip_grad_norm_(large.parameters(), 0.05) > 0.05  # the clip acts
        large_opt.step()
        for part_x, part_y in zip(x.chunk(4), y.chunk(4)):
            accumulation.backward(torch.nn.functional.mse_loss(small(part_x), part_y))
    for a, b in zip(large.parameters(), small.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [0, -1.0, "1", True])
def test_bad_max_grad_norm_is_named(bad):
    with pytest.raises((TypeError, ValueError), match="max_grad_norm"):
        torchlamb.GradientAccumulation(torchlamb.Lamb(make_model().parameters()), 2, max_grad_norm=bad)
