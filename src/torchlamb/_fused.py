"""The fused CPU LAMB step: two passes over memory instead of a dozen ``torch._foreach_*`` passes.

Pass 1, per tensor, in one sweep: update the moments in place and accumulate ‖θ‖² and ‖u‖², where
u = (m/(1−β1^t)) / (√v/√(1−β2^t) + ε) + λθ, without storing u. Between the passes the trust stage
(:func:`torchlamb.trust.trust_ratio`, the same code every path uses) turns the norms into ratios. Pass 2 recomputes
u from θ, m and v — the same arithmetic, so the same values — and applies θ ← θ + scale·u with scale = −lr·r.

That reads θ, g, m, v and writes m, v, then reads θ, m, v and writes θ: about 40 bytes per float32 element,
against 28 for AdamW; the foreach path also allocates full-size temporaries, which is what makes it slow here.

The kernel is C++ compiled at first use with ``torch.utils.cpp_extension.load_inline`` (ninja, gcc) and cached
by torch across processes. When it cannot be built, :func:`kernels` warns once and returns None, and Lamb falls
back to the foreach path.
"""

from __future__ import annotations

import functools
import time
import warnings
from typing import Any

import torch
from torch import Tensor

from .trust import trust_ratio

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

namespace {
constexpr int64_t kGrain = 32768;
constexpr int64_t kBlock = 1024;

// u = (m·c1) / (√v·c2 + eps) + decay·θ ; c1 = 1/(1−β1^t), c2 = 1/√(1−β2^t) (or 1, 1 without bias correction).
template <typename T>
inline T direction(T m, T v, T theta, T c1, T c2, T eps, T decay) {
  return (m * c1) / (std::sqrt(v) * c2 + eps) + decay * theta;
}
}  // namespace

// Pass 1: moments in place (and θ ← θ·theta_factor when decay is outside the ratio); returns [n, 2] float64:
// ‖θ‖², ‖u‖² per tensor.
torch::Tensor lamb_pass1(std::vector<torch::Tensor> params, std::vector<torch::Tensor> grads,
                         std::vector<torch::Tensor> exp_avgs, std::vector<torch::Tensor> exp_avg_sqs,
                         torch::Tensor c1s, torch::Tensor c2s, double grad_scale, double beta1, double beta2,
                         double eps, double decay_in_update, double theta_factor) {
  const int64_t n = static_cast<int64_t>(params.size());
  auto sums = torch::zeros({n, 2}, torch::kFloat64);
  auto* out = sums.data_ptr<double>();
  const auto* c1_all = c1s.data_ptr<double>();
  const auto* c2_all = c2s.data_ptr<double>();
  for (int64_t i = 0; i < n; ++i) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[i].scalar_type(), "lamb_pass1", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      // __restrict__: the four tensors never overlap, which lets the compiler vectorise the loop.
      scalar_t* __restrict__ theta = params[i].data_ptr<scalar_t>();
      const scalar_t* __restrict__ g = grads[i].data_ptr<scalar_t>();
      scalar_t* __restrict__ m = exp_avgs[i].data_ptr<scalar_t>();
      scalar_t* __restrict__ v = exp_avg_sqs[i].data_ptr<scalar_t>();
      const opmath_t c1 = c1_all[i], c2 = c2_all[i], e = eps, decay = decay_in_update;
      // 1 − β in double first: 1 − 0.999f in float32 is off by 1.3e-5, which shifts v and u by ~7e-6.
      const opmath_t one_minus_b1 = 1.0 - beta1, one_minus_b2 = 1.0 - beta2, b2 = beta2;
      const opmath_t scale = grad_scale, factor = theta_factor;
      const bool rescale_theta = theta_factor != 1.0;
      auto total = at::parallel_reduce(
          0, params[i].numel(), kGrain, std::pair<double, double>(0.0, 0.0),
          [&](int64_t begin, int64_t end, std::pair<double, double> acc) {
            // Sums in opmath precision over short blocks (they vectorise), blocks added in double.
            for (int64_t block = begin; block < end; block += kBlock) {
              const int64_t block_end = std::min(end, block + kBlock);
              opmath_t theta_sq = 0, u_sq = 0;
              if (rescale_theta) {  // decay outside the ratio: θ ← θ·(1 − lr·λ) before the norms
                for (int64_t k = block; k < block_end; ++k) {
                  theta[k] = static_cast<scalar_t>(static_cast<opmath_t>(theta[k]) * factor);
                }
              }
              for (int64_t k = block; k < block_end; ++k) {
                const opmath_t t = static_cast<opmath_t>(theta[k]);
                const opmath_t grad = static_cast<opmath_t>(g[k]) * scale;
                // The moments are rounded to their storage type before use, as the other paths do.
                const scalar_t m_new = static_cast<scalar_t>(static_cast<opmath_t>(m[k]) +
                                                             one_minus_b1 * (grad - static_cast<opmath_t>(m[k])));
                const scalar_t v_new =
                    static_cast<scalar_t>(b2 * static_cast<opmath_t>(v[k]) + one_minus_b2 * grad * grad);
                m[k] = m_new;
                v[k] = v_new;
                const opmath_t u = direction<opmath_t>(m_new, v_new, t, c1, c2, e, decay);
                theta_sq += t * t;
                u_sq += u * u;
              }
              acc.first += theta_sq;
              acc.second += u_sq;
            }
            return acc;
          },
          [](std::pair<double, double> a, std::pair<double, double> b) {
            return std::make_pair(a.first + b.first, a.second + b.second);
          });
      out[2 * i] = total.first;
      out[2 * i + 1] = total.second;
    });
  }
  return sums;
}

