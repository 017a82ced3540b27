#pragma once
// Static splitting of work over an Eigen::ThreadPoolDevice.
//
// Which thread runs a piece of work never changes what the piece computes: the kernels cut their
// work into pieces fixed by the shape alone and combine the pieces' results in a fixed order, so
// results are identical for any number of threads. This file only hands pieces out.

#include <algorithm>

#include "simd.hpp"

namespace bnorm::detail {

/// Number of workers worth using on `device` (the calling thread counts as one).
inline Index workers(const Eigen::ThreadPoolDevice* device) {
  return device == nullptr ? 1 : std::max<Index>(1, device->numThreads());
}

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
    Eigen::Barrier done;
    void run(Index w) const {
      (*fn)(w, count * w / n, count * (w + 1) / n);
    }
  } job{&fn, count, n, Eigen::Barrier(static_cast<unsigned>(n - 1))};
  for (Index w = 1; w < n; ++w) {
    Job* j = &job;
    device->enqueueNoNotification([j, w] {
      j->run(w);
      j->done.Notify();
    });
  }
  job.run(0);
  job.done.Wait();
}

/// parallel_workers for work that does not need to know its worker.
template <class Fn>
void parallel_ranges(const Eigen::ThreadPoolDevice* device, Index count, const Fn& fn) {
  parallel_workers(device, count, [&fn](Index, Index begin, Index end) { fn(begin, end); });
}

}  // namespace bnorm::detail
