#pragma once
// InstanceNorm1d / InstanceNorm2d / InstanceNorm3d: PyTorch's nn.InstanceNorm*d over Eigen
// tensors. Instance statistics are GroupNorm's with one group per channel; statistics tracked
// for eval are used as BatchNorm's running ones are.

#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "group_norm.hpp"

BNORM_BEGIN_NAMESPACE

/// Instance normalization: each sample's channels normalized over their own positions, in
/// inputs with `Spatial` spatial dims, batched ((N, C, *), rank Spatial + 2) or not ((C, *)).
/// With track_running_stats, training updates running statistics that eval mode uses; else eval
/// normalizes with the input's own too. Differs from PyTorch in one way: an input with another
/// channel count is an error even where affine and track_running_stats are off (PyTorch warns).
template <class Scalar, int Spatial>
class InstanceNorm
    : public detail::Module<InstanceNorm<Scalar, Spatial>, Scalar, functional::Shape>,
      public detail::WithRunningStats<InstanceNorm<Scalar, Spatial>, Scalar> {
  static_assert(!detail::kNarrow<Scalar>,
                "bnorm: InstanceNorm takes float and double (16-bit storage is BatchNorm's)");
  using Base = detail::Module<InstanceNorm, Scalar, functional::Shape>;
  friend Base;
  using Base::params_;
  using detail::WithRunningStats<InstanceNorm, Scalar>::running_;

 public:
  using typename Base::Vector;

  explicit InstanceNorm(Index num_features, InstanceNormOptions options = {})
      : num_features_(num_features), options_(std::move(options)) {
    if (num_features < 1) fail("expected num_features >= 1, got " + std::to_string(num_features));
    Base::check_eps(options_.eps);
    Base::check_momentum(options_.momentum);
    params_ = detail::Parameters<Scalar>(num_features, options_.affine, options_.affine);
    running_ = detail::RunningStats<Scalar>(num_features, options_.track_running_stats);
  }

  // Parameters and running statistics: empty tensors when affine / track_running_stats is off.
  // num_batches_tracked() stays 0, as PyTorch's InstanceNorm never counts its batches
  // (momentum std::nullopt means no update there, not a cumulative average).
  void reset_parameters() {
    running_.reset();
    params_.reset();
  }

  Index num_features() const { return num_features_; }
  const InstanceNormOptions& options() const { return options_; }
  static std::string name() { return "InstanceNorm" + std::to_string(Spatial) + "d"; }

 private:
  using Base::fail;

  template <std::size_t R>
  functional::Shape problem(const std::array<Index, R>& d, bool batch_stats) const {
    constexpr int Rank = int(R);
    if (Rank != Spatial + 1 && Rank != Spatial + 2)
      fail("expected " + std::to_string(Spatial + 1) + "D or " + std::to_string(Spatial + 2) +
           "D input (got " + std::to_string(Rank) + "D input)");
    const functional::Shape shape = detail::channel_shape(d, num_features_, options_.layout,
                                                          Rank == Spatial + 1, this->failure());
    if (batch_stats && shape.spatial == 1)
      fail("Expected more than 1 spatial element when training, got input size " +
           detail::dims_string(d));
    return shape;
  }

  void check_state() const {
    params_.check(this->failure());
    running_.check(this->failure());
  }
  bool uses_batch_stats() const { return this->training_ || !options_.track_running_stats; }
  bool infer_uses_batch_stats() const { return !options_.track_running_stats; }
  bool keeps_input() const { return options_.save_input; }

  functional::Affine<Scalar> affine() const { return {params_.weight_ptr(), params_.bias_ptr()}; }

  void infer_kernel(const functional::Shape& shape, const Scalar* x, Scalar* y,
                    const Eigen::ThreadPoolDevice* device, bool batch_stats) const {
    const functional::Execution<Scalar> own{device, nullptr};
    if (batch_stats)
      functional::instance_norm_forward<Scalar>(shape, x, y, options_.eps, affine(), {}, {}, own);
    else
      functional::forward_inference<Scalar>(shape, x, y, options_.eps, affine(),
                                            running_.mean.data(), running_.var.data(), own);
  }

  void forward_kernel(const functional::Shape& shape, const Scalar* x, Scalar* y, Scalar* copy,
                      const functional::Execution<Scalar>& ex, bool batch_stats) {
    saved_batch_ = batch_stats;
    const Index C = num_features_, stats = batch_stats ? shape.batch * C : C;
    saved_mean_.resize(std::size_t(stats));
    saved_invstd_.resize(std::size_t(stats));
    if (!batch_stats) {
      functional::detail::forward_inference(shape, x, y, options_.eps, affine(),
                                            running_.mean.data(), running_.var.data(), ex, copy,
                                            saved_invstd_.data());
      for (Index c = 0; c < C; ++c) saved_mean_[std::size_t(c)] = double(running_.mean(c));
      return;
    }
    functional::detail::group_norm_forward<Scalar>(shape, C, x, y, options_.eps, affine(),
                                                   {nullptr, saved_invstd_.data()}, ex, copy,
                                                   saved_mean_.data());
    if (this->training_ && options_.track_running_stats)
      functional::detail::update_instance_running<Scalar>(
          shape, ex.workspace->group_stats,
          {running_.mean.data(), running_.var.data(), options_.momentum.value_or(0.0), true});
  }

  void backward_kernel(const functional::Shape& shape, const Scalar* dy, const Scalar* x,
                       Scalar* dx, const functional::Execution<Scalar>& ex) {
    if (saved_batch_)
      functional::detail::group_norm_backward(shape, num_features_, dy, x, dx,
                                              saved_mean_.data(), saved_invstd_.data(),
                                              params_.weight_ptr(), params_.step_weight_ptr(),
                                              params_.step_bias_ptr(), ex);
    else
      functional::detail::backward(shape, dy, x, dx, functional::Statistics::Frozen,
                                   saved_mean_.data(), saved_invstd_.data(),
                                   params_.weight_ptr(), params_.step_weight_ptr(),
                                   params_.step_bias_ptr(), ex);
    params_.accumulate();
  }

  Index num_features_;
  InstanceNormOptions options_;
  bool saved_batch_ = true;
  std::vector<double> saved_mean_;  // per sample and channel (batch statistics) or per channel
  std::vector<Scalar> saved_invstd_;
};

template <class Scalar>
using InstanceNorm1d = InstanceNorm<Scalar, 1>;
template <class Scalar>
using InstanceNorm2d = InstanceNorm<Scalar, 2>;
template <class Scalar>
using InstanceNorm3d = InstanceNorm<Scalar, 3>;

BNORM_END_NAMESPACE
