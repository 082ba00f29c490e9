// The 8-bit kernels' table reads on this CPU, one 256-value block at a time in L1: decoding codes to values by scalar
// loads (what quantizer.cpp leaves to the compiler) or by an AVX2 8-lane gather, and finding codes in the
// 65,536-entry table by scalar reads or by an AVX2 gather (quantizer.cpp's AVX2 path). Backs the choice written in
// quantizer.cpp's header and benchmarks/README.md; a micro-benchmark, so the in-kernel A/B there is what decided.
//
//   g++ -O3 -march=native -o /tmp/table_reads benchmarks/table_reads.cpp && /tmp/table_reads
//
// (needs a CPU with AVX2). Prints ns per value for each variant, three rounds.
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

namespace {
constexpr int64_t kBlock = 256, kBlocks = 32, kRepeats = 20000;

uint32_t float_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
}

__attribute__((noinline)) void decode_scalar(const float* values, const uint8_t* __restrict__ codes, float absmax,
                                             float* __restrict__ out) {
  for (int64_t k = 0; k < kBlock; ++k) out[k] = values[codes[k]] * absmax;
}

__attribute__((noinline)) void decode_gather(const float* values, const uint8_t* __restrict__ codes, float absmax,
                                             float* __restrict__ out) {
  const __m256 scale = _mm256_set1_ps(absmax);
  for (int64_t k = 0; k < kBlock; k += 8) {
    const __m256i index = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + k)));
    _mm256_storeu_ps(out + k, _mm256_mul_ps(_mm256_i32gather_ps(values, index, 4), scale));
  }
}

__attribute__((noinline)) void encode_scalar(const int32_t* __restrict__ entries, const float* __restrict__ x,
                                             float inverse, uint8_t* __restrict__ codes) {
  for (int64_t k = 0; k < kBlock; ++k) {
    const uint32_t bits = float_bits(x[k] * inverse);
    const int32_t entry = entries[bits >> 16];
    const uint32_t key = (bits & 0xFFFFu) ^ ((bits >> 31) ? 0xFFFFu : 0u);
    codes[k] = static_cast<uint8_t>((entry & 0xFF) + (key > static_cast<uint32_t>(entry >> 8)));
  }
}

__attribute__((noinline)) void encode_gather(const int32_t* __restrict__ entries, const float* __restrict__ x,
                                             float inverse, uint8_t* __restrict__ codes) {
  const __m256 scale = _mm256_set1_ps(inverse);
  const __m256i low = _mm256_set1_epi32(0xFFFF), byte = _mm256_set1_epi32(0xFF);
  const __m256i low_bytes = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                             0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  for (int64_t k = 0; k < kBlock; k += 8) {
    const __m256i bits = _mm256_castps_si256(_mm256_mul_ps(_mm256_loadu_ps(x + k), scale));
    const __m256i entry = _mm256_i32gather_epi32(entries, _mm256_srli_epi32(bits, 16), 4);
    const __m256i key = _mm256_xor_si256(_mm256_and_si256(bits, low), _mm256_and_si256(_mm256_srai_epi32(bits, 31), low));
    const __m256i above = _mm256_cmpgt_epi32(key, _mm256_srli_epi32(entry, 8));
    const __m256i code = _mm256_shuffle_epi8(_mm256_sub_epi32(_mm256_and_si256(entry, byte), above), low_bytes);
    const uint64_t eight = static_cast<uint32_t>(_mm256_cvtsi256_si32(code)) |
                           static_cast<uint64_t>(static_cast<uint32_t>(_mm256_extract_epi32(code, 4))) << 32;
    std::memcpy(codes + k, &eight, sizeof eight);
  }
}

template <typename F>
double ns_per_value(F&& run_block) {
  const auto start = std::chrono::steady_clock::now();
  for (int64_t r = 0; r < kRepeats; ++r) run_block(r % kBlocks);
  const double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start).count();
  return ns / (kRepeats * kBlock);
}
}  // namespace

int main() {
  std::mt19937 random(1);
  std::vector<float> values(256), x(kBlocks * kBlock), out(kBlock);
  std::vector<int32_t> entries(65536);
  std::vector<uint8_t> codes(kBlocks * kBlock), codes_a(kBlock), codes_b(kBlock);
  for (int i = 0; i < 256; ++i) values[i] = (i - 128) / 128.0f;
  for (auto& e : entries) e = static_cast<int32_t>(random() & 0xFFFFFF);  // start byte, then a key below 2^16
  for (auto& c : codes) c = static_cast<uint8_t>(random());
  std::normal_distribution<float> normal;
  for (auto& v : x) v = 0.3f * normal(random);
  for (int64_t b = 0; b < kBlocks; ++b) {  // the two encodes agree
    encode_scalar(entries.data(), x.data() + b * kBlock, 0.7f, codes_a.data());
    encode_gather(entries.data(), x.data() + b * kBlock, 0.7f, codes_b.data());
    if (codes_a != codes_b) return std::printf("the encodes disagree\n"), 1;
  }
  for (int round = 0; round < 3; ++round) {
    std::printf("decode: scalar %.3f, gather %.3f ns per value;  encode: scalar %.3f, gather %.3f ns per value\n",
                ns_per_value([&](int64_t b) { decode_scalar(values.data(), codes.data() + b * kBlock, 1.5f, out.data()); }),
                ns_per_value([&](int64_t b) { decode_gather(values.data(), codes.data() + b * kBlock, 1.5f, out.data()); }),
                ns_per_value([&](int64_t b) { encode_scalar(entries.data(), x.data() + b * kBlock, 0.7f, codes_a.data()); }),
                ns_per_value([&](int64_t b) { encode_gather(entries.data(), x.data() + b * kBlock, 0.7f, codes_a.data()); }));
  }
}
