// Rotary position embedding of one token's heads (ops.cpp's rotary_embedding, the fused decoder).
//
// Both pair layouts are written as one multiply-add per rotated dim j:
//   out[j] = x[j] * cos[j] + x[partner(j)] * sin[j]
// with cos/sin expanded to one coefficient per dim (sign folded into sin):
//   NeoX / HF rotate_half: partner(i) = i + R/2, partner(i + R/2) = i; sin = [-s, +s]
//   interleaved (GPT-J):   partner(2i) = 2i + 1, partner(2i + 1) = 2i;  sin = [-s0, s0, -s1, s1, ...]
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "vec.h"

namespace trimtab::cpu {

// cos_t, sin_t: [R] for one position; inv_freq: [R/2]. HF: position_ids.float() * inv_freq in
// float32, then cos()/sin() * attention_scaling.
inline void fill_rotary_row(float* cos_t, float* sin_t, int64_t position, const float* inv_freq, int64_t half,
                            float scaling, bool interleaved) {
  const float p = static_cast<float>(position);
  for (int64_t i = 0; i < half; ++i) {
    const float angle = p * inv_freq[i];
    const float c = std::cos(angle) * scaling;
    const float s = std::sin(angle) * scaling;
    const int64_t first = interleaved ? 2 * i : i;
    const int64_t second = interleaved ? 2 * i + 1 : i + half;
    cos_t[first] = c;
    cos_t[second] = c;
    sin_t[first] = -s;
    sin_t[second] = s;
  }
}

// out[k] = x[k] * cos[k] + partner[k] * sin[k] for k in [0, n): one half of a NeoX rotation.
template <typename T>
void rotate_span(T* out, const T* x, const T* partner, const float* cos, const float* sin, int64_t n) {
  int64_t k = 0;
#ifdef TRIMTAB_AVX2
  for (; k + kLanes <= n; k += kLanes) {
    const __m256 direct = _mm256_mul_ps(load8(x + k), _mm256_loadu_ps(cos + k));
    const __m256 crossed = _mm256_mul_ps(load8(partner + k), _mm256_loadu_ps(sin + k));
    store8(out + k, _mm256_add_ps(direct, crossed));
  }
#endif
  for (; k < n; ++k) {
    out[k] = from_float<T>(to_float(x[k]) * cos[k] + to_float(partner[k]) * sin[k]);
  }
}

// Interleaved rotation of n (even) dims: pairs (2i, 2i + 1).
template <typename T>
void rotate_pairs(T* out, const T* x, const float* cos, const float* sin, int64_t n) {
  int64_t k = 0;
#ifdef TRIMTAB_AVX2
  // 8 lanes hold 4 whole pairs; swapping neighbours gives each lane its partner.
  constexpr int kSwapNeighbours = 0b10110001;  // lanes [1, 0, 3, 2] in each 128-bit half
  for (; k + kLanes <= n; k += kLanes) {
    const __m256 v = load8(x + k);
    const __m256 direct = _mm256_mul_ps(v, _mm256_loadu_ps(cos + k));
    const __m256 crossed = _mm256_mul_ps(_mm256_permute_ps(v, kSwapNeighbours), _mm256_loadu_ps(sin + k));
    store8(out + k, _mm256_add_ps(direct, crossed));
  }
#endif
  for (; k < n; k += 2) {
    const float first = to_float(x[k]), second = to_float(x[k + 1]);
    out[k] = from_float<T>(first * cos[k] + second * sin[k]);
    out[k + 1] = from_float<T>(second * cos[k + 1] + first * sin[k + 1]);
  }
}

// One head: rotate the first rot_dims dims, pass the rest through (partial rotary). Not in place.
template <typename T>
void rotate_head(T* out, const T* x, const float* cos, const float* sin, int64_t rot_dims,
                 int64_t head_dim, bool interleaved) {
  if (interleaved) {
    rotate_pairs(out, x, cos, sin, rot_dims);
  } else {
    const int64_t half = rot_dims / 2;
    rotate_span(out, x, x + half, cos, sin, half);
    rotate_span(out + half, x + half, x, cos + half, sin + half, half);
  }
  std::copy(x + rot_dims, x + head_dim, out + rot_dims);
}

}  // namespace trimtab::cpu
