// y[M, N] = x[M, K] . W[N, K]^T for a block-quantized W, computed on the CPU with AVX2 + FMA,
// or AVX-512 where the library is built for it (16 lanes and up to 16 rows of x per pass).
//
// W is stored as int8 codes q[N, K] with a float32 (scale, offset) pair per group of G codes
// along K: W[n, k] = scale * q[n, k] + offset (so[N, K / G, 2]). GGUF's Q8_0, Q5_0, Q4_K and
// Q6_K blocks all map onto this exactly (model/checkpoints/gguf_codes.py), so every weight the
// kernel forms in a register equals the float32 dequantized weight bit for bit; only the
// summation order differs from a float32 GEMM. A decode step with a few rows is bound by the
// bytes of its weights: this reads 1.25-1.5 bytes per weight instead of float32's 4.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "parallel.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using gemma_batch::hsum;

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
void Range(const float* x, int64_t M, int64_t K, const int8_t* q, const float* so, int64_t G,
           float* y, const int64_t* ym, int64_t ys_m, int64_t ys_n, int64_t n0, int64_t n1) {
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

// rows[m] == 0 marks a row of x whose output is not wanted (a free decode slot): it is not
// computed and its output row is zeros; the other rows' outputs do not depend on which.
ffi::Error QMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                   ffi::Buffer<ffi::F32> so, ffi::Buffer<ffi::S32> rows,
                   ffi::ResultBuffer<ffi::F32> y, int64_t group, int64_t transposed) {
  const auto xd = x.dimensions();
  const auto qd = q.dimensions();
  if (xd.size() != 2 || qd.size() != 2 || xd[1] != qd[1])
    return ffi::Error::InvalidArgument("qmatmul: x [M, K] and q [N, K] expected");
  const int64_t M = xd[0], K = xd[1], N = qd[0], G = group;
  if (G <= 0 || G % 8 != 0 || K % G != 0 || so.element_count() != N * (K / G) * 2)
    return ffi::Error::InvalidArgument("qmatmul: groups of a multiple of 8 dividing K expected");
  if (rows.element_count() != M)
    return ffi::Error::InvalidArgument("qmatmul: rows [M] expected");
  const int8_t* qp = q.typed_data();
  const float* sp = so.typed_data();
  float* yp = y->typed_data();
  const bool tr = transposed != 0;
  const int64_t ys_m = tr ? 1 : N, ys_n = tr ? M : 1;
  // The wanted rows (their output rows in `used`), gathered so the kernel reads contiguous
  // rows of x, and the others. The scratch is per calling thread and only grows (a decode
  // step makes ~75 of these calls).
  thread_local std::vector<int64_t> used, unused;
  thread_local std::vector<float> gathered;
  used.clear();
  unused.clear();
  const int32_t* rp = rows.typed_data();
  for (int64_t m = 0; m < M; ++m) (rp[m] != 0 ? used : unused).push_back(m);
  const int64_t Mu = static_cast<int64_t>(used.size());
  const float* xp = x.typed_data();
  if (Mu < M && Mu > 0) {
    // 64-byte aligned, as XLA's buffers are: rows of x split across cache lines made every
    // load of the kernel two (21 rows of 24 then took longer than all 24).
    if (static_cast<int64_t>(gathered.size()) < Mu * K + 16) gathered.resize(Mu * K + 16);
    float* dst = gathered.data();
    dst += (64 - reinterpret_cast<uintptr_t>(dst) % 64) % 64 / sizeof(float);
    for (int64_t i = 0; i < Mu; ++i)
      std::copy(xp + used[i] * K, xp + (used[i] + 1) * K, dst + i * K);
    xp = dst;
  }
  const int64_t* ym = used.data();
  const int64_t* zm = unused.data();
  const int64_t Mz = static_cast<int64_t>(unused.size());
  const int64_t chunks = std::min<int64_t>(4 * gemma_batch::Threads(pool),
                                           std::max<int64_t>(1, N / 64));
  const int64_t per = ((N + chunks - 1) / chunks + 15) / 16 * 16;
  // A helper that starts after this call returned claims no chunk, so never reads the
  // scratch pointers captured here.
  gemma_batch::ParallelFor(pool, chunks, [=](int64_t c) {
    const int64_t n0 = std::min(N, c * per), n1 = std::min(N, (c + 1) * per);
    if (Mu > 0) Range(xp, Mu, K, qp, sp, G, yp, ym, ys_m, ys_n, n0, n1);
    for (int64_t n = n0; n < n1 && Mz > 0; ++n)  // n outer: transposed, a row's zeros adjoin
      for (int64_t i = 0; i < Mz; ++i) yp[zm[i] * ys_m + n * ys_n] = 0.0f;
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GemmaBatchQMatmul, QMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("group")
                                  .Attr<int64_t>("transposed"));
