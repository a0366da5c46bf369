// The non-matrix kernels of a batch-1 decode step and of chunked prefill (backend/cuda_decode.py),
// each replacing several PyTorch ops (a dozen, in a decode step's CUDA graph):
//   rms_norm         y = weight · round(x / rms(x))                     (HF: statistics in float32)
//   rotary_kv        q, k ← rotary(q, k) at the tokens' positions; k, v written into their cache slots
//   silu_mul         silu(gate)·up (prefill; a decode step does it inside the down GEMV)
//   decode_attention one token: rotary, the KV write, softmax(q Kᵀ / √d) V over the cache's valid
//                    slots, split over the slots (flash-decoding); then a kernel merging the splits
//   greedy_next      the next step's inputs without the host: token = argmax(logits), position + 1
// Device-side positions (read from memory, not kernel arguments), so one captured graph serves
// every step.
#include <float.h>

#include <algorithm>

#include "decode_cuda.h"
#include "dependent_launch.cuh"
#include "qlinear_layout.cuh"

namespace trimtab_cuda {
namespace {

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// ---- RMSNorm: one block per row -------------------------------------------------------------------
// A single row (decode) gets 1024 threads, the shortest wait; many rows (prefill) 256 a row, so that
// all of a 1k-token chunk's rows are resident at once.

constexpr int kNormPerThread = 16;  // rows up to 16 · threads wide keep x in registers between the passes

template <typename T, int kNormThreads>
__global__ void __launch_bounds__(kNormThreads) rms_norm_kernel(const T* x, const T* weight, T* y, int dim, float eps) {
  allow_next_kernel();  // the GEMV after this may start streaming its weights
  __shared__ float partial[kNormThreads / 32];
  const T* row = x + size_t(blockIdx.x) * dim;
  T* out = y + size_t(blockIdx.x) * dim;
  float v[kNormPerThread], w[kNormPerThread];
  float sum = 0.0f;
#pragma unroll
  for (int k = 0; k < kNormPerThread; ++k) {  // all loads first, the weight's too: one memory latency
    const int i = threadIdx.x + k * kNormThreads;
    v[k] = i < dim ? Io<T>::load(row[i]) : 0.0f;
    w[k] = i < dim ? Io<T>::load(weight[i]) : 0.0f;
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
    sum = warp_sum(threadIdx.x < kNormThreads / 32 ? partial[threadIdx.x] : 0.0f);
    if (threadIdx.x == 0) partial[0] = rsqrtf(sum / float(dim) + eps);
  }
  __syncthreads();
  const float inv = partial[0];
#pragma unroll
  for (int k = 0; k < kNormPerThread; ++k) {
    const int i = threadIdx.x + k * kNormThreads;
    if (i < dim) out[i] = rms_normed<T>(v[k], inv, w[k]);
  }
  for (int i = threadIdx.x + kNormPerThread * kNormThreads; i < dim; i += kNormThreads)
    out[i] = rms_normed<T>(Io<T>::load(row[i]), inv, Io<T>::load(weight[i]));
}

// ---- rotary + KV cache write: one block per (per_block heads, token), query heads first ---------
// A thread's cos and sin (accurate sincosf, rounded as HF rounds them) serve its dim of all the
// block's heads; the heads' loads all go out before any store (one memory latency, not eight).
// One token takes a block a head (the decode attention does this itself; kept for one-token calls);
// many (prefill) 8 heads a block.

constexpr int kRotaryHeads = 8;  // the most heads a block takes

struct RotaryAngle {  // dim i's cos and sin at a position, rounded to the activations' dtype
  float cos_t = 1.0f, sin_t = 0.0f;
  bool rotates = false;  // i < rotary_dim: dims past it pass unrotated
};

__device__ __forceinline__ int rotary_partner(int i, int rotary_dim) {  // the dim rotate_half pairs with i
  const int half = rotary_dim / 2;
  return i < half ? i + half : i - half;
}

template <typename T>
__device__ __forceinline__ RotaryAngle rotary_angle(int64_t position, int i, int rotary_dim, const float* inv_freq,
                                                    float scaling) {
  RotaryAngle r;
  if (i < rotary_dim) {  // HF rotate_half: x·cos + (-x2, x1)·sin, cos and sin rounded to T
    const int half = rotary_dim / 2;
    float s, c;
    sincosf(float(position) * inv_freq[i % half], &s, &c);
    r.cos_t = round_trip<T>(c * scaling);
    r.sin_t = round_trip<T>(s * scaling) * (i < half ? -1.0f : 1.0f);
    r.rotates = true;
  }
  return r;
}

// x (dim i) rotated with `other` (its partner dim's value), each product rounded as HF's separate ops
// round it (never contracted into an FMA, so every kernel rotating a value gets the same bits)
template <typename T>
__device__ __forceinline__ float rotated(float x, float other, const RotaryAngle& r) {
  if (!r.rotates) return x;
  return round_trip<T>(__fadd_rn(round_trip<T>(__fmul_rn(x, r.cos_t)), round_trip<T>(__fmul_rn(other, r.sin_t))));
}

template <typename T>
__global__ void rotary_kv_kernel(RotaryKvArgs a, int per_block) {
  const int token = blockIdx.y;
  const int64_t position = *a.position + token;
  const int first_head = blockIdx.x * per_block;
  const int heads = min(per_block, a.q_heads + a.kv_heads - first_head);
  const bool in_cache = position < a.slots;  // a key or value past the cache is not written
  for (int i = threadIdx.x; i < a.head_dim; i += blockDim.x) {
    const int partner = rotary_partner(i, a.rotary_dim);
    float x[kRotaryHeads], other[kRotaryHeads], value[kRotaryHeads];
#pragma unroll
    for (int k = 0; k < kRotaryHeads; ++k) {
      const int head = first_head + k;
      const bool is_query = head < a.q_heads;
      const int h = is_query ? head : head - a.q_heads;
      const size_t row = size_t(token) * (is_query ? a.q_heads : a.kv_heads) + h;  // of the projection's output
      const T* src = static_cast<const T*>(is_query ? a.q : a.k) + row * a.head_dim;
      x[k] = k < heads ? Io<T>::load(src[i]) : 0.0f;
      other[k] = k < heads && i < a.rotary_dim ? Io<T>::load(src[partner]) : 0.0f;
      value[k] = k < heads && !is_query ? Io<T>::load(static_cast<const T*>(a.v)[row * a.head_dim + i]) : 0.0f;
    }
    const RotaryAngle angle = rotary_angle<T>(position, i, a.rotary_dim, a.inv_freq, a.scaling);
#pragma unroll
    for (int k = 0; k < kRotaryHeads; ++k) {
      const int head = first_head + k;
      if (k >= heads || (head >= a.q_heads && !in_cache)) break;
      const float out = rotated<T>(x[k], other[k], angle);
      if (head < a.q_heads) {
        static_cast<T*>(a.q_out)[(size_t(head) * a.tokens + token) * a.head_dim + i] = Io<T>::store(out);
      } else {
        const size_t slot = size_t(head - a.q_heads) * a.head_stride + size_t(position) * a.slot_stride + i;
        static_cast<T*>(a.keys)[slot] = Io<T>::store(out);
        static_cast<T*>(a.values)[slot] = Io<T>::store(value[k]);  // the value, unrotated
      }
    }
  }
}

// ---- silu(gate)·up (prefill; decode does it inside the down GEMV) ---------------------------------

template <typename T>
__global__ void silu_mul_kernel(const T* gate, const T* up, T* out, int64_t n) {
  constexpr int E = 16 / sizeof(T);  // 16-byte pieces, then the tail one by one
  const int64_t stride = int64_t(gridDim.x) * blockDim.x, first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t i = first; i < n / E; i += stride) {
    const uint4 g = reinterpret_cast<const uint4*>(gate)[i], u = reinterpret_cast<const uint4*>(up)[i];
    uint4 o;
    const T *ge = reinterpret_cast<const T*>(&g), *ue = reinterpret_cast<const T*>(&u);
    T* oe = reinterpret_cast<T*>(&o);
#pragma unroll
    for (int e = 0; e < E; ++e) oe[e] = Io<T>::store(silu_times<T>(Io<T>::load(ge[e]), Io<T>::load(ue[e])));
    reinterpret_cast<uint4*>(out)[i] = o;
  }
  for (int64_t i = n / E * E + first; i < n; i += stride)
    out[i] = Io<T>::store(silu_times<T>(Io<T>::load(gate[i]), Io<T>::load(up[i])));
}

// ---- decode attention ---------------------------------------------------------------------------
// Two kernels a layer for one token. The attention kernel does rotary, the cache write and the
// attention split over the cache's slots (flash-decoding): split s is slots [s·kSlots, +kSlots) ∩
// [first valid, position]; a kv head gets at most kMaxSplitBlocks blocks, block y taking splits y,
// y + gridDim.y, ... up to the position's, so the grid does not grow with the cache. Latency, not
// bandwidth, bounds a block (a 1k cache is 4 MB a layer), so:
//  - the cache's earlier slots were written by earlier steps: every thread puts all its key and value
//    loads of its first split in flight (16 bytes each) before waiting for the q/k/v GEMV (dependent
//    launch), and the rotary angles are taken meanwhile;
//  - then each block rotates its G query heads into shared memory (pre-scaled; the 4 parts of a head
//    4 banks apart), and the block holding slot `position` rotates this token's key and writes it and
//    the value into the cache, keeping both in shared memory for its own slot;
//  - four threads score a slot for all G query heads (each a quarter of the dims); one warp per query
//    head takes the softmax's max and sum over the block's 32 slots; each thread sums p·V over its
//    slots for 16 bytes of dims, the slot groups added in shared memory; the partial (output, max,
//    sum) goes to the workspace.
// The merge kernel, launched dependent (its blocks wait for the attention's end already resident),
// gives each (query head, dim) a thread that loads every split's partial at once (up to
// kMergeSplits: one memory latency for a cache of 1.5k slots). The last block of a kv head merging
// the splits inside the attention kernel cost more (H100, Llama-3-8B shapes, context 1024: 11.6 µs a
// layer after the q/k/v GEMV against 9.3 for the two kernels): its one block per kv head merged
// 16 splits at a time, and counting the blocks took a round trip more.

constexpr int kAttnThreads = 128;
constexpr int kSlots = 32;                      // slots a split scores (a multiple of 32): a 1k cache is 33 splits
static_assert(kSlots % 32 == 0 && kAttnThreads % kSlots == 0, "a warp's lanes take a split's slots evenly");
constexpr int kParts = kAttnThreads / kSlots;   // threads scoring one slot
constexpr int kMaxGroup = 8;                    // query heads per key/value head
constexpr int kMergeSplits = 48;                // splits a merging thread has in flight
constexpr int kMaxSplitBlocks = 64;             // blocks a KV head gets at most: more splits loop

__host__ __device__ constexpr int attention_splits_of(int max_slots) { return (max_slots + kSlots - 1) / kSlots; }

// A split's partial in the workspace: outputs [kMaxGroup][head_dim], maxima [kMaxGroup], sums [kMaxGroup]
__host__ __device__ constexpr int partial_floats(int head_dim) { return kMaxGroup * (head_dim + 2); }

// A key's dims one scoring thread holds (and one part of a pre-scaled query in shared memory)
__host__ __device__ constexpr int part_dims(int head_dim) { return head_dim / kParts; }

template <typename T>
struct Vec16 {  // 16 bytes of T, as floats
  static constexpr int n = 16 / sizeof(T);
  static __device__ __forceinline__ void load(const T* p, float (&v)[n]) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < n; ++i) v[i] = Io<T>::load(e[i]);
  }
};

