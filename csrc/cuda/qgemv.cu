// The GEMV on the GPU layout (qlinear_layout.cuh, docs/CUDA.md): y = x Wᵀ (+ bias, + residual) for
// 1-8 rows of x, optionally on silu(gate)·x or on RMSNorm(x)·weight (from Σ x² a GEMV before wrote
// per 128 columns: optionally, each tile's Σ y² is written for the next norm).
//
// Work is the list of (column tile, chunk) items, tile by tile; a grid of about `target_blocks`
// blocks cuts it into equal consecutive runs (stream-K), so every block reads the same number of
// bytes whatever the shape. A block's 8 warps take its items in turn; each warp streams its chunks'
// words and scales into its own shared-memory ring with cp.async, several chunks ahead of the one
// it computes (the thread that copies 16 bytes is the one that reads them: no barrier). A tile a
// block holds whole is written directly; a tile shared between blocks is summed by the last of them
// to finish, from per-block partial sums, in block order (deterministic). Several layers reading the
// same x (q, k, v; gate, up) run as one launch: consecutive ranges of blocks, one range per layer. A
// routed launch (a mixture of experts) gives each of its slots one layer's worth of blocks, the layer
// (expert) read from a device-side route written by the kernel before.
#include <algorithm>

#include "dependent_launch.cuh"
#include "qlinear_cuda.h"
#include "qlinear_layout.cuh"

namespace trimtab_cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kStageBytes = 32 * 1024;         // staged x per block
// x is staged as int8 per (row, chunk), in kXTerms terms: x ≈ scale·(hi + lo/kLowSteps), hi and lo int8 (hi
// alone is the CPU int8 kernel's kind of quantization: largest |x| → 127; lo carries its rounding, 1/254 finer)
constexpr int kXTerms = 2;
constexpr int kLowSteps = 254;
constexpr int kStageBytesPerChunkRow = kXTerms * kChunkRows + 8;  // the terms + scale, integer sum
constexpr int kMinStages = 2, kMaxStages = 4;  // chunks a warp has in its ring
constexpr int kPartialSlots = 2;               // a block shares at most its first and last tile
constexpr int kMinBits = 2;                    // the narrowest chunk

struct GemvArgs {  // one layer's share of a launch
  QLayer layer;
  GemvInput in;          // x, and what makes the input from it: a gate, or an RMSNorm
  GemvOutput out;        // y, its residual and bias, the layer's widest chunk; Σ y² for the next norm
  float* workspace;      // [blocks, kPartialSlots, batch, 128] partial sums of shared tiles
  int* counters;         // [tiles] blocks done with a shared tile (reset by the last)
  int items_per_block;   // (tile, chunk) items; the last block may have fewer
  int x_slots;           // chunks of x a block stages: items_per_block (a run is at most a tile's chunks)
  int stages;            // ring depth, kMinStages..kMaxStages; a ring slot holds max_bits word rows + scales
};

struct GemvGroup {  // a launch: layer i takes blocks [first_block[i], first_block[i + 1]); or routed:
  GemvArgs layers[kMaxGemvLayers];
  int first_block[kMaxGemvLayers + 1];
  int count;
  const int64_t* route;     // nullptr, or [slots]: slot s (blocks [s, s + 1) · slot_blocks) runs layer
  int slot_blocks;          // route[s] on x row s (x_slot_bytes apart, 0: one x) into output row s
  int64_t x_slot_bytes, y_slot_bytes;
};

__host__ __device__ constexpr int align16(int bytes) { return (bytes + 15) / 16 * 16; }
__host__ __device__ inline int tiles_of(const QLayer& L) { return L.out_pad / kWarpCols; }  // out_pad: whole tiles

// Where the ring starts within 128 bytes. Measured on the H100 (docs/CUDA.md), the ring's offset alone
// moves every shape: 16, 48, 80 or 112 bytes past a 128-byte boundary (16 past a 32-byte one) run
// fastest, 112 best; 0, 32, 64 or 96 up to 3 µs slower. ncu: the cp.async writes into the ring take
// 1.2× the ideal shared-memory wavefronts at 112, 2× at 16 and 4.1× at 32 (bank conflicts).
constexpr int kRingPhase = 112;

// Where a block's shared memory goes (bytes), for NB rows of x.
struct SharedLayout {
  int meta, xq, xinfo, ring, red, total;
  __host__ __device__ SharedLayout(int nb, int x_slots, int stages, int max_bits) {
    meta = 0;                                            // int4 [x_slots]
    xq = meta + x_slots * 16;                            // int8 [nb, kXTerms, x_slots, 32]
    xinfo = align16(xq + nb * kXTerms * x_slots * kChunkRows);  // int2 [nb, x_slots]
    ring = (xinfo + nb * x_slots * 8 + 127) / 128 * 128 + kRingPhase;  // uint4 [warps, stages, max_bits + 1, 32]
    red = ring + kWarps * stages * slot_bytes(max_bits);  // float [warps, nb, 128]
    total = red + kWarps * nb * kWarpCols * 4;
  }
  __host__ __device__ static constexpr int slot_bytes(int max_bits) { return (max_bits + 1) * 32 * 16; }
};

// The weights are read once a token and are most of what goes through L2: they are marked to go first,
// so that what is read again stays (each layer's chunk metadata, which every block reads before its first
// request; the activations, the KV cache)
__device__ __forceinline__ uint64_t evict_first() {
  uint64_t policy;
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  return policy;
}
__device__ __forceinline__ void cp_async16(void* shared, const void* global, uint64_t policy) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(shared));
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;" ::"r"(s), "l"(global), "l"(policy)
               : "memory");
}
// Row K of a chunk's words: 512 bytes (32 lanes × 16) past row 0 both in the layer and in the ring; the
// offset is an immediate, so that a request computes one address in each space.
template <int K>
__device__ __forceinline__ void cp_async16_row(unsigned shared, const void* global, uint64_t policy) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0+%2], [%1+%2], 16, %3;" ::"r"(shared), "l"(global),
               "n"(K * 512), "l"(policy)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// wait until at most `pending` (stages - 1) groups are pending (uniform: no divergence)
