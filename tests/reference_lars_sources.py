"""Float64 re-derivations of published LARS codes that do not install here (TensorFlow, or gone from apex).

Each is restated as math from its source (repository, file, commit, lines below; docs/preset-sources/ has the full
survey) and written in NumPy, without torchlamb: apex LARC alone rewrites gradients for the real torch.optim.SGD,
which is what it wraps. Every class is an optimizer over a list of float64 arrays: ``step(grads, lr)`` applies one
update with the current step's learning rate ``lr`` (the schedule's value for this step, read as each code reads
it: TF's ``iterations`` before the increment, the group's lr at call time in PyTorch), and ``params`` holds the
arrays. Names of tensors do not exist here: where a code excludes tensors by name or ndim, ``excluded(i)`` says so.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def _norm(x: np.ndarray) -> float:
    return float(np.sqrt(np.sum(x * x)))


class _NumpyOptimizer:
    def __init__(self, params: list[np.ndarray]):
        self.params = [np.array(p, dtype=np.float64) for p in params]
        self.buffers = [np.zeros_like(p) for p in self.params]


class PaperAlgorithm1(_NumpyOptimizer):
    """You, Gitman & Ginsburg, "Large Batch Training of Convolutional Networks" (arXiv 1708.03888), Algorithm 1,
    as read in the ICLR-2018 text (docs/preset-sources/lars-in-published-code.md §1):

        λˡ = η‖w‖ / (‖g‖ + β‖w‖);  v ← m·v + γ_t·λˡ·(g + βw);  w ← w − v   (v₀ = 0)

    Applied to every layer, no ε, and **no zero-norm rule**: a tensor with ‖w‖ = 0 gets λˡ = 0 and never moves
    (torchlamb's preset gives r = 1 there instead); problems for this rule avoid zero norms.
    """

    def __init__(self, params, momentum=0.9, weight_decay=5e-4, trust_coefficient=1e-3):
        super().__init__(params)
        self.m, self.beta, self.eta = momentum, weight_decay, trust_coefficient

    def step(self, grads, lr):
        for i, g in enumerate(grads):
            w = self.params[i]
            local = self.eta * _norm(w) / (_norm(g) + self.beta * _norm(w))
            self.buffers[i] = self.m * self.buffers[i] + lr * local * (g + self.beta * w)
            self.params[i] = w - self.buffers[i]


class SimclrLars(_NumpyOptimizer):
    """google-research/simclr ``lars_optimizer.py`` (TF1) @ 383d4143fd8cf7879ae10f1046a9baeb753ff438 (file last
    changed in 036ea7ba), ``LARSOptimizer.apply_gradients`` with the default ``classic_momentum=True``
    (L36–45 defaults, L91–96 zero slot, L98–99 decay, L101–118 classic momentum):

        g ← g + λθ (if λ ≠ 0 and the name is not excluded);
        r = η‖θ‖/‖g‖ if ‖θ‖ > 0 and ‖g‖ > 0 else 1 (1 also for tensors excluded from adaptation);
        v ← μv + lr·r·g;  θ ← θ − v,  or with Nesterov θ ← θ − (μv + lr·r·g).

    ``excluded(i)`` stands for both name lists (the adaptation list defaults to the decay list, L76–81).
    """

    def __init__(self, params, momentum=0.9, weight_decay=0.0, eeta=1e-3, use_nesterov=False,
                 excluded: Callable[[int], bool] = lambda i: False):
        super().__init__(params)
        self.momentum, self.weight_decay, self.eeta = momentum, weight_decay, eeta
        self.use_nesterov, self.excluded = use_nesterov, excluded

    def step(self, grads, lr):
        for i, g in enumerate(grads):
            theta = self.params[i]
            if self.weight_decay and not self.excluded(i):
                g = g + self.weight_decay * theta
            ratio = 1.0
            if not self.excluded(i):
                w, n = _norm(theta), _norm(g)
                ratio = self.eeta * w / n if (w > 0 and n > 0) else 1.0
            scaled = lr * ratio
            self.buffers[i] = self.momentum * self.buffers[i] + scaled * g
            update = self.momentum * self.buffers[i] + scaled * g if self.use_nesterov else self.buffers[i]
            self.params[i] = theta - update


# The Keras backend epsilon (tf.keras.backend.epsilon(), 1e-7), which mlcommons' `epsilon or backend_config.epsilon()`
# substitutes for the default epsilon=0.0.
KERAS_EPSILON = 1e-7


class MlperfLars(_NumpyOptimizer):
    """MLPerf ResNet-50 reference, mlcommons/training ``retired_benchmarks/resnet-tf2/tensorflow2/lars_optimizer.py``
    @ aa344c7fb900e82ed19fb94aebfed50c63ab2204 (last changed in 3c81f6f9), per the survey: L52–66 defaults, L109
    ε = epsilon or the Keras epsilon, L113–122 lr = schedule(iterations), L128–144 ``compute_lr``, L162–185
    ``_resource_apply_dense``. (Re-read for this file in the same code at its earlier path
    ``image_classification/tensorflow2/lars_optimizer.py`` @ e3769c8d, through a verbatim copy.)

        r = η‖θ‖/(‖g‖ + λ‖θ‖ + ε) if ‖θ‖ > 0 and ‖g‖ > 0 (the raw g) else 1;  u = g + λθ
        (both skipped for names in skip_list);  m ← μm − lr·r·u;  θ ← θ + m,  Nesterov θ ← θ + μm − lr·r·u.

    The slot holds −b; written here with b = −m.
    """

    def __init__(self, params, momentum=0.9, weight_decay=1e-4, eeta=1e-3, epsilon=0.0, use_nesterov=False,
                 skipped: Callable[[int], bool] = lambda i: False):
        super().__init__(params)
        self.momentum, self.weight_decay, self.eeta = momentum, weight_decay, eeta
        self.epsilon = epsilon or KERAS_EPSILON
        self.use_nesterov, self.skipped = use_nesterov, skipped

    def step(self, grads, lr):
        for i, g in enumerate(grads):
            theta = self.params[i]
            scaled = lr
            if not self.skipped(i):
                w, n = _norm(theta), _norm(g)
                ratio = self.eeta * w / (n + self.weight_decay * w + self.epsilon) if (w > 0 and n > 0) else 1.0
                scaled = lr * ratio
                g = g + self.weight_decay * theta
            self.buffers[i] = self.momentum * self.buffers[i] + g * scaled
            update = self.momentum * self.buffers[i] + g * scaled if self.use_nesterov else self.buffers[i]
            self.params[i] = theta - update


class BarlowTwinsLars(_NumpyOptimizer):
    """facebookresearch/barlowtwins ``main.py`` @ 8e8d284ca0bc02f88b92328e53f9b901e86b4a3c (last changed in a655214c),
    class ``LARS``, L224–263, with main.py's filters ``exclude_bias_and_norm := p.ndim == 1`` for both (L90–101):

        u = g + λθ unless ndim == 1;  q = η‖θ‖/‖u‖ if ‖θ‖ > 0 and ‖u‖ > 0 else 1, unless ndim == 1 (then 1);
        μ_buf ← momentum·μ_buf + q·u  (zeros at first);  θ ← θ − lr·μ_buf.

    VICReg (main_vicreg.py) and DINO (utils.LARS) are the same update.
    """

    def __init__(self, params, weight_decay=0.0, momentum=0.9, eta=1e-3, filtered=True):
        super().__init__(params)
        self.weight_decay, self.momentum, self.eta, self.filtered = weight_decay, momentum, eta, filtered

    def step(self, grads, lr):
        for i, g in enumerate(grads):
            theta = self.params[i]
            excluded = self.filtered and theta.ndim == 1
            u = g if excluded else g + self.weight_decay * theta
            if not excluded:
                w, n = _norm(theta), _norm(u)
                u = u * (self.eta * w / n if (w > 0 and n > 0) else 1.0)
            self.buffers[i] = self.momentum * self.buffers[i] + u
            self.params[i] = theta - lr * self.buffers[i]


class ApexLarc:
    """NVIDIA/apex ``apex/parallel/LARC.py`` @ 2ec84ebdca59278eaf15e8ddf32476d9d6d8b904 (its last change; removed
    unchanged in cb65b8ed), L39 defaults (trust_coefficient 0.02, clip True, eps 1e-8), L78–107 ``step``, wrapped
    around the real ``torch.optim.SGD``. Per group, LARC takes the group's weight decay λ, sets it to 0 for SGD,
    and for each tensor with ‖θ‖ ≠ 0 **and** ‖g‖ ≠ 0 rewrites

        r = η‖θ‖/(‖g‖ + λ‖θ‖ + ε);  clip mode: r ← min(r/lr, 1);  g ← r·(g + λθ)

    leaving other gradients as they are (no decay, no ratio, no clip), then runs SGD's step and restores λ.
    """

    def __init__(self, params, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                 trust_coefficient=0.02, clip=True, eps=1e-8):
        self.tensors = [torch.tensor(p, dtype=torch.float64) for p in params]
        self.sgd = torch.optim.SGD(self.tensors, lr=lr, momentum=momentum, dampening=dampening,
                                   weight_decay=weight_decay, nesterov=nesterov)
        self.trust_coefficient, self.clip, self.eps = trust_coefficient, clip, eps

    @property
    def params(self):
        return [t.numpy().copy() for t in self.tensors]

    def step(self, grads, lr):
        group = self.sgd.param_groups[0]
        group["lr"] = lr
        weight_decay = group["weight_decay"]
        group["weight_decay"] = 0.0
        for p, g in zip(self.tensors, grads):
            g = np.asarray(g, dtype=np.float64)
            theta = p.numpy()
            w, n = _norm(theta), _norm(g)
            if w != 0 and n != 0:
                ratio = self.trust_coefficient * w / (n + w * weight_decay + self.eps)
                if self.clip:
                    ratio = min(ratio / lr, 1.0)
                g = ratio * (g + weight_decay * theta)
            p.grad = torch.tensor(g, dtype=torch.float64)
        self.sgd.step()
        group["weight_decay"] = weight_decay
