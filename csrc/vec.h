// Float32 compute helpers for the three activation dtypes (float, Half, BFloat16).
//
// Every kernel loads its inputs as float32, does its arithmetic in float32 and rounds once
// on store. With AVX2 (+FMA, +F16C, which every AVX2 CPU has) the helpers work on 8 lanes;
// the scalar versions are the reference behaviour and handle the tails.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define TRIMTAB_AVX2 1
#include <immintrin.h>
// VNNI: AVX512-VNNI (with AVX512-VL for 256-bit registers) or AVX-VNNI. One instruction
// (vpdpbusd) multiplies unsigned by signed bytes and adds each four products into an int32
// lane, where AVX2 needs maddubs (into int16) then madd (into int32).
#if (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__)
#define TRIMTAB_VNNI 1
#endif
#endif

namespace trimtab::cpu {

// ---- scalar ---------------------------------------------------------------------------

inline float to_float(float v) { return v; }
inline float to_float(c10::Half v) { return static_cast<float>(v); }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }

// c10's conversions round to nearest even, as torch's own `.to(dtype)` does.
template <typename T>
inline T from_float(float v) { return static_cast<T>(v); }

// Rounds to T's precision and back: what `tensor.to(input_dtype)` does to a float32 value
// inside an HF module before the next float32 operation.
template <typename T>
inline float round_to(float v) { return to_float(from_float<T>(v)); }

#ifdef TRIMTAB_VNNI
// acc + Σ over each 4 bytes of u (unsigned) × s (signed), per int32 lane; exact (no saturation).
inline __m256i dot_u8_s8_accumulate(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, s);
#else
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#endif
}
#endif

#ifdef TRIMTAB_AVX2

// ---- AVX2: 8 float32 lanes ------------------------------------------------------------

constexpr int64_t kLanes = 8;

// bf16 is the top half of a float32: round to nearest even by adding 0x7fff plus the lowest
// kept bit, then drop the low 16 bits. NaN becomes the canonical quiet NaN, as in c10.
inline __m256i bf16_rounded_bits(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lowest_kept = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i bias = _mm256_add_epi32(lowest_kept, _mm256_set1_epi32(0x7fff));
  const __m256i rounded = _mm256_and_si256(_mm256_add_epi32(bits, bias),
                                           _mm256_set1_epi32(static_cast<int>(0xffff0000u)));
  const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc00000), is_nan);
}

template <typename T>
__m256 load8(const T* p);

template <>
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

template <>
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

template <>
inline __m256 load8(const c10::BFloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }

inline void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

inline void store8(c10::BFloat16* p, __m256 v) {
  const __m256i high = _mm256_srli_epi32(bf16_rounded_bits(v), 16);  // 8 x u16 in u32 lanes
  // packus works within each 128-bit half, so pack the two halves against each other.
  const __m128i packed =
      _mm_packus_epi32(_mm256_castsi256_si128(high), _mm256_extracti128_si256(high, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}

// Vector form of round_to<T>.
template <typename T>
__m256 round8(__m256 v);

template <>
inline __m256 round8<float>(__m256 v) { return v; }

template <>
inline __m256 round8<c10::Half>(__m256 v) {
  return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

template <>
inline __m256 round8<c10::BFloat16>(__m256 v) { return _mm256_castsi256_ps(bf16_rounded_bits(v)); }

// e^x in 8 lanes, for the softmax and SiLU of the fused decoder. x = n ln2 + r with
// |r| <= ln2 / 2; e^r by its Taylor polynomial to r^7 (truncation below 1e-8 relative), 2^n
// through the exponent bits. x is clamped to [-87, 88], where e^x is a normal float: far
// below that the result is ~1.6e-38 instead of 0, which vanishes next to any sum it joins.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = x - n ln2, with ln2 split in two so that n * ln2_high is exact
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860682e-6f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);  // Horner: 1 + r + r^2/2! + ... + r^7/7!
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i two_to_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(two_to_n));
}

inline float horizontal_sum(__m256 v) {
  const __m128 pairs = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 quads = _mm_add_ps(pairs, _mm_movehl_ps(pairs, pairs));
  return _mm_cvtss_f32(_mm_add_ss(quads, _mm_movehdup_ps(quads)));
}

#endif  // TRIMTAB_AVX2

}  // namespace trimtab::cpu
