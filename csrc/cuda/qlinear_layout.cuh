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
// Words are stored [chunk words, out_pad] row-major (out padded to a multiple of 4): a thread owns
// 4 adjacent columns and reads each word row of its columns with one 16-byte load; a warp reads
// 512 contiguous bytes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

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

// Both q values of pair t (row t in bits 0-15, row t + 16 in bits 16-31) from one column's
// `bits` words. t and bits are compile-time constants after unrolling: a shift and a mask per plane.
template <int BITS>
__device__ __forceinline__ uint32_t pair_bits(const uint32_t (&w)[BITS], int t) {
  constexpr int lo = low_plane(BITS), hi = high_plane(BITS);
  uint32_t v = (w[plane_word(lo, t)] >> plane_shift(lo, t)) & pair_mask(lo);
  if (hi > 0) {
    const int s = plane_shift(hi, t) - lo;
    const uint32_t h = w[lo + plane_word(hi, t)];
    v |= (s >= 0 ? h >> s : h << -s) & (pair_mask(hi) << lo);
  }
  return v;
}

// 1024 + q in each half as float16 minus (1024 + 2^(b-1)): the centred q, exact in float16.
template <int BITS>
__device__ __forceinline__ half2 centred_pair(uint32_t bits) {
  const uint32_t magic = bits | 0x64006400u;
  half2 h = *reinterpret_cast<const half2*>(&magic);
  const half c = __float2half_rn(1024.0f + float(1 << (BITS - 1)));
  return __hsub2(h, half2(c, c));
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

}  // namespace trimtab_cuda
