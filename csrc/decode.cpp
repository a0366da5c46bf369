// Whole-model single-token decode for Llama-family models on the CPU: one call per token.
//
// At batch 1, a small model's decode step is hundreds of tiny ops; dispatched one by one from
// Python, their overhead outweighs the arithmetic. A FusedDecoder holds every layer's weights
// (built once by backend/fused_decode.py) and runs a whole step in C++:
//
//   x = embedding[token]                                   # [D]
//   per layer:  h = rms_norm(x)
//               q, k, v = Wq h, Wk h, Wv h                 # one parallel region, x quantized once
//               rotary(q, k); k, v -> KV cache slot        # the caller's cache tensors, in place
//               x += Wo attention(q, cached keys/values)   # softmax over the visible slots
//               h = rms_norm(x)
//               x += Wdown (silu(Wgate h) * Wup h)         # gate/up in one parallel region
//   logits = Whead rms_norm(x)                             # [V]
//
// The float32 steps are those of the Python path (backend/models/base.py: HF's RMSNorm and
// rotary, SDPA's softmax), and the linears run the same int8 GEMV kernel as PackedLinear.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "qlinear.h"
#include "qlinear_tensors.h"
#include "rms_norm.h"
#include "rotary.h"
#include "vec.h"

namespace trimtab::cpu::decode {
namespace {

using qlinear::Matrix;
using qlinear::PackedTensors;

// One packed linear layer, handed over from Python once (torch.classes.trimtab.QLinear).
struct QLinear : torch::CustomClassHolder {
  PackedTensors weights;

  QLinear(const at::Tensor& packed, const at::Tensor& group_bits, const at::Tensor& group_sizes,
          const std::optional<at::Tensor>& perm, const std::optional<at::Tensor>& bias, int64_t out_features)
      : weights(qlinear::checked_packed(packed, group_bits, group_sizes, perm, bias, out_features, "QLinear")) {}

  int64_t in_features() const { return weights.layout.in_features; }
  int64_t out_features() const { return weights.layout.out_features; }
};

using QLinearPtr = c10::intrusive_ptr<QLinear>;

struct Layer {
  at::Tensor input_norm, post_norm;  // float32 [D]
  QLinearPtr q, k, v, o, gate, up, down;
  int64_t sliding_window = 0;  // 0: full attention
};

// ---- attention and SiLU for one token ---------------------------------------------------

// scores[t] = q · keys[t] * scale for t < count; keys: [count, dim].
void attention_scores(const float* q, const float* keys, int64_t count, int64_t dim, float scale, float* scores) {
  int64_t t = 0;
#ifdef TRIMTAB_AVX2
  if (dim % kLanes == 0) {
    for (; t + 4 <= count; t += 4) {  // four keys at a time: four FMA chains, one shared reduction
      const float* k = keys + t * dim;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t i = 0; i < dim; i += kLanes) {
        const __m256 qv = _mm256_loadu_ps(q + i);
        a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + i), a0);
        a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + dim + i), a1);
        a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 2 * dim + i), a2);
        a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 3 * dim + i), a3);
      }
      // hadd pairs lanes within 128-bit halves: after two rounds, lane j of each half holds a
      // partial sum of key j; adding the halves finishes the four dot products.
      const __m256 pairs = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
      const __m128 dots = _mm_add_ps(_mm256_castps256_ps128(pairs), _mm256_extractf128_ps(pairs, 1));
      _mm_storeu_ps(scores + t, _mm_mul_ps(dots, _mm_set1_ps(scale)));
    }
  }
#endif
  for (; t < count; ++t) {
    const float* k = keys + t * dim;
    float total = 0.0f;
    for (int64_t i = 0; i < dim; ++i) total += q[i] * k[i];
    scores[t] = total * scale;
  }
}

// p = softmax(p) over n scores, in place (max subtracted first, as every softmax does).
void softmax(float* p, int64_t n) {
  float largest = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < n; ++t) largest = std::max(largest, p[t]);
  float total = 0.0f;
  int64_t t = 0;
