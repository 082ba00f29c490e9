"""The fused CPU steps of LAMB and LARS: two passes over memory instead of a dozen ``torch._foreach_*`` passes.

LAMB. Pass 1, per tensor, in one sweep: update the moments in place and accumulate ‖θ‖² and ‖u‖², where
u = (m/(1−β1^t)) / (√v/√(1−β2^t) + ε) + λθ, without storing u. Between the passes the trust stage
(:func:`torchlamb.trust.trust_ratio`, the same code every path uses) turns the norms into ratios. Pass 2 recomputes
u from θ, m and v — the same arithmetic, so the same values — and applies θ ← θ + scale·u with scale = −lr·r.
That reads θ, g, m, v and writes m, v, then reads θ, m, v and writes θ: about 40 bytes per float32 element,
against 28 for AdamW.

LARS. Pass 1 reads θ and g for ‖θ‖², ‖g‖² and ‖g + λθ‖²; pass 2 updates the momentum buffer and θ: 28 bytes per
element, as AdamW.

Neither pass allocates a full-size temporary: writing into fresh memory costs page faults that run several times
slower than the arithmetic, which is what makes the foreach paths slow on the CPU. Large tensors are split across
threads; small ones are processed whole, several tensors at once, so per-tensor overhead stays at ~1 µs.

The kernels are C++ compiled at first use with ``torch.utils.cpp_extension.load_inline`` (ninja, gcc; about 30 s)
and cached by torch across processes. When they cannot be built, :func:`kernels` warns once and returns None, and
the optimizers fall back to their foreach paths.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .trust import trust_ratio

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

namespace {
// Tensors of at least kGrain elements are split across threads; smaller ones run whole, several at once.
constexpr int64_t kGrain = 32768;
// Norms are summed in the compute type over blocks of kBlock elements (those sums vectorise), blocks in double.
constexpr int64_t kBlock = 1024;

using Sums = std::array<double, 3>;

Sums add(const Sums& a, const Sums& b) { return {a[0] + b[0], a[1] + b[1], a[2] + b[2]}; }

// Calls range(i, begin, end) -> Sums over every element of every tensor and returns the per-tensor totals as an
// [n, 3] float64 tensor. The range functions take raw __restrict__ pointers as arguments: captured by reference
// in a lambda, the pointers would be reloaded after every store and the loops would not vectorise.
template <typename Range>
torch::Tensor over_tensors(const std::vector<torch::Tensor>& params, const Range& range) {
  const int64_t n = static_cast<int64_t>(params.size());
  auto sums = torch::zeros({n, 3}, torch::kFloat64);
  double* out = sums.data_ptr<double>();
  std::vector<int64_t> small;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t numel = params[i].numel();
    if (numel < kGrain) {
      small.push_back(i);
      continue;
    }
    const Sums total = at::parallel_reduce(
        0, numel, kGrain, Sums{0, 0, 0},
        [&](int64_t begin, int64_t end, Sums acc) { return add(acc, range(i, begin, end)); }, add);
    std::copy(total.begin(), total.end(), out + 3 * i);
  }
  at::parallel_for(0, static_cast<int64_t>(small.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t i = small[j];
      const Sums total = range(i, 0, params[i].numel());
      std::copy(total.begin(), total.end(), out + 3 * i);
    }
  });
  return sums;
}

template <typename T>
T* ptr(const torch::Tensor& t, int64_t offset) { return t.data_ptr<T>() + offset; }

// ---- LAMB ----------------------------------------------------------------------------------------------------
struct LambArgs {
  double grad_scale, beta1, beta2, eps, decay_in_update, theta_factor;
};

// u = (m·c1) / (√v·c2 + ε) + decay·θ ; c1 = 1/(1−β1^t), c2 = 1/√(1−β2^t) (or 1, 1 without bias correction).
template <typename T>
inline T lamb_direction(T m, T v, T theta, T c1, T c2, T eps, T decay) {
  return (m * c1) / (std::sqrt(v) * c2 + eps) + decay * theta;
}

// Pass 1 on elements [0, n): moments in place (θ ← θ·theta_factor first when decay is outside the ratio);
// returns ‖θ‖², ‖u‖² of the range.
template <typename T>
Sums lamb_moments(T* __restrict__ theta, const T* __restrict__ g, T* __restrict__ m, T* __restrict__ v,
                  int64_t n, const LambArgs& a, double c1_, double c2_) {
  using opmath_t = at::opmath_type<T>;
  // 1 − β in double first: 1 − 0.999f in float32 is off by 1.3e-5, which shifts v and u by ~7e-6.
  const opmath_t one_minus_b1 = 1.0 - a.beta1, one_minus_b2 = 1.0 - a.beta2, b2 = a.beta2;
  const opmath_t c1 = c1_, c2 = c2_, eps = a.eps, decay = a.decay_in_update, scale = a.grad_scale;
  const opmath_t factor = a.theta_factor;
  const bool rescale_theta = a.theta_factor != 1.0;
  Sums sums{0, 0, 0};
  for (int64_t block = 0; block < n; block += kBlock) {
    const int64_t end = std::min(n, block + kBlock);
    if (rescale_theta) {
      for (int64_t k = block; k < end; ++k) theta[k] = static_cast<T>(static_cast<opmath_t>(theta[k]) * factor);
    }
    opmath_t theta_sq = 0, u_sq = 0;
    for (int64_t k = block; k < end; ++k) {
      const opmath_t t = static_cast<opmath_t>(theta[k]);
      const opmath_t grad = static_cast<opmath_t>(g[k]) * scale;
      const opmath_t m_old = static_cast<opmath_t>(m[k]);
      // The moments are rounded to their storage type before use, as the other paths do.
      const T m_new = static_cast<T>(m_old + one_minus_b1 * (grad - m_old));
      const T v_new = static_cast<T>(b2 * static_cast<opmath_t>(v[k]) + one_minus_b2 * grad * grad);
      m[k] = m_new;
      v[k] = v_new;
      const opmath_t u = lamb_direction<opmath_t>(m_new, v_new, t, c1, c2, eps, decay);
      theta_sq += t * t;
      u_sq += u * u;
    }
    sums[0] += theta_sq;
    sums[1] += u_sq;
  }
  return sums;
}

// Pass 2 on elements [0, n): θ ← θ + scale·u, u recomputed exactly as in pass 1.
template <typename T>
void lamb_apply(T* __restrict__ theta, const T* __restrict__ m, const T* __restrict__ v, int64_t n,
                const LambArgs& a, double c1_, double c2_, double scale_) {
  using opmath_t = at::opmath_type<T>;
  const opmath_t c1 = c1_, c2 = c2_, eps = a.eps, decay = a.decay_in_update, scale = scale_;
  for (int64_t k = 0; k < n; ++k) {
    const opmath_t t = static_cast<opmath_t>(theta[k]);
    const opmath_t u = lamb_direction<opmath_t>(m[k], v[k], t, c1, c2, eps, decay);
    theta[k] = static_cast<T>(t + scale * u);
  }
}

// ---- LARS ----------------------------------------------------------------------------------------------------
struct LarsArgs {
  double grad_scale, weight_decay, momentum;
  bool nesterov;
};

// Pass 1 on elements [0, n): ‖θ‖², ‖g‖², ‖g + λθ‖² of the range (g already scaled). Reads only.
template <typename T>
Sums lars_norms(const T* __restrict__ theta, const T* __restrict__ g, int64_t n, const LarsArgs& a) {
  using opmath_t = at::opmath_type<T>;
  const opmath_t scale = a.grad_scale, decay = a.weight_decay;
  Sums sums{0, 0, 0};
  for (int64_t block = 0; block < n; block += kBlock) {
    const int64_t end = std::min(n, block + kBlock);
    opmath_t theta_sq = 0, g_sq = 0, u_sq = 0;
    for (int64_t k = block; k < end; ++k) {
      const opmath_t t = static_cast<opmath_t>(theta[k]);
      const opmath_t grad = static_cast<opmath_t>(g[k]) * scale;
      const opmath_t u = grad + decay * t;
      theta_sq += t * t;
      g_sq += grad * grad;
      u_sq += u * u;
    }
    sums[0] += theta_sq;
    sums[1] += g_sq;
    sums[2] += u_sq;
  }
  return sums;
}

// Pass 2 on elements [0, n): b ← μb + r·u, θ ← θ − lr·(b, or r·u + μb with Nesterov).
template <typename T>
void lars_apply(T* __restrict__ theta, const T* __restrict__ g, T* __restrict__ b, int64_t n, const LarsArgs& a,
                double ratio_, double lr_) {
  using opmath_t = at::opmath_type<T>;
  const opmath_t scale = a.grad_scale, decay = a.weight_decay, mu = a.momentum, ratio = ratio_, lr = lr_;
  const bool nesterov = a.nesterov;
  for (int64_t k = 0; k < n; ++k) {
    const opmath_t t = static_cast<opmath_t>(theta[k]);
    const opmath_t scaled = (static_cast<opmath_t>(g[k]) * scale + decay * t) * ratio;
    const T b_new = static_cast<T>(mu * static_cast<opmath_t>(b[k]) + scaled);
    b[k] = b_new;
    const opmath_t direction = nesterov ? scaled + mu * static_cast<opmath_t>(b_new) : static_cast<opmath_t>(b_new);
    theta[k] = static_cast<T>(t - lr * direction);
  }
}

#define TORCHLAMB_DISPATCH(tensor, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (tensor).scalar_type(), name, __VA_ARGS__)
}  // namespace

// Returns [n, 3] float64: ‖θ‖², ‖u‖², 0 per tensor.
torch::Tensor lamb_pass1(std::vector<torch::Tensor> params, std::vector<torch::Tensor> grads,
                         std::vector<torch::Tensor> exp_avgs, std::vector<torch::Tensor> exp_avg_sqs,
                         torch::Tensor c1s, torch::Tensor c2s, double grad_scale, double beta1, double beta2,
                         double eps, double decay_in_update, double theta_factor) {
  const LambArgs args{grad_scale, beta1, beta2, eps, decay_in_update, theta_factor};
  const double* c1 = c1s.data_ptr<double>();
  const double* c2 = c2s.data_ptr<double>();
  return over_tensors(params, [&](int64_t i, int64_t begin, int64_t end) {
    Sums sums;
    TORCHLAMB_DISPATCH(params[i], "lamb_pass1", [&] {
      sums = lamb_moments<scalar_t>(ptr<scalar_t>(params[i], begin), ptr<scalar_t>(grads[i], begin),
                                    ptr<scalar_t>(exp_avgs[i], begin), ptr<scalar_t>(exp_avg_sqs[i], begin),
                                    end - begin, args, c1[i], c2[i]);
    });
    return sums;
  });
}

void lamb_pass2(std::vector<torch::Tensor> params, std::vector<torch::Tensor> exp_avgs,
                std::vector<torch::Tensor> exp_avg_sqs, torch::Tensor c1s, torch::Tensor c2s, torch::Tensor scales,
                double eps, double decay_in_update) {
  const LambArgs args{1.0, 0.0, 0.0, eps, decay_in_update, 1.0};
  const double* c1 = c1s.data_ptr<double>();
  const double* c2 = c2s.data_ptr<double>();
  const double* scale = scales.data_ptr<double>();
  over_tensors(params, [&](int64_t i, int64_t begin, int64_t end) {
    TORCHLAMB_DISPATCH(params[i], "lamb_pass2", [&] {
      lamb_apply<scalar_t>(ptr<scalar_t>(params[i], begin), ptr<scalar_t>(exp_avgs[i], begin),
                           ptr<scalar_t>(exp_avg_sqs[i], begin), end - begin, args, c1[i], c2[i], scale[i]);
    });
    return Sums{0, 0, 0};
  });
}

// Returns [n, 3] float64: ‖θ‖², ‖g‖², ‖g + λθ‖² per tensor.
torch::Tensor lars_pass1(std::vector<torch::Tensor> params, std::vector<torch::Tensor> grads, double grad_scale,
                         double weight_decay) {
  const LarsArgs args{grad_scale, weight_decay, 0.0, false};
  return over_tensors(params, [&](int64_t i, int64_t begin, int64_t end) {
    Sums sums;
    TORCHLAMB_DISPATCH(params[i], "lars_pass1", [&] {
      sums = lars_norms<scalar_t>(ptr<scalar_t>(params[i], begin), ptr<scalar_t>(grads[i], begin), end - begin,
                                  args);
    });
    return sums;
  });
}

void lars_pass2(std::vector<torch::Tensor> params, std::vector<torch::Tensor> grads,
                std::vector<torch::Tensor> momentum_buffers, torch::Tensor ratios, double lr, double grad_scale,
                double weight_decay, double momentum, bool nesterov) {
  const LarsArgs args{grad_scale, weight_decay, momentum, nesterov};
  const double* ratio = ratios.data_ptr<double>();
  over_tensors(params, [&](int64_t i, int64_t begin, int64_t end) {
    TORCHLAMB_DISPATCH(params[i], "lars_pass2", [&] {
      lars_apply<scalar_t>(ptr<scalar_t>(params[i], begin), ptr<scalar_t>(grads[i], begin),
                           ptr<scalar_t>(momentum_buffers[i], begin), end - begin, args, ratio[i], lr);
    });
    return Sums{0, 0, 0};
  });
}
"""


