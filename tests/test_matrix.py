"""A matrix in the spirit of torch's own optimizer tests: dtypes × implementation paths × options, each run checked
against the float64 reference (tests/reference.py) on one fixed problem of two groups.

bfloat16 and float16 run with master weights: their float32 masters must follow the reference as float32 does, and
the parameters must be the masters rounded. (test_reference.py covers random problems, including bfloat16 without
master weights.)
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
}
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
    for step_grads in grads:
        for ts, gs in zip(tensors, step_grads):
            for t, g in zip(ts, gs):
                t.grad = g.to(device, copy=True)
        optimizer.step()

    reference_class, group_class = (ReferenceLamb, RefGroup) if optimizer_class is Lamb else \
        (ReferenceLars, RefLarsGroup)
    as_array = lambda t: t.double().numpy()  # noqa: E731 - the reference starts from the same rounded values
    reference = reference_class([group_class(params=[as_array(p) for p in group], **{**options, **extra})
                                 for group, extra in zip(params, group_options)])
    for step_grads in grads:
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
    run_case(Lars, dtype, path, options, [{}, {"weight_decay": 0.0, "adapt": False}])