#ifdef TRIMTAB_AVX2
  const __m256 shift = _mm256_set1_ps(largest);
  __m256 sum = _mm256_setzero_ps();
  for (; t + kLanes <= n; t += kLanes) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + t), shift));
    _mm256_storeu_ps(p + t, e);
    sum = _mm256_add_ps(sum, e);
  }
  total = horizontal_sum(sum);
#endif
  for (; t < n; ++t) {
    p[t] = std::exp(p[t] - largest);
    total += p[t];
  }
  const float inverse = 1.0f / total;
  for (t = 0; t < n; ++t) p[t] *= inverse;
}

// out[dim] = Σ_t p[t] values[t]; values: [count, dim]. 64 dims at a time stay in registers.
void weighted_sum(const float* p, const float* values, int64_t count, int64_t dim, float* out) {
  int64_t d = 0;
#ifdef TRIMTAB_AVX2
  constexpr int64_t kChunk = 8 * kLanes;
  for (; d + kChunk <= dim; d += kChunk) {
    __m256 acc[8];
    for (auto& a : acc) a = _mm256_setzero_ps();
    for (int64_t t = 0; t < count; ++t) {
      const __m256 w = _mm256_broadcast_ss(p + t);
      const float* v = values + t * dim + d;
      for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + i * kLanes), acc[i]);
    }
    for (int i = 0; i < 8; ++i) _mm256_storeu_ps(out + d + i * kLanes, acc[i]);
  }
  for (; d + kLanes <= dim; d += kLanes) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t t = 0; t < count; ++t) {
      acc = _mm256_fmadd_ps(_mm256_broadcast_ss(p + t), _mm256_loadu_ps(values + t * dim + d), acc);
    }
    _mm256_storeu_ps(out + d, acc);
  }
#endif
  for (; d < dim; ++d) {
    float total = 0.0f;
    for (int64_t t = 0; t < count; ++t) total += p[t] * values[t * dim + d];
    out[d] = total;
  }
}

// gate = silu(gate) * up = gate / (1 + e^-gate) * up, as F.silu(g) * u in float32.
void silu_times(float* gate, const float* up, int64_t n) {
  int64_t i = 0;
#ifdef TRIMTAB_AVX2
  const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
  for (; i + kLanes <= n; i += kLanes) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_xor_ps(g, sign))));
    _mm256_storeu_ps(gate + i, _mm256_mul_ps(silu, _mm256_loadu_ps(up + i)));
  }