// This token's rows a thread rotates, dims d_j = (tid + kAttnThreads·j) mod HD: the angles before the
// grid wait (they need only the position), then every load of q (the kv head's G query heads) and,
// in the block holding the token's slot, of k and v at once: one memory latency. The rotary partners are
// loaded for every dim (rotary_partner stays inside the head; rotated() ignores it where a dim does not
// rotate): loaded only where it rotates, each partner load sat in a branch with its conversion and was
// waited for before the next went out (the SASS of 4f61cd5: up to 8 memory latencies in turn).
template <typename T, int HD>
struct TokenRows {
  static constexpr int kDims = HD > kAttnThreads ? HD / kAttnThreads : 1;  // distinct dims a thread rotates
  static constexpr int kQueryLoads = kMaxGroup * HD / kAttnThreads;        // its q elements at most
  static constexpr int kPartDims = part_dims(HD);
  RotaryAngle angle[kDims];
  float q[kQueryLoads] = {}, q_partner[kQueryLoads] = {};
  T k[kDims], k_partner[kDims], v[kDims];  // as loaded: converted only by the block that stores them

  __device__ void angles(const AttentionArgs& a, int64_t position) {
#pragma unroll
    for (int j = 0; j < kDims; ++j)
      angle[j] = rotary_angle<T>(position, (threadIdx.x + kAttnThreads * j) % HD, a.rotary_dim, a.inv_freq,
                                 a.rotary_scaling);
  }

