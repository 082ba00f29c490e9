"""An independent float64 NumPy reference of LAMB, written from the pseudocode of You et al. (2019), "Large Batch
Optimization for Deep Learning: Training BERT in 76 minutes".

It must not import torchlamb (nor torch): the tests compare the package against it, so it has to stand on its
own. It is written for clarity, one tensor at a time, with no attempt at speed.

    for t = 1, 2, ...:
        g  = gradient (scaled by min(1, max_grad_norm / ‖all gradients‖) if max_grad_norm; negated if maximize)
        m  = b1 * m + (1 - b1) * g
        v  = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**t);  v_hat = v / (1 - b2**t)         (only with bias correction)
        r_t = m_hat / (sqrt(v_hat) + eps) + wd * theta
        w_norm = clamp(||theta||, weight_norm_clip);  g_norm = ||r_t||
        trust = w_norm / g_norm if w_norm > 0 and g_norm > 0 else 1;  clamp(trust, trust_clip);  1 if not adapt
        theta = theta - lr * trust * r_t

and the variants other libraries use (torchlamb's presets): an eps added to g_norm in the ratio; bias correction
through the step size (lr * sqrt(1 - b2**t) / (1 - b1**t), or lr / (1 - b1**t)) instead of inside r_t; weight
decay applied as theta * (1 - lr * wd) before the norms instead of inside r_t (timm's decoupled_decay; its
corrected_weight_decay: theta * (1 - wd * lr**2 / max_lr)), or after the step as bitsandbytes' 32-bit kernel:
theta = (theta - lr * trust * r_t) * (1 - lr * wd), r_t without wd * theta, ||theta|| before the decay; a trust
coefficient eta in the ratio's numerator (bitsandbytes' max_unorm); the ratio only where wd != 0; and caution
(timm, arXiv 2411.16085), before the decay:

        a = m_hat / (sqrt(v_hat) + eps);  mask = (a * g > 0);  a = a * mask / max(mean(mask), 1e-3)
"""


from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


def _largest(arrays) -> float:
    """The largest magnitude in any of the arrays: the scale of the rounding a low-precision run makes."""
    return max((float(np.abs(a).max()) for a in arrays if np.size(a)), default=0.0)


def adapts(adapt, weight_decay: float) -> bool:
    return adapt is True or (adapt == "if_decayed" and weight_decay != 0)


def trust(group, theta: np.ndarray, denominator: float, coefficient: float = 1.0) -> float:
    """The trust stage, from the pseudocode: clamp ‖θ‖, divide, fall back to 1, clamp the ratio, adapt or not."""
    w_norm = float(np.sqrt(np.sum(theta * theta)))
    if group.weight_norm_clip is not None:
        w_norm = min(max(w_norm, group.weight_norm_clip[0]), group.weight_norm_clip[1])
    ratio = coefficient * w_norm / (denominator + group.trust_eps) if (w_norm > 0 and denominator > 0) else 1.0
    if group.trust_clip is not None:
        ratio = min(max(ratio, group.trust_clip[0]), group.trust_clip[1])
    return ratio if adapts(group.adapt, group.weight_decay) else 1.0


class _Reference:
    """The loop both references share: global gradient clip, maximize, skip tensors without a gradient."""

    def __init__(self, groups):
        self.groups = groups
        for group in groups:
            group.params = [np.array(p, dtype=np.float64, copy=True) for p in group.params]
            self._init_state(group)
        self.trust_ratios: list[list[float]] = []
        self.magnitude = _largest(p for group in groups for p in group.params)

    def step(self, grads: list[list[np.ndarray | None]]) -> None:
        present = [np.asarray(g, dtype=np.float64) for gs in grads for g in gs if g is not None]
        total_norm = np.sqrt(sum(float(np.sum(g * g)) for g in present))
        self.trust_ratios = []
        for group, group_grads in zip(self.groups, grads):
            ratios = []
            for i, raw in enumerate(group_grads):
                if raw is None:
                    continue
                g = np.asarray(raw, dtype=np.float64)
                if group.max_grad_norm is not None and total_norm > group.max_grad_norm:
                    g = g * (group.max_grad_norm / total_norm)
                if group.maximize:
                    g = -g
                theta = group.params[i]
                group.params[i], ratio, move = self._update(group, i, theta, g)
                ratios.append(ratio)
                self.magnitude = max(self.magnitude, _largest([theta, *move]))
            self.trust_ratios.append(ratios)