#endif
  for (; i < n; ++i) gate[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

class FusedDecoder : public torch::CustomClassHolder {
 public:
  // kernel: "int8" (what PackedLinear runs for one row) or "fp32" (exact; for tests).
  FusedDecoder(int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, double eps,
               const at::Tensor& inv_freq, double attention_scaling, bool interleaved, const std::string& kernel)
      : hidden_(hidden), heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim), eps_(static_cast<float>(eps)),
        scaling_(static_cast<float>(attention_scaling)), interleaved_(interleaved),
        kernel_(kernel == "fp32" ? qlinear::Kernel::Fp32 : qlinear::Kernel::Int8) {
    TORCH_CHECK(kernel == "int8" || kernel == "fp32", "trimtab::FusedDecoder: kernel must be int8 or fp32, got '",
                kernel, "'");
    TORCH_CHECK(hidden > 0 && heads > 0 && kv_heads > 0 && head_dim > 0 && heads % kv_heads == 0,
                "trimtab::FusedDecoder: bad shape (hidden ", hidden, ", heads ", heads, ", kv_heads ", kv_heads,
                ", head_dim ", head_dim, ")");
    TORCH_CHECK(inv_freq.dim() == 1 && 2 * inv_freq.size(0) <= head_dim,
                "trimtab::FusedDecoder: inv_freq must be [R/2] with R <= head_dim, got ", inv_freq.sizes());
    inv_freq_ = inv_freq.to(at::kFloat).contiguous();
  }

  void add_layer(const at::Tensor& input_norm, QLinearPtr q, QLinearPtr k, QLinearPtr v, QLinearPtr o,
                 const at::Tensor& post_norm, QLinearPtr gate, QLinearPtr up, QLinearPtr down,
                 int64_t sliding_window) {
    const int64_t d = hidden_, attn = heads_ * head_dim_, kv = kv_heads_ * head_dim_;
    const int64_t inter = gate->out_features();
    const std::vector<std::tuple<const char*, const QLinear*, int64_t, int64_t>> shapes = {
        {"q_proj", q.get(), d, attn}, {"k_proj", k.get(), d, kv}, {"v_proj", v.get(), d, kv},
        {"o_proj", o.get(), attn, d}, {"gate_proj", gate.get(), d, inter}, {"up_proj", up.get(), d, inter},
        {"down_proj", down.get(), inter, d}};
    for (const auto& [name, linear, in, out] : shapes) {
      TORCH_CHECK(linear->in_features() == in && linear->out_features() == out, "trimtab::FusedDecoder: layer ",
                  layers_.size(), " ", name, " is ", linear->out_features(), " x ", linear->in_features(),
                  ", expected ", out, " x ", in);
    }
    Layer layer{norm_weight(input_norm, "input_layernorm"), norm_weight(post_norm, "post_attention_layernorm"),
                std::move(q), std::move(k), std::move(v), std::move(o), std::move(gate), std::move(up),
                std::move(down), std::max<int64_t>(0, sliding_window)};
    layers_.push_back(std::move(layer));
  }

  // embedding: [V, D] float32/16 or bfloat16, or None to use the head's rows (tied, quantized).
  void set_output(const at::Tensor& final_norm, QLinearPtr head, const std::optional<at::Tensor>& embedding) {
    TORCH_CHECK(head->in_features() == hidden_, "trimtab::FusedDecoder: the head takes ", head->in_features(),
                " features, expected ", hidden_);
    final_norm_ = norm_weight(final_norm, "norm");
    head_ = std::move(head);
    embedding_ = at::Tensor();
    if (embedding.has_value()) {
      TORCH_CHECK(embedding->dim() == 2 && embedding->size(0) == head_->out_features() &&
                      embedding->size(1) == hidden_,
                  "trimtab::FusedDecoder: embedding must be [", head_->out_features(), ", ", hidden_, "], got ",
                  embedding->sizes());
      const at::ScalarType dtype = embedding->scalar_type();
      TORCH_CHECK(embedding->device().is_cpu() &&
                      (dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16),
                  "trimtab::FusedDecoder: embedding must be a float32, float16 or bfloat16 CPU tensor, got ", dtype);
      embedding_ = embedding->contiguous();  // kept as stored: one row is converted per token
    }
  }

  // Decodes `token` at cache slot `slot` of a batch-1 cache whose first `pad` slots are padding;
  // writes its keys/values there (keys[l], values[l]: float32 [1, kv_heads, max_len, head_dim])
  // and returns the next token's logits, float32 [V]. The caller advances its cache.
  at::Tensor step(int64_t token, int64_t slot, int64_t pad, const std::vector<at::Tensor>& keys,
                  const std::vector<at::Tensor>& values) {
    std::lock_guard<std::mutex> lock(mutex_);  // one step at a time: the buffers are shared
    check_step(token, slot, pad, keys, values);
    const int64_t max_len = keys[0].size(2);
    resize_buffers();
    const int64_t half = inv_freq_.size(0);
    fill_rotary_row(cos_.data(), sin_.data(), slot - pad, inv_freq_.const_data_ptr<float>(), half, scaling_,
                    interleaved_);
    embed(token, x_.data());
    for (size_t l = 0; l < layers_.size(); ++l) {
      const Layer& layer = layers_[l];
      rms_norm_row(h_.data(), x_.data(), layer.input_norm.const_data_ptr<float>(), hidden_, eps_);
      gemv({layer.q.get(), layer.k.get(), layer.v.get()}, {q_.data(), k_.data(), v_.data()}, h_.data());
      float* key_cache = keys[l].data_ptr<float>();
      float* value_cache = values[l].data_ptr<float>();
      for (int64_t kvh = 0; kvh < kv_heads_; ++kvh) {
        const int64_t at_slot = (kvh * max_len + slot) * head_dim_;
        rotate_head(key_cache + at_slot, k_.data() + kvh * head_dim_, cos_.data(), sin_.data(), 2 * half, head_dim_,
                    interleaved_);
        std::copy(v_.data() + kvh * head_dim_, v_.data() + (kvh + 1) * head_dim_, value_cache + at_slot);
      }
      for (int64_t h = 0; h < heads_; ++h) {
        rotate_head(q_rot_.data() + h * head_dim_, q_.data() + h * head_dim_, cos_.data(), sin_.data(), 2 * half,
                    head_dim_, interleaved_);
      }
      const int64_t first = layer.sliding_window > 0 ? std::max(pad, slot - layer.sliding_window + 1) : pad;
      attention(key_cache, value_cache, max_len, first, slot);
      gemv({layer.o.get()}, {o_.data()}, attn_.data());
      add_to(x_.data(), o_.data(), hidden_);
      rms_norm_row(h_.data(), x_.data(), layer.post_norm.const_data_ptr<float>(), hidden_, eps_);
      gemv({layer.gate.get(), layer.up.get()}, {gate_.data(), up_.data()}, h_.data());
      silu_times(gate_.data(), up_.data(), static_cast<int64_t>(gate_.size()));
      gemv({layer.down.get()}, {o_.data()}, gate_.data());
      add_to(x_.data(), o_.data(), hidden_);
    }
    rms_norm_row(h_.data(), x_.data(), final_norm_.const_data_ptr<float>(), hidden_, eps_);
    at::Tensor logits = at::empty({head_->out_features()}, at::TensorOptions().dtype(at::kFloat));
    gemv({head_.get()}, {logits.mutable_data_ptr<float>()}, h_.data());
    return logits;
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

 private:
  at::Tensor norm_weight(const at::Tensor& w, const char* name) const {
    TORCH_CHECK(w.dim() == 1 && w.size(0) == hidden_, "trimtab::FusedDecoder: ", name, " weight must be [", hidden_,
                "], got ", w.sizes());
    return w.to(at::kFloat).contiguous();
  }

  void check_step(int64_t token, int64_t slot, int64_t pad, const std::vector<at::Tensor>& keys,
                  const std::vector<at::Tensor>& values) const {
    TORCH_CHECK(head_, "trimtab::FusedDecoder: set_output was not called");
    TORCH_CHECK(token >= 0 && token < head_->out_features(), "trimtab::FusedDecoder: token ", token,
                " is outside the vocabulary [0, ", head_->out_features(), ")");
    TORCH_CHECK(keys.size() == layers_.size() && values.size() == layers_.size(), "trimtab::FusedDecoder: ",
                layers_.size(), " layers need as many key and value tensors, got ", keys.size(), " and ",
                values.size());
    for (size_t l = 0; l < layers_.size(); ++l) {
      for (const at::Tensor* t : {&keys[l], &values[l]}) {
        TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu() && t->is_contiguous() && t->dim() == 4 &&
                        t->size(0) == 1 && t->size(1) == kv_heads_ && t->size(3) == head_dim_ &&
                        t->sizes() == keys[0].sizes(),
                    "trimtab::FusedDecoder: the KV cache of layer ", l, " must be contiguous float32 CPU [1, ",
                    kv_heads_, ", max_len, ", head_dim_, "], got ", t->scalar_type(), " ", t->sizes());
      }
    }
    TORCH_CHECK(slot >= 0 && slot < keys[0].size(2), "trimtab::FusedDecoder: slot ", slot,
                " is outside the cache [0, ", keys[0].size(2), ")");
    TORCH_CHECK(pad >= 0 && pad <= slot, "trimtab::FusedDecoder: pad ", pad, " must lie in [0, slot ", slot, "]");
  }

  void resize_buffers() {
    const int64_t attn = heads_ * head_dim_, kv = kv_heads_ * head_dim_;
    const int64_t inter = layers_.empty() ? 0 : layers_[0].gate->out_features();
    x_.resize(hidden_);
    h_.resize(hidden_);
    o_.resize(hidden_);
    q_.resize(attn);
    q_rot_.resize(attn);
    attn_.resize(attn);
    k_.resize(kv);
    v_.resize(kv);
    gate_.resize(inter);
    up_.resize(inter);
    cos_.resize(head_dim_);
    sin_.resize(head_dim_);
  }

  void embed(int64_t token, float* x) {
    if (embedding_.defined()) {
      const auto copy_row = [&](const auto* table) {
        const auto* row = table + token * hidden_;
        for (int64_t i = 0; i < hidden_; ++i) x[i] = to_float(row[i]);
      };
      switch (embedding_.scalar_type()) {
        case at::kHalf: return copy_row(embedding_.const_data_ptr<c10::Half>());
        case at::kBFloat16: return copy_row(embedding_.const_data_ptr<c10::BFloat16>());
        default: return copy_row(embedding_.const_data_ptr<float>());
      }
    }
    // A tied, quantized head: its row `token`, from that row's tile (quantized row order).
    const Matrix m = head_->weights.matrix();
    tile_.resize(hidden_ * qlinear::kTileColumns);
    const int64_t tile = token / qlinear::kTileColumns, column = token % qlinear::kTileColumns;
    qlinear::dequantize_tiles(*m.layout, m.packed, tile, tile + 1, tile_.data(), qlinear::kTileColumns);
    for (int64_t i = 0; i < hidden_; ++i) {
      x[m.perm != nullptr ? m.perm[i] : i] = tile_[i * qlinear::kTileColumns + column];
    }
  }

  void gemv(std::initializer_list<const QLinear*> linears, std::initializer_list<float*> outputs, const float* x) {
    matrices_.clear();
    for (const QLinear* linear : linears) matrices_.push_back(linear->weights.matrix());
    qlinear::gemv(matrices_.data(), outputs.begin(), static_cast<int64_t>(matrices_.size()), x,
                  kernel_, workspace_);
  }

  // attn_[h] = softmax(q_h · K[first..slot] / sqrt(hd)) V[first..slot] per query head h; query
  // heads share key/value heads in groups (GQA).
  void attention(const float* key_cache, const float* value_cache, int64_t max_len, int64_t first, int64_t slot) {
    const int64_t visible = slot - first + 1;
    const int64_t group = heads_ / kv_heads_;
    const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim_));
    scores_.resize(heads_ * visible);
    at::parallel_for(0, heads_, std::max<int64_t>(1, 16384 / (visible * head_dim_)), [&](int64_t begin, int64_t end) {
      for (int64_t h = begin; h < end; ++h) {
        const int64_t start = ((h / group) * max_len + first) * head_dim_;
        float* p = scores_.data() + h * visible;
        attention_scores(q_rot_.data() + h * head_dim_, key_cache + start, visible, head_dim_, scale, p);
        softmax(p, visible);
        weighted_sum(p, value_cache + start, visible, head_dim_, attn_.data() + h * head_dim_);
      }
    });
  }

  static void add_to(float* y, const float* x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] += x[i];
  }

  int64_t hidden_, heads_, kv_heads_, head_dim_;
  float eps_, scaling_;
  bool interleaved_;
  qlinear::Kernel kernel_;
  at::Tensor inv_freq_, final_norm_, embedding_;
  QLinearPtr head_;
  std::vector<Layer> layers_;

  std::mutex mutex_;
  qlinear::Workspace workspace_;
  std::vector<Matrix> matrices_;
  std::vector<float> x_, h_, o_, q_, q_rot_, attn_, k_, v_, gate_, up_, cos_, sin_, scores_, tile_;
};

}  // namespace
}  // namespace trimtab::cpu::decode

TORCH_LIBRARY_FRAGMENT(trimtab, m) {
  using trimtab::cpu::decode::FusedDecoder;
  using trimtab::cpu::decode::QLinear;
  m.class_<QLinear>("QLinear")
      .def(torch::init<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>,
                       int64_t>())
      .def("in_features", &QLinear::in_features)
      .def("out_features", &QLinear::out_features);
  m.class_<FusedDecoder>("FusedDecoder")
      .def(torch::init<int64_t, int64_t, int64_t, int64_t, double, at::Tensor, double, bool, std::string>())
      .def("add_layer", &FusedDecoder::add_layer)
      .def("set_output", &FusedDecoder::set_output)
      .def("step", &FusedDecoder::step)
      .def("num_layers", &FusedDecoder::num_layers);
}
