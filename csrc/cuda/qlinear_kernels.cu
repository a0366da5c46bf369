// The quantized linear kernels on the GPU layout (qlinear_layout.cuh, docs/CUDA.md):
//   qgemv        y = x Wᵀ (+ bias) for 1-8 rows, reading the packed words with 16-byte loads;
//   qdequantize  W's columns as a dense [in, cols] matrix (prefill: then a cuBLAS matmul);
//   qrepack      canonical words → the GPU layout, once at load.
#include <algorithm>

#include "qlinear_cuda.h"
#include "qlinear_layout.cuh"

namespace trimtab_cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kStageBytes = 40 * 1024;  // staged x per block; below the 48 KB needing no opt-in
constexpr int kStageBytesPerChunkRow = kChunkRows * 2 + 2 * 4;  // 32 halves + scale and sum
constexpr int kMaxStagePasses = 8;  // chunks a warp stages: a block spans at most 64 chunks

struct GemvArgs {
  QLayer layer;
  const void* x;
  const void* gate;      // nullptr, or [batch, in] rows ldx apart: the input is silu(gate)·x
  int64_t ldx;
  void* y;
  int64_t ldy;
  const void* residual;  // nullptr, or [batch, out] rows ldy apart, added to the output
  const float* bias;
  float* workspace;  // [splits, batch, out_pad]
  int* counters;     // [tiles]
  int splits;
  int chunks_per_split;
};

__device__ __forceinline__ uint4 load_streaming(const uint4* p) {
  // read once: keep it out of L1 so the scales and x stay there
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// Stage chunks of x as float16 pairs (x[t], x[t + 16]) scaled by a power of two per (row, chunk)
// so that |x| < 1 (float16 sums of 16 products then stay far from overflow), with each (row,
// chunk)'s scale and exact float sum. One warp stages one chunk: lane = row within it.

// x rows of local chunk lc as this lane's values (0 past the layer's rows); silu(gate)·x if gated
template <typename T, int NB>
__device__ __forceinline__ void load_chunk_x(const GemvArgs& a, int c_begin, int lc, int c_count, float (&v)[NB]) {
  const int lane = threadIdx.x % 32;
  const T* x = static_cast<const T*>(a.x);
  const int row = (c_begin + lc) * kChunkRows + lane;
  const int src = lc >= c_count ? -1 : a.layer.xmap ? __ldg(a.layer.xmap + row) : row;
#pragma unroll
  for (int b = 0; b < NB; ++b) v[b] = src >= 0 ? Io<T>::load(x[b * a.ldx + src]) : 0.0f;
  if (a.gate != nullptr) {  // the gated MLP's silu(gate)·up, rounded as the unfused ops round it
    const T* gate = static_cast<const T*>(a.gate);
#pragma unroll
    for (int b = 0; b < NB; ++b) {
      const float g = src >= 0 ? Io<T>::load(gate[b * a.ldx + src]) : 0.0f;
      v[b] = Io<T>::load(Io<T>::store(Io<T>::load(Io<T>::store(g / (1.0f + __expf(-g)))) * v[b]));
    }
  }
}

template <int NB>
__device__ __forceinline__ void store_chunk_x(const float (&v)[NB], int lc, int cps, half2* xs, float* xscale,
                                              float* xsum) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int b = 0; b < NB; ++b) {
    float amax = fabsf(v[b]), sum = v[b];
#pragma unroll
    for (int o = 16; o; o >>= 1) {
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
      sum += __shfl_xor_sync(0xffffffffu, sum, o);
    }
    int e = 0;
    frexpf(amax, &e);  // amax < 2^e
    const bool zero = !(amax > 0.0f);
    half* pairs = reinterpret_cast<half*>(xs + (b * cps + lc) * kPairs);
    pairs[(lane & 15) * 2 + (lane >> 4)] = __float2half_rn(zero ? 0.0f : ldexpf(v[b], -e));
    if (lane == 0) {
      xscale[b * cps + lc] = zero ? 0.0f : ldexpf(1.0f, e);
      xsum[b * cps + lc] = sum;
    }
  }
}

