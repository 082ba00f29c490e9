// The fused CPU steps of LAMB and LARS (see cpu.py, which compiles this file at first use with
// torch.utils.cpp_extension.load_inline and binds lamb_step and lars_step).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <vector>

namespace {
// Tensors of at least kGrain elements are split across threads; smaller ones run whole, several at once.
constexpr int64_t kGrain = 32768;
// Norms are summed in the compute type over blocks of kBlock elements (those sums vectorise), blocks in double.
constexpr int64_t kBlock = 1024;
// Pass 2 walks each thread's range backwards in chunks of kChunk elements, so it starts on the elements pass 1
// touched last, which are still in cache.
constexpr int64_t kChunk = 16384;

using Sums = std::array<double, 3>;

Sums add(const Sums& a, const Sums& b) { return {a[0] + b[0], a[1] + b[1], a[2] + b[2]}; }

// The trust stage of torchlamb.trust.trust_ratio, for one tensor (the tests hold the two to the same values).
struct Trust {
  bool adapt;
  double weight_lo, weight_hi, ratio_lo, ratio_hi, coefficient, eps;

  double ratio(double weight_norm, double update_norm) const {
    if (!adapt) return 1.0;
    const double weight = std::min(std::max(weight_norm, weight_lo), weight_hi);
    const double r = (weight > 0 && update_norm > 0) ? coefficient * weight / (update_norm + eps) : 1.0;
    return std::min(std::max(r, ratio_lo), ratio_hi);
  }
};

// What pass 2 of tensor i needs: its norms, its ratio and the numbers of its update.
struct Stats {
  double weight_norm = 0, update_norm = 0, ratio = 1, c1 = 1, c2 = 1, scale = 0;
};

// A step runs in one call (kWhole) where every tensor is whole on this process. Where tensors are sharded across
// processes, their norms must be summed over all shards between the passes: kNorms runs pass 1 and returns the
// local sums of squares, the caller all-reduces them and computes the ratios, and kApply runs pass 2 with them.
enum Phase : int64_t { kWhole = 0, kNorms = 1, kApply = 2 };

// The driver. For every tensor i: pass 1 (sums = Σ norms(i, begin, end) over its elements), then
// finish(i, sums) -> Stats (norms, ratio, step size), then pass 2 (apply(i, begin, end, stats) over its elements).
// kWhole returns [n, 3] float64 of ‖θ‖, the ratio's denominator and r per tensor; kNorms returns the sums of
// pass 1; kApply calls finish with empty sums (the ratio comes from the caller) and returns an empty tensor.
//
// The per-range functions take raw __restrict__ pointers as arguments: captured by reference in a lambda, the
// pointers would be reloaded after every store and the loops would not vectorise.
template <typename Norms, typename Finish, typename Apply>
torch::Tensor each_tensor(const std::vector<torch::Tensor>& params, Phase phase, const Norms& norms,
                          const Finish& finish, const Apply& apply) {
  const int64_t n = static_cast<int64_t>(params.size());
  auto result = torch::zeros({phase == kApply ? 0 : n, 3}, torch::kFloat64);
  double* out = result.data_ptr<double>();
  // One tensor, or a range of it split among threads by `split` (parallel_reduce and parallel_for split alike).
  auto run = [&](int64_t i, bool split) {
    const int64_t numel = params[i].numel();
    Sums sums{0, 0, 0};
    if (phase != kApply) {
      sums = split ? at::parallel_reduce(
                         0, numel, kGrain, Sums{0, 0, 0},
                         [&](int64_t begin, int64_t end, Sums acc) { return add(acc, norms(i, begin, end)); }, add)
                   : norms(i, 0, numel);
    }
    if (phase == kNorms) {
      std::copy(sums.begin(), sums.end(), out + 3 * i);
      return;
    }
    const Stats stats = finish(i, sums);
    if (phase == kWhole) {
      out[3 * i] = stats.weight_norm;
      out[3 * i + 1] = stats.update_norm;
      out[3 * i + 2] = stats.ratio;
    }
    if (!split) {
      apply(i, 0, numel, stats);
      return;
    }
    // Each thread walks its part backwards: after pass 1 the end of its part is what is still in cache.
    at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t hi = end; hi > begin; hi -= kChunk) apply(i, std::max(begin, hi - kChunk), hi, stats);
    });
  };
  std::vector<int64_t> small;
  for (int64_t i = 0; i < n; ++i) {
    if (params[i].numel() < kGrain) {
      small.push_back(i);
    } else {
      run(i, true);
    }
  }
  at::parallel_for(0, static_cast<int64_t>(small.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) run(small[j], false);
  });
  return result;
}

