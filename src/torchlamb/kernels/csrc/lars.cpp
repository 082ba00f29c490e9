// LARS: pass 1 (‖θ‖², ‖g‖², ‖g + λθ‖², the same whatever the momentum's storage) and pass 2 (the momentum and θ)
// with the momentum in float (the parameter's dtype, or bfloat16/float16 beside float32 parameters) and in 8 bits,
// and the entry points lars_step and lars_step_8bit.

namespace {
// The columns of pass 1's sums, ‖θ‖², ‖g‖², ‖g + λθ‖² (what kNorms returns; torchlamb names them too).
enum LarsNorm : size_t { kLarsWeight = 0, kLarsGrad = 1, kLarsDecayedGrad = 2 };

// Pass 1 on elements [0, n): ‖θ‖², ‖g‖², ‖g + λθ‖² of the range (g times grad_factor). Reads only.
template <typename T>
Sums lars_pass1(const T* __restrict__ theta, const T* __restrict__ g, int64_t n, double grad_factor,
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
    sums[kLarsWeight] += theta_sq;
    sums[kLarsGrad] += g_sq;
    sums[kLarsDecayedGrad] += u_sq;
  }
  return sums;
}

// Pass 2 on elements [0, n): b ← μb + r·u, θ ← θ − lr·(b, or r·u + μb with Nesterov). The caller's `ratio_` is
// what multiplies u on its way into the buffer and `lr_` what multiplies the direction (LarsStep::finish, step_lr):
// with the lr inside the momentum and dampening, c·lr·r and 1.
template <typename T, typename S>
void lars_pass2(T* __restrict__ theta, const T* __restrict__ g, S* __restrict__ b, int64_t n, double grad_factor,
                double weight_decay, double momentum, bool nesterov, double ratio_, double lr_) {
  using opmath_t = at::opmath_type<T>;
  const opmath_t scale = grad_factor, decay = weight_decay, mu = momentum, ratio = ratio_, lr = lr_;
  for (int64_t k = 0; k < n; ++k) {
    const opmath_t t = static_cast<opmath_t>(theta[k]);
    const opmath_t scaled = (static_cast<opmath_t>(g[k]) * scale + decay * t) * ratio;
    const S b_new = static_cast<S>(mu * static_cast<opmath_t>(b[k]) + scaled);
    b[k] = b_new;
    const opmath_t direction = nesterov ? scaled + mu * static_cast<opmath_t>(b_new) : static_cast<opmath_t>(b_new);
    theta[k] = static_cast<T>(t - lr * direction);
  }
}

// LARS pass 2 on the blocks of elements [begin, end) of a tensor: b ← μb + r·u stored in 8 bits, then
// θ ← θ − lr·(b as stored, or r·u + μb with Nesterov); `ratio_` and `lr_` as for lars_pass2.
template <typename T>
void lars8_pass2(T* __restrict__ theta, const T* __restrict__ g, uint8_t* __restrict__ b_codes,
                 float* __restrict__ b_absmax, int64_t begin, int64_t end, const Blocks& blocks, const CodeMap& map,
                 double grad_factor, double weight_decay, double momentum, bool nesterov, double ratio_, double lr_) {
  using opmath_t = at::opmath_type<T>;
  const float scale = grad_factor, decay = weight_decay, mu = momentum, ratio = ratio_;
  const opmath_t lr = lr_;
  float b[kQuantBlock], scaled[kQuantBlock];
  for (int64_t start = begin, len = 0; start < end; start += len) {
    len = blocks.length(start, end);
    const int64_t block = blocks.index(start);
    T* __restrict__ t = theta + start;
    const T* __restrict__ grad = g + start;
    uint8_t* codes = b_codes + start;
    prefetch_block(grad, kAhead);
    prefetch_block(t, kAhead);
    prefetch_block(codes, kAhead);
    map.decode_block(codes, len, b_absmax[block], b);
    for (int64_t k = 0; k < len; ++k) {
      scaled[k] = (static_cast<float>(grad[k]) * scale + decay * static_cast<float>(t[k])) * ratio;
      b[k] = mu * b[k] + scaled[k];
    }
    const float b_max = absmax_of(b, len);
    b_absmax[block] = b_max;
    map.encode_block(b, len, b_max, false, codes);
    map.decode_block(codes, len, b_max, b);
    for (int64_t k = 0; k < len; ++k) {
      const float direction = nesterov ? scaled[k] + mu * b[k] : b[k];
      t[k] = static_cast<T>(static_cast<opmath_t>(t[k]) - lr * direction);
    }
  }
}

