// LAMB: the direction u, pass 1 (the moments, ‖θ‖², ‖u‖²) and pass 2 (θ ← θ − lr·r·u) with the moments in float (the
// parameter's dtype, or bfloat16/float16 beside float32 parameters) and in 8 bits, the bias corrections, and the
// entry points lamb_step and lamb_step_8bit.

namespace {
// How the moments' bias is corrected (Lamb's bias_correction; cpu.py passes these values).
enum BiasCorrection : int64_t {
  kNoCorrection = 0,
  kCorrectMoments = 1,              // inside u: m/(1−β1^t) and v/(1−β2^t), Adam's debiasing
  kCorrectStepSize = 2,             // "step_size": √(1−β2^t)/(1−β1^t) on the step, outside the ratio
  kCorrectStepSizeFirstMoment = 3,  // "step_size_first_moment": 1/(1−β1^t) on the step
};

// The columns of pass 1's sums (what kNorms returns). With caution (torchlamb.trust's LAMB_MASK_COUNT etc.):
// kLambUpdate holds ‖a⊙M‖², then Σ M and Σ (a⊙M)·θ; ‖u‖ is assembled from the whole tensor's sums.
enum LambNorm : size_t { kLambWeight = 0, kLambUpdate = 1, kLambMaskCount = 2, kLambMaskedCross = 3 };

// Caution's factor k = 1/max(mean(M), 1e-3) (1 for an empty tensor) and ‖u‖ for u = k·(a⊙M) + decay·θ from the
// whole tensor's sums: torchlamb.trust.caution_scale and cautious_squares, in the same float64 operations.
inline double caution_scale(double count, double numel) {
  return numel > 0 ? 1.0 / std::max(count / numel, 1e-3) : 1.0;
}
inline double cautious_update_norm(const Sums& sums, double k, double decay) {
  double u_sq = k * k * sums[kLambUpdate];
  if (decay != 0) u_sq = u_sq + 2.0 * decay * k * sums[kLambMaskedCross] + decay * decay * sums[kLambWeight];
  return std::sqrt(std::max(u_sq, 0.0));
}

// Adam's a = (m·c1) / (√v·c2 + ε), before caution's mask and the decay (both cautious passes use this).
template <typename T>
inline T lamb_adam(T m, T v, T c1, T c2, T eps) {
  return (m * c1) / (std::sqrt(v) * c2 + eps);
}

// u = (m·c1) / (√v·c2 + ε) + decay·θ ; c1 = 1/(1−β1^t), c2 = 1/√(1−β2^t) (or 1, 1 without bias correction).
template <typename T>
inline T lamb_direction(T m, T v, T theta, T c1, T c2, T eps, T decay) {
  return lamb_adam(m, v, c1, c2, eps) + decay * theta;
}

// Pass 1's moment update of one element: m ← m + (1−β1)(g − m), v ← β2·v + (1−β2)·g², stored in S (rounded to
// their storage type before use, so that pass 2 recomputes the same u); returns them in T.
template <typename T, typename S>
inline std::pair<T, T> update_moments(S& m, S& v, T grad, T one_minus_b1, T b2, T one_minus_b2) {
  const T m_old = static_cast<T>(m);
  const S m_new = static_cast<S>(m_old + one_minus_b1 * (grad - m_old));
  const S v_new = static_cast<S>(b2 * static_cast<T>(v) + one_minus_b2 * grad * grad);
  m = m_new;
  v = v_new;
  return {static_cast<T>(m_new), static_cast<T>(v_new)};
}

// Pass 1 on elements [0, n): moments in place (θ ← θ·theta_factor first when decay is outside the ratio);
// returns ‖θ‖², ‖u‖² of the range.
template <typename T, typename S>
Sums lamb_pass1(T* __restrict__ theta, const T* __restrict__ g, S* __restrict__ m, S* __restrict__ v, int64_t n,
                double grad_factor, double beta1, double beta2, double eps_, double decay_, double theta_factor,
                double c1_, double c2_) {
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
      const auto [m_new, v_new] = update_moments<opmath_t, S>(m[k], v[k], grad, one_minus_b1, b2, one_minus_b2);
      const opmath_t u = lamb_direction<opmath_t>(m_new, v_new, t, c1, c2, eps, decay);
      theta_sq += t * t;
      u_sq += u * u;
    }
    sums[kLambWeight] += theta_sq;
    sums[kLambUpdate] += u_sq;
  }
  return sums;
}