// The block's chunks, warp w staging chunks w, w + 8, ...: every load first (all in flight
// together), then the reductions, so staging costs one memory latency rather than one per chunk.
template <typename T, int NB>
__device__ void stage_x(const GemvArgs& a, int c_begin, int c_count, half2* xs, float* xscale, float* xsum) {
  const int warp = threadIdx.x / 32;
  float v[kMaxStagePasses][NB];
#pragma unroll
  for (int p = 0; p < kMaxStagePasses; ++p) load_chunk_x<T, NB>(a, c_begin, warp + p * kWarps, c_count, v[p]);
#pragma unroll
  for (int p = 0; p < kMaxStagePasses; ++p) {
    if (warp + p * kWarps >= c_count) break;  // the same for the whole warp
    store_chunk_x<NB>(v[p], warp + p * kWarps, a.chunks_per_split, xs, xscale, xsum);
  }
}

// One chunk's reads for this thread's 4 columns: its metadata, `bits` 16-byte word rows and the
// (scale, min) of its group. (Fetching the next chunk's while computing on this one doubled the
// registers, halved the blocks a multiprocessor holds and measured slower: docs/CUDA.md.)
struct ChunkWords {
  int4 m;       // word_row, bits, group, 0
  uint4 v[8];   // v[k]: word row k of the chunk, this thread's 4 columns (k < bits)
  uint4 sm;     // half2 (scale, min) of the 4 columns
};

template <int BITS>
__device__ __forceinline__ void fetch_chunk(const QLayer& L, int col4, bool active, ChunkWords& c) {
  if (!active) return;
  const size_t stride4 = L.out_pad / 4;
  const uint4* src = reinterpret_cast<const uint4*>(L.words + size_t(c.m.x) * L.out_pad) + col4;
#pragma unroll
  for (int k = 0; k < BITS; ++k) c.v[k] = load_streaming(src + k * stride4);
  c.sm = __ldg(reinterpret_cast<const uint4*>(L.scale_min) + size_t(c.m.z) * stride4 + col4);
}

// One chunk of 32 rows for this thread's 4 columns: float16 dot products of the centred q with the
// staged x, then acc += scale·xscale·dot + (min + 2^(b-1)·scale)·Σx in float32.
template <int NB, int BITS>
__device__ __forceinline__ void gemv_chunk(const ChunkWords& cw, bool active, int lc, int cps, const half2* xs,
                                           const float* xscale, const float* xsum, float (&acc)[NB][4]) {
  uint32_t w[4][BITS];
#pragma unroll
  for (int k = 0; k < BITS; ++k) {
    w[0][k] = active ? cw.v[k].x : 0u;
    w[1][k] = active ? cw.v[k].y : 0u;
    w[2][k] = active ? cw.v[k].z : 0u;
    w[3][k] = active ? cw.v[k].w : 0u;
  }
  half2 dot[NB][4];
#pragma unroll
  for (int b = 0; b < NB; ++b)
#pragma unroll
    for (int c = 0; c < 4; ++c) dot[b][c] = __float2half2_rn(0.0f);
#pragma unroll
  for (int t4 = 0; t4 < kPairs; t4 += 4) {
    uint4 xv[NB];
#pragma unroll
    for (int b = 0; b < NB; ++b) xv[b] = *reinterpret_cast<const uint4*>(xs + (b * cps + lc) * kPairs + t4);
#pragma unroll
    for (int tt = 0; tt < 4; ++tt) {
      half2 q[4];
#pragma unroll
      for (int c = 0; c < 4; ++c) q[c] = centred_pair<BITS>(pair_bits<BITS>(w[c], t4 + tt));
#pragma unroll
      for (int b = 0; b < NB; ++b) {
        const uint32_t xw = tt == 0 ? xv[b].x : tt == 1 ? xv[b].y : tt == 2 ? xv[b].z : xv[b].w;
        const half2 x2 = *reinterpret_cast<const half2*>(&xw);
#pragma unroll
        for (int c = 0; c < 4; ++c) dot[b][c] = __hfma2(x2, q[c], dot[b][c]);
      }
    }
  }
  const uint4 sm4 = active ? cw.sm : make_uint4(0, 0, 0, 0);
  const half2* sm = reinterpret_cast<const half2*>(&sm4);
  float scale[4], offset[4];
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    scale[c] = __low2float(sm[c]);
    offset[c] = __high2float(sm[c]) + scale[c] * float(1 << (BITS - 1));
  }