@dataclass
class RefGroup:
    params: list[np.ndarray]
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    weight_decay: float = 0.01
    bias_correction: bool | str = True
    weight_norm_clip: tuple[float, float] | None = None
    trust_clip: tuple[float, float] | None = None
    trust_eps: float = 0.0
    decay_outside_ratio: bool = False
    corrected_weight_decay: bool = False
    max_lr: float | None = None  # None: lr
    decay_after_step: bool = False
    caution: bool = False
    trust_coefficient: float = 1.0
    max_grad_norm: float | None = None
    adapt: bool | str = True
    maximize: bool = False
    # The moments as they are stored: store(m, v) -> (m, v) rounded to the storage format, or None for float64.
    # stored_update: u is computed from the stored moments (8-bit state), else from the unrounded ones.
    store: Callable | None = None
    stored_update: bool = True
    # per tensor: [t, m, v]
    state: list[list] = field(default_factory=list)


class ReferenceLamb(_Reference):
    """LAMB over float64 copies of the parameters. ``step(grads)`` takes one list of gradients per group
    (``None`` for a tensor without a gradient, which is skipped as torch optimizers skip it)."""

    def _init_state(self, group):
        group.state = [[0, np.zeros_like(p), np.zeros_like(p)] for p in group.params]

    def _update(self, group, i, theta, g):
        state = group.state[i]
        state[0] += 1
        t = state[0]
        b1, b2 = group.betas
        if group.decay_outside_ratio:
            max_lr = group.lr if group.max_lr is None else group.max_lr
            decay_lr = group.lr**2 / max_lr if group.corrected_weight_decay else group.lr
            theta = theta * (1 - decay_lr * group.weight_decay)
        state[1] = b1 * state[1] + (1 - b1) * g
        state[2] = b2 * state[2] + (1 - b2) * g * g
        m_hat, v_hat = state[1], state[2]
        if group.store is not None:
            state[1], state[2] = group.store(state[1], state[2])
            if group.stored_update:
                m_hat, v_hat = state[1], state[2]
        if group.bias_correction is True:
            m_hat = m_hat / (1 - b1**t)
            v_hat = v_hat / (1 - b2**t)
        r = m_hat / (np.sqrt(v_hat) + group.eps)
        if group.caution:
            mask = (r * g > 0).astype(np.float64)
            r = r * mask / max(float(np.mean(mask)) if mask.size else 1.0, 1e-3)
        if not group.decay_outside_ratio and not group.decay_after_step:
            r = r + group.weight_decay * theta
        ratio = trust(group, theta, float(np.sqrt(np.sum(r * r))), group.trust_coefficient)
        step_size = group.lr
        if group.bias_correction == "step_size":
            step_size = group.lr * np.sqrt(1 - b2**t) / (1 - b1**t)
        elif group.bias_correction == "step_size_first_moment":
            step_size = group.lr / (1 - b1**t)
        move = step_size * ratio * r
        theta_new = theta - move
        if group.decay_after_step:
            theta_new = theta_new * (1 - group.lr * group.weight_decay)
        return theta_new, ratio, [move, theta_new - theta]


@dataclass
class RefLarsGroup:
    params: list[np.ndarray]
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    trust_coefficient: float = 0.001
    nesterov: bool = False
    denominator: str = "combined"
    weight_norm_clip: tuple[float, float] | None = None
    trust_clip: tuple[float, float] | None = None
    trust_eps: float = 0.0
    lr_inside_momentum: bool = False
    dampening: float = 0.0
    larc_clip: bool | str = False
    zero_fallback: str = "denominator"
    max_grad_norm: float | None = None
    adapt: bool | str = True
    maximize: bool = False
    # The buffer as it is stored: store(b) -> b rounded to the storage format, or None for float64;
    # stored_update: θ moves by the stored buffer (8-bit state), else by the unrounded one.
    store: Callable | None = None
    stored_update: bool = True
    buffers: list[np.ndarray] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)


