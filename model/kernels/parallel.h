// Runs chunks of work on XLA's intra-op thread pool and on the calling thread.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace gemma_batch {

// Threads worth using: the pool's, at most the machine's.
inline int64_t Threads(xla::ffi::ThreadPool& pool) {
  return std::max<int64_t>(
      1, std::min<int64_t>(pool.num_threads(), std::thread::hardware_concurrency()));
}

// Calls fn(c) once for every c in [0, chunks). Chunks are claimed from a shared counter by this
// thread and by helpers scheduled on `pool`; this thread then waits only for chunks another
// thread has claimed (so is running). A helper still queued behind other work (XLA may run
// independent custom calls at once on the same pool) is never waited for: it finds nothing left.
// Waiting on the helpers themselves can deadlock. The shared state lives on the heap, not on
// this stack, because a late helper may start after this call has returned.
template <class Fn>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t chunks, Fn fn) {
  struct Work {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto work = std::make_shared<Work>();
  auto run = [work, chunks, fn] {
    for (;;) {
      const int64_t c = work->next.fetch_add(1, std::memory_order_relaxed);
      if (c >= chunks) return;
      fn(c);
      work->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < std::min(Threads(pool), chunks); ++t) pool.Schedule([run] { run(); });
  run();
  while (work->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

}  // namespace gemma_batch
