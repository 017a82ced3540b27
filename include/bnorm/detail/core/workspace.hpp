#pragma once
// Scratch memory of the kernels, kept from call to call.

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <vector>

#include "merge.hpp"

#include "../warnings_begin.hpp"

BNORM_BEGIN_NAMESPACE
namespace detail {

/// Scratch memory of the kernels, reused from call to call so that steady-state calls allocate
/// nothing. Tables read and written in packets are aligned to the packet size (and each
/// worker's part of them to a cache line): a packet across two cache lines costs two accesses.
template <class T>
struct Workspace {
  template <class V>
  using Aligned = std::vector<V, Eigen::aligned_allocator<V>>;
  std::vector<Partial> partials;  // per block and channel
  std::vector<T> coefs;           // coefficient k of channel c at [k * channels + c]
  Aligned<T> row_coefs;           // coefficients laid out for RowCoefs (per worker)
  std::vector<double> centers;    // per channel
  Aligned<T> sweeps;              // ACROSS reductions' accumulators (per worker)
  Aligned<double> sweep_sums;     // ACROSS reductions' block sums (per worker)
  std::vector<LaneIndex<T>> lane_index;  // GroupCoefs' indices
  std::vector<T> period_coefs;           // coefficients of channel p % C at p (see period_rows)
  std::vector<double> period_centers;    // centers likewise
  std::vector<double> group_stats;       // per sample and group: mean, biased variance
  std::vector<double> param_sums;        // per sample and channel: grad_bias, grad_weight terms
  std::vector<Workspace> per_worker;     // for work split into whole calls, one per worker
  std::vector<Partial> partials_out;     // per channel: statistics handed out or in whole
};

/// Values of T to give each worker for a table of n values of its own in a shared vector: n
/// rounded up to whole cache lines, and a line more, so that no two workers ever write to the
/// same line (false sharing cost two threads a third of their speed on 64 channels).
template <class T>
Index worker_slot(Index n) {
  constexpr Index line = Index{64} / Index(sizeof(T));
  return (n + line - 1) / line * line + line;
}

}  // namespace detail
BNORM_END_NAMESPACE

#include "../warnings_end.hpp"