#pragma unroll
  for (int b = 0; b < NB; ++b) {
    const float xsc = xscale[b * cps + lc], xs_sum = xsum[b * cps + lc];
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const float2 d = __half22float2(dot[b][c]);
      acc[b][c] = fmaf(scale[c] * xsc, d.x + d.y, fmaf(offset[c], xs_sum, acc[b][c]));
    }
  }
}

// Fetch and compute one chunk of width BITS (its words are live only inside its width's branch).
template <int NB, int BITS>
__device__ __forceinline__ void run_chunk(const QLayer& L, ChunkWords& cw, int col4, bool active, int lc, int cps,
                                          const half2* xs, const float* xscale, const float* xsum,
                                          float (&acc)[NB][4]) {
  fetch_chunk<BITS>(L, col4, active, cw);
  gemv_chunk<NB, BITS>(cw, active, lc, cps, xs, xscale, xsum, acc);
}

// A warp's own chunk (a chunk per warp): its words are requested first, then the warp stages its
// rows of x while they arrive, then computes.
template <typename T, int NB, int BITS>
__device__ __forceinline__ void run_own_chunk(const GemvArgs& a, ChunkWords& cw, int c_begin, int c_count, int col4,
                                              bool active, half2* xs, float* xscale, float* xsum,
                                              float (&acc)[NB][4]) {
  const int lc = threadIdx.x / 32;
  fetch_chunk<BITS>(a.layer, col4, active, cw);
  float v[NB];
  load_chunk_x<T, NB>(a, c_begin, lc, c_count, v);
  store_chunk_x<NB>(v, lc, a.chunks_per_split, xs, xscale, xsum);
  __syncwarp();
  gemv_chunk<NB, BITS>(cw, active, lc, a.chunks_per_split, xs, xscale, xsum, acc);
}

// What the output adds to x Wᵀ: the bias and the residual (either may be absent).
template <typename T>
__device__ __forceinline__ float epilogue_addend(const GemvArgs& a, int b, int col) {
  float s = a.bias ? a.bias[col] : 0.0f;
  if (a.residual) s += Io<T>::load(static_cast<const T*>(a.residual)[b * a.ldy + col]);
  return s;
}

