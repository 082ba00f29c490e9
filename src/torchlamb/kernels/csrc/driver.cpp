// The fused CPU steps of LAMB and LARS: what every step shares. The parallel walk over the tensors (pass 1, the
// trust ratio, pass 2), the phases of a sharded step, the trust ratio rule, the argument checks and the setup that
// the float and 8-bit entry points share.
//
// The files of csrc/ are one translation unit: cpu.py joins them in this order (driver, quantizer, lamb, lars,
// testing), each using what the ones before it define, and compiles the text at first use with
// torch.utils.cpp_extension.load_inline. They are not #included: load_inline rebuilds only when the text it is
// given changes. It binds five functions:
//   lamb_step, lamb_step_8bit    lamb.cpp: a LAMB step (or one phase of it), its moments in float or in 8 bits
//   lars_step, lars_step_8bit    lars.cpp: a LARS step (or one phase of it), its momentum in float or in 8 bits
//   quantize_8bit                testing.cpp: the kernels' block quantizer, for the tests
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <limits>
#include <type_traits>
#include <vector>

namespace {
// Tensors of at least kGrain elements are split across threads; smaller ones run whole, several at once.
constexpr int64_t kGrain = 32768;
// Norms are summed in the compute type over blocks of kBlock elements (those sums vectorise), blocks in double.
constexpr int64_t kBlock = 1024;
// Pass 2 walks each thread's range backwards in chunks of kChunk elements, so it starts on the elements pass 1
// touched last, which are still in cache.
constexpr int64_t kChunk = 16384;

// The sums of squares pass 1 returns for a range of a tensor; lamb.cpp and lars.cpp name their columns (the fourth
// is used by LAMB's caution only).
using Sums = std::array<double, 4>;

Sums add(const Sums& a, const Sums& b) { return {a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3]}; }

// The trust stage of torchlamb.trust.trust_ratio, for one tensor (the tests hold the two to the same values).
struct Trust {
  bool adapt;
  double weight_lo, weight_hi, ratio_lo, ratio_hi, coefficient, eps;
  // LARS's larc_clip (apex LARC's clip mode, trust_ratio's larc_lr): after the clamp, r ← min(r / lr, 1), written as
  // trust_ratio writes it (r < lr ? r / lr : 1), so 1 at lr = 0 and for a NaN r; the fallback ratio too unless
  // larc_clips_fallback is false (larc_clip="computed", as apex). LAMB leaves it off.
  bool larc_clip = false;
  double larc_lr = 0;
  bool larc_clips_fallback = true;

  double ratio(double weight_norm, double update_norm) const {
    if (!adapt) return 1.0;
    const double weight = std::min(std::max(weight_norm, weight_lo), weight_hi);
    const bool computed = weight > 0 && update_norm > 0;
    const double r = computed ? coefficient * weight / (update_norm + eps) : 1.0;
    const double clipped = std::min(std::max(r, ratio_lo), ratio_hi);
    if (!larc_clip || !(computed || larc_clips_fallback)) return clipped;
    return clipped < larc_lr ? clipped / larc_lr : 1.0;
  }
};

// What pass 2 of tensor i needs: its norms, its ratio and the numbers of its update.
struct Stats {
  double weight_norm = 0, update_norm = 0, ratio = 1, c1 = 1, c2 = 1, scale = 0;
  double caution = 1;  // LAMB's caution: the factor k of a⊙M
};

// A step runs in one call (kWhole) where every tensor is whole on this process. Where tensors are sharded across
// processes, their norms must be summed over all shards between the passes: kNorms runs pass 1 and returns the
// local sums of squares, the caller all-reduces them and computes the ratios, and kApply runs pass 2 with them.
enum Phase : int64_t { kWhole = 0, kNorms = 1, kApply = 2 };

// What a step returns: see each_tensor.
using StepResult = std::vector<torch::Tensor>;

