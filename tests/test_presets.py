"""Presets reproduce other libraries' LAMB: against float64 re-derivations, and against the libraries themselves."""

from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
import pytest
import torch

import timm_optim
from reference_presets import RULES
from torchlamb import PRESETS, Lamb

LR = 0.01
DECAY = 0.01


def make_problem(seed: int, steps: int, zero_tensor: bool = True):
    """Two groups, one decayed and one not, with a zero-initialised tensor; gradients large enough that a global
    clip at 1.0 fires on most steps, and one step of tiny gradients on which it does not."""
    rng = np.random.default_rng(seed)
    decayed = [rng.standard_normal((6, 4)), 20 * rng.standard_normal((3, 3, 2))]  # the second has ‖θ‖ > 10
    exempt = [rng.standard_normal(4), np.zeros(5) if zero_tensor else rng.standard_normal(5)]
    groups = [(decayed, DECAY), (exempt, 0.0)]
    grads = []
    for step in range(steps):
        scale = 1e-3 if step == 1 else 1.0
        grads.append([[scale * rng.standard_normal(p.shape) for p in ps] for ps, _ in groups])
    return groups, grads


def torch_groups(groups):
    return [{"params": [torch.tensor(p, dtype=torch.float64, requires_grad=True) for p in ps], "weight_decay": wd}
            for ps, wd in groups]


def run(optimizer, tensor_groups, grads):
    for step_grads in grads:
        for group, gs in zip(tensor_groups, step_grads):
            for p, g in zip(group["params"], gs):
                p.grad = torch.tensor(g, dtype=torch.float64)
        optimizer.step()
    return [[p.detach().numpy() for p in group["params"]] for group in tensor_groups]


def assert_same_params(actual, expected, rtol):
    for a_group, e_group in zip(actual, expected):
        for a, e in zip(a_group, e_group):
            np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * max(1.0, np.abs(e).max()))