template <typename T, int NB>
__global__ void __launch_bounds__(kThreads, NB > 2 ? 1 : NB == 1 ? 4 : 3) qgemv_kernel(GemvArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int is_last;
  const QLayer& L = a.layer;
  const int tile = blockIdx.x, split = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int cps = a.chunks_per_split;
  const int c_begin = split * cps;
  const int c_count = min(cps, L.chunks - c_begin);
  const int col4 = tile * 32 + lane;  // this thread's columns: 4·col4 ... 4·col4 + 3
  const bool active = col4 * 4 < L.out_pad;

  half2* xs = reinterpret_cast<half2*>(smem);                               // [NB, cps, 16]
  float* xscale = reinterpret_cast<float*>(smem + size_t(NB) * cps * kPairs * 4);  // [NB, cps]
  float* xsum = xscale + NB * cps;                                          // [NB, cps]
  float acc[NB][4];
#pragma unroll
  for (int b = 0; b < NB; ++b)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[b][c] = 0.0f;

  if (cps <= kWarps) {  // a chunk per warp: no loop, no barrier before the arithmetic
    if (warp < c_count) {
      ChunkWords c;
      c.m = __ldg(reinterpret_cast<const int4*>(L.meta) + c_begin + warp);
      switch (c.m.y) {  // the same for the whole warp: no divergence
        case 2: run_own_chunk<T, NB, 2>(a, c, c_begin, c_count, col4, active, xs, xscale, xsum, acc); break;
        case 3: run_own_chunk<T, NB, 3>(a, c, c_begin, c_count, col4, active, xs, xscale, xsum, acc); break;
        case 4: run_own_chunk<T, NB, 4>(a, c, c_begin, c_count, col4, active, xs, xscale, xsum, acc); break;
        case 5: run_own_chunk<T, NB, 5>(a, c, c_begin, c_count, col4, active, xs, xscale, xsum, acc); break;
        case 6: run_own_chunk<T, NB, 6>(a, c, c_begin, c_count, col4, active, xs, xscale, xsum, acc); break;
        default: run_own_chunk<T, NB, 8>(a, c, c_begin, c_count, col4, active, xs, xscale, xsum, acc); break;
      }
    }
  } else {
    stage_x<T, NB>(a, c_begin, c_count, xs, xscale, xsum);
    __syncthreads();

    for (int lc = warp; lc < c_count; lc += kWarps) {
      ChunkWords c;
      c.m = __ldg(reinterpret_cast<const int4*>(L.meta) + c_begin + lc);
      switch (c.m.y) {  // the same for the whole warp: no divergence
        case 2: run_chunk<NB, 2>(L, c, col4, active, lc, cps, xs, xscale, xsum, acc); break;
        case 3: run_chunk<NB, 3>(L, c, col4, active, lc, cps, xs, xscale, xsum, acc); break;
        case 4: run_chunk<NB, 4>(L, c, col4, active, lc, cps, xs, xscale, xsum, acc); break;
        case 5: run_chunk<NB, 5>(L, c, col4, active, lc, cps, xs, xscale, xsum, acc); break;
        case 6: run_chunk<NB, 6>(L, c, col4, active, lc, cps, xs, xscale, xsum, acc); break;
        default: run_chunk<NB, 8>(L, c, col4, active, lc, cps, xs, xscale, xsum, acc); break;
      }
    }
  }
  __syncthreads();  // the staged x is no longer read: its memory takes the warps' partial sums

  float* red = reinterpret_cast<float*>(smem);  // [kWarps, NB, 128]
#pragma unroll
  for (int b = 0; b < NB; ++b)
    *reinterpret_cast<float4*>(red + (warp * NB + b) * kWarpCols + lane * 4) =
        make_float4(acc[b][0], acc[b][1], acc[b][2], acc[b][3]);
  __syncthreads();
  T* y = static_cast<T*>(a.y);
  for (int i = threadIdx.x; i < NB * kWarpCols; i += kThreads) {
    const int b = i / kWarpCols, col = tile * kWarpCols + i % kWarpCols;
    float s = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += red[(w * NB + b) * kWarpCols + i % kWarpCols];
    if (col < L.out) {
      if (a.splits == 1)
        y[b * a.ldy + col] = Io<T>::store(s + epilogue_addend<T>(a, b, col));
      else
        a.workspace[(size_t(split) * NB + b) * L.out_pad + col] = s;
    }
  }
  if (a.splits == 1) return;
  // split K: the last block of this column tile to finish adds the splits' partial sums
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(a.counters + tile, 1) == a.splits - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  for (int i = threadIdx.x; i < NB * kWarpCols; i += kThreads) {
    const int b = i / kWarpCols, col = tile * kWarpCols + i % kWarpCols;
    if (col >= L.out) continue;
    float s = epilogue_addend<T>(a, b, col);
    // independent loads: an unrolled pass has 16 in flight
#pragma unroll 16
    for (int k = 0; k < a.splits; ++k) s += __ldcg(a.workspace + (size_t(k) * NB + b) * L.out_pad + col);
    y[b * a.ldy + col] = Io<T>::store(s);
  }
  if (threadIdx.x == 0) a.counters[tile] = 0;  // ready for the next call (and graph replay)
}