  // every block loads k and v too (a few hundred bytes from L2), kept as loaded: only the one holding the
  // token's slot converts and stores them. No branch, so that all of these loads go out before any is
  // waited for; past the group's heads (and past head_dim), the last element again, never used
  __device__ void load(const AttentionArgs& a, int kv) {
    const T* kh = static_cast<const T*>(a.k) + size_t(kv) * HD;
    const T* vh = static_cast<const T*>(a.v) + size_t(kv) * HD;
#pragma unroll
    for (int j = 0; j < kDims; ++j) {
      const int d = min(int(threadIdx.x) + kAttnThreads * j, HD - 1);
      k[j] = kh[d];
      k_partner[j] = kh[rotary_partner(d, a.rotary_dim)];  // see above
      v[j] = vh[d];
    }
    const T* qh = static_cast<const T*>(a.q) + size_t(kv) * a.group * HD;
#pragma unroll
    for (int j = 0; j < kQueryLoads; ++j) {
      const int i = min(int(threadIdx.x) + kAttnThreads * j, a.group * HD - 1), d = i % HD;
      q[j] = Io<T>::load(qh[i]);
      q_partner[j] = Io<T>::load(qh[i - d + rotary_partner(d, a.rotary_dim)]);  // see above
    }
  }

  // the rotated query heads, pre-scaled, into qs [head][part][dim of the part]
  template <typename QueryParts>
  __device__ void store_queries(const AttentionArgs& a, QueryParts& qs) const {
#pragma unroll
    for (int j = 0; j < kQueryLoads; ++j) {
      const int i = threadIdx.x + kAttnThreads * j, d = i % HD;
      if (i >= a.group * HD) break;
      qs[i / HD][d / kPartDims][d % kPartDims] = rotated<T>(q[j], q_partner[j], angle[j % kDims]) * a.scale;
    }
  }

