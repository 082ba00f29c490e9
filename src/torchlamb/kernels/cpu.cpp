// The fused CPU steps of LAMB and LARS (see cpu.py, which compiles this file at first use with
// torch.utils.cpp_extension.load_inline and binds lamb_step and lars_step).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#if defined(__AVX512F__)
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
// Ranges begin at multiples of `align` elements, or with `rows` (8-bit state: each tensor's row length) at the
// starts of blocks of `align` elements laid out within rows: each block is quantized whole by one thread.
//
// The per-range functions take raw __restrict__ pointers as arguments: captured by reference in a lambda, the
// pointers would be reloaded after every store and the loops would not vectorise.
template <typename Norms, typename Finish, typename Apply>
torch::Tensor each_tensor(const std::vector<torch::Tensor>& params, Phase phase, const Norms& norms,
                          const Finish& finish, const Apply& apply, int64_t align = 1,
                          const std::vector<int64_t>* rows = nullptr) {
  const int64_t n = static_cast<int64_t>(params.size());
  auto result = torch::zeros({phase == kApply ? 0 : n, 3}, torch::kFloat64);
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
    Sums sums{0, 0, 0};
    if (phase != kApply) {
      sums = split ? at::parallel_reduce(
                         0, units, grain, Sums{0, 0, 0},
                         [&](int64_t begin, int64_t end, Sums acc) {
                           return add(acc, norms(i, element(begin), element(end)));
                         },
                         add)
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
    at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
      for (int64_t hi = end; hi > begin; hi -= chunk) apply(i, element(std::max(begin, hi - chunk)), element(hi), stats);
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
template <typename T, typename S>
Sums lamb_moments(T* __restrict__ theta, const T* __restrict__ g, S* __restrict__ m, S* __restrict__ v,
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
      // The moments are rounded to their storage type before use, so that pass 2 recomputes the same u.
      const S m_new = static_cast<S>(m_old + one_minus_b1 * (grad - m_old));
      const S v_new = static_cast<S>(b2 * static_cast<opmath_t>(v[k]) + one_minus_b2 * grad * grad);
      m[k] = m_new;
      v[k] = v_new;
      const opmath_t u = lamb_direction<opmath_t>(static_cast<opmath_t>(m_new), static_cast<opmath_t>(v_new), t, c1,
                                                  c2, eps, decay);
      theta_sq += t * t;
      u_sq += u * u;
    }
    sums[0] += theta_sq;
    sums[1] += u_sq;
  }
  return sums;
}

