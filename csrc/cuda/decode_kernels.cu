// The non-matrix kernels of one batch-1 decode step (backend/cuda_decode.py), each replacing a
// dozen small PyTorch ops that a CUDA graph would still launch one by one:
//   rms_norm         y = weight · round(x / rms(x))                     (HF: statistics in float32)
//   rotary_kv        q, k ← rotary(q, k) at the step's position; k, v written into the cache slot
//   decode_attention softmax(q Kᵀ / √d) V over the cache's valid slots, split over the slots
//                    (flash-decoding): each block a range of slots, then a kernel merging the splits
// Device-side positions (read from memory, not kernel arguments), so one captured graph serves
// every step.
#include <float.h>

#include "decode_cuda.h"
#include "dependent_launch.cuh"
#include "qlinear_layout.cuh"

namespace trimtab_cuda {
namespace {

template <typename T>
__device__ __forceinline__ float round_trip(float v) {  // v rounded to T, as a PyTorch op would store it
  return Io<T>::load(Io<T>::store(v));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// ---- RMSNorm: one block per row -------------------------------------------------------------------

constexpr int kNormThreads = 1024;
constexpr int kNormPerThread = 16;  // rows up to 16384 wide keep x in registers between the passes

template <typename T>
__global__ void __launch_bounds__(kNormThreads) rms_norm_kernel(const T* x, const T* weight, T* y, int dim, float eps) {
  allow_next_kernel();  // the GEMV after this may start streaming its weights
  __shared__ float partial[kNormThreads / 32];
  const T* row = x + size_t(blockIdx.x) * dim;
  T* out = y + size_t(blockIdx.x) * dim;
  float v[kNormPerThread];
  float sum = 0.0f;
#pragma unroll
  for (int k = 0; k < kNormPerThread; ++k) {  // all loads first: one memory latency
    const int i = threadIdx.x + k * kNormThreads;
    v[k] = i < dim ? Io<T>::load(row[i]) : 0.0f;
  }
#pragma unroll
  for (int k = 0; k < kNormPerThread; ++k) sum = fmaf(v[k], v[k], sum);
  for (int i = threadIdx.x + kNormPerThread * kNormThreads; i < dim; i += kNormThreads) {  // wider rows
    const float w = Io<T>::load(row[i]);
    sum = fmaf(w, w, sum);
  }
  sum = warp_sum(sum);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = sum;
  __syncthreads();
  if (threadIdx.x < 32) {
    sum = warp_sum(partial[threadIdx.x]);
    if (threadIdx.x == 0) partial[0] = rsqrtf(sum / float(dim) + eps);
  }
  __syncthreads();
  const float inv = partial[0];
#pragma unroll
  for (int k = 0; k < kNormPerThread; ++k) {
    const int i = threadIdx.x + k * kNormThreads;
    if (i < dim) out[i] = Io<T>::store(Io<T>::load(weight[i]) * round_trip<T>(v[k] * inv));
  }
  for (int i = threadIdx.x + kNormPerThread * kNormThreads; i < dim; i += kNormThreads)
    out[i] = Io<T>::store(Io<T>::load(weight[i]) * round_trip<T>(Io<T>::load(row[i]) * inv));
}

// ---- rotary + KV cache write: one block per head (query heads, then key heads) --------------------

template <typename T>
__global__ void rotary_kv_kernel(RotaryKvArgs a) {
  const int64_t position = *a.position;
  const int head = blockIdx.x;
  const bool is_query = head < a.q_heads;
  const int h = is_query ? head : head - a.q_heads;
  const T* src = static_cast<const T*>(is_query ? a.q : a.k) + size_t(h) * a.head_dim;
  T* dst = is_query ? static_cast<T*>(a.q_out) + size_t(h) * a.head_dim
                    : static_cast<T*>(a.keys) + size_t(h) * a.head_stride + size_t(position) * a.slot_stride;
  const int half_dim = a.rotary_dim / 2;
  for (int i = threadIdx.x; i < a.head_dim; i += blockDim.x) {
    const float v = Io<T>::load(src[i]);
    float out = v;
    if (i < a.rotary_dim) {  // HF rotate_half: x·cos + (-x2, x1)·sin, cos and sin rounded to T
      const int j = i % half_dim;
      float s, c;
      sincosf(float(position) * a.inv_freq[j], &s, &c);
      const float cos_t = round_trip<T>(c * a.scaling), sin_t = round_trip<T>(s * a.scaling);
      const float other = Io<T>::load(src[i < half_dim ? i + half_dim : i - half_dim]);
      out = round_trip<T>(round_trip<T>(v * cos_t) + round_trip<T>((i < half_dim ? -other : other) * sin_t));
    }
    dst[i] = Io<T>::store(out);
  }
  if (!is_query) {  // the value row of this key head, unrotated
    const T* v = static_cast<const T*>(a.v) + size_t(h) * a.head_dim;
    T* vdst = static_cast<T*>(a.values) + size_t(h) * a.head_stride + size_t(position) * a.slot_stride;
    for (int i = threadIdx.x; i < a.head_dim; i += blockDim.x) vdst[i] = v[i];
  }
}

// ---- decode attention ---------------------------------------------------------------------------
// Block (kv head, split): the split's slots [split·kSlots, +kSlots) ∩ [first valid, position].
// Each warp scores its slots for all G query heads of the kv head (a lane holds HD/32 dims), the
// block takes the softmax's max and sum over its slots, then each thread sums p·V for its dims.
// The partial (max, sum, output) goes to the workspace; a second kernel merges the splits (merging
// in the last block of each head, one thread serially over several outputs, measured slower).

constexpr int kAttnThreads = 128;
constexpr int kSlots = 32;  // slots a block scores: a 1k cache is 33 blocks a KV head
constexpr int kMaxGroup = 8;  // query heads per key/value head

template <typename T, int HD>
__global__ void __launch_bounds__(kAttnThreads) decode_attention_kernel(AttentionArgs a) {
  constexpr int kPerLane = HD / 32;
  __shared__ float scores[kMaxGroup][kSlots];
  __shared__ float stats[kMaxGroup][2];  // max, sum
  const int kv = blockIdx.x, split = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int G = a.group;
  const int64_t position = *a.position;
  const int64_t first = max(int64_t(*a.first_slot), a.window > 0 ? position - a.window + 1 : int64_t(0));
  const int64_t s_begin = max(int64_t(split) * kSlots, first);
  const int64_t s_end = min(int64_t(split + 1) * kSlots, position + 1);  // exclusive
  const T* keys = static_cast<const T*>(a.keys) + size_t(kv) * a.head_stride;
  const T* values = static_cast<const T*>(a.values) + size_t(kv) * a.head_stride;

  // this lane's dims of each query head, pre-scaled
  float q[kMaxGroup][kPerLane];
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g)
#pragma unroll
    for (int e = 0; e < kPerLane; ++e)
      q[g][e] = g < G ? Io<T>::load(static_cast<const T*>(a.q)[size_t(kv * G + g) * HD + lane * kPerLane + e]) * a.scale
                      : 0.0f;

  constexpr int kUnroll = 4;  // slots a warp loads before it reduces: their loads overlap
  for (int64_t s0 = s_begin + warp * kUnroll; s0 < s_end; s0 += kUnroll * (kAttnThreads / 32)) {
    float kf[kUnroll][kPerLane];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const T* k = keys + size_t(s0 + u) * a.slot_stride + lane * kPerLane;
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) kf[u][e] = s0 + u < s_end ? Io<T>::load(k[e]) : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (s0 + u >= s_end) break;
#pragma unroll
      for (int g = 0; g < kMaxGroup; ++g) {
        if (g >= G) break;
        float dot = 0.0f;
#pragma unroll
        for (int e = 0; e < kPerLane; ++e) dot = fmaf(q[g][e], kf[u][e], dot);
        dot = warp_sum(dot);
        if (lane == 0) scores[g][s0 + u - int64_t(split) * kSlots] = dot;
      }
    }
  }
  __syncthreads();
  const int n = int(max(int64_t(0), s_end - s_begin));
  const int offset = int(s_begin - int64_t(split) * kSlots);
  // softmax statistics per query head: warp g handles heads g, g + 4, ...
  for (int g = warp; g < G; g += kAttnThreads / 32) {
    float m = -FLT_MAX;
    for (int i = lane; i < n; i += 32) m = fmaxf(m, scores[g][offset + i]);
    m = warp_max(m);
    float l = 0.0f;
    for (int i = lane; i < n; i += 32) {
      const float p = __expf(scores[g][offset + i] - m);
      scores[g][offset + i] = p;
      l += p;
    }
    l = warp_sum(l);
    if (lane == 0) stats[g][0] = m, stats[g][1] = l;
  }
  __syncthreads();
  // partial outputs: thread d sums p·V[:, d] for every query head
  float* part = a.workspace + (size_t(kv) * gridDim.y + split) * (kMaxGroup * (HD + 2));
  for (int d = threadIdx.x; d < HD; d += kAttnThreads) {
    float o[kMaxGroup] = {};
#pragma unroll 8
    for (int i = 0; i < n; ++i) {
      const float v = Io<T>::load(values[size_t(s_begin + i) * a.slot_stride + d]);
#pragma unroll
      for (int g = 0; g < kMaxGroup; ++g)
        if (g < G) o[g] = fmaf(scores[g][offset + i], v, o[g]);
    }
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g)
      if (g < G) part[g * (HD + 2) + d] = o[g];
  }
  if (threadIdx.x < G) {
    part[threadIdx.x * (HD + 2) + HD] = n > 0 ? stats[threadIdx.x][0] : -FLT_MAX;
    part[threadIdx.x * (HD + 2) + HD + 1] = n > 0 ? stats[threadIdx.x][1] : 0.0f;
  }
}

