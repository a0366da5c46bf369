// Reading a packed block (layout in qlinear.h): its bit planes back into quads of q values,
// in scalar code (any CPU) and in AVX2 registers. qlinear_pack.cpp's encode_block writes them.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

#include "qlinear.h"
#include "vec.h"

#if defined(__GNUC__) || defined(__clang__)
#define TRIMTAB_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define TRIMTAB_ALWAYS_INLINE inline
#endif

namespace trimtab::cpu::qlinear {

// Byte offsets of a block's second plane: after the 2-bit plane (64 bytes) or the 4-bit plane (128).
constexpr int64_t kAfterTwoBitPlane = 2 * kQuadBytes;
constexpr int64_t kAfterFourBitPlane = 4 * kQuadBytes;
// 8-bit q values are stored as q ^ 0x80 (= q - 128 as a signed byte): see int8 kernel.
constexpr int kEightBitOffset = 128;

// ---- scalar ---------------------------------------------------------------------------

// The bits of quad j, byte i (= 4 * column + row in quad) held by each kind of plane.
inline int nibble_of(const uint8_t* plane, int j, int i) { return (plane[(j / 2) * kQuadBytes + i] >> (4 * (j % 2))) & 15; }
inline int two_bits_of(const uint8_t* plane, int j, int i) { return (plane[(j / 4) * kQuadBytes + i] >> (2 * (j % 4))) & 3; }
inline int one_bit_of(const uint8_t* plane, int j, int i) { return (plane[i] >> j) & 1; }

// q of quad j, byte i of a block of the given width.
inline int quad_value(const uint8_t* block, int bits, int j, int i) {
  switch (bits) {
    case 2: return two_bits_of(block, j, i);
    case 3: return two_bits_of(block, j, i) | one_bit_of(block + kAfterTwoBitPlane, j, i) << 2;
    case 4: return nibble_of(block, j, i);
    case 5: return nibble_of(block, j, i) | one_bit_of(block + kAfterFourBitPlane, j, i) << 4;
    case 6: return nibble_of(block, j, i) | two_bits_of(block + kAfterFourBitPlane, j, i) << 4;
    default: return block[j * kQuadBytes + i] ^ 0x80;  // 8 (widths are checked by make_layout)
  }
}

#ifdef TRIMTAB_AVX2

// ---- AVX2 -----------------------------------------------------------------------------

template <int N>
using Index = std::integral_constant<int, N>;

template <typename F, int... J>
TRIMTAB_ALWAYS_INLINE void unroll_each(F& f, std::integer_sequence<int, J...>) {
  (f(Index<J>{}), ...);
}

// f(Index<0>{}), ..., f(Index<N-1>{}): compile-time indices, so shift counts are immediates.
template <int N, typename F>
TRIMTAB_ALWAYS_INLINE void unroll(F&& f) {
  unroll_each(f, std::make_integer_sequence<int, N>{});
}

// v >> n for n > 0, v << -n for n < 0, in 16-bit lanes. Bits cross between the two bytes of a
// lane, but never into the bit positions the caller masks out of each byte.
template <int N>
TRIMTAB_ALWAYS_INLINE __m256i shift_bytes(__m256i v) {
  if constexpr (N > 0) return _mm256_srli_epi16(v, N);
  else if constexpr (N < 0) return _mm256_slli_epi16(v, -N);
  else return v;
}

inline __m256i load_quad(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// Calls f(Index<j>{}, Q_j) for the 8 quads of one block in order. Q_j holds q of rows 4j..4j+3
// for the 8 columns (byte 4c + t: column c, row 4j + t); 8-bit quads come as stored (q ^ 0x80).
template <int Bits, typename F>
TRIMTAB_ALWAYS_INLINE void for_each_quad(const uint8_t* block, F&& f) {
  if constexpr (Bits == 8) {
    unroll<kQuads>([&](auto j) { f(j, load_quad(block + j * kQuadBytes)); });
  } else if constexpr (Bits == 2 || Bits == 3) {
    const __m256i low2 = _mm256_set1_epi8(3), bit2 = _mm256_set1_epi8(4);
    __m256i high = _mm256_setzero_si256(), plane = _mm256_setzero_si256();
    if constexpr (Bits == 3) high = load_quad(block + kAfterTwoBitPlane);
    unroll<kQuads>([&](auto j) {
      constexpr int J = decltype(j)::value;
      if constexpr (J % 4 == 0) plane = load_quad(block + (J / 4) * kQuadBytes);
      __m256i q = _mm256_and_si256(shift_bytes<2 * (J % 4)>(plane), low2);
      if constexpr (Bits == 3) q = _mm256_or_si256(q, _mm256_and_si256(shift_bytes<J - 2>(high), bit2));
      f(j, q);
    });
  } else {  // 4, 5, 6: a nibble plane, plus a 1-bit (5) or 2-bit (6) plane for bits 4 and 5
    const __m256i low4 = _mm256_set1_epi8(15), bit4 = _mm256_set1_epi8(16), bits45 = _mm256_set1_epi8(48);
    __m256i nibbles = _mm256_setzero_si256(), high = _mm256_setzero_si256();
    if constexpr (Bits == 5) high = load_quad(block + kAfterFourBitPlane);
    unroll<kQuads>([&](auto j) {
      constexpr int J = decltype(j)::value;
      if constexpr (J % 2 == 0) nibbles = load_quad(block + (J / 2) * kQuadBytes);
      if constexpr (Bits == 6 && J % 4 == 0) high = load_quad(block + kAfterFourBitPlane + (J / 4) * kQuadBytes);
      __m256i q = _mm256_and_si256(shift_bytes<4 * (J % 2)>(nibbles), low4);
      if constexpr (Bits == 5) q = _mm256_or_si256(q, _mm256_and_si256(shift_bytes<J - 4>(high), bit4));
      if constexpr (Bits == 6) q = _mm256_or_si256(q, _mm256_and_si256(shift_bytes<2 * (J % 4) - 4>(high), bits45));
      f(j, q);
    });
  }
}

// Calls f(Index<Bits>{}) for a runtime width, so each width gets its own compiled loop.
template <typename F>
TRIMTAB_ALWAYS_INLINE void dispatch_width(int bits, F&& f) {
  switch (bits) {
    case 2: return f(Index<2>{});
    case 3: return f(Index<3>{});
    case 4: return f(Index<4>{});
    case 5: return f(Index<5>{});
    case 6: return f(Index<6>{});
    default: return f(Index<8>{});
  }
}

#endif  // TRIMTAB_AVX2

}  // namespace trimtab::cpu::qlinear
