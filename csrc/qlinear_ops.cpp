// torch ops over the quantized linear kernels (qlinear.h): input checks, then raw pointers.
//
//   qlinear_pack(qweight, scales, mins, group_bits, group_sizes) -> packed uint8 [tiles, tile_bytes]
//   qlinear(x [..., in], packed, group_bits, group_sizes, perm?, bias?, out_features, kernel) -> [..., out]
//   qlinear_dequantize_rows(packed, group_bits, group_sizes, perm?, out_features, rows [n]) -> [n, in]
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string_view>

#include "qlinear.h"
#include "qlinear_tensors.h"

namespace trimtab::cpu::qlinear {
namespace {

void check_tensor(const at::Tensor& t, at::ScalarType dtype, int64_t dims, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "trimtab::", op, ": ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "trimtab::", op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dims, "trimtab::", op, ": ", name, " must have ", dims, " dimension(s), got shape ", t.sizes());
}

}  // namespace

Layout checked_layout(const at::Tensor& group_bits, const at::Tensor& group_sizes, int64_t out_features,
                      const char* op) {
  check_tensor(group_bits, at::kByte, 1, op, "group_bits");
  check_tensor(group_sizes, at::kInt, 1, op, "group_sizes");
  TORCH_CHECK(group_bits.size(0) == group_sizes.size(0), "trimtab::", op, ": group_bits has ", group_bits.size(0),
              " groups but group_sizes has ", group_sizes.size(0));
  const at::Tensor bits = group_bits.contiguous(), sizes = group_sizes.contiguous();
  return make_layout(bits.const_data_ptr<uint8_t>(), sizes.const_data_ptr<int32_t>(), bits.size(0), out_features);
}

PackedTensors checked_packed(const at::Tensor& packed, const at::Tensor& group_bits, const at::Tensor& group_sizes,
                             const std::optional<at::Tensor>& perm, const std::optional<at::Tensor>& bias,
                             int64_t out_features, const char* op) {
  PackedTensors t;
  t.layout = checked_layout(group_bits, group_sizes, out_features, op);
  const Layout& layout = t.layout;
  check_tensor(packed, at::kByte, 2, op, "packed");
  TORCH_CHECK(packed.size(0) == layout.tiles && packed.size(1) == layout.tile_bytes, "trimtab::", op,
              ": packed must be [", layout.tiles, ", ", layout.tile_bytes, "] for these groups and ",
              layout.out_features, " output features, got ", packed.sizes());
  TORCH_CHECK(packed.is_contiguous(), "trimtab::", op, ": packed must be contiguous");
  t.packed = packed;
  if (perm.has_value()) {
    check_tensor(*perm, at::kInt, 1, op, "perm");
    TORCH_CHECK(perm->size(0) == layout.in_features, "trimtab::", op, ": perm must have ", layout.in_features,
                " entries, got ", perm->size(0));
    t.perm = perm->contiguous();
    const int32_t* values = t.perm.const_data_ptr<int32_t>();
    const bool in_range = std::all_of(values, values + layout.in_features,
                                      [&](int32_t v) { return v >= 0 && v < layout.in_features; });
    TORCH_CHECK(in_range, "trimtab::", op, ": perm holds an entry outside [0, ", layout.in_features, ")");
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == out_features, "trimtab::", op,
                ": bias must be a CPU tensor [", out_features, "], got ", bias->sizes());
    t.bias = bias->to(at::kFloat).contiguous();
  }
  return t;
}