// Merge the splits' partials: one thread per (query head, dim), the splits' loads unrolled.
template <typename T, int HD>
__global__ void __launch_bounds__(HD) attention_merge_kernel(AttentionArgs a, int splits) {
  allow_next_kernel();  // the GEMV after this may start streaming its weights
  constexpr int kStride = kMaxGroup * (HD + 2);
  const int head = blockIdx.x, d = threadIdx.x;
  const int kv = head / a.group, g = head % a.group;
  const float* parts = a.workspace + size_t(kv) * splits * kStride + g * (HD + 2);
  float m = -FLT_MAX;
#pragma unroll 8
  for (int s = 0; s < splits; ++s) m = fmaxf(m, __ldcg(parts + s * kStride + HD));
  float l = 0.0f, o = 0.0f;
#pragma unroll 8
  for (int s = 0; s < splits; ++s) {
    const float* p = parts + s * kStride;
    const float sl = __ldcg(p + HD + 1);
    const float w = sl > 0.0f ? __expf(__ldcg(p + HD) - m) : 0.0f;
    l = fmaf(sl, w, l);
    o = fmaf(sl > 0.0f ? __ldcg(p + d) : 0.0f, w, o);
  }
  static_cast<T*>(a.out)[size_t(head) * HD + d] = Io<T>::store(l > 0.0f ? o / l : 0.0f);
}

