#pragma once
// Batch normalization whose statistics are merged elsewhere: the kernel core's three steps one by
// one, for a batch split over processes (SyncBatchNorm, or a framework with its own
// communication). Each shard reduces its values to per-channel moments (step 1); the shards'
// moments are merged, in an order every process shares (step 2); each shard is normalized with
// the merged moments (step 3). Backward likewise, with the gradient sums. Given the same merged
// totals, every shard's results equal, bit for bit, what those totals give on any thread count.

#include <algorithm>
#include <string>

#include "detail/isa.hpp"
#include "functional.hpp"

BNORM_BEGIN_NAMESPACE
namespace functional {

/// One channel's moments over some values: their count, mean and sum of squared deviations. The
/// mean is mean_base + mean_rest, two doubles: a double alone holds a mean 1e8 times the spread
/// to only 1e-8 of the spread, and merging such means would lose the variance.
struct Moments {
  double count = 0;
  double mean_base = 0;
  double mean_rest = 0;
  double m2 = 0;  ///< sum of squared deviations from the mean

  double mean() const { return mean_base + mean_rest; }
  double variance() const { return count > 0 ? m2 / count : 0.0; }  ///< biased
};

/// One channel's backward sums over some values: sum(dy) and sum(dy * (x - mean)), with the mean
/// the forward normalized with (the merged one), and the count of values.
struct BackwardSums {
  double count = 0;
  double dy = 0;
  double dy_centered = 0;
};

/// The moments of the union of two disjoint sets (Chan et al.). The result's bits depend on the
/// order of the merges: merge the shards in one order everywhere (rank order, say).
inline Moments merge(const Moments& a, const Moments& b);
/// The sums of the union of two disjoint sets.
inline BackwardSums merge(const BackwardSums& a, const BackwardSums& b) {
  return {a.count + b.count, a.dy + b.dy, a.dy_centered + b.dy_centered};
}

namespace detail {

using bnorm::detail::Partial;

inline Partial partial(const Moments& m) { return {m.count, m.mean_rest, m.m2, m.mean_base}; }
inline Moments moments(const Partial& p) { return {p.n, p.shift, p.a, p.b}; }

/// The channels' moments `total` as the kernels' partials, in the workspace.
template <class T>
const Partial* partials(const Moments* total, const Shape& shape, const Execution<T>& ex) {
  check_pointer(total, "total");
  auto& ws = workspace(ex);
  ws.partials_out.resize(std::size_t(std::max<Index>(shape.channels, 0)));
  std::transform(total, total + ws.partials_out.size(), ws.partials_out.begin(), partial);
  return ws.partials_out.data();
}

}  // namespace detail

inline Moments merge(const Moments& a, const Moments& b) {
  return detail::moments(bnorm::detail::merge_moments(detail::partial(a), detail::partial(b)));
}

/// Step 1 of a training forward: out[c] = the moments of channel c of this shard (zero counts
/// for an empty shard).
template <class T>
void local_moments(const Shape& shape, const T* x, Moments* out, const Execution<T>& ex = {}) {
  detail::check_pointer(out, "out");
  auto& ws = detail::workspace(ex);
  ws.partials_out.resize(std::size_t(std::max<Index>(shape.channels, 0)));
  detail::local_moments(shape, x, ws.partials_out.data(), ex);
  std::transform(ws.partials_out.begin(), ws.partials_out.end(), out, detail::moments);
}

/// Step 3 of a training forward: normalizes this shard's x into y with `total`, the merged
/// moments of the whole batch (C of them, each over more than one value), and writes `stats` and
/// updates `running` as forward_training does, from the whole batch's statistics (the unbiased
/// running variance from its count). y may be x.
template <class T>
void forward_from_moments(const Shape& shape, const Moments* total, const T* x, T* y, double eps,
                          Affine<T> affine = {}, BatchStats<T> stats = {},
                          Running<T> running = {}, const Execution<T>& ex = {}) {
  detail::forward_from_moments<T>(shape, detail::partials(total, shape, ex), x, y, eps, affine,
                                  stats, running, ex, nullptr, nullptr);
}
/// The same, y = act(bn(x) + residual) in the one elementwise pass (see Fused).
template <class T>
void forward_from_moments(const Shape& shape, const Moments* total, const T* x, T* y, double eps,
                          Affine<T> affine, BatchStats<T> stats, Running<T> running,
                          const Execution<T>& ex, Fused<T> fused) {
  detail::forward_from_moments<T, true>(shape, detail::partials(total, shape, ex), x, y, eps,
                                        affine, stats, running, ex, nullptr, nullptr, {}, fused);
}

/// Step 1 of a backward: out[c] = this shard's sums of channel c, about `mean`, the mean the
/// forward normalized with. The shard's parameter gradients are out[c].dy (bias) and
/// out[c].dy_centered * invstd[c] (weight): sum them over the shards as a data-parallel step does.
template <class T>
void local_gradient_sums(const Shape& shape, const T* dy, const T* x, const T* mean,
                         BackwardSums* out, const Execution<T>& ex = {}) {
  detail::check_pointer(out, "out");
  const double* centers = detail::widened_mean(mean, shape, ex);
  auto& ws = detail::workspace(ex);
  ws.partials_out.resize(std::size_t(std::max<Index>(shape.channels, 0)));
  detail::local_gradient_sums(shape, dy, x, centers, ws.partials_out.data(), ex);
  std::transform(ws.partials_out.begin(), ws.partials_out.end(), out,
                 [](const bnorm::detail::Partial& p) { return BackwardSums{p.n, p.a, p.b}; });
}

/// Step 3 of a backward with batch statistics: dx of this shard from `total`, the merged sums of
/// the whole batch. mean and invstd: what the forward normalized with. dx may alias dy.
template <class T>
void backward_from_sums(const Shape& shape, const BackwardSums* total, const T* dy, const T* x,
                        T* dx, const T* mean, const T* invstd, const T* weight,
                        const Execution<T>& ex = {}) {
  detail::check_pointer(total, "total");
  const double* centers = detail::widened_mean(mean, shape, ex);
  auto& ws = detail::workspace(ex);
  const std::size_t C = std::size_t(std::max<Index>(shape.channels, 0));
  ws.partials_out.resize(C);
  for (std::size_t c = 0; c < C; ++c) {
    if (total[c].count != total[0].count)
      detail::fail("expected one count for every channel's sums, got " +
                   std::to_string(total[0].count) + " and " + std::to_string(total[c].count));
    ws.partials_out[c] = {total[c].count, total[c].dy, total[c].dy_centered};
  }
  if (C > 0 && shape.size() > 0 && !(total[0].count >= 1))
    detail::fail("expected sums over at least the shard's values, got a count of " +
                 std::to_string(total[0].count));
  detail::backward_from_sums(shape, ws.partials_out.data(), C > 0 ? total[0].count : 0.0, dy, x,
                             dx, centers, invstd, weight, ex);
}

}  // namespace functional
BNORM_END_NAMESPACE