  // the rotated key and the value → the cache at slot `position`, and `current` for the block's own use
  __device__ void store_current(const AttentionArgs& a, int kv, int64_t position, float (&current)[2][HD]) const {
    const size_t slot = size_t(kv) * a.head_stride + size_t(position) * a.slot_stride;
#pragma unroll
    for (int j = 0; j < kDims; ++j) {
      const int d = threadIdx.x + kAttnThreads * j;
      if (d >= HD) break;
      const float key = rotated<T>(Io<T>::load(k[j]), Io<T>::load(k_partner[j]), angle[j]);
      static_cast<T*>(a.keys)[slot + d] = Io<T>::store(key);
      static_cast<T*>(a.values)[slot + d] = v[j];
      current[0][d] = key;
      current[1][d] = Io<T>::load(v[j]);
    }
  }
};

// Split s: slots [s·kSlots, +kSlots) ∩ [first valid, position] (and inside the cache).
struct SplitSlots {
  int64_t base, begin, end;  // end exclusive
  __device__ SplitSlots(int split, int64_t first, int64_t position, int max_slots)
      : base(int64_t(split) * kSlots), begin(max(base, first)),
        end(min(min(base + kSlots, position + 1), int64_t(max_slots))) {}
  __device__ bool attends() const { return begin < end; }
  __device__ bool valid(int s) const { return base + s >= begin && base + s < end; }
};

// The splits up to the position's (the merge reads no others); a block takes splits blockIdx.y,
// blockIdx.y + gridDim.y, ... of them, so the grid need not grow with the cache.
__device__ __forceinline__ int live_splits(const AttentionArgs& a, int64_t position) {
  return int(min(int64_t(attention_splits_of(a.max_slots)), position / kSlots + 1));
}

// How a block's threads share a split of 32 slots: four threads score a slot (each kPartDims of its
// dims, 16 bytes a load); each thread reads a 16-byte piece of kValueLoads value rows.
template <typename T, int HD>
struct SplitWork {
  static constexpr int E = Vec16<T>::n;                    // elements a 16-byte load brings
  static constexpr int kPartDims = part_dims(HD);
  static constexpr int kKeyLoads = kPartDims / E;
  static constexpr int kRowVecs = HD / E;                  // 16-byte pieces of a value row
  static constexpr int kSlotGroups = kAttnThreads / kRowVecs;
  static constexpr int kValueLoads = kSlots / kSlotGroups;  // value rows a thread reads (its piece of each)
  static constexpr int kQPad = kPartDims + 4;              // parts of q 4 banks apart
  const int k_slot = threadIdx.x / kParts, k_part = threadIdx.x % kParts;
  const int v_piece = threadIdx.x % kRowVecs, v_group = threadIdx.x / kRowVecs;
  float kf[kKeyLoads][E], vf[kValueLoads][E];

