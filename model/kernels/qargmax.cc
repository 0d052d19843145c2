// Greedy decoding's next token from a block-quantized tied head (qrows.h's W [N, K]), without
// the full float32 product y = x . W^T, and always the token that product's argmax would pick.
//
// 1. Each row of x is quantized per group of G columns to small integer codes (scale s_g,
//    |x - s_g * code| <= s_g / 2), and every score y[n] is approximated with integer dot
//    products of those codes and W's own codes: AVX-512 VNNI (vpdpbusd, 16 vocabulary rows x 4
//    columns per instruction) or AVX2 (vpmaddubsw). W is read from a re-laid-out copy (`Tiles`:
//    16 vocabulary rows interleaved per 4 columns, codes + 128 as unsigned bytes).
// 2. Each approximation a[n] carries a bound b[n] >= |y[n] - a[n]|, float32 rounding of both
//    included: b[n] = sum_g A[n, g] * h_g with A[n, g] = |scale| * sum |q| + G * |offset| over
//    the group, h_g = s_g / 2 + max|x_g| * K * 2^-21. A token n with a[n] + b[n] below
//    T = max_n (a[n] - b[n]) scores below some other token, so it cannot be the argmax.
// 3. The others (the candidates: a handful per row on the 270M) are scored with qrows.h's
//    float32 kernel, the very sums qmatmul would give, and the first of their maxima is the
//    token. Rows of x that are not finite are scored in full.
// A tile's bound is first taken loosely (the tile's largest A per group): most tiles end there.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "parallel.h"
#include "qrows.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTile = 16;  // vocabulary rows per tile

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// Codes of x in [-127, 127]: vpdpbusd's u8 x s8 products accumulate exactly in int32.
constexpr int kQMax = 127;
constexpr int kPassRows = 24;  // rows of x per pass: their int32 accumulators stay in registers
#else
// Codes of x in [-63, 63]: vpmaddubsw's pair sums (at most 255 * 63 * 2) stay within int16.
constexpr int kQMax = 63;
constexpr int kPassRows = 12;  // 8 or 13: within noise on a Xeon's AVX2 build
#endif

