#pragma once
// The state modules share: learnable weight and bias with their gradients, and running
// statistics.

#include <cstdint>
#include <functional>
#include <optional>
#include <stdexcept>
#include <string>

#include "eigen.hpp"

BNORM_BEGIN_NAMESPACE
namespace detail {

/// A module's learnable weight (starts at 1) and bias (starts at 0), each of `size` values or
/// absent (empty), with their accumulated gradients and the last backward's own.
template <class Scalar>
struct Parameters {
  using Vector = Eigen::Tensor<Scalar, 1>;
  Vector weight, bias, grad_weight, grad_bias, step_grad_weight, step_grad_bias;
  std::ptrdiff_t size = 0;
  bool has_weight = false, has_bias = false;

  Parameters() = default;
  Parameters(std::ptrdiff_t size_, bool weight_, bool bias_)
      : size(size_), has_weight(weight_), has_bias(bias_) {
    for (Vector* v : {&weight, &grad_weight, &step_grad_weight}) v->resize(weight_ ? size : 0);
    for (Vector* v : {&bias, &grad_bias, &step_grad_bias}) v->resize(bias_ ? size : 0);
    reset();
    zero_grad();
  }
  void reset() {
    weight.setConstant(Scalar(1));
    bias.setZero();
  }
  void zero_grad() {
    grad_weight.setZero();
    grad_bias.setZero();
  }
  /// Adds the last backward's gradients to the accumulated ones.
  void accumulate() {
    if (has_weight) grad_weight += step_grad_weight;
    if (has_bias) grad_bias += step_grad_bias;
  }
  const Scalar* weight_ptr() const { return has_weight ? weight.data() : nullptr; }
  const Scalar* bias_ptr() const { return has_bias ? bias.data() : nullptr; }
  Scalar* step_weight_ptr() { return has_weight ? step_grad_weight.data() : nullptr; }
  Scalar* step_bias_ptr() { return has_bias ? step_grad_bias.data() : nullptr; }

  /// Fails (through fail(message)) where a caller resized a tensor through its accessor.
  template <class Fail>
  void check(const Fail& fail) const {
    auto check = [&](const Vector& v, bool present, const char* what) {
      const std::ptrdiff_t want = present ? size : 0;
      if (v.size() != want)
        fail(std::string(what) + " has " + std::to_string(v.size()) + " values, expected " +
             std::to_string(want));
    };
    check(weight, has_weight, "weight");
    check(bias, has_bias, "bias");
    check(grad_weight, has_weight, "grad_weight");
    check(grad_bias, has_bias, "grad_bias");
  }
};

/// Running mean (starts at 0) and variance (starts at 1) of `size` values each, or none, and
/// the count of training forwards that updated them.
template <class Scalar>
struct RunningStats {
  using Vector = Eigen::Tensor<Scalar, 1>;
  Vector mean, var;
  std::int64_t num_batches_tracked = 0;
  std::ptrdiff_t size = 0;
  bool tracked = false;

  RunningStats() = default;
  RunningStats(std::ptrdiff_t size_, bool tracked_) : size(size_), tracked(tracked_) {
    mean.resize(tracked ? size : 0);
    var.resize(tracked ? size : 0);
    reset();
  }
  void reset() {
    mean.setZero();
    var.setConstant(Scalar(1));
    num_batches_tracked = 0;
  }
  /// The weight of the next batch's statistics: momentum, or 1 / batches for a cumulative
  /// average (std::nullopt).
  double momentum_for(const std::optional<double>& momentum) const {
    return momentum ? *momentum : 1.0 / double(num_batches_tracked + 1);
  }
  template <class Fail>
  void check(const Fail& fail) const {
    auto check = [&](const Vector& v, const char* what) {
      const std::ptrdiff_t want = tracked ? size : 0;
      if (v.size() != want)
        fail(std::string(what) + " has " + std::to_string(v.size()) + " values, expected " +
             std::to_string(want));
    };
    check(mean, "running_mean");
    check(var, "running_var");
  }
};

/// The running statistics' public accessors, for the modules that keep them (Derived names
/// itself in errors).
template <class Derived, class Scalar>
class WithRunningStats {
 public:
  Eigen::Tensor<Scalar, 1>& running_mean() { return running_.mean; }
  const Eigen::Tensor<Scalar, 1>& running_mean() const { return running_.mean; }
  Eigen::Tensor<Scalar, 1>& running_var() { return running_.var; }
  const Eigen::Tensor<Scalar, 1>& running_var() const { return running_.var; }
  std::int64_t num_batches_tracked() const { return running_.num_batches_tracked; }
  /// Sets the count of training forwards (as loading a state does). Must be >= 0.
  void set_num_batches_tracked(std::int64_t n) {
    if (n < 0)
      throw std::invalid_argument("bnorm::" + static_cast<const Derived&>(*this).instance_name() +
                                  ": expected num_batches_tracked >= 0, got " + std::to_string(n));
    running_.num_batches_tracked = n;
  }
  void reset_running_stats() { running_.reset(); }

 protected:
  RunningStats<Scalar> running_;
};

}  // namespace detail
BNORM_END_NAMESPACE