// Pass 1 with caution: the moments as lamb_pass1, then ‖θ‖², ‖a⊙M‖², Σ M and Σ (a⊙M)·θ, M = 1[a·g > 0].
template <typename T, typename S>
Sums lamb_pass1_cautious(T* __restrict__ theta, const T* __restrict__ g, S* __restrict__ m, S* __restrict__ v,
                         int64_t n, double grad_factor, double beta1, double beta2, double eps_, double theta_factor,
                         double c1_, double c2_) {
  using opmath_t = at::opmath_type<T>;
  const opmath_t one_minus_b1 = 1.0 - beta1, one_minus_b2 = 1.0 - beta2, b2 = beta2;
  const opmath_t c1 = c1_, c2 = c2_, eps = eps_, scale = grad_factor, factor = theta_factor;
  const bool rescale_theta = theta_factor != 1.0;
  Sums sums{0, 0, 0, 0};
  for (int64_t block = 0; block < n; block += kBlock) {
    const int64_t end = std::min(n, block + kBlock);
    if (rescale_theta) {
      for (int64_t k = block; k < end; ++k) theta[k] = static_cast<T>(static_cast<opmath_t>(theta[k]) * factor);
    }
    opmath_t theta_sq = 0, a_sq = 0, count = 0, cross = 0;
    for (int64_t k = block; k < end; ++k) {
      const opmath_t t = static_cast<opmath_t>(theta[k]);
      const opmath_t grad = static_cast<opmath_t>(g[k]) * scale;
      const auto [m_new, v_new] = update_moments<opmath_t, S>(m[k], v[k], grad, one_minus_b1, b2, one_minus_b2);
      const opmath_t a = lamb_adam<opmath_t>(m_new, v_new, c1, c2, eps);
      const bool keep = a * grad > 0;
      const opmath_t masked = keep ? a : opmath_t(0);
      theta_sq += t * t;
      a_sq += masked * masked;
      count += keep ? opmath_t(1) : opmath_t(0);
      cross += masked * t;
    }
    sums[kLambWeight] += theta_sq;
    sums[kLambUpdate] += a_sq;
    sums[kLambMaskCount] += count;
    sums[kLambMaskedCross] += cross;
  }
  return sums;
}

// Pass 2 with caution on elements [0, n): u = k·(a⊙M) + decay·θ with a and M recomputed from m, v and g as in
// pass 1; θ ← θ + scale·u, then θ ← θ·after when `after` is not 1 (decay after the step).
template <typename T, typename S>
void lamb_pass2_cautious(T* __restrict__ theta, const T* __restrict__ g, const S* __restrict__ m,
                         const S* __restrict__ v, int64_t n, double grad_factor, double eps_, double decay_,
                         double c1_, double c2_, double scale_, double k_, double after_) {
  using opmath_t = at::opmath_type<T>;
  const opmath_t c1 = c1_, c2 = c2_, eps = eps_, decay = decay_, scale = scale_, gscale = grad_factor, k_scale = k_,
                 after = after_;
  const bool decay_after = after_ != 1.0;
  for (int64_t k = 0; k < n; ++k) {
    const opmath_t t = static_cast<opmath_t>(theta[k]);
    const opmath_t grad = static_cast<opmath_t>(g[k]) * gscale;
    const opmath_t a = lamb_adam<opmath_t>(static_cast<opmath_t>(m[k]), static_cast<opmath_t>(v[k]), c1, c2, eps);
    const opmath_t u = (a * grad > 0 ? a * k_scale : opmath_t(0)) + decay * t;
    const T stepped = static_cast<T>(t + scale * u);
    theta[k] = decay_after ? static_cast<T>(static_cast<opmath_t>(stepped) * after) : stepped;
  }
}

// Pass 2 with the decay after the step (decay_after_step) on elements [0, n): θ ← (θ + scale·u)·after, u as in
// pass 1, θ rounded to its dtype in between.
template <typename T, typename S>
void lamb_pass2_after(T* __restrict__ theta, const S* __restrict__ m, const S* __restrict__ v, int64_t n,
                      double eps_, double decay_, double c1_, double c2_, double scale_, double after_) {
  using opmath_t = at::opmath_type<T>;
  const opmath_t c1 = c1_, c2 = c2_, eps = eps_, decay = decay_, scale = scale_, after = after_;
  for (int64_t k = 0; k < n; ++k) {
    const opmath_t t = static_cast<opmath_t>(theta[k]);
    const opmath_t u = lamb_direction<opmath_t>(static_cast<opmath_t>(m[k]), static_cast<opmath_t>(v[k]), t, c1, c2,
                                                eps, decay);
    theta[k] = static_cast<T>(static_cast<opmath_t>(static_cast<T>(t + scale * u)) * after);
  }
}