// Pass 2 on elements [0, n): θ ← θ + scale·u, u recomputed exactly as in pass 1.
template <typename T, typename S>
void lamb_apply(T* __restrict__ theta, const S* __restrict__ m, const S* __restrict__ v, int64_t n, double eps_,
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
template <typename T, typename S>
void lars_apply(T* __restrict__ theta, const T* __restrict__ g, S* __restrict__ b, int64_t n, double grad_factor,
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

// ---- 8-bit state (torchlamb.quantized) -------------------------------------------------------------------------
// A state tensor is stored as one uint8 code per element and one float absmax per block of kQuantBlock elements:
// x ≈ values[code] · absmax. The code of x is the number of midpoints (between neighbouring values) strictly below
// q = x · (1/absmax) — the rule of the torch path (torch.bucketize), so both store the same codes for the same
// values. One table read finds it (torchlamb.quantized.CodeMap.entries): entries[upper 16 bits of q] holds the
// number of midpoints below every float with those bits, and above bit 8 the order key of the one midpoint among
// them (0xFFFF: none); q counts that midpoint when its own key is larger.
//
// The loops are written per block, in pieces the compiler vectorises (the arithmetic, the block's absmax), with the
// table reads in loops of their own; where the CPU has AVX-512 the table reads are explicit: a gather for the code,
// and (with VBMI) byte permutes for the values, which are several times cheaper than gathers.
constexpr int64_t kQuantBlock = 256;  // torchlamb.quantized.BLOCK, checked by the caller
constexpr int64_t kAhead = 2 * kQuantBlock;  // how far ahead the 8-bit loops prefetch

inline uint32_t float_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
}

// Among floats with the same upper 16 bits, a larger key (the lower 16 bits, reversed when negative) is a larger
// float (torchlamb.quantized.order_key).
inline uint32_t order_key(uint32_t bits) { return (bits & 0xFFFFu) ^ ((bits >> 31) ? 0xFFFFu : 0u); }

struct CodeMap {
  const float* values;     // 256 sorted values in [-1, 1]
  const int32_t* entries;  // 65536: see above
  uint8_t zero;            // the code of 0
#if defined(__AVX512VBMI__)
  // Byte j of the 256 values: values 0-63, 64-127, 128-191, 192-255 in planes[4j .. 4j+3].
  std::array<__m512i, 16> planes;
#endif

  uint8_t encode(float q) const {
    const uint32_t bits = float_bits(q);
    const int32_t entry = entries[bits >> 16];
    return static_cast<uint8_t>((entry & 0xFF) + (order_key(bits) > static_cast<uint32_t>(entry >> 8)));
  }

  // The codes of a block's values x[0, n) with their absmax (not > 0: every code is that of 0). `floor`: a positive
  // value never takes the code of 0 (the unsigned map of √v).
  void encode_block(const float* __restrict__ x, int64_t n, float absmax, bool floor,
                    uint8_t* __restrict__ codes) const {
    if (absmax > 0) {
      const float inverse = 1.0f / absmax;
      int64_t k = 0;
#if defined(__AVX512F__)
      const __m512 scale = _mm512_set1_ps(inverse);
      const __m512i low = _mm512_set1_epi32(0xFFFF), byte = _mm512_set1_epi32(0xFF), one = _mm512_set1_epi32(1);
      for (; k + 16 <= n; k += 16) {
        const __m512i bits = _mm512_castps_si512(_mm512_mul_ps(_mm512_loadu_ps(x + k), scale));
        const __m512i entry = _mm512_i32gather_epi32(_mm512_srli_epi32(bits, 16), entries, 4);
        const __m512i key = _mm512_xor_si512(_mm512_and_si512(bits, low),
                                             _mm512_and_si512(_mm512_srai_epi32(bits, 31), low));
        const __m512i start = _mm512_and_si512(entry, byte);
        const __m512i code = _mm512_mask_add_epi32(
            start, _mm512_cmpgt_epi32_mask(key, _mm512_srli_epi32(entry, 8)), start, one);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + k), _mm512_cvtepi32_epi8(code));
      }
#endif
      for (; k < n; ++k) codes[k] = encode(x[k] * inverse);
    } else {
      std::memset(codes, zero, n);
    }
    if (floor) {
      const uint8_t z = zero;
      for (int64_t k = 0; k < n; ++k) codes[k] = (codes[k] == z && x[k] > 0) ? z + 1 : codes[k];
    }
  }

  // out[k] = values[codes[k]] · absmax for k in [0, n).
  void decode_block(const uint8_t* __restrict__ codes, int64_t n, float absmax, float* __restrict__ out) const {
    int64_t k = 0;
#if defined(__AVX512VBMI__)
    // 64 codes at a time: each byte of their values by two 128-entry byte permutes, then the bytes interleaved into
    // floats. The codes are first reordered so that the interleaving leaves the floats in order: position
    // 16L + 4j + i takes code 16j + 4L + i.
    alignas(64) static const uint8_t order[64] = {
#define TORCHLAMB_ROW(L) 4 * L, 4 * L + 1, 4 * L + 2, 4 * L + 3, 16 + 4 * L, 17 + 4 * L, 18 + 4 * L, 19 + 4 * L, \
                         32 + 4 * L, 33 + 4 * L, 34 + 4 * L, 35 + 4 * L, 48 + 4 * L, 49 + 4 * L, 50 + 4 * L, 51 + 4 * L
        TORCHLAMB_ROW(0), TORCHLAMB_ROW(1), TORCHLAMB_ROW(2), TORCHLAMB_ROW(3)
#undef TORCHLAMB_ROW
    };
    const __m512i reorder = _mm512_load_si512(order);
    const __m512 scale = _mm512_set1_ps(absmax);
    for (; k + 64 <= n; k += 64) {
      const __m512i index = _mm512_permutexvar_epi8(reorder, _mm512_loadu_si512(codes + k));
      const __mmask64 upper = _mm512_movepi8_mask(index);  // codes 128-255
      __m512i b[4];
      for (int j = 0; j < 4; ++j) {
        b[j] = _mm512_mask_blend_epi8(upper, _mm512_permutex2var_epi8(planes[4 * j], index, planes[4 * j + 1]),
                                      _mm512_permutex2var_epi8(planes[4 * j + 2], index, planes[4 * j + 3]));
      }
      const __m512i lo01 = _mm512_unpacklo_epi8(b[0], b[1]), hi01 = _mm512_unpackhi_epi8(b[0], b[1]);
      const __m512i lo23 = _mm512_unpacklo_epi8(b[2], b[3]), hi23 = _mm512_unpackhi_epi8(b[2], b[3]);
      const __m512i floats[4] = {_mm512_unpacklo_epi16(lo01, lo23), _mm512_unpackhi_epi16(lo01, lo23),
                                 _mm512_unpacklo_epi16(hi01, hi23), _mm512_unpackhi_epi16(hi01, hi23)};
      for (int j = 0; j < 4; ++j) _mm512_storeu_ps(out + k + 16 * j, _mm512_mul_ps(_mm512_castsi512_ps(floats[j]), scale));
    }
#endif
    const float* __restrict__ table = values;
    for (; k < n; ++k) out[k] = table[codes[k]] * absmax;
  }
};

