// One decode step's attention core on the CPU (AVX2 + FMA): for every row b and KV head,
// scores of its G query heads against the cached keys, the position mask, a softmax and the
// weighted sum of the cached values, in one pass over the caches.
//
// Shapes (model/transformer.py's KVState): q [B, K*G, Dh] (scaled, RoPE'd), keys [B, S, K, Dh],
// values [B, K, Dh, S], key positions [B, S] (-1 = empty), query positions [B]. A query at p
// sees a key at q iff 0 <= q <= p (and p - q < window when window > 0). Slots it cannot see are
// neither read nor weighted, so a half-filled cache costs half. A row that sees nothing (a free
// slot) gets zeros.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using gemma_batch::hsum;

// exp(x) to about 1 ulp: 2^n * P(r) with r = x - n ln2 (ln2 split in two parts) and the
// minimax polynomial of the Cephes library's expf. x is clamped to [-87, 88] (-87 gives ~1e-38).
inline __m256 Exp(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

struct Dims {
  int64_t B, K, G, Dh, S, window;
  float cap;  // attention logit soft-cap (0: none)
};

// Scores of GN query heads (rows qg, stride Dh) against the key at kr: sc[j * stride + s].
template <int GN>
void Scores(const float* qg, const float* kr, int64_t Dh, float* out, int64_t stride) {
  __m256 acc[GN];
  for (int j = 0; j < GN; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t d = 0; d < Dh; d += 8) {
    const __m256 k = _mm256_loadu_ps(kr + d);
    for (int j = 0; j < GN; ++j)
      acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(qg + j * Dh + d), k, acc[j]);
  }
  for (int j = 0; j < GN; ++j) out[j * stride] = hsum(acc[j]);
}

void ScoresAny(int gn, const float* qg, const float* kr, int64_t Dh, float* out, int64_t stride) {
  switch (gn) {
    case 1: return Scores<1>(qg, kr, Dh, out, stride);
    case 2: return Scores<2>(qg, kr, Dh, out, stride);
    case 3: return Scores<3>(qg, kr, Dh, out, stride);
    default: return Scores<4>(qg, kr, Dh, out, stride);
  }
}

// Output of GN query heads: out[j, d] = sum_s p[j * Sp + s] * v[d * S + s] over s in [lo, hi)
// (lo, hi multiples of 8 within Sp; p is zero where a slot is not seen or beyond S).
template <int GN>
void Values(const float* p, int64_t Sp, const float* v, int64_t S, int64_t Dh, int64_t lo,
            int64_t hi, const float* inv, float* out) {
  const int64_t full = std::min(hi, S / 8 * 8);  // slots readable 8 at a time
  for (int64_t d = 0; d < Dh; ++d) {
    const float* vr = v + d * S;
    __m256 acc[GN];
    for (int j = 0; j < GN; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t s = lo; s < full; s += 8) {
      const __m256 x = _mm256_loadu_ps(vr + s);
      for (int j = 0; j < GN; ++j)
        acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(p + j * Sp + s), x, acc[j]);
    }
    for (int j = 0; j < GN; ++j) {
      float t = hsum(acc[j]);
      for (int64_t s = std::max(full, lo); s < std::min(hi, S); ++s) t += p[j * Sp + s] * vr[s];
      out[j * Dh + d] = t * inv[j];
    }
  }
}

void ValuesAny(int gn, const float* p, int64_t Sp, const float* v, int64_t S, int64_t Dh,
               int64_t lo, int64_t hi, const float* inv, float* out) {
  switch (gn) {
    case 1: return Values<1>(p, Sp, v, S, Dh, lo, hi, inv, out);
    case 2: return Values<2>(p, Sp, v, S, Dh, lo, hi, inv, out);
    case 3: return Values<3>(p, Sp, v, S, Dh, lo, hi, inv, out);
    default: return Values<4>(p, Sp, v, S, Dh, lo, hi, inv, out);
  }
}