  // every key and value load of the split's slots written by earlier steps, at once; others read as 0
  __device__ void load(const AttentionArgs& a, int kv, const SplitSlots& split, int64_t position) {
    const T* keys = static_cast<const T*>(a.keys) + size_t(kv) * a.head_stride + size_t(split.base) * a.slot_stride;
    const T* values =
        static_cast<const T*>(a.values) + size_t(kv) * a.head_stride + size_t(split.base) * a.slot_stride;
    const auto cached = [&](int s) { return split.valid(s) && split.base + s != position; };
#pragma unroll
    for (int j = 0; j < kKeyLoads; ++j) {
#pragma unroll
      for (int e = 0; e < E; ++e) kf[j][e] = 0.0f;
      if (cached(k_slot)) Vec16<T>::load(keys + size_t(k_slot) * a.slot_stride + k_part * kPartDims + j * E, kf[j]);
    }
#pragma unroll
    for (int i = 0; i < kValueLoads; ++i) {
      const int s = v_group + i * kSlotGroups;
#pragma unroll
      for (int e = 0; e < E; ++e) vf[i][e] = 0.0f;
      if (cached(s)) Vec16<T>::load(values + size_t(s) * a.slot_stride + v_piece * E, vf[i]);
    }
  }

  // this token's own slot from shared memory (its key and value were never read from the cache)
  __device__ void take_current(const SplitSlots& split, int64_t position, const float (&current)[2][HD]) {
    if (split.base + k_slot == position) {
#pragma unroll
      for (int j = 0; j < kKeyLoads; ++j)
#pragma unroll
        for (int e = 0; e < E; ++e) kf[j][e] = current[0][k_part * kPartDims + j * E + e];
    }
#pragma unroll
    for (int i = 0; i < kValueLoads; ++i)
      if (split.base + v_group + i * kSlotGroups == position)
#pragma unroll
        for (int e = 0; e < E; ++e) vf[i][e] = current[1][v_piece * E + e];
  }
};

