// Quantized matrix x vector and x matrix on the packed layout (qlinear.h).
//
// Every kernel computes, per row of x, output column o and group g,
//   y[o] += scale[g, o] * sum_r q[r, o] x[r]  +  min[g, o] * sum_r x[r]
// so the group's x sum (exact, fp32) carries the mins and the dot product sees only q.
// The kernels differ in how q meets x:
//   Int8:   x quantized per (row, block of 32 rows) to int8 (largest |x| -> 127); maddubs
//           multiplies 32 q bytes by 32 x bytes and sums pairs to int16, madd sums to int32 per
//           column lane; each block's sums are scaled by its x scale, each group's by its
//           scales. Fewest instructions per weight: bandwidth-bound for decode.
//   Fp32:   q bytes converted to fp32 in registers, FMA with fp32 x: exact up to fp32 rounding.
//   Scalar: the same sums in plain C++ (any CPU).
//   Dequant: column chunks of W dequantized to fp32, then torch's matmul (large batches).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "qlinear.h"
#include "qlinear_unpack.h"

namespace trimtab::cpu::qlinear {
namespace {

// ---- activations ----------------------------------------------------------------------

// x rows gathered into quantized row order (perm) and padded per group to whole blocks,
// with each group's exact sum. row: [padded_in] (0 in padding); sums: [groups].
void gather_row(const Layout& layout, const float* x, const int32_t* perm, float* row, float* sums) {
  for (size_t g = 0; g < layout.groups.size(); ++g) {
    const Group& group = layout.groups[g];
    float* dst = row + group.padded_offset;
    if (perm != nullptr) {
      const int32_t* rows = perm + group.row_offset;
      for (int64_t r = 0; r < group.rows; ++r) dst[r] = x[rows[r]];
    } else {
      std::memcpy(dst, x + group.row_offset, group.rows * sizeof(float));
    }
    std::fill(dst + group.rows, dst + group.blocks * kBlockRows, 0.0f);
    float sum = 0.0f;
    for (int64_t r = 0; r < group.rows; ++r) sum += dst[r];
    sums[g] = sum;
  }
}

void prepare_fp32(const Layout& layout, const float* x, const int32_t* perm, int64_t rows, Fp32Activations& a) {
  const int64_t groups = static_cast<int64_t>(layout.groups.size());
  a.x.resize(rows * layout.padded_in);
  a.sum.resize(rows * groups);
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / layout.padded_in), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      gather_row(layout, x + r * layout.in_features, perm, a.x.data() + r * layout.padded_in, a.sum.data() + r * groups);
    }
  });
}

// max |x| over one block of 32 values.
float largest_magnitude(const float* x) {
#ifdef TRIMTAB_AVX2
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 m = _mm256_setzero_ps();
  for (int i = 0; i < kBlockRows; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
  const __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  const __m128 m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  return _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
#else
  float m = 0.0f;
  for (int i = 0; i < kBlockRows; ++i) m = std::max(m, std::fabs(x[i]));
  return m;
#endif
}

// q = round(x / scale) (to nearest even) for one block of 32 values; |x| <= 127 * scale.
void quantize_block(const float* x, float inverse_scale, int8_t* q) {
#ifdef TRIMTAB_AVX2
  const __m256 inv = _mm256_set1_ps(inverse_scale);
  const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x), inv));
  const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8), inv));
  const __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 16), inv));
  const __m256i d = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 24), inv));
  const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
  // packs work within 128-bit halves: this permutation puts the 32 bytes back in order.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_permutevar8x32_epi32(packed, order));
#else
  for (int i = 0; i < kBlockRows; ++i) q[i] = static_cast<int8_t>(std::nearbyint(x[i] * inverse_scale));
#endif
}

