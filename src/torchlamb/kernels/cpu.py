"""The fused CPU steps of LAMB and LARS: two passes over each tensor instead of a dozen ``torch._foreach_*`` passes.

For each tensor, in C++ (csrc/ beside this file): pass 1 reads it once and accumulates the norms the trust ratio
needs; the trust stage (the rule of :func:`torchlamb.trust.trust_ratio`, re-stated in C++ and held to the same
values by the tests) turns them into the ratio r; pass 2 applies the update. Pass 2 walks each thread's range
backwards, so it starts on the elements pass 1 touched last, which are still in cache; step counts and bias
corrections are done in C++ too.

LAMB. Pass 1 updates the moments in place and sums ‖θ‖² and ‖u‖², u = (m/(1−β1^t)) / (√v/√(1−β2^t) + ε) + λθ,
without storing u. Pass 2 recomputes u from θ, m and v — the same arithmetic, so the same values — and applies
θ ← θ − lr·r·u. That reads θ, g, m, v and writes m, v, then reads θ, m, v and writes θ: at most 40 bytes per float32
element from memory, against 28 for AdamW.

LARS. Pass 1 reads θ and g for ‖θ‖², ‖g‖² and ‖g + λθ‖²; pass 2 updates the momentum buffer and θ: 28 bytes per
element, as AdamW.

Neither pass allocates a full-size temporary: writing into fresh memory costs page faults that run several times
slower than the arithmetic, which is what makes the foreach paths slow on the CPU. Large tensors are split across
threads; small ones are processed whole, several tensors at once, so per-tensor overhead stays near a microsecond.

The kernels are C++ compiled at first use with ``torch.utils.cpp_extension.load_inline`` (ninja, gcc; about 30 s,
announced on stderr with its duration) and cached by torch across processes. When they cannot be built,
:func:`load` warns once and returns None, and the optimizers fall back to their foreach paths.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..bias_correction import CODES as BIAS_CORRECTION_CODES
from ..quantized import BLOCK, QuantizedKey, row_length
from ..trust import LAMB_MASKED_CROSS, LAMB_UPDATE, PendingUpdate, cautious_update

log = logging.getLogger(__name__)

# The kernels' C++ sources, in csrc/ beside this file (shipped in the wheel as package data), joined in this order
# into one translation unit: each file uses what the ones before it define. They are joined here, not #included, as
# load_inline rebuilds only when the text it is given changes. The #line markers make the compiler's messages name
# the files.
_SOURCE = "\n".join(f'#line 1 "csrc/{name}"\n' + (Path(__file__).parent / "csrc" / name).read_text()
                    for name in ("driver.cpp", "quantizer.cpp", "lamb.cpp", "lars.cpp", "testing.cpp"))


# -fopenmp: at::parallel_for is an OpenMP pragma in the header; without it the loops run on one thread.
# -fno-math-errno: std::sqrt may then be vectorised. The associative-math flags let the norms' sums vectorise;
# none of them assumes finite values, so NaN and Inf propagate as in the other paths. -march=native is safe because
# the kernel is built on the machine that runs it.
_CFLAGS = ["-O3", "-fopenmp", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
           "-fno-trapping-math"]


def _build_tag() -> str:
    """A short hash of this CPU's model and instruction-set flags and of the torch the kernels are built against.

    The kernels are built with -march=native, so a cache directory shared between machines must not hand one
    machine's build to another; and two environments with their own torch (different versions, or the same one at
    another path) would otherwise rebuild the one shared build back and forth, each with its own include paths.
    """
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        wanted = [line for line in cpuinfo if line.startswith(("model name", "flags", "Features"))][:2]
    except OSError:
        wanted = []
    torch_build = [torch.__version__, str(Path(torch.__file__).resolve().parent)]
    return hashlib.sha1("\n".join([platform.machine(), *wanted, *torch_build]).encode()).hexdigest()[:10]


@functools.cache
def load() -> Any | None:
    """The compiled kernels (built at first use, then cached by torch on disk), or None if they cannot be built.

    A build (about 30 s, once per machine and kernel version) is announced on stderr before it starts and timed
    when it ends, so that a first ``step()`` does not look hung; loading from torch's cache (~0.1 s) says nothing.
    The returned module has ``build_seconds``: how long loading took.
    """
    try:
        from torch.utils.cpp_extension import _get_build_directory, load_inline

        _put_ninja_on_path()
        name = f"torchlamb_fused_cpu_v17_{_build_tag()}"
        directory = Path(_get_build_directory(name, verbose=False))  # honours TORCH_EXTENSIONS_DIR, as load_inline
        before = _built_libraries(directory)
        if not before:
            _say(f"torchlamb: building the fused CPU kernels in {directory} (first use on this machine: about 30 s; "
                 "later runs load them from there)")
        start = time.perf_counter()
        module = load_inline(name, cpp_sources=_SOURCE,
                             functions=["lamb_step", "lars_step", "lamb_step_8bit", "lars_step_8bit", "quantize_8bit"],
                             extra_cflags=_CFLAGS,
                             extra_ldflags=["-fopenmp"], build_directory=str(directory), verbose=False)
        module.build_seconds = time.perf_counter() - start
        if _built_libraries(directory) != before:  # torch also rebuilds when the sources changed
            _say(f"torchlamb: fused CPU kernels built in {module.build_seconds:.1f} s")
        log.info("torchlamb: fused CPU kernels ready after %.1f s", module.build_seconds)
        return module
    except Exception as error:  # noqa: BLE001 - any build failure means: use the foreach path
        warnings.warn(f"torchlamb: the fused CPU kernels could not be built ({type(error).__name__}: {error}); "
                      "using the foreach implementation instead", RuntimeWarning, stacklevel=3)
        return None


def _put_ninja_on_path() -> None:
    """torch runs ``ninja`` from PATH; the ninja package (a dependency) installs it beside the environment's python,
    which is on PATH only in an activated environment. Add it when no ninja is found."""
    if shutil.which("ninja") is None:
        with contextlib.suppress(ImportError):
            import ninja

            os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])


def _built_libraries(directory: Path) -> dict[str, int]:
    """The shared libraries in a build directory and their modification times (ns): a build changes them."""
    return {path.name: path.stat().st_mtime_ns for path in directory.glob("*.so")}


def _say(message: str) -> None:
    """A message a user must see (logging.INFO is not shown by default): stderr, at once."""
    print(message, file=sys.stderr, flush=True)
    log.info(message)


def supports(tensors: list[Tensor]) -> bool:
    """Whether the fused kernels can take these tensors: dense, contiguous, on the CPU."""
    return all(t.is_cpu and t.layout == torch.strided and t.is_contiguous() for t in tensors)


def _gradient_multiplier(maximize: bool, grad_factor: Tensor | None) -> float:
    """The number the kernels multiply each gradient by: −1 to maximize, times the global clip factor.
    Reading a CPU tensor's value is not a device synchronisation."""
    return (-1.0 if maximize else 1.0) * (1.0 if grad_factor is None else float(grad_factor))


