#pragma once
// Static splitting of work over an Eigen::ThreadPoolDevice.
//
// Which thread runs a piece of work never changes what the piece computes: the kernels cut their
// work into pieces fixed by the shape alone and combine the pieces' results in a fixed order, so
// results are identical for any number of threads. This file only hands pieces out.

#include <algorithm>
#include <atomic>
#include <chrono>

#include "simd.hpp"

#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64) || defined(_M_IX86)
#include <emmintrin.h>
#endif

BNORM_BEGIN_NAMESPACE
namespace detail {

/// Number of workers worth using on `device` (the calling thread counts as one).
inline Index workers(const Eigen::ThreadPoolDevice* device) {
  return device == nullptr ? 1 : std::max<Index>(1, device->numThreads());
}

/// Tells the core that this thread is polling (x86 PAUSE, Arm YIELD), which frees its resources
/// for the other thread of the core.
inline void spin_pause() {
#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64) || defined(_M_IX86)
  _mm_pause();
#elif defined(__GNUC__) && (defined(__aarch64__) || defined(__arm__))
  __asm__ __volatile__("yield");
#endif
}

/// How long the calling thread, its own range done, polls for the workers to finish theirs
/// before it blocks. The ranges are even, so the workers are seldom far behind, and a thread that
/// blocks pays a wake-up when they finish, and its workers, idle meanwhile, may fall asleep before
/// the next call hands them work (docs/design.md, "Measurements behind the constants"). OpenMP
/// runtimes poll for far longer by default.
inline constexpr std::chrono::microseconds kPollFor{200};

/// Calls fn(worker, begin, end) on contiguous ranges that cover [0, count): one range per worker,
/// the first (worker 0) on the calling thread. Worker w always gets the same range for the same
/// count and worker number, so a second pass over the same ranges finds its data in that
/// worker's cache. Allocates nothing: the lambda handed to the pool fits std::function's small
/// buffer.
template <class Fn>
void parallel_workers(const Eigen::ThreadPoolDevice* device, Index count, const Fn& fn) {
  const Index n = std::min(workers(device), count);
  if (n <= 1) {
    if (count > 0) fn(Index{0}, Index{0}, count);
    return;
  }
  struct Job {
    const Fn* fn;
    Index count, n;
    std::atomic<Index> running;  // workers not yet done, for polling
    Eigen::Barrier done;         // for blocking
    void run(Index w) const {
      (*fn)(w, count * w / n, count * (w + 1) / n);
    }
  } job{&fn, count, n, {n - 1}, Eigen::Barrier(static_cast<unsigned>(n - 1))};
  for (Index w = 1; w < n; ++w) {
    Job* j = &job;
    device->enqueueNoNotification([j, w] {
      j->run(w);
      j->running.fetch_sub(1, std::memory_order_release);
      j->done.Notify();
    });
  }
  job.run(0);
  const auto until = std::chrono::steady_clock::now() + kPollFor;
  while (job.running.load(std::memory_order_acquire) > 0) {
    for (int i = 0; i < 8; ++i) spin_pause();
    if (std::chrono::steady_clock::now() > until) break;
  }
  job.done.Wait();  // returns at once where every worker has notified
}

/// parallel_workers for work that does not need to know its worker.
template <class Fn>
void parallel_ranges(const Eigen::ThreadPoolDevice* device, Index count, const Fn& fn) {
  parallel_workers(device, count, [&fn](Index, Index begin, Index end) { fn(begin, end); });
}

}  // namespace detail
BNORM_END_NAMESPACE