template <typename T, int HD>
__global__ void __launch_bounds__(kAttnThreads) decode_attention_kernel(AttentionArgs a) {
  allow_next_kernel();  // the o GEMV after this may start streaming its weights
  using Work = SplitWork<T, HD>;
  constexpr int E = Work::E, kSlotGroups = Work::kSlotGroups, kValueLoads = Work::kValueLoads;
  __shared__ __align__(16) float qs[kMaxGroup][kParts][Work::kQPad];
  __shared__ float probs[kMaxGroup][kSlots];
  __shared__ __align__(16) float sums[kSlotGroups][kMaxGroup][HD];
  __shared__ float current[2][HD];  // this token's key and value, in the block that holds its slot
  const int kv = blockIdx.x, tid = threadIdx.x, G = a.group;
  const int64_t position = *a.position;
  const int64_t first = max(int64_t(*a.first_slot), a.window > 0 ? position - a.window + 1 : int64_t(0));
  const int live = live_splits(a, position), splits = attention_splits_of(a.max_slots);
  int split = blockIdx.y;
  if (split >= live) return;  // the cache past the position: nothing to do
  const int current_split = int(position / kSlots);
  const bool holds_current =  // the block whose splits include the token's slot, if the cache has that slot
      position < a.max_slots && current_split < live && current_split % int(gridDim.y) == int(blockIdx.y);
  Work work;
  SplitSlots slots(split, first, position, a.max_slots);
  work.load(a, kv, slots, position);  // the first split's earlier slots: before waiting for the q/k/v GEMV
  TokenRows<T, HD> token;
  token.angles(a, position);
  grid_dependency_wait();  // q, k and v come from the kernel before
  token.load(a, kv);
  if (holds_current) token.store_current(a, kv, position, current);
  token.store_queries(a, qs);
  __syncthreads();  // qs, current
  for (;;) {
    float* part = a.workspace + (size_t(kv) * splits + split) * partial_floats(HD);
    if (slots.attends()) {
      work.take_current(slots, position, current);
      // scores: this thread's part of the dot, summed over the slot's kParts neighbouring lanes
#pragma unroll
      for (int g = 0; g < kMaxGroup; ++g) {
        if (g >= G) break;
        float dot = 0.0f;
#pragma unroll
        for (int j = 0; j < Work::kKeyLoads; ++j)
#pragma unroll
          for (int e = 0; e < E; e += 4) {
            const float4 q4 = *reinterpret_cast<const float4*>(&qs[g][work.k_part][j * E + e]);
            dot = fmaf(q4.x, work.kf[j][e], fmaf(q4.y, work.kf[j][e + 1],
                       fmaf(q4.z, work.kf[j][e + 2], fmaf(q4.w, work.kf[j][e + 3], dot))));
          }
#pragma unroll
        for (int o = 1; o < kParts; o <<= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        if (work.k_part == 0) probs[g][work.k_slot] = slots.valid(work.k_slot) ? dot : -FLT_MAX;
      }
      __syncthreads();

      // softmax statistics: warp w takes query heads w, w + 4, ...; lane takes slots lane, lane + 32, ...
      const int warp = tid / 32, lane = tid % 32;
      for (int g = warp; g < G; g += kAttnThreads / 32) {
        float score[kSlots / 32], top = -FLT_MAX;
#pragma unroll
        for (int j = 0; j < kSlots / 32; ++j) top = fmaxf(top, score[j] = probs[g][lane + 32 * j]);
        const float m = warp_max(top);  // finite: the split has a valid slot
        float l = 0.0f;
#pragma unroll
        for (int j = 0; j < kSlots / 32; ++j) {
          const float p = __expf(score[j] - m);
          probs[g][lane + 32 * j] = p;
          l += p;
        }
        l = warp_sum(l);
        if (lane == 0) part[kMaxGroup * HD + g] = m, part[kMaxGroup * HD + kMaxGroup + g] = l;
      }
      __syncthreads();

      // p·V: this thread's piece of its slots' value rows, then the slot groups added in shared memory
#pragma unroll
      for (int g = 0; g < kMaxGroup; ++g) {
        if (g >= G) break;
        float o[E] = {};
#pragma unroll
        for (int i = 0; i < kValueLoads; ++i) {
          const float p = probs[g][work.v_group + i * kSlotGroups];
#pragma unroll
          for (int e = 0; e < E; ++e) o[e] = fmaf(p, work.vf[i][e], o[e]);
        }
#pragma unroll
        for (int e = 0; e < E; e += 4)
          *reinterpret_cast<float4*>(&sums[work.v_group][g][work.v_piece * E + e]) =
              make_float4(o[e], o[e + 1], o[e + 2], o[e + 3]);
      }
      __syncthreads();  // (the next split's scores write probs only after two more barriers than sums' reads)
      for (int i = tid; i < G * HD; i += kAttnThreads) {
        float s = 0.0f;
#pragma unroll
        for (int k = 0; k < kSlotGroups; ++k) s += sums[k][i / HD][i % HD];
        part[i] = s;
      }
    } else if (tid < G) {  // nothing to attend to here (before the first valid slot): an empty partial
      part[kMaxGroup * HD + tid] = -FLT_MAX, part[kMaxGroup * HD + kMaxGroup + tid] = 0.0f;
    }
    split += gridDim.y;
    if (split >= live) break;
    slots = SplitSlots(split, first, position, a.max_slots);
    work.load(a, kv, slots, position);
  }
}

// out = Σ_s o_s·e^(m_s − m) / Σ_s l_s·e^(m_s − m) over the splits, one thread per (query head, dim),
// online over batches of kMergeSplits splits whose loads all go out together.
template <typename T, int HD>
__global__ void __launch_bounds__(HD) attention_merge_kernel(AttentionArgs a) {
  allow_next_kernel();  // the o GEMV after this may start streaming its weights
  constexpr int kStride = partial_floats(HD);
  const int head = blockIdx.x, d = threadIdx.x;
  const int kv = head / a.group, g = head % a.group;
  const float* parts = a.workspace + size_t(kv) * attention_splits_of(a.max_slots) * kStride;
  const int live = live_splits(a, *a.position);  // later splits were not written
  float m = -FLT_MAX, l = 0.0f, o = 0.0f;
  grid_dependency_wait();  // the partials come from the attention kernel
  for (int s0 = 0; s0 < live; s0 += kMergeSplits) {
    float ms[kMergeSplits], ls[kMergeSplits], os[kMergeSplits];
#pragma unroll
    for (int i = 0; i < kMergeSplits; ++i) {
      const float* p = parts + size_t(s0 + i) * kStride;
      const bool in = s0 + i < live;
      ms[i] = in ? __ldcg(p + kMaxGroup * HD + g) : -FLT_MAX;
      ls[i] = in ? __ldcg(p + kMaxGroup * HD + kMaxGroup + g) : 0.0f;
      os[i] = in ? __ldcg(p + g * HD + d) : 0.0f;
    }
    float top = m;
#pragma unroll
    for (int i = 0; i < kMergeSplits; ++i) top = ls[i] > 0.0f ? fmaxf(top, ms[i]) : top;
    const float rescale = __expf(m - top);
    l *= rescale;
    o *= rescale;
#pragma unroll
    for (int i = 0; i < kMergeSplits; ++i) {
      if (ls[i] > 0.0f) {  // an empty split's output was never written
        const float w = __expf(ms[i] - top);
        l = fmaf(ls[i], w, l);
        o = fmaf(os[i], w, o);
      }
    }
    m = top;
  }
  static_cast<T*>(a.out)[size_t(head) * HD + d] = Io<T>::store(l > 0.0f ? o / l : 0.0f);
}

template <typename T, int HD>
cudaError_t launch_attention_hd(const AttentionArgs& a, cudaStream_t stream) {
  const dim3 grid(a.kv_heads, std::min(attention_splits_of(a.max_slots), kMaxSplitBlocks));
  const cudaError_t err = launch_dependent(decode_attention_kernel<T, HD>, grid, dim3(kAttnThreads), 0, stream, a);
  if (err != cudaSuccess) return err;
  return launch_dependent(attention_merge_kernel<T, HD>, dim3(a.kv_heads * a.group), dim3(HD), 0, stream, a);
}

template <typename T>
cudaError_t launch_attention(const AttentionArgs& a, cudaStream_t stream) {
  switch (a.head_dim) {
    case 64: return launch_attention_hd<T, 64>(a, stream);
    case 128: return launch_attention_hd<T, 128>(a, stream);
    case 256: return launch_attention_hd<T, 256>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

// ---- greedy_next: argmax of the step's logits into the next step's token ---------------------------
// Each block takes a strided share of the logits (kGreedyLoads loads a thread in flight at once), packs
// its best as one 64-bit key and puts it into state[0] by atomicMax; the last block to count itself
// into state[1] turns the key into the token, advances the position and zeroes the state for the next
// step. The key orders as (logit, −index): the first index of the largest logit wins, as torch.argmax;
// a NaN logit, of either sign, outranks every number, as torch.argmax ranks it, so the winner is NaN
// exactly where any logit is (`is_nan`, where given, says so: the host need not read the logits).

constexpr int kGreedyThreads = 256;
constexpr int kGreedyBlocks = 64;
constexpr int kGreedyLoads = 8;

__device__ __forceinline__ unsigned long long greedy_key(float logit, int64_t index) {
  const unsigned bits = __float_as_uint(logit);
  // unsigned order = float order; any NaN (torch's bfloat16 NaN has the sign bit set) above +inf
  const unsigned ordered = isnan(logit) ? 0xffffffffu : bits & 0x80000000u ? ~bits : bits | 0x80000000u;
  return (static_cast<unsigned long long>(ordered) << 32) | static_cast<unsigned>(~static_cast<unsigned>(index));
}

__device__ __forceinline__ unsigned long long warp_max_key(unsigned long long key) {
#pragma unroll
  for (int o = 16; o; o >>= 1) {
    const unsigned long long other = __shfl_xor_sync(0xffffffffu, key, o);
    key = other > key ? other : key;
  }
  return key;
}

template <typename T>
__global__ void __launch_bounds__(kGreedyThreads)
greedy_next_kernel(const T* logits, int64_t n, int64_t* token, int64_t* is_nan, int64_t* position,
                   unsigned long long* state) {
  __shared__ unsigned long long warp_best[kGreedyThreads / 32];
  const int64_t stride = int64_t(gridDim.x) * kGreedyThreads;
  unsigned long long best = 0;  // below every key of a number
  for (int64_t base = int64_t(blockIdx.x) * kGreedyThreads + threadIdx.x; base < n; base += stride * kGreedyLoads) {
    float v[kGreedyLoads];
#pragma unroll
    for (int j = 0; j < kGreedyLoads; ++j) v[j] = base + j * stride < n ? Io<T>::load(logits[base + j * stride]) : -FLT_MAX;
#pragma unroll
    for (int j = 0; j < kGreedyLoads; ++j)
      if (base + j * stride < n) {
        const unsigned long long key = greedy_key(v[j], base + j * stride);
        best = key > best ? key : best;
      }
  }
  best = warp_max_key(best);
  if (threadIdx.x % 32 == 0) warp_best[threadIdx.x / 32] = best;
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 1; w < kGreedyThreads / 32; ++w) best = warp_best[w] > best ? warp_best[w] : best;
    atomicMax(&state[0], best);
    __threadfence();
    if (atomicAdd(&state[1], 1ull) == gridDim.x - 1) {  // the last block: every other key is in
      __threadfence();
      const unsigned long long key = atomicExch(&state[0], 0ull);
      state[1] = 0;
      *token = static_cast<int64_t>(~static_cast<unsigned>(key & 0xffffffffu));
      if (is_nan != nullptr) *is_nan = (key >> 32) == 0xffffffffull;
      *position += 1;
    }
  }
}

template <typename T>
void launch_rms_norm(const void* x, const void* weight, void* y, int rows, int dim, float eps, cudaStream_t stream) {
  const T* in = static_cast<const T*>(x);
  const T* w = static_cast<const T*>(weight);
  T* out = static_cast<T*>(y);
  if (rows == 1) rms_norm_kernel<T, 1024><<<rows, 1024, 0, stream>>>(in, w, out, dim, eps);
  else rms_norm_kernel<T, 256><<<rows, 256, 0, stream>>>(in, w, out, dim, eps);
}

}  // namespace

