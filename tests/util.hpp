#pragma once
// Helpers shared by the tests: random data with non-zero means, poisoned buffers, tolerances,
// and thread pools.

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <bnorm/bnorm.hpp>

#include "reference.hpp"

namespace testing {

using Index = std::ptrdiff_t;

/// A generator seeded from Catch's --rng-seed (CTest passes "time": fresh data every run, and
/// Catch prints the seed to replay a failure).
inline std::mt19937_64& rng() {
  static std::mt19937_64 gen(Catch::rngSeed());
  return gen;
}

/// Values whose channels have different, non-zero means and very different spreads.
template <class T>
std::vector<T> random_input(const reference::Shape& sh, double mean_scale = 10.0) {
  std::normal_distribution<double> normal;
  std::uniform_real_distribution<double> uniform(-1, 1);
  std::vector<double> mean(sh.channels), spread(sh.channels);
  for (Index c = 0; c < sh.channels; ++c) {
    mean[c] = mean_scale * uniform(rng());
    spread[c] = std::pow(10.0, 1.5 * uniform(rng()));  // 0.03 .. 30
  }
  std::vector<T> x(std::size_t(sh.size()));
  for (Index n = 0; n < sh.batch; ++n)
    for (Index c = 0; c < sh.channels; ++c)
      for (Index s = 0; s < sh.spatial; ++s)
        x[sh.at(n, c, s)] = T(mean[c] + spread[c] * normal(rng()));
  return x;
}

template <class T>
std::vector<T> random_vector(Index n, double lo, double hi) {
  std::uniform_real_distribution<double> d(lo, hi);
  std::vector<T> v(static_cast<std::size_t>(n));
  for (auto& e : v) e = T(d(rng()));
  return v;
}

template <class T>
std::vector<double> widen(const std::vector<T>& v) {
  return std::vector<double>(v.begin(), v.end());
}

/// A buffer filled with NaN, so that an element the kernel forgot to write fails the check.
template <class T>
std::vector<T> poisoned(Index n) {
  return std::vector<T>(std::size_t(n), std::numeric_limits<T>::quiet_NaN());
}

/// Tolerance for T: a few hundred ulps of double, or a few dozen of float (relative to the
/// largest expected value), so that any wrong formula (missing eps, biased variance) shows.
template <class T>
constexpr double tolerance() {
  return std::is_same_v<T, float> ? 2e-5 : 1e-11;
}

/// Every element of `actual` is within tolerance of `expected`: relative to the element and to
/// the array's largest magnitude. Reports the first mismatch.
template <class T>
void check_close(const std::vector<T>& actual, const std::vector<double>& expected,
                 const std::string& what, double tol = tolerance<T>()) {
  REQUIRE(actual.size() == expected.size());
  double scale = 0;
  for (double e : expected) scale = std::max(scale, std::abs(e));
  for (std::size_t i = 0; i < actual.size(); ++i) {
    const double a = double(actual[i]), e = expected[i];
    const bool ok = std::abs(a - e) <= tol * (std::abs(e) + scale);
    if (!ok) {
      INFO(what << "[" << i << "]: got " << a << ", expected " << e << " (scale " << scale << ")");
      REQUIRE(ok);
    }
  }
  SUCCEED(what << ": " << actual.size() << " values within " << tol);
}

/// A thread pool and its device; workers == 0 means "no device" (calling thread only).
struct Pool {
  explicit Pool(int workers)
      : pool(workers > 0 ? std::make_unique<Eigen::ThreadPool>(workers) : nullptr),
        device(workers > 0 ? std::make_unique<Eigen::ThreadPoolDevice>(pool.get(), workers)
                           : nullptr) {}
  std::unique_ptr<Eigen::ThreadPool> pool;
  std::unique_ptr<Eigen::ThreadPoolDevice> device;
};

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

}  // namespace testing