def test_every_preset_has_a_rule_and_builds():
    assert set(PRESETS) == set(RULES)
    for name in PRESETS:
        Lamb.from_preset(name, [torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match="unknown preset 'adam'"):
        Lamb.from_preset("adam", [torch.zeros(2, requires_grad=True)])


@pytest.mark.parametrize("foreach", [False, True], ids=["single_tensor", "foreach"])
@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("seed", [0, 1])
def test_preset_matches_its_float64_rederivation(name, seed, foreach):
    # bitsandbytes has no zero-norm guard (a zero tensor gets s = 0 there, r = 1 here): compare without one.
    groups, grads = make_problem(seed, steps=6, zero_tensor=name != "bitsandbytes")
    tensors = torch_groups(groups)
    optimizer = Lamb.from_preset(name, tensors, lr=LR, foreach=foreach)
    assert_same_params(run(optimizer, tensors, grads), RULES[name](groups, grads, lr=LR), rtol=1e-10)


def test_presets_really_differ():
    """Each preset's rule gives a different trajectory from every other rule on the same problem."""
    groups, grads = make_problem(0, steps=6)
    results = {name: rule(groups, grads, lr=LR) for name, rule in RULES.items() if name in {
        "paper", "nvlamb", "torch_optimizer", "deepspeed", "pytorch_optimizer", "bitsandbytes"}}
    names = sorted(results)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            gap = max(np.abs(x - y).max() for ga, gb in zip(results[a], results[b]) for x, y in zip(ga, gb))
            assert gap > 1e-4, (a, b)


# -- against the libraries themselves (optional: `make test` installs them; skipped when missing) --------------


def load_timm_lamb():
    return timm_optim.load("lamb").Lamb


def load_cybertronai_lamb():
    """pytorch_lamb imports tensorboardX for a logging helper only; a stub stands in for it."""
    if importlib.util.find_spec("pytorch_lamb") is None:
        pytest.skip("pytorch-lamb is not installed")
    if "tensorboardX" not in sys.modules and importlib.util.find_spec("tensorboardX") is None:
        sys.modules["tensorboardX"] = types.SimpleNamespace(SummaryWriter=object)
    return importlib.import_module("pytorch_lamb").Lamb


def library_optimizer(name):
    if name == "timm":
        return load_timm_lamb()
    if name == "cybertronai":
        return load_cybertronai_lamb()
    if name == "torch_optimizer":
        return pytest.importorskip("torch_optimizer").Lamb
    if name == "pytorch_optimizer":
        return pytest.importorskip("pytorch_optimizer").Lamb
    raise AssertionError(name)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pytorch_lamb uses torch's deprecated add_(scalar, tensor)
@pytest.mark.parametrize("name", ["timm", "torch_optimizer", "pytorch_optimizer", "cybertronai"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_preset_matches_the_library_itself(name, seed):
    # cybertronai has no zero-norm guard (a zero tensor gets r = 0 there, r = 1 here): compare without one.
    groups, grads = make_problem(seed, steps=10, zero_tensor=name != "cybertronai")
    library_class = library_optimizer(name)
    theirs = torch_groups(groups)
    ours = torch_groups(groups)
    expected = run(library_class(theirs, lr=LR), theirs, grads)
    actual = run(Lamb.from_preset(name, ours, lr=LR), ours, grads)
    assert_same_params(actual, expected, rtol=1e-6)
    # ... and the library's p.grad is what we gave it: the comparison is of the same inputs.
    for group, gs in zip(theirs, grads[-1]):
        for p, g in zip(group["params"], gs):
            np.testing.assert_array_equal(p.grad.numpy(), g)


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("foreach", [False, True], ids=["single_tensor", "foreach"])
def test_bitsandbytes_with_weight_decay_and_its_zero_tensor(weight_decay, foreach):
    """Decay after the step with the norm before it (λ > 0 on both groups too); and the one thing not reproduced:
    bitsandbytes leaves a zero-initialised tensor at zero (s = 0), torchlamb moves it (r = 1)."""
    groups, grads = make_problem(4, steps=8, zero_tensor=False)
    groups = [(ps, weight_decay or wd) for ps, wd in groups]
    tensors = torch_groups(groups)
    optimizer = Lamb.from_preset("bitsandbytes", tensors, lr=LR, foreach=foreach)
    assert_same_params(run(optimizer, tensors, grads), RULES["bitsandbytes"](groups, grads, lr=LR), rtol=1e-10)
    zero_groups, zero_grads = make_problem(4, steps=3)
    expected = RULES["bitsandbytes"](zero_groups, zero_grads, lr=LR)
    tensors = torch_groups(zero_groups)
    actual = run(Lamb.from_preset("bitsandbytes", tensors, lr=LR, foreach=foreach), tensors, zero_grads)
    assert not expected[1][1].any() and actual[1][1].any()


TIMM_OPTIONS = {  # timm's Lamb arguments -> ours, beside the "timm" preset
    "clamb": (dict(caution=True), dict(caution=True)),
    "lambcd": (dict(decoupled_decay=True, corrected_weight_decay=True),
               dict(decay_outside_ratio=True, corrected_weight_decay=True)),
    "clambw_corrected": (dict(caution=True, decoupled_decay=True, corrected_weight_decay=True, always_adapt=True),
                         dict(caution=True, decay_outside_ratio=True, corrected_weight_decay=True, adapt=True)),
}


@pytest.mark.parametrize("name", list(TIMM_OPTIONS))
def test_timm_caution_and_corrected_decay_match_timm_itself(name):
    """timm's Lamb with caution / decoupled corrected decay, 24 steps with a new lr every step (some above the
    constructor's, which both keep as max_lr), float64."""
    library_class = load_timm_lamb()
    theirs_options, ours_options = TIMM_OPTIONS[name]
    groups, grads = make_problem(5, steps=24)
    theirs, ours = torch_groups(groups), torch_groups(groups)
    library = library_class(theirs, lr=LR, **theirs_options)
    optimizer = Lamb.from_preset("timm", ours, lr=LR, **ours_options)
    rates = LR * (0.3 + 1.4 * np.random.default_rng(5).random(len(grads)))
    for step_grads, lr in zip(grads, rates):
        for each in (library, optimizer):
            for group in each.param_groups:
                group["lr"] = float(lr)
        run(library, theirs, [step_grads])
        run(optimizer, ours, [step_grads])
    expected = [[p.detach().numpy() for p in group["params"]] for group in theirs]
    actual = [[p.detach().numpy() for p in group["params"]] for group in ours]
    assert_same_params(actual, expected, rtol=1e-9)
