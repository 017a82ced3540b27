#pragma once
// bnorm::functional: stateless batch normalization on raw pointers, for frameworks that keep
// their own tensors. The modules in batch_norm.hpp are thin wrappers over these functions.
//
// Data is contiguous, described by a Shape: ChannelsFirst is [batch][channels][spatial],
// ChannelsLast is [batch][spatial][channels]. Per-channel arrays have `channels` values.
// Results are identical bit for bit whatever device (and number of threads) is passed.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "detail/isa.hpp"
#include "detail/kernels.hpp"
#include "options.hpp"

BNORM_BEGIN_NAMESPACE
namespace functional {

using Index = std::ptrdiff_t;

struct Shape {
  Index batch = 0;
  Index channels = 0;
  Index spatial = 1;  ///< product of the spatial sizes; 1 for (N, C) data
  Layout layout = Layout::ChannelsFirst;

  Index per_channel() const { return batch * spatial; }
  Index size() const { return batch * channels * spatial; }
};

/// The type of the per-channel values (parameters, statistics) that go with data stored as S:
/// S itself for float and double, float for Eigen::bfloat16 and Eigen::half, whose data the
/// kernels read into float and write back rounded to nearest even.
template <class S>
using Param = bnorm::detail::Compute<S>;

/// Learnable parameters; a null pointer means weight 1 / bias 0 (affine = false).
template <class T>
struct Affine {
  const T* weight = nullptr;
  const T* bias = nullptr;
};

/// Where a training forward writes the batch statistics it used (each may be null).
template <class T>
struct BatchStats {
  T* mean = nullptr;
  T* invstd = nullptr;  ///< 1 / sqrt(biased variance + eps)
};

/// Running statistics updated by a training forward, PyTorch's way:
/// r = (1 - momentum) * r + momentum * batch value, with the UNBIASED variance for running var.
/// Null pointers: no update.
template <class T>
struct Running {
  T* mean = nullptr;
  T* var = nullptr;
  double momentum = 0.1;
  bool unbiased = true;  ///< false: the running variance averages the biased batch variance
};

/// What a forward's elementwise pass adds to the normalized value, in the same pass:
/// y = act(bn(x) + residual), act = ReLU (max(v, 0), NaN kept) where relu is set. residual: a
/// tensor of x's shape (ResNet's skip connection); null: none.
/// positive: where set, receives a byte per value of y, 1 where y > 0, else 0, written by the
/// same pass (the gradient mask relu_backward takes, for a y that is overwritten before backward).
template <class T>
struct Fused {
  const T* residual = nullptr;
  bool relu = false;
  std::uint8_t* positive = nullptr;
};

/// Scratch memory of the kernels; keep one per caller to make calls allocation-free.
template <class T>
using Workspace = detail::Workspace<T>;

/// How to run: on the calling thread alone (device == nullptr) or on a thread pool too.
template <class T>
struct Execution {
  const Eigen::ThreadPoolDevice* device = nullptr;
  Workspace<T>* workspace = nullptr;  ///< null: a workspace owned by the calling thread
};

/// Which statistics the forward used, and so which gradient backward computes.
enum class Statistics {
  Batch,   ///< training: mean and invstd depend on x, so dx has the two reduction terms
  Frozen,  ///< inference: constant statistics, dx = dy * weight * invstd
};

namespace detail {

using bnorm::detail::Geometry;
using bnorm::detail::Partial;

inline Geometry geometry(const Shape& s) {
  if (s.layout == Layout::ChannelsFirst) return {s.batch, s.channels, s.spatial};
  return {s.batch * s.spatial, s.channels, 1};
}

template <class T>
bnorm::detail::Workspace<T>& workspace(const Execution<T>& ex) {
  if (ex.workspace) return *ex.workspace;
  thread_local bnorm::detail::Workspace<T> own;
  return own;
}

/// The elementwise pass's streams: its inputs (Op's), output, copy of x and mask of y > 0.
template <int K, class T>
bnorm::detail::Streams<T, K> streams(const T* const* in, T* out, T* copy,
                                     std::uint8_t* positive) {
  bnorm::detail::Streams<T, K> s{};
  for (int j = 0; j < K; ++j) s.in[j] = in[j];
  s.out = out;
  s.copy = copy;
  s.positive = positive;
  return s;
}

[[noreturn]] inline void fail(const std::string& what) {
  throw std::invalid_argument("bnorm::functional: " + what);
}

inline void check_shape(const Shape& s) {
  if (s.batch < 0 || s.channels < 1 || s.spatial < 0)
    fail("expected batch >= 0, channels >= 1, spatial >= 0, got batch " + std::to_string(s.batch) +
         ", channels " + std::to_string(s.channels) + ", spatial " + std::to_string(s.spatial));
}

/// The checks of eps and momentum, reported through fail_with (the modules name themselves).
template <class Fail>
void check_eps(double eps, const Fail& fail_with) {
  if (!(eps >= 0) || !std::isfinite(eps))
    fail_with("expected eps finite and >= 0, got " + std::to_string(eps));
}
template <class Fail>
void check_momentum(double m, const Fail& fail_with) {
  if (!(m >= 0 && m <= 1)) fail_with("expected momentum in [0, 1], got " + std::to_string(m));
}
inline void check_eps(double eps) { check_eps(eps, fail); }
inline void check_momentum(double m) { check_momentum(m, fail); }

inline void check_pointer(const void* p, const char* name) {
  if (p == nullptr) fail(std::string(name) + " is null");
}

/// A per-channel mean in T, widened to double in the workspace: the centers the kernels take.
template <class T>
const double* widened_mean(const T* mean, const Shape& shape, const Execution<T>& ex) {
  check_pointer(mean, "mean");
  auto& ws = workspace(ex);
  ws.centers.assign(mean, mean + std::max<Index>(shape.channels, 0));
  return ws.centers.data();
}

/// Batch Renormalization's part of a training forward (see bnorm::Renorm): the running statistics
/// it corrects toward, read before the forward updates them, and where r and d go per channel.
/// rmax == 0: off.
template <class T>
struct Renormalize {
  double rmax = 0, dmax = 0;
  const T* running_mean = nullptr;
  const T* running_var = nullptr;
  double* r = nullptr;
  double* d = nullptr;
};

/// A training forward's finish(): NormalizeOp's coefficients of the channels [c0, c0 + nc) from
/// their moments, and what the forward writes beside them. The channels one output at a time,
/// so that each loop vectorizes, the square roots and divisions above all.
template <class T>
struct TrainingFinish {
  Index channels;
  double eps;
  Affine<T> affine;
  BatchStats<T> stats;
  Running<T> running;
  double* mean_exact;
  Renormalize<T> renorm;

