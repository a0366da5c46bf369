// trimtab's compiled ops: schemas (device-independent) and their CPU kernels.
//
// The schemas are defined once under the `trimtab` namespace; each device registers its
// kernels for them with TORCH_LIBRARY_IMPL (CPU here, CUDA in its own file), so Python
// always calls torch.ops.trimtab.<op> and the dispatcher picks the device.
//
// Plain PyTorch references of every op live in trimtab/backend/reference_ops.py.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "vec.h"

namespace trimtab::cpu {
namespace {

// ---- input checks ---------------------------------------------------------------------

bool is_activation_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_activation(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(is_activation_dtype(t.scalar_type()), "trimtab::", op, ": ", name,
              " must be float32, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), "trimtab::", op, ": ", name, " must be on the CPU, got ",
              t.device());
}

// Calls f(T{}) where T is the C++ type of an activation dtype (checked beforehand).
template <typename F>
void dispatch_activation(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat:
      return f(float{});
    case at::kHalf:
      return f(c10::Half{});
    case at::kBFloat16:
      return f(c10::BFloat16{});
    default:
      TORCH_CHECK(false, "trimtab: unsupported activation dtype ", t);
  }
}

// Rows handed to one thread at a time: enough work to pay for the hand-off (torch's own
// kernels use the same 32K-element grain).
constexpr int64_t kElementsPerTask = 32768;

int64_t rows_per_task(int64_t row_length) {
  return std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, row_length));
}

// ---- rms_norm -------------------------------------------------------------------------

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

// x, y: [rows, dim]; weight: [dim] float32
template <typename T>
void rms_norm_rows(T* y, const T* x, const float* weight, int64_t rows, int64_t dim, float eps) {
  at::parallel_for(0, rows, rows_per_task(dim), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* x_row = x + r * dim;
      // Same float32 steps as HF: mean of squares, + eps, then 1 / sqrt.
      const float variance = sum_of_squares(x_row, dim) / static_cast<float>(dim);
      const float inv_rms = 1.0f / std::sqrt(variance + eps);
      scale_row(y + r * dim, x_row, weight, inv_rms, dim);
    }
  });
}

// x: [..., D]; weight: [D] (any float dtype) -> [..., D] in x's dtype
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_activation(x, "rms_norm", "x");
  check_activation(weight, "rms_norm", "weight");
  TORCH_CHECK(x.dim() >= 1, "trimtab::rms_norm: x must have at least one dimension");
  const int64_t dim = x.size(-1);
  TORCH_CHECK(dim > 0, "trimtab::rms_norm: the last dimension of x must not be empty");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == dim,
              "trimtab::rms_norm: weight must have shape [", dim, "] to match x's last dimension, got ",
              weight.sizes());

  const at::Tensor x_c = x.contiguous();
  const at::Tensor weight_f = weight.to(at::kFloat).contiguous();  // [D], a no-op for float32
  at::Tensor y = at::empty(x_c.sizes(), x_c.options());
  const int64_t rows = x_c.numel() / dim;
  const float* w = weight_f.const_data_ptr<float>();
  const float eps_f = static_cast<float>(eps);  // HF adds eps to a float32 tensor

  dispatch_activation(x_c.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    rms_norm_rows(y.mutable_data_ptr<T>(), x_c.const_data_ptr<T>(), w, rows, dim, eps_f);
  });
  return y;
}

// ---- rotary_embedding -----------------------------------------------------------------
//
// Both pair layouts are written as one multiply-add per rotated dim j:
//   out[j] = x[j] * cos[j] + x[partner(j)] * sin[j]
// with cos/sin expanded to one coefficient per dim (sign folded into sin):
//   NeoX / HF rotate_half: partner(i) = i + R/2, partner(i + R/2) = i; sin = [-s, +s]
//   interleaved (GPT-J):   partner(2i) = 2i + 1, partner(2i + 1) = 2i;  sin = [-s0, s0, -s1, s1, ...]