// One pass's rows of x, quantized: codes [rows, K], and per row and group (row stride GS): the
// code sum times -128 (undoes W's +128), the scale s and the float32 sum of x (offset term).
struct Quantized {
  const int8_t* xq;
  const int32_t* corr;
  const float* s;
  const float* xsum;
};

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// a[m][0..16) = the approximate scores of tile t's 16 vocabulary rows for MB rows of x.
template <int MB>
void TileScores(const uint8_t* wt, const float* sc, const float* off, bool offsets,
                const Quantized& x, int64_t K, int64_t G, float* a) {
  const int64_t groups = K / G;
  // The float sums live in `a` (L1): in registers beside MB int32 accumulators they spilled.
  for (int m = 0; m < MB; ++m) _mm512_storeu_ps(a + m * kTile, _mm512_setzero_ps());
  for (int64_t g = 0; g < groups; ++g) {
    __m512i acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_set1_epi32(x.corr[m * groups + g]);
    for (int64_t j = 0; j < G / 4; ++j) {
      const __m512i w = _mm512_loadu_si512(wt + (g * G / 4 + j) * 64);
      for (int m = 0; m < MB; ++m) {
        int32_t x4;
        std::memcpy(&x4, x.xq + m * K + g * G + 4 * j, 4);
        acc[m] = _mm512_dpbusd_epi32(acc[m], w, _mm512_set1_epi32(x4));
      }
    }
    const __m512 s = _mm512_loadu_ps(sc + g * kTile);
    const __m512 o = offsets ? _mm512_loadu_ps(off + g * kTile) : _mm512_setzero_ps();
    for (int m = 0; m < MB; ++m) {
      const __m512 d = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[m]),
                                     _mm512_set1_ps(x.s[m * groups + g]));
      __m512 f = _mm512_fmadd_ps(d, s, _mm512_loadu_ps(a + m * kTile));
      if (offsets) f = _mm512_fmadd_ps(o, _mm512_set1_ps(x.xsum[m * groups + g]), f);
      _mm512_storeu_ps(a + m * kTile, f);
    }
  }
}
#else
template <int MB>
void TileScores(const uint8_t* wt, const float* sc, const float* off, bool offsets,
                const Quantized& x, int64_t K, int64_t G, float* a) {
  const int64_t groups = K / G;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int half = 0; half < 2; ++half) {  // vocabulary rows 0-7, then 8-15
    float* ah = a + half * 8;  // the float sums, in L1 (16 registers hold the int32 ones)
    for (int m = 0; m < MB; ++m) _mm256_storeu_ps(ah + m * kTile, _mm256_setzero_ps());
    for (int64_t g = 0; g < groups; ++g) {
      __m256i acc[MB];
      for (int m = 0; m < MB; ++m) acc[m] = _mm256_set1_epi32(x.corr[m * groups + g]);
      for (int64_t j = 0; j < G / 4; ++j) {
        const __m256i w = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(wt + (g * G / 4 + j) * 64 + half * 32));
        for (int m = 0; m < MB; ++m) {
          int32_t x4;
          std::memcpy(&x4, x.xq + m * K + g * G + 4 * j, 4);
          acc[m] = _mm256_add_epi32(
              acc[m], _mm256_madd_epi16(_mm256_maddubs_epi16(w, _mm256_set1_epi32(x4)), ones));
        }
      }
      const __m256 s = _mm256_loadu_ps(sc + g * kTile + half * 8);
      const __m256 o = offsets ? _mm256_loadu_ps(off + g * kTile + half * 8)
                               : _mm256_setzero_ps();
      for (int m = 0; m < MB; ++m) {
        const __m256 d = _mm256_mul_ps(_mm256_cvtepi32_ps(acc[m]),
                                       _mm256_set1_ps(x.s[m * groups + g]));
        __m256 f = _mm256_fmadd_ps(d, s, _mm256_loadu_ps(ah + m * kTile));
        if (offsets) f = _mm256_fmadd_ps(o, _mm256_set1_ps(x.xsum[m * groups + g]), f);
        _mm256_storeu_ps(ah + m * kTile, f);
      }
    }
  }
}
#endif

template <int... MB>
void TileScoresAny(std::integer_sequence<int, MB...>, int mb, const uint8_t* wt, const float* sc,
                   const float* off, bool offsets, const Quantized& x, int64_t K, int64_t G,
                   float* a) {
  ((mb == MB + 1 ? TileScores<MB + 1>(wt, sc, off, offsets, x, K, G, a) : void()), ...);
}

struct Candidate {
  int32_t row;  // index into the used rows
  int32_t n;    // vocabulary row
  float hi;     // a[n] + b[n]
};

// The re-laid-out head (see `QArgmaxTiles`), T = ceil(N / 16) tiles.
struct Tiles {
  const uint8_t* wt;   // [T, K / 4, 16, 4]: q + 128
  const float* sc;     // [T, GS, 16] scale
  const float* off;    // [T, GS, 16] offset
  const float* bound;  // [T, GS, 16] A = |scale| * sum |q| + G * |offset|
  const float* tile;   // [T, GS] the tile's largest A
};

