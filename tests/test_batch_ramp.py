"""BatchRamp: the batch grows to the size the rule predicts on a problem whose noise scale is known in closed form, the
gradient stays the large batch's exactly in scale across every growth, the lr factor holds for the step only, resume
is bitwise across a growth step, and bad input is named. (DDP agreement: tests/test_distributed.py.)"""

from __future__ import annotations

import csv
import io
import math

import pytest
import torch
from torch import nn

import torchlamb
from test_noise_scale import SIGMA, TRUE_B_SIMPLE, D, regression_model
from torchlamb.batch_ramp import linear_schedule


@pytest.mark.parametrize("factor", [2.5, 5.0])
def test_the_ramp_settles_at_the_batch_the_rule_predicts_and_noise_scale_follows_the_growth(factor):
    """lr 0 keeps B_simple at 21: the batch must grow from 4 by doublings to the largest 4·2^k ≤ factor·21 and stay."""
    model, w_star, _ = regression_model()  # B_simple = D + 1 + Dσ² = 21 while lr 0 keeps w put
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    accumulation = torchlamb.GradientAccumulation(optimizer, micro_batches=2)
    noise = torchlamb.NoiseScale(model, optimizer, batch_size=2, micro_batches=2, ema=0.95, every=10)
    ramp = torchlamb.BatchRamp(accumulation, noise, max_batch=512, factor=factor, interval=10)
    generator = torch.Generator().manual_seed(1)
    while accumulation.steps < 250:
        x = torch.randn(2, D, generator=generator, dtype=torch.float64)
        y = x @ w_star + SIGMA * torch.randn(2, generator=generator, dtype=torch.float64)
        accumulation.backward(0.5 * ((model(x).squeeze(1) - y) ** 2).mean())
    predicted = 4 * 2 ** math.floor(math.log2(factor * TRUE_B_SIMPLE / 4))
    batches = [row["batch"] for row in ramp.records]
    assert batches == [4 * 2**k for k in range(len(batches))] and batches[-1] == predicted, ramp.records
    assert ramp.batch_size == predicted == noise.large_batch and accumulation.micro_batches == predicted // 2
    assert all(factor * row["b_simple"] >= row["batch"] for row in ramp.records[1:])
    assert ramp.records[-1]["step"] < 100  # settled early, then held for 150 steps
    # The estimates stay right across the changes of B (b = 2 throughout): |G|² = 1, tr(Σ) = 21.
    estimates = noise.estimates()
    assert estimates["grad_sq"][-1].item() == pytest.approx(1.0, rel=0.15)
    assert estimates["trace"][-1].item() == pytest.approx(TRUE_B_SIMPLE, rel=0.15)


def test_the_accumulated_gradient_is_the_large_batchs_before_and_after_every_growth():
    """At each optimizer step p.grad equals the gradient of one backward pass over all the step's micro-batches
    together (float64, 1e-12), while a schedule grows the batch 3 → 6 → 12 (1, 2, then 4 micro-batches)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    accumulation = torchlamb.GradientAccumulation(optimizer, micro_batches=1)
    ramp = torchlamb.BatchRamp(accumulation, max_batch=12, micro_batch_size=3, schedule=[(9, 6), (21, 12)])
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []
    checked: list[int] = []

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(model(x), y)

    def compare(*_: object) -> None:
        x, y = torch.cat([x for x, _ in pending]), torch.cat([y for _, y in pending])
        expected = torch.autograd.grad(loss_of(x, y), list(model.parameters()))
        for p, g in zip(model.parameters(), expected):
            torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-15)
        checked.append(len(pending))
        pending.clear()

    optimizer.register_step_pre_hook(compare)
    generator = torch.Generator().manual_seed(1)
    while accumulation.steps < 8:
        x = torch.randn(3, 5, generator=generator, dtype=torch.float64)
        y = torch.randn(3, 2, generator=generator, dtype=torch.float64)
        pending.append((x, y))
        accumulation.backward(loss_of(x, y))
    # Examples after each step: 3, 6, 9 → 6 from then; 15, 21 → 12 from then.
    assert checked == [1, 1, 1, 2, 2, 4, 4, 4]
    assert [(row["step"], row["examples"], row["batch"]) for row in ramp.records] == [(0, 0, 3), (3, 9, 6),
                                                                                       (5, 21, 12)]


@pytest.mark.parametrize("rule,expected", [("sqrt", [1, 1, 2**0.5, 2**0.5, 2, 2]), ("linear", [1, 1, 2, 2, 4, 4]),
                                           ("none", [1] * 6)])
def test_the_lr_factor_holds_for_the_step_only_and_composes_with_a_schedule_in_examples(rule, expected):
    """The lr a step runs at is the schedule's (in examples) times the rule's factor; after the step the group holds
    the schedule's own lr, bit for bit, so the scheduler neither overwrites the factor nor applies it twice."""
    weight = nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.5)
    accumulation = torchlamb.GradientAccumulation(optimizer, micro_batches=1)
    ramp = torchlamb.BatchRamp(accumulation, max_batch=16, micro_batch_size=4, schedule=[(8, 8), (24, 16)],
                               lr_rule=rule)
    accumulation.scheduler = torchlamb.warmup_poly(optimizer, 12, 200, progress=ramp.examples_seen)
    used, after, seen, schedule = [], [], [], accumulation.scheduler
    optimizer.register_step_pre_hook(lambda *_: used.append(optimizer.param_groups[0]["lr"]))
    for _ in range(6):
        seen.append(ramp.examples)
        while not accumulation.backward(weight.sum()):
            pass
        after.append(optimizer.param_groups[0]["lr"])
    # Examples before each step: 0, 4, 8 (batch 8 from then), 16, 24 (16 from then), 40.
    assert seen == [0, 4, 8, 16, 24, 40]
    for lr, factor, examples in zip(used, expected, seen):
        assert lr == pytest.approx(0.5 * schedule.factor(examples) * factor, rel=1e-15)
    # After each step (scheduler stepped on the examples seen by then) the factor is off again.
    assert after == [0.5 * schedule.factor(e) for e in seen[1:] + [ramp.examples]]
    assert optimizer.param_groups[0]["lr"] == 0.5 * schedule.factor(ramp.examples)
    assert "progress" not in schedule.state_dict()


