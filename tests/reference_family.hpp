#pragma once
// Plain double-precision GroupNorm (InstanceNorm is its case of one channel per group), LayerNorm
// and RMSNorm, written for clarity: the normalizations.md formulas, literally.

#include <cmath>
#include <vector>

#include "reference.hpp"

namespace reference {

struct Normalized {
  std::vector<double> y, mean, var;  // mean and biased variance per statistics group
};

struct FamilyGrads {
  std::vector<double> dx, weight, bias;
  std::vector<double> weight_terms, bias_terms, dx_terms;  // sums of the terms' magnitudes
};

/// The flat positions of each statistics group: GroupNorm's (sample, group of channels).
inline std::vector<std::vector<Index>> group_members(const Shape& sh, Index groups) {
  const Index k = sh.channels / groups;
  auto members = std::vector<std::vector<Index>>(std::size_t(sh.batch * groups));
  for (Index n = 0; n < sh.batch; ++n)
    for (Index c = 0; c < sh.channels; ++c)
      for (Index s = 0; s < sh.spatial; ++s)
        members[std::size_t(n * groups + c / k)].push_back(sh.at(n, c, s));
  return members;
}

/// LayerNorm's and RMSNorm's groups: each row of `width` values.
inline std::vector<std::vector<Index>> row_members(Index rows, Index width) {
  auto members = std::vector<std::vector<Index>>(std::size_t(rows));
  for (Index r = 0; r < rows; ++r)
    for (Index d = 0; d < width; ++d) members[std::size_t(r)].push_back(r * width + d);
  return members;
}

/// Normalizes every group over its members: y = (x - mean) / sqrt(var + eps) * w + b, or with
/// `rms` y = x / sqrt(mean(x^2) + eps) * w. param[i] is the index of element i's weight and bias.
template <class T>
Normalized normalize_groups(const std::vector<std::vector<Index>>& members,
                            const std::vector<T>& x, double eps, bool rms,
                            const std::vector<Index>& param, const std::vector<double>& weight,
                            const std::vector<double>& bias) {
  Normalized out{std::vector<double>(x.size()), {}, {}};
  for (const auto& group : members) {
    const double m = double(group.size());
    double mean = 0, var = 0;
    for (Index i : group) mean += double(x[std::size_t(i)]) / m;
    if (rms) mean = 0;
    for (Index i : group) var += (double(x[std::size_t(i)]) - mean) * (double(x[std::size_t(i)]) - mean) / m;
    out.mean.push_back(mean);
    out.var.push_back(var);
    for (Index i : group) {
      const Index p = param[std::size_t(i)];
      const double w = weight.empty() ? 1 : weight[std::size_t(p)];
      const double b = bias.empty() ? 0 : bias[std::size_t(p)];
      out.y[std::size_t(i)] = (double(x[std::size_t(i)]) - mean) / std::sqrt(var + eps) * w + b;
    }
  }
  return out;
}

/// Backward with the group's own statistics: with g = w * dy and xhat the normalized x,
/// dx = invstd * (g - mean(g) - xhat * mean(g * xhat)) (rms: without mean(g));
/// dw = sum of dy * xhat, db = sum of dy, over every element that shares the parameter.
template <class T>
FamilyGrads backward_groups(const std::vector<std::vector<Index>>& members,
                            const std::vector<T>& x, const std::vector<T>& dy,
                            const Normalized& fwd, double eps, bool rms,
                            const std::vector<Index>& param, Index params,
                            const std::vector<double>& weight) {
  FamilyGrads out{std::vector<double>(x.size()), std::vector<double>(std::size_t(params)),
                  std::vector<double>(std::size_t(params)), std::vector<double>(std::size_t(params)),
                  std::vector<double>(std::size_t(params)), std::vector<double>(x.size())};
  for (std::size_t j = 0; j < members.size(); ++j) {
    const auto& group = members[j];
    const double m = double(group.size()), invstd = 1 / std::sqrt(fwd.var[j] + eps);
    double mean_g = 0, mean_gx = 0;
    for (Index i : group) {
      const Index p = param[std::size_t(i)];
      const double g = (weight.empty() ? 1 : weight[std::size_t(p)]) * double(dy[std::size_t(i)]);
      const double xhat = (double(x[std::size_t(i)]) - fwd.mean[j]) * invstd;
      mean_g += g / m;
      mean_gx += g * xhat / m;
      out.weight[std::size_t(p)] += double(dy[std::size_t(i)]) * xhat;
      out.bias[std::size_t(p)] += double(dy[std::size_t(i)]);
      out.weight_terms[std::size_t(p)] += std::abs(double(dy[std::size_t(i)]) * xhat);
      out.bias_terms[std::size_t(p)] += std::abs(double(dy[std::size_t(i)]));
    }
    if (rms) mean_g = 0;
    for (Index i : group) {
      const Index p = param[std::size_t(i)];
      const double g = (weight.empty() ? 1 : weight[std::size_t(p)]) * double(dy[std::size_t(i)]);
      const double xhat = (double(x[std::size_t(i)]) - fwd.mean[j]) * invstd;
      out.dx[std::size_t(i)] = invstd * (g - mean_g - xhat * mean_gx);
      out.dx_terms[std::size_t(i)] =
          invstd * (std::abs(g) + std::abs(mean_g) + std::abs(xhat * mean_gx));
    }
  }
  return out;
}

/// The parameter index of every element: its channel (GroupNorm, InstanceNorm) ...
inline std::vector<Index> channel_of(const Shape& sh) {
  std::vector<Index> p(std::size_t(sh.size()));
  for (Index n = 0; n < sh.batch; ++n)
    for (Index c = 0; c < sh.channels; ++c)
      for (Index s = 0; s < sh.spatial; ++s) p[std::size_t(sh.at(n, c, s))] = c;
  return p;
}

/// ... or its position in the row (LayerNorm, RMSNorm).
inline std::vector<Index> position_of(Index rows, Index width) {
  std::vector<Index> p(std::size_t(rows * width));
  for (Index i = 0; i < rows * width; ++i) p[std::size_t(i)] = i % width;
  return p;
}

}  // namespace reference