namespace {

Kernel kernel_named(std::string_view name) {
  if (name == "auto") return Kernel::Auto;
  if (name == "int8") return Kernel::Int8;
  if (name == "fp32") return Kernel::Fp32;
  if (name == "scalar") return Kernel::Scalar;
  if (name == "dequant") return Kernel::Dequant;
  TORCH_CHECK(false, "trimtab::qlinear: kernel must be auto, int8, fp32, scalar or dequant, got '", name, "'");
}

// qweight: int32 [packed_rows, out]; scales, mins: fp16 [groups, out]; group_bits: uint8 [groups];
// group_sizes: int32 [groups] -> uint8 [tiles, tile_bytes]
at::Tensor qlinear_pack(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& mins,
                        const at::Tensor& group_bits, const at::Tensor& group_sizes) {
  constexpr const char* op = "qlinear_pack";
  check_tensor(qweight, at::kInt, 2, op, "qweight");
  check_tensor(scales, at::kHalf, 2, op, "scales");
  check_tensor(mins, at::kHalf, 2, op, "mins");
  const int64_t out = qweight.size(1);
  const Layout layout = checked_layout(group_bits, group_sizes, out, op);
  const int64_t groups = static_cast<int64_t>(layout.groups.size());
  TORCH_CHECK(scales.size(0) == groups && scales.size(1) == out && mins.sizes() == scales.sizes(), "trimtab::", op,
              ": scales and mins must both be [", groups, ", ", out, "], got ", scales.sizes(), " and ", mins.sizes());
  int64_t words = 0;
  for (const Group& g : layout.groups) words += (g.rows * g.bits + 31) / 32;
  TORCH_CHECK(qweight.size(0) == words, "trimtab::", op, ": qweight has ", qweight.size(0), " rows, but its groups need ",
              words);
  const at::Tensor q = qweight.contiguous(), s = scales.contiguous(), m = mins.contiguous();
  at::Tensor packed = at::empty({layout.tiles, layout.tile_bytes}, qweight.options().dtype(at::kByte));
  pack_canonical(layout, q.const_data_ptr<int32_t>(), s.const_data_ptr<c10::Half>(), m.const_data_ptr<c10::Half>(),
                 packed.mutable_data_ptr<uint8_t>());
  return packed;
}

// x: [..., in] (float32, float16 or bfloat16) -> [..., out] in x's dtype
at::Tensor qlinear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& group_bits,
                   const at::Tensor& group_sizes, const std::optional<at::Tensor>& perm,
                   const std::optional<at::Tensor>& bias, int64_t out_features, c10::string_view kernel) {
  constexpr const char* op = "qlinear";
  const PackedTensors weights = checked_packed(packed, group_bits, group_sizes, perm, bias, out_features, op);
  const Layout& layout = weights.layout;
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "trimtab::qlinear: x must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(x.device().is_cpu(), "trimtab::qlinear: x must be on the CPU, got ", x.device());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == layout.in_features, "trimtab::qlinear: x must be [..., ",
              layout.in_features, "], got ", x.sizes());
  const Kernel k = kernel_named(std::string_view(kernel.data(), kernel.size()));

  const at::Tensor x_f = x.to(at::kFloat).contiguous();
  const int64_t rows = x_f.numel() / layout.in_features;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out_features;
  at::Tensor y = at::empty(out_shape, x_f.options());
  if (rows > 0) forward(weights.matrix(), x_f.const_data_ptr<float>(), rows, y.mutable_data_ptr<float>(), k);
  return dtype == at::kFloat ? y : y.to(dtype);
}

// rows: int64 [n] in [0, out) -> float32 [n, in]: those rows of W, in the original input order.
at::Tensor qlinear_dequantize_rows(const at::Tensor& packed, const at::Tensor& group_bits, const at::Tensor& group_sizes,
                                   const std::optional<at::Tensor>& perm, int64_t out_features, const at::Tensor& rows) {
  constexpr const char* op = "qlinear_dequantize_rows";
  const PackedTensors weights = checked_packed(packed, group_bits, group_sizes, perm, std::nullopt, out_features, op);
  const Layout& layout = weights.layout;
  check_tensor(rows, at::kLong, 1, op, "rows");
  const at::Tensor ids = rows.contiguous();
  const int64_t n = ids.size(0), in = layout.in_features;
  const int64_t* id = ids.const_data_ptr<int64_t>();
  TORCH_CHECK(std::all_of(id, id + n, [&](int64_t v) { return v >= 0 && v < out_features; }), "trimtab::", op,
              ": rows must lie in [0, ", out_features, ")");
  at::Tensor w = at::empty({n, in}, packed.options().dtype(at::kFloat));
  float* out = w.mutable_data_ptr<float>();
  const int32_t* order = weights.matrix().perm;
  const uint8_t* data = packed.const_data_ptr<uint8_t>();
  at::parallel_for(0, n, std::max<int64_t>(1, 4096 / in), [&](int64_t begin, int64_t end) {
    std::vector<float> tile(in * kTileColumns);  // [in, 8]: the row's tile, transposed
    for (int64_t k = begin; k < end; ++k) {
      const int64_t t = id[k] / kTileColumns, c = id[k] % kTileColumns;
      dequantize_tiles(layout, data, t, t + 1, tile.data(), kTileColumns);
      float* row = out + k * in;
      for (int64_t i = 0; i < in; ++i) row[order != nullptr ? order[i] : i] = tile[i * kTileColumns + c];
    }
  });
  return w;
}

}  // namespace
}  // namespace trimtab::cpu::qlinear

TORCH_LIBRARY_FRAGMENT(trimtab, m) {
  m.def("qlinear_pack(Tensor qweight, Tensor scales, Tensor mins, Tensor group_bits, Tensor group_sizes) -> Tensor");
  m.def(
      "qlinear(Tensor x, Tensor packed, Tensor group_bits, Tensor group_sizes, Tensor? perm, Tensor? bias, "
      "int out_features, str kernel=\"auto\") -> Tensor");
  m.def(
      "qlinear_dequantize_rows(Tensor packed, Tensor group_bits, Tensor group_sizes, Tensor? perm, "
      "int out_features, Tensor rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(trimtab, CPU, m) {
  m.impl("qlinear_pack", &trimtab::cpu::qlinear::qlinear_pack);
  m.impl("qlinear", &trimtab::cpu::qlinear::qlinear);
  m.impl("qlinear_dequantize_rows", &trimtab::cpu::qlinear::qlinear_dequantize_rows);
}