CodeMap code_map(const std::vector<torch::Tensor>& tables, size_t first) {
  const auto& values = tables[first];
  const auto& entries = tables[first + 1];
  TORCH_CHECK(values.numel() == 256 && values.scalar_type() == torch::kFloat32 && values.is_contiguous() &&
                  entries.numel() == 65536 && entries.scalar_type() == torch::kInt32 && entries.is_contiguous(),
              "torchlamb fused: a code map is 256 float32 values and 65536 int32 entries");
  const float* v = values.data_ptr<float>();
  CodeMap map{v, entries.data_ptr<int32_t>(), static_cast<uint8_t>(std::find(v, v + 256, 0.0f) - v)};
#if defined(__AVX512VBMI__)
  alignas(64) uint8_t bytes[4][256];
  for (int i = 0; i < 256; ++i) {
    for (int j = 0; j < 4; ++j) bytes[j][i] = static_cast<uint8_t>(float_bits(v[i]) >> (8 * j));
  }
  for (int j = 0; j < 4; ++j) {
    for (int r = 0; r < 4; ++r) map.planes[4 * j + r] = _mm512_load_si512(bytes[j] + 64 * r);
  }
#endif
  return map;
}

// The largest |x| of x[0, n), NaN if any is NaN (as torch's amax): the largest of the bit patterns without the sign,
// compared as integers (ordered as the magnitudes, NaN above infinity), which vectorises where a float max with
// NaN checks does not.
inline float absmax_of(const float* __restrict__ x, int64_t n) {
  uint32_t largest = 0;
  for (int64_t k = 0; k < n; ++k) {
    const uint32_t magnitude = float_bits(x[k]) & 0x7FFFFFFFu;
    largest = magnitude > largest ? magnitude : largest;
  }
  float result;
  std::memcpy(&result, &largest, sizeof result);
  return result;
}

