"""GradScaler's protocol for optimizers that unscale themselves, and nonfinite="skip".

Every test runs the three paths. On the CPU a skipped step returns after reading its flag (free there); with
``switches.set_skip_flag_on_device`` the accelerator path runs instead (every change weighted by 0 or 1 on the device),
and a dispatch mode checks that it never reads a device value on the host.
"""

from __future__ import annotations

import pytest
import torch

from switches import set_skip_flag_on_device
from test_optimizer_api import _HostSyncDetector, make_model
from torchlamb import Lamb, Lars

OPTIMIZERS = pytest.mark.parametrize("optimizer_class", [Lamb, Lars])
PATHS = pytest.mark.parametrize("path", [{"foreach": False}, {"foreach": True}, {}],
                                ids=["single_tensor", "foreach", "default"])
# The accelerator path: the flag stays on the device.
DEVICE_PATH = pytest.mark.parametrize("read_flag_on_cpu", [True, False], ids=["cpu_return", "device_path"])


def options(optimizer_class):
    return dict(lr=0.01, weight_decay=0.01, max_grad_norm=0.5) if optimizer_class is Lamb else \
        dict(lr=0.5, weight_decay=0.01, trust_coefficient=0.02, max_grad_norm=0.5)


def snapshot(model, optimizer):
    params = [p.detach().clone() for p in model.parameters()]
    state = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()}
    return params, state


def assert_unchanged(model, optimizer, saved):
    params, state = saved
    for p, before in zip(model.parameters(), params):
        assert torch.equal(p.detach(), before)
        for key, value in state[id(p)].items():
            assert torch.equal(optimizer.state[p][key], value), key


def loss_of(model, seed=0):
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(seed))
    return model(x).square().mean()


@OPTIMIZERS
@PATHS
def test_scaled_steps_equal_unscaled_ones(optimizer_class, path):
    plain, scaled = make_model(), make_model()
    plain_opt = optimizer_class(plain.parameters(), **options(optimizer_class), **path)
    scaled_opt = optimizer_class(scaled.parameters(), **options(optimizer_class), **path)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for step in range(3):
        plain_opt.zero_grad()
        loss_of(plain, step).backward()
        plain_opt.step()
        scaled_opt.zero_grad()
        scaler.scale(loss_of(scaled, step)).backward()
        scaler.step(scaled_opt)  # hands grad_scale and found_inf to Lamb.step
        scaler.update()
    for a, b in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert scaled_opt.grad_norm is not None
    torch.testing.assert_close(scaled_opt.grad_norm, plain_opt.grad_norm, rtol=1e-6, atol=0)


@OPTIMIZERS
@PATHS
@DEVICE_PATH
def test_overflow_leaves_everything_as_it_was(optimizer_class, path, read_flag_on_cpu, monkeypatch):
    set_skip_flag_on_device(monkeypatch, not read_flag_on_cpu)
    model = make_model()
    optimizer = optimizer_class(model.parameters(), **options(optimizer_class), **path)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(loss_of(model)).backward()
    scaler.step(optimizer)
    scaler.update()

    saved = snapshot(model, optimizer)
    optimizer.zero_grad()
    scaler.scale(loss_of(model, 1)).backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    with _HostSyncDetector() as detector:
        scaler.step(optimizer)
    assert_unchanged(model, optimizer, saved)
    if not read_flag_on_cpu:
        assert not [op for op in detector.syncs], detector.syncs
    scaler.update()
    assert scaler.get_scale() == 2.0**9  # the scaler saw the overflow

    # The next good step proceeds from the saved state.
    optimizer.zero_grad()
    scaler.scale(loss_of(model, 2)).backward()
    scaler.step(optimizer)
    assert all(optimizer.state[p]["step"].item() == 2 for p in model.parameters())


@OPTIMIZERS
@PATHS
def test_unscale_first_then_step(optimizer_class, path):
    # The usual recipe for clipping by hand: scaler.unscale_(optimizer), clip, scaler.step(optimizer).
    plain, scaled = make_model(), make_model()
    plain_opt = optimizer_class(plain.parameters(), lr=0.01, **path)
    scaled_opt = optimizer_class(scaled.parameters(), lr=0.01, **path)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for step in range(2):
        plain_opt.zero_grad()
        loss_of(plain, step).backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.1)
        plain_opt.step()
        scaled_opt.zero_grad()
        scaler.scale(loss_of(scaled, step)).backward()
        scaler.unscale_(scaled_opt)
        torch.nn.utils.clip_grad_norm_(scaled.parameters(), 0.1)
        scaler.step(scaled_opt)
        scaler.update()
    for a, b in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@OPTIMIZERS