  void operator()(Index c0, Index nc, const bnorm::detail::Partial* m, T* coef) const {
    const Index C = channels;
    // (var zeroed: GCC cannot tell that inverse_std reads only the nc values written.)
    double var[bnorm::detail::kFinishBatch] = {}, invstd[bnorm::detail::kFinishBatch];
    for (Index j = 0; j < nc; ++j) var[j] = m[j].b / m[j].n;
    bnorm::detail::inverse_std(var, nc, eps, invstd);
    for (Index j = 0; j < nc; ++j) {
      const Index c = c0 + j;
      const double weight = affine.weight ? double(affine.weight[c]) : 1.0;
      double scale = weight * invstd[j], shift = affine.bias ? double(affine.bias[c]) : 0.0;
      if (renorm.rmax > 0) {  // before the running statistics move, below
        const double sigma = std::sqrt(double(renorm.running_var[c]) + eps);
        const double r = std::clamp(std::sqrt(var[j] + eps) / sigma, 1 / renorm.rmax, renorm.rmax);
        const double d = std::clamp((m[j].mean() - double(renorm.running_mean[c])) / sigma,
                                    -renorm.dmax, renorm.dmax);
        renorm.r[c] = r;
        renorm.d[c] = d;
        scale *= r;
        shift += weight * d;
      }
      const auto mean_t = bnorm::detail::split_mean<T>(m[j]);
      coef[c] = mean_t.high;
      coef[C + c] = T(scale);
      coef[2 * C + c] = T(shift - mean_t.low * scale);
    }
    if (mean_exact)
      for (Index j = 0; j < nc; ++j) mean_exact[c0 + j] = m[j].mean();
    if (stats.mean)
      for (Index j = 0; j < nc; ++j) stats.mean[c0 + j] = T(m[j].mean());
    if (stats.invstd)
      for (Index j = 0; j < nc; ++j) stats.invstd[c0 + j] = T(invstd[j]);
    const double momentum = running.momentum;
    if (running.mean)
      for (Index j = 0; j < nc; ++j)
        running.mean[c0 + j] =
            T((1 - momentum) * double(running.mean[c0 + j]) + momentum * m[j].mean());
    if (running.var)
      for (Index j = 0; j < nc; ++j) {
        const double unbias = running.unbiased ? m[j].n / (m[j].n - 1) : 1.0;
        running.var[c0 + j] =
            T((1 - momentum) * double(running.var[c0 + j]) + momentum * var[j] * unbias);
      }
  }
};

/// The parameters' gradients of channels [c0, c0 + n) from their gradient sums (each output may
/// be null): grad_bias = sum(dy), grad_weight = sum(dy * (x - mean)) * invstd.
template <class T>
void parameter_grads(Index c0, Index n, const bnorm::detail::Partial* sums, const T* invstd,
                     T* grad_weight, T* grad_bias) {
  if (grad_bias)
    for (Index j = 0; j < n; ++j) grad_bias[c0 + j] = T(sums[j].a);
  if (grad_weight)
    for (Index j = 0; j < n; ++j) grad_weight[c0 + j] = T(sums[j].b * double(invstd[c0 + j]));
}

/// InputGradOp's coefficients of channels [c0, c0 + n) of C from their gradient sums over
/// `count` values each, with batch statistics.
template <class T>
void input_grad_coefs(Index C, Index c0, Index n, const bnorm::detail::Partial* sums,
                      double count, const double* mean, const T* invstd, const T* weight,
                      T* coef) {
  for (Index j = 0; j < n; ++j) {
    const Index c = c0 + j;
    const double is = double(invstd[c]), k = (weight ? double(weight[c]) : 1.0) * is;
    const auto mean_t = bnorm::detail::split_mean<T>(bnorm::detail::Partial{1, 0, 0, mean[c]});
    const double slope = -k * is * is * sums[j].b / count;
    coef[c] = T(k);
    coef[C + c] = mean_t.high;
    coef[2 * C + c] = T(slope);
    coef[3 * C + c] = T(-k * sums[j].a / count - mean_t.low * slope);
  }
}

/// The per-channel totals of Step's reduction (void: the moments) over `in`, into out, with no
/// elementwise pass: step 1 of a pass whose totals are merged elsewhere (zero counts for no
/// values).
template <class Step, class S, class Merge>
void reduce_channels(const Shape& shape, const S* const* in, const double* centers, Merge merge,
                     Partial* out, const Execution<Param<S>>& ex) {
  using T = Param<S>;
  using namespace bnorm::detail;
  if (shape.size() == 0) {
    std::fill(out, out + shape.channels, Partial{});
    return;
  }
  auto keep = [out](Index c0, Index n, const Partial* m, T*) { std::copy(m, m + n, out + c0); };
  reduce_then_apply<ReduceOnly, Step>(geometry(shape), in, centers, merge, keep,
                                      Streams<S, 1>{{in[0]}, nullptr}, workspace(ex), ex.device);
}

/// Step 1 of a training forward: the moments of each channel of x.
template <class S>
void local_moments(const Shape& shape, const S* x, Partial* out, const Execution<Param<S>>& ex) {
  check_shape(shape);
  if (shape.size() > 0) check_pointer(x, "x");
  const S* in[] = {x};
  reduce_channels<void>(shape, in, nullptr, bnorm::detail::merge_moments, out, ex);
}

/// Step 3 of a training forward: x normalized with the moments `total` (C of them, over more
/// than one value each), with what forward_training writes beside y. `views`: how many calls
/// like this one the caller makes in turn (Ghost BN's chunks), which the plan's streamed stores
/// count (Traffic::views).
template <class S, bool kFused = false>
void forward_from_moments(const Shape& shape, const Partial* total, const S* x, S* y, double eps,
                          Affine<Param<S>> affine, BatchStats<Param<S>> stats,
                          Running<Param<S>> running, const Execution<Param<S>>& ex, S* copy_of_x,
                          double* mean_exact, Renormalize<Param<S>> renorm = {},
                          Fused<S> fused = {}, Index views = 1) {
  using namespace bnorm::detail;
  using T = Param<S>;
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
  if constexpr (kFused) {
    with_epilogue<NormalizeOp>(x, fused.residual, fused.relu, [&](auto op, const S* const* in) {
      using Op = decltype(op);
      apply_all<Op>(geometry(shape), streams<Op::kInputs>(in, y, copy_of_x, fused.positive), ws,
                    ex.device, views);
    });
  } else {
    apply_all<NormalizeOp>(geometry(shape), Streams<S, 1>{{x}, y, copy_of_x}, ws, ex.device,
                           views);
  }
}

/// Step 1 of a backward: each channel's sum(dy) and sum(dy * (x - mean)).
template <class S>
void local_gradient_sums(const Shape& shape, const S* dy, const S* x, const double* mean,
                         Partial* out, const Execution<Param<S>>& ex) {
  check_shape(shape);
  if (shape.size() > 0) {
    check_pointer(dy, "dy");
    check_pointer(x, "x");
    check_pointer(mean, "mean");
  }
  const S* in[] = {dy, x};
  reduce_channels<bnorm::detail::GradientSums>(shape, in, mean, bnorm::detail::merge_sums, out,
                                               ex);
}

/// Step 3 of a backward: dx from the sums `total` over `count` values per channel.
template <class S>
void backward_from_sums(const Shape& shape, const Partial* total, double count, const S* dy,
                        const S* x, S* dx, const double* mean, const Param<S>* invstd,
                        const Param<S>* weight, const Execution<Param<S>>& ex) {
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
  apply_all<InputGradOp>(geometry(shape), Streams<S, 2>{{dy, x}, dx}, ws, ex.device);
}

/// copy_of_x: receives a copy of x (the module keeps it for backward); mean_exact: receives
/// the batch mean before rounding to T. Both may be null.
/// kFused: compiled with the epilogues of `fused`; views: see forward_from_moments.
template <class S, bool kFused = false>
void forward_training(const Shape& shape, const S* x, S* y, double eps, Affine<Param<S>> affine,
                      BatchStats<Param<S>> stats, Running<Param<S>> running,
                      const Execution<Param<S>>& ex, S* copy_of_x, double* mean_exact,
                      Renormalize<Param<S>> renorm = {}, Fused<S> fused = {}, Index views = 1) {
  using T = Param<S>;
  check_shape(shape);
  check_eps(eps);
  if (running.mean || running.var) check_momentum(running.momentum);
  if (shape.size() == 0) return;
  check_pointer(x, "x");
  check_pointer(y, "y");
  const Index n = shape.per_channel();
  if (n < 2)
    fail("expected more than 1 value per channel when training, got " + std::to_string(n));

  if constexpr (kFused) {
    if (fused.residual || fused.relu || fused.positive) {
      // The steps one by one, so that only the elementwise pass is compiled once per epilogue
      // (the fused reduction and pass of every epilogue doubled the module's compile time).
      auto& ws = workspace(ex);
      ws.partials_out.resize(std::size_t(shape.channels));
      local_moments(shape, x, ws.partials_out.data(), ex);
      forward_from_moments<S, true>(shape, ws.partials_out.data(), x, y, eps, affine, stats,
                                    running, ex, copy_of_x, mean_exact, renorm, fused, views);
      return;
    }
  }
  const S* in[] = {x};
  bnorm::detail::reduce_then_apply<bnorm::detail::NormalizeOp, void>(
      geometry(shape), in, nullptr, bnorm::detail::merge_moments,
      TrainingFinish<T>{shape.channels, eps, affine, stats, running, mean_exact, renorm},
      bnorm::detail::Streams<S, 1>{{x}, y, copy_of_x}, workspace(ex), ex.device, 1, views);
}
/// invstd_out: receives 1 / sqrt(var + eps) per channel; may be null.
template <class S, bool kFused = false>
void forward_inference(const Shape& shape, const S* x, S* y, double eps, Affine<Param<S>> affine,
                       const Param<S>* mean, const Param<S>* var, const Execution<Param<S>>& ex,
                       S* copy_of_x, Param<S>* invstd_out, Fused<S> fused = {}) {
  using T = Param<S>;
  check_shape(shape);
  check_eps(eps);
  if (shape.size() == 0) return;
  check_pointer(x, "x");
  check_pointer(y, "y");
  check_pointer(mean, "mean");
  check_pointer(var, "var");
  const Index C = shape.channels;
  auto& ws = workspace(ex);
  ws.coefs.resize(std::size_t(bnorm::detail::ScaleShiftOp::kCoefs * C));
  T* coef = ws.coefs.data();
  for (Index c0 = 0; c0 < C; c0 += bnorm::detail::kFinishBatch) {
    const Index n = std::min(bnorm::detail::kFinishBatch, C - c0);
    double invstd[bnorm::detail::kFinishBatch];
    bnorm::detail::inverse_std(var + c0, n, eps, invstd);
    for (Index j = 0; j < n; ++j) {
      const Index c = c0 + j;
      const double scale = (affine.weight ? double(affine.weight[c]) : 1.0) * invstd[j];
      coef[c] = T(scale);
      coef[C + c] = T((affine.bias ? double(affine.bias[c]) : 0.0) - double(mean[c]) * scale);
    }
    if (invstd_out)
      for (Index j = 0; j < n; ++j) invstd_out[c0 + j] = T(invstd[j]);
  }
  if constexpr (kFused) {
    bnorm::detail::with_epilogue<bnorm::detail::ScaleShiftOp>(
        x, fused.residual, fused.relu, [&](auto op, const S* const* in) {
          using Op = decltype(op);
          bnorm::detail::apply_all<Op>(
              geometry(shape), streams<Op::kInputs>(in, y, copy_of_x, fused.positive), ws,
              ex.device);
        });
  } else {
    bnorm::detail::apply_all<bnorm::detail::ScaleShiftOp>(
        geometry(shape), bnorm::detail::Streams<S, 1>{{x}, y, copy_of_x}, ws, ex.device);
  }
}

/// out = dy where `passed` (a fused ReLU's output, or a mask of 0 and 1) is positive, else 0: the
/// gradient through ReLU, 0 at exactly 0 and at NaN, as PyTorch's. out may be dy. Written so that
/// it vectorizes: restrict, since a byte may alias anything, and dy loaded whatever `passed` (a
/// load under a condition is a branch per value).
template <class T, class P>
void relu_gradient(Index n, const P* __restrict passed, const T* dy, T* out,
                   const Eigen::ThreadPoolDevice* device) {
  bnorm::detail::parallel_ranges(device, n, [&](Index i0, Index i1) {
    for (Index i = i0; i < i1; ++i) {
      const T v = dy[i];
      out[i] = passed[i] > P(0) ? v : T(0);
    }
  });
}

/// backward with the mean in double (the module keeps the forward's unrounded mean); views: see
/// forward_from_moments.
template <class S>
void backward(const Shape& shape, const S* dy, const S* x, S* dx, Statistics kind,
              const double* mean, const Param<S>* invstd, const Param<S>* weight,
              Param<S>* grad_weight, Param<S>* grad_bias, const Execution<Param<S>>& ex,
              Index views = 1) {
  using namespace bnorm::detail;
  using T = Param<S>;
  check_shape(shape);
  const Index C = shape.channels;
  if (shape.size() == 0) {
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
  const Geometry g = geometry(shape);
  auto& ws = workspace(ex);
  const S* in[] = {dy, x};
  const double count = double(shape.per_channel());
  auto grads = [&](Index c0, Index n, const Partial* sums) {
    parameter_grads(c0, n, sums, invstd, grad_weight, grad_bias);
  };
  auto scale_of = [&](Index c) {
    return (weight ? double(weight[c]) : 1.0) * double(invstd[c]);
  };

  if (kind == Statistics::Batch) {
    auto finish = [&](Index c0, Index n, const Partial* sums, T* coef) {
      grads(c0, n, sums);
      input_grad_coefs(C, c0, n, sums, count, mean, invstd, weight, coef);
    };
    reduce_then_apply<InputGradOp, GradientSums>(g, in, mean, merge_sums, finish,
                                                 Streams<S, 2>{{dy, x}, dx}, ws, ex.device, 1,
                                                 views);
    return;
  }
  // Frozen statistics: dx = dy * weight * invstd; the sums are only needed for the gradients.
  auto finish = [&](Index c0, Index n, const Partial* sums, T* coef) {
    if (sums) grads(c0, n, sums);
    for (Index c = c0; c < c0 + n; ++c) {
      coef[c] = T(scale_of(c));
      coef[C + c] = T(0);
    }
  };
  const Streams<S, 1> s{{dy}, dx};
  if (grad_weight || grad_bias) {
    reduce_then_apply<ScaleShiftOp, GradientSums>(g, in, mean, merge_sums, finish, s, ws,
                                                  ex.device, 1, views);
    return;
  }
  ws.coefs.resize(std::size_t(ScaleShiftOp::kCoefs * C));
  finish(0, C, nullptr, ws.coefs.data());
  apply_all<ScaleShiftOp>(g, s, ws, ex.device, views);
}

}  // namespace detail

/// Training forward: normalizes x into y with the batch's own statistics, writes them to `stats`
/// and updates `running`. y may be x (in place).
template <class S>
void forward_training(const Shape& shape, const S* x, S* y, double eps,
                      Affine<Param<S>> affine = {}, BatchStats<Param<S>> stats = {},
                      Running<Param<S>> running = {}, const Execution<Param<S>>& ex = {}) {
  detail::forward_training<S>(shape, x, y, eps, affine, stats, running, ex, nullptr, nullptr);
}
/// The same, y = act(bn(x) + residual) in the one elementwise pass (see Fused).
template <class S>
void forward_training(const Shape& shape, const S* x, S* y, double eps, Affine<Param<S>> affine,
                      BatchStats<Param<S>> stats, Running<Param<S>> running,
                      const Execution<Param<S>>& ex, Fused<S> fused) {
  detail::forward_training<S, true>(shape, x, y, eps, affine, stats, running, ex, nullptr,
                                    nullptr, {}, fused);
}

/// Inference forward: normalizes x into y with the given statistics (usually the running ones),
/// folded with weight and bias into one scale and shift per channel. y may be x.
template <class S>
void forward_inference(const Shape& shape, const S* x, S* y, double eps, Affine<Param<S>> affine,
                       const Param<S>* mean, const Param<S>* var,
                       const Execution<Param<S>>& ex = {}) {
  detail::forward_inference<S>(shape, x, y, eps, affine, mean, var, ex, nullptr, nullptr);
}
/// The same, y = act(bn(x) + residual) in the one elementwise pass (see Fused).
template <class S>
void forward_inference(const Shape& shape, const S* x, S* y, double eps, Affine<Param<S>> affine,
                       const Param<S>* mean, const Param<S>* var, const Execution<Param<S>>& ex,
                       Fused<S> fused) {
  detail::forward_inference<S, true>(shape, x, y, eps, affine, mean, var, ex, nullptr, nullptr,
                                     fused);
}

/// Backward: dx from dy, and the parameter gradients (OVERWRITTEN, each may be null):
/// grad_bias = sum(dy), grad_weight = sum(dy * (x - mean)) * invstd, per channel.
/// mean and invstd are what the forward used: BatchStats for Statistics::Batch, or the running
/// mean and 1 / sqrt(running_var + eps) for Statistics::Frozen. dx may alias dy.
template <class S>
void backward(const Shape& shape, const S* dy, const S* x, S* dx, Statistics kind,
              const Param<S>* mean, const Param<S>* invstd, const Param<S>* weight,
              Param<S>* grad_weight, Param<S>* grad_bias, const Execution<Param<S>>& ex = {}) {
  detail::backward(shape, dy, x, dx, kind, detail::widened_mean(mean, shape, ex), invstd, weight,
                   grad_weight, grad_bias, ex);
}

/// After a forward with Fused{residual, true}: out = dy where that forward's output y was
/// positive, else 0. That is the gradient of the residual (dz); backward of it gives dx. out may
/// be dy, not y. `positive` may be the forward's y or the mask it wrote (Fused::positive).
template <class T, class Positive>
void relu_backward(Index n, const Positive* positive, const T* dy, T* out,
                   const Execution<Param<T>>& ex = {}) {
  static_assert(std::is_same_v<Positive, T> || std::is_same_v<Positive, std::uint8_t>,
                "bnorm: relu_backward takes the forward's y or its mask of bytes");
  if (n < 0) detail::fail("expected n >= 0, got " + std::to_string(n));
  if (n == 0) return;
  detail::check_pointer(positive, std::is_same_v<Positive, T> ? "y" : "positive");
  detail::check_pointer(dy, "dy");
  detail::check_pointer(out, "out");
  detail::relu_gradient(n, positive, dy, out, ex.device);
}

/// The passes whose plan describe_plan tells.
enum class Pass {
  Training,        ///< forward_training
  Inference,       ///< forward_inference
  Backward,        ///< backward with Statistics::Batch
  BackwardFrozen,  ///< backward with Statistics::Frozen and parameter gradients
};

/// What a call of `pass` on `shape` does on `threads` threads (the calling one included) under
/// the current Tuning: every decision of its plan, one a line. copy_input: the forward also
/// copies its input (as a module that keeps it does).
template <class T>
std::string describe_plan(const Shape& shape, Pass pass, Index threads = 1,
                          bool copy_input = false) {
  detail::check_shape(shape);
  if (threads < 1)
    throw std::invalid_argument("bnorm: describe_plan expects threads >= 1, got " +
                                std::to_string(threads));
  static const bnorm::detail::Traffic traffic[] = {{1, 1, false}, {0, 1, false}, {2, 2, false},
                                                   {2, 1, false}};
  bnorm::detail::Traffic t = traffic[int(pass)];
  t.copy = copy_input && (pass == Pass::Training || pass == Pass::Inference);
  return bnorm::detail::describe(bnorm::detail::make_plan<T>(detail::geometry(shape), t, threads));
}

}  // namespace functional
BNORM_END_NAMESPACE
