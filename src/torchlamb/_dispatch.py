"""Which implementation computes a group's update, and the path table that maps it to functions.

Each optimizer has one path table (``_PATHS`` in lamb.py, lars.py): for each implementation and storage (float or
8-bit state) the function that computes a group's update up to the trust stage and, for the fused CPU kernels, the
one that runs a whole step of unsharded tensors, trust stage included. :func:`choose_implementation` picks the
implementation, as torch's ``adam()`` picks among ``_single_tensor_adam``, ``_multi_tensor_adam`` and
``_fused_adam``; ``LayerwiseOptimizer`` looks it up in the table and calls it.

Every first-pass function takes ``(params, grads, *states, steps, **options, grad_factor=, step_weight=)`` and
returns a :class:`~torchlamb.trust.PendingUpdate`; ``states`` are the optimizer's state lists (``_state_keys``) for
float state, or one list of each parameter's state dict for 8-bit state. Triton's also take ``copies`` (see
``writes_copies``). A whole-step function takes the same but ``trust_options`` instead of ``step_weight`` and returns
(‖θ‖, the ratio's denominator, r) per tensor.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from . import kernels
from .kernels import cpu as cpu_kernels
from .trust import PendingUpdate

# How a group's update runs: a Python loop over tensors, torch._foreach_* ops, the fused CPU kernels, or Triton's.
Implementation = Literal["single_tensor", "foreach", "fused", "triton"]
# Device types the Triton kernels take (the tests add "cpu", to run them in Triton's interpreter).
TRITON_DEVICE_TYPES: tuple[str, ...] = ("cuda",)


@dataclass(frozen=True)
class Path:
    """The functions of one implementation and storage.

    ``state_as_stored``: the functions read and write bfloat16/float16 state of float32 tensors in place (else they
    get working copies in the computing dtype). ``writes_copies``: pass 2 also writes each low-precision parameter
    from its float32 master, and takes them as ``copies``.
    """

    first_pass: Callable[..., PendingUpdate]
    whole_step: Callable[..., tuple[Tensor, Tensor, Tensor]] | None = None
    state_as_stored: bool = False
    writes_copies: bool = False


PathTable = dict[tuple[Implementation, bool], Path]  # (implementation, 8-bit state) -> its functions


def path_table(name: str, single_tensor: Callable[..., PendingUpdate], multi_tensor: Callable[..., PendingUpdate],
               quantized: Callable[..., PendingUpdate], **quantized_keys: Any) -> PathTable:
    """The path table of optimizer ``name`` ("lamb", "lars"): its torch functions for float state (a loop over
    tensors, foreach ops) and for 8-bit state (one for both), and the kernels' functions, found by name in
    torchlamb.kernels' ``cpu`` and ``triton_steps``: ``{name}_first_pass`` and, on the CPU, ``{name}_whole_step``,
    with an ``_8bit`` form of each. The 8-bit functions get ``quantized_keys``: how the state is kept in 8 bits."""
    def kernel(module: str, function: str, eight_bit: bool) -> Callable[..., Any]:
        found = kernels.entry(module, f"{name}_{function}{'_8bit' if eight_bit else ''}")
        return functools.partial(found, **quantized_keys) if eight_bit else found

    quantized_state = functools.partial(quantized, **quantized_keys)
    return {
        ("single_tensor", False): Path(single_tensor),
        ("foreach", False): Path(multi_tensor),
        ("fused", False): Path(kernel("cpu", "first_pass", False), whole_step=kernel("cpu", "whole_step", False),
                               state_as_stored=True),
        ("triton", False): Path(kernel("triton", "first_pass", False), state_as_stored=True, writes_copies=True),
        ("single_tensor", True): Path(quantized_state),
        ("foreach", True): Path(quantized_state),
        ("fused", True): Path(kernel("cpu", "first_pass", True), whole_step=kernel("cpu", "whole_step", True)),
        ("triton", True): Path(kernel("triton", "first_pass", True), writes_copies=True),
    }


def choose_implementation(optimizer_name: str, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                          step_weight: Tensor | None = None, fused_possible: bool = True,
                          warned: set[str] | None = None) -> Implementation:
    """fused=True, or fused and foreach both None: the fused kernels where they apply (Triton on CUDA tensors it
    takes; on the CPU dense contiguous tensors, kernels built, no step weight, state in a dtype they read); else
    foreach=None picks foreach when all tensors share a device. Under torch.compile: foreach (single-tensor if
    foreach=False). ``warned`` collects the warnings given once per optimizer."""
    fused, foreach = group["fused"], group["foreach"]
    if torch.compiler.is_compiling():
        # The C++ kernels are opaque to torch.compile (a graph break); the compiler fuses the foreach path itself.
        return "foreach" if foreach is not False else "single_tensor"
    if _triton_takes(optimizer_name, fused, foreach, params, fused_possible):
        return "triton"
    if (fused or (fused is None and foreach is None)) and step_weight is None and fused_possible:
        # Checking the parameters suffices: the state has their layout (see load_state_dict), and the fused
        # step makes gradients contiguous where they are not.
        if cpu_kernels.supports(params) and cpu_kernels.load() is not None:
            return "fused"
        if fused:
            if not cpu_kernels.supports(params) and warned is not None and "fused" not in warned:
                warned.add("fused")
                warnings.warn(f"{optimizer_name}(fused=True) runs on dense contiguous CPU tensors only; "
                              "using the foreach implementation", RuntimeWarning, stacklevel=4)
            return "foreach"
    if foreach is None:
        foreach = len({t.device for t in params + grads}) == 1 and not torch.jit.is_scripting()
    return "foreach" if foreach else "single_tensor"


def _triton_takes(optimizer_name: str, fused: bool | None, foreach: bool | None, params: list[Tensor],
                  fused_possible: bool) -> bool:
    """fused=True, or fused and foreach both None, on CUDA tensors the kernels take: the Triton kernels.
    fused=True on CUDA without triton is an error that names what to install."""
    device_type = params[0].device.type if params else "cpu"
    wanted = fused or (fused is None and foreach is None)
    if not (device_type in TRITON_DEVICE_TYPES and wanted and fused_possible):
        return False
    module = kernels.triton_module()
    if module is None:
        if fused:
            raise RuntimeError(f"{optimizer_name}(fused=True) on CUDA runs Triton kernels, and triton does not "
                               "import here: pip install 'torchlamb[gpu]' (or foreach=True)")
        return False
    return module.supports(params)