int attention_splits(int max_slots) { return attention_splits_of(max_slots); }
int64_t attention_workspace_floats(int kv_heads, int max_slots, int head_dim) {
  return int64_t(kv_heads) * attention_splits(max_slots) * partial_floats(head_dim);
}
bool attention_supported(int head_dim, int group) {
  return (head_dim == 64 || head_dim == 128 || head_dim == 256) && group >= 1 && group <= kMaxGroup;
}

cudaError_t rms_norm(const void* x, const void* weight, void* y, int rows, int dim, float eps, int dtype,
                     cudaStream_t stream) {
  switch (dtype) {
    case 0: launch_rms_norm<half>(x, weight, y, rows, dim, eps, stream); break;
    case 1: launch_rms_norm<__nv_bfloat16>(x, weight, y, rows, dim, eps, stream); break;
    default: launch_rms_norm<float>(x, weight, y, rows, dim, eps, stream); break;
  }
  return cudaGetLastError();
}

cudaError_t silu_mul(const void* gate, const void* up, void* out, int64_t n, int dtype, cudaStream_t stream) {
  const int threads = 256;
  const int blocks = int(std::min<int64_t>(4096, std::max<int64_t>(1, (n / 8 + threads - 1) / threads)));
  switch (dtype) {
    case 0: silu_mul_kernel<half><<<blocks, threads, 0, stream>>>(static_cast<const half*>(gate),
              static_cast<const half*>(up), static_cast<half*>(out), n); break;
    case 1: silu_mul_kernel<__nv_bfloat16><<<blocks, threads, 0, stream>>>(static_cast<const __nv_bfloat16*>(gate),
              static_cast<const __nv_bfloat16*>(up), static_cast<__nv_bfloat16*>(out), n); break;
    default: silu_mul_kernel<float><<<blocks, threads, 0, stream>>>(static_cast<const float*>(gate),
               static_cast<const float*>(up), static_cast<float*>(out), n); break;
  }
  return cudaGetLastError();
}

