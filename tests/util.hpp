#pragma once
// Helpers shared by the tests: random data with non-zero means, poisoned buffers, tolerances,
// and thread pools.

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <istream>
#include <map>
#include <limits>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

// bnorm.hpp, with the kernels compiled once per test program, in instances.cpp.
#include <bnorm/instances.hpp>

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

/// A rank-1 tensor's elements (the modules' parameters, gradients and running statistics).
template <class T>
std::vector<T> values(const Eigen::Tensor<T, 1>& t) {
  return std::vector<T>(t.data(), t.data() + t.size());
}

/// One step of a fixture case: "step MODE", then its lines.
struct FixtureStep {
  std::string mode;
  std::map<std::string, std::string> keys;
  std::map<std::string, std::vector<double>> arrays;
};

/// A case of a fixture file that a generator in fixtures/ wrote: "case NAME", its lines (before
/// its first step they are the case's own), its steps, "end". A line is a key, "name value", or
/// an array, "name count values..."; a line starting with '#' is a comment.
struct FixtureCase {
  std::string name;
  std::map<std::string, std::string> keys;
  std::map<std::string, std::vector<double>> arrays;
  std::vector<FixtureStep> steps;

  const std::string& key(const std::string& k) const {
    const auto it = keys.find(k);
    if (it == keys.end()) FAIL("fixture " << name << " has no key " << k);
    return it->second;
  }
  bool has(const std::string& k) const { return keys.count(k) > 0 || arrays.count(k) > 0; }
  double number(const std::string& k) const { return std::stod(key(k)); }
  bool flag(const std::string& k) const { return key(k) == "1"; }
  /// An array of sizes ("dims 4 N C H W").
  std::vector<Index> sizes(const std::string& k) const {
    const auto it = arrays.find(k);
    if (it == arrays.end()) FAIL("fixture " << name << " has no array " << k);
    return std::vector<Index>(it->second.begin(), it->second.end());
  }
};

inline std::vector<FixtureCase> read_fixtures(const std::string& file) {
  std::ifstream in(std::string(BNORM_FIXTURE_DIR) + "/" + file);
  REQUIRE(in.good());
  std::vector<FixtureCase> cases;
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream words(line);
    std::vector<std::string> w;
    for (std::string word; words >> word;) w.push_back(word);
    if (w.empty() || w[0][0] == '#' || w[0] == "end") continue;
    if (w[0] == "case") {
      REQUIRE(w.size() == 2);
      cases.emplace_back();
      cases.back().name = w[1];
      continue;
    }
    REQUIRE(!cases.empty());
    FixtureCase& c = cases.back();
    if (w[0] == "step") {
      REQUIRE(w.size() == 2);
      c.steps.push_back({w[1], {}, {}});
      continue;
    }
    auto& keys = c.steps.empty() ? c.keys : c.steps.back().keys;
    auto& arrays = c.steps.empty() ? c.arrays : c.steps.back().arrays;
    if (w.size() == 2) {
      keys[w[0]] = w[1];
    } else {
      const std::size_t n = std::stoul(w[1]);
      INFO("fixture " << c.name << ", line " << w[0]);
      REQUIRE(w.size() == n + 2);
      std::vector<double>& values = arrays[w[0]];
      for (std::size_t i = 0; i < n; ++i) values.push_back(std::stod(w[i + 2]));
    }
  }
  return cases;
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

/// Every element of `actual` is within tolerance<T>() of `expected`, relative to the element
/// and to the array's largest magnitude, and also to an eighth of terms[i] where element i is a
/// sum whose terms' magnitudes add up to terms[i] (no terms: none). A sum's rounding error grows
/// with its terms, which may cancel to a result far smaller than any of them: a float gradient of
/// 0.0017 from terms of 4.9 in all was off by 1e-7 (0.17 ulps of 4.9) and failed the relative
/// check at one seed in 300. Over 60 seeds of the backward test, the kernels' sums were off by at
/// most 2.4 float ulps of their terms; an eighth of the float tolerance is 21.
template <class T>
void check_sum_close(const std::vector<T>& actual, const std::vector<double>& expected,
                     const std::vector<double>& terms, const std::string& what) {
  const double tol = tolerance<T>();
  REQUIRE(actual.size() == expected.size());
  REQUIRE((terms.empty() || terms.size() == expected.size()));
  double scale = 0;
  for (double e : expected) scale = std::max(scale, std::abs(e));
  for (std::size_t i = 0; i < actual.size(); ++i) {
    const double a = double(actual[i]), e = expected[i];
    const double sum_of_terms = terms.empty() ? 0.0 : terms[i];
    const bool ok = std::abs(a - e) <= tol * (std::abs(e) + scale + sum_of_terms / 8);
    if (!ok) {
      INFO(what << "[" << i << "]: got " << a << ", expected " << e << " (scale " << scale << ")");
      REQUIRE(ok);
    }
  }
  SUCCEED(what << ": " << actual.size() << " values within " << tol);
}

/// check_sum_close for values that are not sums of terms.
template <class T>
void check_close(const std::vector<T>& actual, const std::vector<double>& expected,
                 const std::string& what) {
  check_sum_close(actual, expected, {}, what);
}

/// A fixture line "name count v0 v1 ...": its name and values.
inline std::pair<std::string, std::vector<double>> parse_array(const std::string& line) {
  std::istringstream s(line);
  std::string name;
  std::size_t n = 0;
  s >> name >> n;
  std::vector<double> values(n);
  for (double& v : values) s >> v;
  REQUIRE(!s.fail());
  return {name, values};
}

/// The first element of `storage` on a page (4 KiB) boundary; storage must span two pages.
template <class T>
T* page_aligned(std::vector<T>& storage) {
  T* p = storage.data();
  while (reinterpret_cast<std::uintptr_t>(p) % 4096 != 0) ++p;
  return p;
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