// Tiles [t0, t1) for the Mu used rows: appends the candidates (tile order, so n ascending per
// row) to `out` and raises lo[i] to the best lower bound a[n] - b[n] seen.
void Scan(const Tiles& w, const Quantized& x, const float* h /* [GS, Mu] */,
          const uint8_t* bad, int64_t Mu, int64_t N, int64_t K, int64_t G, bool offsets,
          int64_t t0, int64_t t1, float* lo, std::vector<Candidate>& out) {
  const int64_t groups = K / G;
  const int64_t passes = (Mu + kPassRows - 1) / kPassRows, per = (Mu + passes - 1) / passes;
  alignas(64) float a[kPassRows * kTile];
  float loose[kPassRows], tight[kTile];
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* wt = w.wt + t * K * kTile;
    const float* sc = w.sc + t * groups * kTile;
    const float* off = w.off + t * groups * kTile;
    const float* bound = w.bound + t * groups * kTile;
    const int valid = static_cast<int>(std::min(kTile, N - t * kTile));  // the last may be short
    for (int64_t i0 = 0; i0 < Mu; i0 += per) {
      const int mb = static_cast<int>(std::min(per, Mu - i0));
      const Quantized xp{x.xq + i0 * K, x.corr + i0 * groups, x.s + i0 * groups,
                         x.xsum + i0 * groups};
      TileScoresAny(std::make_integer_sequence<int, kPassRows>(), mb, wt, sc, off, offsets, xp,
                    K, G, a);
      std::fill(loose, loose + mb, 0.0f);
      for (int64_t g = 0; g < groups; ++g) {
        const float tb = w.tile[t * groups + g];
        const float* hg = h + g * Mu + i0;
        for (int j = 0; j < mb; ++j) loose[j] += tb * hg[j];
      }
      for (int j = 0; j < mb; ++j) {
        const int64_t i = i0 + j;
        if (bad[i]) continue;
        const float* aj = a + j * kTile;
        const float amax = *std::max_element(aj, aj + valid);
        lo[i] = std::max(lo[i], amax - loose[j]);
        if (amax + loose[j] < lo[i]) continue;  // no row of this tile can win
        std::fill(tight, tight + kTile, 0.0f);
        for (int64_t g = 0; g < groups; ++g) {
          const float hg = h[g * Mu + i];
          for (int l = 0; l < kTile; ++l) tight[l] += bound[g * kTile + l] * hg;
        }
        for (int l = 0; l < valid; ++l)
          if (aj[l] + tight[l] >= lo[i])
            out.push_back({static_cast<int32_t>(i), static_cast<int32_t>(t * kTile + l),
                           aj[l] + tight[l]});
      }
    }
  }
}

