// RMS norm of one row with HF LlamaRMSNorm's float32 steps (ops.cpp's rms_norm, the fused decoder).
#pragma once

#include <cmath>
#include <cstdint>

#include "vec.h"

namespace trimtab::cpu {

template <typename T>
float sum_of_squares(const T* x, int64_t n) {
  int64_t i = 0;
  float total = 0.0f;
#ifdef TRIMTAB_AVX2
  // Four accumulators hide the FMA latency and keep partial sums small (better rounding).
  __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  for (; i + 4 * kLanes <= n; i += 4 * kLanes) {
    const __m256 v0 = load8(x + i), v1 = load8(x + i + kLanes);
    const __m256 v2 = load8(x + i + 2 * kLanes), v3 = load8(x + i + 3 * kLanes);
    acc0 = _mm256_fmadd_ps(v0, v0, acc0);
    acc1 = _mm256_fmadd_ps(v1, v1, acc1);
    acc2 = _mm256_fmadd_ps(v2, v2, acc2);
    acc3 = _mm256_fmadd_ps(v3, v3, acc3);
  }
  for (; i + kLanes <= n; i += kLanes) {
    const __m256 v = load8(x + i);
    acc0 = _mm256_fmadd_ps(v, v, acc0);
  }
  total = horizontal_sum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
#endif
  for (; i < n; ++i) {
    const float v = to_float(x[i]);
    total += v * v;
  }
  return total;
}

// y = round_T(round_T(x * inv_rms) * weight), like HF's LlamaRMSNorm, which casts the
// normalized float32 row back to the input dtype before multiplying by the weight.
// For float32 both roundings are no-ops.
template <typename T>
void scale_row(T* y, const T* x, const float* weight, float inv_rms, int64_t n) {
  int64_t i = 0;
#ifdef TRIMTAB_AVX2
  const __m256 scale = _mm256_set1_ps(inv_rms);
  for (; i + kLanes <= n; i += kLanes) {
    const __m256 normalized = round8<T>(_mm256_mul_ps(load8(x + i), scale));
    store8(y + i, _mm256_mul_ps(normalized, _mm256_loadu_ps(weight + i)));
  }
#endif
  for (; i < n; ++i) {
    y[i] = from_float<T>(round_to<T>(to_float(x[i]) * inv_rms) * weight[i]);
  }
}

// One row: mean of squares in float32, + eps, 1 / sqrt, then scale_row. y, x: [dim]; weight: [dim]
template <typename T>
void rms_norm_row(T* y, const T* x, const float* weight, int64_t dim, float eps) {
  const float variance = sum_of_squares(x, dim) / static_cast<float>(dim);
  const float inv_rms = 1.0f / std::sqrt(variance + eps);
  scale_row(y, x, weight, inv_rms, dim);
}

}  // namespace trimtab::cpu
