// The quantized linear kernels on the GPU layout (qlinear_layout.cuh, docs/CUDA.md) besides the
// GEMV (qgemv.cu):
//   qdequantize  W's columns as a dense [in, cols] matrix (prefill: then a cuBLAS matmul);
//   qrepack      canonical words → the GPU layout, once at load.
#include <algorithm>

#include "qlinear_cuda.h"
#include "qlinear_layout.cuh"

namespace trimtab_cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;

__device__ __forceinline__ uint32_t bits16(half v) { return __half_as_ushort(v); }
__device__ __forceinline__ uint32_t bits16(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
template <typename T>
__device__ __forceinline__ uint2 packed4(const T (&v)[4]) {  // 4 two-byte values
  return make_uint2(bits16(v[0]) | bits16(v[1]) << 16, bits16(v[2]) | bits16(v[3]) << 16);
}

// Two rows of 4 columns each in two neighbouring lanes (columns 8i..8i+3 and 8i+4..8i+7), as 4
// two-byte values in a uint2 each: stored as 16 bytes a lane, the even lane writing the first row's
// 8 columns, the odd lane the second's (half the store instructions of 8-byte stores). A null row
// is not written (padding).
template <typename T>
__device__ __forceinline__ void store_pair_wide(uint2 lo, uint2 hi, T* row_lo, T* row_hi, int col) {
  const bool odd = threadIdx.x & 1;
  const uint2 own = odd ? hi : lo, send = odd ? lo : hi;
  const uint2 got = make_uint2(__shfl_xor_sync(0xffffffffu, send.x, 1), __shfl_xor_sync(0xffffffffu, send.y, 1));
  const uint4 piece = odd ? make_uint4(got.x, got.y, own.x, own.y) : make_uint4(own.x, own.y, got.x, got.y);
  T* row = odd ? row_hi : row_lo;
  if (row != nullptr) *reinterpret_cast<uint4*>(row + (col & ~7)) = piece;
}

// Byte j of `bytes` as a float: placed under the exponent of 2^23 (whose mantissa step is 1), less 2^23.
__device__ __forceinline__ float byte_value(uint32_t bytes, int j) {
  return __uint_as_float(__byte_perm(bytes, 0x4B000000u, 0x7440 + j)) - 8388608.0f;
}

template <typename T, int BITS, bool WIDE>
__device__ __forceinline__ void dequant_chunk(const QLayer& L, int4 m, int chunk, int col, int ncols, T* wt,
                                              int64_t ldw) {
  const int col4 = col / 4;
  const uint4* src = reinterpret_cast<const uint4*>(L.words) + tile_major4(L.word_rows, m.x, col4);
  uint32_t w[4][BITS];
#pragma unroll
  for (int k = 0; k < BITS; ++k) {
    const uint4 v = __ldg(src + k * (kWarpCols / 4));  // the next word row of the tile
    w[0][k] = v.x;
    w[1][k] = v.y;
    w[2][k] = v.z;
    w[3][k] = v.w;
  }
  const uint4 sm4 = __ldg(reinterpret_cast<const uint4*>(L.scale_min) + tile_major4(L.groups, m.z, col4));
  const half2* sm = reinterpret_cast<const half2*>(&sm4);
  float scale[4], mn[4];
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    scale[c] = __low2float(sm[c]);
    mn[c] = __high2float(sm[c]);
  }
  static_for<kQuads>([&](auto quad) {
    constexpr int v = decltype(quad)::value;
    T value[4][4];  // [row 4v + j][column]: W = q·scale + min
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const uint32_t q = quad_bytes<BITS, v>(w[c]);
#pragma unroll
      for (int j = 0; j < 4; ++j) value[j][c] = Io<T>::store(fmaf(byte_value(q, j), scale[c], mn[c]));
    }
    int dst[4];  // the rows' places in the original input order, -1: padding
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int row = chunk * kChunkRows + 4 * v + j;
      dst[j] = L.xmap ? __ldg(L.xmap + row) : row;
    }
    if constexpr (WIDE) {
#pragma unroll
      for (int j = 0; j < 4; j += 2)
        store_pair_wide(packed4(value[j]), packed4(value[j + 1]), dst[j] < 0 ? nullptr : wt + dst[j] * ldw,
                        dst[j + 1] < 0 ? nullptr : wt + dst[j + 1] * ldw, col);
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (dst[j] < 0) continue;
        T* out = wt + dst[j] * ldw + col;
        if (ncols >= 4 && sizeof(T) == 2) {
          *reinterpret_cast<uint2*>(out) = *reinterpret_cast<const uint2*>(value[j]);
        } else if (ncols >= 4) {
          *reinterpret_cast<uint4*>(out) = *reinterpret_cast<const uint4*>(value[j]);
        } else {
          for (int c = 0; c < ncols; ++c) out[c] = value[j][c];
        }
      }
    }
  });
}

