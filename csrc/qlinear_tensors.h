// A packed quantized layer held as checked tensors: what the qlinear ops and the fused decoder
// take from Python. Checks raise c10::Error ("trimtab::<op>: <problem>").
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "qlinear.h"

namespace trimtab::cpu::qlinear {

struct PackedTensors {
  at::Tensor packed;  // uint8 [tiles, tile_bytes]
  at::Tensor perm;    // int32 [in], or undefined
  at::Tensor bias;    // float32 [out], or undefined
  Layout layout;

  // The kernels' view; valid while this object lives (the Matrix points into it).
  Matrix matrix() const {
    return {&layout, packed.const_data_ptr<uint8_t>(), perm.defined() ? perm.const_data_ptr<int32_t>() : nullptr,
            bias.defined() ? bias.const_data_ptr<float>() : nullptr};
  }
};

// group_bits: uint8 [groups]; group_sizes: int32 [groups] -> the layout for out_features columns.
Layout checked_layout(const at::Tensor& group_bits, const at::Tensor& group_sizes, int64_t out_features,
                      const char* op);

// Checks every tensor against the layout (perm a permutation range-wise, bias [out]) and keeps
// contiguous float32/int32 copies where needed.
PackedTensors checked_packed(const at::Tensor& packed, const at::Tensor& group_bits, const at::Tensor& group_sizes,
                             const std::optional<at::Tensor>& perm, const std::optional<at::Tensor>& bias,
                             int64_t out_features, const char* op);

}  // namespace trimtab::cpu::qlinear