// Pass 2 on elements [0, n): θ ← θ + scale·u, u recomputed exactly as in pass 1.
template <typename T, typename S>
void lamb_pass2(T* __restrict__ theta, const S* __restrict__ m, const S* __restrict__ v, int64_t n, double eps_,
                double decay_, double c1_, double c2_, double scale_) {
  using opmath_t = at::opmath_type<T>;
  const opmath_t c1 = c1_, c2 = c2_, eps = eps_, decay = decay_, scale = scale_;
  for (int64_t k = 0; k < n; ++k) {
    const opmath_t t = static_cast<opmath_t>(theta[k]);
    const opmath_t u = lamb_direction<opmath_t>(static_cast<opmath_t>(m[k]), static_cast<opmath_t>(v[k]), t, c1, c2,
                                                eps, decay);
    theta[k] = static_cast<T>(t + scale * u);
  }
}

// LAMB's u = (m·c1)/(s·c2 + ε) + decay·θ on one block, from m and s = √v as stored. One compiled function serves
// pass 1 (‖u‖) and pass 2 (the step), so the two compute the same u bit for bit.
template <typename T>
__attribute__((noinline)) void lamb8_direction(const float* __restrict__ m, const float* __restrict__ s,
                                               const T* __restrict__ theta, int64_t n, float c1, float c2, float eps,
                                               at::opmath_type<T> decay, at::opmath_type<T>* __restrict__ u) {
  using opmath_t = at::opmath_type<T>;
  for (int64_t k = 0; k < n; ++k) {
    u[k] = static_cast<opmath_t>((m[k] * c1) / (s[k] * c2 + eps)) + decay * static_cast<opmath_t>(theta[k]);
  }
}

// Adam's a = (m·c1)/(s·c2 + ε) on one block, from m and s = √v as stored (caution's passes: one compiled function
// for both, as lamb8_direction).
template <typename T>
__attribute__((noinline)) void lamb8_adam(const float* __restrict__ m, const float* __restrict__ s, int64_t n,
                                          float c1, float c2, float eps, at::opmath_type<T>* __restrict__ a) {
  using opmath_t = at::opmath_type<T>;
  for (int64_t k = 0; k < n; ++k) a[k] = static_cast<opmath_t>((m[k] * c1) / (s[k] * c2 + eps));
}

