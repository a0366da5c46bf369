// Host entry points of the decode-step and prefill kernels (decode_kernels.cu): raw pointers, no ATen;
// bindings.cpp checks tensors and calls these. dtype: 0 = float16, 1 = bfloat16, 2 = float32.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace trimtab_cuda {

// y[r] = weight · round(x[r] / rms(x[r])) for rows r < rows of `dim` contiguous elements.
cudaError_t rms_norm(const void* x, const void* weight, void* y, int rows, int dim, float eps, int dtype,
                     cudaStream_t stream);

// out[i] = silu(gate[i]) · up[i] for n contiguous elements (16-byte aligned), rounded as torch's two ops.
cudaError_t silu_mul(const void* gate, const void* up, void* out, int64_t n, int dtype, cudaStream_t stream);

struct RotaryKvArgs {
  const void* q;           // [tokens, q_heads, head_dim] the query (batch 1; decode: one token)
  const void* k;           // [tokens, kv_heads, head_dim]
  const void* v;           // [tokens, kv_heads, head_dim]
  void* q_out;             // [q_heads, tokens, head_dim] rotated query, heads first (as attention takes it)
  void* keys;              // the layer's cache: head h, slot s at h·head_stride + s·slot_stride
  void* values;
  const int64_t* position; // device: the first token's position, which is also its cache slot
  const float* inv_freq;   // [rotary_dim / 2]
  float scaling;           // the rotary's attention scaling (1 for plain RoPE)
  int tokens, q_heads, kv_heads, head_dim, rotary_dim;
  int64_t head_stride, slot_stride;
  int64_t slots;           // the cache's slots: positions past it are not written
};

// Token t at position p = position + t: q_out = rotary(q, p); keys[p] = rotary(k, p); values[p] = v
// (HF's non-interleaved rotary, each product rounded to the activations' dtype as HF rounds it).
cudaError_t rotary_kv(const RotaryKvArgs& a, int dtype, cudaStream_t stream);

struct AttentionArgs {
  const void* q;           // [kv_heads · group, head_dim] this token's query, not yet rotated
  const void* k;           // [kv_heads, head_dim] this token's key, not yet rotated
  const void* v;           // [kv_heads, head_dim] this token's value
  void* keys;              // as RotaryKvArgs: the token's key and value are written at slot `position`
  void* values;
  void* out;               // [kv_heads · group, head_dim]
  const int64_t* position; // device: the token's position, its cache slot, the last slot attended to
  const int64_t* first_slot;  // device: the first valid slot (left padding)
  const float* inv_freq;   // [rotary_dim / 2]
  float rotary_scaling;    // as RotaryKvArgs
  int rotary_dim;
  float* workspace;        // attention_workspace_floats: the splits' partial results
  float scale;
  int kv_heads, group, head_dim, max_slots;
  int64_t window;          // sliding window, 0 for none
  int64_t head_stride, slot_stride;
};

int attention_splits(int max_slots);
int64_t attention_workspace_floats(int kv_heads, int max_slots, int head_dim);
bool attention_supported(int head_dim, int group);

// One decode token: q and k rotated at `position` (as rotary_kv), k and v written into the cache at
// slot `position`, out = softmax(q Kᵀ · scale) V over slots [max(first_slot, position − window + 1),
// position]. Split over the slots (flash-decoding), then a kernel merging the splits.
cudaError_t decode_attention(const AttentionArgs& a, int dtype, cudaStream_t stream);

// The next decode step's inputs from this step's logits [n] (n < 2^32) of `dtype`, on the device: token =
// the first index of the largest logit (as torch.argmax), position += 1; is_nan (nullptr, or one int64) = 1
// where that logit, and so some logit, is NaN, else 0. state: 2 int64 of zeros, left zeroed.
cudaError_t greedy_next(const void* logits, int64_t n, int dtype, int64_t* token, int64_t* is_nan, int64_t* position,
                        void* state, cudaStream_t stream);

}  // namespace trimtab_cuda
