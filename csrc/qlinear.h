// Quantized linear layers on the CPU: the packed layout the kernels read, and the kernels.
//
// A layer is y = x Wᵀ (+ bias) with W [out, in] stored in the canonical mixed-bit format
// (backend/quant/format.py): input rows in groups, one width in {2,3,4,5,6,8} per group,
// W[o, i] = q * scale[g, o] + min[g, o]. At load it is repacked (pack_canonical) into
// column tiles that the SIMD kernels stream through once per call. docs/CSRC.md describes
// the packed layout byte by byte; in short:
//
//   packed: uint8 [tiles, tile_bytes]; tile t holds output columns 8t .. 8t+7.
//   Within a tile, group after group (in quantized row order):
//     blocks of 32 input rows (the group is zero-padded to whole blocks), 32 * bits bytes
//     each, then 8 fp16 scales and 8 fp16 mins (32 bytes).
//   A block is 8 "quads" Q_0..Q_7 of 32 bytes: byte 4c + t of Q_j is q of row 4j + t, column
//   c; a 32-bit lane is one column's 4 consecutive rows, the unit of one int8 dot product
//   step (maddubs). Widths are stored as bit planes of 8, 4, 2 and 1 bits:
//     2 = 2-bit plane          4 = 4-bit plane            8 = bytes, stored as q ^ 0x80
//     3 = 2-bit + 1-bit plane  5 = 4-bit + 1-bit plane    6 = 4-bit + 2-bit plane
//     4-bit plane: 4 vectors, P_m = Q_2m | Q_2m+1 << 4           (nibbles)
//     2-bit plane: 2 vectors, R_m = sum_s Q_4m+s << 2s, s < 4    (its two bits of q)
//     1-bit plane: 1 vector,  S   = sum_j Q_j << j,    j < 8    (its one bit of q)
//   the low plane carries q's low bits, the second plane the high bits.
#pragma once

#include <c10/util/Half.h>

#include <cstdint>
#include <vector>

namespace trimtab::cpu::qlinear {

constexpr int64_t kTileColumns = 8;   // output columns per tile: one per 32-bit AVX2 lane
constexpr int64_t kBlockRows = 32;    // input rows per block; groups are padded to whole blocks
constexpr int64_t kQuads = 8;         // 4-row quads per block
constexpr int64_t kQuadBytes = 32;    // one quad: 8 columns x 4 rows, one byte each
constexpr int64_t kScaleBytes = 32;   // per (tile, group): 8 fp16 scales, then 8 fp16 mins
constexpr int64_t kMaxGroupRows = 65536;  // int8 sums of one group stay far inside int32

// Bytes of one block: 32 rows x 8 columns x bits / 8.
inline int64_t block_bytes(int bits) { return kQuadBytes * bits; }

struct Group {
  int bits = 0;             // 2, 3, 4, 5, 6 or 8
  int64_t rows = 0;         // input rows of the group
  int64_t blocks = 0;       // ceil(rows / 32)
  int64_t row_offset = 0;   // first row in quantized order
  int64_t padded_offset = 0;  // first row in the padded input (a multiple of 32)
  int64_t byte_offset = 0;  // where the group starts inside a tile
};

// Shapes and offsets of one packed layer, derived from its group widths and sizes.
struct Layout {
  std::vector<Group> groups;
  int64_t in_features = 0;
  int64_t out_features = 0;
  int64_t padded_in = 0;   // input rows with every group padded to whole blocks
  int64_t tiles = 0;       // ceil(out / 8)
  int64_t tile_bytes = 0;
};

// Throws c10::Error naming the problem (bad width, empty or oversized group, bad out).
Layout make_layout(const uint8_t* group_bits, const int32_t* group_sizes, int64_t groups, int64_t out_features);

// One packed layer as the kernels see it; perm and bias may be null.
struct Matrix {
  const Layout* layout = nullptr;
  const uint8_t* packed = nullptr;  // [tiles, tile_bytes]
  const int32_t* perm = nullptr;    // [in]: quantized row i is input row perm[i]
  const float* bias = nullptr;      // [out]
};

// Canonical tensors (row-major) -> packed [tiles, tile_bytes]. qweight: int32 [packed_rows, out];
// scales, mins: fp16 [groups, out].
void pack_canonical(const Layout& layout, const int32_t* qweight, const c10::Half* scales,
                    const c10::Half* mins, uint8_t* packed);

// Columns [8 * tile_begin, 8 * tile_end) of W, transposed: w_t[r * ldw + c] = W[8 * tile_begin + c, row r]
// for rows r in quantized order (unpadded, no perm); ldw >= 8 * (tile_end - tile_begin).
// Columns past out_features come out 0.
void dequantize_tiles(const Layout& layout, const uint8_t* packed, int64_t tile_begin, int64_t tile_end,
                      float* w_t, int64_t ldw);

// How the activations meet the weights.
enum class Kernel {
  Auto,     // the measured best (docs/CSRC.md): Int8 with AVX2, else Scalar or Dequant by rows
  Int8,     // activations quantized to int8 per (row, group), integer dot products (AVX2)
  Fp32,     // fp32 activations, weights converted to fp32 in registers (AVX2)
  Scalar,   // plain C++, fp32; what every kernel falls back to without AVX2
  Dequant,  // dequantize column chunks to fp32, then torch's matmul
};

// Kernel::Auto, measured on AMD EPYC (bench/qlinear_kernels.py): with AVX2 the Int8 kernel is
// fastest at every batch size tried (1 to 512 rows, ahead of torch's fp32 matmul on
// dequantized weights); without it the Scalar kernel is, up to this many rows, then Dequant.
constexpr int64_t kScalarMaxRows = 2;

// x rows as the Fp32 and Scalar kernels read them: in quantized row order (perm applied),
// each group padded with zeros to whole blocks, with each group's exact sum.
struct Fp32Activations {
  std::vector<float> x;    // [rows, padded_in]
  std::vector<float> sum;  // [rows, groups]
};

// x rows as the Int8 kernel reads them: quantized per (row, block of 32 rows): x ≈ q * scale
// with |q| <= 127, so each value is off by at most scale / 2 = max|x| / 254 over its block.
// Blocks of 32 (not whole groups) keep one outlier activation from coarsening more than 31
// others. The rounding's sum per group lets the kernel centre the weights (see int8_tile).
struct Int8Activations {
  std::vector<int8_t> q;         // [rows, padded_in]
  std::vector<float> scale;      // [rows, padded_in / 32]
  std::vector<float> sum;        // [rows, groups]: the exact fp32 sums of x (they carry the mins)
  std::vector<float> rounding;   // [rows, groups]: sum of (q * scale - x) over the group
};

// Buffers reused from call to call by callers that run many (the fused decoder).
struct Workspace {
  std::vector<Int8Activations> int8;
  std::vector<Fp32Activations> fp32;
};

// y [rows, out] = x [rows, in] (input order) · Wᵀ + bias, threaded over output tiles.
void forward(const Matrix& m, const float* x, int64_t rows, float* y, Kernel kernel);

// y_i [out_i] = W_i x + b_i for `count` matrices and one row x [in] (input order) in one
// parallel region over all their tiles. x is prepared once per distinct input layout (group
// sizes and perm). kernel: Int8, Fp32 or Scalar (without AVX2, always Scalar).
void gemv(const Matrix* matrices, float* const* outputs, int64_t count, const float* x, Kernel kernel,
          Workspace& workspace);

}  // namespace trimtab::cpu::qlinear