template <typename T, int HD>
void launch_attention_hd(const AttentionArgs& a, cudaStream_t stream) {
  const int splits = attention_splits(a.max_slots);
  decode_attention_kernel<T, HD><<<dim3(a.kv_heads, splits), kAttnThreads, 0, stream>>>(a);
  attention_merge_kernel<T, HD><<<a.kv_heads * a.group, HD, 0, stream>>>(a, splits);
}

template <typename T>
cudaError_t launch_attention(const AttentionArgs& a, cudaStream_t stream) {
  switch (a.head_dim) {
    case 64: launch_attention_hd<T, 64>(a, stream); break;
    case 128: launch_attention_hd<T, 128>(a, stream); break;
    case 256: launch_attention_hd<T, 256>(a, stream); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

int attention_splits(int max_slots) { return (max_slots + kSlots - 1) / kSlots; }
int64_t attention_workspace_floats(int kv_heads, int max_slots, int head_dim) {
  return int64_t(kv_heads) * attention_splits(max_slots) * kMaxGroup * (head_dim + 2);
}
bool attention_supported(int head_dim, int group) {
  return (head_dim == 64 || head_dim == 128 || head_dim == 256) && group >= 1 && group <= kMaxGroup;
}

cudaError_t rms_norm(const void* x, const void* weight, void* y, int rows, int dim, float eps, int dtype,
                     cudaStream_t stream) {
  switch (dtype) {
    case 0: rms_norm_kernel<half><<<rows, kNormThreads, 0, stream>>>(static_cast<const half*>(x),
              static_cast<const half*>(weight), static_cast<half*>(y), dim, eps); break;
    case 1: rms_norm_kernel<__nv_bfloat16><<<rows, kNormThreads, 0, stream>>>(static_cast<const __nv_bfloat16*>(x),
              static_cast<const __nv_bfloat16*>(weight), static_cast<__nv_bfloat16*>(y), dim, eps); break;
    default: rms_norm_kernel<float><<<rows, kNormThreads, 0, stream>>>(static_cast<const float*>(x),
               static_cast<const float*>(weight), static_cast<float*>(y), dim, eps); break;
  }
  return cudaGetLastError();
}

cudaError_t rotary_kv(const RotaryKvArgs& a, int dtype, cudaStream_t stream) {
  const int threads = a.head_dim <= 64 ? 64 : a.head_dim <= 128 ? 128 : 256;
  const int blocks = a.q_heads + a.kv_heads;
  switch (dtype) {
    case 0: rotary_kv_kernel<half><<<blocks, threads, 0, stream>>>(a); break;
    case 1: rotary_kv_kernel<__nv_bfloat16><<<blocks, threads, 0, stream>>>(a); break;
    default: rotary_kv_kernel<float><<<blocks, threads, 0, stream>>>(a); break;
  }
  return cudaGetLastError();
}

cudaError_t decode_attention(const AttentionArgs& a, int dtype, cudaStream_t stream) {
  if (!attention_supported(a.head_dim, a.group)) return cudaErrorInvalidValue;
  switch (dtype) {
    case 0: return launch_attention<half>(a, stream);
    case 1: return launch_attention<__nv_bfloat16>(a, stream);
    default: return launch_attention<float>(a, stream);
  }
}

}  // namespace trimtab_cuda
