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

#include "rms_norm.h"
#include "rotary.h"
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

// ---- rms_norm (rows in rms_norm.h) ---------------------------------------------------

// x, y: [rows, dim]; weight: [dim] float32
template <typename T>
void rms_norm_rows(T* y, const T* x, const float* weight, int64_t rows, int64_t dim, float eps) {
  at::parallel_for(0, rows, rows_per_task(dim), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) rms_norm_row(y + r * dim, x + r * dim, weight, dim, eps);
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

// ---- rotary_embedding (rows in rotary.h) -----------------------------------------------

// cos, sin: [tokens, R]; positions: [tokens]; inv_freq: [R/2]
void fill_rotary_tables(float* cos, float* sin, const int64_t* positions, const float* inv_freq,
                        int64_t tokens, int64_t half, float scaling, bool interleaved) {
  const int64_t rot_dims = 2 * half;
  at::parallel_for(0, tokens, rows_per_task(rot_dims), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      fill_rotary_row(cos + t * rot_dims, sin + t * rot_dims, positions[t], inv_freq, half, scaling, interleaved);
    }
  });
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
