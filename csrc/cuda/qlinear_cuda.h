// Host entry points of the CUDA kernels (raw pointers, no ATen): bindings.cpp checks tensors and
// calls these; the .cu files implement them. dtype: 0 = float16, 1 = bfloat16, 2 = float32 activations.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace trimtab_cuda {

constexpr int kMaxBatchRows = 8;  // the GEMV's largest batch

struct QLayer {
  const uint32_t* words;   // [tiles, word_rows, 128] the plane layout (qlinear_layout.cuh)
  const void* scale_min;   // half2 [tiles, groups, 128]: (scale, min) of each (group, column)
  const int* meta;         // int4 [chunks]: word_row, bits, group, 0
  const int* xmap;         // int32 [chunks * 32]: padded row → original input row, -1 = padding;
                           // nullptr when that is the identity (no perm, every group a multiple of 32)
  int chunks;
  int out;
  int out_pad;             // out rounded up to a multiple of 128: tiles · 128
  int word_rows;
  int groups;
};

// The GEMV's grid: about `target_blocks` blocks, each an equal run of (column tile, chunk) items
// (qgemv.cu). Several layers on one input run as one launch, the blocks shared out by the layers'
// sizes (kMaxGemvLayers at most); or, routed (slots > 0: a mixture of experts), each of `slots`
// slots runs one of the layers (alternatives of one shape) chosen on the device. The workspace
// (partial sums of the column tiles blocks share) and tile counters:
constexpr int kMaxGemvLayers = 8;
int64_t qgemv_workspace_floats(const QLayer* layers, int count, int batch, int target_blocks, int slots = 0);
int qgemv_counters(const QLayer* layers, int count, int slots = 0);

// The GEMV's operands, rows of the activations' dtype: for each layer,
//   y[b, :out] = residual[b] + bias + u[b] Wᵀ,  u = x, silu(gate) · x where gate is given, or
//   RMSNorm(x) · weight where norm is.
// An RMSNorm applied to x as the GEMV stages it, u = weight · round(x / rms(x)) as HF rounds it, from
// x's statistics as a GEMV with `sumsq` wrote them (Σ x² per 128 columns): the norm needs no kernel.
struct RowNorm {
  const float* sumsq;    // nullptr (no norm), or [batch, ceil(dim / 128)]
  const void* weight;    // [dim], the activations' dtype
  float eps;
  int dim;
};
struct GemvInput {
  const void* x;         // [batch, in], rows ldx apart
  const void* gate;      // nullptr or [batch, in], rows ldx apart
  int64_t ldx;
  RowNorm norm;          // not with a gate
};
struct GemvOutput {
  void* y;               // [batch, out], rows ldy apart
  const void* residual;  // nullptr or [batch, out], rows ldy apart
  int64_t ldy;
  const float* bias;     // nullptr or [out]
  int max_bits;          // the layer's widest chunk (2-8; wider chunks would be cut to it)
  float* sumsq;          // nullptr or [batch, ceil(out / 128)]: Σ y² of each row's stored outputs per 128
                         // columns, the next RMSNorm's statistics (RowNorm)
};

// A routed launch (batch 1): slot s runs layer experts[s] (a device int64 [slots], written by the
// kernel before) on x row s (x + s · x_slot_stride elements; 0: every slot reads the same x, and the
// gate likewise) and writes output row s (outs[0].y + s · ldy; every layer's output is that tensor).
struct GemvRoute {
  const int64_t* experts;
  int slots;
  int64_t x_slot_stride;
};

// For 1 <= batch <= 8 and 1 <= count <= kMaxGemvLayers layers of the same input size; route: nullptr,
// or a mixture's slots (layers of one shape). workspace: qgemv_workspace_floats floats; counters:
// qgemv_counters ints, zero (left zero).
cudaError_t qgemv(const GemvInput& in, const QLayer* layers, const GemvOutput* outs, int count, int batch, int dtype,
                  float* workspace, int* counters, int target_blocks, const GemvRoute* route, cudaStream_t stream);

// Wt[r, c - col_begin] = W[c, r] for columns [col_begin, col_end) (multiples of 4 except col_end
// may be out), rows in the original input order: Wt is [in, ldw], activations' dtype.
cudaError_t qdequantize_t(const QLayer& layer, int col_begin, int col_end, void* wt, int64_t ldw, int dtype,
                          cudaStream_t stream);

// canonical qweight int32 [packed_rows, out] → words [tiles, word_rows, 128] (zeroed by the caller).
// repack: int4 [chunks]: canonical word row of the chunk's group, first row of the chunk within
// its group, the group's size, its width.
cudaError_t qrepack(const int32_t* qweight, int out, const int* repack, int chunks, const int* meta,
                    uint32_t* words, int word_rows, cudaStream_t stream);

}  // namespace trimtab_cuda
