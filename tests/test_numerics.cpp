// Hostile numbers: large means next to small spreads, constant channels, values near the
// float maximum. The statistics stay within a few ulps of a higher-precision reference where a
// textbook one-pass sum of squares loses everything.

#include <cstring>
#include <tuple>

#include "util.hpp"

namespace fn = bnorm::functional;
using bnorm::Layout;
using testing::Index;

namespace {

/// The textbook formula E[x^2] - E[x]^2 in T: what the test shows bnorm does not do.
template <class T>
T naive_variance(const std::vector<T>& v) {
  T sum = 0, sq = 0;
  for (T e : v) {
    sum += e;
    sq += e * e;
  }
  const T n = T(v.size()), mean = sum / n;
  return sq / n - mean * mean;
}

double ulps(double a, double b, double unit) { return std::abs(a - b) / unit; }

/// Neumaier's compensated sum: about twice double's precision.
double precise_sum(const std::vector<double>& v) {
  double sum = 0, carry = 0;
  for (double e : v) {
    const double t = sum + e;
    carry += std::abs(sum) >= std::abs(e) ? (sum - t) + e : (e - t) + sum;
    sum = t;
  }
  return sum + carry;
}

/// Mean and biased variance, precise enough to judge double results at mean / spread = 1e8:
/// a compensated mean refined by a second pass (x - mean is exact so near the mean), then a
/// compensated sum of squares. A plain double two-pass is off by 1e5 ulps here. The mean is
/// also kept as high + low part (`low`), finer than one double can hold.
struct PreciseStats : reference::Stats {
  std::vector<double> low;
};

PreciseStats precise_stats(const reference::Shape& sh, const std::vector<double>& x) {
  PreciseStats st;
  st.mean.resize(sh.channels);
  st.var.resize(sh.channels);
  st.low.resize(sh.channels);
  for (Index c = 0; c < sh.channels; ++c) {
    std::vector<double> v;
    for (Index n = 0; n < sh.batch; ++n)
      for (Index s = 0; s < sh.spatial; ++s) v.push_back(x[sh.at(n, c, s)]);
    const double count = double(v.size());
    double mean = precise_sum(v) / count;
    std::vector<double> d(v.size());
    for (std::size_t i = 0; i < v.size(); ++i) d[i] = v[i] - mean;
    const double low = precise_sum(d) / count;
    for (std::size_t i = 0; i < v.size(); ++i) d[i] = ((v[i] - mean) - low) * ((v[i] - mean) - low);
    st.mean[c] = mean + low;
    st.low[c] = (mean - st.mean[c]) + low;
    st.var[c] = precise_sum(d) / count;
  }
  return st;
}

}  // namespace

