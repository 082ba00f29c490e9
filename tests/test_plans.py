"""The fused step's plans (torchlamb._plans): reused only while they hold, never a different number.

Each test steps two optimizers on the same problem: one as users get it (its plan made on the first fused step and
reused after), one whose plans are dropped before every step (every step gathers its lists afresh). Whatever is
done to the parameters, their gradients, the state or the options between steps, done to both alike, the two must
stay bitwise equal — a plan that outlived a change would update tensors the optimizer no longer holds.
"""

from __future__ import annotations

import copy

import pytest
import torch

from torchlamb import Lamb, Lars
from torchlamb.kernels import cpu as cpu_kernels

pytestmark = pytest.mark.skipif(cpu_kernels.load() is None, reason="the fused kernel could not be built here")

SHAPES = [(64, 80), (80,), (4096 + 256, 3), (17,)]  # 2-D ones of 4096 values and more keep 8-bit state


def make(optimizer_class, dtype=torch.float32, **options):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, dtype=dtype)) for shape in SHAPES]
    optimizer = optimizer_class([{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}],
                                lr=0.01, fused=True, **options)
    return params, optimizer


def set_grads(params, step):
    generator = torch.Generator().manual_seed(100 + step)
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator, dtype=param.dtype)


class Pair:
    """Two copies of one optimizer and its parameters: ``planned`` keeps its plans, ``fresh`` drops them."""

    def __init__(self, optimizer_class, dtype=torch.float32, **options):
        self.planned = make(optimizer_class, dtype, **options)
        self.fresh = make(optimizer_class, dtype, **options)
        self.steps = 0

    def both(self, change):
        for params, optimizer in (self.planned, self.fresh):
            change(params, optimizer)

    def step(self):
        self.steps += 1
        for params, _ in (self.planned, self.fresh):
            set_grads(params, self.steps)
        self.fresh[1]._plans.clear()
        self.planned[1].step()
        self.fresh[1].step()
        self.check()

    def check(self):
        (params_a, opt_a), (params_b, opt_b) = self.planned, self.fresh
        for a, b in zip(params_a, params_b):
            assert a.dtype == b.dtype and torch.equal(a, b)
        for a, b in zip(params_a, params_b):
            state_a, state_b = opt_a.state[a], opt_b.state[b]
            assert state_a.keys() == state_b.keys()
            for key in state_a:
                assert torch.equal(state_a[key], state_b[key]), key


@pytest.mark.parametrize("state_dtype", [None, "8bit", torch.bfloat16], ids=["float", "8bit", "bf16"])
@pytest.mark.parametrize("optimizer_class", [Lamb, Lars])
def test_a_plan_is_made_reused_and_gives_the_same_numbers(optimizer_class, state_dtype):
    pair = Pair(optimizer_class, state_dtype=state_dtype)
    pair.step()
    plans = dict(pair.planned[1]._plans)
    assert sorted(plans) == [0, 1]
    for lr in (0.02, 0.03, 0.04):
        pair.both(lambda params, optimizer, lr=lr: optimizer.param_groups[0].update(lr=lr))
        pair.step()
    assert all(pair.planned[1]._plans[index] is plans[index] for index in plans)  # reused, not made again


def replace_state(params, optimizer):
    optimizer.state[params[0]]["exp_avg" if isinstance(optimizer, Lamb) else "momentum_buffer"] = torch.ones_like(
        params[0])


def clear_one(params, optimizer):
    optimizer.state[params[2]].clear()


def clear_all(params, optimizer):
    optimizer.state.clear()


def drop_gradient(params, optimizer):
    params[1].grad = None


def load_own_state(params, optimizer):
    saved = copy.deepcopy(optimizer.state_dict())
    for state in saved["state"].values():
        for value in state.values():
            value.mul_(0.5)
    optimizer.load_state_dict(saved)


def to_float64(params, optimizer):
    # In place, so that the same tensors change dtype (a plan holds tensors, and decided their storage by dtype).
    params[3].data = params[3].data.double()
    for key, value in optimizer.state[params[3]].items():
        if key != "step":
            value.data = value.data.double()


def non_contiguous(params, optimizer):
    params[0].data = params[0].data.t().contiguous().t()


def switch_to_foreach(params, optimizer):
    optimizer.param_groups[1].update(fused=None, foreach=True)


def add_group(params, optimizer):
    extra = torch.nn.Parameter(torch.ones(5, 7))
    params.append(extra)
    optimizer.add_param_group({"params": [extra]})


CHANGES = [replace_state, clear_one, clear_all, load_own_state, to_float64, non_contiguous, switch_to_foreach,
           add_group]


@pytest.mark.filterwarnings("ignore:.*runs on dense contiguous CPU tensors only")
@pytest.mark.parametrize("change", CHANGES, ids=lambda change: change.__name__)
@pytest.mark.parametrize("optimizer_class", [Lamb, Lars])
def test_a_plan_never_outlives_what_it_describes(optimizer_class, change):
    pair = Pair(optimizer_class)
    pair.step()
    pair.step()
    pair.both(change)
    pair.step()
    pair.step()


@pytest.mark.parametrize("optimizer_class", [Lamb, Lars])
def test_a_parameter_without_a_gradient_is_left_alone(optimizer_class):
    pair = Pair(optimizer_class)
    pair.step()
    pair.steps += 1
    for params, optimizer in (pair.planned, pair.fresh):
        set_grads(params, pair.steps)
        drop_gradient(params, optimizer)
    before = pair.planned[0][1].detach().clone()
    pair.fresh[1]._plans.clear()
    pair.planned[1].step()
    pair.fresh[1].step()
    pair.check()
    assert torch.equal(pair.planned[0][1], before)


def test_no_plan_for_master_weights_or_complex_parameters():
    params = [torch.nn.Parameter(torch.randn(8, 8, dtype=torch.bfloat16))]
    optimizer = Lamb(params, fused=True, master_weights=True)
    set_grads(params, 0)
    optimizer.step()
    optimizer.step()
    assert optimizer._plans == {}
    complex_params = [torch.nn.Parameter(torch.randn(8, 8, dtype=torch.complex64))]
    optimizer = Lamb(complex_params, fused=True)
    set_grads(complex_params, 0)
    optimizer.step()
    assert optimizer._plans == {}


def test_the_plan_of_a_removed_group_is_dropped():
    params, optimizer = make(Lamb)
    set_grads(params, 1)
    optimizer.step()
    assert sorted(optimizer._plans) == [0, 1]
    optimizer.param_groups.pop()
    optimizer.step()
    assert sorted(optimizer._plans) == [0]


def test_plans_are_not_pickled_or_copied():
    params, optimizer = make(Lamb)
    set_grads(params, 1)
    optimizer.step()
    assert optimizer._plans
    assert "_plans" not in optimizer.__getstate__()
    copied = copy.deepcopy(optimizer)
    assert copied._plans == {}