// tok[m] = argmax_n (x[m] . W[n]^T) (the first index of the maximum, as jnp.argmax), computed as
// qmatmul computes that product; rows[m] == 0: not computed, tok[m] = 0.
ffi::Error QArgmax(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> wt,
                   ffi::Buffer<ffi::F32> sc, ffi::Buffer<ffi::F32> off,
                   ffi::Buffer<ffi::F32> bound, ffi::Buffer<ffi::F32> tile,
                   ffi::Buffer<ffi::S8> q, ffi::Buffer<ffi::F32> so, ffi::Buffer<ffi::S32> rows,
                   ffi::ResultBuffer<ffi::S32> tok, int64_t group, int64_t offsets) {
  const auto xd = x.dimensions();
  const auto qd = q.dimensions();
  if (xd.size() != 2 || qd.size() != 2 || xd[1] != qd[1])
    return ffi::Error::InvalidArgument("qargmax: x [M, K] and q [N, K] expected");
  const int64_t M = xd[0], K = xd[1], N = qd[0], G = group, groups = K / std::max<int64_t>(G, 1);
  const int64_t T = (N + kTile - 1) / kTile;
  if (G <= 0 || G % 8 != 0 || K % G != 0 || so.element_count() != N * groups * 2)
    return ffi::Error::InvalidArgument("qargmax: groups of a multiple of 8 dividing K expected");
  if (wt.element_count() != T * K * kTile || sc.element_count() != T * groups * kTile ||
      off.element_count() != T * groups * kTile || bound.element_count() != T * groups * kTile ||
      tile.element_count() != T * groups)
    return ffi::Error::InvalidArgument("qargmax: tiles of another shape than q's");
  if (rows.element_count() != M || tok->element_count() != M)
    return ffi::Error::InvalidArgument("qargmax: rows [M] and tok [M] expected");
  const float* xp = x.typed_data();
  const int32_t* rp = rows.typed_data();
  int32_t* out = tok->typed_data();
  std::vector<int64_t> used;
  for (int64_t m = 0; m < M; ++m) {
    out[m] = 0;
    if (rp[m] != 0) used.push_back(m);
  }
  const int64_t Mu = static_cast<int64_t>(used.size());
  if (Mu == 0) return ffi::Error::Success();

  // Quantize the used rows per group.
  std::vector<int8_t> xq(Mu * K);
  std::vector<int32_t> corr(Mu * groups);
  std::vector<float> s(Mu * groups), xsum(Mu * groups), h(groups * Mu);
  std::vector<uint8_t> bad(Mu, 0);
  const float slack = static_cast<float>(K) * 0x1p-21f;
  for (int64_t i = 0; i < Mu; ++i) {
    const float* xr = xp + used[i] * K;
    for (int64_t g = 0; g < groups; ++g) {
      float amax = 0.0f, sum = 0.0f;
      for (int64_t k = g * G; k < (g + 1) * G; ++k) {
        amax = std::max(amax, std::fabs(xr[k]));
        sum += xr[k];
      }
      if (!std::isfinite(amax) || !std::isfinite(sum)) bad[i] = 1;
      const float step = amax / kQMax, inv = amax > 0.0f ? kQMax / amax : 0.0f;
      int32_t codes = 0;
      for (int64_t k = g * G; k < (g + 1) * G; ++k) {
        const float c = std::nearbyint(xr[k] * inv);
        const int32_t ci = std::isfinite(c) ? static_cast<int32_t>(
            std::min<float>(kQMax, std::max<float>(-kQMax, c))) : 0;
        xq[i * K + k] = static_cast<int8_t>(ci);
        codes += ci;
      }
      corr[i * groups + g] = -128 * codes;
      s[i * groups + g] = step;
      xsum[i * groups + g] = sum;
      h[g * Mu + i] = 0.5f * step + amax * slack;
    }
  }
  const Quantized xqz{xq.data(), corr.data(), s.data(), xsum.data()};
  const Tiles w{wt.typed_data(), sc.typed_data(), off.typed_data(), bound.typed_data(),
                tile.typed_data()};

  // Candidates per chunk of tiles, then the rows' thresholds over all chunks.
  const int64_t chunks = std::min<int64_t>(4 * gemma_batch::Threads(pool),
                                           std::max<int64_t>(1, T / 16));
  const int64_t per = (T + chunks - 1) / chunks;
  std::vector<std::vector<Candidate>> found(chunks);
  std::vector<float> lo(chunks * Mu, -std::numeric_limits<float>::infinity());
  {
    auto* fp = found.data();
    float* lp = lo.data();
    const float* hp = h.data();
    const uint8_t* bp = bad.data();
    gemma_batch::ParallelFor(pool, chunks, [=, &w, &xqz](int64_t c) {
      Scan(w, xqz, hp, bp, Mu, N, K, G, offsets != 0, std::min(T, c * per),
           std::min(T, (c + 1) * per), lp + c * Mu, fp[c]);
    });
  }
  std::vector<float> best_lo(Mu, -std::numeric_limits<float>::infinity());
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t i = 0; i < Mu; ++i) best_lo[i] = std::max(best_lo[i], lo[c * Mu + i]);

  // The candidates still above their row's threshold (n ascending per row), and every token of a
  // row that is not finite; then their exact scores.
  std::vector<Candidate> cand;
  for (int64_t i = 0; i < Mu; ++i)
    if (bad[i])
      for (int64_t n = 0; n < N; ++n)
        cand.push_back({static_cast<int32_t>(i), static_cast<int32_t>(n), 0.0f});
  for (int64_t c = 0; c < chunks; ++c)
    for (const Candidate& k : found[c])
      if (k.hi >= best_lo[k.row]) cand.push_back(k);
  const int64_t nc = static_cast<int64_t>(cand.size());
  std::vector<float> score(nc);
  {
    const Candidate* cp = cand.data();
    float* sp = score.data();
    const int8_t* qp = q.typed_data();
    const float* sop = so.typed_data();
    const int64_t* up = used.data();
    const int64_t zero = 0;
    const int64_t pieces = std::min<int64_t>(4 * gemma_batch::Threads(pool),
                                             std::max<int64_t>(1, nc / 64));
    const int64_t each = (nc + pieces - 1) / pieces;
    gemma_batch::ParallelFor(pool, pieces, [=, &zero](int64_t c) {
      for (int64_t j = c * each; j < std::min(nc, (c + 1) * each); ++j)
        gemma_batch::Range(xp + up[cp[j].row] * K, 1, K, qp, sop, G, sp + j, &zero, 0, 0,
                           cp[j].n, cp[j].n + 1);
    });
  }
  // Per row, the first of the maxima (a NaN counts as the maximum, as in jnp.argmax); a row's
  // candidates are in ascending n (all of a row that is not finite, or the chunks' in order).
  std::vector<float> top(Mu, -std::numeric_limits<float>::infinity());
  std::vector<int32_t> arg(Mu, -1);
  for (int64_t j = 0; j < nc; ++j) {
    const int32_t i = cand[j].row, n = cand[j].n;
    const float v = score[j];
    if (arg[i] >= 0 && std::isnan(top[i])) continue;
    if (arg[i] < 0 || std::isnan(v) || v > top[i]) {
      top[i] = v;
      arg[i] = n;
    }
  }
  for (int64_t i = 0; i < Mu; ++i) out[used[i]] = std::max<int32_t>(arg[i], 0);
  return ffi::Error::Success();
}