def _trust_arguments(adapt: bool, weight_norm_clip: Any, trust_clip: Any, trust_eps: float,
                     trust_coefficient: float | None = None) -> list[Any]:
    """:func:`torchlamb.trust.trust_ratio`'s options as the kernels take them: no clip is the range (−∞, ∞)."""
    unbounded = (-math.inf, math.inf)
    weight_lo, weight_hi = weight_norm_clip or unbounded
    ratio_lo, ratio_hi = trust_clip or unbounded
    numbers = [float(x) for x in (weight_lo, weight_hi, ratio_lo, ratio_hi)]
    coefficient = [] if trust_coefficient is None else [float(trust_coefficient)]
    return [adapt, *numbers, *coefficient, float(trust_eps)]


def _lars_trust_arguments(larc_lr: float | Tensor | None = None, larc_clips_fallback: bool = True,
                          **trust_options: Any) -> list[Any]:
    """Lars's trust options as its kernels take them: trust_ratio's, then larc_clip (on when ``larc_lr`` is given),
    the lr it divides by and whether it clips the fallback ratio too. Reading a CPU tensor lr's value is not a device
    synchronisation."""
    return [*_trust_arguments(**trust_options), larc_lr is not None, 0.0 if larc_lr is None else float(larc_lr),
            bool(larc_clips_fallback)]