// LAMB pass 1 on the blocks of elements [begin, end) of a tensor: per block, dequantize m and s = √v, update them
// in float, store their codes and absmax, and sum ‖θ‖² and ‖u‖² with u computed from the values as stored
// (dequantized again), so pass 2 recomputes the same u from the codes.
template <typename T>
Sums lamb8_pass1(T* __restrict__ theta, const T* __restrict__ g, uint8_t* __restrict__ m_codes,
                 float* __restrict__ m_absmax, uint8_t* __restrict__ s_codes, float* __restrict__ s_absmax,
                 int64_t begin, int64_t end, const Blocks& blocks, const CodeMap& m_map, const CodeMap& s_map,
                 double grad_factor, double beta1, double beta2, double eps, double decay_, double theta_factor,
                 double c1, double c2, bool caution = false) {
  using opmath_t = at::opmath_type<T>;  // θ's arithmetic (double for double); the moments compute in float
  const float one_minus_b1 = 1.0 - beta1, one_minus_b2 = 1.0 - beta2, scale = grad_factor;
  const opmath_t decay = decay_, factor = theta_factor;
  const bool rescale_theta = theta_factor != 1.0;
  float m[kQuantBlock], s[kQuantBlock];
  opmath_t u[kQuantBlock];
  Sums sums{0, 0, 0, 0};
  for (int64_t start = begin, len = 0; start < end; start += len) {
    len = blocks.length(start, end);
    const int64_t block = blocks.index(start);
    T* __restrict__ t = theta + start;
    const T* __restrict__ grad = g + start;
    prefetch_block(grad, kAhead);
    prefetch_block(t, kAhead);
    prefetch_block(m_codes + start, kAhead);
    prefetch_block(s_codes + start, kAhead);
    if (rescale_theta) {
      for (int64_t k = 0; k < len; ++k) t[k] = static_cast<T>(static_cast<opmath_t>(t[k]) * factor);
    }
    m_map.decode_block(m_codes + start, len, m_absmax[block], m);
    s_map.decode_block(s_codes + start, len, s_absmax[block], s);
    for (int64_t k = 0; k < len; ++k) {
      const float gk = static_cast<float>(grad[k]) * scale, v_old = s[k] * s[k];
      m[k] = m[k] + one_minus_b1 * (gk - m[k]);
      s[k] = std::sqrt(v_old + one_minus_b2 * (gk * gk - v_old));
    }
    const float m_max = absmax_of(m, len), s_max = absmax_of(s, len);
    m_absmax[block] = m_max;
    s_absmax[block] = s_max;
    m_map.encode_block(m, len, m_max, false, m_codes + start);
    s_map.encode_block(s, len, s_max, true, s_codes + start);
    m_map.decode_block(m_codes + start, len, m_max, m);
    s_map.decode_block(s_codes + start, len, s_max, s);
    if (caution) {  // u holds a; ‖a⊙M‖², Σ M, Σ (a⊙M)·θ as lamb_pass1_cautious
      lamb8_adam<T>(m, s, len, c1, c2, eps, u);
      opmath_t theta_sq = 0, a_sq = 0, count = 0, cross = 0;
      for (int64_t k = 0; k < len; ++k) {
        const opmath_t th = static_cast<opmath_t>(t[k]);
        const float gk = static_cast<float>(grad[k]) * scale;
        const bool keep = u[k] * gk > 0;
        const opmath_t masked = keep ? u[k] : opmath_t(0);
        theta_sq += th * th;
        a_sq += masked * masked;
        count += keep ? opmath_t(1) : opmath_t(0);
        cross += masked * th;
      }
      sums[kLambWeight] += theta_sq;
      sums[kLambUpdate] += a_sq;
      sums[kLambMaskCount] += count;
      sums[kLambMaskedCross] += cross;
      continue;
    }
    lamb8_direction<T>(m, s, t, len, c1, c2, eps, decay, u);
    opmath_t theta_sq = 0, u_sq = 0;
    for (int64_t k = 0; k < len; ++k) {
      const opmath_t th = static_cast<opmath_t>(t[k]);
      theta_sq += th * th;
      u_sq += u[k] * u[k];
    }
    sums[kLambWeight] += theta_sq;
    sums[kLambUpdate] += u_sq;
  }
  return sums;
}

// LAMB pass 2 on the blocks of elements [begin, end) of a tensor: θ ← θ + scale·u, u from the stored codes as in
// pass 1 (with caution: u = k·(a⊙M) + decay·θ, M from g as in pass 1); then θ ← θ·after when `after` is not 1.
template <typename T>
void lamb8_pass2(T* __restrict__ theta, const uint8_t* __restrict__ m_codes, const float* __restrict__ m_absmax,
                 const uint8_t* __restrict__ s_codes, const float* __restrict__ s_absmax, int64_t begin, int64_t end,
                 const Blocks& blocks, const CodeMap& m_map, const CodeMap& s_map, double eps, double decay_,
                 double c1, double c2, double scale_, const T* __restrict__ g = nullptr, double grad_factor = 1.0,
                 bool caution = false, double k_ = 1.0, double after_ = 1.0) {
  using opmath_t = at::opmath_type<T>;
  const opmath_t decay = decay_, scale = scale_, k_scale = k_, after = after_;
  const float gscale = grad_factor;
  const bool decay_after = after_ != 1.0;
  float m[kQuantBlock], s[kQuantBlock];
  opmath_t u[kQuantBlock];
  for (int64_t start = begin, len = 0; start < end; start += len) {
    len = blocks.length(start, end);
    const int64_t block = blocks.index(start);
    T* __restrict__ t = theta + start;
    prefetch_block(t, kAhead);
    prefetch_block(m_codes + start, kAhead);
    prefetch_block(s_codes + start, kAhead);
    m_map.decode_block(m_codes + start, len, m_absmax[block], m);
    s_map.decode_block(s_codes + start, len, s_absmax[block], s);
    if (caution) {
      const T* __restrict__ grad = g + start;
      lamb8_adam<T>(m, s, len, c1, c2, eps, u);
      for (int64_t k = 0; k < len; ++k) {
        const float gk = static_cast<float>(grad[k]) * gscale;
        const opmath_t th = static_cast<opmath_t>(t[k]);
        u[k] = (u[k] * gk > 0 ? u[k] * k_scale : opmath_t(0)) + decay * th;
      }
    } else {
      lamb8_direction<T>(m, s, t, len, c1, c2, eps, decay, u);
    }
    if (decay_after) {
      for (int64_t k = 0; k < len; ++k) {
        t[k] = static_cast<T>(static_cast<opmath_t>(static_cast<T>(static_cast<opmath_t>(t[k]) + scale * u[k])) *
                              after);
      }
      continue;
    }
    for (int64_t k = 0; k < len; ++k) t[k] = static_cast<T>(static_cast<opmath_t>(t[k]) + scale * u[k]);
  }
}