template <typename T, int BITS>
__device__ __forceinline__ void dequant_chunk(const QLayer& L, int4 m, int chunk, int col, int ncols, T* wt,
                                              int64_t ldw) {
  const size_t stride4 = L.out_pad / 4;
  const int col4 = col / 4;
  const uint4* src = reinterpret_cast<const uint4*>(L.words + size_t(m.x) * L.out_pad) + col4;
  uint32_t w[4][BITS];
#pragma unroll
  for (int k = 0; k < BITS; ++k) {
    const uint4 v = __ldg(src + k * stride4);
    w[0][k] = v.x;
    w[1][k] = v.y;
    w[2][k] = v.z;
    w[3][k] = v.w;
  }
  const uint4 sm4 = __ldg(reinterpret_cast<const uint4*>(L.scale_min) + size_t(m.z) * stride4 + col4);
  const half2* sm = reinterpret_cast<const half2*>(&sm4);
  float scale[4], mn[4];
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    scale[c] = __low2float(sm[c]);
    mn[c] = __high2float(sm[c]);
  }
#pragma unroll
  for (int t = 0; t < kPairs; ++t) {
    uint32_t bits[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) bits[c] = pair_bits<BITS>(w[c], t);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = chunk * kChunkRows + t + 16 * h;
      const int dst = L.xmap ? __ldg(L.xmap + row) : row;
      if (dst < 0) continue;
      T v[4];
#pragma unroll
      for (int c = 0; c < 4; ++c) v[c] = Io<T>::store(fmaf(float((bits[c] >> (16 * h)) & 0xffffu), scale[c], mn[c]));
      T* out = wt + dst * ldw + col;
      if (ncols >= 4 && sizeof(T) == 2) {
        *reinterpret_cast<uint2*>(out) = *reinterpret_cast<const uint2*>(v);
      } else if (ncols >= 4) {
        *reinterpret_cast<uint4*>(out) = *reinterpret_cast<const uint4*>(v);
      } else {
        for (int c = 0; c < ncols; ++c) out[c] = v[c];
      }
    }
  }
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
  switch (m.y) {
    case 2: dequant_chunk<T, 2>(L, m, chunk, col, ncols, out, ldw); break;
    case 3: dequant_chunk<T, 3>(L, m, chunk, col, ncols, out, ldw); break;
    case 4: dequant_chunk<T, 4>(L, m, chunk, col, ncols, out, ldw); break;
    case 5: dequant_chunk<T, 5>(L, m, chunk, col, ncols, out, ldw); break;
    case 6: dequant_chunk<T, 6>(L, m, chunk, col, ncols, out, ldw); break;
    default: dequant_chunk<T, 8>(L, m, chunk, col, ncols, out, ldw); break;
  }
}

__global__ void qrepack_kernel(const int32_t* qweight, int out, const int4* repack, const int4* meta,
                               uint32_t* words, int out_pad) {
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
    const int t = i % kPairs, half_ = i / kPairs;
    planes[plane_word(lo, t)] |= (q & ((1u << lo) - 1u)) << (plane_shift(lo, t) + 16 * half_);
    if (hi > 0) planes[lo + plane_word(hi, t)] |= (q >> lo) << (plane_shift(hi, t) + 16 * half_);
  }
  const int word_row = meta[chunk].x;
  for (int k = 0; k < bits; ++k) words[size_t(word_row + k) * out_pad + col] = planes[k];
}

