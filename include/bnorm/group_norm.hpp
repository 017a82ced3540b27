#pragma once
// GroupNorm: PyTorch's nn.GroupNorm over Eigen tensors.

#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "detail/module.hpp"
#include "detail/parameters.hpp"
#include "functional_norms.hpp"
#include "options.hpp"

BNORM_BEGIN_NAMESPACE

namespace detail {

/// The kernels' shape of an (N, C, *) input (ChannelsLast: (N, *, C)) of rank >= 2, or of an
/// unbatched (C, *) one (ChannelsLast: (*, C)) where `unbatched`; fails (through fail) where
/// the channel dim is not `channels`.
template <std::size_t R, class Fail>
functional::Shape channel_shape(const std::array<Index, R>& d, Index channels, Layout layout,
                                bool unbatched, const Fail& fail) {
  const bool last = layout == Layout::ChannelsLast;
  const std::size_t first = unbatched ? 0 : 1;  // the first dim after the batch
  const std::size_t channel_dim = last ? R - 1 : first;
  if (d[channel_dim] != channels)
    fail("expected " + std::to_string(channels) + " channels in dimension " +
         std::to_string(channel_dim) + (last ? " (ChannelsLast)" : " (ChannelsFirst)") +
         ", got input of shape " + dims_string(d));
  Index spatial = 1;
  for (std::size_t i = first; i < R; ++i)
    if (i != channel_dim) spatial *= d[i];
  return {unbatched ? 1 : d[0], channels, spatial, layout};
}

}  // namespace detail

/// GroupNorm: each sample's channels in num_groups groups, each normalized over its channels and
/// all their positions, with a weight and bias per channel. Inputs (N, C, *) of rank >= 2
/// ((N, *, C) with Layout::ChannelsLast); training and eval give the same output.
template <class Scalar>
class GroupNorm : public detail::Module<GroupNorm<Scalar>, Scalar, functional::Shape> {
  static_assert(!detail::kNarrow<Scalar>,
                "bnorm: GroupNorm takes float and double (16-bit storage is BatchNorm's)");
  using Base = detail::Module<GroupNorm, Scalar, functional::Shape>;
  friend Base;
  using Base::params_;

 public:
  using typename Base::Vector;

  GroupNorm(Index num_groups, Index num_channels, GroupNormOptions options = {})
      : groups_(num_groups), channels_(num_channels), options_(std::move(options)) {
    if (num_groups < 1 || num_channels < 1)
      fail("expected num_groups >= 1 and num_channels >= 1, got " + std::to_string(num_groups) +
           " and " + std::to_string(num_channels));
    if (num_channels % num_groups != 0)
      fail("num_channels must be divisible by num_groups, got num_channels " +
           std::to_string(num_channels) + " and num_groups " + std::to_string(num_groups));
    Base::check_eps(options_.eps);
    params_ = detail::Parameters<Scalar>(num_channels, options_.affine, options_.affine);
  }

  void reset_parameters() { params_.reset(); }

  Index num_groups() const { return groups_; }
  Index num_channels() const { return channels_; }
  const GroupNormOptions& options() const { return options_; }
  static std::string name() { return "GroupNorm"; }

 private:
  using Base::fail;

  template <std::size_t R>
  functional::Shape problem(const std::array<Index, R>& d, bool) const {
    if (R < 2) fail("expected input of at least 2 dims (N, C, *), got " + detail::dims_string(d));
    return detail::channel_shape(d, channels_, options_.layout, false, this->failure());
  }

  void check_state() const { params_.check(this->failure()); }
  bool uses_batch_stats() const { return true; }
  bool infer_uses_batch_stats() const { return true; }
  bool keeps_input() const { return options_.save_input; }

  void infer_kernel(const functional::Shape& shape, const Scalar* x, Scalar* y,
                    const Eigen::ThreadPoolDevice* device, bool) const {
    functional::group_norm_forward<Scalar>(shape, groups_, x, y, options_.eps,
                                           {params_.weight_ptr(), params_.bias_ptr()}, {},
                                           {device, nullptr});
  }

  void forward_kernel(const functional::Shape& shape, const Scalar* x, Scalar* y, Scalar* copy,
                      const functional::Execution<Scalar>& ex, bool) {
    saved_mean_.resize(std::size_t(shape.batch * groups_));
    saved_invstd_.resize(std::size_t(shape.batch * groups_));
    functional::detail::group_norm_forward<Scalar>(
        shape, groups_, x, y, options_.eps, {params_.weight_ptr(), params_.bias_ptr()},
        {nullptr, saved_invstd_.data()}, ex, copy, saved_mean_.data());
  }

  void backward_kernel(const functional::Shape& shape, const Scalar* dy, const Scalar* x,
                       Scalar* dx, const functional::Execution<Scalar>& ex) {
    functional::detail::group_norm_backward(shape, groups_, dy, x, dx, saved_mean_.data(),
                                            saved_invstd_.data(), params_.weight_ptr(),
                                            params_.step_weight_ptr(), params_.step_bias_ptr(),
                                            ex);
    params_.accumulate();
  }

  Index groups_, channels_;
  GroupNormOptions options_;
  std::vector<double> saved_mean_;  // per sample and group, unrounded
  std::vector<Scalar> saved_invstd_;
};

BNORM_END_NAMESPACE