// Lamb's bias_correction, checked before the step is counted.
BiasCorrection bias_correction_mode(int64_t code) {
  TORCH_CHECK(code >= kNoCorrection && code <= kCorrectStepSizeFirstMoment,
              "torchlamb fused: bias_correction must be 0 to 3, got ", code);
  return static_cast<BiasCorrection>(code);
}

// What the float and 8-bit steps share: the setup (set_up_step), where the weight decay goes, each tensor's bias
// corrections and step size before pass 1 (they need the step count, which pass 1 already uses), and after pass 1
// its norms and ratio.
struct LambStep {
  const std::vector<torch::Tensor>& params;
  StepSetup setup;
  double decay;               // λ inside u; 0 when the decay is outside the ratio or after the step
  double theta_factor;        // 1 − lr_d·λ, applied to θ by pass 1 when the decay is outside the ratio; else 1
  double after;               // 1 − lr·λ, applied to θ by pass 2 when the decay is after the step; else 1
  bool caution;               // u = k·(a⊙M) + decay·θ; pass 2 reads the gradients
  const double* given_scales = nullptr;  // caution's k per tensor from the caller, in the apply phase
  std::vector<Stats> before;  // per tensor: c1, c2 and the step size without the ratio

  // The entry point checks its state first: this counts the step. `decay_lr` is the lr of the decay (lr, or
  // lr²/max_lr with corrected_weight_decay). In the apply phase with caution, `ratios` holds the n ratios, then the
  // n factors k.
  LambStep(const std::vector<torch::Tensor>& params_, std::vector<torch::Tensor>& grads,
           const std::vector<torch::Tensor>& steps, int64_t phase, const torch::Tensor& ratios, double lr,
           double beta1, double beta2, double weight_decay, int64_t bias_correction, bool decay_outside_ratio,
           const Trust& trust, bool caution_ = false, bool decay_after_step = false, double decay_lr = 0.0)
      : params(params_),
        decay(decay_outside_ratio || decay_after_step ? 0.0 : weight_decay),
        theta_factor(decay_outside_ratio ? 1.0 - decay_lr * weight_decay : 1.0),
        after(decay_after_step ? 1.0 - decay_lr * weight_decay : 1.0),
        caution(caution_) {
    const BiasCorrection correction = bias_correction_mode(bias_correction);
    torch::Tensor given = ratios;
    const int64_t n = static_cast<int64_t>(params.size());
    if (caution && phase == kApply) {
      TORCH_CHECK(ratios.scalar_type() == torch::kFloat64 && ratios.is_contiguous() && ratios.numel() == 2 * n,
                  "torchlamb fused: the apply phase with caution needs a ratio and a factor per parameter");
      given = ratios.narrow(0, 0, n);
      given_scales = ratios.data_ptr<double>() + n;
    }
    setup = set_up_step(params, grads, steps, phase, given, /*pass2_reads_grads=*/caution, trust);
    before.resize(setup.counts.size());
    for (size_t i = 0; i < before.size(); ++i) {
      const double t = setup.counts[i];
      const double debias1 = 1.0 - std::pow(beta1, t), debias2 = 1.0 - std::pow(beta2, t);
      Stats& s = before[i];
      s.scale = -lr;
      switch (correction) {
        case kNoCorrection:
          break;
        case kCorrectMoments:
          s.c1 = 1.0 / debias1;
          s.c2 = 1.0 / std::sqrt(debias2);
          break;
        case kCorrectStepSize:
          s.scale *= std::sqrt(debias2) / debias1;
          break;
        case kCorrectStepSizeFirstMoment:
          s.scale /= debias1;
          break;
      }
    }
  }

