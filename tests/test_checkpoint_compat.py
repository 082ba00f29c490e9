"""Checkpoints survive upgrades: saved ones load and resume, missing options are filled in, pre-hooks run first.

tests/fixtures/checkpoints-*.pt were written by earlier versions (tests/fixtures/make_checkpoints.py says how).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import torchlamb
from torchlamb import Lamb, Lars, _checkpoints

FIXTURES = sorted((Path(__file__).parent / "fixtures").glob("checkpoints-*.pt"))
CASES = {f"{path.stem}-{name}": {**case, "steps_before": saved["steps_before"]}
         for path in FIXTURES for saved in [torch.load(path)] for name, case in saved["cases"].items()}


@pytest.fixture(params=sorted(CASES))
def case(request):
    # A copy for each test: as in torch, loaded state shares memory with the checkpoint, and training changes it.
    return copy.deepcopy(CASES[request.param])


def first_case(condition):
    return copy.deepcopy(next(case for case in CASES.values() if condition(case)))


def assert_close(actual, expected, precision=torch.float32):
    """Equal but for rounding: later versions may sum a norm in another order. bfloat16 tensors may then differ
    by one unit in their last place (a float32 master rounded to the other side); a changed format by far more.

    ``precision``: bfloat16 where the run computes or stores anything in bfloat16, against what another version
    (or machine) computed. A bfloat16 model's gradients depend on how its matrix products split their sums (the
    number of threads, the CPU's instructions) by one bfloat16 unit; moments stored in bfloat16 round differently
    where a version computes u from the stored moments instead of the float32 ones (the fused kernels since 0.1.0).
    The float32 tensors made of those are then compared at bfloat16's precision: a lost or misread state tensor
    still differs by far more."""
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for key in expected:
            assert_close(actual[key], expected[key], precision)
    elif expected.dtype in (torch.bfloat16, torch.float16) or precision != torch.float32:
        torch.testing.assert_close(actual, expected, **({} if expected.dtype == precision else
                                                        dict(rtol=1.6e-2, atol=1e-5)))
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def precision(case):
    """The lowest precision a case computes or stores in (see assert_close)."""
    stored = [options.get("state_dtype") for options in case["group_options"]] + [case["kwargs"].get("state_dtype")]
    return torch.bfloat16 if torch.bfloat16 in (case["dtype"], *stored) else torch.float32


def make_model(dtype):
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)).to(dtype)


def make_optimizer(model, case):
    groups = torchlamb.param_groups(model)
    groups = [{**group, **options} for group, options in zip(groups, case["group_options"])]
    return getattr(torchlamb, case["optimizer_class"])(groups, **case["kwargs"])


def train(model, optimizer, batches):
    dtype = next(model.parameters()).dtype
    for x in batches:
        optimizer.zero_grad()
        model(x.to(dtype)).float().square().mean().backward()
        optimizer.step()


def resume(case, state_dict=None):
    """The model and optimizer loaded from the case's checkpoint (or from ``state_dict``), before resuming."""
    model = make_model(case["dtype"])
    model.load_state_dict(case["model"])
    optimizer = make_optimizer(model, case)
    optimizer.load_state_dict(case["optimizer"] if state_dict is None else state_dict)
    return model, optimizer


def assert_close_state_dicts(actual, expected, precision=torch.float32, defaults=None):
    """Groups and state alike. ``defaults``: the optimizer's; options added after ``expected`` was written may be in
    ``actual`` only, and hold their defaults there (a checkpoint that lacks them loads with those; Lamb's ``max_lr``,
    a group's snapshot of the constructor's lr, has no default and is only checked to be there)."""
    for actual_group, expected_group in zip(actual["param_groups"], expected["param_groups"], strict=True):
        added = set(actual_group) - set(expected_group)
        assert all(defaults is not None and (key in defaults or key == "max_lr") for key in added), added
        assert {k: v for k, v in actual_group.items() if k != "params" and k not in added} == \
            {k: v for k, v in expected_group.items() if k != "params"}
        assert {k: actual_group[k] for k in added - {"max_lr"}} == {k: defaults[k] for k in added - {"max_lr"}}
    assert_close(actual["state"], expected["state"], precision)


def test_there_is_a_checkpoint_of_this_version():
    assert Path(__file__).parent / "fixtures" / f"checkpoints-{torchlamb.__version__}.pt" in FIXTURES


def test_a_saved_checkpoint_loads_and_resumes_as_if_it_never_stopped(case):
    model, optimizer = resume(case)
    train(model, optimizer, case["batches"][case["steps_before"]:])
    # What the version that wrote the checkpoint computed after resuming.
    assert_close(model.state_dict(), case["expected_model"], precision(case))
    assert_close_state_dicts(optimizer.state_dict(), case["expected_optimizer"], precision(case), optimizer.defaults)
    # What this version computes without stopping (the steps before the checkpoint, too, computed here).
    uninterrupted = make_model(case["dtype"])
    uninterrupted.load_state_dict(case["initial_model"])
    never_stopped = make_optimizer(uninterrupted, case)
    train(uninterrupted, never_stopped, case["batches"])
    assert_close(model.state_dict(), uninterrupted.state_dict(), precision(case))
    assert_close_state_dicts(optimizer.state_dict(), never_stopped.state_dict(), precision(case))


