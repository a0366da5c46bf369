// torch.ops.trimtab_cuda.*: checked tensors → the CUDA kernels (qlinear_cuda.h). Errors are
// RuntimeErrors starting "trimtab_cuda::<op>:", which backend/cuda_ops.py turns into TrimtabError.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "qlinear_cuda.h"

namespace {

using at::Tensor;
using trimtab_cuda::QLayer;

#define TT_CHECK(cond, op, ...) TORCH_CHECK(cond, "trimtab_cuda::", op, ": ", __VA_ARGS__)

void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "trimtab_cuda::", op, ": CUDA error: ", cudaGetErrorString(err));
}

int dtype_code(const Tensor& t, const char* op) {
  if (t.scalar_type() == at::kHalf) return 0;
  if (t.scalar_type() == at::kBFloat16) return 1;
  TORCH_CHECK(false, "trimtab_cuda::", op, ": activations must be float16 or bfloat16, got ", t.scalar_type());
}

QLayer layer_of(const Tensor& words, const Tensor& scale_min, const Tensor& meta, const c10::optional<Tensor>& xmap,
                int64_t out, const char* op) {
  TORCH_CHECK(words.is_cuda() && words.scalar_type() == at::kInt && words.dim() == 2 && words.is_contiguous(),
              "trimtab_cuda::", op, ": words must be a contiguous CUDA int32 [word_rows, out_pad] tensor");
  const int64_t out_pad = words.size(1);
  TORCH_CHECK(out_pad % 4 == 0 && out <= out_pad && out > out_pad - 4, "trimtab_cuda::", op, ": words are ",
              out_pad, " columns wide, which does not fit out = ", out);
  TORCH_CHECK(scale_min.is_cuda() && scale_min.scalar_type() == at::kHalf && scale_min.dim() == 3 &&
                  scale_min.size(1) == out_pad && scale_min.size(2) == 2 && scale_min.is_contiguous(),
              "trimtab_cuda::", op, ": scale_min must be a contiguous CUDA float16 [groups, ", out_pad, ", 2] tensor");
  TORCH_CHECK(meta.is_cuda() && meta.scalar_type() == at::kInt && meta.dim() == 2 && meta.size(1) == 4 &&
                  meta.is_contiguous(),
              "trimtab_cuda::", op, ": meta must be a contiguous CUDA int32 [chunks, 4] tensor");
  QLayer L;
  L.words = reinterpret_cast<const uint32_t*>(words.data_ptr<int32_t>());
  L.scale_min = scale_min.data_ptr();
  L.meta = meta.data_ptr<int32_t>();
  L.xmap = nullptr;
  L.chunks = int(meta.size(0));
  L.out = int(out);
  L.out_pad = int(out_pad);
  if (xmap.has_value()) {
    TORCH_CHECK(xmap->is_cuda() && xmap->scalar_type() == at::kInt && xmap->numel() == meta.size(0) * 32 &&
                    xmap->is_contiguous(),
                "trimtab_cuda::", op, ": xmap must be a contiguous CUDA int32 [chunks * 32] tensor");
    L.xmap = xmap->data_ptr<int32_t>();
  }
  return L;
}

int multiprocessors() {
  int device = 0, count = 0;
  check_cuda(cudaGetDevice(&device), "multiprocessors");
  check_cuda(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device), "multiprocessors");
  return count;
}

// x: [batch, in] (rows may be strided, columns contiguous) → y: [batch, out] in x's dtype
Tensor qgemv(const Tensor& x, int64_t in_features, const Tensor& words, const Tensor& scale_min, const Tensor& meta,
             const c10::optional<Tensor>& xmap, const c10::optional<Tensor>& bias, int64_t out, Tensor workspace,
             Tensor counters, int64_t target_blocks) {
  const char* op = "qgemv";
  c10::cuda::CUDAGuard guard(x.device());
  QLayer L = layer_of(words, scale_min, meta, xmap, out, op);
  TT_CHECK(x.is_cuda() && x.dim() == 2 && x.size(1) == in_features && x.stride(1) == 1, op,
           "x must be a CUDA [batch, ", in_features, "] tensor with contiguous rows, got ", x.sizes());
  const int batch = int(x.size(0));
  TT_CHECK(batch >= 1 && batch <= trimtab_cuda::kMaxBatchRows, op, "batch must be 1-8 rows, got ", batch);
  const int code = dtype_code(x, op);
  const int target = int(target_blocks);
  TT_CHECK(target >= 1, op, "target_blocks must be positive, got ", target_blocks);
  TT_CHECK(workspace.is_cuda() && workspace.scalar_type() == at::kFloat &&
               workspace.numel() >= trimtab_cuda::qgemv_workspace_floats(L, batch, target),
           op, "workspace too small: need ", trimtab_cuda::qgemv_workspace_floats(L, batch, target), " floats");
  TT_CHECK(counters.is_cuda() && counters.scalar_type() == at::kInt && counters.numel() >= trimtab_cuda::qgemv_counters(L),
           op, "counters too small: need ", trimtab_cuda::qgemv_counters(L));
  const float* bias_ptr = nullptr;
  if (bias.has_value()) {
    TT_CHECK(bias->is_cuda() && bias->scalar_type() == at::kFloat && bias->numel() == out && bias->is_contiguous(), op,
             "bias must be a contiguous CUDA float32 [", out, "] tensor");
    bias_ptr = bias->data_ptr<float>();
  }
  Tensor y = at::empty({batch, out}, x.options());
  check_cuda(trimtab_cuda::qgemv(L, x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), bias_ptr, batch, code,
                                 workspace.data_ptr<float>(), counters.data_ptr<int32_t>(), target,
                                 c10::cuda::getCurrentCUDAStream()),
             op);
  return y;
}