// Every tensor of a quantized state: codes like the parameter (uint8, contiguous), one float absmax per block.
void check_quantized(const std::vector<torch::Tensor>& params, const std::vector<torch::Tensor>& codes,
                     const std::vector<torch::Tensor>& absmax, const std::vector<int64_t>& rows, const char* name) {
  TORCH_CHECK(codes.size() == params.size() && absmax.size() == params.size() && rows.size() == params.size(),
              "torchlamb fused: ", name, " needs codes, absmax and a row length for every parameter");
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(rows[i] > 0 && params[i].numel() % rows[i] == 0, "torchlamb fused: parameter ", i,
                " is not made of rows of ", rows[i], " elements");
    const int64_t blocks = params[i].numel() / rows[i] * ((rows[i] + kQuantBlock - 1) / kQuantBlock);
    TORCH_CHECK(params[i].is_contiguous() && params[i].device().is_cpu(), "torchlamb fused: parameter ", i,
                " is not a contiguous CPU tensor");
    TORCH_CHECK(codes[i].scalar_type() == torch::kUInt8 && codes[i].is_contiguous() && codes[i].is_cpu() &&
                    codes[i].numel() == params[i].numel() && absmax[i].scalar_type() == torch::kFloat32 &&
                    absmax[i].is_contiguous() && absmax[i].is_cpu() && absmax[i].numel() == blocks,
                "torchlamb fused: the 8-bit ", name, " of parameter ", i, " does not fit it");
  }
}

// The blocks of 8-bit state among elements [begin, end) of a tensor whose rows hold `row` elements (begin at a block's
// start): blocks of kQuantBlock elements within each row, the last of a row shorter (torchlamb.quantized.absmax_shape).
struct Blocks {
  int64_t row, per_row;
  explicit Blocks(int64_t row_length)
      : row(std::max<int64_t>(1, row_length)), per_row((row + kQuantBlock - 1) / kQuantBlock) {}
  // The position of the block starting at element `start` among the tensor's absmax values.
  int64_t index(int64_t start) const { return start / row * per_row + start % row / kQuantBlock; }
  int64_t length(int64_t start, int64_t end) const {
    return std::min(std::min(kQuantBlock, end - start), row - start % row);
  }
};

// Asks for the cache lines of the block `ahead` elements on from `from`. The 8-bit loops do much work per block
// between their reads, and without this their first read of each block waited on memory (perf: half the time of
// pass 1's moment loop); with it the 8-bit Lamb step took a fifth less time here. Prefetching past the end of a
// tensor is harmless: a prefetch never faults.
template <typename T>
inline void prefetch_block(const T* from, int64_t ahead) {
  const char* p = reinterpret_cast<const char*>(from + ahead);
  for (int64_t offset = 0; offset < kQuantBlock * static_cast<int64_t>(sizeof(T)); offset += 64) {
    __builtin_prefetch(p + offset);
  }
}

// LAMB's u = (m·c1)/(s·c2 + ε) + decay·θ on one block, from m and s = √v as stored. One compiled function serves
// pass 1 (‖u‖) and pass 2 (the step), so the two compute the same u bit for bit.
template <typename T>
__attribute__((noinline)) void lamb_direction_8bit(const float* __restrict__ m, const float* __restrict__ s,
                                                   const T* __restrict__ theta, int64_t n, float c1, float c2,
                                                   float eps, at::opmath_type<T> decay,
                                                   at::opmath_type<T>* __restrict__ u) {
  using opmath_t = at::opmath_type<T>;
  for (int64_t k = 0; k < n; ++k) {
    u[k] = static_cast<opmath_t>((m[k] * c1) / (s[k] * c2 + eps)) + decay * static_cast<opmath_t>(theta[k]);
  }
}