int ceil_div(int64_t a, int64_t b) { return int((a + b - 1) / b); }
int tiles_of(const QLayer& L) { return ceil_div(L.out_pad, kWarpCols); }

// The K split: how many blocks share a column tile. Enough blocks to give the GPU about
// `target_blocks` (bench/gpu_bench.py measured more, shorter blocks to beat fewer that fill the
// multiprocessors' slots exactly: a warp's chunks run one after another), at least a chunk per warp,
// within the staging limits.
int chunks_per_split(const QLayer& L, int batch, int target_blocks) {
  const int tiles = tiles_of(L);
  int splits = std::max(1, ceil_div(target_blocks, tiles));
  splits = std::min(splits, ceil_div(L.chunks, kWarps));  // a chunk per warp at most
  splits = std::max(splits, ceil_div(int64_t(L.chunks) * batch * kStageBytesPerChunkRow, kStageBytes));
  splits = std::max(splits, ceil_div(L.chunks, kWarps * kMaxStagePasses));
  splits = std::min(splits, L.chunks);
  return ceil_div(L.chunks, splits);
}

template <typename T, int NB>
cudaError_t launch_gemv(const GemvArgs& a, cudaStream_t stream) {
  const size_t stage = size_t(NB) * a.chunks_per_split * kStageBytesPerChunkRow;
  const size_t reduce = size_t(kWarps) * NB * kWarpCols * 4;
  const size_t smem = std::max(stage, reduce);
  const dim3 grid(tiles_of(a.layer), a.splits);
  qgemv_kernel<T, NB><<<grid, kThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_gemv_batch(const GemvArgs& a, int batch, cudaStream_t stream) {
  switch (batch) {
    case 1: return launch_gemv<T, 1>(a, stream);
    case 2: return launch_gemv<T, 2>(a, stream);
    case 3: return launch_gemv<T, 3>(a, stream);
    case 4: return launch_gemv<T, 4>(a, stream);
    case 5: return launch_gemv<T, 5>(a, stream);
    case 6: return launch_gemv<T, 6>(a, stream);
    case 7: return launch_gemv<T, 7>(a, stream);
    case 8: return launch_gemv<T, 8>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

int qgemv_splits(const QLayer& layer, int batch, int target_blocks) {
  return ceil_div(layer.chunks, chunks_per_split(layer, batch, target_blocks));
}

int64_t qgemv_workspace_floats(const QLayer& layer, int batch, int target_blocks) {
  return int64_t(qgemv_splits(layer, batch, target_blocks)) * batch * layer.out_pad;
}

int qgemv_counters(const QLayer& layer) { return tiles_of(layer); }

cudaError_t qgemv(const QLayer& layer, const GemvIo& io, int batch, int dtype, float* workspace, int* counters,
                  int target_blocks, cudaStream_t stream) {
  if (batch < 1 || batch > kMaxBatchRows || layer.chunks < 1) return cudaErrorInvalidValue;
  GemvArgs a{layer, io.x, io.gate, io.ldx, io.y, io.ldy, io.residual, io.bias, workspace, counters, 0, 0};
  a.chunks_per_split = chunks_per_split(layer, batch, target_blocks);
  a.splits = ceil_div(layer.chunks, a.chunks_per_split);
  switch (dtype) {
    case 0: return launch_gemv_batch<half>(a, batch, stream);
    case 1: return launch_gemv_batch<__nv_bfloat16>(a, batch, stream);
    default: return launch_gemv_batch<float>(a, batch, stream);
  }
}

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
                    uint32_t* words, int out_pad, cudaStream_t stream) {
  const dim3 grid(ceil_div(out, 128), chunks);
  qrepack_kernel<<<grid, 128, 0, stream>>>(qweight, out, reinterpret_cast<const int4*>(repack),
                                           reinterpret_cast<const int4*>(meta), words, out_pad);
  return cudaGetLastError();
}

}  // namespace trimtab_cuda