void prepare_int8(const Layout& layout, const float* x, const int32_t* perm, int64_t rows, Int8Activations& a) {
  const int64_t groups = static_cast<int64_t>(layout.groups.size());
  const int64_t blocks = layout.padded_in / kBlockRows;
  a.q.resize(rows * layout.padded_in);
  a.scale.resize(rows * blocks);
  a.sum.resize(rows * groups);
  a.rounding.resize(rows * groups);
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / layout.padded_in), [&](int64_t begin, int64_t end) {
    std::vector<float> row(layout.padded_in);
    for (int64_t r = begin; r < end; ++r) {
      gather_row(layout, x + r * layout.in_features, perm, row.data(), a.sum.data() + r * groups);
      for (int64_t g = 0; g < groups; ++g) {
        const Group& group = layout.groups[g];
        float quantized_sum = 0.0f;  // Σ q * scale over the group
        const int64_t first_block = group.padded_offset / kBlockRows;
        for (int64_t b = first_block; b < first_block + group.blocks; ++b) {
          const float* values = row.data() + b * kBlockRows;
          int8_t* q = a.q.data() + r * layout.padded_in + b * kBlockRows;
          const float scale = largest_magnitude(values) / 127.0f;
          a.scale[r * blocks + b] = scale;
          quantize_block(values, scale > 0.0f ? 1.0f / scale : 0.0f, q);
          int q_sum = 0;
          for (int i = 0; i < kBlockRows; ++i) q_sum += q[i];
          quantized_sum += static_cast<float>(q_sum) * scale;
        }
        a.rounding[r * groups + g] = quantized_sum - a.sum[r * groups + g];
      }
    }
  });
}

// ---- stores ---------------------------------------------------------------------------

// y[c] = acc[c] (+ bias[c]) for the tile's first `columns` (<= 8) columns.
void store_columns(float* y, const float* acc, const float* bias, int64_t columns) {
  for (int64_t c = 0; c < columns; ++c) y[c] = acc[c] + (bias != nullptr ? bias[c] : 0.0f);
}

const c10::Half* group_scales(const uint8_t* tile, const Group& group) {
  return reinterpret_cast<const c10::Half*>(tile + group.byte_offset + group.blocks * block_bytes(group.bits));
}

// ---- scalar ---------------------------------------------------------------------------

// One tile, one row of x: y[c] for c < columns.
void scalar_tile(const Layout& layout, const uint8_t* tile, const float* x, const float* sums, const float* bias,
                 int64_t columns, float* y) {
  float acc[kTileColumns] = {};
  for (size_t g = 0; g < layout.groups.size(); ++g) {
    const Group& group = layout.groups[g];
    const float* xg = x + group.padded_offset;
    float dot[kTileColumns] = {};
    for (int64_t b = 0; b < group.blocks; ++b) {
      const uint8_t* block = tile + group.byte_offset + b * block_bytes(group.bits);
      for (int j = 0; j < kQuads; ++j) {
        for (int c = 0; c < kTileColumns; ++c) {
          for (int t = 0; t < 4; ++t) {
            dot[c] += static_cast<float>(quad_value(block, group.bits, j, 4 * c + t)) * xg[b * kBlockRows + 4 * j + t];
          }
        }
      }
    }
    const c10::Half* scale_min = group_scales(tile, group);
    for (int c = 0; c < kTileColumns; ++c) {
      acc[c] += dot[c] * static_cast<float>(scale_min[c]) + static_cast<float>(scale_min[kTileColumns + c]) * sums[g];
    }
  }
  store_columns(y, acc, bias, columns);
}

#ifdef TRIMTAB_AVX2

// ---- AVX2: int8 activations -----------------------------------------------------------

// Weights are read once per call, front to back: asking for them 2 KiB ahead hides memory
// latency that the hardware prefetcher leaves exposed at the start of each thread's range
// (measured on AMD EPYC, 1 thread: 8 -> 11 GB/s streaming 4-bit layers; 1 and 4 KiB did less).
// Prefetches past the end of the packed tensor are harmless hints.
constexpr int64_t kPrefetchBytes = 2048;

inline __m256i broadcast_quad(const int8_t* x) {
  int32_t four;
  std::memcpy(&four, x, sizeof four);
  return _mm256_set1_epi32(four);
}

