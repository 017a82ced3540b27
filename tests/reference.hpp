#pragma once
// A plain double-precision batch normalization written for clarity, not speed: the yardstick
// every kernel is checked against. Follows ../shared formulas (PyTorch's conventions) literally.

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include <bnorm/options.hpp>

namespace reference {

using Index = std::ptrdiff_t;

struct Shape {
  Index batch, channels, spatial;
  bnorm::Layout layout;

  Index size() const { return batch * channels * spatial; }
  Index per_channel() const { return batch * spatial; }
  /// Flat position of element (n, c, s).
  Index at(Index n, Index c, Index s) const {
    return layout == bnorm::Layout::ChannelsFirst ? (n * channels + c) * spatial + s
                                                  : (n * spatial + s) * channels + c;
  }
};

struct Stats {
  std::vector<double> mean, var;  // var: biased
};

template <class T>
Stats batch_stats(const Shape& sh, const std::vector<T>& x) {
  Stats st{std::vector<double>(sh.channels), std::vector<double>(sh.channels)};
  const double n = double(sh.per_channel());
  for (Index c = 0; c < sh.channels; ++c) {
    double sum = 0;
    for (Index b = 0; b < sh.batch; ++b)
      for (Index s = 0; s < sh.spatial; ++s) sum += double(x[sh.at(b, c, s)]);
    const double mean = sum / n;
    double sq = 0;
    for (Index b = 0; b < sh.batch; ++b)
      for (Index s = 0; s < sh.spatial; ++s) {
        const double d = double(x[sh.at(b, c, s)]) - mean;
        sq += d * d;
      }
    st.mean[c] = mean;
    st.var[c] = sq / n;
  }
  return st;
}

/// y = weight * (x - mean) / sqrt(var + eps) + bias, per channel.
template <class T>
std::vector<double> normalize(const Shape& sh, const std::vector<T>& x, const Stats& st,
                              double eps, const std::vector<double>& weight,
                              const std::vector<double>& bias) {
  std::vector<double> y(std::size_t(sh.size()));
  for (Index c = 0; c < sh.channels; ++c) {
    const double invstd = 1 / std::sqrt(st.var[c] + eps);
    const double w = weight.empty() ? 1 : weight[c], b = bias.empty() ? 0 : bias[c];
    for (Index n = 0; n < sh.batch; ++n)
      for (Index s = 0; s < sh.spatial; ++s) {
        const Index i = sh.at(n, c, s);
        y[i] = w * (double(x[i]) - st.mean[c]) * invstd + b;
      }
  }
  return y;
}

struct Grads {
  std::vector<double> dx, weight, bias;
  // Per channel, the sums of the magnitudes of weight's and bias's terms: what their rounding
  // errors grow with (the terms may cancel to far less).
  std::vector<double> weight_terms, bias_terms;
};

/// Backward. batch_stats: the statistics came from x itself (training), so dx has the terms
/// through mean and variance; otherwise they were constants (eval with running stats).
template <class T>
Grads backward(const Shape& sh, const std::vector<T>& x, const std::vector<T>& dy,
               const Stats& st, double eps, const std::vector<double>& weight, bool batch_stats) {
  Grads g{std::vector<double>(std::size_t(sh.size())), std::vector<double>(sh.channels),
          std::vector<double>(sh.channels), std::vector<double>(sh.channels),
          std::vector<double>(sh.channels)};
  const double n = double(sh.per_channel());
  for (Index c = 0; c < sh.channels; ++c) {
    const double invstd = 1 / std::sqrt(st.var[c] + eps);
    const double w = weight.empty() ? 1 : weight[c];
    double sum_dy = 0, sum_dy_xmu = 0, abs_dy = 0, abs_dy_xmu = 0;
    for (Index b = 0; b < sh.batch; ++b)
      for (Index s = 0; s < sh.spatial; ++s) {
        const Index i = sh.at(b, c, s);
        const double term = double(dy[i]) * (double(x[i]) - st.mean[c]);
        sum_dy += double(dy[i]);
        sum_dy_xmu += term;
        abs_dy += std::abs(double(dy[i]));
        abs_dy_xmu += std::abs(term);
      }
    g.bias[c] = sum_dy;
    g.weight[c] = sum_dy_xmu * invstd;
    g.bias_terms[c] = abs_dy;
    g.weight_terms[c] = abs_dy_xmu * invstd;
    for (Index b = 0; b < sh.batch; ++b)
      for (Index s = 0; s < sh.spatial; ++s) {
        const Index i = sh.at(b, c, s);
        const double xmu = double(x[i]) - st.mean[c];
        g.dx[i] = batch_stats ? w * invstd *
                                    (double(dy[i]) - sum_dy / n -
                                     xmu * invstd * invstd * sum_dy_xmu / n)
                              : w * invstd * double(dy[i]);
      }
  }
  return g;
}

/// The module's state and one step of it, PyTorch's nn.BatchNorm*d in miniature.
struct Module {
  bnorm::Options opt;
  std::vector<double> weight, bias, running_mean, running_var, grad_weight, grad_bias;
  std::vector<double> grad_weight_terms, grad_bias_terms;  // see Grads
  std::int64_t num_batches_tracked = 0;
  bool training = true;

