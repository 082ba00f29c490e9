"""warmup_poly, scale_lr and the BERT recipe."""

from __future__ import annotations

import math

import pytest
import torch

from torchlamb import BERT_LAMB_PHASES, Lamb, Lars, scale_lr, warmup_poly


def lrs_over(scheduler, steps):
    seen = []
    for _ in range(steps):
        seen.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return seen


def make_optimizer(lr=1.0, optimizer_class=Lamb):
    return optimizer_class([torch.zeros(3, requires_grad=True)], lr=lr)


@pytest.mark.parametrize(
    ("power", "end_factor", "expected"),
    [
        # warmup 4, total 12: 0, 1/4, 2/4, 3/4, peak at 4, then (1 - k/8)^p scaled into [end, 1], end from 12 on.
        (1.0, 0.0, [0, 0.25, 0.5, 0.75, 1, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0, 0, 0]),
        (1.0, 0.2, [0, 0.25, 0.5, 0.75, 1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.2, 0.2]),
        (0.5, 0.0, [0, 0.25, 0.5, 0.75] + [math.sqrt(1 - k / 8) for k in range(9)] + [0, 0]),
        (2.0, 0.0, [0, 0.25, 0.5, 0.75] + [(1 - k / 8) ** 2 for k in range(9)] + [0, 0]),
    ],
)
def test_warmup_then_polynomial_decay(power, end_factor, expected):
    scheduler = warmup_poly(make_optimizer(lr=0.01), warmup_steps=4, total_steps=12, power=power,
                            end_factor=end_factor)
    assert isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)
    assert lrs_over(scheduler, 15) == pytest.approx([0.01 * f for f in expected], abs=1e-15)


def test_no_warmup_starts_at_the_peak():
    assert lrs_over(warmup_poly(make_optimizer(), 0, 4), 5) == pytest.approx([1, 0.75, 0.5, 0.25, 0])


def test_each_group_scales_its_own_base_lr():
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    optimizer = Lars([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.1}])
    scheduler = warmup_poly(optimizer, 2, 4)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.5, 0.05])


def test_state_dict_round_trip_continues_the_schedule():
    scheduler = warmup_poly(make_optimizer(), 5, 20, power=0.5)
    lrs_over(scheduler, 7)
    state = scheduler.state_dict()
    expected = lrs_over(scheduler, 10)

    optimizer = make_optimizer()
    restored = warmup_poly(optimizer, 5, 20, power=0.5)
    restored.load_state_dict(state)
    optimizer.param_groups[0]["lr"] = restored.get_last_lr()[0]  # as the optimizer's own checkpoint would
    assert lrs_over(restored, 10) == pytest.approx(expected)


def test_tensor_lr_is_updated_in_place():
    lr = torch.tensor(0.1)
    optimizer = make_optimizer(lr=lr)
    scheduler = warmup_poly(optimizer, 2, 4)
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(0.05)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"warmup_steps": -1, "total_steps": 10}, "warmup_steps"),
        ({"warmup_steps": 11, "total_steps": 10}, "warmup_steps must be <= total_steps"),
        ({"warmup_steps": 0, "total_steps": 0}, "total_steps"),
        ({"warmup_steps": 1.5, "total_steps": 10}, "warmup_steps"),
        ({"warmup_steps": 1, "total_steps": 10, "power": 0.0}, "power"),
        ({"warmup_steps": 1, "total_steps": 10, "end_factor": 1.5}, "end_factor"),
    ],
)
def test_bad_schedule_arguments(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        warmup_poly(make_optimizer(), **kwargs)


def test_sqrt_rule_reproduces_the_papers_untuned_learning_rates():
    # You et al. 2019: lr = 5/(2^k·10^3) from batch 512 (k = 3) to 32K (k = 0), ×√2 per doubling.
    for doublings in range(7):
        batch = 512 * 2**doublings
        expected = 5 / (2 ** (3 - doublings / 2) * 1e3)
        assert scale_lr(5 / (2**3 * 1e3), 512, batch) == pytest.approx(expected, rel=1e-12)
    assert scale_lr(5e-3, 32768, 512) == pytest.approx(6.25e-4)


def test_linear_rule_and_bad_arguments():
    assert scale_lr(0.1, 256, 8192, rule="linear") == pytest.approx(3.2)  # Goyal et al.: 0.1 per 256
    with pytest.raises(ValueError, match="rule"):
        scale_lr(0.1, 256, 512, rule="cubic")
    with pytest.raises(ValueError, match="batch"):
        scale_lr(0.1, 256, 0)
    with pytest.raises(ValueError, match="base_lr"):
        scale_lr(-0.1, 256, 512)


def test_bert_two_phase_recipe():
    phase1, phase2 = BERT_LAMB_PHASES
    assert (phase1.seq_len, phase1.batch, phase1.lr, phase1.steps) == (128, 65536, 6e-3, 7038)
    assert (phase2.seq_len, phase2.batch, phase2.lr, phase2.steps) == (512, 32768, 4e-3, 1563)
    assert (phase1.warmup_steps, phase2.warmup_steps) == (2001, 200)
