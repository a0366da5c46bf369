// The GPU layout of a quantized linear layer (docs/CUDA.md), repacked at load from the canonical
// format (docs/FORMAT.md), and the bit tricks that read it. Device code only; no ATen.
//
// Rows are cut into chunks of 32 (each group padded up to a multiple of 32 rows, q = 0 and x = 0
// in the padding). A chunk of width b keeps b int32 words per output column, as "planes":
//     width 2 → [2]   3 → [2, 1]   4 → [4]   5 → [4, 1]   6 → [4, 2]   8 → [8]
// (low bits in the first plane, the rest in the second, shifted up by the first plane's width).
// A plane of width p holds the chunk's 16 row pairs (t, t + 16): pair t sits in plane word
// t / (16 / p) at slot t % (16 / p); row t's p bits at [slot·p, slot·p + p), row t + 16's at
// [16 + slot·p, ...). So one shift and one mask give both rows of a pair, one in each 16-bit half,
// ready to be ORed into two float16 values 1024 + q (the 0x6400 exponent trick).
//
// Words are stored tile by tile, [tiles, word rows, 128] (out padded to a multiple of 128): a
// thread owns 4 adjacent columns and reads each word row of its columns with one 16-byte load, a
// warp 512 contiguous bytes, and a run of chunks of one tile is one contiguous stretch of memory.
// The (scale, min) pairs are stored the same way, half2 [tiles, groups, 128].
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>
#include <utility>