static_assert(kMaxStages <= 4, "cp_async_wait_all_but waits with at most 3 groups pending");
__device__ __forceinline__ void cp_async_wait_all_but(int pending) {
  switch (pending) {
    case 1: asm volatile("cp.async.wait_group 1;" ::: "memory"); break;
    case 2: asm volatile("cp.async.wait_group 2;" ::: "memory"); break;
    default: asm volatile("cp.async.wait_group 3;" ::: "memory"); break;
  }
}

// ---- staging x --------------------------------------------------------------------------------
// x goes to shared memory as int8 per (row, chunk) in row order (4 rows a word, as the weights' quads),
// in kXTerms terms, with each (row, chunk)'s scale and the sum of its integers (scale times it is the
// quantized x's sum, for the centring and the minimum). One warp stages one chunk: lane = row within it.

struct StagedX {  // views of the block's shared memory
  int8_t* q;      // [nb, kXTerms, x_slots, 32]
  int2* info;     // [nb, x_slots]: (scale's bits, qsum): x ≈ scale · (kLowSteps·hi + lo) (kXTerms = 2),
                  // scale · hi (1); qsum the sum of those integers over the chunk
};

// x rows of `chunk` at this lane's row, as loaded, and what they are finished with (finish_chunk_x): the
// gate's values, or the norm's weight. Every load goes out whatever the row (padding reads row 0), and
// values() turns them into floats (0 in padding) later: a load under `row is real`, with its conversion
// inside the branch, waited for its data before the next load went out, so staging took one memory
// latency per chunk and input rather than one in all (the SASS of 4f61cd5: 8-16 loads a warp in turn).
template <typename T, int NB>
struct RawChunkX {
  T x[NB], with[NB];
  bool real;  // not a padding row
  __device__ __forceinline__ void load(const GemvArgs& a, int chunk) {
    const int row = chunk * kChunkRows + threadIdx.x % 32;
    const int src = a.layer.xmap ? __ldg(a.layer.xmap + row) : row;
    real = src >= 0;
    const int at = real ? src : 0;
    const T* xs = static_cast<const T*>(a.in.x);
#pragma unroll
    for (int b = 0; b < NB; ++b) x[b] = xs[b * a.in.ldx + at];
    if (a.in.gate != nullptr) {
      const T* gate = static_cast<const T*>(a.in.gate);
#pragma unroll
      for (int b = 0; b < NB; ++b) with[b] = gate[b * a.in.ldx + at];
    } else if (a.in.norm.sumsq != nullptr) {
      with[0] = static_cast<const T*>(a.in.norm.weight)[at];
    }
  }
  __device__ __forceinline__ void values(const GemvArgs& a, float (&v)[NB], float (&w)[NB]) const {
#pragma unroll
    for (int b = 0; b < NB; ++b) {
      v[b] = real ? Io<T>::load(x[b]) : 0.0f;
      if (a.in.gate != nullptr) w[b] = real ? Io<T>::load(with[b]) : 0.0f;
    }
    if (a.in.gate == nullptr && a.in.norm.sumsq != nullptr) w[0] = real ? Io<T>::load(with[0]) : 0.0f;
  }
};

// The input the layer multiplies: the gated MLP's silu(gate)·up, or RMSNorm(x)·weight (inv_rms: each
// row's 1 / rms), rounded as the unfused ops round them; else x.
template <typename T, int NB>
__device__ __forceinline__ void finish_chunk_x(const GemvArgs& a, const float (&with)[NB], const float (&inv_rms)[NB],
                                               float (&v)[NB]) {
#pragma unroll
  for (int b = 0; b < NB; ++b) {
    if (a.in.gate != nullptr) v[b] = silu_times<T>(with[b], v[b]);
    else if (a.in.norm.sumsq != nullptr) v[b] = Io<T>::load(rms_normed<T>(v[b], inv_rms[b], with[0]));
  }
}

// Each row's partial sums of squares (RowNorm.sumsq), this lane's parts i = lane, lane + 32, ...: the
// first kEarlyParts of them loaded as x's are, before the ring's requests (queued behind those, they made
// the norm cost the q/k/v launch 2.7 µs instead of 0.7, H100), the rest (rows over 16,384 wide) when summed.
constexpr int kEarlyParts = 4;
template <int NB>
struct RowSquares {
  float early[NB][kEarlyParts];
  __device__ __forceinline__ void load(const RowNorm& norm) {
    const int parts = (norm.dim + kWarpCols - 1) / kWarpCols, lane = threadIdx.x % 32;
#pragma unroll
    for (int b = 0; b < NB; ++b)
#pragma unroll
      for (int k = 0; k < kEarlyParts; ++k) {
        const int i = lane + 32 * k;
        early[b][k] = i < parts ? __ldcg(norm.sumsq + b * parts + i) : 0.0f;
      }
  }
  // 1 / rms(x) of each row, the parts added in a fixed order (the same on every warp, block and call):
  // rsqrt(Σ x² / dim + eps), as the RMSNorm kernel computes it
  __device__ __forceinline__ void inv_rms(const RowNorm& norm, float (&out)[NB]) const {
    const int parts = (norm.dim + kWarpCols - 1) / kWarpCols;
#pragma unroll
    for (int b = 0; b < NB; ++b) {
      float sum = 0.0f;
#pragma unroll
      for (int k = 0; k < kEarlyParts; ++k) sum += early[b][k];
      for (int i = threadIdx.x % 32 + 32 * kEarlyParts; i < parts; i += 32) sum += __ldcg(norm.sumsq + b * parts + i);
      out[b] = rsqrtf(warp_sum(sum) / float(norm.dim) + norm.eps);
    }
  }
};

