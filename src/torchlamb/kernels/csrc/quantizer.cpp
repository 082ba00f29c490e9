// The 8-bit state's quantizer (torchlamb.quantized), as the 8-bit steps of lamb.cpp and lars.cpp use it: block-wise
// codes and absmax, their checks, the blocks of a tensor's rows, and the prefetching of the 8-bit loops.
//
// A state tensor is stored as one uint8 code per element and one float absmax per block of kQuantBlock elements:
// x ≈ values[code] · absmax. The code of x is the number of midpoints (between neighbouring values) strictly below
// q = x · (1/absmax) — the rule of the torch path (torch.bucketize), so both store the same codes for the same
// values. One table read finds it (torchlamb.quantized.CodeMap.entries): entries[upper 16 bits of q] holds the
// number of midpoints below every float with those bits, and above bit 8 the order key of the one midpoint among
// them (0xFFFF: none); q counts that midpoint when its own key is larger.
//
// The loops are written per block, in pieces the compiler vectorises (the arithmetic, the block's absmax), with the
// table reads in loops of their own; where the CPU has AVX-512 the table reads are explicit: a gather for the code,
// and (with VBMI) byte permutes for the values, which are several times cheaper than gathers. With AVX2 only, the
// code is found by an 8-lane gather (the 8-bit Lamb step took 25-30% less time than with the scalar loop on an AMD
// EPYC); the values stay with the compiler's loop of scalar loads, which decoded twice as fast there as an 8-lane
// gather did (0.28 against 0.55 ns per value; benchmarks/table_reads.cpp measures both).

namespace {
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
#elif defined(__AVX2__)
      // The same with 8 lanes. Keys and midpoint keys are below 2^16, so the signed compare orders them; it gives
      // -1 where the code counts the midpoint. The low byte of each lane is then gathered into 8 bytes.
      const __m256 scale = _mm256_set1_ps(inverse);
      const __m256i low = _mm256_set1_epi32(0xFFFF), byte = _mm256_set1_epi32(0xFF);
      const __m256i low_bytes = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                                 0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
      for (; k + 8 <= n; k += 8) {
        const __m256i bits = _mm256_castps_si256(_mm256_mul_ps(_mm256_loadu_ps(x + k), scale));
        const __m256i entry =
            _mm256_i32gather_epi32(reinterpret_cast<const int*>(entries), _mm256_srli_epi32(bits, 16), 4);
        const __m256i key = _mm256_xor_si256(_mm256_and_si256(bits, low),
                                             _mm256_and_si256(_mm256_srai_epi32(bits, 31), low));
        const __m256i above = _mm256_cmpgt_epi32(key, _mm256_srli_epi32(entry, 8));
        const __m256i code = _mm256_shuffle_epi8(_mm256_sub_epi32(_mm256_and_si256(entry, byte), above), low_bytes);
        const uint64_t eight = static_cast<uint32_t>(_mm256_cvtsi256_si32(code)) |
                               static_cast<uint64_t>(static_cast<uint32_t>(_mm256_extract_epi32(code, 4))) << 32;
        std::memcpy(codes + k, &eight, sizeof eight);
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
}  // namespace
