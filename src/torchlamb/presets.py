"""Lamb options that reproduce the default update of other LAMB implementations.

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

from typing import Any

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
