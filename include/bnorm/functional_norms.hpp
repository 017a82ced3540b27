#pragma once
// bnorm::functional, the rest of the family on raw pointers: GroupNorm and InstanceNorm (a
// Shape, statistics per sample and group of channels) and LayerNorm and RMSNorm (rows of
// `width` values, statistics per row). Each maps onto the kernel core of batch norm:
//
//   - GroupNorm: channels-first data is x[1][N * C][spatial], channels-last data one sample at a
//     time x[spatial][C][1]; the core reduces each channel of that view, and its merge of a
//     channel's blocks goes on over the C / G channels of a group (`granule`), which finish()
//     turns into one coefficient set per channel. InstanceNorm is GroupNorm with G = C.
//   - LayerNorm, RMSNorm: the core's reducers over each row, and its elementwise pass with the
//     row's statistics broadcast and the positions' weight and bias (detail/core/rows.hpp).
//
// As for batch norm, results are identical bit for bit for any device and thread count.

#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "detail/core/rows.hpp"
#include "functional.hpp"

BNORM_BEGIN_NAMESPACE
namespace functional {

namespace detail {

using bnorm::detail::Partial;

inline void check_groups(const Shape& s, Index groups) {
  check_shape(s);
  if (groups < 1 || s.channels % groups != 0)
    fail("expected num_channels divisible by num_groups, got num_channels " +
         std::to_string(s.channels) + " and num_groups " + std::to_string(groups));
}

inline void check_rows(Index rows, Index width) {
  if (rows < 0 || width < 1)
    fail("expected rows >= 0 and width >= 1, got rows " + std::to_string(rows) + ", width " +
         std::to_string(width));
}

/// Calls call(view, views, first_sample, offset, workspace, device) once per kernel call, of
/// `views` calls in all (see Traffic::views):
/// channels-first data in one call over x[1][N * C][spatial]; channels-last data a sample at a
/// time over x[spatial][C][1], at element offset `offset`. A channel p of a view is channel
/// (first_sample * C + p) % C of sample (first_sample * C + p) / C. Where there are at least as
/// many samples as workers, each worker takes whole samples, on the calling thread's terms
/// (device null) with a workspace of its own: a sample split over the workers would wake them
/// three times (reduce, merge, apply) for a few hundred microseconds of work each. Either way
/// each sample's results are the same.
template <class T, class Call>
void for_each_view(const Shape& s, Workspace<T>& ws, const Eigen::ThreadPoolDevice* device,
                   Call call) {
  if (s.layout == Layout::ChannelsFirst) {
    call(Geometry{1, s.batch * s.channels, s.spatial}, Index{1}, Index{0}, Index{0}, ws, device);
    return;
  }
  const Geometry view{s.spatial, s.channels, 1};
  const Index workers = bnorm::detail::workers(device);
  if (workers > 1 && s.batch >= workers) {
    ws.per_worker.resize(std::size_t(workers));
    bnorm::detail::parallel_workers(device, s.batch, [&](Index w, Index n0, Index n1) {
      for (Index n = n0; n < n1; ++n)
        call(view, s.batch, n, n * s.spatial * s.channels, ws.per_worker[std::size_t(w)],
             nullptr);
    });
    return;
  }
  for (Index n = 0; n < s.batch; ++n)
    call(view, s.batch, n, n * s.spatial * s.channels, ws, device);
}

/// GroupNorm's training forward (InstanceNorm's with groups = channels). Writes each group's
/// mean (double) and biased variance to ws.group_stats, [mean, var] per sample and group.
template <class T>
void group_norm_forward(const Shape& shape, Index groups, const T* x, T* y, double eps,
                        Affine<T> affine, BatchStats<T> stats, const Execution<T>& ex,
                        T* copy_of_x, double* mean_exact) {
  using namespace bnorm::detail;
  check_groups(shape, groups);
  check_eps(eps);
  auto& ws = workspace(ex);
  ws.group_stats.resize(std::size_t(2 * shape.batch * groups));
  if (shape.size() == 0) return;
  check_pointer(x, "x");
  check_pointer(y, "y");
  const Index C = shape.channels, k = C / groups;
  const double count = double(k * shape.spatial);
  double* group_stats = ws.group_stats.data();
  for_each_view(shape, ws, ex.device, [&](const Geometry& g, Index views, Index first,
                                          Index off, Workspace<T>& own,
                                          const Eigen::ThreadPoolDevice* on) {
    const Index base = first * C;  // the view's channel 0, counted over the samples
    auto finish = [&](Index c0, Index nc, const Partial* total, T* coef) {
      // nc / k groups, at most kFinishBatch of them (see reduce_then_apply's granule).
      double var[kFinishBatch] = {}, invstd[kFinishBatch];
      Partial moments[kFinishBatch];
      const Index ng = nc / k;
      for (Index j = 0; j < ng; ++j) {
        moments[j] = total[j * k];
        for (Index i = 1; i < k; ++i) moments[j] = merge_moments(moments[j], total[j * k + i]);
        var[j] = moments[j].b / count;
      }
      inverse_std(var, ng, eps, invstd);
      for (Index j = 0; j < ng; ++j) {
        const Index group = (base + c0) / k + j;
        const auto mean_t = split_mean<T>(moments[j]);
        group_stats[2 * group] = moments[j].mean();
        group_stats[2 * group + 1] = var[j];
        if (mean_exact) mean_exact[group] = moments[j].mean();
        if (stats.mean) stats.mean[group] = T(moments[j].mean());
        if (stats.invstd) stats.invstd[group] = T(invstd[j]);
        for (Index i = 0; i < k; ++i) {
          const Index c = c0 + j * k + i, channel = (base + c) % C;
          const double scale = (affine.weight ? double(affine.weight[channel]) : 1.0) * invstd[j];
          coef[c] = mean_t.high;
          coef[g.channels + c] = T(scale);
          coef[2 * g.channels + c] =
              T((affine.bias ? double(affine.bias[channel]) : 0.0) - mean_t.low * scale);
        }
      }
    };
    const T* in[] = {x + off};
    bnorm::detail::Streams<T, 1> s{{x + off}, y + off, copy_of_x ? copy_of_x + off : nullptr};
    reduce_then_apply<NormalizeOp, void>(g, in, nullptr, merge_moments, finish, s, own, on, k,
                                         views);
  });
}

/// GroupNorm's backward from the forward's group means (double) and invstd.
template <class T>
void group_norm_backward(const Shape& shape, Index groups, const T* dy, const T* x, T* dx,
                         const double* mean, const T* invstd, const T* weight, T* grad_weight,
                         T* grad_bias, const Execution<T>& ex) {
  using namespace bnorm::detail;
  check_groups(shape, groups);
  const Index C = shape.channels, k = C / groups;
  if (shape.size() == 0) {  // no terms: the parameters' gradients are zero
    for (Index c = 0; c < C; ++c) {
      if (grad_weight) grad_weight[c] = T(0);
      if (grad_bias) grad_bias[c] = T(0);
    }
    return;
  }
  check_pointer(dy, "dy");
  check_pointer(x, "x");
  check_pointer(dx, "dx");
  check_pointer(mean, "mean");
  check_pointer(invstd, "invstd");
  auto& ws = workspace(ex);
  const double count = double(k * shape.spatial);
  ws.param_sums.resize(std::size_t(2 * shape.batch * C));
  double* sums_of = ws.param_sums.data();  // [sum dy, sum dy * xhat] per sample and channel
  auto w = [&](Index channel) { return weight ? double(weight[channel]) : 1.0; };
  for_each_view(shape, ws, ex.device, [&](const Geometry& g, Index views, Index first,
                                          Index off, Workspace<T>& own,
                                          const Eigen::ThreadPoolDevice* on) {
    const Index base = first * C;
    own.centers.resize(std::size_t(g.channels));
    for (Index c = 0; c < g.channels; ++c) own.centers[std::size_t(c)] = mean[(base + c) / k];
    auto finish = [&](Index c0, Index nc, const Partial* sums, T* coef) {
      for (Index j = 0; j < nc / k; ++j) {
        const Index group = (base + c0) / k + j;
        // With g = weight * dy: A = sum(g), B = sum(g * (x - mean)) over the group.
        double a = 0, b = 0;
        for (Index i = 0; i < k; ++i) {
          const Index c = c0 + j * k + i, channel = (base + c) % C;
          a += w(channel) * sums[j * k + i].a;
          b += w(channel) * sums[j * k + i].b;
        }
        const double is = double(invstd[group]), slope = -is * is * is * b / count;
        const auto mean_t = split_mean<T>(Partial{1, 0, 0, mean[group]});
        for (Index i = 0; i < k; ++i) {
          const Index c = c0 + j * k + i;
          sums_of[2 * (base + c)] = sums[j * k + i].a;
          sums_of[2 * (base + c) + 1] = sums[j * k + i].b * is;
          coef[c] = T(w((base + c) % C) * is);
          coef[g.channels + c] = mean_t.high;
          coef[2 * g.channels + c] = T(slope);
          coef[3 * g.channels + c] = T(-is * a / count - mean_t.low * slope);
        }
      }
    };
    const T* in[] = {dy + off, x + off};
    reduce_then_apply<InputGradOp, GradientSums>(g, in, own.centers.data(), merge_sums, finish,
                                                 Streams<T, 2>{{dy + off, x + off}, dx + off},
                                                 own, on, k, views);
  });
  // Parameter gradients: each channel's terms summed over the samples in order.
  for (Index c = 0; c < C; ++c) {
    double db = 0, dw = 0;
    for (Index n = 0; n < shape.batch; ++n) {
      db += sums_of[2 * (n * C + c)];
      dw += sums_of[2 * (n * C + c) + 1];
    }
    if (grad_bias) grad_bias[c] = T(db);
    if (grad_weight) grad_weight[c] = T(dw);
  }
}

/// InstanceNorm's running statistics after a training forward (group_stats from
/// group_norm_forward with groups = channels): each channel's instance means and UNBIASED
/// variances averaged over the batch, then the momentum update, as PyTorch does.
template <class T>
void update_instance_running(const Shape& shape, const std::vector<double>& group_stats,
                             Running<T> running) {
  const Index C = shape.channels, N = shape.batch;
  const double m = double(shape.spatial), unbias = running.unbiased ? m / (m - 1) : 1.0;
  const double momentum = running.momentum;
  for (Index c = 0; c < C; ++c) {
    double mean = 0, var = 0;
    for (Index n = 0; n < N; ++n) {
      mean += group_stats[std::size_t(2 * (n * C + c))];
      var += group_stats[std::size_t(2 * (n * C + c) + 1)];
    }
    mean /= double(N);
    var = var / double(N) * unbias;
    if (running.mean) running.mean[c] = T((1 - momentum) * double(running.mean[c]) + momentum * mean);
    if (running.var) running.var[c] = T((1 - momentum) * double(running.var[c]) + momentum * var);
  }
}

}  // namespace detail

/// GroupNorm: normalizes each sample's `groups` groups of channels / groups channels (and all
/// their spatial positions) with the group's own statistics, then applies the per-channel
/// weight and bias. stats (each may be null) receives mean and invstd per sample and group, at
/// [n * groups + g]. y may be x.
template <class T>
void group_norm_forward(const Shape& shape, Index groups, const T* x, T* y, double eps,
                        Affine<T> affine = {}, BatchStats<T> stats = {},
                        const Execution<T>& ex = {}) {
  detail::group_norm_forward<T>(shape, groups, x, y, eps, affine, stats, ex, nullptr, nullptr);
}

/// GroupNorm's backward: dx, and grad_weight / grad_bias per channel (OVERWRITTEN, each may be
/// null), given the forward's mean and invstd per sample and group. dx may alias dy.
template <class T>
void group_norm_backward(const Shape& shape, Index groups, const T* dy, const T* x, T* dx,
                         const T* mean, const T* invstd, const T* weight, T* grad_weight,
                         T* grad_bias, const Execution<T>& ex = {}) {
  detail::check_groups(shape, groups);
  const bool empty = shape.size() == 0;  // then no pointer but the gradients' is read
  if (!empty) detail::check_pointer(mean, "mean");
  auto& means = detail::workspace(ex).group_stats;  // group_norm_backward does not use it
  means.assign(mean, mean + (empty ? 0 : shape.batch * groups));
  detail::group_norm_backward(shape, groups, dy, x, dx, means.data(), invstd, weight,
                              grad_weight, grad_bias, ex);
}

/// InstanceNorm's training forward: GroupNorm with one group per channel, and the running
/// statistics (each may be null) updated from the instances' (see Running; PyTorch averages
/// each channel's instance means and unbiased variances over the batch).
template <class T>
void instance_norm_forward(const Shape& shape, const T* x, T* y, double eps,
                           Affine<T> affine = {}, BatchStats<T> stats = {},
                           Running<T> running = {}, const Execution<T>& ex = {}) {
  if (running.mean || running.var) {
    detail::check_momentum(running.momentum);
    if (shape.spatial < 2 && shape.size() > 0)
      detail::fail("expected more than 1 spatial element when training, got " +
                   std::to_string(shape.spatial));
  }
  detail::group_norm_forward<T>(shape, shape.channels, x, y, eps, affine, stats, ex, nullptr,
                                nullptr);
  if (shape.size() > 0 && (running.mean || running.var))
    detail::update_instance_running(shape, detail::workspace(ex).group_stats, running);
}

/// InstanceNorm's backward with instance statistics: GroupNorm's with one group per channel.
/// (With running statistics, it is batch norm's backward with Statistics::Frozen.)
template <class T>
void instance_norm_backward(const Shape& shape, const T* dy, const T* x, T* dx, const T* mean,
                            const T* invstd, const T* weight, T* grad_weight, T* grad_bias,
                            const Execution<T>& ex = {}) {
  group_norm_backward<T>(shape, shape.channels, dy, x, dx, mean, invstd, weight, grad_weight,
                         grad_bias, ex);
}

/// LayerNorm over rows of `width` values (the normalized dims of any tensor, flattened):
/// y = (x - mean) * invstd * weight[d] + bias[d], with the biased variance. stats (each may be
/// null) receives each row's mean and invstd. y may be x.
template <class T>
void layer_norm_forward(Index rows, Index width, const T* x, T* y, double eps,
                        Affine<T> affine = {}, BatchStats<T> stats = {},
                        const Execution<T>& ex = {}) {
  detail::check_rows(rows, width);
  detail::check_eps(eps);
  if (rows == 0) return;
  detail::check_pointer(x, "x");
  detail::check_pointer(y, "y");
  auto& ws = detail::workspace(ex);
  auto& mean = ws.centers;  // rows_forward does not use it
  mean.resize(stats.mean ? std::size_t(rows) : 0);
  bnorm::detail::rows_forward<bnorm::detail::RowCenter::Mean>(
      {rows, width}, x, y, static_cast<T*>(nullptr), eps, affine.weight, affine.bias,
      stats.mean ? mean.data() : nullptr, stats.invstd, ws, ex.device);
  for (std::size_t r = 0; r < mean.size(); ++r) stats.mean[r] = T(mean[r]);
}

/// LayerNorm's backward: dx, and grad_weight / grad_bias per position (OVERWRITTEN, each may be
/// null), given each row's mean and invstd from the forward. dx may alias dy.
template <class T>
void layer_norm_backward(Index rows, Index width, const T* dy, const T* x, T* dx, const T* mean,
                         const T* invstd, const T* weight, T* grad_weight, T* grad_bias,
                         const Execution<T>& ex = {}) {
  detail::check_rows(rows, width);
  if (rows > 0) {
    for (const void* p : {static_cast<const void*>(dy), static_cast<const void*>(x),
                          static_cast<const void*>(dx), static_cast<const void*>(mean),
                          static_cast<const void*>(invstd)})
      detail::check_pointer(p, "dy, x, dx, mean or invstd");
  }
  auto& ws = detail::workspace(ex);
  ws.centers.assign(mean, mean + (rows > 0 ? rows : 0));  // rows_backward does not use it
  bnorm::detail::rows_backward<bnorm::detail::RowCenter::Mean>(
      {rows, width}, dy, x, dx, ws.centers.data(), invstd, weight, grad_weight, grad_bias, ws,
      ex.device);
}

/// RMSNorm over rows of `width` values: y = x * invstd * weight[d], invstd = 1 / sqrt(mean(x^2)
/// + eps), written to `invstd` per row where not null. y may be x.
template <class T>
void rms_norm_forward(Index rows, Index width, const T* x, T* y, double eps, const T* weight,
                      T* invstd = nullptr, const Execution<T>& ex = {}) {
  detail::check_rows(rows, width);
  detail::check_eps(eps);
  if (rows == 0) return;
  detail::check_pointer(x, "x");
  detail::check_pointer(y, "y");
  bnorm::detail::rows_forward<bnorm::detail::RowCenter::Zero>(
      {rows, width}, x, y, static_cast<T*>(nullptr), eps, weight, static_cast<const T*>(nullptr),
      nullptr, invstd, detail::workspace(ex), ex.device);
}

/// RMSNorm's backward: dx, and grad_weight per position (OVERWRITTEN; may be null), given each
/// row's invstd from the forward. dx may alias dy.
template <class T>
void rms_norm_backward(Index rows, Index width, const T* dy, const T* x, T* dx, const T* invstd,
                       const T* weight, T* grad_weight, const Execution<T>& ex = {}) {
  detail::check_rows(rows, width);
  if (rows > 0) {
    for (const void* p : {static_cast<const void*>(dy), static_cast<const void*>(x),
                          static_cast<const void*>(dx), static_cast<const void*>(invstd)})
      detail::check_pointer(p, "dy, x, dx or invstd");
  }
  bnorm::detail::rows_backward<bnorm::detail::RowCenter::Zero>(
      {rows, width}, dy, x, dx, static_cast<const double*>(nullptr), invstd, weight, grad_weight,
      static_cast<T*>(nullptr), detail::workspace(ex), ex.device);
}

}  // namespace functional
BNORM_END_NAMESPACE