// kWhole's [n, 3] float64 sums as the three per-tensor columns ‖θ‖, the ratio's denominator and r, in the dtype the
// other paths give them (torchlamb.trust.norm_dtype: float64 where a parameter is float64, else float32; the kernels
// take no complex parameters). Converted here, on the calling thread and rounding as Tensor.to does, rather than by
// .to() and unbind() in Python: those two small operations took ~30 µs of a ~230 µs Lamb step over one 65K-value
// tensor (section timings on a 2-core AMD EPYC VM; they ran ~13 µs alone, slower right after the kernel's passes).
StepResult norm_columns(const torch::Tensor& sums, const std::vector<torch::Tensor>& params) {
  const bool wide = std::any_of(params.begin(), params.end(),
                                [](const torch::Tensor& p) { return p.scalar_type() == torch::kFloat64; });
  const int64_t n = sums.size(0);
  const double* in = sums.data_ptr<double>();
  std::vector<torch::Tensor> columns;
  for (int64_t c = 0; c < 3; ++c) {
    auto column = torch::empty({n}, wide ? torch::kFloat64 : torch::kFloat32);
    if (wide) {
      double* out = column.data_ptr<double>();
      for (int64_t i = 0; i < n; ++i) out[i] = in[3 * i + c];
    } else {
      float* out = column.data_ptr<float>();
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(in[3 * i + c]);
    }
    columns.push_back(column);
  }
  return columns;
}