template <typename T>
T* ptr(const torch::Tensor& t, int64_t offset) { return t.data_ptr<T>() + offset; }

// The step count of a parameter, first incremented unless this is the apply phase of a sharded step (whose norms
// phase counted it). Steps are float32 0-dim CPU tensors (checked before the passes).
double count_step(const torch::Tensor& step, Phase phase) {
  float* value = step.data_ptr<float>();
  if (phase != kApply) *value += 1.0f;
  return *value;
}

// The caller's ratios, for the apply phase.
const double* given_ratios(const std::vector<torch::Tensor>& params, Phase phase, const torch::Tensor& ratios) {
  TORCH_CHECK(phase >= kWhole && phase <= kApply, "torchlamb fused: unknown phase ", static_cast<int64_t>(phase));
  if (phase != kApply) return nullptr;
  TORCH_CHECK(ratios.scalar_type() == torch::kFloat64 && ratios.is_contiguous() &&
                  ratios.numel() == static_cast<int64_t>(params.size()),
              "torchlamb fused: the apply phase needs one float64 ratio per parameter");
  return ratios.data_ptr<double>();
}

// Every tensor the kernels read with parameter i's index must have its dtype, its size and contiguous memory.
void check_like_params(const std::vector<torch::Tensor>& params, const std::vector<torch::Tensor>& others,
                       const char* name) {
  TORCH_CHECK(others.size() == params.size(), "torchlamb fused: ", name, " has ", others.size(),
              " tensors for ", params.size(), " parameters");
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].is_contiguous() && params[i].device().is_cpu(), "torchlamb fused: parameter ", i,
                " is not a contiguous CPU tensor");
    TORCH_CHECK(others[i].is_contiguous() && others[i].device().is_cpu() &&
                    others[i].scalar_type() == params[i].scalar_type() && others[i].numel() == params[i].numel(),
                "torchlamb fused: ", name, "[", i, "] does not match its parameter's dtype, size and layout");
  }
}

void check_steps(const std::vector<torch::Tensor>& params, const std::vector<torch::Tensor>& steps) {
  TORCH_CHECK(steps.size() == params.size(), "torchlamb fused: one step count per parameter expected");
  for (const auto& step : steps) {
    TORCH_CHECK(step.numel() == 1 && step.scalar_type() == torch::kFloat32 && step.device().is_cpu(),
                "torchlamb fused: step counts must be one-element float32 CPU tensors");
  }
}

#define TORCHLAMB_DISPATCH(tensor, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (tensor).scalar_type(), name, __VA_ARGS__)