class ReferenceLars(_Reference):
    """LARS (You et al. 2017, with the ‖g + λθ‖ denominator of Ben Mann's post on LAMB, 2019, by default) over
    float64 copies.

        u = g + wd * theta
        trust = eta * clamp(||theta||, weight_norm_clip) / (denom + trust_eps)   if both > 0 else 1
            denom = ||u|| ("combined") or ||g|| + wd * ||theta|| ("split"); "both": ||theta|| and denom, or
            ||theta|| and ||g|| with zero_fallback="grad"
        trust = clamp(trust, trust_clip);  min(trust / lr, 1) with larc_clip (1 at lr = 0; with "computed" only
            where both norms were > 0);  1 if not adapting
        s = lr * trust with lr_inside_momentum, else trust
        c = 1 at the tensor's first step, else 1 - dampening
        b = momentum * b + c * s * u
        d = b                                       (nesterov: s * u + momentum * b)
        theta = theta - d with lr_inside_momentum, else theta - lr * d
    """

    def _init_state(self, group):
        group.buffers = [np.zeros_like(p) for p in group.params]
        group.steps = [0 for _ in group.params]

    def _update(self, group, i, theta, g):
        group.steps[i] += 1
        u = g + group.weight_decay * theta
        grad_norm = float(np.sqrt(np.sum(g * g)))
        if group.denominator == "split":
            denominator = grad_norm + group.weight_decay * float(np.sqrt(np.sum(theta * theta)))
        else:
            denominator = float(np.sqrt(np.sum(u * u)))
        if group.zero_fallback == "grad" and grad_norm == 0:
            denominator = 0.0  # trust() falls back to 1 on a zero denominator
        ratio = trust(group, theta, denominator, group.trust_coefficient)
        w_norm = float(np.sqrt(np.sum(theta * theta)))
        if group.weight_norm_clip is not None:
            w_norm = min(max(w_norm, group.weight_norm_clip[0]), group.weight_norm_clip[1])
        computed = w_norm > 0 and denominator > 0
        clips = group.larc_clip is True or (group.larc_clip == "computed" and computed)
        if clips and adapts(group.adapt, group.weight_decay):
            ratio = ratio / group.lr if ratio < group.lr else 1.0
        scale = group.lr * ratio if group.lr_inside_momentum else ratio
        dampened = 1.0 if group.steps[i] == 1 else 1.0 - group.dampening
        buffer = group.momentum * group.buffers[i] + dampened * scale * u
        group.buffers[i] = buffer if group.store is None else group.store(buffer)
        if group.stored_update:
            buffer = group.buffers[i]
        direction = scale * u + group.momentum * buffer if group.nesterov else buffer
        move = direction if group.lr_inside_momentum else group.lr * direction
        return theta - move, ratio, [move, ratio * u, group.buffers[i]]


# ---------------------------------------------------------------------------------------------------------------
# Storage formats of the state, for the ``store`` hooks above: the moments rounded as an optimizer stores them.


def round_to_bfloat16(x: np.ndarray) -> np.ndarray:
    """x rounded to bfloat16 (to nearest, ties to even), as float64: float32's upper 16 bits after rounding."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    return rounded.view(np.float32).astype(np.float64)


def dynamic_code_map(signed: bool) -> np.ndarray:
    """The 256 sorted float32 values of torchlamb's "dynamic" code map, from its definition: 0; magnitudes in
    decades 10^-e (e = 0..bits-1, bits = 7 signed, 8 unsigned), decade e holding 2^(bits-1-e) values spread linearly
    over (0.1, 1]·10^-e up to its top; both signs when signed, plus half the smallest magnitude to make 256."""
    bits = 7 if signed else 8
    magnitudes = [10.0**-e * (0.1 + 0.9 * (j + 1) / 2 ** (bits - 1 - e))
                  for e in range(bits) for j in range(2 ** (bits - 1 - e))]
    values = [0.0, *magnitudes]
    if signed:
        values += [-m for m in magnitudes] + [min(magnitudes) / 2]
    return np.array(sorted(values), dtype=np.float32)


def blockwise_8bit(x: np.ndarray, signed: bool, floor: bool = False, block: int = 256) -> np.ndarray:
    """x stored block-wise in 8 bits and read back (float64): each row (one index of the first dimension, the rest
    flattened; a 1-D x is one row) is cut into blocks of ``block`` consecutive values, the last shorter; each block
    is multiplied by the float32 reciprocal of its largest magnitude (in float32) and rounded to the nearest entry
    of the code map (ties to the lower entry); ``floor``: a positive value never rounds to 0. Read back: entry ×
    largest magnitude, in float32."""
    table = dynamic_code_map(signed)
    midpoints = ((table[1:].astype(np.float64) + table[:-1]) / 2).astype(np.float32)
    zero = int(np.flatnonzero(table == 0)[0])
    shape = np.shape(x)
    rows = np.asarray(x, dtype=np.float32).reshape(shape[0] if len(shape) >= 2 else 1, -1)
    length = rows.shape[1]
    per_row = -(-length // block)
    padded = np.zeros((rows.shape[0], per_row * block), dtype=np.float32)
    padded[:, :length] = rows
    blocks = padded.reshape(-1, block)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    safe = np.where(absmax > 0, absmax, np.float32(1))
    normalized = np.where(absmax > 0, blocks * (np.float32(1) / safe), np.float32(0)).astype(np.float32)
    codes = np.searchsorted(midpoints, normalized, side="left")
    if floor:
        codes = np.where((blocks > 0) & (codes == zero), zero + 1, codes)
    values = (table[codes] * absmax).astype(np.float32)
    return values.reshape(rows.shape[0], -1)[:, :length].reshape(shape).astype(np.float64)
