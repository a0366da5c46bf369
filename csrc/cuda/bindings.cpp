// torch.ops.trimtab_cuda.*: checked tensors → the CUDA kernels (qlinear_cuda.h). Errors are
// RuntimeErrors starting "trimtab_cuda::<op>:", which backend/cuda_ops.py turns into TrimtabError.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "decode_cuda.h"
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
  if (t.scalar_type() == at::kFloat) return 2;
  TORCH_CHECK(false, "trimtab_cuda::", op, ": activations must be float16, bfloat16 or float32, got ", t.scalar_type());
}

QLayer layer_of(const Tensor& words, const Tensor& scale_min, const Tensor& meta, const c10::optional<Tensor>& xmap,
                int64_t out, const char* op) {
  TORCH_CHECK(words.is_cuda() && words.scalar_type() == at::kInt && words.dim() == 3 && words.size(2) == 128 &&
                  words.is_contiguous(),
              "trimtab_cuda::", op, ": words must be a contiguous CUDA int32 [tiles, word_rows, 128] tensor");
  const int64_t out_pad = words.size(0) * 128;
  TORCH_CHECK(out <= out_pad && out > out_pad - 128, "trimtab_cuda::", op, ": words are ", out_pad,
              " columns wide, which does not fit out = ", out);
  TORCH_CHECK(scale_min.is_cuda() && scale_min.scalar_type() == at::kHalf && scale_min.dim() == 4 &&
                  scale_min.size(0) == words.size(0) && scale_min.size(2) == 128 && scale_min.size(3) == 2 &&
                  scale_min.is_contiguous(),
              "trimtab_cuda::", op, ": scale_min must be a contiguous CUDA float16 [", words.size(0),
              ", groups, 128, 2] tensor");
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
  L.word_rows = int(words.size(1));
  L.groups = int(scale_min.size(1));
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

// Rows of `name` as the GEMV reads them: [rows, cols] on x's device, in x's dtype, contiguous rows.
void check_rows(const Tensor& t, const Tensor& x, int64_t rows, int64_t cols, const char* name, const char* op) {
  TT_CHECK(t.is_cuda() && t.device() == x.device() && t.scalar_type() == x.scalar_type() && t.dim() == 2 &&
               t.size(0) == rows && t.size(1) == cols && t.stride(1) == 1,
           op, name, " must be a [", rows, ", ", cols, "] tensor of x's dtype and device with contiguous rows, got ",
           t.sizes(), " ", t.scalar_type());
}

// Row statistics of a norm (Σ x² per 128 columns): float32 [rows, parts], contiguous, on x's device.
void check_statistics(const Tensor& t, const Tensor& x, int64_t rows, int64_t parts, const char* name, const char* op) {
  TT_CHECK(t.is_cuda() && t.device() == x.device() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
               t.dim() == 2 && t.size(0) == rows && t.size(1) == parts,
           op, name, " must be a contiguous float32 [", rows, ", ", parts, "] tensor on x's device, got ", t.sizes(),
           " ", t.scalar_type());
}

using OptionalTensors = c10::List<c10::optional<Tensor>>;

bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// The layers of one GEMV launch, from lists holding one entry per layer.
std::vector<QLayer> layers_of(at::TensorList words, at::TensorList scale_min, at::TensorList meta,
                              const OptionalTensors* xmap, at::IntArrayRef out, const char* op) {
  const size_t count = words.size();
  TT_CHECK(count >= 1 && count <= size_t(trimtab_cuda::kMaxGemvLayers), op, "1 to ",
           trimtab_cuda::kMaxGemvLayers, " layers a launch, got ", count);
  TT_CHECK(scale_min.size() == count && meta.size() == count && out.size() == count &&
               (xmap == nullptr || xmap->size() == count),
           op, "one words, scale_min, meta, xmap and out per layer");
  std::vector<QLayer> layers;
  for (size_t i = 0; i < count; ++i)
    layers.push_back(layer_of(words[i], scale_min[i], meta[i], xmap ? xmap->get(i) : c10::nullopt, out[i], op));
  return layers;
}

// x: [batch, in] (rows may be strided, columns contiguous) → for each layer y: [batch, out] in x's
// dtype: y = residual + bias + u Wᵀ with u = x, or silu(gate)·x where gate is given (gate: x's shape
// and strides), or RMSNorm(x)·norm_weight from x's statistics norm_sumsq (float32 [batch, ceil(in /
// 128)]: Σ x² per 128 columns, as a GEMV's `sumsq` writes them for its output; a single layer given
// `sumsq` writes them). All layers run as one launch; a residual only for a single layer. Given a route
// (int64 [slots] of layer indices on x's device; the layers alternatives of one shape): one output
// [slots, out] whose row s is layer route[s] applied to x row s (x of `slots` rows) or to x's only row.
std::vector<Tensor> qgemv(const Tensor& x, int64_t in_features, at::TensorList words, at::TensorList scale_min,
                          at::TensorList meta, const OptionalTensors& xmap, const OptionalTensors& bias,
                          at::IntArrayRef out, Tensor workspace, Tensor counters, int64_t target_blocks,
                          at::IntArrayRef max_bits, const c10::optional<Tensor>& gate,
                          const c10::optional<Tensor>& residual, const c10::optional<Tensor>& route,
                          const c10::optional<Tensor>& norm_sumsq, const c10::optional<Tensor>& norm_weight,
                          double norm_eps, const c10::optional<Tensor>& sumsq) {
  const char* op = "qgemv";
  c10::cuda::CUDAGuard guard(x.device());
  const std::vector<QLayer> layers = layers_of(words, scale_min, meta, &xmap, out, op);
  const int count = int(layers.size());
  TT_CHECK(bias.size() == layers.size() && max_bits.size() == layers.size(), op, "one bias and max_bits per layer");
  for (const QLayer& L : layers)  // without a row map, the padded rows are x's rows
    TT_CHECK(L.xmap != nullptr || int64_t(L.chunks) * 32 == in_features, op, "a layer of ", L.chunks * 32,
             " rows cannot take ", in_features, " inputs");
  TT_CHECK(x.is_cuda() && x.dim() == 2 && x.size(1) == in_features && x.stride(1) == 1, op,
           "x must be a CUDA [batch, ", in_features, "] tensor with contiguous rows, got ", x.sizes());
  const int batch = int(x.size(0));
  TT_CHECK(batch >= 1 && batch <= trimtab_cuda::kMaxBatchRows, op, "batch must be 1-8 rows, got ", batch);
  const int code = dtype_code(x, op);
  const int target = int(target_blocks);
  TT_CHECK(target >= 1, op, "target_blocks must be positive, got ", target_blocks);
  const int slots = route.has_value() ? int(route->numel()) : 0;
  if (route.has_value()) {
    TT_CHECK(route->is_cuda() && route->device() == x.device() && route->scalar_type() == at::kLong &&
                 route->is_contiguous() && slots >= 1,
             op, "route must be a contiguous int64 tensor of layer indices on x's device");
    TT_CHECK(batch == 1 || batch == slots, op, "a routed GEMV takes one x row or one per slot, got ", batch,
             " rows for ", slots, " slots");
    TT_CHECK(!residual.has_value(), op, "a routed GEMV adds no residual");
    for (const QLayer& L : layers)
      TT_CHECK(L.out == layers[0].out && L.chunks == layers[0].chunks, op, "routed layers must share one shape");
  }
  const int rows = slots > 0 ? 1 : batch;  // rows a block multiplies
  const int64_t need = trimtab_cuda::qgemv_workspace_floats(layers.data(), count, rows, target, slots);
  TT_CHECK(workspace.is_cuda() && workspace.scalar_type() == at::kFloat && workspace.numel() >= need, op,
           "workspace too small: need ", need, " floats");
  const int tiles = trimtab_cuda::qgemv_counters(layers.data(), count, slots);
  TT_CHECK(counters.is_cuda() && counters.scalar_type() == at::kInt && counters.numel() >= tiles, op,
           "counters too small: need ", tiles);
  if (gate.has_value()) {
    check_rows(*gate, x, batch, in_features, "gate", op);
    TT_CHECK(gate->stride(0) == x.stride(0), op, "gate's rows must be as far apart as x's");
  }
  TT_CHECK(!residual.has_value() || count == 1, op, "a residual is added to a single layer's output only");
  const int64_t in_parts = (in_features + 127) / 128, out_parts = (out[0] + 127) / 128;
  if (norm_sumsq.has_value()) {
    TT_CHECK(!gate.has_value() && slots == 0, op, "an RMSNorm'd input takes no gate and no route");
    check_statistics(*norm_sumsq, x, batch, in_parts, "norm_sumsq", op);
    TT_CHECK(norm_weight.has_value(), op, "norm_weight must come with norm_sumsq");
    check_rows(norm_weight->view({1, -1}), x, 1, in_features, "norm_weight", op);
  }
  if (sumsq.has_value()) {
    TT_CHECK(count == 1 && slots == 0, op, "Σ y² is written for a single layer's output only");
    check_statistics(*sumsq, x, batch, out_parts, "sumsq", op);
  }
  if (residual.has_value()) check_rows(*residual, x, batch, out[0], "residual", op);
  const Tensor res = residual.has_value() ? residual->contiguous() : Tensor();
  std::vector<Tensor> ys;
  std::vector<trimtab_cuda::GemvOutput> outs;
  for (int i = 0; i < count; ++i) {
    TT_CHECK(max_bits[i] >= 2 && max_bits[i] <= 8, op, "max_bits must be 2-8, got ", max_bits[i]);
    const c10::optional<Tensor> b = bias.get(i);
    if (b.has_value())
      TT_CHECK(b->is_cuda() && b->scalar_type() == at::kFloat && b->numel() == out[i] && b->is_contiguous(), op,
               "bias must be a contiguous CUDA float32 [", out[i], "] tensor");
    if (slots == 0 || i == 0) ys.push_back(at::empty({slots > 0 ? slots : batch, out[i]}, x.options()));
    outs.push_back({ys.back().data_ptr(), res.defined() ? res.data_ptr() : nullptr, ys.back().stride(0),
                    b.has_value() ? b->data_ptr<float>() : nullptr, int(max_bits[i]),
                    sumsq.has_value() ? sumsq->data_ptr<float>() : nullptr});
  }
  const trimtab_cuda::RowNorm norm{norm_sumsq.has_value() ? norm_sumsq->data_ptr<float>() : nullptr,
                                   norm_sumsq.has_value() ? norm_weight->data_ptr() : nullptr, float(norm_eps),
                                   int(in_features)};
  const trimtab_cuda::GemvInput in{x.data_ptr(), gate.has_value() ? gate->data_ptr() : nullptr, x.stride(0), norm};
  const trimtab_cuda::GemvRoute routing{slots > 0 ? route->data_ptr<int64_t>() : nullptr, slots,
                                        batch == 1 ? 0 : x.stride(0)};
  check_cuda(trimtab_cuda::qgemv(in, layers.data(), outs.data(), count, rows, code, workspace.data_ptr<float>(),
                                 counters.data_ptr<int32_t>(), target, slots > 0 ? &routing : nullptr,
                                 c10::cuda::getCurrentCUDAStream()),
             op);
  return ys;
}

int64_t qgemv_workspace(at::TensorList words, at::TensorList scale_min, at::TensorList meta, at::IntArrayRef out,
                        int64_t batch, int64_t target_blocks, int64_t slots) {
  const std::vector<QLayer> layers = layers_of(words, scale_min, meta, nullptr, out, "qgemv_workspace");
  return trimtab_cuda::qgemv_workspace_floats(layers.data(), int(layers.size()), slots > 0 ? 1 : int(batch),
                                              int(target_blocks), int(slots));
}

int64_t multiprocessor_count(const Tensor& on) {
  c10::cuda::CUDAGuard guard(on.device());
  return multiprocessors();
}

int64_t qgemv_counters(at::TensorList words, at::TensorList scale_min, at::TensorList meta, at::IntArrayRef out,
                       int64_t slots) {
  const std::vector<QLayer> layers = layers_of(words, scale_min, meta, nullptr, out, "qgemv_counters");
  return trimtab_cuda::qgemv_counters(layers.data(), int(layers.size()), int(slots));
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

// canonical qweight [packed_rows, out] → words [tiles, word_rows, 128]
Tensor qrepack(const Tensor& qweight, const Tensor& repack, const Tensor& meta, int64_t word_rows) {
  const char* op = "qrepack";
  c10::cuda::CUDAGuard guard(qweight.device());
  TT_CHECK(qweight.is_cuda() && qweight.scalar_type() == at::kInt && qweight.dim() == 2 && qweight.is_contiguous(), op,
           "qweight must be a contiguous CUDA int32 [packed_rows, out] tensor");
  TT_CHECK(repack.is_cuda() && repack.scalar_type() == at::kInt && repack.dim() == 2 && repack.size(1) == 4 &&
               meta.is_cuda() && meta.scalar_type() == at::kInt && meta.sizes() == repack.sizes(),
           op, "repack and meta must be CUDA int32 [chunks, 4] tensors");
  const int64_t tiles = (qweight.size(1) + 127) / 128;
  Tensor words = at::zeros({tiles, word_rows, 128}, qweight.options());
  check_cuda(trimtab_cuda::qrepack(qweight.data_ptr<int32_t>(), int(qweight.size(1)), repack.data_ptr<int32_t>(),
                                   int(repack.size(0)), meta.data_ptr<int32_t>(),
                                   reinterpret_cast<uint32_t*>(words.data_ptr<int32_t>()), int(word_rows),
                                   c10::cuda::getCurrentCUDAStream()),
             op);
  return words;
}

// ---- decode step ----

Tensor rms_norm(const Tensor& x, const Tensor& weight, double eps) {
  const char* op = "rms_norm";
  c10::cuda::CUDAGuard guard(x.device());
  const int code = dtype_code(x, op);
  TT_CHECK(x.is_cuda() && x.is_contiguous() && x.dim() >= 1, op, "x must be a contiguous CUDA tensor");
  const int64_t dim = x.size(-1);
  TT_CHECK(weight.is_cuda() && weight.is_contiguous() && weight.scalar_type() == x.scalar_type() &&
               weight.numel() == dim, op, "weight must be a contiguous [", dim, "] tensor of x's dtype");
  Tensor y = at::empty_like(x);
  check_cuda(trimtab_cuda::rms_norm(x.data_ptr(), weight.data_ptr(), y.data_ptr(), int(x.numel() / dim), int(dim),
                                    float(eps), code, c10::cuda::getCurrentCUDAStream()), op);
  return y;
}

Tensor silu_mul(const Tensor& gate, const Tensor& up) {
  const char* op = "silu_mul";
  c10::cuda::CUDAGuard guard(gate.device());
  const int code = dtype_code(gate, op);
  TT_CHECK(gate.is_cuda() && up.device() == gate.device() && up.scalar_type() == gate.scalar_type() &&
               up.sizes() == gate.sizes() && gate.is_contiguous() && up.is_contiguous() && aligned16(gate) &&
               aligned16(up),
           op, "gate and up must be contiguous, 16-byte aligned CUDA tensors of one shape and dtype");
  Tensor out = at::empty_like(gate);
  check_cuda(trimtab_cuda::silu_mul(gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel(), code,
                                    c10::cuda::getCurrentCUDAStream()), op);
  return out;
}

// The layer's cache keys/values: [1, kv_heads, slots, head_dim] with contiguous head_dim.
void check_cache(const Tensor& t, const Tensor& like, int64_t kv_heads, int64_t head_dim, const char* name,
                 const char* op) {
  TT_CHECK(t.is_cuda() && t.device() == like.device() && t.scalar_type() == like.scalar_type() && t.dim() == 4 &&
               t.size(0) == 1 && t.size(1) == kv_heads && t.size(3) == head_dim && t.stride(3) == 1,
           op, name, " must be a [1, ", kv_heads, ", slots, ", head_dim, "] cache tensor of the query's dtype, got ",
           t.sizes());
}

void check_position(const Tensor& t, const Tensor& like, const char* name, const char* op) {
  TT_CHECK(t.is_cuda() && t.device() == like.device() && t.scalar_type() == at::kLong && t.numel() >= 1, op, name,
           " must be an int64 tensor on the query's device");
}

void check_rotary(const Tensor& inv_freq, int64_t rotary_dim, int64_t head_dim, const char* op) {
  TT_CHECK(rotary_dim > 0 && rotary_dim <= head_dim && rotary_dim % 2 == 0 && inv_freq.is_cuda() &&
               inv_freq.scalar_type() == at::kFloat && inv_freq.numel() == rotary_dim / 2 && inv_freq.is_contiguous(),
           op, "inv_freq must be float32 [rotary_dim / 2] with an even rotary_dim <= head_dim");
}

Tensor rotary_kv(const Tensor& q, const Tensor& k, const Tensor& v, Tensor keys, Tensor values, const Tensor& position,
                 const Tensor& inv_freq, double scaling, int64_t head_dim, int64_t rotary_dim) {
  const char* op = "rotary_kv";
  c10::cuda::CUDAGuard guard(q.device());
  const int code = dtype_code(q, op);
  const auto tokens_of = [](const Tensor& t) { return t.dim() >= 2 ? t.size(-2) : int64_t(1); };
  const int64_t tokens = tokens_of(q);
  TT_CHECK(head_dim > 0 && q.size(-1) % head_dim == 0 && k.size(-1) % head_dim == 0 && k.sizes() == v.sizes() &&
               tokens_of(k) == tokens && q.numel() == tokens * q.size(-1) && k.numel() == tokens * k.size(-1) &&
               q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && k.scalar_type() == q.scalar_type() &&
               v.scalar_type() == q.scalar_type(),
           op, "q, k, v must be contiguous projections [..., tokens, heads · ", head_dim, "] of the same tokens");
  const int64_t kv_heads = k.size(-1) / head_dim, q_heads = q.size(-1) / head_dim;
  check_cache(keys, q, kv_heads, head_dim, "keys", op);
  check_cache(values, q, kv_heads, head_dim, "values", op);
  TT_CHECK(keys.strides() == values.strides(), op, "keys and values must share strides");
  check_position(position, q, "position", op);
  check_rotary(inv_freq, rotary_dim, head_dim, op);
  Tensor q_out = at::empty({q_heads, tokens, head_dim}, q.options());
  trimtab_cuda::RotaryKvArgs a{q.data_ptr(), k.data_ptr(), v.data_ptr(), q_out.data_ptr(), keys.data_ptr(),
                               values.data_ptr(), position.data_ptr<int64_t>(), inv_freq.data_ptr<float>(),
                               float(scaling), int(tokens), int(q_heads), int(kv_heads), int(head_dim),
                               int(rotary_dim), keys.stride(1), keys.stride(2), keys.size(2)};
  check_cuda(trimtab_cuda::rotary_kv(a, code, c10::cuda::getCurrentCUDAStream()), op);
  return q_out;
}

Tensor decode_attention(const Tensor& q, const Tensor& k, const Tensor& v, Tensor keys, Tensor values,
                        const Tensor& position, const Tensor& first_slot, const Tensor& inv_freq, double rotary_scaling,
                        int64_t rotary_dim, Tensor workspace, double scale, int64_t window) {
  const char* op = "decode_attention";
  c10::cuda::CUDAGuard guard(q.device());
  const int code = dtype_code(q, op);
  TT_CHECK(keys.dim() == 4, op, "keys must be [1, kv_heads, slots, head_dim]");
  const int64_t kv_heads = keys.size(1), head_dim = keys.size(3), slots = keys.size(2);
  check_cache(keys, q, kv_heads, head_dim, "keys", op);
  check_cache(values, q, kv_heads, head_dim, "values", op);
  TT_CHECK(keys.strides() == values.strides(), op, "keys and values must share strides");
  TT_CHECK(q.is_contiguous() && q.numel() % (kv_heads * head_dim) == 0, op, "q must be contiguous whole heads");
  TT_CHECK(k.is_contiguous() && v.is_contiguous() && k.numel() == kv_heads * head_dim && v.numel() == k.numel() &&
               k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
           op, "k and v must be one token's contiguous [", kv_heads, " · ", head_dim, "] of the query's dtype");
  const int64_t vector = 16 / keys.element_size();  // the kernel reads the cache 16 bytes at a time
  TT_CHECK(aligned16(keys) && aligned16(values) && keys.stride(1) % vector == 0 && keys.stride(2) % vector == 0,
           op, "the cache must be 16-byte aligned, its head and slot strides whole 16-byte pieces");
  const int64_t group = q.numel() / (kv_heads * head_dim);
  TT_CHECK(trimtab_cuda::attention_supported(int(head_dim), int(group)), op, "head_dim ", head_dim,
           " with ", group, " query heads per key head is not supported (head_dim 64/128/256, up to 8)");
  check_position(position, q, "position", op);
  check_position(first_slot, q, "first_slot", op);
  check_rotary(inv_freq, rotary_dim, head_dim, op);
  TT_CHECK(workspace.is_cuda() && workspace.scalar_type() == at::kFloat && aligned16(workspace) &&
               workspace.numel() >= trimtab_cuda::attention_workspace_floats(int(kv_heads), int(slots), int(head_dim)),
           op, "workspace too small");
  Tensor out = at::empty_like(q);
  trimtab_cuda::AttentionArgs a{q.data_ptr(), k.data_ptr(), v.data_ptr(), keys.data_ptr(), values.data_ptr(),
                                out.data_ptr(), position.data_ptr<int64_t>(), first_slot.data_ptr<int64_t>(),
                                inv_freq.data_ptr<float>(), float(rotary_scaling), int(rotary_dim),
                                workspace.data_ptr<float>(), float(scale), int(kv_heads), int(group), int(head_dim),
                                int(slots), window, keys.stride(1), keys.stride(2)};
  check_cuda(trimtab_cuda::decode_attention(a, code, c10::cuda::getCurrentCUDAStream()), op);
  return out;
}

void greedy_next(const Tensor& logits, Tensor token, Tensor position, Tensor state) {
  const char* op = "greedy_next";
  c10::cuda::CUDAGuard guard(logits.device());
  const int code = dtype_code(logits, op);
  TT_CHECK(logits.is_cuda() && logits.is_contiguous() && logits.numel() >= 1 && logits.numel() < (int64_t(1) << 32),
           op, "logits must be a contiguous CUDA tensor of 1 to 2^32 - 1 elements");
  for (const Tensor* t : {&token, &position, &state})
    TT_CHECK(t->is_cuda() && t->device() == logits.device() && t->scalar_type() == at::kLong && t->is_contiguous(), op,
             "token, position and state must be contiguous int64 tensors on the logits' device");
  TT_CHECK((token.numel() == 1 || token.numel() == 2) && position.numel() == 1 && state.numel() == 2, op,
           "token must hold one element (the argmax) or two (and whether it is NaN), position one, state two (zeros)");
  int64_t* argmax = token.data_ptr<int64_t>();
  check_cuda(trimtab_cuda::greedy_next(logits.data_ptr(), logits.numel(), code, argmax,
                                       token.numel() == 2 ? argmax + 1 : nullptr, position.data_ptr<int64_t>(),
                                       state.data_ptr(), c10::cuda::getCurrentCUDAStream()), op);
}

int64_t attention_workspace(int64_t kv_heads, int64_t slots, int64_t head_dim) {
  return trimtab_cuda::attention_workspace_floats(int(kv_heads), int(slots), int(head_dim));
}

bool attention_supported(int64_t head_dim, int64_t group) {
  return trimtab_cuda::attention_supported(int(head_dim), int(group));
}

}  // namespace

TORCH_LIBRARY(trimtab_cuda, m) {
  m.def("qgemv(Tensor x, int in_features, Tensor[] words, Tensor[] scale_min, Tensor[] meta, Tensor?[] xmap, "
        "Tensor?[] bias, int[] out, Tensor(a!) workspace, Tensor(b!) counters, int target_blocks, int[] max_bits, "
        "Tensor? gate=None, Tensor? residual=None, Tensor? route=None, Tensor? norm_sumsq=None, "
        "Tensor? norm_weight=None, float norm_eps=0.0, Tensor? sumsq=None) -> Tensor[]", &qgemv);
  m.def("qgemv_workspace(Tensor[] words, Tensor[] scale_min, Tensor[] meta, int[] out, int batch, "
        "int target_blocks, int slots=0) -> int", &qgemv_workspace);
  m.def("multiprocessor_count(Tensor on) -> int", &multiprocessor_count);
  m.def("qgemv_counters(Tensor[] words, Tensor[] scale_min, Tensor[] meta, int[] out, int slots=0) -> int",
        &qgemv_counters);
  m.def("qdequantize_t(Tensor(a!) wt, Tensor words, Tensor scale_min, Tensor meta, Tensor? xmap, int out, "
        "int col_begin, int col_end) -> ()", &qdequantize_t);
  m.def("qrepack(Tensor qweight, Tensor repack, Tensor meta, int word_rows) -> Tensor", &qrepack);
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm);
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor", &silu_mul);
  m.def("rotary_kv(Tensor q, Tensor k, Tensor v, Tensor(a!) keys, Tensor(b!) values, Tensor position, "
        "Tensor inv_freq, float scaling, int head_dim, int rotary_dim) -> Tensor", &rotary_kv);
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) keys, Tensor(b!) values, Tensor position, "
        "Tensor first_slot, Tensor inv_freq, float rotary_scaling, int rotary_dim, Tensor(c!) workspace, "
        "float scale, int window) -> Tensor", &decode_attention);
  m.def("attention_workspace(int kv_heads, int slots, int head_dim) -> int", &attention_workspace);
  m.def("attention_supported(int head_dim, int group) -> bool", &attention_supported);
  m.def("greedy_next(Tensor logits, Tensor(a!) token, Tensor(b!) position, Tensor(c!) state) -> ()", &greedy_next);
}
