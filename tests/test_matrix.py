"""A matrix in the spirit of torch's own optimizer tests: dtypes × implementation paths × options, each run checked
against the float64 reference (tests/reference.py) on one fixed problem of two groups.

bfloat16 and float16 run with master weights: their float32 masters must follow the reference as float32 does, and
the parameters must be the masters rounded. (test_reference.py covers random problems, including bfloat16 without
master weights.)

Lars runs change the lr at every step (LARS_LR_FACTORS): whether the lr is inside the momentum buffer or multiplies it
only shows when the lr changes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reference import ReferenceLamb, ReferenceLars, RefGroup, RefLarsGroup
from torchlamb import Lamb, Lars

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
PATHS = {"single_tensor": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
LAMB_OPTIONS = {
    "defaults": {},
    "maximize": dict(maximize=True),
    "clipping": dict(max_grad_norm=0.3, weight_norm_clip=(0.0, 2.0), trust_clip=(0.0, 10.0)),
    "no_adapt": dict(adapt=False),
    "apex": dict(adapt="if_decayed", max_grad_norm=1.0, betas=(0.9, 0.999), eps=1e-6),
    "deepspeed": dict(bias_correction="step_size", eps=1e-8, trust_clip=(0.01, 10.0)),
    "pytorch_optimizer": dict(bias_correction="step_size_first_moment", decay_outside_ratio=True, trust_eps=1e-6),
    # timm's cautious LAMB (clamb), coupled decay: k·(a⊙M) + λθ, ‖u‖² assembled from the whole tensor's sums.
    "caution": dict(caution=True, maximize=True, max_grad_norm=0.3, trust_coefficient=0.7),
    # clambw with corrected decay: θ(1 − λ·lr²/max_lr) first; caution on the uncorrected a of "step_size".
    "caution_decoupled_corrected": dict(caution=True, decay_outside_ratio=True, corrected_weight_decay=True,
                                        max_lr=0.05, weight_decay=0.2, bias_correction="step_size"),
    # bitsandbytes' 32-bit LAMB kernel: decay after the step, ratio clipped at 1 with max_unorm as η.
    "bnb": dict(decay_after_step=True, weight_decay=0.1, trust_clip=(0.0, 1.0), trust_coefficient=2.0, eps=1e-8),
}
LARS_OPTIONS = {
    "defaults": {},
    "maximize": dict(maximize=True),
    "clipping": dict(max_grad_norm=0.3, trust_clip=(0.0, 2.0)),
    "no_adapt": dict(adapt=False),
    "nesterov_split": dict(nesterov=True, denominator="split"),
    "lr_inside_nesterov": dict(lr_inside_momentum=True, nesterov=True),
    "dampening": dict(dampening=0.3),
    # η = 0.3: r is above the lr for some tensors and steps (clipped to 1), below it for others (r/lr).
    "larc_clip": dict(larc_clip=True, trust_coefficient=0.3),
    # lr up to 3: a fallback r = 1 (the zero-initialised bias) stays 1 here where larc_clip=True gives 1/lr.
    "larc_computed": dict(larc_clip="computed", trust_coefficient=0.3, lr=1.5),
    "mlperf": dict(denominator="split", trust_eps=1e-7, zero_fallback="grad", lr_inside_momentum=True),
}
# test_lars_matrix's second group: no decay, no ratio; with zero_fallback="grad" the second group decays and adapts,
# so that its all-zero gradient (problem()) takes r = 1 where the split denominator λ‖θ‖ would give η/λ.
LARS_SECOND_GROUP = {"default": {"weight_decay": 0.0, "adapt": False}, "mlperf": {}}
# The lr of each Lars step, as factors of each group's lr.
LARS_LR_FACTORS = (1.0, 0.3, 2.0, 0.6)
# Options a group sets itself (not constructor arguments): Lamb's max_lr (the constructor's lr by default).
GROUP_ONLY = ("max_lr",)


def split_group_only(options, group_options):
    """(constructor options, each group's options with the group-only ones of ``options`` added)."""
    own = {k: v for k, v in options.items() if k in GROUP_ONLY}
    return ({k: v for k, v in options.items() if k not in GROUP_ONLY},
            [{**own, **extra} for extra in group_options])


# (rtol, atol scaled by the largest |θ|) for what is compared in float32 precision, or in float64.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 3e-5, torch.bfloat16: 3e-5, torch.float16: 3e-5}


def problem(dtype):
    generator = torch.Generator().manual_seed(7)
    shapes = [[(6, 5), (5,)], [(4, 3, 2), (3,)]]
    params = [[torch.randn(s, generator=generator).to(dtype) for s in group] for group in shapes]
    params[0][1].zero_()  # a zero-initialised bias
    grads = [[[torch.randn(s, generator=generator).to(dtype) for s in group] for group in shapes] for _ in range(4)]
    grads[1][1][0].zero_()  # an all-zero gradient
    return params, grads


def run_case(optimizer_class, dtype, path, options, group_options, device="cpu"):
    options, group_options = split_group_only(options, group_options)
    params, grads = problem(dtype)
    tensors = [[p.to(device, copy=True).requires_grad_() for p in group] for group in params]
    master = dtype in (torch.bfloat16, torch.float16)
    groups = [{"params": ts, **extra} for ts, extra in zip(tensors, group_options)]
    optimizer = optimizer_class(groups, **options, master_weights=master, **PATHS[path])
    # Each step's lr per group: Lars's changes (LARS_LR_FACTORS), Lamb's stays.
    factors = LARS_LR_FACTORS if optimizer_class is Lars else (1.0,) * len(grads)
    lrs = [[group["lr"] * factor for group in optimizer.param_groups] for factor in factors]
    for step_grads, step_lrs in zip(grads, lrs):
        for ts, gs in zip(tensors, step_grads):
            for t, g in zip(ts, gs):
                t.grad = g.to(device, copy=True)
        if optimizer_class is Lars:
            for group, lr in zip(optimizer.param_groups, step_lrs):
                group["lr"] = lr
        optimizer.step()

    reference_class, group_class = (ReferenceLamb, RefGroup) if optimizer_class is Lamb else \
        (ReferenceLars, RefLarsGroup)
    as_array = lambda t: t.double().numpy()  # noqa: E731 - the reference starts from the same rounded values
    reference = reference_class([group_class(params=[as_array(p) for p in group], **{**options, **extra})
                                 for group, extra in zip(params, group_options)])
    for step_grads, step_lrs in zip(grads, lrs):
        for group, lr in zip(reference.groups, step_lrs):
            group.lr = lr
        reference.step([[as_array(g) for g in gs] for gs in step_grads])
    for ts, expected_group in zip(tensors, reference.groups):
        for t, expected in zip(ts, expected_group.params):
            computed = (optimizer.state[t]["master"] if master else t.detach()).cpu()
            if master:
                assert torch.equal(t.detach().cpu(), computed.to(dtype))  # θ is its master, rounded
            scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
            tolerance = TOLERANCE[dtype]
            np.testing.assert_allclose(computed.double().numpy(), expected, rtol=tolerance, atol=tolerance * scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("option", list(LAMB_OPTIONS))
def test_lamb_matrix(dtype, path, option):
    options = {"lr": 0.02, "weight_decay": 0.01, **LAMB_OPTIONS[option]}
    # The second group: no weight decay, so that adapt="if_decayed" differs between the groups.
    run_case(Lamb, dtype, path, options, [{}, {"weight_decay": 0.0}])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("option", list(LARS_OPTIONS))
def test_lars_matrix(dtype, path, option):
    options = {"lr": 0.5, "weight_decay": 0.01, "trust_coefficient": 0.02, **LARS_OPTIONS[option]}
    run_case(Lars, dtype, path, options, [{}, LARS_SECOND_GROUP.get(option, LARS_SECOND_GROUP["default"])])
