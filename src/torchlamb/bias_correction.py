r"""Adam's bias corrections, as every path of :class:`~torchlamb.Lamb` computes them (a leaf: imports nothing of ours).

The moments start at 0, so after t steps :math:`m_t` is :math:`(1-\beta_1^t)` times the average it estimates, and
:math:`v_t` is :math:`(1-\beta_2^t)` times its own (Kingma & Ba, 2015). A ``bias_correction`` mode says where
those factors go:

- ``True``: inside the direction, :math:`u = \hat m / (\sqrt{\hat v} + \epsilon)` with
  :math:`\hat m = m/(1-\beta_1^t)`, :math:`\hat v = v/(1-\beta_2^t)` (the LAMB paper).
- ``False``: nowhere, :math:`u = m / (\sqrt v + \epsilon)`.
- ``"step_size"``: on the step, outside the ratio: θ moves by :math:`\sqrt{1-\beta_2^t}/(1-\beta_1^t)` times
  :math:`r u` (DeepSpeed's LAMB).
- ``"step_size_first_moment"``: on the step, :math:`1/(1-\beta_1^t)` only (pytorch_optimizer's LAMB).

The Python paths, the Triton kernels and the C++ kernels (which get the mode as one of the ``CODES`` below) all
take the corrections from here.
"""

from __future__ import annotations

from typing import Literal, Union

import torch
from torch import Tensor

BiasCorrection = Union[bool, Literal["step_size", "step_size_first_moment"]]
STEP_SIZE_MODES = ("step_size", "step_size_first_moment")

# The modes as the C++ kernels take them (enum BiasCorrection in kernels/csrc): the values are a contract.
NONE, INSIDE, STEP_SIZE, STEP_SIZE_FIRST_MOMENT = 0, 1, 2, 3
CODES = {False: NONE, True: INSIDE, "step_size": STEP_SIZE, "step_size_first_moment": STEP_SIZE_FIRST_MOMENT}


def step_count(step: Tensor) -> Tensor:
    """The step count t for the corrections: float64 where the device has it (1 − β^t in float32 loses digits:
    1 − 0.999 keeps 4), and at least 1: a step skipped on the device leaves a first step's count at 0, where
    1 − β^0 = 0 would make 0/0 = NaN, which no step weight of 0 can cancel."""
    return (step if step.device.type == "mps" else step.to(torch.float64)).clamp(min=1)


def moment_corrections(beta1: float, beta2: float, t: Tensor) -> tuple[Tensor, Tensor]:
    """(1 − β1^t, 1 − β2^t) for the step counts ``t`` (from :func:`step_count`): m̂ = m / the first, v̂ = v / the
    second."""
    return 1 - beta1**t, 1 - beta2**t


def step_size_factor(bias_correction: BiasCorrection, beta1: float, beta2: float, step: Tensor) -> Tensor | None:
    """The factor bias correction puts on the step, outside the ratio, in the step-size modes (else None)."""
    if bias_correction == "step_size":
        first, second = moment_corrections(beta1, beta2, step_count(step))
        return second.sqrt() / first
    if bias_correction == "step_size_first_moment":
        return 1 / moment_corrections(beta1, beta2, step_count(step))[0]
    return None