TEMPLATE_TEST_CASE("statistics stay accurate when the mean dwarfs the spread", "[numerics]",
                   float, double) {
  using T = TestType;
  // Mean / spread = 1e4 in float, 1e8 in double.
  const double ratio = std::is_same_v<T, float> ? 1e4 : 1e8;
  // Long runs, and short ones (reduced position by position) over two blocks of rows.
  for (const auto& [batch, spatial, layout] :
       {std::tuple{16, 1000, Layout::ChannelsFirst}, std::tuple{16, 1000, Layout::ChannelsLast},
        std::tuple{200, 49, Layout::ChannelsFirst}}) {
    const reference::Shape sh{batch, 3, spatial, layout};
    std::normal_distribution<double> normal;
    std::vector<T> x(std::size_t(sh.size()));
    for (Index n = 0; n < sh.batch; ++n)
      for (Index c = 0; c < sh.channels; ++c)
        for (Index s = 0; s < sh.spatial; ++s)
          x[sh.at(n, c, s)] = T(ratio * (c + 1) + normal(testing::rng()));
    const auto st = precise_stats(sh, testing::widen(x));
    std::vector<T> y(x.size()), mean(3), invstd(3);
    fn::forward_training<T>({sh.batch, sh.channels, sh.spatial, layout}, x.data(), y.data(), 0.0,
                            {}, {mean.data(), invstd.data()});
    for (Index c = 0; c < 3; ++c) {
      const double unit = std::numeric_limits<T>::epsilon();
      INFO("channel " << c);
      CHECK(ulps(mean[c], st.mean[c], unit * st.mean[c]) <= 1.0);
      const double exact_invstd = 1 / std::sqrt(st.var[c]);
      CHECK(ulps(invstd[c], exact_invstd, unit * exact_invstd) <= 8.0);

      std::vector<T> channel;
      for (Index n = 0; n < sh.batch; ++n)
        for (Index s = 0; s < sh.spatial; ++s) channel.push_back(x[sh.at(n, c, s)]);
      // The textbook formula is off by far more than that on the same data (its error is
      // random around |mean|^2 * eps / var: about 1 in both cases; 1e-3 is a safe floor).
      CHECK(std::abs(double(naive_variance(channel)) - st.var[c]) > 1e-3 * st.var[c]);
    }
    // And the output is normalized to full precision: y = ((x - high) - low) / std.
    std::vector<double> expected(x.size());
    for (Index n = 0; n < sh.batch; ++n)
      for (Index c = 0; c < sh.channels; ++c)
        for (Index s = 0; s < sh.spatial; ++s) {
          const Index i = sh.at(n, c, s);
          expected[i] = ((double(x[i]) - st.mean[c]) - st.low[c]) / std::sqrt(st.var[c]);
        }
    testing::check_close(y, expected, "y");
  }
}

TEMPLATE_TEST_CASE("a constant channel normalizes to exactly zero with finite gradients",
                   "[numerics]", float, double) {
  using T = TestType;
  for (Layout layout : {Layout::ChannelsFirst, Layout::ChannelsLast}) {
    bnorm::Options opt;
    opt.layout = layout;
    bnorm::BatchNorm1d<T> bn(2, opt);
    bn.bias().setValues({T(0.25), T(-3)});
    Eigen::Tensor<T, 3, Eigen::RowMajor> x(6, 2, 5);  // constant across batch and length
    if (layout == Layout::ChannelsLast) x.resize(6, 5, 2);
    for (Index i = 0; i < x.size(); ++i) x.data()[i] = T(1234.567);
    const auto y = bn.forward(x);
    for (Index i = 0; i < y.size(); ++i) {
      const Index c = layout == Layout::ChannelsLast ? i % 2 : (i / 5) % 2;
      REQUIRE(y.data()[i] == bn.bias()(c));
    }
    Eigen::Tensor<T, 3, Eigen::RowMajor> dy(x.dimensions());
    dy.setRandom();
    const auto dx = bn.backward(dy);
    for (Index i = 0; i < dx.size(); ++i) REQUIRE(std::isfinite(dx.data()[i]));
    CHECK(bn.grad_weight()(0) == T(0));
    CHECK(bn.running_var()(0) == T(0.9));
  }
}

TEST_CASE("values near the float maximum do not overflow the statistics", "[numerics]") {
  for (Layout layout : {Layout::ChannelsFirst, Layout::ChannelsLast}) {
    const reference::Shape sh{4, 2, 50, layout};
    std::vector<float> x(std::size_t(sh.size()));
    for (Index n = 0; n < sh.batch; ++n)
      for (Index s = 0; s < sh.spatial; ++s) {
        x[sh.at(n, 0, s)] = 3e38f;                          // constant, at the top of the range
        x[sh.at(n, 1, s)] = 1e30f * float(1 + (n + s) % 3);  // variance 7e59: finite in double
      }
    std::vector<float> y(x.size()), mean(2), invstd(2);
    fn::forward_training<float>({sh.batch, sh.channels, sh.spatial, layout}, x.data(), y.data(),
                                1e-5, {}, {mean.data(), invstd.data()});
    CHECK(mean[0] == 3e38f);
    const auto st = reference::batch_stats(sh, x);
    CHECK(mean[1] == Approx(st.mean[1]).epsilon(1e-6));
    CHECK(double(invstd[1]) == Approx(1 / std::sqrt(st.var[1])).epsilon(1e-6));
    for (Index i = 0; i < sh.size(); ++i) REQUIRE(std::isfinite(y[std::size_t(i)]));
  }
}