  // After pass 1 of tensor i: its norms, its ratio (the caller's in the apply phase), its step size.
  Stats finish(int64_t i, const Sums& sums) const {
    Stats s = before[i];
    s.weight_norm = std::sqrt(sums[kLambWeight]);
    if (caution) {
      s.caution = given_scales ? given_scales[i]
                               : caution_scale(sums[kLambMaskCount], static_cast<double>(params[i].numel()));
      s.update_norm = cautious_update_norm(sums, s.caution, decay);
    } else {
      s.update_norm = std::sqrt(sums[kLambUpdate]);
    }
    const double* given = setup.given_ratio(i);
    s.ratio = given ? *given : setup.trust.ratio(s.weight_norm, s.update_norm);
    s.scale *= s.ratio;
    return s;
  }

  // The step (or its phase) over all tensors with the moments' own passes: what each_tensor returns.
  template <typename Pass1, typename Pass2>
  StepResult walk(const Pass1& pass1, const Pass2& pass2, int64_t align = 1,
                  const std::vector<int64_t>* rows = nullptr) const {
    return each_tensor(
        params, setup.phase, pass1, [&](int64_t i, const Sums& sums) { return finish(i, sums); }, pass2, align, rows,
        caution ? 4 : 3);
  }
};
}  // namespace

// One LAMB step over all tensors (steps counted here), or one phase of it (see Phase); `ratios` is read in the
// apply phase only. kNorms returns ‖θ‖², ‖u‖² (LambNorm); the others return what each_tensor returns.
StepResult lamb_step(std::vector<torch::Tensor> params, std::vector<torch::Tensor> grads,
                     std::vector<torch::Tensor> exp_avgs, std::vector<torch::Tensor> exp_avg_sqs,
                     std::vector<torch::Tensor> steps, double lr, double beta1, double beta2, double eps,
                     double weight_decay, int64_t bias_correction, bool decay_outside_ratio, double grad_factor,
                     bool adapt, double weight_lo, double weight_hi, double ratio_lo, double ratio_hi,
                     double trust_coefficient, double trust_eps, int64_t phase, torch::Tensor ratios, bool caution,
                     bool decay_after_step, double decay_lr) {
  check_state(params, exp_avgs, "exp_avgs");
  check_state(params, exp_avg_sqs, "exp_avg_sqs");
  const LambStep lamb(params, grads, steps, phase, ratios, lr, beta1, beta2, weight_decay, bias_correction,
                      decay_outside_ratio,
                      Trust{adapt, weight_lo, weight_hi, ratio_lo, ratio_hi, trust_coefficient, trust_eps}, caution,
                      decay_after_step, decay_lr);
  return lamb.walk(
      [&](int64_t i, int64_t begin, int64_t end) {
        Sums sums;
        dispatch_with_state(params[i], exp_avgs[i], [&](auto t, auto s) {
          using T = decltype(t);
          using S = decltype(s);
          if (lamb.caution) {
            sums = lamb_pass1_cautious<T, S>(ptr<T>(params[i], begin), ptr<T>(grads[i], begin),
                                             ptr<S>(exp_avgs[i], begin), ptr<S>(exp_avg_sqs[i], begin), end - begin,
                                             grad_factor, beta1, beta2, eps, lamb.theta_factor, lamb.before[i].c1,
                                             lamb.before[i].c2);
            return;
          }
          sums = lamb_pass1<T, S>(ptr<T>(params[i], begin), ptr<T>(grads[i], begin), ptr<S>(exp_avgs[i], begin),
                                  ptr<S>(exp_avg_sqs[i], begin), end - begin, grad_factor, beta1, beta2, eps,
                                  lamb.decay, lamb.theta_factor, lamb.before[i].c1, lamb.before[i].c2);
        });
        return sums;
      },
      [&](int64_t i, int64_t begin, int64_t end, const Stats& s) {
        dispatch_with_state(params[i], exp_avgs[i], [&](auto t, auto state) {
          using T = decltype(t);
          using S = decltype(state);
          if (lamb.caution) {
            lamb_pass2_cautious<T, S>(ptr<T>(params[i], begin), ptr<T>(grads[i], begin), ptr<S>(exp_avgs[i], begin),
                                      ptr<S>(exp_avg_sqs[i], begin), end - begin, grad_factor, eps, lamb.decay, s.c1,
                                      s.c2, s.scale, s.caution, lamb.after);
          } else if (lamb.after != 1.0) {
            lamb_pass2_after<T, S>(ptr<T>(params[i], begin), ptr<S>(exp_avgs[i], begin),
                                   ptr<S>(exp_avg_sqs[i], begin), end - begin, eps, lamb.decay, s.c1, s.c2, s.scale,
                                   lamb.after);
          } else {
            lamb_pass2<T, S>(ptr<T>(params[i], begin), ptr<S>(exp_avgs[i], begin), ptr<S>(exp_avg_sqs[i], begin),
                             end - begin, eps, lamb.decay, s.c1, s.c2, s.scale);
          }
        });
      });
}