namespace trimtab_cuda {

constexpr int kChunkRows = 32;
constexpr int kPairs = 16;
constexpr int kColsPerThread = 4;
constexpr int kWarpCols = 32 * kColsPerThread;  // 128 columns: one warp's tile

__host__ __device__ constexpr int low_plane(int bits) { return bits == 8 ? 8 : bits >= 4 ? 4 : 2; }
__host__ __device__ constexpr int high_plane(int bits) { return bits - low_plane(bits); }
__host__ __device__ constexpr int plane_word(int p, int t) { return t / (16 / p); }
__host__ __device__ constexpr int plane_shift(int p, int t) { return (t % (16 / p)) * p; }
__host__ __device__ constexpr uint32_t pair_mask(int p) { return ((1u << p) - 1u) * 0x00010001u; }

// Float16 bits of a float exactly representable as a normal float16 (compile-time constants).
__host__ __device__ constexpr uint32_t half_bits(float v) {
  const uint32_t sign = v < 0 ? 0x8000u : 0u;
  float a = v < 0 ? -v : v;
  int e = 0;
  while (a >= 2.0f) a *= 0.5f, ++e;
  while (a < 1.0f) a *= 2.0f, --e;
  return sign | uint32_t(e + 15) << 10 | uint32_t((a - 1.0f) * 1024.0f);
}
__device__ __forceinline__ half2 half2_const(uint32_t bits) {
  const uint32_t both = bits | bits << 16;
  return *reinterpret_cast<const half2*>(&both);
}

// Reading a pair without shifting it down: ORed into 0x6400 (float16 1024, whose mantissa step is
// 1), the bits of slot s at offset k of each half make the float16 1024 + q·2^k, exact while
// k + p <= 10. A plane of width p has 16/p slots at offsets p·s: the first 10/p are read in place,
// the rest from the word shifted down by p·(10/p) (one shift per word, not per pair).
__host__ __device__ constexpr int in_place_slots(int p) { return 10 / p; }
__host__ __device__ constexpr int late_shift(int p) { return p * in_place_slots(p); }
__host__ __device__ constexpr int slot_offset(int p, int t) {
  return (t % (16 / p)) < in_place_slots(p) ? p * (t % (16 / p)) : p * (t % (16 / p)) - late_shift(p);
}

// 1024 + q·2^k in each half for pair T of plane width P held in word w (k = slot_offset(P, T)).
template <int P, int T>
__device__ __forceinline__ half2 plane_pair(uint32_t w) {
  const uint32_t src = (T % (16 / P)) < in_place_slots(P) ? w : w >> late_shift(P);
  const uint32_t bits = (src & (pair_mask(P) << slot_offset(P, T))) | 0x64006400u;  // one LOP3
  return *reinterpret_cast<const half2*>(&bits);
}

// Both centred q values of pair T (row T, row T + 16), q − 2^(b−1), exact in float16, from one
// column's `BITS` words: one LOP3 and one HFMA2 per plane (the scale by 2^-k and the offsets folded
// into the HFMA2s' constants; every intermediate is an integer below 2^15, so exact).
template <int BITS, int T>
__device__ __forceinline__ half2 centred_pair(const uint32_t (&w)[BITS]) {
  constexpr int lo = low_plane(BITS), hi = high_plane(BITS);
  constexpr float centre = float(1 << (BITS - 1));
  constexpr float lo_scale = 1.0f / float(1 << slot_offset(lo, T));  // 1024 + q·2^k → q + 1024·2^-k
  const half2 raw_lo = plane_pair<lo, T>(w[plane_word(lo, T)]);
  if constexpr (hi == 0) {
    constexpr uint32_t scale = half_bits(lo_scale), offset = half_bits(-(1024.0f * lo_scale + centre));
    return __hfma2(raw_lo, half2_const(scale), half2_const(offset));
  } else {
    constexpr float hi_scale = float(1 << lo) / float(1 << slot_offset(hi, T));  // → 2^lo·q_hi + 1024·hi_scale
    constexpr uint32_t hscale = half_bits(hi_scale);
    constexpr uint32_t hoffset = half_bits(-(1024.0f * hi_scale + 1024.0f * lo_scale + centre));
    constexpr uint32_t lscale = half_bits(lo_scale);
    const half2 high = __hfma2(plane_pair<hi, T>(w[lo + plane_word(hi, T)]), half2_const(hscale), half2_const(hoffset));
    return __hfma2(raw_lo, half2_const(lscale), high);
  }
}

// f(std::integral_constant<int, i>{}) for i = 0 ... N − 1, each i a compile-time constant.
template <typename F, int... I>
__device__ __forceinline__ void static_for_each(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, typename F>
__device__ __forceinline__ void static_for(F&& f) {
  static_for_each(f, std::make_integer_sequence<int, N>{});
}

// The uint4 holding row `row` (of `rows` per tile) for columns 4·col4 ... 4·col4 + 3: a word row
// of `words`, or with rows = groups, a group's (scale, min) pairs in `scale_min`.
__host__ __device__ inline size_t tile_major4(int rows, int row, int col4) {
  return (size_t(col4 / (kWarpCols / 4)) * rows + row) * (kWarpCols / 4) + col4 % (kWarpCols / 4);
}

template <int B>
struct Width {
  static constexpr int bits = B;
};

// f(Width<b>{}) for a chunk's width b (2, 3, 4, 5, 6 or 8): code made for each width; the branch is
// the same for a warp that reads one chunk.
template <typename F>
__device__ __forceinline__ void with_width(int bits, F&& f) {
  switch (bits) {
    case 2: f(Width<2>{}); break;
    case 3: f(Width<3>{}); break;
    case 4: f(Width<4>{}); break;
    case 5: f(Width<5>{}); break;
    case 6: f(Width<6>{}); break;
    default: f(Width<8>{}); break;
  }
}

// Per-chunk metadata, int4: where its words start (in word rows), its width, its group.
struct ChunkMeta {
  int word_row;
  int bits;
  int group;
  int unused;
};

template <typename T> struct Io;
template <> struct Io<half> {
  static __device__ __forceinline__ float load(half v) { return __half2float(v); }
  static __device__ __forceinline__ half store(float v) { return __float2half_rn(v); }
};
template <> struct Io<float> {
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};
template <> struct Io<__nv_bfloat16> {
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

// The gated MLP's silu(gate)·up, rounded to T as the unfused torch ops round it (silu, then the product).
template <typename T>
__device__ __forceinline__ float silu_times(float gate, float up) {
  return Io<T>::load(Io<T>::store(Io<T>::load(Io<T>::store(gate / (1.0f + __expf(-gate)))) * up));
}

}  // namespace trimtab_cuda