template <typename T>
__global__ void __launch_bounds__(kThreads) qdequantize_kernel(QLayer L, int col_begin, int col_end, T* wt,
                                                               int64_t ldw) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int chunk = blockIdx.y * kWarps + warp;
  const int col = col_begin + (blockIdx.x * 32 + lane) * 4;
  if (chunk >= L.chunks || col >= col_end) return;
  const int4 m = __ldg(reinterpret_cast<const int4*>(L.meta) + chunk);
  T* out = wt - col_begin;
  const int ncols = min(4, col_end - col);
  // 2-byte T: 16-byte stores where the warp's columns are all inside and every row starts 16-byte aligned
  const bool wide = sizeof(T) == 2 && col_begin % 8 == 0 && ldw % 8 == 0 &&
                    col_begin + (blockIdx.x * 32 + 32) * 4 <= col_end;
  if (wide) {
    with_width(m.y, [&](auto width) {
      dequant_chunk<T, decltype(width)::bits, sizeof(T) == 2>(L, m, chunk, col, ncols, out, ldw);
    });
  } else {
    with_width(m.y, [&](auto width) {
      dequant_chunk<T, decltype(width)::bits, false>(L, m, chunk, col, ncols, out, ldw);
    });
  }
}

__global__ void qrepack_kernel(const int32_t* qweight, int out, const int4* repack, const int4* meta,
                               uint32_t* words, int word_rows) {
  const int chunk = blockIdx.y;
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= out) return;
  const int4 r = repack[chunk];  // canonical word row of the group, first row in the group, size, width
  const int bits = r.w, lo = low_plane(bits), hi = bits - lo;
  uint32_t planes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int i = 0; i < kChunkRows && r.y + i < r.z; ++i) {
    const int64_t bit = int64_t(r.y + i) * bits;
    const int64_t word = r.x + bit / 32;
    const int shift = int(bit % 32);
    uint64_t two = uint32_t(qweight[word * out + col]);
    if (shift + bits > 32) two |= uint64_t(uint32_t(qweight[(word + 1) * out + col])) << 32;
    const uint32_t q = uint32_t(two >> shift) & ((1u << bits) - 1u);
    const int quad = i / 4, byte = 8 * (i % 4);
    planes[plane_word(lo, quad)] |= (q & ((1u << lo) - 1u)) << (plane_shift(lo, quad) + byte);
    if (hi > 0) planes[lo + plane_word(hi, quad)] |= (q >> lo) << (plane_shift(hi, quad) + byte);
  }
  const int word_row = meta[chunk].x;
  for (int k = 0; k < bits; ++k) {
    const size_t at = (size_t(col / kWarpCols) * word_rows + word_row + k) * kWarpCols + col % kWarpCols;
    words[at] = planes[k];
  }
}

int ceil_div(int64_t a, int64_t b) { return int((a + b - 1) / b); }
}  // namespace

cudaError_t qdequantize_t(const QLayer& layer, int col_begin, int col_end, void* wt, int64_t ldw, int dtype,
                          cudaStream_t stream) {
  if (col_begin % 4 || col_begin >= col_end || col_end > layer.out || ldw % 4) return cudaErrorInvalidValue;
  const dim3 grid(ceil_div(col_end - col_begin, kWarpCols), ceil_div(layer.chunks, kWarps));
  if (dtype == 0)
    qdequantize_kernel<half><<<grid, kThreads, 0, stream>>>(layer, col_begin, col_end, static_cast<half*>(wt), ldw);
  else if (dtype == 1)
    qdequantize_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(layer, col_begin, col_end,
                                                                     static_cast<__nv_bfloat16*>(wt), ldw);
  else
    qdequantize_kernel<float><<<grid, kThreads, 0, stream>>>(layer, col_begin, col_end, static_cast<float*>(wt), ldw);
  return cudaGetLastError();
}

cudaError_t qrepack(const int32_t* qweight, int out, const int* repack, int chunks, const int* meta,
                    uint32_t* words, int word_rows, cudaStream_t stream) {
  const dim3 grid(ceil_div(out, 128), chunks);
  qrepack_kernel<<<grid, 128, 0, stream>>>(qweight, out, reinterpret_cast<const int4*>(repack),
                                           reinterpret_cast<const int4*>(meta), words, word_rows);
  return cudaGetLastError();
}

}  // namespace trimtab_cuda
