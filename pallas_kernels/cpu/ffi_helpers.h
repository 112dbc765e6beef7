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

// Runs fn(i) for i in [0, n) on the pool's threads and the calling thread, each thread taking
// the indices of its own contiguous range in order, so items laid out one after another in
// memory reach a thread as one stream that the hardware prefetchers follow from item to item
// (with ParallelFor's shared counter a thread's items are a few apart, and each one starts cold:
// SmolLM2's q4 linears took 5 % longer at 16 rows on two Zen 3 cores, 10-20 % at 1 row). A thread
// whose range is done takes the last index left in another range. n < 2^32.
template <typename F>
inline void ParallelForInRanges(ffi::ThreadPool& pool, int64_t n, const F& fn) {
  if (n <= 0) return;
  const int64_t threads = std::clamp<int64_t>(pool.num_threads(), 1, n);
  struct State {
    explicit State(int64_t threads) : ranges(new std::atomic<uint64_t>[threads]) {}
    std::unique_ptr<std::atomic<uint64_t>[]> ranges;  // per thread: first << 32 | end
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>(threads);
  for (int64_t t = 0; t < threads; ++t) {
    state->ranges[t].store(static_cast<uint64_t>(t * n / threads) << 32 | static_cast<uint64_t>((t + 1) * n / threads));
  }
  auto work = [state, threads, n, fn_ptr = &fn](int64_t thread) {
    // The first index of a range (for its owner) or its last (for the others), or -1 if none is left.
    auto take = [](std::atomic<uint64_t>& range, bool first) -> int64_t {
      uint64_t bounds = range.load(std::memory_order_relaxed);
      while (true) {
        const uint64_t begin = bounds >> 32, end = bounds & 0xFFFFFFFFu;
        if (begin >= end) return -1;
        const uint64_t rest = first ? (begin + 1) << 32 | end : begin << 32 | (end - 1);
        if (range.compare_exchange_weak(bounds, rest, std::memory_order_relaxed)) {
          return static_cast<int64_t>(first ? begin : end - 1);
        }
      }
    };
    while (true) {
      int64_t i = take(state->ranges[thread], true);
      for (int64_t t = 1; i < 0 && t < threads; ++t) i = take(state->ranges[(thread + t) % threads], false);
      if (i < 0) return;
      (*fn_ptr)(i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([work, t]() { work(t); });
  work(0);
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

inline std::string Dims(ffi::AnyBuffer::Dimensions dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

}  // namespace jpaged_cpu

#endif  // JPAGED_CPU_FFI_HELPERS_H_