// cos, sin: [tokens, R]; positions: [tokens]; inv_freq: [R/2]
void fill_rotary_tables(float* cos, float* sin, const int64_t* positions, const float* inv_freq,
                        int64_t tokens, int64_t half, float scaling, bool interleaved) {
  const int64_t rot_dims = 2 * half;
  at::parallel_for(0, tokens, rows_per_task(rot_dims), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* cos_t = cos + t * rot_dims;
      float* sin_t = sin + t * rot_dims;
      // HF: position_ids.float() * inv_freq in float32, then cos()/sin() * attention_scaling.
      const float position = static_cast<float>(positions[t]);
      for (int64_t i = 0; i < half; ++i) {
        const float angle = position * inv_freq[i];
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
  });
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

// One head: rotate the first rot_dims dims, pass the rest through (partial rotary).
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

// out, x: [tokens, heads, head_dim]; cos, sin: [tokens, rot_dims]
template <typename T>
void rotate_all_heads(T* out, const T* x, const float* cos, const float* sin, int64_t tokens,
                      int64_t heads, int64_t head_dim, int64_t rot_dims, bool interleaved) {
  // Parallel over (token, head) rows so that a single decode token still uses every thread.
  at::parallel_for(0, tokens * heads, rows_per_task(head_dim), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t token = row / heads;
      rotate_head(out + row * head_dim, x + row * head_dim, cos + token * rot_dims,
                  sin + token * rot_dims, rot_dims, head_dim, interleaved);
    }
  });
}

// x: [B, S, H, D]; positions: [B, S] int64; inv_freq: [R/2] float32, R <= D -> [B, S, H, D]
at::Tensor rotary_embedding(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& inv_freq,
                            double attention_scaling, bool interleaved) {
  check_activation(x, "rotary_embedding", "x");
  TORCH_CHECK(x.dim() == 4, "trimtab::rotary_embedding: x must have shape [B, S, H, D], got ", x.sizes());
  const int64_t batch = x.size(0), seq = x.size(1), heads = x.size(2), head_dim = x.size(3);
  TORCH_CHECK(positions.scalar_type() == at::kLong,
              "trimtab::rotary_embedding: positions must be int64, got ", positions.scalar_type());
  TORCH_CHECK(positions.dim() == 2 && positions.size(0) == batch && positions.size(1) == seq,
              "trimtab::rotary_embedding: positions must have shape [", batch, ", ", seq,
              "] to match x's [B, S], got ", positions.sizes());
  TORCH_CHECK(inv_freq.scalar_type() == at::kFloat,
              "trimtab::rotary_embedding: inv_freq must be float32, got ", inv_freq.scalar_type());
  TORCH_CHECK(inv_freq.dim() == 1, "trimtab::rotary_embedding: inv_freq must be 1-D [R/2], got ",
              inv_freq.sizes());
  const int64_t half = inv_freq.size(0);
  const int64_t rot_dims = 2 * half;
  TORCH_CHECK(rot_dims <= head_dim, "trimtab::rotary_embedding: inv_freq has ", half,
              " frequencies, so it rotates ", rot_dims, " dims, more than the head dim ", head_dim);
  TORCH_CHECK(positions.device().is_cpu() && inv_freq.device().is_cpu(),
              "trimtab::rotary_embedding: positions and inv_freq must be on the CPU like x");

  const at::Tensor x_c = x.contiguous();
  const at::Tensor positions_c = positions.contiguous();
  const at::Tensor inv_freq_c = inv_freq.contiguous();
  at::Tensor out = at::empty(x_c.sizes(), x_c.options());
  const int64_t tokens = batch * seq;

  // cos/sin once per (token, pair), shared by all heads: tables [2, tokens, R]
  at::Tensor tables = at::empty({2, tokens, rot_dims}, x_c.options().dtype(at::kFloat));
  float* cos = tables.mutable_data_ptr<float>();
  float* sin = cos + tokens * rot_dims;
  fill_rotary_tables(cos, sin, positions_c.const_data_ptr<int64_t>(), inv_freq_c.const_data_ptr<float>(),
                     tokens, half, static_cast<float>(attention_scaling), interleaved);

  dispatch_activation(x_c.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    rotate_all_heads(out.mutable_data_ptr<T>(), x_c.const_data_ptr<T>(), cos, sin, tokens, heads, head_dim,
                     rot_dims, interleaved);
  });
  return out;
}

}  // namespace
}  // namespace trimtab::cpu

// Schemas: shared by every device's kernels.
TORCH_LIBRARY(trimtab, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def(
      "rotary_embedding(Tensor x, Tensor positions, Tensor inv_freq, float attention_scaling, "
      "bool interleaved) -> Tensor");
}

TORCH_LIBRARY_IMPL(trimtab, CPU, m) {
  m.impl("rms_norm", &trimtab::cpu::rms_norm);
  m.impl("rotary_embedding", &trimtab::cpu::rotary_embedding);
}
