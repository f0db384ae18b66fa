// float16 / bfloat16 <-> float conversion of contiguous runs for the CPU kernels (csrc/cpu/*.cpp).
//
// Loops over c10::Half do not vectorize (its conversions branch, and F16C is not in the baseline ISA), so kernels
// convert runs of 16-bit values to / from float tiles: with F16C when the CPU running the code has it, else with the
// same IEEE algorithms as c10::detail::fp16_ieee_{to,from}_fp32_value (bit-identical for every input, round to nearest
// even) written with mask selects, which gcc vectorizes. bfloat16 rounds as c10::BFloat16 (nearest even, NaN ->
// 0x7FC0). Pointers are untyped (c10::Half*, c10::BFloat16* and uint16_t* all convert to them).
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define PYKERNELS_X86_F16C 1
#else
#define PYKERNELS_X86_F16C 0
#endif

namespace pykernels {
namespace cpu {

inline uint32_t select_bits(bool condition, uint32_t if_true, uint32_t if_false) {
  const uint32_t mask = 0u - static_cast<uint32_t>(condition);
  return (if_true & mask) | (if_false & ~mask);
}

inline float half_to_float(uint16_t bits) {
  const uint32_t w = static_cast<uint32_t>(bits) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = std::bit_cast<float>((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = std::bit_cast<float>((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t magnitude = select_bits(two_w < (1u << 27), std::bit_cast<uint32_t>(denormalized),
                                         std::bit_cast<uint32_t>(normalized));
  return std::bit_cast<float>(sign | magnitude);
}

inline uint16_t float_to_half(float value) {
  const uint32_t w = std::bit_cast<uint32_t>(value);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t exponent_bias = shl1_w & 0xFF000000u;
  const uint32_t bias = select_bits(exponent_bias < 0x71000000u, 0x71000000u, exponent_bias);
  float base = (std::fabs(value) * 0x1.0p+112f) * 0x1.0p-110f;
  base = std::bit_cast<float>((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = std::bit_cast<uint32_t>(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) | select_bits(shl1_w > 0xFF000000u, 0x7E00u, nonsign));
}

inline uint16_t float_to_bfloat16(float value) {
  const uint32_t u = std::bit_cast<uint32_t>(value);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(select_bits((u & 0x7FFFFFFFu) > 0x7F800000u, 0x7FC0u, rounded));
}

inline void half_to_float_portable(const void* src, float* __restrict__ dst, int64_t n) {
  const uint16_t* s = static_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; ++i) dst[i] = half_to_float(s[i]);
}

inline void float_to_half_portable(const float* __restrict__ src, void* dst, int64_t n) {
  uint16_t* d = static_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = float_to_half(src[i]);
}

#if PYKERNELS_X86_F16C
__attribute__((target("avx,f16c"))) inline void half_to_float_f16c(const void* src, float* __restrict__ dst,
                                                                    int64_t n) {
  const uint16_t* s = static_cast<const uint16_t*>(src);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
  }
  for (; i < n; ++i) dst[i] = half_to_float(s[i]);
}

__attribute__((target("avx,f16c"))) inline void float_to_half_f16c(const float* __restrict__ src, void* dst,
                                                                    int64_t n) {
  uint16_t* d = static_cast<uint16_t*>(dst);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < n; ++i) d[i] = float_to_half(src[i]);
}
#endif

inline void bfloat16_to_float_run(const void* src, float* __restrict__ dst, int64_t n) {
  const uint16_t* s = static_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; ++i) dst[i] = std::bit_cast<float>(static_cast<uint32_t>(s[i]) << 16);
}

inline void float_to_bfloat16_run(const float* __restrict__ src, void* dst, int64_t n) {
  uint16_t* d = static_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = float_to_bfloat16(src[i]);
}

// Run converters of one 16-bit format.
struct HalfRuns {
  void (*to_float)(const void* src, float* dst, int64_t n);
  void (*from_float)(const float* src, void* dst, int64_t n);
};

// float16: F16C when the CPU has it (chosen once), else the portable loops.
inline const HalfRuns& half_runs() {
  static const HalfRuns runs = [] {
#if PYKERNELS_X86_F16C
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c")) {
      return HalfRuns{&half_to_float_f16c, &float_to_half_f16c};
    }
#endif
    return HalfRuns{&half_to_float_portable, &float_to_half_portable};
  }();
  return runs;
}

}  // namespace cpu
}  // namespace pykernels