// dots[r] (8 lanes, one per column) += Σ q · x[r] over one group's blocks, for Rows rows of x.
// maddubs takes unsigned q and signed x; pair sums stay inside int16: 2 * 63 * 127 per maddubs
// for widths <= 6, and two of them added (32004) before madd widens to int32. 8-bit q is
// stored as q - 128 (signed); its magnitude (<= 128) goes unsigned and its sign onto x
// (sign_epi8), so a pair is at most 2 * 128 * 127 = 32512; the caller adds 128 * sum(x).
// Each block's int32 sums are scaled by that block's x scale into fp32. With VNNI one
// vpdpbusd per quad replaces maddubs + madd: the same exact integer sums, so the same results.
template <int Bits, int Rows>
TRIMTAB_ALWAYS_INLINE void int8_group_dot(const uint8_t* block, int64_t blocks, const int8_t* const* x,
                                          const float* const* x_scales, __m256* dots) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < blocks; ++b, block += block_bytes(Bits)) {
    for (int64_t line = 0; line < block_bytes(Bits); line += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(block + kPrefetchBytes + line), _MM_HINT_T0);
    }
    __m256i sums[Rows], pending[Rows];
    for_each_quad<Bits>(block, [&](auto j, __m256i q) {
      constexpr int J = decltype(j)::value;
      const __m256i magnitude = Bits == 8 ? _mm256_abs_epi8(q) : q;
      for (int r = 0; r < Rows; ++r) {
        __m256i xv = broadcast_quad(x[r] + b * kBlockRows + 4 * J);
        if constexpr (Bits == 8) xv = _mm256_sign_epi8(xv, q);
#ifdef TRIMTAB_VNNI
        sums[r] = dot_u8_s8_accumulate(J == 0 ? _mm256_setzero_si256() : sums[r], magnitude, xv);
        (void)pending;
        (void)ones;
#else
        const __m256i pairs = _mm256_maddubs_epi16(magnitude, xv);
        if constexpr (Bits == 8) {
          const __m256i quads = _mm256_madd_epi16(pairs, ones);
          sums[r] = J == 0 ? quads : _mm256_add_epi32(sums[r], quads);
        } else if constexpr (J % 2 == 0) {
          pending[r] = pairs;
        } else {
          const __m256i octets = _mm256_madd_epi16(_mm256_add_epi16(pending[r], pairs), ones);
          sums[r] = J == 1 ? octets : _mm256_add_epi32(sums[r], octets);
        }
#endif
      }
    });
    for (int r = 0; r < Rows; ++r) {
      dots[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r]), _mm256_broadcast_ss(x_scales[r] + b), dots[r]);
    }
  }
}

// Rows consecutive rows of x (from `row`) against one tile.
template <int Rows>
void int8_tile(const Layout& layout, const uint8_t* tile, const Int8Activations& a, int64_t row, const float* bias,
               int64_t columns, float* y, int64_t ldy) {
  const int64_t groups = static_cast<int64_t>(layout.groups.size());
  const int64_t blocks = layout.padded_in / kBlockRows;
  __m256 acc[Rows];
  for (int r = 0; r < Rows; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const Group& group = layout.groups[g];
    const int8_t* x[Rows];
    const float* x_scales[Rows];
    __m256 dots[Rows];
    for (int r = 0; r < Rows; ++r) {
      x[r] = a.q.data() + (row + r) * layout.padded_in + group.padded_offset;
      x_scales[r] = a.scale.data() + (row + r) * blocks + group.padded_offset / kBlockRows;
      dots[r] = _mm256_setzero_ps();
    }
    dispatch_width(group.bits, [&](auto width) {
      int8_group_dot<decltype(width)::value, Rows>(tile + group.byte_offset, group.blocks, x, x_scales, dots);
    });
    // With o = 128 for 8-bit groups (stored q - 128), else 0, the dot products are Σ (q - o) x̂
    // for x̂ = x rounded to int8. Then, for any centre c,
    //   s Σ q x + m Σ x = s [Σ (q - o) x̂ - (c - o) Σ (x̂ - x)] + (m + o s) Σ x - s Σ (q - c)(x̂ - x)
    // and the kernel drops only the last term: the error is that of weights centred on
    // c = (2^bits - 1) / 2, |q - c| <= c, half what uncentred unsigned q would give.
    const c10::Half* scale_min = group_scales(tile, group);
    const __m256 scale = load8(scale_min);
    const float offset = group.bits == 8 ? kEightBitOffset : 0.0f;
    const float centre = static_cast<float>((1 << group.bits) - 1) / 2.0f;
    const __m256 min = _mm256_fmadd_ps(scale, _mm256_set1_ps(offset), load8(scale_min + kTileColumns));
    for (int r = 0; r < Rows; ++r) {
      const int64_t at = (row + r) * groups + g;
      const __m256 centred = _mm256_sub_ps(dots[r], _mm256_set1_ps((centre - offset) * a.rounding[at]));
      acc[r] = _mm256_fmadd_ps(centred, scale, acc[r]);
      acc[r] = _mm256_fmadd_ps(min, _mm256_set1_ps(a.sum[at]), acc[r]);
    }
  }
  for (int r = 0; r < Rows; ++r) {
    alignas(32) float out[kTileColumns];
    _mm256_store_ps(out, acc[r]);
    store_columns(y + r * ldy, out, bias, columns);
  }
}