template <int NB>
__device__ __forceinline__ void store_chunk_x(const float (&v)[NB], int slot, int x_slots, const StagedX& xs) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int b = 0; b < NB; ++b) {
    // the largest |x|: non-negative floats order as their bit patterns do, so one integer reduction finds it;
    // it goes to ±127 (the CPU's int8 kernel divides where this multiplies: hi may differ by one there, and
    // lo takes the difference)
    const float amax = __uint_as_float(__reduce_max_sync(0xffffffffu, __float_as_uint(fabsf(v[b]))));
    const float scale = amax * (1.0f / 127.0f), inverse = scale > 0.0f ? __frcp_rn(scale) : 0.0f;
    const float scaled = v[b] * inverse, hi = rintf(scaled);
    int8_t* q = xs.q + (b * kXTerms * x_slots + slot) * kChunkRows + lane;
    q[0] = int8_t(hi);
    int value = int(hi);
    if constexpr (kXTerms == 2) {
      const int lo = int(rintf((scaled - hi) * kLowSteps));  // scaled − hi is exact, in [−½, ½]
      q[x_slots * kChunkRows] = int8_t(lo);
      value = value * kLowSteps + lo;
    }
    const int qsum = __reduce_add_sync(0xffffffffu, value);
    const float step = kXTerms == 2 ? scale / kLowSteps : scale;
    if (lane == 0) xs.info[b * x_slots + slot] = make_int2(__float_as_int(step), qsum);
  }
}

// Slots s = warp, warp + 8, ... hold chunk (first + s) mod chunks; loads go out `passes` at a time
// so that staging costs a few memory latencies rather than one per chunk. `while_loads_fly` runs once,
// after the warp's first loads are out.
template <typename T, int NB, typename F>
__device__ void stage_x(const GemvArgs& a, int first, const StagedX& xs, F&& while_loads_fly) {
  constexpr int passes = NB <= 2 ? 8 : NB <= 4 ? 4 : 2;
  const int warp = threadIdx.x / 32, chunks = a.layer.chunks;
  float inv_rms[NB];
#pragma unroll
  for (int b = 0; b < NB; ++b) inv_rms[b] = 1.0f;
  for (int s0 = warp; s0 < a.x_slots; s0 += passes * kWarps) {
    RawChunkX<T, NB> raw[passes];
#pragma unroll
    for (int p = 0; p < passes; ++p) {  // slots past the last load the last again (no branch: loads go out together)
      const int s = min(s0 + p * kWarps, a.x_slots - 1), chunk = first + s;  // first < chunks, s < x_slots <= chunks
      raw[p].load(a, chunk < chunks ? chunk : chunk - chunks);
    }
    if (s0 == warp) {
      RowSquares<NB> squares;
      if (a.in.norm.sumsq != nullptr) squares.load(a.in.norm);
      while_loads_fly();
      if (a.in.norm.sumsq != nullptr) squares.inv_rms(a.in.norm, inv_rms);
    }
#pragma unroll
    for (int p = 0; p < passes; ++p) {
      if (s0 + p * kWarps >= a.x_slots) break;
      float v[NB], with[NB];
      raw[p].values(a, v, with);
      finish_chunk_x<T, NB>(a, with, inv_rms, v);
      store_chunk_x<NB>(v, s0 + p * kWarps, a.x_slots, xs);
    }
  }
  if (warp >= a.x_slots) while_loads_fly();  // a warp without slots
}

// ---- one chunk ------------------------------------------------------------------------------------

__device__ __forceinline__ int dp4a(uint32_t q, uint32_t x, int acc) {  // Σ of 4 unsigned q bytes × 4 int8 x
  int d;
  asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(q), "r"(x), "r"(acc));
  return d;
}

// One chunk from this thread's ring slot (`words`: row k is word row k of its 4 columns, row
// max_bits their group's half2 (scale, min) ×4): integer dot products of q with the staged x
// terms, quad by quad (dp4a), centred exactly in integers (Σ (q − 2^(b−1))·x = Σ q·x − 2^(b−1)·Σ x);
// then in float32 acc += scale·xscale·dot + (min + 2^(b−1)·scale)·Σx (the second term restores
// the centring and the minimum with the quantized x's sum, xscale·qsum).
template <int NB, int BITS>
__device__ __forceinline__ void gemv_chunk(const uint4* words, int max_bits, int slot, int x_slots, const StagedX& xs,
                                           float (&acc)[NB][4]) {
  uint32_t w[4][BITS];
#pragma unroll
  for (int k = 0; k < BITS; ++k) {
    const uint4 v = words[k * 32];
    w[0][k] = v.x;
    w[1][k] = v.y;
    w[2][k] = v.z;
    w[3][k] = v.w;
  }
  int dot[NB][kXTerms][4] = {};
  uint4 xv[NB][kXTerms];  // staged x of quads v .. v + 3
  static_for<kQuads>([&](auto quad) {
    constexpr int v = decltype(quad)::value;
    if constexpr (v % 4 == 0) {
#pragma unroll
      for (int b = 0; b < NB; ++b)
#pragma unroll
        for (int t = 0; t < kXTerms; ++t)
          xv[b][t] = *reinterpret_cast<const uint4*>(xs.q + ((b * kXTerms + t) * x_slots + slot) * kChunkRows + 4 * v);
    }
    uint32_t q[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) q[c] = quad_bytes<BITS, v>(w[c]);
#pragma unroll
    for (int b = 0; b < NB; ++b)
#pragma unroll
      for (int t = 0; t < kXTerms; ++t) {
        const uint32_t x4 = v % 4 == 0 ? xv[b][t].x : v % 4 == 1 ? xv[b][t].y : v % 4 == 2 ? xv[b][t].z : xv[b][t].w;
#pragma unroll
        for (int c = 0; c < 4; ++c) dot[b][t][c] = dp4a(q[c], x4, dot[b][t][c]);
      }
  });
  const uint4 sm4 = words[max_bits * 32];
  const half2* sm = reinterpret_cast<const half2*>(&sm4);
  constexpr int centre = 1 << (BITS - 1);
  float scale[4], offset[4];
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    scale[c] = __low2float(sm[c]);
    offset[c] = __high2float(sm[c]) + scale[c] * float(centre);
  }