cudaError_t rotary_kv(const RotaryKvArgs& a, int dtype, cudaStream_t stream) {
  const int threads = a.head_dim <= 64 ? 64 : a.head_dim <= 128 ? 128 : 256;
  const int per_block = a.tokens == 1 ? 1 : kRotaryHeads;  // heads a block takes (at most kRotaryHeads)
  const dim3 blocks((a.q_heads + a.kv_heads + per_block - 1) / per_block, a.tokens);
  switch (dtype) {
    case 0: rotary_kv_kernel<half><<<blocks, threads, 0, stream>>>(a, per_block); break;
    case 1: rotary_kv_kernel<__nv_bfloat16><<<blocks, threads, 0, stream>>>(a, per_block); break;
    default: rotary_kv_kernel<float><<<blocks, threads, 0, stream>>>(a, per_block); break;
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

cudaError_t greedy_next(const void* logits, int64_t n, int dtype, int64_t* token, int64_t* is_nan, int64_t* position,
                        void* state, cudaStream_t stream) {
  const int blocks = std::max(1, int(std::min<int64_t>(kGreedyBlocks, (n + kGreedyThreads - 1) / kGreedyThreads)));
  auto* keys = static_cast<unsigned long long*>(state);
  switch (dtype) {
    case 0: greedy_next_kernel<<<blocks, kGreedyThreads, 0, stream>>>(static_cast<const half*>(logits), n, token,
                                                                         is_nan, position, keys); break;
    case 1: greedy_next_kernel<<<blocks, kGreedyThreads, 0, stream>>>(static_cast<const __nv_bfloat16*>(logits), n,
                                                                         token, is_nan, position, keys); break;
    default: greedy_next_kernel<<<blocks, kGreedyThreads, 0, stream>>>(static_cast<const float*>(logits), n, token,
                                                                          is_nan, position, keys); break;
  }
  return cudaGetLastError();
}

}  // namespace trimtab_cuda
