"""load_state_dict against corrupted and mismatched checkpoints (hypothesis): always a clear error, never a change."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from torchlamb import Lamb, Lars, param_groups


def make(optimizer_class, master_weights=False):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))
    if master_weights:
        model = model.bfloat16()
    optimizer = optimizer_class(param_groups(model), lr=0.01, master_weights=master_weights)
    model(torch.randn(5, 4, dtype=next(model.parameters()).dtype)).float().sum().backward()
    optimizer.step()
    return model, optimizer


def snapshot(optimizer):
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    groups = [{k: (list(v) if k == "params" else copy.deepcopy(v)) for k, v in g.items()}
              for g in optimizer.param_groups]
    return state, groups


def assert_unchanged(optimizer, saved):
    state, groups = saved
    assert {id(p) for p in optimizer.state} == set(state)
    for p, s in optimizer.state.items():
        assert s.keys() == state[id(p)].keys()
        for key, value in s.items():
            assert torch.equal(value, state[id(p)][key])
    for group, before in zip(optimizer.param_groups, groups):
        assert group == before


# Each corruption takes (state_dict, data) and damages the state_dict in place, or returns [a replacement].
def drop_state_key(sd, data):
    state = sd["state"][data.draw(st.sampled_from(sorted(sd["state"])))]
    del state[data.draw(st.sampled_from(sorted(state)))]


def add_state_key(sd, data):
    sd["state"][data.draw(st.sampled_from(sorted(sd["state"])))]["extra"] = torch.zeros(1)


def reshape_tensor(sd, data):
    state = sd["state"][data.draw(st.sampled_from(sorted(sd["state"])))]
    key = data.draw(st.sampled_from(sorted(k for k in state if k != "step")))
    state[key] = torch.zeros(state[key].numel() + data.draw(st.integers(1, 3)))


def retype_tensor(sd, data):
    state = sd["state"][data.draw(st.sampled_from(sorted(sd["state"])))]
    key = data.draw(st.sampled_from(sorted(k for k in state if k != "step")))
    dtype = data.draw(st.sampled_from([torch.float16, torch.float64, torch.int64]))
    if state[key].dtype == dtype:
        dtype = torch.int32
    state[key] = state[key].to(dtype)


def replace_with_non_tensor(sd, data):
    state = sd["state"][data.draw(st.sampled_from(sorted(sd["state"])))]
    key = data.draw(st.sampled_from(sorted(state)))
    state[key] = data.draw(st.sampled_from(["text", None, [1.0, 2.0], {"a": 1}]))


def unknown_parameter(sd, data):
    sd["state"][data.draw(st.integers(100, 10_000))] = copy.deepcopy(next(iter(sd["state"].values())))


def drop_group(sd, data):
    del sd["param_groups"][data.draw(st.integers(0, len(sd["param_groups"]) - 1))]


def shorten_group(sd, data):
    group = sd["param_groups"][data.draw(st.integers(0, len(sd["param_groups"]) - 1))]
    group["params"] = group["params"][:-1]


def bad_option(sd, data):
    group = sd["param_groups"][data.draw(st.integers(0, len(sd["param_groups"]) - 1))]
    key, value = data.draw(st.sampled_from([("lr", -1.0), ("lr", float("nan")), ("weight_decay", -0.5),
                                            ("trust_clip", (3.0, 1.0)), ("adapt", "sometimes"),
                                            ("max_grad_norm", 0.0), ("foreach", "yes"), ("master_weights", 1)]))
    group[key] = value


def not_a_state_dict(sd, data):
    return [data.draw(st.sampled_from([None, [], {"state": {}}, {"param_groups": []}, "checkpoint"]))]


CORRUPTIONS = [drop_state_key, add_state_key, reshape_tensor, retype_tensor, replace_with_non_tensor,
               unknown_parameter, drop_group, shorten_group, bad_option, not_a_state_dict]


@pytest.mark.parametrize("optimizer_class", [Lamb, Lars])
@pytest.mark.parametrize("master_weights", [False, True])
@given(data=st.data())
def test_a_corrupted_checkpoint_raises_and_changes_nothing(optimizer_class, master_weights, data):
    _, optimizer = make(optimizer_class, master_weights)
    state_dict = copy.deepcopy(optimizer.state_dict())
    corrupt = data.draw(st.sampled_from(CORRUPTIONS))
    replaced = corrupt(state_dict, data)
    if replaced is not None:
        state_dict = replaced[0]
    saved = snapshot(optimizer)
    with pytest.raises((ValueError, TypeError)) as error:
        optimizer.load_state_dict(state_dict)
    assert str(error.value)  # says what is wrong
    assert_unchanged(optimizer, saved)


@pytest.mark.parametrize("optimizer_class", [Lamb, Lars])
def test_a_checkpoint_of_another_model_is_refused_by_name(optimizer_class):
    _, optimizer = make(optimizer_class)
    torch.manual_seed(0)
    other_model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 2))
    other = optimizer_class(param_groups(other_model), lr=0.01)
    other_model(torch.randn(5, 4)).sum().backward()
    other.step()
    saved = snapshot(optimizer)
    with pytest.raises(ValueError, match=r"parameter '0\.weight'.*shape"):
        optimizer.load_state_dict(other.state_dict())
    assert_unchanged(optimizer, saved)


@pytest.mark.parametrize("optimizer_class", [Lamb, Lars])
@pytest.mark.parametrize("master_weights", [False, True])
@given(data=st.data())
def test_a_checkpoint_lacking_options_loads_them_from_the_optimizer(optimizer_class, master_weights, data):
    """An option added after a checkpoint was written is missing from its groups: the optimizer's value fills it
    (as torch's optimizers fill theirs), the rest loads as saved, and the caller's dict is not changed."""
    _, optimizer = make(optimizer_class, master_weights)
    state_dict = copy.deepcopy(optimizer.state_dict())
    index = data.draw(st.integers(0, len(state_dict["param_groups"]) - 1))
    options = sorted(k for k in state_dict["param_groups"][index] if k not in ("params", "param_names"))
    dropped = data.draw(st.lists(st.sampled_from(options), min_size=1, max_size=3, unique=True))
    for group in optimizer.param_groups:
        group["lr"] = 0.5  # so that the loaded groups differ from the live ones in a kept option
    expected = {key: optimizer.param_groups[index][key] for key in dropped}
    for key in dropped:
        del state_dict["param_groups"][index][key]
    passed = copy.deepcopy(state_dict["param_groups"])
    optimizer.load_state_dict(state_dict)
    assert state_dict["param_groups"] == passed
    for key in dropped:
        assert optimizer.param_groups[index][key] == expected[key]
    assert [g["lr"] for g in optimizer.param_groups] == [0.5 if "lr" in dropped and i == index else 0.01
                                                         for i, g in enumerate(optimizer.param_groups)]