#pragma unroll
  for (int b = 0; b < NB; ++b) {
    const int2 info = xs.info[b * x_slots + slot];
    const float xsc = __int_as_float(info.x), x_sum = xsc * float(info.y);  // the quantized x's sum
    const int centring = centre * info.y;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int d = (kXTerms == 2 ? dot[b][0][c] * kLowSteps + dot[b][1][c] : dot[b][0][c]) - centring;
      acc[b][c] = fmaf(scale[c] * xsc, float(d), fmaf(offset[c], x_sum, acc[b][c]));
    }
  }
}

// A workspace slot holds kUnwritten until its block writes its partial sums there (the workspace is
// filled with it when allocated, and the block that adds the slot's sums writes it back): a NaN that
// arithmetic never makes (its NaNs are 0x7fffffff), so a slot written holds any other bit pattern.
constexpr uint32_t kUnwritten = 0xffffffffu;

__device__ __forceinline__ float load_relaxed(const float* p) {  // from L2, every time (a poll)
  float v;
  asm volatile("ld.relaxed.gpu.global.f32 %0, [%1];" : "=f"(v) : "l"(p) : "memory");
  return v;
}

// ---- the block's items -------------------------------------------------------------------------

struct Block {
  int index;        // among the layer's blocks
  int begin, end;   // items
  int first_tile, last_tile;
  int first_chunk;  // x slot 0 holds this chunk
  __device__ Block(const GemvArgs& a, int index_) : index(index_) {
    const int chunks = a.layer.chunks;
    begin = index * a.items_per_block;
    end = min(begin + a.items_per_block, tiles_of(a.layer) * chunks);
    first_tile = begin / chunks;
    last_tile = (end - 1) / chunks;
    first_chunk = begin - first_tile * chunks;  // 0 for a run of a whole tile
  }
  __device__ int slot_of(int chunk, int chunks) const {
    return chunk >= first_chunk ? chunk - first_chunk : chunk - first_chunk + chunks;
  }
  __device__ bool whole(int tile, int chunks) const { return tile * chunks >= begin && (tile + 1) * chunks <= end; }
};

// A warp's walk over its block's items, as (tile, chunk): items begin + warp, begin + warp + 8, ...
// (a warp's items of a tile come before any of its next tile's). Made from the block's tiles: no division.
struct ItemCursor {
  int tile, chunk, run_end;  // run_end: the end of this tile's run (chunks)
  int last_tile, last_end, chunks;
  __device__ ItemCursor(const Block& blk, int chunks_) : chunks(chunks_) {
    tile = blk.first_tile;
    chunk = blk.begin - tile * chunks + threadIdx.x / 32;
    last_tile = blk.last_tile;
    last_end = blk.end - last_tile * chunks;
    run_end = tile == last_tile ? last_end : chunks;
    settle();
  }
  __device__ void settle() {
    while (chunk >= run_end && tile < last_tile) {  // run_end is `chunks` but in the last tile
      ++tile;
      chunk -= chunks;
      run_end = tile == last_tile ? last_end : chunks;
    }
  }
  __device__ void next() {
    chunk += kWarps;
    settle();
  }
  __device__ bool valid() const { return chunk < run_end; }
};

// Put item `cur`'s words and scales in flight into ring slot `slot` of this thread.
__device__ __forceinline__ void request_item(const GemvArgs& a, const Block& blk, const ItemCursor& cur,
                                             const int4* meta, uint4* ring) {
  const QLayer& L = a.layer;
  const int col4 = cur.tile * 32 + threadIdx.x % 32;  // out_pad is whole tiles: every lane has columns
  const int4 m = meta[blk.slot_of(cur.chunk, L.chunks)];
  const uint4* words = reinterpret_cast<const uint4*>(L.words) + tile_major4(L.word_rows, m.x, col4);
  const int bits = min(m.y, a.out.max_bits);
  const unsigned shared = static_cast<unsigned>(__cvta_generic_to_shared(ring));
  const uint64_t policy = evict_first();
  static_for<8>([&](auto k) {  // a chunk's rows are contiguous; 2 to 8 of them
    constexpr int row = decltype(k)::value;
    if (row < kMinBits || row < bits) cp_async16_row<row>(shared, words, policy);
  });
  const uint4* scales = reinterpret_cast<const uint4*>(L.scale_min) + tile_major4(L.groups, m.z, col4);
  cp_async16(ring + a.out.max_bits * 32, scales, policy);
}

// What the output adds to x Wᵀ at (b, col): the bias and the residual (either may be absent), as loaded;
// value() adds them up, converting the residual only then (so that its load need not be waited for early).
template <typename T>
struct Addend {
  float bias;
  T residual;
  Addend() = default;
  __device__ __forceinline__ Addend(const GemvArgs& a, int b, int col) : bias(a.out.bias ? a.out.bias[col] : 0.0f) {
    if (a.out.residual) residual = static_cast<const T*>(a.out.residual)[b * a.out.ldy + col];
  }
  __device__ __forceinline__ float value(const GemvArgs& a) const {
    return a.out.residual ? bias + Io<T>::load(residual) : bias;
  }
};

// f(k, b, c, col) for each of a tile's NB × 128 outputs this thread takes (row b, column c of the tile,
// col of the layer), at step k < kTileSteps<NB> of the thread's walk over them.
template <int NB>
constexpr int kTileSteps = (NB * kWarpCols + kThreads - 1) / kThreads;
template <int NB, typename F>
__device__ __forceinline__ void for_tile_outputs(int tile, F&& f) {
#pragma unroll
  for (int k = 0; k < kTileSteps<NB>; ++k) {
    const int i = threadIdx.x + k * kThreads;
    if (i >= NB * kWarpCols) break;
    const int b = i / kWarpCols, c = i % kWarpCols;
    f(k, b, c, tile * kWarpCols + c);
  }
}