// ---- AVX2: fp32 activations -----------------------------------------------------------

// Σ q · x over one group's blocks, per column lane. Four accumulators (one per row of a quad)
// keep four FMA chains in flight.
template <int Bits>
TRIMTAB_ALWAYS_INLINE __m256 fp32_group_dot(const uint8_t* block, int64_t blocks, const float* x) {
  const __m256i byte = _mm256_set1_epi32(0xff), flip = _mm256_set1_epi8(static_cast<char>(0x80));
  __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  for (int64_t b = 0; b < blocks; ++b, block += block_bytes(Bits)) {
    for_each_quad<Bits>(block, [&](auto j, __m256i q) {
      if constexpr (Bits == 8) q = _mm256_xor_si256(q, flip);  // back to unsigned q
      const float* xq = x + b * kBlockRows + 4 * decltype(j)::value;
      const __m256 q0 = _mm256_cvtepi32_ps(_mm256_and_si256(q, byte));
      const __m256 q1 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(q, 8), byte));
      const __m256 q2 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(q, 16), byte));
      const __m256 q3 = _mm256_cvtepi32_ps(_mm256_srli_epi32(q, 24));
      acc0 = _mm256_fmadd_ps(q0, _mm256_broadcast_ss(xq), acc0);
      acc1 = _mm256_fmadd_ps(q1, _mm256_broadcast_ss(xq + 1), acc1);
      acc2 = _mm256_fmadd_ps(q2, _mm256_broadcast_ss(xq + 2), acc2);
      acc3 = _mm256_fmadd_ps(q3, _mm256_broadcast_ss(xq + 3), acc3);
    });
  }
  return _mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3));
}

// One row of x (padded, quantized order) against one tile.
void fp32_tile(const Layout& layout, const uint8_t* tile, const float* x, const float* sums, const float* bias,
               int64_t columns, float* y) {
  __m256 acc = _mm256_setzero_ps();
  for (size_t g = 0; g < layout.groups.size(); ++g) {
    const Group& group = layout.groups[g];
    __m256 dot = _mm256_setzero_ps();
    dispatch_width(group.bits, [&](auto width) {
      dot = fp32_group_dot<decltype(width)::value>(tile + group.byte_offset, group.blocks, x + group.padded_offset);
    });
    const c10::Half* scale_min = group_scales(tile, group);
    acc = _mm256_fmadd_ps(dot, load8(scale_min), acc);
    acc = _mm256_fmadd_ps(load8(scale_min + kTileColumns), _mm256_set1_ps(sums[g]), acc);
  }
  alignas(32) float out[kTileColumns];
  _mm256_store_ps(out, acc);
  store_columns(y, out, bias, columns);
}

#endif  // TRIMTAB_AVX2

// ---- threading ------------------------------------------------------------------------

// Tiles per task so that a task holds at least ~32K weight x row products: small layers stay
// on one thread, and a decode GEMV of 576 x 192 still splits across two.
int64_t tiles_per_task(int64_t padded_in, int64_t rows) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, padded_in * kTileColumns * rows));
}

int64_t tile_columns(const Layout& layout, int64_t tile) {
  return std::min<int64_t>(kTileColumns, layout.out_features - tile * kTileColumns);
}

const float* tile_bias(const Matrix& m, int64_t tile) {
  return m.bias != nullptr ? m.bias + tile * kTileColumns : nullptr;
}

// Int8 activations of one chunk of rows stay within this many bytes (half of a 512 KiB L2),
// so that every tile of the weights meets them in cache; the weights are read once per chunk.
constexpr int64_t kInt8ChunkBytes = 256 * 1024;