def test_a_chained_scheduler_sees_the_lr_without_the_factor():
    """ExponentialLR multiplies the group's current lr: had the factor stayed in it, it would compound."""
    weight = nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.3)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.9)
    accumulation = torchlamb.GradientAccumulation(optimizer, micro_batches=1, scheduler=scheduler)
    ramp = torchlamb.BatchRamp(accumulation, max_batch=4, micro_batch_size=1, schedule=[(1, 4)], lr_rule="linear")
    used = []
    optimizer.register_step_pre_hook(lambda *_: used.append(optimizer.param_groups[0]["lr"]))
    lr = 0.3
    for step in range(5):
        while not accumulation.backward(weight.sum()):
            pass
        assert used[-1] == lr * ramp.records[0 if step == 0 else -1]["lr_factor"]
        lr = lr * 0.9  # what ExponentialLR does on an lr that never carried the factor
        assert optimizer.param_groups[0]["lr"] == lr


def _training(steps_between: tuple[int, int], checkpoint: dict | None = None):
    """Lamb with a measured ramp (factor 100: a growth at every decision, each 4 steps, 2 → 16 micro-batches), a
    NoiseScale and warmup_poly in examples; micro-batch i is drawn from seed i, so a resumed run reads on from the
    examples the ramp has seen. Trains from step steps_between[0] (loading ``checkpoint``) to steps_between[1];
    returns the objects."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    optimizer = torchlamb.Lamb(model.parameters(), lr=0.02, weight_decay=0.01)
    accumulation = torchlamb.GradientAccumulation(optimizer, micro_batches=2)
    noise = torchlamb.NoiseScale(model, optimizer, batch_size=4, micro_batches=2, every=3)
    ramp = torchlamb.BatchRamp(accumulation, noise, max_batch=64, factor=100.0, interval=4)
    accumulation.scheduler = torchlamb.warmup_poly(optimizer, 40, 2000, progress=ramp.examples_seen)
    if checkpoint is not None:
        ramp.load_state_dict(checkpoint["ramp"])  # first: it restores the micro-batch count the others check
        for name, target in (("model", model), ("optimizer", optimizer), ("accumulation", accumulation),
                             ("noise", noise), ("scheduler", accumulation.scheduler)):
            target.load_state_dict(checkpoint[name])
    assert accumulation.steps == steps_between[0]
    while accumulation.steps < steps_between[1]:
        generator = torch.Generator().manual_seed(ramp.examples // 4 + accumulation.count)
        x = torch.randn(4, 6, generator=generator)
        accumulation.backward(nn.functional.mse_loss(model(x), x[:, :3].cos()))
    return model, optimizer, accumulation, noise, ramp


@pytest.mark.parametrize("stop", [3, 4, 5])  # just before the first growth, at it, just after it
def test_resume_is_bitwise_across_a_growth_step(stop):
    model, optimizer, accumulation, noise, ramp = _training((0, 20))
    assert [row["step"] for row in ramp.records] == [0, 4, 8, 12]
    stopped = _training((0, stop))
    buffer = io.BytesIO()
    names = ("model", "optimizer", "accumulation", "noise", "ramp")
    torch.save({name: thing.state_dict() for name, thing in zip(names, stopped)}
               | {"scheduler": stopped[2].scheduler.state_dict()}, buffer)
    buffer.seek(0)
    resumed = _training((stop, 20), torch.load(buffer, weights_only=False))
    for a, b in zip(model.parameters(), resumed[0].parameters()):
        assert torch.equal(a, b)
    assert repr(resumed[4].records) == repr(ramp.records) and repr(resumed[3].records) == repr(noise.records)
    assert resumed[4].examples == ramp.examples and resumed[2].micro_batches == accumulation.micro_batches
    assert optimizer.param_groups[0]["lr"] == resumed[1].param_groups[0]["lr"]


def test_linear_schedule_is_the_megatron_ramp_in_doublings():
    assert linear_schedule(32, 256, 7000) == [(1000, 64), (3000, 128), (7000, 256)]
    assert linear_schedule(8, 72, 10, growth=3) == [(3, 24), (10, 72)]
    with pytest.raises(ValueError, match="max_batch"):
        linear_schedule(64, 64, 100)


def test_records_csv_and_plot(tmp_path):
    model, w_star, _ = regression_model()  # B_simple = D + 1 + Dσ² = 21 while lr 0 keeps w put
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    accumulation = torchlamb.GradientAccumulation(optimizer, micro_batches=2)
    noise = torchlamb.NoiseScale(model, optimizer, batch_size=2, micro_batches=2, every=2)
    ramp = torchlamb.BatchRamp(accumulation, noise, max_batch=16, factor=10.0, interval=3)
    for i in range(60):
        x = torch.randn(2, D, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        accumulation.backward(0.5 * ((model(x).squeeze(1) - x @ w_star) ** 2).mean() + 0.1 * model.weight.sum())
    with ramp.to_csv(tmp_path / "ramp.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [int(row["batch"]) for row in rows] == [row["batch"] for row in ramp.records] and len(rows) > 1
    assert list(rows[0]) == ["step", "examples", "batch", "micro_batches", "lr_factor", "b_simple"]
    assert float(rows[1]["b_simple"]) == ramp.records[1]["b_simple"]
    assert ramp.examples_at(ramp.steps) == ramp.examples
    assert ramp.plot(tmp_path / "ramp.png", noise).read_bytes()[:4] == b"\x89PNG"


def test_bad_input_is_named():
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    accumulation = torchlamb.GradientAccumulation(optimizer, micro_batches=2)
    noise = torchlamb.NoiseScale(model, optimizer, batch_size=8, micro_batches=2)
    for kwargs, message in [(dict(max_batch=3000), "max_batch 3000 must be the starting batch 16 times a power"),
                            (dict(max_batch=8), "max_batch 8 is below the current batch 16"),
                            (dict(max_batch=64, growth=1.5), "growth must be a whole factor"),
                            (dict(max_batch=64, lr_rule="cubic"), "lr_rule must be one of"),
                            (dict(max_batch=64, factor=0.0), "factor"),
                            (dict(max_batch=64, interval=0), "interval"),
                            (dict(max_batch=64, micro_batch_size=4), "micro_batch_size 4 differs")]:
        with pytest.raises((ValueError, TypeError), match=message):
            torchlamb.BatchRamp(accumulation, noise, **kwargs)
    other = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="noise is attached to another optimizer"):
        torchlamb.BatchRamp(torchlamb.GradientAccumulation(other, 2), noise, max_batch=64)
    with pytest.raises(ValueError, match="noise measures 2 micro-batches per step, the accumulation takes 4"):
        torchlamb.BatchRamp(torchlamb.GradientAccumulation(optimizer, 4), noise, max_batch=64)
    with pytest.raises(ValueError, match="noise is required unless a schedule"):
        torchlamb.BatchRamp(accumulation, max_batch=64, micro_batch_size=8)
    with pytest.raises(ValueError, match=r"schedule\[1\]: batch 48"):
        torchlamb.BatchRamp(accumulation, max_batch=64, micro_batch_size=8, schedule=[(10, 32), (20, 48)])
    with pytest.raises(ValueError, match=r"schedule\[1\].*must increase"):
        torchlamb.BatchRamp(accumulation, max_batch=64, micro_batch_size=8, schedule=[(10, 32), (10, 64)])
    ramp = torchlamb.BatchRamp(accumulation, noise, max_batch=64)
    with pytest.raises(ValueError, match="already has a BatchRamp"):
        torchlamb.BatchRamp(accumulation, noise, max_batch=64)
    state = ramp.state_dict() | {"max_batch": 128}
    with pytest.raises(ValueError, match="its max_batch is 128"):
        ramp.load_state_dict(state)
    # A checkpoint taken after a growth, loaded into a fresh accumulation before the ramp: the message says why.
    with pytest.raises(ValueError, match="load the ramp's state_dict first"):
        torchlamb.GradientAccumulation(optimizer, 2).load_state_dict({"count": 0, "steps": 9, "micro_batches": 4})
    with pytest.raises(ValueError, match="load the ramp's state_dict first"):
        noise.load_state_dict(noise.state_dict() | {"micro_batches": 4})
    accumulation.backward(model(torch.ones(8, 3)).sum())
    with pytest.raises(RuntimeError, match="between optimizer steps"):
        accumulation.set_micro_batches(4)
