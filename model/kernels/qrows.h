// The float32 x block-quantized int8 product at the heart of qmatmul.cc, shared with
// qargmax.cc (which must reproduce its sums bit for bit).
//
// W is stored as int8 codes q[N, K] with a float32 (scale, offset) pair per group of G codes
// along K: W[n, k] = scale * q[n, k] + offset (so[N, K / G, 2]). Every weight formed in a register
// equals the float32 dequantized weight bit for bit; only the summation order differs from a
// float32 GEMM, and that order depends only on K and G (never on M, the rows of x, or on which
// columns n are asked for).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <utility>

#include "simd.h"

namespace gemma_batch {

constexpr int kNarrowRows = 8;  // rows of x per AVX2 pass (16 registers; 10 or 12: no faster)
constexpr int kWideRows = 16;   // rows of x per AVX-512 pass (32 registers; 12: no faster)

// Rows [n0, n1) of W against MB rows of x (row stride K), over columns [k0, k1) (whole groups):
// y = the products (k0 == 0) or y += them; row m of x is output row ym[m] of y, which is
// [M, N] (row stride N, column stride 1) or, transposed, [N, M] (strides 1 and M).
template <int MB>
void Rows(const float* x, int64_t K, const int8_t* q, const float* so, int64_t G, float* y,
          const int64_t* ym, int64_t ys_m, int64_t ys_n, int64_t n0, int64_t n1,
          int64_t k0, int64_t k1) {
  const int64_t groups = K / G;
  for (int64_t n = n0; n < n1; ++n) {
    __m256 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
    const int8_t* qr = q + n * K;
    const float* sr = so + n * groups * 2;
    for (int64_t g = k0 / G; g < k1 / G; ++g) {
      const __m256 s = _mm256_set1_ps(sr[2 * g]);
      const __m256 o = _mm256_set1_ps(sr[2 * g + 1]);
      for (int64_t k = g * G; k < (g + 1) * G; k += 8) {
        const __m128i q8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(qr + k));
        const __m256 w = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8)), s, o);
        for (int m = 0; m < MB; ++m)
          acc[m] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + k), w, acc[m]);
      }
    }
    for (int m = 0; m < MB; ++m) {
      float& out = y[ym[m] * ys_m + n * ys_n];
      out = (k0 == 0 ? 0.0f : out) + hsum(acc[m]);
    }
  }
}

// Rows<mb> for mb in [1, sizeof...(MB)].
template <int... MB>
void RowsAny(std::integer_sequence<int, MB...>, int mb, const float* x, int64_t K,
             const int8_t* q, const float* so, int64_t G, float* y, const int64_t* ym,
             int64_t ys_m, int64_t ys_n, int64_t n0, int64_t n1, int64_t k0, int64_t k1) {
  ((mb == MB + 1 ? Rows<MB + 1>(x, K, q, so, G, y, ym, ys_m, ys_n, n0, n1, k0, k1) : void()),
   ...);
}

#ifdef __AVX512F__
// As Rows, 16 columns at a time (G % 16 == 0), for up to 16 rows of x.
template <int MB>
void Rows16(const float* x, int64_t K, const int8_t* q, const float* so, int64_t G, float* y,
            const int64_t* ym, int64_t ys_m, int64_t ys_n, int64_t n0, int64_t n1,
            int64_t k0, int64_t k1) {
  const int64_t groups = K / G;
  for (int64_t n = n0; n < n1; ++n) {
    __m512 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
    const int8_t* qr = q + n * K;
    const float* sr = so + n * groups * 2;
    for (int64_t g = k0 / G; g < k1 / G; ++g) {
      const __m512 s = _mm512_set1_ps(sr[2 * g]);
      const __m512 o = _mm512_set1_ps(sr[2 * g + 1]);
      for (int64_t k = g * G; k < (g + 1) * G; k += 16) {
        const __m128i q8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qr + k));
        const __m512 w = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q8)), s, o);
        for (int m = 0; m < MB; ++m)
          acc[m] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * K + k), w, acc[m]);
      }
    }
    for (int m = 0; m < MB; ++m) {
      float& out = y[ym[m] * ys_m + n * ys_n];
      out = (k0 == 0 ? 0.0f : out) + _mm512_reduce_add_ps(acc[m]);
    }
  }
}

template <int... MB>
void Rows16Any(std::integer_sequence<int, MB...>, int mb, const float* x, int64_t K,
               const int8_t* q, const float* so, int64_t G, float* y, const int64_t* ym,
               int64_t ys_m, int64_t ys_n, int64_t n0, int64_t n1, int64_t k0, int64_t k1) {
  ((mb == MB + 1 ? Rows16<MB + 1>(x, K, q, so, G, y, ym, ys_m, ys_n, n0, n1, k0, k1) : void()),
   ...);
}
constexpr bool kWide = true;
#else
constexpr bool kWide = false;
#endif

// Output columns [n0, n1) for the M rows of x (output rows ym[0..M)), at most `rb` rows of x at
// a time (M split evenly); n is tiled so a tile of W stays in cache while each block of rows of x
// reads it, and K is cut into equal slices of at most 640 columns so that a block of x (8 rows:
// 20 KB, 16: 40 KB) stays in the L1 cache (K = 2048 in one pass ran at 60% of the speed of
// K = 640).
inline void Range(const float* x, int64_t M, int64_t K, const int8_t* q, const float* so,
                  int64_t G, float* y, const int64_t* ym, int64_t ys_m, int64_t ys_n, int64_t n0,
                  int64_t n1) {
  const bool wide = kWide && G % 16 == 0;
  const int64_t rb = wide ? kWideRows : kNarrowRows;
  const int64_t blocks = (M + rb - 1) / rb, per_block = (M + blocks - 1) / blocks;
  const int64_t tile = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(K, 1));
  const int64_t slices = (K + 639) / 640;
  const int64_t kb = ((K / G + slices - 1) / slices) * G;  // whole groups per slice
  for (int64_t t0 = n0; t0 < n1; t0 += tile) {
    const int64_t t1 = std::min(n1, t0 + tile);
    for (int64_t m0 = 0; m0 < M; m0 += per_block) {
      const int mb = static_cast<int>(std::min<int64_t>(per_block, M - m0));
      for (int64_t k0 = 0; k0 < K; k0 += kb) {
        const int64_t k1 = std::min(K, k0 + kb);
#ifdef __AVX512F__
        if (wide) {
          Rows16Any(std::make_integer_sequence<int, kWideRows>(), mb, x + m0 * K, K, q, so, G,
                    y, ym + m0, ys_m, ys_n, t0, t1, k0, k1);
          continue;
        }
#endif
        RowsAny(std::make_integer_sequence<int, kNarrowRows>(), mb, x + m0 * K, K, q, so, G, y,
                ym + m0, ys_m, ys_n, t0, t1, k0, k1);
      }
    }
  }
}

}  // namespace gemma_batch