// Pass 2: θ ← θ + scale_i · u, with u recomputed exactly as in pass 1.
void lamb_pass2(std::vector<torch::Tensor> params, std::vector<torch::Tensor> exp_avgs,
                std::vector<torch::Tensor> exp_avg_sqs, torch::Tensor c1s, torch::Tensor c2s, torch::Tensor scales,
                double eps, double decay_in_update) {
  const int64_t n = static_cast<int64_t>(params.size());
  const auto* c1_all = c1s.data_ptr<double>();
  const auto* c2_all = c2s.data_ptr<double>();
  const auto* scale_all = scales.data_ptr<double>();
  for (int64_t i = 0; i < n; ++i) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[i].scalar_type(), "lamb_pass2", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      scalar_t* __restrict__ theta = params[i].data_ptr<scalar_t>();
      const scalar_t* __restrict__ m = exp_avgs[i].data_ptr<scalar_t>();
      const scalar_t* __restrict__ v = exp_avg_sqs[i].data_ptr<scalar_t>();
      const opmath_t c1 = c1_all[i], c2 = c2_all[i], e = eps, decay = decay_in_update, scale = scale_all[i];
      at::parallel_for(0, params[i].numel(), kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          const opmath_t t = static_cast<opmath_t>(theta[k]);
          const opmath_t u = direction<opmath_t>(m[k], v[k], t, c1, c2, e, decay);
          theta[k] = static_cast<scalar_t>(t + scale * u);
        }
      });
    });
  }
}
"""


# -fopenmp: at::parallel_for is an OpenMP pragma in the header; without it the loops run on one thread.
# -fno-math-errno: std::sqrt may then be vectorised. The associative-math flags let the norms' sums vectorise;
# none of them assumes finite values, so NaN and Inf propagate as in the other paths. -march=native is safe because
# the kernel is built on the machine that runs it.
_CFLAGS = ["-O3", "-fopenmp", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
           "-fno-trapping-math"]


@functools.cache
def kernels() -> Any | None:
    """The compiled kernels (built at first use, then cached by torch on disk), or None if they cannot be built."""
    try:
        from torch.utils.cpp_extension import load_inline

        start = time.perf_counter()
        module = load_inline("torchlamb_fused_cpu_v6", cpp_sources=_SOURCE, functions=["lamb_pass1", "lamb_pass2"],
                             extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"], verbose=False)
        module.build_seconds = time.perf_counter() - start
        return module
    except Exception as error:  # noqa: BLE001 - any build failure means: use the foreach path
        warnings.warn(f"torchlamb: the fused CPU kernel could not be built ({type(error).__name__}: {error}); "
                      "using the foreach implementation instead", RuntimeWarning, stacklevel=3)
        return None


def supports(tensors: list[Tensor]) -> bool:
    """Whether the fused kernel can take these tensors: dense, contiguous, on the CPU."""
    return all(t.device.type == "cpu" and t.layout == torch.strided and t.is_contiguous() for t in tensors)


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
    # The kernel takes plain numbers; on the CPU reading them is not a device synchronisation.
    sign = -1.0 if maximize else 1.0
    scale = sign * (1.0 if grad_scale is None else float(grad_scale))
    decay_in_update = 0.0 if decay_outside_ratio else weight_decay
    theta_factor = float(1 - lr * weight_decay) if decay_outside_ratio else 1.0
    grads = [g if g.dtype == p.dtype and g.is_contiguous() else g.to(p.dtype).contiguous()
             for p, g in zip(params, grads)]
    sums = module.lamb_pass1(params, grads, exp_avgs, exp_avg_sqs, c1, c2, scale, beta1, beta2, eps,
                             decay_in_update, theta_factor)
    norm_dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    weight_norm, update_norm = sums.sqrt().to(norm_dtype).unbind(1)
    ratio = trust_ratio(weight_norm, update_norm, **trust_options)
    step_scale = (ratio * -lr).to(torch.float64)
    factor = step_size_factor(torch.stack(steps))
    if factor is not None:
        step_scale = step_scale * factor
    module.lamb_pass2(params, exp_avgs, exp_avg_sqs, c1, c2, step_scale, eps, decay_in_update)
    return weight_norm, update_norm, ratio
