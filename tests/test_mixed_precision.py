"""master_weights for bfloat16/float16 parameters, and bitwise resume from torch.save checkpoints on every path."""

from __future__ import annotations

import io

import pytest
import torch

import torchlamb
from torchlamb import Lamb, Lars

OPTIMIZERS = pytest.mark.parametrize("optimizer_class", [Lamb, Lars])
PATHS = pytest.mark.parametrize("path", [{"foreach": False}, {"foreach": True}, {}],
                                ids=["single_tensor", "foreach", "default"])


def options(optimizer_class):
    return dict(lr=1e-3, weight_decay=0.01) if optimizer_class is Lamb else \
        dict(lr=0.05, weight_decay=0.01, trust_coefficient=0.02)


def make_model(dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
    return model.to(dtype)


def data():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(64, 20, generator=generator), torch.randn(64, 10, generator=generator)


def train(model, optimizer, steps, scheduler=None):
    x, y = data()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x.to(next(model.parameters()).dtype)).float(), y)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


@OPTIMIZERS
@PATHS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_master_weights_hold_float32_state_and_write_the_parameters(optimizer_class, path, dtype):
    model = make_model(dtype)
    optimizer = optimizer_class(model.parameters(), **options(optimizer_class), master_weights=True, **path)
    train(model, optimizer, 3)
    for p in model.parameters():
        state = optimizer.state[p]
        assert p.dtype == dtype
        assert {k: v.dtype for k, v in state.items() if k != "step"} == \
            {k: torch.float32 for k in (*optimizer._state_keys, "master")}
        assert torch.equal(p.detach(), state["master"].to(dtype))  # θ is its master, rounded


@OPTIMIZERS
def test_master_weights_do_nothing_for_float32(optimizer_class):
    plain, mastered = make_model(), make_model()
    a = optimizer_class(plain.parameters(), **options(optimizer_class))
    b = optimizer_class(mastered.parameters(), **options(optimizer_class), master_weights=True)
    train(plain, a, 3)
    train(mastered, b, 3)
    assert all("master" not in b.state[p] for p in mastered.parameters())
    assert all(torch.equal(x, y) for x, y in zip(plain.parameters(), mastered.parameters()))


@OPTIMIZERS
def test_bfloat16_with_master_weights_tracks_float32(optimizer_class):
    # 200 steps. The numbers behind docs/mixed-precision.md: the loss of a bfloat16 model with master weights stays
    # within 2% of the float32 run's; without them the parameters drift several times further.
    reference = make_model()
    reference_losses = train(reference, optimizer_class(reference.parameters(), **options(optimizer_class)), 200)
    results = {}
    for master in (True, False):
        model = make_model(torch.bfloat16)
        optimizer = optimizer_class(model.parameters(), **options(optimizer_class), master_weights=master)
        losses = train(model, optimizer, 200)
        drift = max((p.float() - q).abs().max().item() for p, q in zip(model.parameters(), reference.parameters()))
        results[master] = (abs(losses[-1] - reference_losses[-1]) / reference_losses[-1], drift)
    assert results[True][0] < 0.02
    assert results[True][1] * 4 < results[False][1]


@OPTIMIZERS
@PATHS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_from_torch_save_is_bitwise_identical(optimizer_class, path, dtype):
    total, first = 6, 2

    def fresh():
        model = make_model(dtype)
        optimizer = optimizer_class(model.parameters(), **options(optimizer_class), max_grad_norm=1.0,
                                    master_weights=dtype != torch.float32, **path)
        return model, optimizer, torchlamb.warmup_poly(optimizer, warmup_steps=2, total_steps=total)

    straight = fresh()
    train(*straight[:2], total, straight[2])

    model, optimizer, scheduler = fresh()
    train(model, optimizer, first, scheduler)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    model, optimizer, scheduler = fresh()
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    train(model, optimizer, total - first, scheduler)

    for a, b in zip(straight[0].parameters(), model.parameters()):
        assert torch.equal(a, b)
    for p, q in zip(straight[0].parameters(), model.parameters()):
        for key, value in straight[1].state[p].items():
            assert torch.equal(value, optimizer.state[q][key]), key