// What the output adds (bias + residual) at this thread's outputs of the block's first and last tile,
// loaded as x's loads are, before the ring's requests (the residual comes from the kernel before), so that
// the tiles' ends wait for no load of their own. Kept as loaded and added up at the tile's end: converted
// here, each load would be waited for before the ring's requests went out.
template <typename T, int NB>
struct Addends {
  Addend<T> of[kPartialSlots][kTileSteps<NB>];
  __device__ __forceinline__ void load(const GemvArgs& a, const Block& blk) {
#pragma unroll
    for (int p = 0; p < kPartialSlots; ++p)
      for_tile_outputs<NB>(p == 0 ? blk.first_tile : blk.last_tile, [&](int k, int b, int c, int col) {
        of[p][k] = Addend<T>(a, b, col < a.layer.out ? col : 0);  // past the layer's outputs: column 0, never used
      });
  }
  // the addend of output (b, col) at step k of `tile`: a tile between the first and the last loads its own
  __device__ __forceinline__ float at(const GemvArgs& a, const Block& blk, int tile, int k, int b, int col) const {
    if (tile != blk.first_tile && tile != blk.last_tile) return Addend<T>(a, b, col).value(a);
    const Addend<T> addend = tile == blk.first_tile ? of[0][k] : of[1][k];  // a select: the array stays in registers
    return addend.value(a);
  }
};

// y[b, col] = v rounded to T; → the stored value squared (the next RMSNorm's statistics)
template <typename T>
__device__ __forceinline__ float store_output(const GemvArgs& a, int b, int col, float v) {
  const T out = Io<T>::store(v);
  static_cast<T*>(a.out.y)[b * a.out.ldy + col] = out;
  return Io<T>::load(out) * Io<T>::load(out);
}

// Σ over the tile's columns of each row's stored output squared (sq: this thread's, per step k of the
// tile's NB × 128 outputs) → out.sumsq[b, tile], added in a fixed order: the next RMSNorm's statistics.
template <int NB>
__device__ void store_tile_sumsq(const GemvArgs& a, int tile, const float (&sq)[kTileSteps<NB>]) {
  __shared__ float part[kMaxBatchRows][kWarpCols / 32];  // [row][warp of the row's 4]
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int k = 0; k < kTileSteps<NB>; ++k) {
    const float sum = warp_sum(sq[k]);
    const int i = threadIdx.x - lane + k * kThreads;  // the warp's first output at step k
    if (lane == 0 && i < NB * kWarpCols) part[i / kWarpCols][i % kWarpCols / 32] = sum;
  }
  __syncthreads();
  if (threadIdx.x < NB) {
    const float* p = part[threadIdx.x];
    a.out.sumsq[threadIdx.x * tiles_of(a.layer) + tile] = (p[0] + p[1]) + (p[2] + p[3]);
  }
}

// This warp's sums of a tile into its share of red (no barrier: each warp writes its own)
template <int NB>
__device__ __forceinline__ void publish_warp_sums(const float (&acc)[NB][4], float* red) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int b = 0; b < NB; ++b)
    *reinterpret_cast<float4*>(red + (warp * NB + b) * kWarpCols + lane * 4) =
        make_float4(acc[b][0], acc[b][1], acc[b][2], acc[b][3]);
}

// The warps' sums for `tile`, published in red, → y (a tile held whole), or this block's partial sums
// into its workspace slot (a tile shared with other blocks, settled when the block's run ends:
// settle_shared_tiles).
template <typename T, int NB>
__device__ void finish_published_tile(const GemvArgs& a, const Block& blk, int tile, float* red,
                                      const Addends<T, NB>& addends) {
  const QLayer& L = a.layer;
  __syncthreads();
  const bool whole = blk.whole(tile, L.chunks);
  const int part = tile == blk.first_tile ? 0 : 1;
  float sq[kTileSteps<NB>] = {};
  for_tile_outputs<NB>(tile, [&](int k, int b, int c, int col) {
    float s = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += red[(w * NB + b) * kWarpCols + c];
    if (!whole)
      a.workspace[((size_t(blk.index) * kPartialSlots + part) * NB + b) * kWarpCols + c] = s;
    else if (col < L.out)
      sq[k] = store_output<T>(a, b, col, s + addends.at(a, blk, tile, k, b, col));
  });
  __syncthreads();  // red is free again
  if (whole && a.out.sumsq != nullptr) store_tile_sumsq<NB>(a, tile, sq);
}

template <typename T, int NB>
__device__ __forceinline__ void finish_tile(const GemvArgs& a, const Block& blk, int tile, const float (&acc)[NB][4],
                                            float* red, const Addends<T, NB>& addends) {
  publish_warp_sums<NB>(acc, red);
  finish_published_tile<T, NB>(a, blk, tile, red, addends);
}

// counter += 1 → its value before. Relaxed: it orders nothing. The partial sums need no release before
// it: the last block to count polls each of them until it is written (kUnwritten, below), so the count
// goes out right behind the block's stores instead of waiting for them to be acknowledged.
__device__ __forceinline__ int count_relaxed(int* counter) {
  int before;
  asm volatile("atom.relaxed.gpu.global.add.s32 %0, [%1], 1;" : "=r"(before) : "l"(counter) : "memory");
  return before;
}

// The blocks sharing `tile`: the first and the last to hold any of its chunks.
__device__ __forceinline__ int first_block_of(const GemvArgs& a, int tile) {
  return tile * a.layer.chunks / a.items_per_block;
}
__device__ __forceinline__ int last_block_of(const GemvArgs& a, int tile) {
  return ((tile + 1) * a.layer.chunks - 1) / a.items_per_block;
}