// ---- LAMB ----------------------------------------------------------------------------------------------------
// bias_correction: 0 none, 1 inside u (m̂, v̂), 2 "step_size" (√(1−β2^t)/(1−β1^t) on the step), 3
// "step_size_first_moment" (1/(1−β1^t) on the step).
struct LambArgs {
  double lr, beta1, beta2, eps, weight_decay, grad_factor;
  int64_t bias_correction;
  bool decay_outside_ratio;
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
                  int64_t n, double grad_factor, double beta1, double beta2, double eps_, double decay_,
                  double theta_factor, double c1_, double c2_) {
  using opmath_t = at::opmath_type<T>;
  // 1 − β in double first: 1 − 0.999f in float32 is off by 1.3e-5, which shifts v and u by ~7e-6.
  const opmath_t one_minus_b1 = 1.0 - beta1, one_minus_b2 = 1.0 - beta2, b2 = beta2;
  const opmath_t c1 = c1_, c2 = c2_, eps = eps_, decay = decay_, scale = grad_factor, factor = theta_factor;
  const bool rescale_theta = theta_factor != 1.0;
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
void lamb_apply(T* __restrict__ theta, const T* __restrict__ m, const T* __restrict__ v, int64_t n, double eps_,
                double decay_, double c1_, double c2_, double scale_) {
  using opmath_t = at::opmath_type<T>;
  const opmath_t c1 = c1_, c2 = c2_, eps = eps_, decay = decay_, scale = scale_;
  for (int64_t k = 0; k < n; ++k) {
    const opmath_t t = static_cast<opmath_t>(theta[k]);
    const opmath_t u = lamb_direction<opmath_t>(m[k], v[k], t, c1, c2, eps, decay);
    theta[k] = static_cast<T>(t + scale * u);
  }
}

// ---- LARS ----------------------------------------------------------------------------------------------------
// Pass 1 on elements [0, n): ‖θ‖², ‖g‖², ‖g + λθ‖² of the range (g times grad_factor). Reads only.
template <typename T>
Sums lars_norms(const T* __restrict__ theta, const T* __restrict__ g, int64_t n, double grad_factor,
                double weight_decay) {
  using opmath_t = at::opmath_type<T>;
  const opmath_t scale = grad_factor, decay = weight_decay;
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
void lars_apply(T* __restrict__ theta, const T* __restrict__ g, T* __restrict__ b, int64_t n, double grad_factor,
                double weight_decay, double momentum, bool nesterov, double ratio_, double lr_) {
  using opmath_t = at::opmath_type<T>;
  const opmath_t scale = grad_factor, decay = weight_decay, mu = momentum, ratio = ratio_, lr = lr_;
  for (int64_t k = 0; k < n; ++k) {
    const opmath_t t = static_cast<opmath_t>(theta[k]);
    const opmath_t scaled = (static_cast<opmath_t>(g[k]) * scale + decay * t) * ratio;
    const T b_new = static_cast<T>(mu * static_cast<opmath_t>(b[k]) + scaled);
    b[k] = b_new;
    const opmath_t direction = nesterov ? scaled + mu * static_cast<opmath_t>(b_new) : static_cast<opmath_t>(b_new);
    theta[k] = static_cast<T>(t - lr * direction);
  }
}

Trust make_trust(bool adapt, double weight_lo, double weight_hi, double ratio_lo, double ratio_hi,
                 double coefficient, double eps) {
  return Trust{adapt, weight_lo, weight_hi, ratio_lo, ratio_hi, coefficient, eps};
}
}  // namespace

// One LAMB step over all tensors (steps counted here), or one phase of it (see Phase); `ratios` is read in the
// apply phase only. Returns what each_tensor returns.
torch::Tensor lamb_step(std::vector<torch::Tensor> params, std::vector<torch::Tensor> grads,
                        std::vector<torch::Tensor> exp_avgs, std::vector<torch::Tensor> exp_avg_sqs,
                        std::vector<torch::Tensor> steps, double lr, double beta1, double beta2, double eps,
                        double weight_decay, int64_t bias_correction, bool decay_outside_ratio, double grad_factor,
                        bool adapt, double weight_lo, double weight_hi, double ratio_lo, double ratio_hi,
                        double trust_eps, int64_t phase_, torch::Tensor ratios) {
  const Phase phase = static_cast<Phase>(phase_);
  const double* given = given_ratios(params, phase, ratios);
  check_like_params(params, exp_avgs, "exp_avgs");
  check_like_params(params, exp_avg_sqs, "exp_avg_sqs");
  if (phase != kApply) check_like_params(params, grads, "grads");
  check_steps(params, steps);
  const Trust trust = make_trust(adapt, weight_lo, weight_hi, ratio_lo, ratio_hi, 1.0, trust_eps);
  const double decay = decay_outside_ratio ? 0.0 : weight_decay;
  const double theta_factor = decay_outside_ratio ? 1.0 - lr * weight_decay : 1.0;
  // Bias corrections need the step count, which pass 1 already uses: count and correct before the passes.
  std::vector<Stats> before(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const double t = count_step(steps[i], phase);
    const double debias1 = 1.0 - std::pow(beta1, t), debias2 = 1.0 - std::pow(beta2, t);
    Stats& s = before[i];
    s.scale = -lr;
    if (bias_correction == 1) {
      s.c1 = 1.0 / debias1;
      s.c2 = 1.0 / std::sqrt(debias2);
    } else if (bias_correction == 2) {
      s.scale *= std::sqrt(debias2) / debias1;
    } else if (bias_correction == 3) {
      s.scale /= debias1;
    }
  }
  return each_tensor(
      params, phase,
      [&](int64_t i, int64_t begin, int64_t end) {
        Sums sums;
        TORCHLAMB_DISPATCH(params[i], "lamb_moments", [&] {
          sums = lamb_moments<scalar_t>(ptr<scalar_t>(params[i], begin), ptr<scalar_t>(grads[i], begin),
                                        ptr<scalar_t>(exp_avgs[i], begin), ptr<scalar_t>(exp_avg_sqs[i], begin),
                                        end - begin, grad_factor, beta1, beta2, eps, decay, theta_factor,
                                        before[i].c1, before[i].c2);
        });
        return sums;
      },
      [&](int64_t i, const Sums& sums) {
        Stats s = before[i];
        s.weight_norm = std::sqrt(sums[0]);
        s.update_norm = std::sqrt(sums[1]);
        s.ratio = given ? given[i] : trust.ratio(s.weight_norm, s.update_norm);
        s.scale *= s.ratio;
        return s;
      },
      [&](int64_t i, int64_t begin, int64_t end, const Stats& s) {
        TORCHLAMB_DISPATCH(params[i], "lamb_apply", [&] {
          lamb_apply<scalar_t>(ptr<scalar_t>(params[i], begin), ptr<scalar_t>(exp_avgs[i], begin),
                               ptr<scalar_t>(exp_avg_sqs[i], begin), end - begin, eps, decay, s.c1, s.c2, s.scale);
        });
      });
}

// One LARS step over all tensors (steps counted here), or one phase of it (see Phase); `ratios` is read in the
// apply phase only. kNorms returns ‖θ‖², ‖g‖², ‖g + λθ‖²; kWhole returns ‖θ‖, the denominator and r.
torch::Tensor lars_step(std::vector<torch::Tensor> params, std::vector<torch::Tensor> grads,
                        std::vector<torch::Tensor> momentum_buffers, std::vector<torch::Tensor> steps, double lr,
                        double momentum, double weight_decay, bool nesterov, bool split_denominator,
                        double grad_factor, bool adapt, double weight_lo, double weight_hi, double ratio_lo,
                        double ratio_hi, double trust_coefficient, double trust_eps, int64_t phase_,
                        torch::Tensor ratios) {
  const Phase phase = static_cast<Phase>(phase_);
  const double* given = given_ratios(params, phase, ratios);
  check_like_params(params, grads, "grads");
  check_like_params(params, momentum_buffers, "momentum_buffers");
  check_steps(params, steps);
  for (const auto& step : steps) count_step(step, phase);
  const Trust trust = make_trust(adapt, weight_lo, weight_hi, ratio_lo, ratio_hi, trust_coefficient, trust_eps);
  return each_tensor(
      params, phase,
      [&](int64_t i, int64_t begin, int64_t end) {
        Sums sums;
        TORCHLAMB_DISPATCH(params[i], "lars_norms", [&] {
          sums = lars_norms<scalar_t>(ptr<scalar_t>(params[i], begin), ptr<scalar_t>(grads[i], begin), end - begin,
                                      grad_factor, weight_decay);
        });
        return sums;
      },
      [&](int64_t i, const Sums& sums) {
        Stats s;
        s.weight_norm = std::sqrt(sums[0]);
        s.update_norm = split_denominator ? std::sqrt(sums[1]) + weight_decay * s.weight_norm : std::sqrt(sums[2]);
        s.ratio = given ? given[i] : trust.ratio(s.weight_norm, s.update_norm);
        return s;
      },
      [&](int64_t i, int64_t begin, int64_t end, const Stats& s) {
        TORCHLAMB_DISPATCH(params[i], "lars_apply", [&] {
          lars_apply<scalar_t>(ptr<scalar_t>(params[i], begin), ptr<scalar_t>(grads[i], begin),
                               ptr<scalar_t>(momentum_buffers[i], begin), end - begin, grad_factor, weight_decay,
                               momentum, nesterov, s.ratio, lr);
        });
      });
}
