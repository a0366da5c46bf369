// The GPU layout of a quantized linear layer (docs/CUDA.md), repacked at load from the canonical
// format (docs/FORMAT.md), and the bit tricks that read it. Device code only; no ATen.
//
// Rows are cut into chunks of 32 (each group padded up to a multiple of 32 rows, q = 0 and x = 0
// in the padding). A chunk of width b keeps b int32 words per output column, as "planes":
//     width 2 → [2]   3 → [2, 1]   4 → [4]   5 → [4, 1]   6 → [4, 2]   8 → [8]
// (low bits in the first plane, the rest in the second, shifted up by the first plane's width).
// The chunk's rows are 8 quads of 4 (rows 4v ... 4v + 3), row 4v + j in byte j of every plane word
// that holds quad v: a plane of width p holds quads [8k/p, 8(k + 1)/p) in its word k, quad v's
// bits at [p·(v mod 8/p), + p) of each byte. So one shift and one mask give a quad's 4 values as 4
// bytes, ready for a 4-way integer dot product (dp4a) with 4 int8 x values in row order.
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
constexpr int kColsPerThread = 4;
constexpr int kWarpCols = 32 * kColsPerThread;  // 128 columns: one warp's tile

constexpr int kQuads = kChunkRows / 4;

__host__ __device__ constexpr int low_plane(int bits) { return bits == 8 ? 8 : bits >= 4 ? 4 : 2; }
__host__ __device__ constexpr int high_plane(int bits) { return bits - low_plane(bits); }
__host__ __device__ constexpr int plane_word(int p, int quad) { return quad / (8 / p); }
__host__ __device__ constexpr int plane_shift(int p, int quad) { return (quad % (8 / p)) * p; }
__host__ __device__ constexpr uint32_t byte_mask(int p) { return ((1u << p) - 1u) * 0x01010101u; }

// Quad V's 4 values q (rows 4V ... 4V + 3 of the chunk) as 4 bytes, from one column's `BITS` words:
// a shift and a mask per plane (the compiler merges the second plane's mask and OR into one LOP3).
template <int BITS, int V>
__device__ __forceinline__ uint32_t quad_bytes(const uint32_t (&w)[BITS]) {
  constexpr int lo = low_plane(BITS), hi = high_plane(BITS);
  const uint32_t low = (w[plane_word(lo, V)] >> plane_shift(lo, V)) & byte_mask(lo);
  if constexpr (hi == 0) {
    return low;
  } else {
    constexpr int s = plane_shift(hi, V);
    const uint32_t h = w[lo + plane_word(hi, V)];
    const uint32_t up = s >= lo ? h >> (s - lo) : h << (lo - s);  // quad V's high bits at offset lo
    return low | (up & (byte_mask(hi) << lo));
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

template <typename T>
__device__ __forceinline__ float round_trip(float v) {  // v rounded to T, as a PyTorch op would store it
  return Io<T>::load(Io<T>::store(v));
}

__device__ __forceinline__ float warp_sum(float v) {  // a fixed butterfly: the same sum on every warp
#pragma unroll
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// HF RMSNorm's output for x: weight · round(x · inv_rms), rounded to T (statistics in float32).
template <typename T>
__device__ __forceinline__ T rms_normed(float x, float inv_rms, float weight) {
  return Io<T>::store(weight * round_trip<T>(x * inv_rms));
}

// The gated MLP's silu(gate)·up, rounded to T as the unfused torch ops round it (silu, then the product).
template <typename T>
__device__ __forceinline__ float silu_times(float gate, float up) {
  return Io<T>::load(Io<T>::store(Io<T>::load(Io<T>::store(gate / (1.0f + __expf(-gate)))) * up));
}

}  // namespace trimtab_cuda