def test_options_a_checkpoint_lacks_take_the_optimizers_values(case):
    """A checkpoint written before an option existed lacks it in every group; it loads with today's default."""
    checkpoint = copy.deepcopy(case["optimizer"])
    lacking = ("trust_eps", "maximize", "weight_norm_clip")  # options of both Lamb and Lars
    for group in checkpoint["param_groups"]:
        for option in lacking:
            del group[option]
    model, optimizer = resume(case, checkpoint)
    for group in optimizer.param_groups:
        assert (group["trust_eps"], group["maximize"], group["weight_norm_clip"]) == (0.0, False, None)
        assert group["lr"] == case["optimizer"]["param_groups"][optimizer.param_groups.index(group)]["lr"]
    assert all(option not in group for group in checkpoint["param_groups"] for option in lacking)  # not filled in
    train(model, optimizer, case["batches"][case["steps_before"]:])
    assert_close(model.state_dict(), case["expected_model"], precision(case))


def test_a_missing_option_takes_the_value_its_group_has_in_the_optimizer():
    model = make_model(torch.float32)
    optimizer = Lamb([{"params": [model[0].weight], "trust_clip": (0.0, 2.0)}, {"params": [model[0].bias]}],
                     trust_clip=(0.0, 10.0))
    checkpoint = optimizer.state_dict()
    for group in checkpoint["param_groups"]:
        del group["trust_clip"]
    optimizer.load_state_dict(checkpoint)
    assert [g["trust_clip"] for g in optimizer.param_groups] == [(0.0, 2.0), (0.0, 10.0)]


def test_a_pre_hook_can_repair_a_checkpoint_before_it_is_checked():
    """A checkpoint of a library that named Adam's moments m and v is refused; a pre-hook that renames them is
    run before the check, so it loads (and resumes as the original would)."""
    case = first_case(lambda case: case["optimizer_class"] == "Lamb")
    foreign = copy.deepcopy(case["optimizer"])
    for state in foreign["state"].values():
        state["m"], state["v"] = state.pop("exp_avg"), state.pop("exp_avg_sq")
    with pytest.raises(ValueError, match=r"keys \['m', 'step', 'v'\]"):
        resume(case, foreign)

    def rename_moments(optimizer, state_dict):
        renamed = {key: {"step": s["step"], "exp_avg": s["m"], "exp_avg_sq": s["v"]}
                   for key, s in state_dict["state"].items()}
        return {**state_dict, "state": renamed}

    model = make_model(case["dtype"])
    model.load_state_dict(case["model"])
    optimizer = make_optimizer(model, case)
    optimizer.register_load_state_dict_pre_hook(rename_moments)
    optimizer.load_state_dict(foreign)
    assert "m" in foreign["state"][0]  # the caller's checkpoint is as it was
    train(model, optimizer, case["batches"][case["steps_before"]:])
    assert_close(model.state_dict(), case["expected_model"], precision(case))


def test_hooks_run_once_and_post_hooks_see_the_loaded_state():
    case = first_case(lambda case: case["kwargs"].get("master_weights"))
    model = make_model(case["dtype"])
    optimizer = make_optimizer(model, case)
    calls = []
    optimizer.register_load_state_dict_pre_hook(lambda opt, sd: calls.append("pre"))
    optimizer.register_load_state_dict_post_hook(
        lambda opt: calls.append(("post", {s["master"].dtype for s in opt.state.values()})))
    optimizer.load_state_dict(case["optimizer"])
    assert calls == ["pre", ("post", {torch.float32})]  # float32 masters, not torch's cast to bfloat16


def test_a_failure_while_loading_leaves_the_optimizer_unchanged(monkeypatch):
    case = first_case(lambda case: case["optimizer_class"] == "Lamb")
    model = make_model(case["dtype"])
    optimizer = make_optimizer(model, case)
    train(model, optimizer, case["batches"][:1])
    state, groups = optimizer.state, optimizer.param_groups
    before = copy.deepcopy(optimizer.state_dict())

    def fail(*args):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(_checkpoints, "take_saved_state", fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        optimizer.load_state_dict(case["optimizer"])
    assert optimizer.state is state and optimizer.param_groups is groups
    assert_close_state_dicts(optimizer.state_dict(), before)
    monkeypatch.undo()
    train(model, optimizer, case["batches"][1:2])  # and it still steps


@pytest.mark.parametrize("optimizer_class", [Lamb, Lars])
@pytest.mark.parametrize("foreach", [False, True, None], ids=["single_tensor", "foreach", "default"])
def test_step_is_float32_whatever_the_default_dtype(optimizer_class, foreach):
    """torch's optimizers keep 'step' in float64 under a float64 default dtype; torchlamb keeps float32 (see the
    LayerwiseOptimizer docstring), also for a checkpoint that saved it otherwise."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = nn.Linear(3, 2)
        assert model.weight.dtype == torch.float64
        optimizer = optimizer_class(model.parameters(), foreach=foreach)
        for _ in range(2):
            optimizer.zero_grad()
            model(torch.randn(4, 3)).square().sum().backward()
            optimizer.step()
        assert {(s["step"].dtype, s["step"].item()) for s in optimizer.state.values()} == {(torch.float32, 2.0)}
        checkpoint = optimizer.state_dict()
        for state in checkpoint["state"].values():
            state["step"] = state["step"].double()  # as torch.optim.Adam would have saved it
        optimizer.load_state_dict(checkpoint)
        assert {s["step"].dtype for s in optimizer.state.values()} == {torch.float32}
    finally:
        torch.set_default_dtype(previous)
