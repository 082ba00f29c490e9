"""Independent float64 re-derivations of other libraries' LAMB updates, one small function each.

Each is written from that library's source (paths in the docstrings), in NumPy, without torchlamb or torch. A
problem is a list of groups ``(params, weight_decay)``; ``grads[step][group][tensor]`` are the gradients. Every
tensor gets a gradient at every step, so per-group and per-tensor step counters agree.
"""

from __future__ import annotations

import numpy as np


def _norm(x: np.ndarray) -> float:
    return float(np.sqrt(np.sum(x * x)))


def _run(groups, grads, update_one, clip=None):
    """Apply ``update_one(theta, g, m, v, t, weight_decay) -> (theta, m, v)`` to every tensor for every step,
    after ``clip`` (a function of all of a step's gradients) when given."""
    params = [[np.array(p, dtype=np.float64) for p in ps] for ps, _ in groups]
    moments = [[(np.zeros_like(p), np.zeros_like(p)) for p in ps] for ps in params]
    for t, step_grads in enumerate(grads, start=1):
        step_grads = [[np.asarray(g, dtype=np.float64) for g in gs] for gs in step_grads]
        if clip is not None:
            step_grads = clip(step_grads)
        for gi, (_, weight_decay) in enumerate(groups):
            for i, g in enumerate(step_grads[gi]):
                m, v = moments[gi][i]
                params[gi][i], m, v = update_one(params[gi][i], g, m, v, t, weight_decay)
                moments[gi][i] = (m, v)
    return params


def optax_lamb(groups, grads, lr=1e-3, b1=0.9, b2=0.999, eps=1e-6):
    """optax.lamb: scale_by_adam → add_decayed_weights → scale_by_trust_ratio → -lr (optax/_src/alias.py)."""
    def update(theta, g, m, v, t, wd):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        u = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps) + wd * theta
        w, n = _norm(theta), _norm(u)
        r = 1.0 if w == 0 or n == 0 else w / n
        return theta - lr * r * u, m, v
    return _run(groups, grads, update)


def apex_fused_lamb(groups, grads, lr=1e-3, b1=0.9, b2=0.999, eps=1e-6, max_grad_norm=1.0):
    """apex FusedLAMB defaults (adam_w_mode, grad_averaging, use_nvlamb=False); timm's Lamb is the same rule.

    Global clip c = ‖G‖/max if ‖G‖ > max; ratio only where λ ≠ 0 (apex/optimizers/fused_lamb.py, timm/optim/lamb.py).
    """
    def update(theta, g, m, v, t, wd):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        u = (m / (1 - b1**t)) / (np.sqrt(v) / np.sqrt(1 - b2**t) + eps)
        if wd != 0:
            u = u + wd * theta
        w, n = _norm(theta), _norm(u)
        r = w / n if (wd != 0 and w > 0 and n > 0) else 1.0
        return theta - lr * r * u, m, v

    def clip(step_grads):
        total = np.sqrt(sum(np.sum(g * g) for gs in step_grads for g in gs))
        c = total / max_grad_norm if total > max_grad_norm else 1.0
        return [[g / c for g in gs] for gs in step_grads]
    return _run(groups, grads, update, clip=clip)


def torch_optimizer_lamb(groups, grads, lr=1e-3, b1=0.9, b2=0.999, eps=1e-6, clamp_value=10.0):
    """jettify torch-optimizer Lamb defaults (debias=False, adam=False); cybertronai's rule plus a zero guard."""
    def update(theta, g, m, v, t, wd):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        w = min(max(_norm(theta), 0.0), clamp_value)
        u = m / (np.sqrt(v) + eps)
        if wd != 0:
            u = u + wd * theta
        n = _norm(u)
        r = 1.0 if w == 0 or n == 0 else w / n
        return theta - lr * r * u, m, v
    return _run(groups, grads, update)


def deepspeed_fused_lamb(groups, grads, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, max_coeff=10.0, min_coeff=0.01):
    """DeepSpeed FusedLamb defaults (deepspeed/ops/lamb/fused_lamb.py, csrc/lamb/fused_lamb_cuda_kernel.cu)."""
    def update(theta, g, m, v, t, wd):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        u = m / (np.sqrt(v) + eps) + wd * theta
        w, n = _norm(theta), _norm(u)
        r = min(max(w / n, min_coeff), max_coeff) if (w != 0 and n != 0) else 1.0
        step_size = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
        return theta - step_size * r * u, m, v
    return _run(groups, grads, update)


def pytorch_optimizer_lamb(groups, grads, lr=1e-3, b1=0.9, b2=0.999, eps=1e-6, clamp=10.0):
    """kozistr pytorch_optimizer Lamb defaults (weight_decouple=True, adam_debias=False, pre_norm=False)."""
    def update(theta, g, m, v, t, wd):
        step_size = lr / (1 - b1**t)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        theta = theta * (1 - lr * wd)
        u = m / (np.sqrt(v) + eps)
        w = min(_norm(theta), clamp)
        n = _norm(u)
        r = 1.0 if w == 0 or n == 0 else w / (n + eps)
        return theta - step_size * r * u, m, v
    return _run(groups, grads, update)


def bitsandbytes_lamb(groups, grads, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, max_unorm=1.0):
    """bitsandbytes LAMB / LAMB32bit (32-bit state) as its CUDA kernels compute it, from the source of repository
    bitsandbytes-foundation/bitsandbytes at tag 0.50.1 (commit 37d2a9387f7146ccb85517ff45c665d345bfda79):
    bitsandbytes/optim/lamb.py (LAMB, lines 8-64: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 0,
    max_unorm 1.0; bias_correction accepted and ignored), bitsandbytes/functional.py optimizer_update_32bit
    (lines 1080-1166; ‖θ‖ of the parameter before the update, 1142-1144), csrc/kernels.cu
    kPreconditionOptimizer32bit2State (ADAM case 576-583: the sum of a² with a = m̂/(√v̂ + ε), no λθ) and
    kOptimizer32bit2State (update_scale lines 633-642: s = max_unorm·‖θ‖/‖a‖ if ‖a‖ > max_unorm·‖θ‖ else 1 — no
    zero guard, s = 0 where ‖θ‖ = 0 and ‖a‖ > 0; ADAM case 700-711: θ ← θ + s·(−lr·√(1−β2^t)/(1−β1^t))·
    m/(√v + ε·√(1−β2^t)), then θ ← θ·(1 − lr·λ) if λ > 0)."""
    def update(theta, g, m, v, t, wd):
        param_norm = _norm(theta)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        correction1, correction2 = 1 - b1**t, np.sqrt(1 - b2**t)
        unorm = _norm((m / correction1) / (np.sqrt(v / (1 - b2**t)) + eps))
        scale = max_unorm * param_norm / unorm if unorm > max_unorm * param_norm else 1.0
        step_size = -lr * correction2 / correction1
        theta = theta + scale * step_size * (m / (np.sqrt(v) + eps * correction2))
        if wd > 0:
            theta = theta * (1 - lr * wd)
        return theta, m, v
    return _run(groups, grads, update)


# preset name → the re-derivation it must match
RULES = {
    "paper": optax_lamb,
    "nvlamb": apex_fused_lamb,
    "timm": apex_fused_lamb,
    "torch_optimizer": torch_optimizer_lamb,
    "cybertronai": torch_optimizer_lamb,
    "deepspeed": deepspeed_fused_lamb,
    "pytorch_optimizer": pytorch_optimizer_lamb,
    "bitsandbytes": bitsandbytes_lamb,
}