// Int8 kernel over several rows: rows in L2-sized chunks; within a chunk each tile takes the
// rows four at a time, so its weights are unpacked once per four rows while they sit in L1.
void forward_int8(const Matrix& m, const float* x, int64_t rows, float* y) {
#ifdef TRIMTAB_AVX2
  const Layout& layout = *m.layout;
  Int8Activations a;
  prepare_int8(layout, x, m.perm, rows, a);
  const int64_t n = layout.out_features;
  const int64_t chunk = std::max<int64_t>(4, kInt8ChunkBytes / layout.padded_in / 4 * 4);
  for (int64_t first = 0; first < rows; first += chunk) {
    const int64_t last = std::min(rows, first + chunk);
    at::parallel_for(0, layout.tiles, tiles_per_task(layout.padded_in, last - first), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const uint8_t* tile = m.packed + t * layout.tile_bytes;
        const int64_t columns = tile_columns(layout, t);
        float* y_tile = y + t * kTileColumns;
        int64_t r = first;
        for (; r + 4 <= last; r += 4) int8_tile<4>(layout, tile, a, r, tile_bias(m, t), columns, y_tile + r * n, n);
        switch (last - r) {
          case 3: int8_tile<3>(layout, tile, a, r, tile_bias(m, t), columns, y_tile + r * n, n); break;
          case 2: int8_tile<2>(layout, tile, a, r, tile_bias(m, t), columns, y_tile + r * n, n); break;
          case 1: int8_tile<1>(layout, tile, a, r, tile_bias(m, t), columns, y_tile + r * n, n); break;
          default: break;
        }
      }
    });
  }
#else
  TORCH_CHECK(false, "trimtab::qlinear: the int8 kernel needs AVX2");
#endif
}

// The Fp32 kernel (AVX2) or the Scalar one, row by row.
void forward_fp32(const Matrix& m, const float* x, int64_t rows, float* y, bool scalar) {
  const Layout& layout = *m.layout;
  const int64_t groups = static_cast<int64_t>(layout.groups.size());
  Fp32Activations a;
  prepare_fp32(layout, x, m.perm, rows, a);
  const int64_t n = layout.out_features;
  at::parallel_for(0, layout.tiles, tiles_per_task(layout.padded_in, rows), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const uint8_t* tile = m.packed + t * layout.tile_bytes;
      for (int64_t r = 0; r < rows; ++r) {
        const float* xr = a.x.data() + r * layout.padded_in;
        const float* sums = a.sum.data() + r * groups;
        float* y_row = y + r * n + t * kTileColumns;
#ifdef TRIMTAB_AVX2
        if (!scalar) {
          fp32_tile(layout, tile, xr, sums, tile_bias(m, t), tile_columns(layout, t), y_row);
          continue;
        }
#endif
        scalar_tile(layout, tile, xr, sums, tile_bias(m, t), tile_columns(layout, t), y_row);
      }
    }
  });
}

// Do two matrices read x the same way (same groups, same perm)?
bool same_input(const Matrix& a, const Matrix& b) {
  const Layout &la = *a.layout, &lb = *b.layout;
  if (la.groups.size() != lb.groups.size() || (a.perm == nullptr) != (b.perm == nullptr)) return false;
  for (size_t g = 0; g < la.groups.size(); ++g) {
    if (la.groups[g].rows != lb.groups[g].rows) return false;
  }
  return a.perm == b.perm || std::equal(a.perm, a.perm + la.in_features, b.perm);
}

// Column chunks of W dequantized to fp32 (in L2-sized pieces), multiplied by torch's matmul.
void forward_dequant(const Matrix& m, const float* x, int64_t rows, float* y) {
  const Layout& layout = *m.layout;
  const int64_t in = layout.in_features, n = layout.out_features;
  const auto options = at::TensorOptions().dtype(at::kFloat);
  at::Tensor xq = at::from_blob(const_cast<float*>(x), {rows, in}, options);
  if (m.perm != nullptr) {  // quantized row order
    at::Tensor perm = at::from_blob(const_cast<int32_t*>(m.perm), {in}, at::TensorOptions().dtype(at::kInt));
    xq = xq.index_select(1, perm);
  }
  at::Tensor y_all = at::from_blob(y, {rows, n}, options);
  constexpr int64_t kChunkFloats = 256 * 1024;  // 1 MiB of fp32 weights per chunk
  const int64_t chunk_tiles = std::max<int64_t>(1, kChunkFloats / (in * kTileColumns));
  at::Tensor w_t = at::empty({in, chunk_tiles * kTileColumns}, options);
  for (int64_t first = 0; first < layout.tiles; first += chunk_tiles) {
    const int64_t last = std::min(layout.tiles, first + chunk_tiles);
    const int64_t ldw = chunk_tiles * kTileColumns;
    at::parallel_for(first, last, 1, [&](int64_t begin, int64_t end) {
      dequantize_tiles(layout, m.packed, begin, end, w_t.data_ptr<float>() + (begin - first) * kTileColumns, ldw);
    });
    const int64_t column = first * kTileColumns;
    const int64_t columns = std::min(n, last * kTileColumns) - column;
    at::Tensor y_chunk = y_all.narrow(1, column, columns);
    at::mm_out(y_chunk, xq, w_t.narrow(1, 0, columns));
  }
  if (m.bias != nullptr) y_all.add_(at::from_blob(const_cast<float*>(m.bias), {n}, options));
}

}  // namespace