// Row b, KV head h: all G query heads, 4 at a time.
void Head(const Dims& dm, const float* q, const float* keys, const float* values,
          const int32_t* kpos, int32_t qp, int64_t b, int64_t h, float* out) {
  const int64_t G = dm.G, Dh = dm.Dh, S = dm.S, Sp = (S + 7) / 8 * 8;
  const float* qh = q + (b * dm.K + h) * G * Dh;  // [G, Dh]
  float* oh = out + (b * dm.K + h) * G * Dh;
  const int32_t* kp = kpos + b * S;
  thread_local std::vector<float> buf;
  thread_local std::vector<int32_t> seen;
  buf.assign(G * Sp, 0.0f);
  seen.clear();
  for (int64_t s = 0; s < S; ++s) {
    const int32_t k = kp[s];
    if (k >= 0 && k <= qp && (dm.window <= 0 || qp - k < dm.window)) seen.push_back(int32_t(s));
  }
  if (seen.empty()) {
    std::fill(oh, oh + G * Dh, 0.0f);
    return;
  }
  // Slots [lo, hi) cover every seen one, in whole vectors.
  const int64_t lo = seen.front() / 8 * 8, hi = std::min<int64_t>(Sp, (seen.back() + 8) / 8 * 8);
  for (int64_t g0 = 0; g0 < G; g0 += 4) {
    const int gn = int(std::min<int64_t>(4, G - g0));
    float* sc = buf.data() + g0 * Sp;
    for (int32_t s : seen)
      ScoresAny(gn, qh + g0 * Dh, keys + ((b * S + s) * dm.K + h) * Dh, Dh, sc + s, Sp);
    float inv[4];
    for (int j = 0; j < gn; ++j) {
      float* r = sc + j * Sp;
      float mx = -INFINITY;
      for (int32_t s : seen) {
        if (dm.cap > 0) r[s] = std::tanh(r[s] / dm.cap) * dm.cap;
        mx = std::max(mx, r[s]);
      }
      const __m256 m = _mm256_set1_ps(mx);
      for (int64_t s = lo; s < hi; s += 8)
        _mm256_storeu_ps(r + s, Exp(_mm256_sub_ps(_mm256_loadu_ps(r + s), m)));
      // Slots not seen held 0, so now exp(-mx): back to 0.
      size_t i = 0;
      double sum = 0.0;
      for (int64_t s = lo; s < hi; ++s) {
        if (i < seen.size() && seen[i] == s) {
          sum += r[s];
          ++i;
        } else {
          r[s] = 0.0f;
        }
      }
      inv[j] = float(1.0 / sum);
    }
    ValuesAny(gn, sc, Sp, values + (b * dm.K + h) * Dh * S, S, Dh, lo, hi, inv, oh + g0 * Dh);
  }
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                           ffi::Buffer<ffi::F32> keys, ffi::Buffer<ffi::F32> values,
                           ffi::Buffer<ffi::S32> kpos, ffi::Buffer<ffi::S32> qpos,
                           ffi::ResultBuffer<ffi::F32> out, int64_t window, float cap) {
  const auto qd = q.dimensions(), kd = keys.dimensions(), vd = values.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || vd.size() != 4)
    return ffi::Error::InvalidArgument("decode_attention: q [B, H, Dh], keys [B, S, K, Dh], "
                                       "values [B, K, Dh, S] expected");
  Dims dm{qd[0], kd[2], 0, qd[2], kd[1], window, cap};
  if (dm.K <= 0 || qd[1] % dm.K != 0 || kd[0] != dm.B || kd[3] != dm.Dh || dm.Dh % 8 != 0 ||
      vd[0] != dm.B || vd[1] != dm.K || vd[2] != dm.Dh || vd[3] != dm.S ||
      kpos.element_count() != dm.B * dm.S || qpos.element_count() != dm.B)
    return ffi::Error::InvalidArgument("decode_attention: inconsistent shapes");
  dm.G = qd[1] / dm.K;
  const float *qp = q.typed_data(), *kp = keys.typed_data(), *vp = values.typed_data();
  const int32_t *pk = kpos.typed_data(), *pq = qpos.typed_data();
  float* op = out->typed_data();
  gemma_batch::ParallelFor(pool, dm.B * dm.K, [=](int64_t c) {
    const int64_t b = c / dm.K, h = c % dm.K;
    Head(dm, qp, kp, vp, pk, pq[b], b, h, op);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GemmaBatchDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("window")
                                  .Attr<float>("cap"));