// The last block to count a shared tile: every sharing block's partial sums, in block order
// (deterministic), as each arrives (polled kPartialBatch at a time until none is kUnwritten; written back
// to kUnwritten once read, for the next call), + bias + residual → y; the tile's counter reset for the
// next call (graph replay). One poll is usually all: the others' stores went out before their counts.
constexpr int kPartialBatch = 16;
constexpr long long kPollLimit = 1ll << 22;  // polls: a slot never written is a bug (a trap), not a wait
template <typename T, int NB>
__device__ void add_partials(const GemvArgs& a, const Block& blk, int tile, const Addends<T, NB>& addends) {
  const int first = first_block_of(a, tile), last = last_block_of(a, tile);
  // the blocks after the first start inside the tile (their slot 0); the first holds it in slot 1 unless
  // it starts where the tile does
  const int first_part = int64_t(first) * a.items_per_block < int64_t(tile) * a.layer.chunks ? 1 : 0;
  float sq[kTileSteps<NB>] = {};
  for_tile_outputs<NB>(tile, [&](int k, int b, int c, int col) {
    const bool real = col < a.layer.out;
    float s = real ? addends.at(a, blk, tile, k, b, col) : 0.0f;
    for (int j0 = first; j0 <= last; j0 += kPartialBatch) {
      // block j's slot: kPartialSlots · NB · 128 floats past block j − 1's (the first block's maybe its second)
      float* const row = a.workspace + (size_t(j0) * kPartialSlots * NB + b) * kWarpCols + c;
      float* const first_slot = row + (j0 == first ? first_part * NB * kWarpCols : 0);
      auto slot = [&](int u) { return u == 0 ? first_slot : row + u * kPartialSlots * NB * kWarpCols; };
      float p[kPartialBatch];
      unsigned waiting = 0;
#pragma unroll
      for (int u = 0; u < kPartialBatch; ++u) {
        p[u] = 0.0f;
        if (j0 + u <= last) waiting |= 1u << u;
      }
      for (long long polls = 0; waiting != 0; ++polls) {
#pragma unroll
        for (int u = 0; u < kPartialBatch; ++u)
          if (waiting >> u & 1u) p[u] = load_relaxed(slot(u));
#pragma unroll
        for (int u = 0; u < kPartialBatch; ++u)
          if (__float_as_uint(p[u]) != kUnwritten) waiting &= ~(1u << u);
        if (polls > kPollLimit) __trap();
      }
#pragma unroll
      for (int u = 0; u < kPartialBatch; ++u) {
        s += j0 + u <= last ? p[u] : 0.0f;  // + 0 past the last: the same sum
        if (j0 + u <= last) __stcg(reinterpret_cast<unsigned*>(slot(u)), kUnwritten);
      }
    }
    if (real) sq[k] = store_output<T>(a, b, col, s);
  });
  if (threadIdx.x == 0) a.counters[tile] = 0;
  if (a.out.sumsq != nullptr) store_tile_sumsq<NB>(a, tile, sq);
}

// The block's shared tiles (its first and last at most), settled once its run is done: one fence for
// both partial sums, both counted at once (two warps), so that a run's two shared tiles cost one
// round of global memory trips at its end instead of one each, the first in the middle of the run.
template <typename T, int NB>
__device__ void settle_shared_tiles(const GemvArgs& a, const Block& blk, const Addends<T, NB>& addends) {
  __shared__ int is_last[kPartialSlots];
  const int chunks = a.layer.chunks;
  __syncthreads();  // every thread's partial sums are written before a count releases them
  if (threadIdx.x % 32 == 0 && threadIdx.x / 32 < kPartialSlots) {  // warp p counts slot p's tile
    const int p = threadIdx.x / 32, tile = p == 0 ? blk.first_tile : blk.last_tile;
    const bool shared = !blk.whole(tile, chunks) && (p == 0 || tile != blk.first_tile);
    is_last[p] = shared && count_relaxed(a.counters + tile) == last_block_of(a, tile) - first_block_of(a, tile);
  }
  __syncthreads();  // is_last is the block's
  if (!is_last[0] && !is_last[1]) return;
  if (is_last[0]) add_partials<T, NB>(a, blk, blk.first_tile, addends);
  if (is_last[0] && is_last[1]) __syncthreads();  // store_tile_sumsq's shared memory is free again
  if (is_last[1]) add_partials<T, NB>(a, blk, blk.last_tile, addends);
}

// The arguments of the layer this block works for, and its index among that layer's blocks. A routed
// launch (a mixture of experts) reads the chosen layers first: they come from the kernel before.
template <int NB>
__device__ __forceinline__ GemvArgs block_args(const GemvGroup& group, int& index) {
  if (group.route == nullptr) {
    int layer = 0;
    while (layer + 1 < group.count && int(blockIdx.x) >= group.first_block[layer + 1]) ++layer;
    index = blockIdx.x - group.first_block[layer];
    return group.layers[layer];
  }
  const int slot = blockIdx.x / group.slot_blocks;
  index = blockIdx.x - slot * group.slot_blocks;
  grid_dependency_wait();
  GemvArgs a = group.layers[min(max(int(__ldg(group.route + slot)), 0), group.count - 1)];
  a.in.x = static_cast<const char*>(a.in.x) + slot * group.x_slot_bytes;
  if (a.in.gate != nullptr) a.in.gate = static_cast<const char*>(a.in.gate) + slot * group.x_slot_bytes;
  a.out.y = static_cast<char*>(a.out.y) + slot * group.y_slot_bytes;
  a.workspace += size_t(slot) * group.slot_blocks * kPartialSlots * NB * kWarpCols;
  a.counters += slot * tiles_of(a.layer);
  return a;
}

// One row fits 4 blocks a multiprocessor (64 registers), two rows 2, more rows 1.
template <int NB>
constexpr int kMinBlocksPerMultiprocessor = NB == 1 ? 4 : NB == 2 ? 2 : 1;