# -fopenmp: at::parallel_for is an OpenMP pragma in the header; without it the loops run on one thread.
# -fno-math-errno: std::sqrt may then be vectorised. The associative-math flags let the norms' sums vectorise;
# none of them assumes finite values, so NaN and Inf propagate as in the other paths. -march=native is safe because
# the kernel is built on the machine that runs it.
_CFLAGS = ["-O3", "-fopenmp", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
           "-fno-trapping-math"]


def _machine_tag() -> str:
    """A short hash of this CPU's model and instruction-set flags: the kernels are built with -march=native, so a
    cache directory shared between different machines must not hand one machine's build to another."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        wanted = [line for line in cpuinfo if line.startswith(("model name", "flags", "Features"))][:2]
    except OSError:
        wanted = []
    return hashlib.sha1("\n".join([platform.machine(), *wanted]).encode()).hexdigest()[:10]


@functools.cache
def kernels() -> Any | None:
    """The compiled kernels (built at first use, then cached by torch on disk), or None if they cannot be built.

    The returned module has ``build_seconds``: how long loading took (about 30 s on a first build, ~0.1 s from
    torch's extension cache).
    """
    try:
        from torch.utils.cpp_extension import load_inline

        start = time.perf_counter()
        log.info("torchlamb: loading the fused CPU kernels (a first build takes about 30 s, then it is cached)")
        module = load_inline(f"torchlamb_fused_cpu_v7_{_machine_tag()}", cpp_sources=_SOURCE,
                             functions=["lamb_pass1", "lamb_pass2", "lars_pass1", "lars_pass2"],
                             extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"], verbose=False)
        module.build_seconds = time.perf_counter() - start
        log.info("torchlamb: fused CPU kernels ready after %.1f s", module.build_seconds)
        return module
    except Exception as error:  # noqa: BLE001 - any build failure means: use the foreach path
        warnings.warn(f"torchlamb: the fused CPU kernels could not be built ({type(error).__name__}: {error}); "
                      "using the foreach implementation instead", RuntimeWarning, stacklevel=3)
        return None


def supports(tensors: list[Tensor]) -> bool:
    """Whether the fused kernels can take these tensors: dense, contiguous, on the CPU."""
    return all(t.device.type == "cpu" and t.layout == torch.strided and t.is_contiguous() for t in tensors)


def _kernel_grads(params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
    """The gradients in their parameters' dtype and contiguous, as the kernels read them with the same index."""
    return [g if g.dtype == p.dtype and g.is_contiguous() else g.to(p.dtype).contiguous()
            for p, g in zip(params, grads)]


def _grad_factor(maximize: bool, grad_scale: Tensor | None) -> float:
    """The number the kernels multiply each gradient by: −1 to maximize, times the global clip factor.
    Reading a CPU tensor's value is not a device synchronisation."""
    return (-1.0 if maximize else 1.0) * (1.0 if grad_scale is None else float(grad_scale))


def _norms(sums: Tensor, params: list[Tensor]) -> Tensor:
    """√ of the kernels' float64 sums of squares, in the dtype the other paths give norms in."""
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    return sums.sqrt().to(dtype)


def fused_lamb(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
               steps: list[Tensor], *, lr: float | Tensor, beta1: float, beta2: float, eps: float,
               weight_decay: float, bias_correction: Any, decay_outside_ratio: bool, maximize: bool,
               grad_scale: Tensor | None, trust_options: dict[str, Any], step_size_factor: Any
               ) -> tuple[Tensor, Tensor, Tensor]:
    """The Lamb update in two fused passes; same arguments and result as the foreach implementation."""
    module = kernels()
    torch._foreach_add_(steps, 1)
    t = torch.stack(steps).to(torch.float64)
    ones = torch.ones_like(t)
    c1, c2 = (1 / (1 - beta1**t), (1 - beta2**t).rsqrt()) if bias_correction is True else (ones, ones)
    decay_in_update = 0.0 if decay_outside_ratio else weight_decay
    theta_factor = float(1 - lr * weight_decay) if decay_outside_ratio else 1.0
    sums = module.lamb_pass1(params, _kernel_grads(params, grads), exp_avgs, exp_avg_sqs, c1, c2,
                             _grad_factor(maximize, grad_scale), beta1, beta2, eps, decay_in_update, theta_factor)
    weight_norm, update_norm = _norms(sums[:, :2], params).unbind(1)
    ratio = trust_ratio(weight_norm, update_norm, **trust_options)
    step_scale = (ratio * -lr).to(torch.float64)
    factor = step_size_factor(torch.stack(steps))
    if factor is not None:
        step_scale = step_scale * factor
    module.lamb_pass2(params, exp_avgs, exp_avg_sqs, c1, c2, step_scale, eps, decay_in_update)
    return weight_norm, update_norm, ratio


def fused_lars(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], steps: list[Tensor], *,
               lr: float | Tensor, momentum: float, weight_decay: float, nesterov: bool, split_denominator: bool,
               maximize: bool, grad_scale: Tensor | None, trust_options: dict[str, Any]
               ) -> tuple[Tensor, Tensor, Tensor]:
    """The Lars update in two fused passes; same arguments and result as the foreach implementation."""
    module = kernels()
    torch._foreach_add_(steps, 1)
    grads = _kernel_grads(params, grads)
    factor = _grad_factor(maximize, grad_scale)
    weight_norm, grad_norm, combined_norm = _norms(module.lars_pass1(params, grads, factor, weight_decay),
                                                   params).unbind(1)
    update_norm = grad_norm + weight_decay * weight_norm if split_denominator else combined_norm
    ratio = trust_ratio(weight_norm, update_norm, **trust_options)
    module.lars_pass2(params, grads, momentum_buffers, ratio.to(torch.float64), float(lr), factor, weight_decay,
                      momentum, nesterov)
    return weight_norm, update_norm, ratio