// Pass 1 on elements [begin, end) of a tensor of any dtype. One function for the float and 8-bit steps, as the
// momentum is not read until pass 2.
Sums lars_pass1_on(const torch::Tensor& param, const torch::Tensor& grad, int64_t begin, int64_t end,
                   double grad_factor, double weight_decay) {
  Sums sums;
  TORCHLAMB_DISPATCH(param, "lars_pass1", [&] {
    sums = lars_pass1<scalar_t>(ptr<scalar_t>(param, begin), ptr<scalar_t>(grad, begin), end - begin, grad_factor,
                                weight_decay);
  });
  return sums;
}

// What the float and 8-bit steps share: the setup (set_up_step), pass 1 and, after it, each tensor's norms, the
// ratio's denominator and the ratio (the caller's in the apply phase), and what pass 2 multiplies by.
struct LarsStep {
  const std::vector<torch::Tensor>& params;
  const std::vector<torch::Tensor>& grads;
  double grad_factor, weight_decay;
  bool split_denominator;
  // zero_fallback="grad": r = 1 where ‖g‖ = 0 (the denominator is reported as 0 there, as Lars._update_norm does).
  bool fallback_on_grad;
  double lr;
  bool lr_inside_momentum;
  double dampening;
  StepSetup setup;

  // The entry point checks its state first: this counts the step.
  LarsStep(const std::vector<torch::Tensor>& params_, std::vector<torch::Tensor>& grads_,
           const std::vector<torch::Tensor>& steps, int64_t phase, const torch::Tensor& ratios, double grad_factor_,
           double weight_decay_, bool split_denominator_, bool fallback_on_grad_, double lr_,
           bool lr_inside_momentum_, double dampening_, const Trust& trust)
      : params(params_),
        grads(grads_),
        grad_factor(grad_factor_),
        weight_decay(weight_decay_),
        split_denominator(split_denominator_),
        fallback_on_grad(fallback_on_grad_),
        lr(lr_),
        lr_inside_momentum(lr_inside_momentum_),
        dampening(dampening_),
        setup(set_up_step(params, grads_, steps, phase, ratios, /*pass2_reads_grads=*/true, trust)) {}

  // After pass 1 of tensor i: ‖θ‖, the denominator (‖g‖ + λ‖θ‖ when split, else ‖g + λθ‖; 0 where ‖g‖ = 0 with
  // fallback_on_grad) and the ratio r; `scale`: what multiplies u on its way into the buffer, c·s with s = lr·r
  // (lr inside the momentum) or r, and c = 1 at the tensor's first step (its count, this step included, is 1), else
  // 1 − dampening (torch.optim.SGD). By default c·s is r·1, exactly r. Nesterov has no dampening: its s·u is c·s·u.
  Stats finish(int64_t i, const Sums& sums) const {
    Stats s;
    s.weight_norm = std::sqrt(sums[kLarsWeight]);
    s.update_norm = split_denominator ? std::sqrt(sums[kLarsGrad]) + weight_decay * s.weight_norm
                                      : std::sqrt(sums[kLarsDecayedGrad]);
    if (fallback_on_grad && !(std::sqrt(sums[kLarsGrad]) > 0)) s.update_norm = 0;
    const double* given = setup.given_ratio(i);
    s.ratio = given ? *given : setup.trust.ratio(s.weight_norm, s.update_norm);
    const double damped = setup.counts[i] == 1 ? 1.0 : 1.0 - dampening;
    s.scale = damped * (lr_inside_momentum ? lr * s.ratio : s.ratio);
    return s;
  }

  // What multiplies the direction d in θ ← θ − (·)·d: lr, or 1 with the lr inside the momentum.
  double step_lr() const { return lr_inside_momentum ? 1.0 : lr; }

  // The step (or its phase) over all tensors with the momentum's own pass 2: what each_tensor returns.
  template <typename Pass2>
  StepResult walk(const Pass2& pass2, int64_t align = 1, const std::vector<int64_t>* rows = nullptr) const {
    return each_tensor(
        params, setup.phase,
        [&](int64_t i, int64_t begin, int64_t end) {
          return lars_pass1_on(params[i], grads[i], begin, end, grad_factor, weight_decay);
        },
        [&](int64_t i, const Sums& sums) { return finish(i, sums); }, pass2, align, rows);
  }
};
}  // namespace