TEMPLATE_TEST_CASE("subnormal inputs and a single huge outlier", "[numerics]", float, double) {
  using T = TestType;
  for (Layout layout : {Layout::ChannelsFirst, Layout::ChannelsLast}) {
    const reference::Shape sh{8, 2, 37, layout};
    std::vector<T> x(std::size_t(sh.size()));
    std::normal_distribution<double> normal;
    const T tiny = std::numeric_limits<T>::denorm_min();
    for (Index n = 0; n < sh.batch; ++n)
      for (Index s = 0; s < sh.spatial; ++s) {
        x[sh.at(n, 0, s)] = tiny * T(1 + (n * 37 + s) % 50);  // subnormal values only
        x[sh.at(n, 1, s)] = T(normal(testing::rng()));
      }
    x[sh.at(3, 1, 5)] = T(std::is_same_v<T, float> ? 1e30 : 1e150);  // one huge outlier
    std::vector<T> y = testing::poisoned<T>(sh.size()), mean(2), invstd(2);
    fn::forward_training<T>({sh.batch, sh.channels, sh.spatial, layout}, x.data(), y.data(),
                            1e-5, {}, {mean.data(), invstd.data()});
    const auto st = precise_stats(sh, testing::widen(x));
    // Subnormal channel: its variance is far below eps, so y is ~0 but finite and exact.
    CHECK(std::abs(double(mean[0]) - st.mean[0]) <= double(tiny));  // one subnormal ulp
    CHECK(double(invstd[0]) == Approx(1 / std::sqrt(st.var[0] + 1e-5)).epsilon(1e-6));
    // Outlier channel: the outlier owns the variance; everything stays finite and accurate.
    CHECK(double(mean[1]) == Approx(st.mean[1]).epsilon(1e-6));
    CHECK(double(invstd[1]) == Approx(1 / std::sqrt(st.var[1] + 1e-5)).epsilon(1e-6));
    for (std::size_t i = 0; i < y.size(); ++i) REQUIRE(std::isfinite(y[i]));
    const T big = y[std::size_t(sh.at(3, 1, 5))];
    CHECK(double(big) == Approx(std::sqrt(double(sh.per_channel()) - 1)).epsilon(1e-4));
  }
}

TEMPLATE_TEST_CASE("1 / sqrt(var + eps) in packets is the scalar expression, bit for bit",
                   "[numerics]", float, double) {
  // Every count up to past two batches (whole packets and every tail), variances from subnormal
  // to huge, zero with eps = 0 (infinity), on this program's vector width.
  using T = TestType;
  const Index most = 2 * bnorm::detail::kFinishBatch + 3;
  std::uniform_real_distribution<double> exponent(-40, 30);
  std::vector<T> var(static_cast<std::size_t>(most));
  for (auto& v : var) v = T(std::pow(10.0, exponent(testing::rng())));
  var[1] = std::numeric_limits<T>::denorm_min();
  var[2] = T(0);
  for (double eps : {1e-5, 0.0}) {
    for (Index n = 0; n <= most; ++n) {
      std::vector<double> out = testing::poisoned<double>(n + 1);
      bnorm::detail::inverse_std(var.data(), n, eps, out.data());
      for (Index j = 0; j < n; ++j) {
        const double want = 1.0 / std::sqrt(double(var[std::size_t(j)]) + eps);
        INFO("n = " << n << ", j = " << j << ", var = " << var[std::size_t(j)] << ", eps = " << eps);
        REQUIRE(std::memcmp(&out[std::size_t(j)], &want, sizeof want) == 0);
      }
      REQUIRE(std::isnan(out[std::size_t(n)]));  // nothing written past n (still poison)
    }
  }
}
