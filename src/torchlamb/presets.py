"""Lamb and Lars options that reproduce the default update of other LAMB and LARS implementations.

Public LAMBs disagree about the math: where bias correction goes, whether weight decay is inside the ratio's norm,
which norms are clamped, which tensors skip the ratio. Moving from one of them, ``Lamb.from_preset(name, params)``
gives the same update; ``docs/presets.md`` tabulates the differences and says which to pick.

What is not reproduced, on purpose: the libraries' step counters (per group in apex, timm and pytorch_optimizer,
global in optax, per tensor here — they differ only for tensors that miss gradients on some steps); apex writing
the update into ``p.grad``; cybertronai's missing zero-norm guard (a zero tensor there never moves; here r = 1);
bitsandbytes' missing zero-norm guard too (its s = min(1, max_unorm·‖θ‖/‖a‖) is 0 where ‖θ‖ = 0, so a
zero-initialised tensor never moves; here r = 1).

``"bitsandbytes"`` is bitsandbytes' 32-bit ``LAMB`` (0.50.x) as its CUDA kernel computes it: u = m̂/(√v̂ + ε) without
λθ, r = min(1, max_unorm·‖θ‖/‖u‖) with ‖θ‖ taken before the decay (``trust_coefficient`` = max_unorm,
``trust_clip=(0, 1)``), then θ ← (θ − lr·r·u)(1 − lr·λ) (``decay_after_step``), on every tensor. Its CPU and
default backends decay before the step instead. Its 8-bit ``LAMB8bit`` applies no trust ratio at all to tensors of
4096 elements or more (the block-wise 8-bit kernel has none; it runs 8-bit AdamW there, or refuses on CUDA), so it
has no preset: torchlamb's ``state_dtype="8bit"`` is the only 8-bit state here with a true trust ratio. Sources:
docs/preset-sources/lars-and-lamb-libraries.md, section 5.
"""

from __future__ import annotations

from typing import Any, Literal

# Which tensors a LARS code base exempts from weight decay and the ratio by their number of dimensions.
Exempt = Literal["ndim == 1", "ndim <= 1"]

#: Lamb options by preset name, for ``Lamb.from_preset(name, params)``.
PRESETS: dict[str, dict[str, Any]] = {
    # You et al. 2019 as written; optax.lamb and TF-Addons LAMB defaults.
    "paper": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, bias_correction=True),
    # NVIDIA apex FusedLAMB: global grad-norm clip at 1 before the moments; no ratio for groups without decay.
    "nvlamb": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, bias_correction=True,
                   max_grad_norm=1.0, adapt="if_decayed"),
    # timm.optim.Lamb, a PyTorch port of apex's: the same defaults.
    "timm": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, bias_correction=True,
                 max_grad_norm=1.0, adapt="if_decayed"),
    # jettify torch-optimizer: no bias correction, φ(‖θ‖) = min(‖θ‖, 10).
    "torch_optimizer": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, bias_correction=False,
                            weight_norm_clip=(0.0, 10.0)),
    # cybertronai pytorch-lamb (by Ben Mann, author of "An intuitive understanding of the LAMB optimizer", 2019): the
    # same rule, with a zero-norm guard added.
    "cybertronai": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, bias_correction=False,
                        weight_norm_clip=(0.0, 10.0)),
    # DeepSpeed FusedLamb: ratio of the uncorrected u, clamped to [0.01, 10]; bias correction in the step size.
    "deepspeed": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, bias_correction="step_size",
                      trust_clip=(0.01, 10.0)),
    # kozistr pytorch_optimizer: decay θ·(1 − lr·λ) outside the ratio, r = min(‖θ‖, 10)/(‖u‖ + ε), step lr/(1 − β1^t).
    "pytorch_optimizer": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
                              bias_correction="step_size_first_moment", decay_outside_ratio=True,
                              weight_norm_clip=(0.0, 10.0), trust_eps=1e-6),
    # bitsandbytes LAMB / LAMB32bit (0.50.x), its CUDA kernel: decay after the step, r = min(1, max_unorm·‖θ‖/‖u‖)
    # with ‖θ‖ before the decay, u without λθ, every tensor adapted, bias correction always.
    "bitsandbytes": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, bias_correction=True,
                         trust_clip=(0.0, 1.0), trust_coefficient=1.0, decay_after_step=True, adapt=True),
}


