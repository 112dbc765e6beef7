// What the CPU kernels share: running work items on XLA's FFI thread pool, and shape text
// for error messages.

#ifndef JPAGED_CPU_FFI_HELPERS_H_
#define JPAGED_CPU_FFI_HELPERS_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace jpaged_cpu {

namespace ffi = xla::ffi;

// Runs fn(i, next) for i in [0, n) on the pool's threads and the calling thread, where next is
// the index the same thread runs after i (or -1), so fn can request its data early. Threads
// that start after every index is taken return at once; the caller waits only for indices in
// flight.
template <typename F>
inline void ParallelFor(ffi::ThreadPool& pool, int64_t n, const F& fn) {
  struct Counters {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto counters = std::make_shared<Counters>();
  auto work = [counters, n, fn_ptr = &fn]() {
    int64_t i = counters->next.fetch_add(1);
    while (i < n) {
      const int64_t next = counters->next.fetch_add(1);
      (*fn_ptr)(i, next < n ? next : -1);
      counters->done.fetch_add(1, std::memory_order_release);
      i = next;
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, n - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(work)(work));
  work();
  while (counters->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

inline std::string Dims(ffi::AnyBuffer::Dimensions dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

}  // namespace jpaged_cpu

#endif  // JPAGED_CPU_FFI_HELPERS_H_