@OPTIMIZERS
def test_checkpoint_must_match_the_master_weights_setting(optimizer_class):
    model = make_model(torch.bfloat16)
    without = optimizer_class(model.parameters(), **options(optimizer_class))
    train(model, without, 1)
    with_masters = optimizer_class(model.parameters(), **options(optimizer_class), master_weights=True)
    state = without.state_dict()
    for group in state["param_groups"]:
        group["master_weights"] = True  # claims masters it does not hold
    with pytest.raises(ValueError, match="keys"):
        with_masters.load_state_dict(state)
    assert not with_masters.state  # unchanged


@OPTIMIZERS
@PATHS
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_parameters_follow_the_reference_on_their_real_pairs(optimizer_class, path, dtype):
    # A complex tensor is one layer whose values are its real and imaginary parts: ‖θ‖ over both, moments per part.
    import numpy as np

    from reference import ReferenceLamb, ReferenceLars, RefGroup, RefLarsGroup

    torch.manual_seed(3)
    params = [torch.randn(5, 4, dtype=dtype, requires_grad=True), torch.randn(3, dtype=dtype, requires_grad=True)]
    grads = [[torch.randn_like(p) for p in params] for _ in range(3)]
    start = [torch.view_as_real(p.detach()).double().numpy().copy() for p in params]
    optimizer = optimizer_class(params, **options(optimizer_class), max_grad_norm=1.0, **path)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        optimizer.step()

    if optimizer_class is Lamb:
        reference = ReferenceLamb([RefGroup(params=start, **options(Lamb), max_grad_norm=1.0)])
    else:
        reference = ReferenceLars([RefLarsGroup(params=start, **options(Lars), max_grad_norm=1.0)])
    for step_grads in grads:
        reference.step([[torch.view_as_real(g).double().numpy() for g in step_grads]])
    tolerance = 1e-5 if dtype == torch.complex64 else 1e-10
    for p, expected in zip(params, reference.groups[0].params):
        assert p.dtype == dtype
        np.testing.assert_allclose(torch.view_as_real(p.detach()).double().numpy(), expected, rtol=tolerance,
                                   atol=tolerance)


@OPTIMIZERS
@PATHS
def test_state_dtype_stores_moments_in_bfloat16(optimizer_class, path):
    reference, model = make_model(), make_model()
    plain = optimizer_class(reference.parameters(), **options(optimizer_class), **path)
    optimizer = optimizer_class(model.parameters(), **options(optimizer_class), state_dtype=torch.bfloat16, **path)
    plain_losses = train(reference, plain, 50)
    losses = train(model, optimizer, 50)
    for p in model.parameters():
        assert p.dtype == torch.float32
        assert all(optimizer.state[p][k].dtype == torch.bfloat16 for k in optimizer._state_keys)
    # Rounded moments change the trajectory a little, not the outcome.
    assert abs(losses[-1] - plain_losses[-1]) < 0.02 * plain_losses[-1]
    assert any(not torch.equal(a, b) for a, b in zip(reference.parameters(), model.parameters()))


@OPTIMIZERS
def test_state_dtype_with_master_weights_round_trips(optimizer_class):
    model = make_model(torch.bfloat16)
    optimizer = optimizer_class(model.parameters(), **options(optimizer_class), master_weights=True,
                                state_dtype=torch.bfloat16)
    train(model, optimizer, 2)
    state = optimizer.state[next(model.parameters())]
    assert state["master"].dtype == torch.float32
    assert all(state[k].dtype == torch.bfloat16 for k in optimizer._state_keys)
    other = optimizer_class(model.parameters(), **options(optimizer_class), master_weights=True,
                            state_dtype=torch.bfloat16)
    other.load_state_dict(optimizer.state_dict())
    for p in model.parameters():
        for key, value in optimizer.state[p].items():
            assert torch.equal(other.state[p][key], value) and other.state[p][key].dtype == value.dtype


def test_state_dtype_must_be_a_floating_dtype():
    with pytest.raises(TypeError, match="state_dtype"):
        Lamb(make_model().parameters(), state_dtype=torch.int8)
    with pytest.raises(TypeError, match="state_dtype"):
        Lars(make_model().parameters(), state_dtype="bfloat16")