# LARS: where the lr enters (inside the momentum or outside), the ratio's denominator and ε, LARC's lr-relative clip,
# which norm being 0 gives r = 1, and which tensors adapt. Sources and the differences: docs/presets.md and
# docs/preset-sources/. Options a code base leaves to its caller (SimCLR's learning rate) keep Lars's defaults.
_SIMCLR = dict(momentum=0.9, weight_decay=0.0, trust_coefficient=1e-3, denominator="combined",
               lr_inside_momentum=True)
_BARLOW_TWINS = dict(momentum=0.9, weight_decay=0.0, trust_coefficient=1e-3, denominator="combined")
_LARC = dict(momentum=0.0, weight_decay=0.0, trust_coefficient=0.02, denominator="split", trust_eps=1e-8,
             zero_fallback="grad")

#: Lars options by preset name, for ``Lars.from_preset(name, params)``.
LARS_PRESETS: dict[str, dict[str, Any]] = {
    # You, Gitman & Ginsburg 2017, Algorithm 1: v ← m·v + γ_t·λ_l·(g + βw), w ← w − v; λ_l = η‖w‖/(‖g‖ + β‖w‖);
    # momentum 0.9, weight decay 5e-4, η = 0.001 in all its experiments.
    "paper": dict(momentum=0.9, weight_decay=5e-4, trust_coefficient=1e-3, denominator="split",
                  lr_inside_momentum=True),
    # google-research/simclr lars_optimizer.py, classic_momentum=True (its default): lr inside, ‖g + λθ‖.
    "simclr": _SIMCLR,
    # optax.lars (0.2.8): decay, trust ratio, lr, then the trace: the same update as SimCLR's.
    "optax": _SIMCLR,
    # mlcommons/training ResNet-50 (TF2) lars_optimizer.py: lr inside; ‖g‖ + λ‖θ‖ + ε with ε = Keras's 1e-7 (its
    # `epsilon or backend.epsilon()` turns the default 0 into 1e-7); r = 1 when ‖θ‖ or ‖g‖ is 0.
    "mlperf": dict(momentum=0.9, weight_decay=1e-4, trust_coefficient=1e-3, denominator="split", trust_eps=1e-7,
                   lr_inside_momentum=True, zero_fallback="grad"),
    # NVIDIA apex LARC (clip mode, its default) around torch.optim.SGD (momentum 0 by default): r ← min(r/lr, 1) for
    # the ratios it computes (a tensor with ‖θ‖ or ‖g‖ = 0 is left as it is).
    "larc": {**_LARC, "larc_clip": "computed"},
    # apex LARC in scale mode (clip=False), as SwAV uses it (with trust_coefficient=0.001).
    "larc_scale": _LARC,
    # timm.optim.Lars (1.0.31): ‖g‖ + λ‖θ‖ + 1e-8; the ratio (and decay) only in groups with weight decay.
    "timm": dict(lr=1.0, momentum=0.0, weight_decay=0.0, trust_coefficient=1e-3, denominator="split",
                 trust_eps=1e-8, zero_fallback="grad", adapt="if_decayed"),
    # facebookresearch/barlowtwins main.py LARS: lr outside, ‖g + λθ‖, 1-D tensors exempt; VICReg's and DINO's
    # LARS are the same update.
    "barlow_twins": _BARLOW_TWINS,
    "vicreg": _BARLOW_TWINS,
    "dino": _BARLOW_TWINS,
    # kozistr pytorch_optimizer LARS (4.1.0): ‖g‖ + λ‖θ‖, tensors of ndim <= 1 exempt.
    "pytorch_optimizer": dict(lr=1e-3, momentum=0.9, weight_decay=0.0, trust_coefficient=1e-3,
                              denominator="split"),
}

#: The LARS presets whose code base exempts tensors by their number of dimensions (see ``Lars.from_preset``).
LARS_EXEMPT: dict[str, Exempt] = {"barlow_twins": "ndim == 1", "vicreg": "ndim == 1", "dino": "ndim == 1",
                                  "pytorch_optimizer": "ndim <= 1"}


def preset_options(presets: dict[str, dict[str, Any]], name: str) -> tuple[dict[str, Any], Exempt | None]:
    """A preset's options (a copy) and its exemption rule; an unknown name raises ValueError listing the valid ones."""
    if not isinstance(name, str) or name not in presets:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(presets)}")
    return dict(presets[name]), LARS_EXEMPT.get(name) if presets is LARS_PRESETS else None