# The kernels' phases (enum Phase in the C++ source): a whole step, or pass 1 and pass 2 of a sharded one. A kernel
# returns a list of tensors: for _WHOLE ‖θ‖, the ratio's denominator and r per tensor, in the dtype the other paths
# give them (trust.norm_dtype); for _NORMS pass 1's float64 sums of squares [n, columns]; for _APPLY nothing.
_WHOLE, _NORMS, _APPLY = 0, 1, 2
_NO_RATIOS = torch.empty(0, dtype=torch.float64)
# Pass 1 of LAMB fills the first two of its sums' three columns: torchlamb.trust's WEIGHT and LAMB_UPDATE; with
# caution four: those, LAMB_MASK_COUNT and LAMB_MASKED_CROSS (the number of elements, LAMB_NUMEL, is added here).
_LAMB_COLUMNS = LAMB_UPDATE + 1
_CAUTIOUS_COLUMNS = LAMB_MASKED_CROSS + 1
_NO_TRUST = dict(adapt=True, weight_norm_clip=None, trust_clip=None, trust_eps=0.0)  # unused outside _WHOLE


def _lamb(phase: int, ratios: Tensor, params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
          exp_avg_sqs: list[Tensor], steps: list[Tensor], *, lr: float | Tensor, beta1: float, beta2: float,
          eps: float, weight_decay: float, bias_correction: Any, decay_outside_ratio: bool, maximize: bool,
          grad_factor: Tensor | None, trust_options: dict[str, Any], caution: bool = False,
          decay_after_step: bool = False, decay_lr: float | Tensor | None = None) -> list[Tensor]:
    return load().lamb_step(
        params, grads, exp_avgs, exp_avg_sqs, steps, float(lr), beta1, beta2, eps, weight_decay,
        BIAS_CORRECTION_CODES[bias_correction], decay_outside_ratio, _gradient_multiplier(maximize, grad_factor),
        *_trust_arguments(**{"trust_coefficient": 1.0, **trust_options}), phase, ratios, caution, decay_after_step,
        float(lr if decay_lr is None else decay_lr))


def _lars(phase: int, ratios: Tensor, params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor],
          steps: list[Tensor], *, lr: float | Tensor, momentum: float, weight_decay: float, nesterov: bool,
          split_denominator: bool, lr_inside_momentum: bool, dampening: float, fallback_on_grad: bool,
          maximize: bool, grad_factor: Tensor | None, trust_options: dict[str, Any]) -> list[Tensor]:
    return load().lars_step(
        params, grads, momentum_buffers, steps, float(lr), momentum, weight_decay, nesterov, split_denominator,
        lr_inside_momentum, float(dampening), fallback_on_grad, _gradient_multiplier(maximize, grad_factor),
        *_lars_trust_arguments(**trust_options), phase, ratios)


def _two_passes(run: Callable[..., list[Tensor]], columns: int | None, params: list[Tensor], grads: list[Tensor],
                *arguments: Any, step_weight: Tensor | None, trust_options: dict[str, Any],
                **options: Any) -> PendingUpdate:
    """Pass 1 (this process's sums of squares, the first ``columns`` of the kernel's result, all if None) now, and
    pass 2 as the PendingUpdate's ``apply``: for sharded tensors, whose sums are all-reduced in between. A skipped
    step never gets here: on the CPU the optimizer reads the skip flag and returns (no ``step_weight``)."""
    assert step_weight is None, "the fused kernels do not take a step weight"
    (squares,) = run(_NORMS, _NO_RATIOS, params, grads, *arguments, **options, trust_options=trust_options)
    return PendingUpdate(squares[:, :columns],
                         lambda ratio: run(_APPLY, ratio.to(torch.float64).contiguous(), params, grads, *arguments,
                                           **options, trust_options=trust_options))


