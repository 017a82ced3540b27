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

/// Step 1 of a training forward: the moments of each channel of x (zero counts for no values).
template <class T>
void local_moments(const Shape& shape, const T* x, Partial* out, const Execution<T>& ex) {
  using namespace bnorm::detail;
  check_shape(shape);
  if (shape.size() == 0) {
    std::fill(out, out + shape.channels, Partial{});
    return;
  }
  check_pointer(x, "x");
  const T* in[] = {x};
  auto keep = [out](Index c0, Index n, const Partial* m, T*) { std::copy(m, m + n, out + c0); };
  reduce_then_apply<ReduceOnly, void>(geometry(shape), in, nullptr, merge_moments, keep,
                                      Streams<T, 1>{{x}, nullptr}, workspace(ex), ex.device);
}

/// Step 3 of a training forward: x normalized with the moments `total` (C of them, over more
/// than one value each), with what forward_training writes beside y.
template <class T>
void forward_from_moments(const Shape& shape, const Partial* total, const T* x, T* y, double eps,
                          Affine<T> affine, BatchStats<T> stats, Running<T> running,
                          const Execution<T>& ex, T* copy_of_x, double* mean_exact,
                          Renormalize<T> renorm = {}, Fused<T> fused = {}) {
  using namespace bnorm::detail;
  check_shape(shape);
  check_eps(eps);
  if (running.mean || running.var) check_momentum(running.momentum);
  check_pointer(total, "total");
  const Index C = shape.channels;
  for (Index c = 0; c < C; ++c)
    if (!(total[c].n >= 2))
      fail("expected merged moments over more than 1 value per channel when training, got " +
           std::to_string(total[c].n) + " in channel " + std::to_string(c));
  if (shape.size() > 0) {
    check_pointer(x, "x");
    check_pointer(y, "y");
  }
  auto& ws = workspace(ex);
  ws.coefs.resize(std::size_t(NormalizeOp::kCoefs * C));
  const TrainingFinish<T> finish{C, eps, affine, stats, running, mean_exact, renorm};
  for (Index c0 = 0; c0 < C; c0 += kFinishBatch)
    finish(c0, std::min(kFinishBatch, C - c0), total + c0, ws.coefs.data());
  if (shape.size() == 0) return;
  with_epilogue<NormalizeOp>(x, fused.residual, fused.relu, [&](auto op, const T* const* in) {
    using Op = decltype(op);
    apply_all<Op>(geometry(shape), streams<Op::kInputs>(in, y, copy_of_x), ws, ex.device);
  });
}

/// Step 1 of a backward: each channel's sum(dy) and sum(dy * (x - mean)).
template <class T>
void local_gradient_sums(const Shape& shape, const T* dy, const T* x, const double* mean,
                         Partial* out, const Execution<T>& ex) {
  using namespace bnorm::detail;
  check_shape(shape);
  if (shape.size() == 0) {
    std::fill(out, out + shape.channels, Partial{});
    return;
  }
  check_pointer(dy, "dy");
  check_pointer(x, "x");
  check_pointer(mean, "mean");
  const T* in[] = {dy, x};
  auto keep = [out](Index c0, Index n, const Partial* m, T*) { std::copy(m, m + n, out + c0); };
  reduce_then_apply<ReduceOnly, bnorm::detail::GradientSums>(
      geometry(shape), in, mean, merge_sums, keep, Streams<T, 1>{{dy}, nullptr}, workspace(ex),
      ex.device);
}

/// Step 3 of a backward: dx from the sums `total` over `count` values per channel.
template <class T>
void backward_from_sums(const Shape& shape, const Partial* total, double count, const T* dy,
                        const T* x, T* dx, const double* mean, const T* invstd, const T* weight,
                        const Execution<T>& ex) {
  using namespace bnorm::detail;
  check_shape(shape);
  if (shape.size() == 0) return;
  check_pointer(total, "total");
  check_pointer(dy, "dy");
  check_pointer(x, "x");
  check_pointer(dx, "dx");
  check_pointer(mean, "mean");
  check_pointer(invstd, "invstd");
  const Index C = shape.channels;
  auto& ws = workspace(ex);
  ws.coefs.resize(std::size_t(InputGradOp::kCoefs * C));
  input_grad_coefs(C, 0, C, total, count, mean, invstd, weight, ws.coefs.data());
  apply_all<InputGradOp>(geometry(shape), Streams<T, 2>{{dy, x}, dx}, ws, ex.device);
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
                          Running<T> running = {}, const Execution<T>& ex = {},
                          Fused<T> fused = {}) {
  detail::check_pointer(total, "total");
  auto& ws = detail::workspace(ex);
  ws.partials_out.resize(std::size_t(std::max<Index>(shape.channels, 0)));
  std::transform(total, total + ws.partials_out.size(), ws.partials_out.begin(), detail::partial);
  detail::forward_from_moments<T>(shape, ws.partials_out.data(), x, y, eps, affine, stats,
                                  running, ex, nullptr, nullptr, {}, fused);
}

/// Step 1 of a backward: out[c] = this shard's sums of channel c, about `mean`, the mean the
/// forward normalized with. The shard's parameter gradients are out[c].dy (bias) and
/// out[c].dy_centered * invstd[c] (weight): sum them over the shards as a data-parallel step does.
template <class T>
void local_gradient_sums(const Shape& shape, const T* dy, const T* x, const T* mean,
                         BackwardSums* out, const Execution<T>& ex = {}) {
  detail::check_pointer(out, "out");
  detail::check_pointer(mean, "mean");
  auto& ws = detail::workspace(ex);
  const std::size_t C = std::size_t(std::max<Index>(shape.channels, 0));
  ws.centers.assign(mean, mean + C);
  ws.partials_out.resize(C);
  detail::local_gradient_sums(shape, dy, x, ws.centers.data(), ws.partials_out.data(), ex);
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
  detail::check_pointer(mean, "mean");
  auto& ws = detail::workspace(ex);
  const std::size_t C = std::size_t(std::max<Index>(shape.channels, 0));
  ws.centers.assign(mean, mean + C);
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
                             dx, ws.centers.data(), invstd, weight, ex);
}

}  // namespace functional
BNORM_END_NAMESPACE