// The driver. For every tensor i: pass 1 (sums = Σ pass1(i, begin, end) over its elements), then
// finish(i, sums) -> Stats (norms, ratio, step size), then pass 2 (pass2(i, begin, end, stats) over its elements).
// kWhole returns ‖θ‖, the ratio's denominator and r per tensor (norm_columns); kNorms returns the first `columns`
// sums of pass 1 ([n, columns] float64); kApply calls finish with empty sums (the ratio comes from the caller) and
// returns nothing. The result is a list of tensors: three, one or none.
// Ranges begin at multiples of `align` elements, or with `rows` (8-bit state: each tensor's row length) at the
// starts of blocks of `align` elements laid out within rows: each block is quantized whole by one thread.
//
// The per-range functions take raw __restrict__ pointers as arguments: captured by reference in a lambda, the
// pointers would be reloaded after every store and the loops would not vectorise.
template <typename Pass1, typename Finish, typename Pass2>
StepResult each_tensor(const std::vector<torch::Tensor>& params, Phase phase, const Pass1& pass1,
                       const Finish& finish, const Pass2& pass2, int64_t align = 1,
                       const std::vector<int64_t>* rows = nullptr, int64_t columns = 3) {
  const int64_t n = static_cast<int64_t>(params.size());
  const int64_t width = phase == kNorms ? columns : 3;
  auto result = torch::zeros({phase == kApply ? 0 : n, width}, torch::kFloat64);
  double* out = result.data_ptr<double>();
  const int64_t grain = std::max<int64_t>(1, kGrain / align), chunk = std::max<int64_t>(1, kChunk / align);
  // One tensor, or a range of it split among threads by `split` (parallel_reduce and parallel_for split alike),
  // in units of `align` elements.
  auto run = [&](int64_t i, bool split) {
    const int64_t numel = params[i].numel();
    const int64_t row = rows ? std::max<int64_t>(1, (*rows)[i]) : numel, per_row = (row + align - 1) / align;
    const int64_t units = rows ? numel / row * per_row : (numel + align - 1) / align;
    auto element = [&](int64_t unit) {
      return rows ? unit / per_row * row + std::min(row, unit % per_row * align) : std::min(numel, unit * align);
    };
    Sums sums{0, 0, 0, 0};
    if (phase != kApply) {
      sums = split ? at::parallel_reduce(
                         0, units, grain, Sums{0, 0, 0, 0},
                         [&](int64_t begin, int64_t end, Sums acc) {
                           return add(acc, pass1(i, element(begin), element(end)));
                         },
                         add)
                   : pass1(i, 0, numel);
    }
    if (phase == kNorms) {
      std::copy(sums.begin(), sums.begin() + width, out + width * i);
      return;
    }
    const Stats stats = finish(i, sums);
    if (phase == kWhole) {
      out[3 * i] = stats.weight_norm;
      out[3 * i + 1] = stats.update_norm;
      out[3 * i + 2] = stats.ratio;
    }
    if (!split) {
      pass2(i, 0, numel, stats);
      return;
    }
    // Each thread walks its part backwards: after pass 1 the end of its part is what is still in cache.
    at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
      for (int64_t hi = end; hi > begin; hi -= chunk) pass2(i, element(std::max(begin, hi - chunk)), element(hi), stats);
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
  if (phase == kWhole) return norm_columns(result, params);
  if (phase == kNorms) return {result};
  return {};
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

// Calls f(T{}, S{}) with T the parameter's scalar type and S its state's: the same type, or bfloat16/float16 state
// beside float32 parameters (state_dtype), read and written in place, computed in float32.
template <typename F>
void dispatch_with_state(const torch::Tensor& param, const torch::Tensor& state, const F& f) {
  TORCHLAMB_DISPATCH(param, "torchlamb_fused_step", [&] {
    if (state.scalar_type() == param.scalar_type()) {
      f(scalar_t{}, scalar_t{});
    } else if constexpr (std::is_same_v<scalar_t, float>) {
      if (state.scalar_type() == at::kBFloat16) {
        f(float{}, c10::BFloat16{});
      } else {
        f(float{}, c10::Half{});
      }
    }
  });
}

// The state the kernels read with parameter i's index: its size and contiguous memory, in its dtype or (float32
// parameters) in bfloat16/float16.
void check_state(const std::vector<torch::Tensor>& params, const std::vector<torch::Tensor>& states,
                 const char* name) {
  TORCH_CHECK(states.size() == params.size(), "torchlamb fused: ", name, " has ", states.size(), " tensors for ",
              params.size(), " parameters");
  for (size_t i = 0; i < params.size(); ++i) {
    const auto dtype = states[i].scalar_type();
    const bool narrower = params[i].scalar_type() == torch::kFloat32 && (dtype == at::kBFloat16 || dtype == at::kHalf);
    TORCH_CHECK(states[i].is_contiguous() && states[i].device().is_cpu() && states[i].numel() == params[i].numel() &&
                    (dtype == params[i].scalar_type() || narrower),
                "torchlamb fused: ", name, "[", i, "] does not match its parameter's size and layout, or its dtype "
                "is neither the parameter's nor (for float32 parameters) bfloat16/float16");
  }
}

// What every entry point, LAMB or LARS, float or 8-bit, sets up alike: the phase, the caller's ratios (kApply), the
// trust rule and the step counts.
struct StepSetup {
  Phase phase;
  const double* given;         // the caller's ratios in the apply phase, else null
  Trust trust;
  std::vector<double> counts;  // each parameter's step count t, this step included

  // Tensor i's ratio from the caller (kApply), or null: the trust rule decides.
  const double* given_ratio(int64_t i) const { return given ? given + i : nullptr; }
};

// Each gradient as the kernels read it: in its parameter's dtype and contiguous, else replaced by such a copy. Here
// rather than in Python, where looking at every gradient cost ~0.5 µs each (1 ms a step for 2000 tensors).
void conform_grads(const std::vector<torch::Tensor>& params, std::vector<torch::Tensor>& grads) {
  if (grads.size() != params.size()) return;  // check_like_params names the mismatch
  for (size_t i = 0; i < grads.size(); ++i) {
    if (grads[i].scalar_type() != params[i].scalar_type() || !grads[i].is_contiguous()) {
      grads[i] = grads[i].to(params[i].scalar_type()).contiguous();
    }
  }
}

// Checks the phase, the ratios, the gradients (read by pass 1, and by pass 2 where `pass2_reads_grads`; made
// conforming first) and the step counts, then counts the step. The entry point checks its state before: a call that
// fails counts no step.
StepSetup set_up_step(const std::vector<torch::Tensor>& params, std::vector<torch::Tensor>& grads,
                      const std::vector<torch::Tensor>& steps, int64_t phase_, const torch::Tensor& ratios,
                      bool pass2_reads_grads, const Trust& trust) {
  const Phase phase = static_cast<Phase>(phase_);
  const double* given = given_ratios(params, phase, ratios);
  if (phase != kApply || pass2_reads_grads) {
    conform_grads(params, grads);
    check_like_params(params, grads, "grads");
  }
  check_steps(params, steps);
  std::vector<double> counts(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) counts[i] = count_step(steps[i], phase);
  return StepSetup{phase, given, trust, std::move(counts)};
}
}  // namespace