// LAMB pass 1 on the blocks of elements [begin, end) of a tensor: per block, dequantize m and s = √v, update them
// in float, store their codes and absmax, and sum ‖θ‖² and ‖u‖² with u computed from the values as stored
// (dequantized again), so pass 2 recomputes the same u from the codes.
template <typename T>
Sums lamb_moments_8bit(T* __restrict__ theta, const T* __restrict__ g, uint8_t* __restrict__ m_codes,
                       float* __restrict__ m_absmax, uint8_t* __restrict__ s_codes, float* __restrict__ s_absmax,
                       int64_t begin, int64_t end, const Blocks& blocks, const CodeMap& m_map, const CodeMap& s_map,
                       double grad_factor, double beta1, double beta2, double eps, double decay_,
                       double theta_factor, double c1, double c2) {
  using opmath_t = at::opmath_type<T>;  // θ's arithmetic (double for double); the moments compute in float
  const float one_minus_b1 = 1.0 - beta1, one_minus_b2 = 1.0 - beta2, scale = grad_factor;
  const opmath_t decay = decay_, factor = theta_factor;
  const bool rescale_theta = theta_factor != 1.0;
  float m[kQuantBlock], s[kQuantBlock];
  opmath_t u[kQuantBlock];
  Sums sums{0, 0, 0};
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
    lamb_direction_8bit<T>(m, s, t, len, c1, c2, eps, decay, u);
    opmath_t theta_sq = 0, u_sq = 0;
    for (int64_t k = 0; k < len; ++k) {
      const opmath_t th = static_cast<opmath_t>(t[k]);
      theta_sq += th * th;
      u_sq += u[k] * u[k];
    }
    sums[0] += theta_sq;
    sums[1] += u_sq;
  }
  return sums;
}

// LAMB pass 2 on the blocks of elements [begin, end) of a tensor: θ ← θ + scale·u, u from the stored codes as in
// pass 1.
template <typename T>
void lamb_apply_8bit(T* __restrict__ theta, const uint8_t* __restrict__ m_codes, const float* __restrict__ m_absmax,
                     const uint8_t* __restrict__ s_codes, const float* __restrict__ s_absmax, int64_t begin,
                     int64_t end, const Blocks& blocks, const CodeMap& m_map, const CodeMap& s_map, double eps,
                     double decay_, double c1, double c2, double scale_) {
  using opmath_t = at::opmath_type<T>;
  const opmath_t decay = decay_, scale = scale_;
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
    lamb_direction_8bit<T>(m, s, t, len, c1, c2, eps, decay, u);
    for (int64_t k = 0; k < len; ++k) t[k] = static_cast<T>(static_cast<opmath_t>(t[k]) + scale * u[k]);
  }
}

