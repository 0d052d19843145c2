// y[M, N] = x[M, K] . W[N, K]^T for a block-quantized W, computed on the CPU with AVX2 + FMA,
// or AVX-512 where the library is built for it (16 lanes and up to 16 rows of x per pass).
//
// W is stored as int8 codes q[N, K] with a float32 (scale, offset) pair per group of G codes
// along K (qrows.h). GGUF's Q8_0, Q5_0, Q4_K and Q6_K blocks all map onto this exactly
// (model/checkpoints/gguf_codes.py). A decode step with a few rows is bound by the
// bytes of its weights: this reads 1.25-1.5 bytes per weight instead of float32's 4.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "qrows.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using gemma_batch::Range;

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