def lamb_whole_step(params: list[Tensor], grads: list[Tensor], *states: list[Tensor],
                    **options: Any) -> tuple[Tensor, Tensor, Tensor]:
    """A whole Lamb step in one call (``states``: exp_avgs, exp_avg_sqs, steps); returns ‖θ‖, ‖u‖ and r."""
    weight_norm, update_norm, ratio = _lamb(_WHOLE, _NO_RATIOS, params, grads, *states, **options)
    return weight_norm, update_norm, ratio


def lars_whole_step(params: list[Tensor], grads: list[Tensor], *states: list[Tensor],
                    **options: Any) -> tuple[Tensor, Tensor, Tensor]:
    """A whole Lars step in one call (``states``: momentum_buffers, steps); returns ‖θ‖, the denominator and r."""
    weight_norm, denominator, ratio = _lars(_WHOLE, _NO_RATIOS, params, grads, *states, **options)
    return weight_norm, denominator, ratio


def _lamb_two_passes(run: Callable[..., list[Tensor]], params: list[Tensor], grads: list[Tensor], *arguments: Any,
                     step_weight: Tensor | None, **options: Any) -> PendingUpdate:
    """Lamb's pass 1 now and pass 2 as ``apply``; with caution, the columns of torchlamb.trust.cautious_update
    (the number of elements added to the kernels' four) and pass 2 given the factors k after the ratios."""
    if not options.get("caution"):
        return _two_passes(run, _LAMB_COLUMNS, params, grads, *arguments, step_weight=step_weight,
                           trust_options=_NO_TRUST, **options)
    kernel = _two_passes(run, _CAUTIOUS_COLUMNS, params, grads, *arguments, step_weight=step_weight,
                         trust_options=_NO_TRUST, **options)
    numels = torch.tensor([[float(p.numel())] for p in params], dtype=torch.float64)
    decay = 0.0 if options["decay_outside_ratio"] or options.get("decay_after_step") else options["weight_decay"]
    return cautious_update(torch.cat([kernel.squares, numels], 1),
                           lambda ratio, scale: kernel.apply(torch.cat([ratio.double(), scale.double()])), decay)


def lamb_first_pass(params: list[Tensor], grads: list[Tensor], *states: list[Tensor],
                    step_weight: Tensor | None = None, **options: Any) -> PendingUpdate:
    """Lamb's pass 1 (moments, local ‖θ‖², ‖u‖²), with pass 2 as ``apply``, for sharded tensors."""
    return _lamb_two_passes(_lamb, params, grads, *states, step_weight=step_weight, **options)


def lars_first_pass(params: list[Tensor], grads: list[Tensor], *states: list[Tensor],
                    step_weight: Tensor | None = None, **options: Any) -> PendingUpdate:
    """Lars's pass 1 (local ‖θ‖², ‖g‖², ‖g + λθ‖²), with pass 2 as ``apply``, for sharded tensors."""
    return _two_passes(_lars, None, params, grads, *states, step_weight=step_weight,
                       trust_options={**_NO_TRUST, "trust_coefficient": 1.0}, **options)


# -- 8-bit state (torchlamb.quantized) ----------------------------------------------------------------------------
# Pass 1 dequantizes each block's codes, updates the values in float32, stores the block's new codes and absmax and
# sums ‖u‖² with u from the values as stored; pass 2 recomputes u from the codes. Threads take whole blocks, laid
# out within each tensor's rows (torchlamb.quantized.absmax_shape): the kernels get each tensor's row length.


def _tables(*stored: QuantizedKey) -> list[Tensor]:
    """The code maps the kernels read (values and entries for each), in the order of ``stored``."""
    assert BLOCK == 256, "the fused kernels quantize blocks of 256 values (kQuantBlock)"
    return [table for s in stored for table in (s.code.values, s.code.entries)]


def _row_lengths(params: list[Tensor]) -> list[int]:
    return [row_length(p.shape) for p in params]


def _codes(states: list[dict[str, Tensor]], stored: QuantizedKey) -> tuple[list[Tensor], list[Tensor]]:
    return [state[stored.codes_key] for state in states], [state[stored.absmax_key] for state in states]