// One LARS step over all tensors (steps counted here), or one phase of it (see Phase); `ratios` (r, after every
// clip) is read in the apply phase only. kNorms returns ‖θ‖², ‖g‖², ‖g + λθ‖² (LarsNorm); kWhole returns ‖θ‖, the
// denominator and r. lr is the group's current lr; larc_lr the one larc_clip divides by (the same, in kWhole);
// larc_clips_fallback: whether larc_clip applies to the fallback ratio too (True) or to computed ratios only.
StepResult lars_step(std::vector<torch::Tensor> params, std::vector<torch::Tensor> grads,
                     std::vector<torch::Tensor> momentum_buffers, std::vector<torch::Tensor> steps, double lr,
                     double momentum, double weight_decay, bool nesterov, bool split_denominator,
                     bool lr_inside_momentum, double dampening, bool fallback_on_grad, double grad_factor,
                     bool adapt, double weight_lo, double weight_hi, double ratio_lo, double ratio_hi,
                     double trust_coefficient, double trust_eps, bool larc_clip, double larc_lr,
                     bool larc_clips_fallback, int64_t phase, torch::Tensor ratios) {
  check_state(params, momentum_buffers, "momentum_buffers");
  const LarsStep lars(params, grads, steps, phase, ratios, grad_factor, weight_decay, split_denominator,
                      fallback_on_grad, lr, lr_inside_momentum, dampening,
                      Trust{adapt, weight_lo, weight_hi, ratio_lo, ratio_hi, trust_coefficient, trust_eps, larc_clip,
                            larc_lr, larc_clips_fallback});
  return lars.walk([&](int64_t i, int64_t begin, int64_t end, const Stats& s) {
    dispatch_with_state(params[i], momentum_buffers[i], [&](auto t, auto state) {
      using T = decltype(t);
      using S = decltype(state);
      lars_pass2<T, S>(ptr<T>(params[i], begin), ptr<T>(grads[i], begin), ptr<S>(momentum_buffers[i], begin),
                       end - begin, grad_factor, weight_decay, momentum, nesterov, s.scale, lars.step_lr());
    });
  });
}

// LARS with an 8-bit momentum buffer (signed codes): a whole step, or one phase of it, as lars_step. `tables`:
// the signed map's values and entries.
StepResult lars_step_8bit(std::vector<torch::Tensor> params, std::vector<torch::Tensor> grads,
                          std::vector<torch::Tensor> b_codes, std::vector<torch::Tensor> b_absmax,
                          std::vector<torch::Tensor> steps, std::vector<torch::Tensor> tables, double lr,
                          double momentum, double weight_decay, bool nesterov, bool split_denominator,
                          bool lr_inside_momentum, double dampening, bool fallback_on_grad, double grad_factor,
                          bool adapt, double weight_lo, double weight_hi, double ratio_lo, double ratio_hi,
                          double trust_coefficient, double trust_eps, bool larc_clip, double larc_lr,
                          bool larc_clips_fallback, int64_t phase, torch::Tensor ratios,
                          std::vector<int64_t> rows) {
  check_quantized(params, b_codes, b_absmax, rows, "momentum_buffer");
  TORCH_CHECK(tables.size() == 2, "torchlamb fused: lars_step_8bit takes one code map");
  const CodeMap map = code_map(tables, 0);
  const LarsStep lars(params, grads, steps, phase, ratios, grad_factor, weight_decay, split_denominator,
                      fallback_on_grad, lr, lr_inside_momentum, dampening,
                      Trust{adapt, weight_lo, weight_hi, ratio_lo, ratio_hi, trust_coefficient, trust_eps, larc_clip,
                            larc_lr, larc_clips_fallback});
  return lars.walk(
      [&](int64_t i, int64_t begin, int64_t end, const Stats& s) {
        TORCHLAMB_DISPATCH(params[i], "lars8_pass2", [&] {
          lars8_pass2<scalar_t>(ptr<scalar_t>(params[i], 0), ptr<scalar_t>(grads[i], 0), ptr<uint8_t>(b_codes[i], 0),
                                ptr<float>(b_absmax[i], 0), begin, end, Blocks(rows[i]), map, grad_factor,
                                weight_decay, momentum, nesterov, s.scale, lars.step_lr());
        });
      },
      kQuantBlock, &rows);
}
