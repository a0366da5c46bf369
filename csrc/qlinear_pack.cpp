// The packed layout of quantized linear layers (qlinear.h): its shape, packing from the
// canonical format, and dequantizing back to fp32.
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>

#include "qlinear.h"
#include "qlinear_unpack.h"

namespace trimtab::cpu::qlinear {
namespace {

bool is_width(int bits) { return bits == 2 || bits == 3 || bits == 4 || bits == 5 || bits == 6 || bits == 8; }

// int32 words one group takes per column in the canonical format (format.py's packed_words).
int64_t canonical_words(int64_t rows, int bits) { return (rows * bits + 31) / 32; }

// q of row r, column o of a canonical group: stream bits [r*bits, r*bits + bits) of the column,
// stream bit k being bit k % 32 of the group's word k / 32.
int canonical_value(const int32_t* group_words, int64_t out, int64_t r, int bits, int64_t o) {
  const int64_t first_bit = r * bits;
  const int64_t word = first_bit / 32;
  const int shift = static_cast<int>(first_bit % 32);
  uint64_t stream = static_cast<uint32_t>(group_words[word * out + o]);
  if (shift + bits > 32) {  // the value straddles two words; the second exists by canonical_words
    stream |= static_cast<uint64_t>(static_cast<uint32_t>(group_words[(word + 1) * out + o])) << 32;
  }
  return static_cast<int>((stream >> shift) & ((1u << bits) - 1));
}

// The planes of qlinear.h, written from q[j][i] (quad j, byte i = 4 * column + row in quad).
using Quads = uint8_t[kQuads][kQuadBytes];

void encode_nibbles(const Quads& q, uint8_t* plane) {
  for (int m = 0; m < 4; ++m) {
    for (int i = 0; i < kQuadBytes; ++i) {
      plane[m * kQuadBytes + i] = static_cast<uint8_t>((q[2 * m][i] & 15) | (q[2 * m + 1][i] & 15) << 4);
    }
  }
}

// Bits [shift, shift + 2) of each q.
void encode_two_bits(const Quads& q, int shift, uint8_t* plane) {
  for (int m = 0; m < 2; ++m) {
    for (int i = 0; i < kQuadBytes; ++i) {
      int byte = 0;
      for (int s = 0; s < 4; ++s) byte |= ((q[4 * m + s][i] >> shift) & 3) << (2 * s);
      plane[m * kQuadBytes + i] = static_cast<uint8_t>(byte);
    }
  }
}

// Bit `shift` of each q.
void encode_one_bit(const Quads& q, int shift, uint8_t* plane) {
  for (int i = 0; i < kQuadBytes; ++i) {
    int byte = 0;
    for (int j = 0; j < kQuads; ++j) byte |= ((q[j][i] >> shift) & 1) << j;
    plane[i] = static_cast<uint8_t>(byte);
  }
}

// One block (block_bytes(bits) bytes) from its q values; quad_value reads it back.
void encode_block(const Quads& q, int bits, uint8_t* block) {
  switch (bits) {
    case 2: encode_two_bits(q, 0, block); break;
    case 3: encode_two_bits(q, 0, block); encode_one_bit(q, 2, block + kAfterTwoBitPlane); break;
    case 4: encode_nibbles(q, block); break;
    case 5: encode_nibbles(q, block); encode_one_bit(q, 4, block + kAfterFourBitPlane); break;
    case 6: encode_nibbles(q, block); encode_two_bits(q, 4, block + kAfterFourBitPlane); break;
    default:  // 8
      for (int j = 0; j < kQuads; ++j) {
        for (int i = 0; i < kQuadBytes; ++i) block[j * kQuadBytes + i] = static_cast<uint8_t>(q[j][i] ^ 0x80);
      }
  }
}

// One tile of the packed layer from the canonical tensors.
void pack_tile(const Layout& layout, const int32_t* qweight, const c10::Half* scales, const c10::Half* mins,
               int64_t tile, uint8_t* out) {
  const int64_t n = layout.out_features;
  const int64_t first_column = tile * kTileColumns;
  const int64_t columns = std::min<int64_t>(kTileColumns, n - first_column);
  int64_t word_offset = 0;  // the group's first row in the canonical qweight
  for (int64_t g = 0; g < static_cast<int64_t>(layout.groups.size()); ++g) {
    const Group& group = layout.groups[g];
    const int32_t* words = qweight + word_offset * n;
    uint8_t* block = out + group.byte_offset;
    for (int64_t b = 0; b < group.blocks; ++b, block += block_bytes(group.bits)) {
      Quads q = {};  // padding rows and columns stay 0
      for (int j = 0; j < kQuads; ++j) {
        for (int64_t c = 0; c < columns; ++c) {
          for (int t = 0; t < 4; ++t) {
            const int64_t r = b * kBlockRows + 4 * j + t;
            if (r < group.rows) q[j][4 * c + t] = static_cast<uint8_t>(canonical_value(words, n, r, group.bits, first_column + c));
          }
        }
      }
      encode_block(q, group.bits, block);
    }
    // block now points at the group's scales (8 fp16) and mins (8 fp16)
    c10::Half tile_scales[2 * kTileColumns] = {};
    for (int64_t c = 0; c < columns; ++c) {
      tile_scales[c] = scales[g * n + first_column + c];
      tile_scales[kTileColumns + c] = mins[g * n + first_column + c];
    }
    std::memcpy(block, tile_scales, kScaleBytes);
    word_offset += canonical_words(group.rows, group.bits);
  }
}

// Dequantizes one tile into w_t[r * ldw + c], c < 8 (see dequantize_tiles).
void dequantize_tile(const Layout& layout, const uint8_t* tile, float* w_t, int64_t ldw) {
  for (const Group& group : layout.groups) {
    const uint8_t* block = tile + group.byte_offset;
    const c10::Half* scale_min = reinterpret_cast<const c10::Half*>(block + group.blocks * block_bytes(group.bits));
    float* w_group = w_t + group.row_offset * ldw;
#ifdef TRIMTAB_AVX2
    const __m256 scale = load8(scale_min), min = load8(scale_min + kTileColumns);
    dispatch_width(group.bits, [&](auto width) {
      constexpr int Bits = decltype(width)::value;
      const __m256i byte_mask = _mm256_set1_epi32(0xff), flip = _mm256_set1_epi8(static_cast<char>(0x80));
      for (int64_t b = 0; b < group.blocks; ++b, block += block_bytes(Bits)) {
        for_each_quad<Bits>(block, [&](auto j, __m256i q) {
          if constexpr (Bits == 8) q = _mm256_xor_si256(q, flip);
          for (int t = 0; t < 4; ++t) {
            const int64_t r = b * kBlockRows + 4 * j + t;
            if (r >= group.rows) break;
            const __m256i values = _mm256_and_si256(_mm256_srlv_epi32(q, _mm256_set1_epi32(8 * t)), byte_mask);
            _mm256_storeu_ps(w_group + r * ldw, _mm256_fmadd_ps(_mm256_cvtepi32_ps(values), scale, min));
          }
        });
      }
    });
#else
    for (int64_t r = 0; r < group.rows; ++r) {
      const uint8_t* b = block + (r / kBlockRows) * block_bytes(group.bits);
      const int j = static_cast<int>(r % kBlockRows) / 4, t = static_cast<int>(r % 4);
      for (int c = 0; c < kTileColumns; ++c) {
        const float q = static_cast<float>(quad_value(b, group.bits, j, 4 * c + t));
        w_group[r * ldw + c] = q * static_cast<float>(scale_min[c]) + static_cast<float>(scale_min[kTileColumns + c]);
      }
    }
#endif
  }
}

}  // namespace

Layout make_layout(const uint8_t* group_bits, const int32_t* group_sizes, int64_t groups, int64_t out_features) {
  TORCH_CHECK(groups > 0, "trimtab::qlinear: a layer needs at least one group");
  TORCH_CHECK(out_features > 0, "trimtab::qlinear: out_features must be positive, got ", out_features);
  Layout layout;
  layout.out_features = out_features;
  layout.tiles = (out_features + kTileColumns - 1) / kTileColumns;
  layout.groups.reserve(groups);
  for (int64_t g = 0; g < groups; ++g) {
    Group group;
    group.bits = group_bits[g];
    group.rows = group_sizes[g];
    TORCH_CHECK(is_width(group.bits), "trimtab::qlinear: group ", g, " has width ", group.bits,
                "; widths are 2, 3, 4, 5, 6 or 8");
    TORCH_CHECK(group.rows >= 1 && group.rows <= kMaxGroupRows, "trimtab::qlinear: group ", g, " has ",
                group.rows, " rows; a group has 1 to ", kMaxGroupRows);
    group.blocks = (group.rows + kBlockRows - 1) / kBlockRows;
    group.row_offset = layout.in_features;
    group.padded_offset = layout.padded_in;
    group.byte_offset = layout.tile_bytes;
    layout.in_features += group.rows;
    layout.padded_in += group.blocks * kBlockRows;
    layout.tile_bytes += group.blocks * block_bytes(group.bits) + kScaleBytes;
    layout.groups.push_back(group);
  }
  return layout;
}

void pack_canonical(const Layout& layout, const int32_t* qweight, const c10::Half* scales, const c10::Half* mins,
                    uint8_t* packed) {
  at::parallel_for(0, layout.tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      pack_tile(layout, qweight, scales, mins, tile, packed + tile * layout.tile_bytes);
    }
  });
}

void dequantize_tiles(const Layout& layout, const uint8_t* packed, int64_t tile_begin, int64_t tile_end,
                      float* w_t, int64_t ldw) {
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    dequantize_tile(layout, packed + tile * layout.tile_bytes, w_t + (tile - tile_begin) * kTileColumns, ldw);
  }
}

}  // namespace trimtab::cpu::qlinear