@PATHS
@DEVICE_PATH
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_skip_makes_the_step_a_no_op(optimizer_class, path, read_flag_on_cpu, bad, monkeypatch):
    set_skip_flag_on_device(monkeypatch, not read_flag_on_cpu)
    model = make_model()
    optimizer = optimizer_class(model.parameters(), **options(optimizer_class), nonfinite="skip", **path)
    loss_of(model).backward()
    optimizer.step()
    saved = snapshot(model, optimizer)
    optimizer.zero_grad()
    loss_of(model, 1).backward()
    list(model.parameters())[-1].grad[0] = bad
    with _HostSyncDetector() as detector:
        optimizer.step()
    assert_unchanged(model, optimizer, saved)
    if not read_flag_on_cpu:
        assert detector.syncs == []


def default_and_skipping(optimizer_class, **path):
    """Two identical models, trained 3 finite steps with nonfinite="propagate" and with "skip"."""
    models = make_model(), make_model()
    optimizers = [optimizer_class(model.parameters(), **options(optimizer_class), nonfinite=nonfinite, **path)
                  for model, nonfinite in zip(models, ("propagate", "skip"))]
    for step in range(3):
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad()
            loss_of(model, step).backward()
            optimizer.step()
    return [list(model.parameters()) for model in models]


@OPTIMIZERS
@PATHS
def test_nonfinite_skip_changes_nothing_on_finite_steps(optimizer_class, path):
    for a, b in zip(*default_and_skipping(optimizer_class, **path)):
        assert torch.equal(a, b)


@OPTIMIZERS
def test_the_device_path_of_a_finite_step_matches_the_plain_one(optimizer_class, monkeypatch):
    # keep = 1 on the device: the weighted formulas give the plain update.
    set_skip_flag_on_device(monkeypatch)
    for a, b in zip(*default_and_skipping(optimizer_class, foreach=True)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@OPTIMIZERS
@PATHS
def test_nonfinite_skip_with_an_empty_tensor(optimizer_class, path):
    # An empty gradient (an empty parameter, or an FSDP2 shard with no rows on this process) holds nothing to check.
    empty, weight = torch.zeros(0, 3, requires_grad=True), torch.ones(3, requires_grad=True)
    optimizer = optimizer_class([empty, weight], lr=0.01, nonfinite="skip", **path)
    empty.grad, weight.grad = torch.zeros(0, 3), torch.full((3,), 0.5)
    optimizer.step()
    assert not torch.equal(weight, torch.ones(3))
    weight.grad[0] = float("inf")
    before = weight.detach().clone()
    optimizer.step()
    assert torch.equal(weight, before)


@OPTIMIZERS
def test_nonfinite_propagates_by_default(optimizer_class):
    model = make_model()
    optimizer = optimizer_class(model.parameters(), lr=0.01)
    loss_of(model).backward()
    list(model.parameters())[-1].grad[0] = float("nan")
    optimizer.step()
    assert not list(model.parameters())[-1].isfinite().all()  # as torch.optim.AdamW would


def test_bad_nonfinite_option_is_named():
    with pytest.raises(ValueError, match="nonfinite"):
        Lamb(make_model().parameters(), nonfinite="ignore")


@pytest.mark.parametrize(("optimizer_class", "extra"),
                         [(Lamb, {"bias_correction": mode}) for mode in (True, False, "step_size",
                                                                         "step_size_first_moment")] + [(Lars, {})])
@PATHS
@DEVICE_PATH
def test_a_skipped_first_step_changes_nothing(optimizer_class, extra, path, read_flag_on_cpu, monkeypatch):
    # The step count is still 0 then: bias corrections 1 − β^0 = 0 must not turn into 0/0 = NaN.
    set_skip_flag_on_device(monkeypatch, not read_flag_on_cpu)
    model = make_model()
    optimizer = optimizer_class(model.parameters(), **options(optimizer_class), nonfinite="skip", **extra, **path)
    before = [p.detach().clone() for p in model.parameters()]
    loss_of(model).backward()
    list(model.parameters())[-1].grad[0] = float("inf")
    optimizer.step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)
    assert all(optimizer.state[p]["step"].item() == 0 for p in model.parameters() if optimizer.state[p])
    # And the first real step afterwards is the one a fresh optimizer takes.
    fresh_model = make_model()
    fresh = optimizer_class(fresh_model.parameters(), **options(optimizer_class), **extra, **path)
    for m, o in ((model, optimizer), (fresh_model, fresh)):
        o.zero_grad()
        loss_of(m, 1).backward()
        o.step()
    for a, b in zip(model.parameters(), fresh_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gradients_are_unscaled_in_float32(dtype):
    # 0.1·2⁻²⁰ is not a float16 number; multiplying in float16 would be 25% off.
    from torchlamb._gradients import effective_grad, effective_grads

    grad = torch.full((4,), 3.0, dtype=dtype)
    factor = torch.tensor(0.1 * 2.0**-20)
    expected = (grad.float() * factor).to(dtype)
    assert torch.equal(effective_grad(grad, False, factor), expected)
    assert torch.equal(effective_grads([grad, grad.float()], False, factor)[0], expected)
