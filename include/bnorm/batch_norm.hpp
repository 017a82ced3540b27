#pragma once
// BatchNorm1d / BatchNorm2d / BatchNorm3d: PyTorch's nn.BatchNorm*d over Eigen tensors.

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "detail/batch_sync.hpp"
#include "detail/isa.hpp"
#include "detail/module.hpp"
#include "detail/parameters.hpp"
#include "functional.hpp"
#include "options.hpp"

BNORM_BEGIN_NAMESPACE

using Index = std::ptrdiff_t;

/// Batch normalization over the channel dimension of tensors of rank MinRank..MaxRank.
/// BatchNorm1d, BatchNorm2d and BatchNorm3d below are the three instances. forward, infer and
/// backward, and thread safety: see detail::Module.
template <class Scalar, int MinRank, int MaxRank>
class BatchNorm
    : public detail::Module<BatchNorm<Scalar, MinRank, MaxRank>, Scalar, functional::Shape>,
      public detail::WithRunningStats<BatchNorm<Scalar, MinRank, MaxRank>,
                                      functional::Param<Scalar>> {
  using Base = detail::Module<BatchNorm, Scalar, functional::Shape>;
  friend Base;
  using Base::params_;
  using detail::WithRunningStats<BatchNorm, functional::Param<Scalar>>::running_;

 public:
  using typename Base::Vector;
  using typename Base::Param;
  template <int Rank>
  using Output = typename Base::template Output<Rank>;

  explicit BatchNorm(Index num_features, Options options = {})
      : BatchNorm(num_features, std::move(options), nullptr) {}

  // Parameters and running statistics: empty tensors when affine / track_running_stats is off.
  void reset_parameters() {
    running_.reset();
    params_.reset();
  }

  Index num_features() const { return num_features_; }
  const Options& options() const { return options_; }

  /// y = act(bn(x) + z), with act Options::activation, in the elementwise pass that writes y:
  /// ResNet's residual add. z has x's dims and storage; y may be x or z. Otherwise forward's.
  template <class X, class Z, class Y>
  void forward_add(const X& x, const Z& z, Y&& y) {
    forward_add_impl(x, z, y, nullptr);
  }
  template <class X, class Z, class Y>
  void forward_add(const X& x, const Z& z, Y&& y, const Eigen::ThreadPoolDevice& device) {
    forward_add_impl(x, z, y, &device);
  }
  /// After forward_add: dz, the gradient with respect to z (dy masked by the ReLU where there is
  /// one), and dx, the batch norm's backward of dz; the parameters' gradients as backward's.
  /// dz may be dy.
  template <class DY, class DX, class DZ>
  void backward_add(const DY& dy, DX&& dx, DZ&& dz) {
    backward_add_impl(dy, dx, dz, nullptr);
  }
  template <class DY, class DX, class DZ>
  void backward_add(const DY& dy, DX&& dx, DZ&& dz, const Eigen::ThreadPoolDevice& device) {
    backward_add_impl(dy, dx, dz, &device);
  }
  /// The same, given the forward's input x again (as backward(x, dy, dx), for save_input = false).
  template <class X, class DY, class DX, class DZ,
            class = std::enable_if_t<!std::is_same_v<std::decay_t<DZ>, Eigen::ThreadPoolDevice>>>
  void backward_add(const X& x, const DY& dy, DX&& dx, DZ&& dz) {
    backward_add_impl(dy, dx, dz, nullptr, &x);
  }
  template <class X, class DY, class DX, class DZ>
  void backward_add(const X& x, const DY& dy, DX&& dx, DZ&& dz,
                    const Eigen::ThreadPoolDevice& device) {
    backward_add_impl(dy, dx, dz, &device, &x);
  }

  /// "BatchNorm1d", "BatchNorm2d" or "BatchNorm3d".
  static std::string name() { return "BatchNorm" + std::to_string(MaxRank - 2) + "d"; }
  /// name(), or "Sync" + name() for a SyncBatchNorm: the name its errors give.
  std::string instance_name() const { return synchronized_ ? "Sync" + name() : name(); }

 protected:
  /// SyncBatchNorm's: training forwards normalize with the statistics of the batch of every
  /// rank of `comm` (see sync.hpp).
  BatchNorm(Index num_features, Options options, Communicator& comm)
      : BatchNorm(num_features, std::move(options), &comm) {}

  detail::BatchSync<Scalar>& sync() { return sync_; }
  const detail::BatchSync<Scalar>& sync() const { return sync_; }

 private:
  using Base::fail;

  /// comm: SyncBatchNorm's, or null.
  BatchNorm(Index num_features, Options options, Communicator* comm)
      : num_features_(num_features), options_(std::move(options)), synchronized_(comm != nullptr) {
    if (num_features < 1) fail("expected num_features >= 1, got " + std::to_string(num_features));
    Base::check_eps(options_.eps);
    Base::check_momentum(options_.momentum);
    if (options_.virtual_batch_size < 0)
      fail("expected virtual_batch_size >= 0 (0: off), got " +
           std::to_string(options_.virtual_batch_size));
    if (const auto& rn = options_.renorm) {
      if (!(rn->rmax >= 1) || !std::isfinite(rn->rmax) || !(rn->dmax >= 0) ||
          !std::isfinite(rn->dmax))
        fail("expected renorm's rmax >= 1 and dmax >= 0, both finite, got rmax " +
             std::to_string(rn->rmax) + ", dmax " + std::to_string(rn->dmax));
      if (!options_.track_running_stats)
        fail("renorm corrects the batch statistics toward the running ones: it needs "
             "track_running_stats");
      if (options_.virtual_batch_size > 0)
        fail("renorm and virtual_batch_size together are not supported");
    }
    params_ = detail::Parameters<Param>(num_features, options_.affine, options_.affine);
    running_ = detail::RunningStats<Param>(num_features, options_.track_running_stats);
    saved_mean_.resize(std::size_t(num_features));
    saved_invstd_.resize(std::size_t(num_features));
    if (!comm) return;
    if (options_.virtual_batch_size != 0)
      fail("expected virtual_batch_size 0 (Ghost BN splits one rank's batch, not the ranks' "
           "whole), got " + std::to_string(options_.virtual_batch_size));
    sync_ = detail::BatchSync<Scalar>(*comm, num_features, instance_name());
  }

  /// Sets a pointer for the length of one call.
  template <class P>
  struct During {
    P*& slot;
    During(P*& s, P* value) : slot(s) { slot = value; }
    ~During() { slot = nullptr; }
  };

  template <class X, class Z, class Y>
  void forward_add_impl(const X& x, const Z& z, Y& y, const Eigen::ThreadPoolDevice* device) {
    this->guarded(true, this->uses_batch_stats(), [&] { Base::check_like_input(x, z, "z"); });
    const During<const Scalar> during(residual_, z.data());
    if (device) Base::forward(x, y, *device);
    else Base::forward(x, y);
  }

  /// x: the forward's input given again, or null (the module's copy).
  template <class DY, class DX, class DZ, class X = DY>
  void backward_add_impl(const DY& dy, DX& dx, DZ& dz, const Eigen::ThreadPoolDevice* device,
                         const X* x = nullptr) {
    this->guarded(false, false, [&] {
      if (!saved_residual_)
        throw std::logic_error("bnorm::" + name() + ": backward_add needs the last forward to "
                               "be forward_add (backward gives the gradient of a forward)");
      this->check_like_saved(dz, "dz");
    });
    const During<Scalar> during(residual_grad_, dz.data());
    if (x && device) Base::backward(*x, dy, dx, *device);
    else if (x) Base::backward(*x, dy, dx);
    else if (device) Base::backward(dy, dx, *device);
    else Base::backward(dy, dx);
  }

  static std::string rank_expectation() {
    if (MinRank == MaxRank) return std::to_string(MinRank) + "D";
    return std::to_string(MinRank) + "D or " + std::to_string(MaxRank) + "D";
  }

  /// Checks an input's rank and channel count (and, with batch statistics, that a channel has
  /// more than one value); returns its shape for the kernels.
  template <std::size_t R>
  functional::Shape problem(const std::array<Index, R>& d, bool batch_stats) const {
    constexpr int Rank = int(R);
    if (Rank < MinRank || Rank > MaxRank)
      fail("expected " + rank_expectation() + " input (got " + std::to_string(Rank) + "D input)");
    const bool last = options_.layout == Layout::ChannelsLast;
    const int channel_dim = last ? Rank - 1 : 1;
    const Index C = d[std::size_t(channel_dim)];
    if (C != num_features_)
      fail("expected " + std::to_string(num_features_) + " channels in dimension " +
           std::to_string(channel_dim) + (last ? " (ChannelsLast)" : " (ChannelsFirst)") +
           ", got input of shape " + detail::dims_string(d));
    Index spatial = 1;
    for (int i = 1; i < Rank; ++i)
      if (i != channel_dim) spatial *= d[std::size_t(i)];
    const functional::Shape shape{d[0], C, spatial, options_.layout};
    // A synchronized forward checks the whole batch's count instead (merge_moments).
    if (batch_stats && shape.per_channel() == 1 && !syncing(batch_stats))
      fail("Expected more than 1 value per channel when training, got input size " +
           detail::dims_string(d));
    return shape;
  }

  /// A training forward's chunks (Ghost BN) need more than one value per channel each.
  template <std::size_t R>
  void check_forward_problem(const functional::Shape& shape, const std::array<Index, R>& d,
                             bool batch_stats) const {
    if (!ghost(shape, batch_stats) || shape.size() == 0) return;
    const Index V = options_.virtual_batch_size, rest = shape.batch % V;
    if (V * shape.spatial == 1 || rest * shape.spatial == 1)
      fail("Expected more than 1 value per channel in every virtual batch of " +
           std::to_string(V) + " samples, got input size " + detail::dims_string(d));
  }

  /// Whether a forward of `shape` normalizes chunks of virtual_batch_size samples (Ghost BN).
  bool ghost(const functional::Shape& shape, bool batch_stats) const {
    return batch_stats && this->training_ && options_.virtual_batch_size > 0 &&
           options_.virtual_batch_size < shape.batch;
  }

  /// A column-major (samples, features) matrix stores each feature's values together: the
  /// channels-first geometry of one batch row whose positions are the samples.
  static constexpr bool kColumnMajorMatrices = true;
  functional::Shape column_major_problem(const functional::Shape& s, bool batch_stats) const {
    if (ghost(s, batch_stats))  // batch_stats: in a training forward
      fail("virtual_batch_size needs the samples' rows whole: a row-major matrix or a tensor, "
           "not a column-major matrix");
    return {1, s.channels, s.batch * s.spatial, Layout::ChannelsFirst};
  }

  template <std::size_t R>
  void check_input(const Scalar* x, const functional::Shape& shape,
                   const std::array<Index, R>&) const {
    if (!options_.check_finite) return;
    for (Index i = 0; i < shape.size(); ++i)
      if (!std::isfinite(detail::computed(x[i])))
        fail("input holds a non-finite value at flat index " + std::to_string(i) +
             " (Options::check_finite)");
  }

  /// Parameters and buffers must still have num_features values (the accessors let a caller
  /// resize them).
  void check_state() const {
    params_.check(this->failure());
    running_.check(this->failure());
  }

  bool uses_batch_stats() const { return this->training_ || !options_.track_running_stats; }

  /// Whether a forward merges its statistics with the other ranks' (SyncBatchNorm in training,
  /// as PyTorch's: in eval mode each rank is on its own).
  bool syncing(bool batch_stats) const {
    return sync_.active() && this->training_ && batch_stats;
  }
  /// Every rank takes part in a synchronized forward, with an empty batch too.
  bool runs_on_empty(bool batch_stats) const { return syncing(batch_stats); }

  /// A synchronized forward merges the ranks' statistics before it changes anything.
  template <std::size_t R>
  void prepare_forward(const functional::Shape& shape, const Scalar* x,
                       const functional::Execution<Param>& ex, bool batch_stats,
                       const std::array<Index, R>& d) {
    if (!syncing(batch_stats)) return;
    sync_.merge_moments(shape, x, ex);
    if (sync_.count() == 1)  // every rank throws alike
      fail("Expected more than 1 value per channel when training, got 1 over all ranks (this "
           "rank's input size " + detail::dims_string(d) + ")");
  }

  void rejected(bool forward, bool batch_stats) noexcept {
    if (forward ? syncing(batch_stats) : saved_synced_) sync_.reject(forward, num_features_);
  }
  bool infer_uses_batch_stats() const { return !options_.track_running_stats; }
  bool keeps_input() const { return options_.save_input; }

  void infer_kernel(const functional::Shape& shape, const Scalar* x, Scalar* y,
                    const Eigen::ThreadPoolDevice* device, bool batch_stats) const {
    // The calling thread's own workspace: nothing of the module is written.
    const functional::Execution<Param> ex{device, nullptr};
    const functional::Affine<Param> affine{params_.weight_ptr(), params_.bias_ptr()};
    const functional::Fused<Scalar> fused{nullptr, relu()};
    if (batch_stats)
      functional::forward_training<Scalar>(shape, x, y, options_.eps, affine, {}, {}, ex, fused);
    else
      functional::forward_inference<Scalar>(shape, x, y, options_.eps, affine,
                                            running_.mean.data(), running_.var.data(), ex, fused);
  }

  bool relu() const { return options_.activation == Activation::ReLU; }

  void forward_kernel(const functional::Shape& shape, const Scalar* x, Scalar* y, Scalar* copy,
                      const functional::Execution<Param>& ex, bool batch_stats) {
    const functional::Affine<Param> affine{params_.weight_ptr(), params_.bias_ptr()};
    const functional::Fused<Scalar> fused = fused_for(shape.size());
    saved_synced_ = syncing(batch_stats);
    saved_renorm_ = batch_stats && this->training_ && options_.renorm.has_value();
    saved_residual_ = residual_ != nullptr;
    if (saved_synced_) {
      synced_forward(shape, x, y, copy, ex, fused);
    } else if (!batch_stats) {
      functional::detail::forward_inference<Scalar, true>(
          shape, x, y, options_.eps, affine, running_.mean.data(), running_.var.data(), ex, copy,
          saved_invstd_.data(), fused);
      for (Index c = 0; c < num_features_; ++c)
        saved_mean_[std::size_t(c)] = double(running_.mean(c));
    } else if (ghost(shape, batch_stats)) {
      ghost_forward(shape, x, y, copy, ex, fused);
    } else {
      functional::Running<Param> running;
      const bool update = this->training_ && options_.track_running_stats;
      if (update)
        running = {running_.mean.data(), running_.var.data(),
                   running_.momentum_for(options_.momentum),
                   options_.running_variance == RunningVariance::Unbiased};
      functional::detail::forward_training<Scalar, true>(
          shape, x, y, options_.eps, affine, {nullptr, saved_invstd_.data()}, running, ex, copy,
          saved_mean_.data(), renormalize(), fused);
      if (update) ++running_.num_batches_tracked;
    }
    if (!ghost(shape, batch_stats)) saved_chunks_ = 1;
    saved_kind_ = batch_stats ? functional::Statistics::Batch : functional::Statistics::Frozen;
  }

  void backward_kernel(const functional::Shape& shape, const Scalar* dy, const Scalar* x,
                       Scalar* dx, const functional::Execution<Param>& ex) {
    // Batch Renormalization's r and d are constants to backward: BatchNorm's backward with the
    // weight scaled by r, then the weight's gradient r * sum(dy * xhat) + d * sum(dy).
    const Param* weight = saved_renorm_ ? renorm_weight() : params_.weight_ptr();
    Param* gw = params_.step_weight_ptr();
    Param* gb = params_.step_bias_ptr();
    // A fused ReLU's gradient, dy where the output was positive, else 0, goes to dz (backward_add)
    // or to dx, and is then the batch norm's dy.
    if (relu() || residual_grad_) {
      Scalar* masked = residual_grad_ ? residual_grad_ : dx;
      mask_gradient(dy, masked, shape.size(), ex.device);
      dy = masked;
    }
    if (saved_synced_) {
      sync_.backward(shape, dy, x, dx, saved_mean_.data(), saved_invstd_.data(), weight, gw, gb,
                     ex);
    } else if (saved_chunks_ > 1) {
      ghost_backward(shape, dy, x, dx, ex);
    } else {
      functional::detail::backward(shape, dy, x, dx, saved_kind_, saved_mean_.data(),
                                   saved_invstd_.data(), weight, gw, gb, ex);
    }
    if (saved_renorm_ && gw)
      for (Index c = 0; c < num_features_; ++c) {
        const std::size_t i = std::size_t(c);
        gw[c] = Param(saved_r_[i] * double(gw[c]) + saved_d_[i] * double(gb[c]));
      }
    params_.accumulate();
  }

  /// A forward's epilogue: the residual of forward_add, the ReLU, and where the ReLU's gradient
  /// mask goes (one byte per value, 1 where the output is positive), written by the pass that
  /// writes y.
  functional::Fused<Scalar> fused_for(Index n) {
    if (!relu()) return {residual_, false, nullptr};
    saved_mask_.resize(std::size_t(n));
    return {residual_, true, saved_mask_.data()};
  }

  /// out = dy where the ReLU passed its input (all of it without ReLU), else 0; out may be dy.
  void mask_gradient(const Scalar* dy, Scalar* out, Index n,
                     const Eigen::ThreadPoolDevice* device) const {
    if (relu()) {
      functional::detail::relu_gradient(n, saved_mask_.data(), dy, out, device);
    } else {
      detail::parallel_ranges(device, n,
                              [&](Index i0, Index i1) { std::copy(dy + i0, dy + i1, out + i0); });
    }
  }

  /// Batch Renormalization's part of a training forward, or none.
  functional::detail::Renormalize<Param> renormalize() {
    if (!saved_renorm_) return {};
    saved_r_.resize(std::size_t(num_features_));
    saved_d_.resize(std::size_t(num_features_));
    return {options_.renorm->rmax, options_.renorm->dmax, running_.mean.data(),
            running_.var.data(), saved_r_.data(), saved_d_.data()};
  }

  /// The weight times the last forward's r, per channel.
  const Param* renorm_weight() {
    renorm_weight_.resize(std::size_t(num_features_));
    for (Index c = 0; c < num_features_; ++c)
      renorm_weight_[std::size_t(c)] =
          Param((params_.weight_ptr() ? double(params_.weight_ptr()[c]) : 1.0) *
                 saved_r_[std::size_t(c)]);
    return renorm_weight_.data();
  }

  /// A synchronized training forward: x normalized with the whole batch's statistics, which
  /// prepare_forward merged; the running statistics move toward them on every rank alike.
  void synced_forward(const functional::Shape& shape, const Scalar* x, Scalar* y, Scalar* copy,
                      const functional::Execution<Param>& ex,
                      const functional::Fused<Scalar>& fused) {
    if (sync_.count() == 0) return;  // every rank's batch empty: nothing to learn
    functional::Running<Param> running;
    if (options_.track_running_stats)
      running = {running_.mean.data(), running_.var.data(),
                 running_.momentum_for(options_.momentum),
                 options_.running_variance == RunningVariance::Unbiased};
    functional::detail::forward_from_moments<Scalar, true>(
        shape, sync_.totals(), x, y, options_.eps,
        functional::Affine<Param>{params_.weight_ptr(), params_.bias_ptr()},
        {nullptr, saved_invstd_.data()}, running, ex, copy, saved_mean_.data(), renormalize(),
        fused);
    if (options_.track_running_stats) ++running_.num_batches_tracked;
  }

  /// The samples of chunk k: [k * V, min(N, (k + 1) * V)), at k * V * C * spatial values in.
  functional::Shape chunk(const functional::Shape& shape, Index k) const {
    const Index V = options_.virtual_batch_size;
    return {std::min(V, shape.batch - k * V), shape.channels, shape.spatial, shape.layout};
  }

  /// Ghost BN's training forward: each chunk normalized with its own statistics (kept for
  /// backward, chunk by chunk), then the running statistics moved once toward the plain mean
  /// over the chunks of their means and variances.
  void ghost_forward(const functional::Shape& shape, const Scalar* x, Scalar* y, Scalar* copy,
                     const functional::Execution<Param>& ex,
                     const functional::Fused<Scalar>& fused) {
    const Index V = options_.virtual_batch_size, C = num_features_;
    const Index chunks = (shape.batch + V - 1) / V, stride = V * C * shape.spatial;
    const bool update = options_.track_running_stats;
    saved_mean_.resize(std::size_t(chunks * C));
    saved_invstd_.resize(std::size_t(chunks * C));
    ghost_scratch_.assign(std::size_t(2 * C), Param(0));  // each chunk's mean, variance
    std::vector<double>& sums = ghost_sums_;
    sums.assign(std::size_t(2 * C), 0.0);
    const functional::Affine<Param> affine{params_.weight_ptr(), params_.bias_ptr()};
    for (Index k = 0; k < chunks; ++k) {
      const Index off = k * stride;
      // Momentum 1: the chunk's own variance (unbiased unless Biased), rounded to Scalar.
      const functional::Running<Param> own{nullptr, ghost_scratch_.data() + C, 1.0,
                                            options_.running_variance ==
                                                RunningVariance::Unbiased};
      functional::detail::forward_training<Scalar, true>(
          chunk(shape, k), x + off, y + off, options_.eps, affine,
          {nullptr, saved_invstd_.data() + k * C}, update ? own : functional::Running<Param>{},
          ex, copy ? copy + off : nullptr, saved_mean_.data() + k * C, {},
          {fused.residual ? fused.residual + off : nullptr, fused.relu,
           fused.positive ? fused.positive + off : nullptr},
          chunks);
      for (Index c = 0; c < C; ++c) {
        sums[std::size_t(c)] += saved_mean_[std::size_t(k * C + c)];
        sums[std::size_t(C + c)] += double(ghost_scratch_[std::size_t(C + c)]);
      }
    }
    saved_chunks_ = chunks;
    if (!update) return;
    const double m = running_.momentum_for(options_.momentum);
    for (Index c = 0; c < C; ++c) {
      running_.mean(c) = Param((1 - m) * double(running_.mean(c)) +
                                m * sums[std::size_t(c)] / double(chunks));
      running_.var(c) = Param((1 - m) * double(running_.var(c)) +
                               m * sums[std::size_t(C + c)] / double(chunks));
    }
    ++running_.num_batches_tracked;
  }

  /// Ghost BN's backward: chunk by chunk with the chunk's statistics; the parameters' gradients
  /// summed over the chunks in order.
  void ghost_backward(const functional::Shape& shape, const Scalar* dy, const Scalar* x,
                      Scalar* dx, const functional::Execution<Param>& ex) {
    const Index C = num_features_, stride = options_.virtual_batch_size * C * shape.spatial;
    Param* gw = params_.step_weight_ptr();
    Param* gb = params_.step_bias_ptr();
    ghost_scratch_.resize(std::size_t(2 * C));
    ghost_sums_.assign(std::size_t(2 * C), 0.0);
    for (Index k = 0; k < saved_chunks_; ++k) {
      const Index off = k * stride;
      functional::detail::backward(chunk(shape, k), dy + off, x + off, dx + off,
                                   functional::Statistics::Batch, saved_mean_.data() + k * C,
                                   saved_invstd_.data() + k * C, params_.weight_ptr(),
                                   gw ? ghost_scratch_.data() : nullptr,
                                   gb ? ghost_scratch_.data() + C : nullptr, ex,
                                   saved_chunks_);
      for (Index c = 0; c < C; ++c) {
        if (gw) ghost_sums_[std::size_t(c)] += double(ghost_scratch_[std::size_t(c)]);
        if (gb) ghost_sums_[std::size_t(C + c)] += double(ghost_scratch_[std::size_t(C + c)]);
      }
    }
    for (Index c = 0; c < C; ++c) {
      if (gw) gw[c] = Param(ghost_sums_[std::size_t(c)]);
      if (gb) gb[c] = Param(ghost_sums_[std::size_t(C + c)]);
    }
  }

  Index num_features_;
  Options options_;
  bool synchronized_;  // SyncBatchNorm's

  // What backward needs from the last forward, beside its input: its statistics, one set per
  // chunk of Ghost BN (saved_chunks_ of them).
  functional::Statistics saved_kind_ = functional::Statistics::Batch;
  Index saved_chunks_ = 1;
  bool saved_synced_ = false;  // with the statistics of every rank's batch: backward merges too
  bool saved_renorm_ = false;  // with Batch Renormalization's r and d, per channel
  bool saved_residual_ = false;  // a forward_add
  std::vector<std::uint8_t> saved_mask_;  // with ReLU: where the output was positive
  // During forward_add / backward_add: the residual z, and where its gradient goes.
  const Scalar* residual_ = nullptr;
  Scalar* residual_grad_ = nullptr;
  std::vector<double> saved_r_, saved_d_;
  std::vector<Param> renorm_weight_;
  detail::BatchSync<Scalar> sync_;  // inactive but in SyncBatchNorm
  std::vector<Param> ghost_scratch_;
  std::vector<double> ghost_sums_;
  std::vector<Param> saved_invstd_;
  std::vector<double> saved_mean_;  // unrounded: backward centers x on the exact batch mean
};

template <class Scalar>
using BatchNorm1d = BatchNorm<Scalar, 2, 3>;
template <class Scalar>
using BatchNorm2d = BatchNorm<Scalar, 4, 4>;
template <class Scalar>
using BatchNorm3d = BatchNorm<Scalar, 5, 5>;

BNORM_END_NAMESPACE