template <typename T, int NB>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerMultiprocessor<NB>)
    qgemv_kernel(const __grid_constant__ GemvGroup group) {
  extern __shared__ __align__(16) unsigned char smem[];
  int index;
  const GemvArgs a = block_args<NB>(group, index);
  const QLayer& L = a.layer;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, chunks = L.chunks;
  const Block blk(a, index);
  if (blk.begin >= blk.end) return;
  const SharedLayout at(NB, a.x_slots, a.stages, a.out.max_bits);
  int4* meta = reinterpret_cast<int4*>(smem + at.meta);
  const StagedX xs{reinterpret_cast<int8_t*>(smem + at.xq), reinterpret_cast<int2*>(smem + at.xinfo)};
  const int slot_uint4s = SharedLayout::slot_bytes(a.out.max_bits) / 16;
  uint4* ring = reinterpret_cast<uint4*>(smem + at.ring) + size_t(warp) * a.stages * slot_uint4s + lane;
  float* red = reinterpret_cast<float*>(smem + at.red);

  // 1. the block's chunk metadata; 2. each warp's first chunk in flight; 3. x's loads, the ring's other
  // slots behind them, x staged. Steps 1-2 read only the layer, so under programmatic dependent launch
  // they overlap the end of the kernel before, whose output (x, the residual) is read only after
  // grid_dependency_wait.
  allow_next_kernel();
  for (int s = threadIdx.x; s < a.x_slots; s += kThreads) {
    const int chunk = blk.first_chunk + s;  // < 2 chunks
    meta[s] = __ldg(reinterpret_cast<const int4*>(L.meta) + (chunk < chunks ? chunk : chunk - chunks));
  }
  __syncthreads();
  ItemCursor ahead(blk, chunks), cur = ahead;
  auto request_slots = [&](int from, int to) {
    for (int k = from; k < to; ++k) {
      if (ahead.valid()) {
        request_item(a, blk, ahead, meta, ring + k * slot_uint4s);
        ahead.next();
      }
      cp_async_commit();
    }
  };
  request_slots(0, 1);
  grid_dependency_wait();
  // the other slots go in flight behind x's loads, so that x does not wait for them
  Addends<T, NB> addends;
  stage_x<T, NB>(a, blk.first_chunk, xs, [&] {
    addends.load(a, blk);
    request_slots(1, a.stages);
  });
  __syncthreads();

  // 4. item by item: compute the oldest chunk in flight, then request the next into its slot. A run is at
  // most a tile's chunks, so it touches one or two tiles, and no barrier comes before its end: each warp
  // computes its ceil(items / 8) wherever the boundary falls (a barrier there made it the two tiles'
  // ceils: 2 + 3 for 10 + 17 items). A warp's first-tile sums go to red when it reaches the second tile.
  float acc[NB][4];
  auto clear = [&] {
#pragma unroll
    for (int b = 0; b < NB; ++b)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[b][c] = 0.0f;
  };
  clear();
  bool published = false;  // this warp's sums of the first tile
  int ring_slot = 0;       // of chunk k: k mod stages
  for (; cur.valid(); cur.next()) {
    if (!published && cur.tile != blk.first_tile) {
      publish_warp_sums<NB>(acc, red);
      clear();
      published = true;
    }
    cp_async_wait_all_but(a.stages - 1);  // this chunk has landed: only the stages - 1 requests after it fly
    const int slot = blk.slot_of(cur.chunk, chunks);
    uint4* mine = ring + ring_slot * slot_uint4s;
    with_width(meta[slot].y, [&](auto width) {
      gemv_chunk<NB, decltype(width)::bits>(mine, a.out.max_bits, slot, a.x_slots, xs, acc);
    });
    if (ahead.valid()) {  // the slot's words are in registers: it takes the chunk stages ahead
      request_item(a, blk, ahead, meta, mine);
      ahead.next();
    }
    cp_async_commit();
    ring_slot = ring_slot + 1 == a.stages ? 0 : ring_slot + 1;
  }
  if (!published) {
    publish_warp_sums<NB>(acc, red);
    clear();
  }
  finish_published_tile<T, NB>(a, blk, blk.first_tile, red, addends);
  if (blk.last_tile != blk.first_tile) finish_tile<T, NB>(a, blk, blk.last_tile, acc, red, addends);
  asm volatile("cp.async.wait_all;");
  settle_shared_tiles<T, NB>(a, blk, addends);
}

int ceil_div(int64_t a, int64_t b) { return int((a + b - 1) / b); }

struct GemvPlan {
  int grid, items_per_block, x_slots, stages;
  size_t shared;
};

// Shared memory a block takes besides its dynamic share: the runtime's 1 KB reserve and the static arrays
// (144 bytes on sm_90: store_tile_sumsq's and settle_shared_tiles')
constexpr int kBlockSharedReserve = 1024 + 256;

struct DeviceInfo {
  int multiprocessors = 1, shared_per_multiprocessor = 0;
};

DeviceInfo current_device() {
  DeviceInfo d;
  int device = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&d.multiprocessors, cudaDevAttrMultiProcessorCount, device);
  cudaDeviceGetAttribute(&d.shared_per_multiprocessor, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device);
  return d;
}

// About `target_blocks` blocks of equal runs of items, at least one chunk per warp, at most a tile's
// chunks (so a run touches two tiles at most), and few enough chunks that a block's x fits kStageBytes
// (fit_device sizes the ring).
GemvPlan plan_gemv(const QLayer& L, int batch, int target_blocks) {
  const int64_t items = int64_t(tiles_of(L)) * L.chunks;
  const int max_slots = std::max(kWarps, kStageBytes / (batch * kStageBytesPerChunkRow));
  int grid = std::max(1, std::min(target_blocks, ceil_div(items, kWarps)));
  int per_block = ceil_div(items, grid);
  per_block = std::min(per_block, L.chunks);
  if (per_block > max_slots) per_block = max_slots;
  grid = ceil_div(items, per_block);
  per_block = ceil_div(items, grid);  // the same grid, runs as even as can be
  return GemvPlan{grid, per_block, per_block, 0, 0};  // x_slots: the run's chunks
}

