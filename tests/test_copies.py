"""copy.deepcopy and pickle give an optimizer that steps as the original would, on state of its own."""

from __future__ import annotations

import copy
import datetime
import pickle

import pytest
import torch
import torch.distributed as dist

from torchlamb import Lamb, Lars, param_groups

OPTIMIZERS = pytest.mark.parametrize("optimizer_class", [Lamb, Lars])
PATHS = pytest.mark.parametrize("implementation", [dict(foreach=False), dict(foreach=True), dict(fused=True)],
                                ids=["single_tensor", "foreach", "fused"])
COPIES = {"deepcopy": copy.deepcopy, "pickle": lambda optimizer: pickle.loads(pickle.dumps(optimizer))}


def make_optimizer(optimizer_class, **options):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    return optimizer_class(param_groups(model), lr=0.05, max_grad_norm=1.0, **options)


def params_of(optimizer):
    return [p for group in optimizer.param_groups for p in group["params"]]


def step_with(optimizer, grads):
    for param, grad in zip(params_of(optimizer), grads):
        param.grad = grad.clone()
    optimizer.step()


def random_grads(optimizer, generator):
    return [torch.randn(p.shape, generator=generator) for p in params_of(optimizer)]


def assert_same(a, b):
    assert all(torch.equal(p, q) for p, q in zip(params_of(a), params_of(b)))
    for p, q in zip(params_of(a), params_of(b)):
        assert a.state[p].keys() == b.state[q].keys()
        assert all(torch.equal(a.state[p][key], b.state[q][key]) for key in a.state[p])


@OPTIMIZERS
@PATHS
@pytest.mark.parametrize("how", sorted(COPIES))
def test_a_copy_steps_as_the_original_on_its_own_state(optimizer_class, implementation, how):
    optimizer = make_optimizer(optimizer_class, nonfinite="skip", **implementation)
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):
        step_with(optimizer, random_grads(optimizer, generator))
    copied = COPIES[how](optimizer)
    assert type(copied) is optimizer_class and copied.nonfinite == "skip" and copied.partition_group is None
    assert_same(optimizer, copied)
    # Its own parameters and state: stepping the copy leaves the original as it was.
    original_tensors = {t.data_ptr() for p in params_of(optimizer) for t in [p, *optimizer.state[p].values()]}
    assert not original_tensors & {t.data_ptr() for p in params_of(copied) for t in [p, *copied.state[p].values()]}
    before = copy.deepcopy(optimizer)
    step_with(copied, random_grads(copied, torch.Generator().manual_seed(2)))
    assert_same(optimizer, before)
    step_with(optimizer, random_grads(optimizer, torch.Generator().manual_seed(2)))
    assert_same(optimizer, copied)
    # The same steps after, a non-finite one included ('skip' is carried: the copy skips it too).
    for index in range(3):
        grads = random_grads(optimizer, generator)
        if index == 1:
            grads[0][0, 0] = float("nan")
        step_with(optimizer, grads)
        step_with(copied, grads)
        assert_same(optimizer, copied)
    assert {s["step"].item() for s in copied.state.values()} == {5.0}  # 2 + 1 + 3, one skipped


def a_process_group():
    """A real process group of one process, outside torch.distributed's global state."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    return dist.ProcessGroupGloo(dist.HashStore(), 0, 1, datetime.timedelta(seconds=30))


@OPTIMIZERS
def test_a_deep_copy_shares_the_partition_group_and_pickle_refuses_it(optimizer_class):
    group = a_process_group()
    with pytest.raises(TypeError):
        pickle.dumps(group)  # why: nothing that holds one can be pickled or deep-copied by default
    optimizer = make_optimizer(optimizer_class, partition_group=group)
    for group_options in optimizer.param_groups:
        group_options["max_grad_norm"] = None  # the step then needs no collective
    copied = copy.deepcopy(optimizer)
    assert copied.partition_group is group
    step_with(copied, random_grads(copied, torch.Generator().manual_seed(0)))
    with pytest.raises(TypeError, match=f"a {optimizer_class.__name__} with a partition_group cannot be pickled"):
        pickle.dumps(optimizer)
    optimizer.partition_group = None
    restored = pickle.loads(pickle.dumps(optimizer))
    assert restored.partition_group is None


@OPTIMIZERS
def test_an_old_pickle_without_the_step_options_gets_their_defaults(optimizer_class):
    optimizer = make_optimizer(optimizer_class)
    step_with(optimizer, random_grads(optimizer, torch.Generator().manual_seed(0)))
    old_state = torch.optim.Optimizer.__getstate__(optimizer)  # what earlier versions pickled
    restored = optimizer_class.__new__(optimizer_class)
    restored.__setstate__(pickle.loads(pickle.dumps(old_state)))
    assert (restored.nonfinite, restored.partition_group, restored.trust_stats, restored.grad_norm) == \
        ("propagate", None, [], None)
    step_with(restored, random_grads(restored, torch.Generator().manual_seed(1)))
    assert restored.trust_stats