// The head re-laid out for QArgmax (outputs as its Tiles), from q [N, K] and so [N, K / G, 2].
ffi::Error QArgmaxTiles(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> q, ffi::Buffer<ffi::F32> so,
                        ffi::ResultBuffer<ffi::U8> wt, ffi::ResultBuffer<ffi::F32> sc,
                        ffi::ResultBuffer<ffi::F32> off, ffi::ResultBuffer<ffi::F32> bound,
                        ffi::ResultBuffer<ffi::F32> tile, int64_t group) {
  const auto qd = q.dimensions();
  if (qd.size() != 2) return ffi::Error::InvalidArgument("qargmax_tiles: q [N, K] expected");
  const int64_t N = qd[0], K = qd[1], G = group;
  if (G <= 0 || G % 4 != 0 || K % G != 0 || so.element_count() != N * (K / G) * 2)
    return ffi::Error::InvalidArgument("qargmax_tiles: groups of a multiple of 4 expected");
  const int64_t groups = K / G, T = (N + kTile - 1) / kTile;
  if (wt->element_count() != T * K * kTile || tile->element_count() != T * groups)
    return ffi::Error::InvalidArgument("qargmax_tiles: outputs of the wrong shape");
  const int8_t* qp = q.typed_data();
  const float* sop = so.typed_data();
  uint8_t* wp = wt->typed_data();
  float *sp = sc->typed_data(), *op = off->typed_data(), *bp = bound->typed_data(),
        *tp = tile->typed_data();
  const int64_t chunks = std::min<int64_t>(4 * gemma_batch::Threads(pool), T);
  const int64_t per = (T + chunks - 1) / chunks;
  gemma_batch::ParallelFor(pool, chunks, [=](int64_t c) {
    for (int64_t t = c * per; t < std::min(T, (c + 1) * per); ++t) {
      uint8_t* wtt = wp + t * K * kTile;
      for (int64_t l = 0; l < kTile; ++l) {
        const int64_t n = t * kTile + l;
        for (int64_t k = 0; k < K; ++k)
          wtt[(k / 4 * kTile + l) * 4 + k % 4] =
              static_cast<uint8_t>((n < N ? qp[n * K + k] : 0) + 128);
        for (int64_t g = 0; g < groups; ++g) {
          float scale = 0.0f, offset = 0.0f, a = 0.0f;
          if (n < N) {
            scale = sop[(n * groups + g) * 2];
            offset = sop[(n * groups + g) * 2 + 1];
            int32_t mag = 0;
            for (int64_t k = g * G; k < (g + 1) * G; ++k) mag += std::abs(qp[n * K + k]);
            a = std::fabs(scale) * static_cast<float>(mag) + static_cast<float>(G) *
                std::fabs(offset);
            a *= 1.0f + 0x1p-20f;  // the products' own rounding, upward
          }
          const int64_t at = (t * groups + g) * kTile + l;
          sp[at] = scale;
          op[at] = offset;
          bp[at] = a;
        }
      }
      for (int64_t g = 0; g < groups; ++g) {
        const float* b = bp + (t * groups + g) * kTile;
        tp[t * groups + g] = *std::max_element(b, b + kTile);
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GemmaBatchQArgmax, QArgmax,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("group")
                                  .Attr<int64_t>("offsets"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GemmaBatchQArgmaxTiles, QArgmaxTiles,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("group"));