// The deepest ring (kMinStages at least) that lets the blocks one multiprocessor gets fit it
// together.
void fit_device(GemvPlan& p, int batch, int target_blocks, int max_bits, const DeviceInfo& d) {
  const int blocks = std::max(1, ceil_div(target_blocks, d.multiprocessors));
  const int budget = d.shared_per_multiprocessor / blocks - kBlockSharedReserve;
  const int fixed = SharedLayout(batch, p.x_slots, 0, max_bits).total;
  const int per_stage = kWarps * SharedLayout::slot_bytes(max_bits);
  p.stages = std::max(kMinStages, std::min(kMaxStages, (budget - fixed) / per_stage));
  p.shared = SharedLayout(batch, p.x_slots, p.stages, max_bits).total;
}

template <typename T, int NB>
cudaError_t launch_gemv(const GemvGroup& g, const GemvPlan& p, cudaStream_t stream) {
  if (p.shared > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(qgemv_kernel<T, NB>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(p.shared));
    if (err != cudaSuccess) return err;
  }
  return launch_dependent(qgemv_kernel<T, NB>, dim3(p.grid), dim3(kThreads), p.shared, stream, g);
}

template <typename T>
cudaError_t launch_gemv_batch(const GemvGroup& g, const GemvPlan& p, int batch, cudaStream_t stream) {
  switch (batch) {
    case 1: return launch_gemv<T, 1>(g, p, stream);
    case 2: return launch_gemv<T, 2>(g, p, stream);
    case 3: return launch_gemv<T, 3>(g, p, stream);
    case 4: return launch_gemv<T, 4>(g, p, stream);
    case 5: return launch_gemv<T, 5>(g, p, stream);
    case 6: return launch_gemv<T, 6>(g, p, stream);
    case 7: return launch_gemv<T, 7>(g, p, stream);
    case 8: return launch_gemv<T, 8>(g, p, stream);
    default: return cudaErrorInvalidValue;
  }
}

int64_t items_of(const QLayer& L) { return int64_t(tiles_of(L)) * L.chunks; }

// Each layer's plan: its blocks a share of `target_blocks` by its items (one block at least); or,
// routed (slots > 0), every layer planned for one slot's share: the layers are alternatives, one
// of them runs each slot.
void plan_layers(const QLayer* layers, int count, int batch, int target_blocks, int slots, GemvPlan* plans) {
  int64_t total = 0;
  for (int i = 0; i < count; ++i) total += items_of(layers[i]);
  for (int i = 0; i < count; ++i) {
    const int share = slots > 0 ? std::max(1, target_blocks / slots)
                                : int(std::max<int64_t>(1, (target_blocks * items_of(layers[i]) + total / 2) / total));
    plans[i] = plan_gemv(layers[i], batch, share);
  }
}

}  // namespace

int64_t qgemv_workspace_floats(const QLayer* layers, int count, int batch, int target_blocks, int slots) {
  GemvPlan plans[kMaxGemvLayers];
  plan_layers(layers, count, batch, target_blocks, slots, plans);
  int64_t blocks = slots > 0 ? int64_t(slots) * plans[0].grid : 0;
  for (int i = 0; i < count && slots == 0; ++i) blocks += plans[i].grid;
  return blocks * kPartialSlots * batch * kWarpCols;
}

int qgemv_counters(const QLayer* layers, int count, int slots) {
  int tiles = slots > 0 ? slots * tiles_of(layers[0]) : 0;
  for (int i = 0; i < count && slots == 0; ++i) tiles += tiles_of(layers[i]);
  return tiles;
}

cudaError_t qgemv(const GemvInput& in, const QLayer* layers, const GemvOutput* outs, int count, int batch, int dtype,
                  float* workspace, int* counters, int target_blocks, const GemvRoute* route, cudaStream_t stream) {
  if (batch < 1 || batch > kMaxBatchRows || count < 1 || count > kMaxGemvLayers) return cudaErrorInvalidValue;
  const int slots = route ? route->slots : 0;
  if (route && (batch != 1 || slots < 1 || in.norm.sumsq != nullptr)) return cudaErrorInvalidValue;
  if (in.norm.sumsq != nullptr && (in.gate != nullptr || in.norm.dim < 1)) return cudaErrorInvalidValue;
  GemvPlan plans[kMaxGemvLayers];
  plan_layers(layers, count, batch, target_blocks, slots, plans);
  const DeviceInfo device = current_device();
  GemvGroup g{};
  GemvPlan launch{0, 0, 0, 0, 0};
  for (int i = 0; i < count; ++i) {
    const QLayer& L = layers[i];
    const GemvOutput& o = outs[i];
    if (L.chunks < 1 || o.max_bits < 2 || o.max_bits > 8 || (route && o.sumsq != nullptr)) return cudaErrorInvalidValue;
    if (route && (plans[i].grid != plans[0].grid || tiles_of(L) != tiles_of(layers[0]))) return cudaErrorInvalidValue;
    GemvPlan& p = plans[i];
    fit_device(p, batch, target_blocks, o.max_bits, device);
    g.layers[i] = GemvArgs{L, in, o, workspace, counters, p.items_per_block, p.x_slots, p.stages};
    g.first_block[i] = launch.grid;
    if (!route) {  // the layers side by side; routed, every slot's blocks start at the same workspace
      workspace += int64_t(p.grid) * kPartialSlots * batch * kWarpCols;
      counters += tiles_of(L);
      launch.grid += p.grid;
    }
    launch.shared = std::max(launch.shared, p.shared);
  }
  g.first_block[count] = launch.grid;
  g.count = count;
  if (route) {
    const int64_t element = dtype == 2 ? 4 : 2;
    g.route = route->experts;
    g.slot_blocks = plans[0].grid;
    g.x_slot_bytes = route->x_slot_stride * element;
    g.y_slot_bytes = outs[0].ldy * element;
    launch.grid = slots * plans[0].grid;
  }
  switch (dtype) {
    case 0: return launch_gemv_batch<half>(g, launch, batch, stream);
    case 1: return launch_gemv_batch<__nv_bfloat16>(g, launch, batch, stream);
    default: return launch_gemv_batch<float>(g, launch, batch, stream);
  }
}

}  // namespace trimtab_cuda