def _lamb_8bit(phase: int, ratios: Tensor, params: list[Tensor], grads: list[Tensor],
               states: list[dict[str, Tensor]], steps: list[Tensor], moments: tuple[QuantizedKey, QuantizedKey], *,
               lr: float | Tensor, beta1: float, beta2: float, eps: float, weight_decay: float, bias_correction: Any,
               decay_outside_ratio: bool, maximize: bool, grad_factor: Tensor | None,
               trust_options: dict[str, Any], caution: bool = False, decay_after_step: bool = False,
               decay_lr: float | Tensor | None = None) -> list[Tensor]:
    first, second = moments
    return load().lamb_step_8bit(
        params, grads, *_codes(states, first), *_codes(states, second), steps, _tables(first, second), float(lr),
        beta1, beta2, eps, weight_decay, BIAS_CORRECTION_CODES[bias_correction], decay_outside_ratio,
        _gradient_multiplier(maximize, grad_factor), *_trust_arguments(**{"trust_coefficient": 1.0, **trust_options}),
        phase, ratios, _row_lengths(params), caution, decay_after_step, float(lr if decay_lr is None else decay_lr))


def _lars_8bit(phase: int, ratios: Tensor, params: list[Tensor], grads: list[Tensor],
               states: list[dict[str, Tensor]], steps: list[Tensor], buffer: QuantizedKey, *, lr: float | Tensor,
               momentum: float, weight_decay: float, nesterov: bool, split_denominator: bool,
               lr_inside_momentum: bool, dampening: float, fallback_on_grad: bool, maximize: bool,
               grad_factor: Tensor | None, trust_options: dict[str, Any]) -> list[Tensor]:
    return load().lars_step_8bit(
        params, grads, *_codes(states, buffer), steps, _tables(buffer), float(lr), momentum, weight_decay, nesterov,
        split_denominator, lr_inside_momentum, float(dampening), fallback_on_grad,
        _gradient_multiplier(maximize, grad_factor), *_lars_trust_arguments(**trust_options), phase, ratios,
        _row_lengths(params))


def lamb_whole_step_8bit(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]],
                         steps: list[Tensor], moments: tuple[QuantizedKey, QuantizedKey],
                         **options: Any) -> tuple[Tensor, Tensor, Tensor]:
    """A whole Lamb step on 8-bit moments (``moments``: how m and v are stored); returns ‖θ‖, ‖u‖ and r."""
    weight_norm, update_norm, ratio = _lamb_8bit(_WHOLE, _NO_RATIOS, params, grads, states, steps, moments,
                                                 **options)
    return weight_norm, update_norm, ratio


def lars_whole_step_8bit(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]],
                         steps: list[Tensor], buffer: QuantizedKey, **options: Any) -> tuple[Tensor, Tensor, Tensor]:
    """A whole Lars step on an 8-bit momentum buffer; returns ‖θ‖, the denominator and r."""
    weight_norm, denominator, ratio = _lars_8bit(_WHOLE, _NO_RATIOS, params, grads, states, steps, buffer,
                                                 **options)
    return weight_norm, denominator, ratio


def lamb_first_pass_8bit(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]],
                         steps: list[Tensor], moments: tuple[QuantizedKey, QuantizedKey],
                         step_weight: Tensor | None = None, **options: Any) -> PendingUpdate:
    """Lamb's pass 1 on 8-bit moments (local ‖θ‖², ‖u‖²), with pass 2 as ``apply``, for sharded tensors."""
    return _lamb_two_passes(_lamb_8bit, params, grads, states, steps, moments, step_weight=step_weight, **options)


def lars_first_pass_8bit(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]],
                         steps: list[Tensor], buffer: QuantizedKey, step_weight: Tensor | None = None,
                         **options: Any) -> PendingUpdate:
    """Lars's pass 1 (local ‖θ‖², ‖g‖², ‖g + λθ‖²), with pass 2 on the 8-bit buffer as ``apply``, for sharded
    tensors."""
    return _two_passes(_lars_8bit, None, params, grads, states, steps, buffer, step_weight=step_weight,
                       trust_options={**_NO_TRUST, "trust_coefficient": 1.0}, **options)