// LARS pass 2 on the blocks of elements [begin, end) of a tensor: b ← μb + r·u stored in 8 bits, then
// θ ← θ − lr·(b as stored, or r·u + μb with Nesterov).
template <typename T>
void lars_apply_8bit(T* __restrict__ theta, const T* __restrict__ g, uint8_t* __restrict__ b_codes,
                     float* __restrict__ b_absmax, int64_t begin, int64_t end, const Blocks& blocks,
                     const CodeMap& map, double grad_factor,
                     double weight_decay, double momentum, bool nesterov, double ratio_, double lr_) {
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

// After pass 1 of a LAMB tensor: its norms, its ratio (the caller's in the apply phase: `given`), its step size.
Stats lamb_finish(Stats s, const Sums& sums, const double* given, const Trust& trust) {
  s.weight_norm = std::sqrt(sums[0]);
  s.update_norm = std::sqrt(sums[1]);
  s.ratio = given ? *given : trust.ratio(s.weight_norm, s.update_norm);
  s.scale *= s.ratio;
  return s;
}

// LARS pass 1 on elements [begin, end) of a tensor: ‖θ‖², ‖g‖², ‖g + λθ‖².
Sums lars_range_norms(const torch::Tensor& param, const torch::Tensor& grad, int64_t begin, int64_t end,
                      double grad_factor, double weight_decay) {
  Sums sums;
  TORCHLAMB_DISPATCH(param, "lars_norms", [&] {
    sums = lars_norms<scalar_t>(ptr<scalar_t>(param, begin), ptr<scalar_t>(grad, begin), end - begin, grad_factor,
                                weight_decay);
  });
  return sums;
}

// After pass 1 of a LARS tensor: its norms, the ratio's denominator and the ratio (the caller's: `given`).
Stats lars_finish(const Sums& sums, bool split_denominator, double weight_decay, const double* given,
                  const Trust& trust) {
  Stats s;
  s.weight_norm = std::sqrt(sums[0]);
  s.update_norm = split_denominator ? std::sqrt(sums[1]) + weight_decay * s.weight_norm : std::sqrt(sums[2]);
  s.ratio = given ? *given : trust.ratio(s.weight_norm, s.update_norm);
  return s;
}

// Bias corrections need the step count, which pass 1 already uses: count and correct before the passes.
std::vector<Stats> lamb_corrections(const std::vector<torch::Tensor>& steps, Phase phase, double lr, double beta1,
                                    double beta2, int64_t bias_correction) {
  std::vector<Stats> before(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) {
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
  return before;
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
  check_state(params, exp_avgs, "exp_avgs");
  check_state(params, exp_avg_sqs, "exp_avg_sqs");
  if (phase != kApply) check_like_params(params, grads, "grads");
  check_steps(params, steps);
  const Trust trust = make_trust(adapt, weight_lo, weight_hi, ratio_lo, ratio_hi, 1.0, trust_eps);
  const double decay = decay_outside_ratio ? 0.0 : weight_decay;
  const double theta_factor = decay_outside_ratio ? 1.0 - lr * weight_decay : 1.0;
  const std::vector<Stats> before = lamb_corrections(steps, phase, lr, beta1, beta2, bias_correction);
  return each_tensor(
      params, phase,
      [&](int64_t i, int64_t begin, int64_t end) {
        Sums sums;
        dispatch_with_state(params[i], exp_avgs[i], [&](auto t, auto s) {
          using T = decltype(t);
          using S = decltype(s);
          sums = lamb_moments<T, S>(ptr<T>(params[i], begin), ptr<T>(grads[i], begin), ptr<S>(exp_avgs[i], begin),
                                    ptr<S>(exp_avg_sqs[i], begin), end - begin, grad_factor, beta1, beta2, eps,
                                    decay, theta_factor, before[i].c1, before[i].c2);
        });
        return sums;
      },
      [&](int64_t i, const Sums& sums) { return lamb_finish(before[i], sums, given ? given + i : nullptr, trust); },
      [&](int64_t i, int64_t begin, int64_t end, const Stats& s) {
        dispatch_with_state(params[i], exp_avgs[i], [&](auto t, auto state) {
          using T = decltype(t);
          using S = decltype(state);
          lamb_apply<T, S>(ptr<T>(params[i], begin), ptr<S>(exp_avgs[i], begin), ptr<S>(exp_avg_sqs[i], begin),
                           end - begin, eps, decay, s.c1, s.c2, s.scale);
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
  check_state(params, momentum_buffers, "momentum_buffers");
  check_steps(params, steps);
  for (const auto& step : steps) count_step(step, phase);
  const Trust trust = make_trust(adapt, weight_lo, weight_hi, ratio_lo, ratio_hi, trust_coefficient, trust_eps);
  return each_tensor(
      params, phase,
      [&](int64_t i, int64_t begin, int64_t end) {
        return lars_range_norms(params[i], grads[i], begin, end, grad_factor, weight_decay);
      },
      [&](int64_t i, const Sums& sums) {
        return lars_finish(sums, split_denominator, weight_decay, given ? given + i : nullptr, trust);
      },
      [&](int64_t i, int64_t begin, int64_t end, const Stats& s) {
        dispatch_with_state(params[i], momentum_buffers[i], [&](auto t, auto state) {
          using T = decltype(t);
          using S = decltype(state);
          lars_apply<T, S>(ptr<T>(params[i], begin), ptr<T>(grads[i], begin), ptr<S>(momentum_buffers[i], begin),
                           end - begin, grad_factor, weight_decay, momentum, nesterov, s.ratio, lr);
        });
      });
}

// LAMB with 8-bit moments (m in signed codes, √v in unsigned ones; see torchlamb.quantized): a whole step, or one
// phase of it, as lamb_step. `tables`: the signed map's values and entries, then the unsigned map's.
torch::Tensor lamb_step_8bit(std::vector<torch::Tensor> params, std::vector<torch::Tensor> grads,
                             std::vector<torch::Tensor> m_codes, std::vector<torch::Tensor> m_absmax,
                             std::vector<torch::Tensor> s_codes, std::vector<torch::Tensor> s_absmax,
                             std::vector<torch::Tensor> steps, std::vector<torch::Tensor> tables, double lr,
                             double beta1, double beta2, double eps, double weight_decay, int64_t bias_correction,
                             bool decay_outside_ratio, double grad_factor, bool adapt, double weight_lo,
                             double weight_hi, double ratio_lo, double ratio_hi, double trust_eps, int64_t phase_,
                             torch::Tensor ratios, std::vector<int64_t> rows) {
  const Phase phase = static_cast<Phase>(phase_);
  const double* given = given_ratios(params, phase, ratios);
  check_quantized(params, m_codes, m_absmax, rows, "exp_avg");
  check_quantized(params, s_codes, s_absmax, rows, "exp_avg_sqrt");
  if (phase != kApply) check_like_params(params, grads, "grads");
  check_steps(params, steps);
  TORCH_CHECK(tables.size() == 4, "torchlamb fused: lamb_step_8bit takes two code maps");
  const CodeMap m_map = code_map(tables, 0), s_map = code_map(tables, 2);
  const Trust trust = make_trust(adapt, weight_lo, weight_hi, ratio_lo, ratio_hi, 1.0, trust_eps);
  const double decay = decay_outside_ratio ? 0.0 : weight_decay;
  const double theta_factor = decay_outside_ratio ? 1.0 - lr * weight_decay : 1.0;
  const std::vector<Stats> before = lamb_corrections(steps, phase, lr, beta1, beta2, bias_correction);
  return each_tensor(
      params, phase,
      [&](int64_t i, int64_t begin, int64_t end) {
        Sums sums;
        TORCHLAMB_DISPATCH(params[i], "lamb_moments_8bit", [&] {
          sums = lamb_moments_8bit<scalar_t>(
              ptr<scalar_t>(params[i], 0), ptr<scalar_t>(grads[i], 0), ptr<uint8_t>(m_codes[i], 0),
              ptr<float>(m_absmax[i], 0), ptr<uint8_t>(s_codes[i], 0), ptr<float>(s_absmax[i], 0), begin, end,
              Blocks(rows[i]), m_map, s_map, grad_factor, beta1, beta2, eps, decay, theta_factor, before[i].c1,
              before[i].c2);
        });
        return sums;
      },
      [&](int64_t i, const Sums& sums) { return lamb_finish(before[i], sums, given ? given + i : nullptr, trust); },
      [&](int64_t i, int64_t begin, int64_t end, const Stats& s) {
        TORCHLAMB_DISPATCH(params[i], "lamb_apply_8bit", [&] {
          lamb_apply_8bit<scalar_t>(ptr<scalar_t>(params[i], 0), ptr<uint8_t>(m_codes[i], 0),
                                    ptr<float>(m_absmax[i], 0), ptr<uint8_t>(s_codes[i], 0),
                                    ptr<float>(s_absmax[i], 0), begin, end, Blocks(rows[i]), m_map, s_map, eps,
                                    decay, s.c1, s.c2, s.scale);
        });
      },
      kQuantBlock, &rows);
}

// LARS with an 8-bit momentum buffer (signed codes): a whole step, or one phase of it, as lars_step. `tables`:
// the signed map's values and entries.
torch::Tensor lars_step_8bit(std::vector<torch::Tensor> params, std::vector<torch::Tensor> grads,
                             std::vector<torch::Tensor> b_codes, std::vector<torch::Tensor> b_absmax,
                             std::vector<torch::Tensor> steps, std::vector<torch::Tensor> tables, double lr,
                             double momentum, double weight_decay, bool nesterov, bool split_denominator,
                             double grad_factor, bool adapt, double weight_lo, double weight_hi, double ratio_lo,
                             double ratio_hi, double trust_coefficient, double trust_eps, int64_t phase_,
                             torch::Tensor ratios, std::vector<int64_t> rows) {
  const Phase phase = static_cast<Phase>(phase_);
  const double* given = given_ratios(params, phase, ratios);
  check_like_params(params, grads, "grads");
  check_quantized(params, b_codes, b_absmax, rows, "momentum_buffer");
  check_steps(params, steps);
  TORCH_CHECK(tables.size() == 2, "torchlamb fused: lars_step_8bit takes one code map");
  const CodeMap map = code_map(tables, 0);
  for (const auto& step : steps) count_step(step, phase);
  const Trust trust = make_trust(adapt, weight_lo, weight_hi, ratio_lo, ratio_hi, trust_coefficient, trust_eps);
  return each_tensor(
      params, phase,
      [&](int64_t i, int64_t begin, int64_t end) {
        return lars_range_norms(params[i], grads[i], begin, end, grad_factor, weight_decay);
      },
      [&](int64_t i, const Sums& sums) {
        return lars_finish(sums, split_denominator, weight_decay, given ? given + i : nullptr, trust);
      },
      [&](int64_t i, int64_t begin, int64_t end, const Stats& s) {
        TORCHLAMB_DISPATCH(params[i], "lars_apply_8bit", [&] {
          lars_apply_8bit<scalar_t>(ptr<scalar_t>(params[i], 0), ptr<scalar_t>(grads[i], 0),
                                    ptr<uint8_t>(b_codes[i], 0), ptr<float>(b_absmax[i], 0), begin, end,
                                    Blocks(rows[i]), map, grad_factor, weight_decay, momentum, nesterov, s.ratio, lr);
        });
      },
      kQuantBlock, &rows);
}

// The kernels' own block quantizer, for the tests: x (float32, contiguous, rows of `row` elements) into codes and
// one absmax per block (flat), then read back (flat), with the functions the steps use. `tables`: one map's.
std::vector<torch::Tensor> quantize_8bit(torch::Tensor x, std::vector<torch::Tensor> tables, bool floor,
                                         int64_t row) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.is_cpu() && tables.size() == 2 &&
                  row > 0 && x.numel() % row == 0,
              "torchlamb fused: quantize_8bit takes a contiguous float32 CPU tensor of whole rows and one code map");
  const CodeMap map = code_map(tables, 0);
  const Blocks blocks(row);
  const int64_t n = x.numel();
  auto codes = torch::empty({n}, torch::kUInt8);
  auto absmax = torch::empty({n / row * blocks.per_row}, torch::kFloat32);
  auto back = torch::empty({n}, torch::kFloat32);
  const float* values = x.data_ptr<float>();
  for (int64_t start = 0, len = 0; start < n; start += len) {
    len = blocks.length(start, n);
    const float scale = absmax_of(values + start, len);
    absmax.data_ptr<float>()[blocks.index(start)] = scale;
    map.encode_block(values + start, len, scale, floor, codes.data_ptr<uint8_t>() + start);
    map.decode_block(codes.data_ptr<uint8_t>() + start, len, scale, back.data_ptr<float>() + start);
  }
  return {codes, absmax, back};
}
