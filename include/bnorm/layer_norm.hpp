#pragma once
// LayerNorm and RMSNorm: PyTorch's nn.LayerNorm and nn.RMSNorm (2.4+) over Eigen tensors. Both
// normalize each input over its last normalized_shape.size() dims, with parameters per position
// of those dims; they differ in what they center on (the mean, or nothing) and in their options.

#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "detail/module.hpp"
#include "detail/parameters.hpp"
#include "functional_norms.hpp"
#include "options.hpp"

BNORM_BEGIN_NAMESPACE

namespace detail {

template <class Options>
struct RowNormTraits;
template <>
struct RowNormTraits<LayerNormOptions> {
  static constexpr RowCenter kCenter = RowCenter::Mean;
  static const char* name() { return "LayerNorm"; }
  static bool has_weight(const LayerNormOptions& o) { return o.elementwise_affine; }
  static bool has_bias(const LayerNormOptions& o) { return o.elementwise_affine && o.bias; }
  template <class Scalar>
  static double eps(const LayerNormOptions& o) { return o.eps; }
};
template <>
struct RowNormTraits<RMSNormOptions> {
  static constexpr RowCenter kCenter = RowCenter::Zero;
  static const char* name() { return "RMSNorm"; }
  static bool has_weight(const RMSNormOptions& o) { return o.elementwise_affine; }
  static bool has_bias(const RMSNormOptions&) { return false; }
  template <class Scalar>
  static double eps(const RMSNormOptions& o) {
    return o.eps ? *o.eps : double(std::numeric_limits<Scalar>::epsilon());
  }
};

}  // namespace detail

/// Normalization of each input over its last dims (normalized_shape), with a weight (and for
/// LayerNorm a bias) per position of them: LayerNorm and RMSNorm below. Inputs of any rank at
/// least normalized_shape.size(); training and eval give the same output.
template <class Scalar, class Opts>
class RowNorm : public detail::Module<RowNorm<Scalar, Opts>, Scalar, detail::Rows> {
  static_assert(!detail::kNarrow<Scalar>,
                "bnorm: LayerNorm and RMSNorm take float and double (16-bit storage is BatchNorm's)");
  using Base = detail::Module<RowNorm, Scalar, detail::Rows>;
  using Traits = detail::RowNormTraits<Opts>;
  friend Base;
  using Base::params_;

 public:
  using typename Base::Vector;

  explicit RowNorm(std::vector<Index> normalized_shape, Opts options = {})
      : normalized_shape_(std::move(normalized_shape)), options_(std::move(options)) {
    if (normalized_shape_.empty()) fail("expected a normalized_shape of at least one dim");
    width_ = 1;
    for (Index d : normalized_shape_) {
      if (d < 1) fail("expected normalized_shape's dims >= 1, got " + shape_string());
      width_ *= d;
    }
    eps_ = Traits::template eps<Scalar>(options_);
    Base::check_eps(eps_);
    params_ = detail::Parameters<Scalar>(width_, Traits::has_weight(options_),
                                         Traits::has_bias(options_));
  }

  // Parameters (empty tensors when absent) are flattened in row-major order.
  void reset_parameters() { params_.reset(); }

  const std::vector<Index>& normalized_shape() const { return normalized_shape_; }
  const Opts& options() const { return options_; }
  /// The eps in use (RMSNorm: the machine epsilon where options().eps is std::nullopt).
  double eps() const { return eps_; }
  static std::string name() { return Traits::name(); }

 private:
  using Base::fail;

  std::string shape_string() const {
    std::string s = "[";
    for (std::size_t i = 0; i < normalized_shape_.size(); ++i)
      s += (i ? ", " : "") + std::to_string(normalized_shape_[i]);
    return s + "]";
  }

  template <std::size_t R>
  detail::Rows problem(const std::array<Index, R>& d, bool) const {
    const std::size_t D = normalized_shape_.size();
    bool fits = R >= D;
    for (std::size_t i = 0; fits && i < D; ++i) fits = d[R - D + i] == normalized_shape_[i];
    if (!fits)
      fail("Given normalized_shape=" + shape_string() + ", expected input with shape [*, " +
           shape_string().substr(1) + ", but got input of size" + detail::dims_string(d));
    Index rows = 1;
    for (std::size_t i = 0; i + D < R; ++i) rows *= d[i];
    return {rows, width_};
  }

  void check_state() const { params_.check(this->failure()); }
  bool uses_batch_stats() const { return true; }
  bool infer_uses_batch_stats() const { return true; }
  bool keeps_input() const { return options_.save_input; }

  void infer_kernel(const detail::Rows& r, const Scalar* x, Scalar* y,
                    const Eigen::ThreadPoolDevice* device, bool) const {
    const functional::Execution<Scalar> own{device, nullptr};  // the calling thread's workspace
    detail::rows_forward<Traits::kCenter>(r, x, y, static_cast<Scalar*>(nullptr), eps_,
                                          params_.weight_ptr(), params_.bias_ptr(), nullptr,
                                          static_cast<Scalar*>(nullptr),
                                          functional::detail::workspace(own), device);
  }

  void forward_kernel(const detail::Rows& r, const Scalar* x, Scalar* y, Scalar* copy,
                      const functional::Execution<Scalar>& ex, bool) {
    saved_mean_.resize(std::size_t(r.rows));
    saved_invstd_.resize(std::size_t(r.rows));
    detail::rows_forward<Traits::kCenter>(r, x, y, copy, eps_, params_.weight_ptr(),
                                          params_.bias_ptr(), saved_mean_.data(),
                                          saved_invstd_.data(), *ex.workspace, ex.device);
  }

  void backward_kernel(const detail::Rows& r, const Scalar* dy, const Scalar* x, Scalar* dx,
                       const functional::Execution<Scalar>& ex) {
    detail::rows_backward<Traits::kCenter>(r, dy, x, dx, saved_mean_.data(),
                                           saved_invstd_.data(), params_.weight_ptr(),
                                           params_.step_weight_ptr(), params_.step_bias_ptr(),
                                           *ex.workspace, ex.device);
    params_.accumulate();
  }

  std::vector<Index> normalized_shape_;
  Opts options_;
  Index width_ = 1;
  double eps_ = 0;
  std::vector<double> saved_mean_;  // per row, unrounded (0 for RMSNorm)
  std::vector<Scalar> saved_invstd_;
};

/// PyTorch's nn.LayerNorm: y = (x - mean) / sqrt(var + eps) * weight + bias over the last dims,
/// with the biased variance.
template <class Scalar>
using LayerNorm = RowNorm<Scalar, LayerNormOptions>;

/// PyTorch's nn.RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight over the last dims.
template <class Scalar>
using RMSNorm = RowNorm<Scalar, RMSNormOptions>;

BNORM_END_NAMESPACE