void forward(const Matrix& m, const float* x, int64_t rows, float* y, Kernel kernel) {
#ifdef TRIMTAB_AVX2
  if (kernel == Kernel::Auto) kernel = Kernel::Int8;
#else
  if (kernel == Kernel::Auto) kernel = rows <= kScalarMaxRows ? Kernel::Scalar : Kernel::Dequant;
  if (kernel == Kernel::Int8 || kernel == Kernel::Fp32) kernel = Kernel::Scalar;
#endif
  if (rows == 1 && kernel != Kernel::Dequant) {
    Workspace workspace;
    return gemv(&m, &y, 1, x, kernel, workspace);
  }
  switch (kernel) {
    case Kernel::Int8: return forward_int8(m, x, rows, y);
    case Kernel::Dequant: return forward_dequant(m, x, rows, y);
    default: return forward_fp32(m, x, rows, y, kernel == Kernel::Scalar);
  }
}

void gemv(const Matrix* matrices, float* const* outputs, int64_t count, const float* x, Kernel kernel,
          Workspace& workspace) {
#ifdef TRIMTAB_AVX2
  const bool int8 = kernel == Kernel::Int8 || kernel == Kernel::Auto;
  const bool scalar = kernel == Kernel::Scalar;
#else
  const bool int8 = false, scalar = true;
#endif
  TORCH_CHECK(kernel != Kernel::Dequant, "trimtab::qlinear: gemv has no dequant kernel");
  // One prepared x per distinct input layout; input[i] names matrix i's.
  std::vector<int64_t> input(count);
  int64_t inputs = 0;
  for (int64_t i = 0; i < count; ++i) {
    input[i] = inputs;
    for (int64_t j = 0; j < i; ++j) {
      if (same_input(matrices[i], matrices[j])) {
        input[i] = input[j];
        break;
      }
    }
    if (input[i] == inputs) {
      const Matrix& m = matrices[i];
      if (int8) {
        if (static_cast<int64_t>(workspace.int8.size()) <= inputs) workspace.int8.resize(inputs + 1);
        prepare_int8(*m.layout, x, m.perm, 1, workspace.int8[inputs]);
      } else {
        if (static_cast<int64_t>(workspace.fp32.size()) <= inputs) workspace.fp32.resize(inputs + 1);
        prepare_fp32(*m.layout, x, m.perm, 1, workspace.fp32[inputs]);
      }
      ++inputs;
    }
  }
  // All matrices' tiles as one range: tile k of the range is tile k - first[i] of matrix i.
  std::vector<int64_t> first(count + 1, 0);
  int64_t padded_in = 1;
  for (int64_t i = 0; i < count; ++i) {
    first[i + 1] = first[i] + matrices[i].layout->tiles;
    padded_in = std::max(padded_in, matrices[i].layout->padded_in);
  }
  at::parallel_for(0, first[count], tiles_per_task(padded_in, 1), [&](int64_t begin, int64_t end) {
    int64_t i = 0;
    for (int64_t k = begin; k < end; ++k) {
      while (k >= first[i + 1]) ++i;
      const Matrix& m = matrices[i];
      const Layout& layout = *m.layout;
      const int64_t t = k - first[i];
      const uint8_t* tile = m.packed + t * layout.tile_bytes;
      float* y = outputs[i] + t * kTileColumns;
#ifdef TRIMTAB_AVX2
      if (int8) {
        int8_tile<1>(layout, tile, workspace.int8[input[i]], 0, tile_bias(m, t), tile_columns(layout, t), y, 0);
        continue;
      }
#endif
      const Fp32Activations& a = workspace.fp32[input[i]];
#ifdef TRIMTAB_AVX2
      if (!scalar) {
        fp32_tile(layout, tile, a.x.data(), a.sum.data(), tile_bias(m, t), tile_columns(layout, t), y);
        continue;
      }
#endif
      scalar_tile(layout, tile, a.x.data(), a.sum.data(), tile_bias(m, t), tile_columns(layout, t), y);
    }
  });
}

}  // namespace trimtab::cpu::qlinear