// LAMB with 8-bit moments (m in signed codes, √v in unsigned ones; see torchlamb.quantized): a whole step, or one
// phase of it, as lamb_step. `tables`: the signed map's values and entries, then the unsigned map's.
StepResult lamb_step_8bit(std::vector<torch::Tensor> params, std::vector<torch::Tensor> grads,
                          std::vector<torch::Tensor> m_codes, std::vector<torch::Tensor> m_absmax,
                          std::vector<torch::Tensor> s_codes, std::vector<torch::Tensor> s_absmax,
                          std::vector<torch::Tensor> steps, std::vector<torch::Tensor> tables, double lr,
                          double beta1, double beta2, double eps, double weight_decay, int64_t bias_correction,
                          bool decay_outside_ratio, double grad_factor, bool adapt, double weight_lo,
                          double weight_hi, double ratio_lo, double ratio_hi, double trust_coefficient,
                          double trust_eps, int64_t phase, torch::Tensor ratios, std::vector<int64_t> rows,
                          bool caution, bool decay_after_step, double decay_lr) {
  check_quantized(params, m_codes, m_absmax, rows, "exp_avg");
  check_quantized(params, s_codes, s_absmax, rows, "exp_avg_sqrt");
  TORCH_CHECK(tables.size() == 4, "torchlamb fused: lamb_step_8bit takes two code maps");
  const CodeMap m_map = code_map(tables, 0), s_map = code_map(tables, 2);
  const LambStep lamb(params, grads, steps, phase, ratios, lr, beta1, beta2, weight_decay, bias_correction,
                      decay_outside_ratio,
                      Trust{adapt, weight_lo, weight_hi, ratio_lo, ratio_hi, trust_coefficient, trust_eps}, caution,
                      decay_after_step, decay_lr);
  return lamb.walk(
      [&](int64_t i, int64_t begin, int64_t end) {
        Sums sums;
        TORCHLAMB_DISPATCH(params[i], "lamb8_pass1", [&] {
          sums = lamb8_pass1<scalar_t>(
              ptr<scalar_t>(params[i], 0), ptr<scalar_t>(grads[i], 0), ptr<uint8_t>(m_codes[i], 0),
              ptr<float>(m_absmax[i], 0), ptr<uint8_t>(s_codes[i], 0), ptr<float>(s_absmax[i], 0), begin, end,
              Blocks(rows[i]), m_map, s_map, grad_factor, beta1, beta2, eps, lamb.decay, lamb.theta_factor,
              lamb.before[i].c1, lamb.before[i].c2, lamb.caution);
        });
        return sums;
      },
      [&](int64_t i, int64_t begin, int64_t end, const Stats& s) {
        TORCHLAMB_DISPATCH(params[i], "lamb8_pass2", [&] {
          lamb8_pass2<scalar_t>(ptr<scalar_t>(params[i], 0), ptr<uint8_t>(m_codes[i], 0), ptr<float>(m_absmax[i], 0),
                                ptr<uint8_t>(s_codes[i], 0), ptr<float>(s_absmax[i], 0), begin, end,
                                Blocks(rows[i]), m_map, s_map, eps, lamb.decay, s.c1, s.c2, s.scale,
                                lamb.caution ? ptr<scalar_t>(grads[i], 0) : nullptr, grad_factor, lamb.caution,
                                s.caution, lamb.after);
        });
      },
      kQuantBlock, &rows);
}