int64_t qgemv_workspace(const Tensor& words, const Tensor& scale_min, const Tensor& meta, int64_t out, int64_t batch,
                        int64_t target_blocks) {
  QLayer L = layer_of(words, scale_min, meta, c10::nullopt, out, "qgemv_workspace");
  return trimtab_cuda::qgemv_workspace_floats(L, int(batch), int(target_blocks));
}

int64_t multiprocessor_count(const Tensor& on) {
  c10::cuda::CUDAGuard guard(on.device());
  return multiprocessors();
}

int64_t qgemv_counters(const Tensor& words, const Tensor& scale_min, const Tensor& meta, int64_t out) {
  QLayer L = layer_of(words, scale_min, meta, c10::nullopt, out, "qgemv_counters");
  return trimtab_cuda::qgemv_counters(L);
}

// Columns [col_begin, col_end) of W, transposed and in the original input order, into wt [in, ldw]
void qdequantize_t(Tensor wt, const Tensor& words, const Tensor& scale_min, const Tensor& meta,
                   const c10::optional<Tensor>& xmap, int64_t out, int64_t col_begin, int64_t col_end) {
  const char* op = "qdequantize_t";
  c10::cuda::CUDAGuard guard(wt.device());
  QLayer L = layer_of(words, scale_min, meta, xmap, out, op);
  TT_CHECK(wt.is_cuda() && wt.dim() == 2 && wt.stride(1) == 1 && wt.stride(0) % 4 == 0 &&
               wt.size(1) >= col_end - col_begin,
           op, "wt must be a CUDA [in, >= cols] tensor with contiguous rows, a row stride a multiple of 4");
  TT_CHECK(col_begin >= 0 && col_begin % 4 == 0 && col_begin < col_end && col_end <= out, op, "bad column range [",
           col_begin, ", ", col_end, ") of ", out);
  check_cuda(trimtab_cuda::qdequantize_t(L, int(col_begin), int(col_end), wt.data_ptr(), wt.stride(0),
                                         dtype_code(wt, op), c10::cuda::getCurrentCUDAStream()),
             op);
}

// canonical qweight [packed_rows, out] → words [word_rows, out_pad]
Tensor qrepack(const Tensor& qweight, const Tensor& repack, const Tensor& meta, int64_t word_rows, int64_t out_pad) {
  const char* op = "qrepack";
  c10::cuda::CUDAGuard guard(qweight.device());
  TT_CHECK(qweight.is_cuda() && qweight.scalar_type() == at::kInt && qweight.dim() == 2 && qweight.is_contiguous(), op,
           "qweight must be a contiguous CUDA int32 [packed_rows, out] tensor");
  TT_CHECK(repack.is_cuda() && repack.scalar_type() == at::kInt && repack.dim() == 2 && repack.size(1) == 4 &&
               meta.is_cuda() && meta.scalar_type() == at::kInt && meta.sizes() == repack.sizes(),
           op, "repack and meta must be CUDA int32 [chunks, 4] tensors");
  Tensor words = at::zeros({word_rows, out_pad}, qweight.options());
  check_cuda(trimtab_cuda::qrepack(qweight.data_ptr<int32_t>(), int(qweight.size(1)), repack.data_ptr<int32_t>(),
                                   int(repack.size(0)), meta.data_ptr<int32_t>(),
                                   reinterpret_cast<uint32_t*>(words.data_ptr<int32_t>()), int(out_pad),
                                   c10::cuda::getCurrentCUDAStream()),
             op);
  return words;
}

}  // namespace

TORCH_LIBRARY(trimtab_cuda, m) {
  m.def("qgemv(Tensor x, int in_features, Tensor words, Tensor scale_min, Tensor meta, Tensor? xmap, Tensor? bias, "
        "int out, Tensor(a!) workspace, Tensor(b!) counters, int target_blocks) -> Tensor", &qgemv);
  m.def("qgemv_workspace(Tensor words, Tensor scale_min, Tensor meta, int out, int batch, int target_blocks) -> int",
        &qgemv_workspace);
  m.def("multiprocessor_count(Tensor on) -> int", &multiprocessor_count);
  m.def("qgemv_counters(Tensor words, Tensor scale_min, Tensor meta, int out) -> int", &qgemv_counters);
  m.def("qdequantize_t(Tensor(a!) wt, Tensor words, Tensor scale_min, Tensor meta, Tensor? xmap, int out, "
        "int col_begin, int col_end) -> ()", &qdequantize_t);
  m.def("qrepack(Tensor qweight, Tensor repack, Tensor meta, int word_rows, int out_pad) -> Tensor", &qrepack);
}
