#pragma once
// Folding an eval-mode batch norm into the Linear or Conv layer before it, for inference:
// BN(W x + b) = (s W) x + (b - running_mean) s + beta, with s = weight / sqrt(running_var + eps).

#include <cmath>
#include <cstddef>
#include <stdexcept>
#include <string>
#include <vector>

#include "batch_norm.hpp"

BNORM_BEGIN_NAMESPACE

/// Folds bn's running statistics and affine parameters into the layer before it. `weight` holds
/// out_channels x fan_in values, out channel first (PyTorch's Linear and ConvNd layout), `bias`
/// out_channels values (a zeroed buffer where the layer had none); both are updated in place,
/// computed in double. out_channels is bn.num_features(). bn must track running statistics; it
/// is used as in eval mode whatever its mode, and is not changed. Checks everything before it
/// writes anything.
template <class Scalar, int MinRank, int MaxRank, class W>
void fold_into_previous(const BatchNorm<Scalar, MinRank, MaxRank>& bn, W* weight, Index fan_in,
                        W* bias) {
  const auto fail = [](const std::string& what) {
    throw std::invalid_argument("bnorm: fold_into_previous: " + what);
  };
  if (!bn.options().track_running_stats)
    fail("expected a module with running statistics (track_running_stats = true), got one "
         "without");
  if (fan_in < 1) fail("expected fan_in >= 1, got " + std::to_string(fan_in));
  if (weight == nullptr) fail("expected a weight buffer, got a null pointer");
  if (bias == nullptr)
    fail("expected a bias buffer (a zeroed one where the layer had none), got a null pointer");
  const Index C = bn.num_features();
  if (bn.running_mean().size() != C || bn.running_var().size() != C ||
      (bn.options().affine && (bn.weight().size() != C || bn.bias().size() != C)))
    fail("the module's buffers do not have num_features = " + std::to_string(C) + " values");
  for (Index c = 0; c < C; ++c) {
    const double var = double(bn.running_var()(c));
    if (!(var + bn.options().eps > 0))
      fail("expected running_var + eps > 0, got " + std::to_string(var) + " for channel " +
           std::to_string(c));
  }
  for (Index c = 0; c < C; ++c) {
    const bool affine = bn.options().affine;
    const double scale = (affine ? double(bn.weight()(c)) : 1.0) /
                         std::sqrt(double(bn.running_var()(c)) + bn.options().eps);
    W* row = weight + c * fan_in;
    for (Index k = 0; k < fan_in; ++k) row[k] = W(double(row[k]) * scale);
    bias[c] = W((double(bias[c]) - double(bn.running_mean()(c))) * scale +
                (affine ? double(bn.bias()(c)) : 0.0));
  }
}

BNORM_END_NAMESPACE