  Module(Index channels, bnorm::Options o) : opt(o) {
    if (opt.affine) {
      weight.assign(channels, 1.0);
      bias.assign(channels, 0.0);
      grad_weight.assign(channels, 0.0);
      grad_bias.assign(channels, 0.0);
      grad_weight_terms.assign(channels, 0.0);
      grad_bias_terms.assign(channels, 0.0);
    }
    if (opt.track_running_stats) {
      running_mean.assign(channels, 0.0);
      running_var.assign(channels, 1.0);
    }
  }

  struct Step {
    std::vector<double> y, dx;
  };

  template <class T>
  Step step(const Shape& sh, const std::vector<T>& x, const std::vector<T>& dy) {
    const bool use_batch = training || !opt.track_running_stats;
    Stats st;
    // Batch Renormalization (training): y = weight * (xhat * r + d) + bias, r and d from the
    // running statistics before this batch moves them, constants to backward.
    std::vector<double> r(std::size_t(sh.channels), 1.0), d(std::size_t(sh.channels), 0.0);
    if (use_batch) {
      st = batch_stats(sh, x);
      if (training && opt.renorm)
        for (Index c = 0; c < sh.channels; ++c) {
          const double sigma = std::sqrt(running_var[c] + opt.eps);
          const double rmax = opt.renorm->rmax, dmax = opt.renorm->dmax;
          r[c] = std::min(std::max(std::sqrt(st.var[c] + opt.eps) / sigma, 1 / rmax), rmax);
          d[c] = std::min(std::max((st.mean[c] - running_mean[c]) / sigma, -dmax), dmax);
        }
      if (training && opt.track_running_stats) {
        ++num_batches_tracked;
        const double f = opt.momentum ? *opt.momentum : 1.0 / double(num_batches_tracked);
        const double n = double(sh.per_channel());
        for (Index c = 0; c < sh.channels; ++c) {
          running_mean[c] = (1 - f) * running_mean[c] + f * st.mean[c];
          running_var[c] = (1 - f) * running_var[c] +
                           f * st.var[c] * (opt.running_variance == bnorm::RunningVariance::Biased
                                                ? 1.0
                                                : n / (n - 1));
        }
      }
    } else {
      st = {running_mean, running_var};
    }
    std::vector<double> scaled(std::size_t(sh.channels)), shifted(std::size_t(sh.channels));
    for (Index c = 0; c < sh.channels; ++c) {
      const double w = weight.empty() ? 1.0 : weight[c], b = bias.empty() ? 0.0 : bias[c];
      scaled[c] = w * r[c];
      shifted[c] = b + w * d[c];
    }
    Step out;
    out.y = normalize(sh, x, st, opt.eps, scaled, shifted);
    Grads g = backward(sh, x, dy, st, opt.eps, scaled, use_batch);
    out.dx = std::move(g.dx);
    for (std::size_t c = 0; c < grad_weight.size(); ++c) {
      grad_weight[c] += r[c] * g.weight[c] + d[c] * g.bias[c];
      grad_bias[c] += g.bias[c];
      grad_weight_terms[c] += r[c] * g.weight_terms[c] + std::abs(d[c]) * g.bias_terms[c];
      grad_bias_terms[c] += g.bias_terms[c];
    }
    return out;
  }
};

}  // namespace reference
