#pragma once
// What step 1 sums per block: the reducers (centered moments, gradient sums) and how their sums
// become moments.

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <vector>

#include "merge.hpp"

#include "../warnings_begin.hpp"

BNORM_BEGIN_NAMESPACE
namespace detail {

/// Gradient sums: a += dy, b += dy * (x - center). Inputs: {dy, x}.
struct GradientSums {
  static constexpr int kInputs = 2;
  static double fill(int k, double center) { return k == 0 ? 0.0 : center; }  // adds nothing
  /// The sums centered on `to` from the sums centered on `from`.
  static Partial recenter(const Partial& p, double from, double to) {
    return {p.n, p.a, p.b + (from - to) * p.a};
  }
  template <class W>
  static void add(const W* in, const W& center, W& a, W& b) {
    a = ei::padd(a, in[0]);
    b = ei::pmadd(in[0], ei::psub(in[1], center), b);
  }
};

/// Centered moments: a += x - center, b += (x - center)^2. Inputs: {x}.
struct CenteredSums {
  static constexpr int kInputs = 1;
  static double fill(int, double center) { return center; }  // adds nothing
  static Partial recenter(const Partial& p, double from, double to) {
    const double d = from - to;
    return {p.n, p.a + p.n * d, p.b + d * (2 * p.a + p.n * d)};
  }
  template <class W>
  static void add(const W* in, const W& center, W& a, W& b) {
    const W d = ei::psub(in[0], center);
    a = ei::padd(a, d);
    b = ei::pmadd(d, d, b);
  }
};

/// Moments of a centered pass: mean = center + sum(d) / n, M2 = sum(d^2) - sum(d)^2 / n, given
/// inverse = 1 / n.
inline Partial centered_to_moments(const Partial& s, double center, double inverse) {
  if (s.n == 0) return {};
  const double offset = s.a * inverse, m2 = s.b - s.a * offset;
  return {s.n, offset, m2 < 0 ? 0.0 : m2, center};  // rounding can dip below 0; NaN stays
}

/// The shift of a block's centered sums: the mean of its first kShiftValues values (or fewer).
/// One pass then gives the moments: with S1 = sum(x - K), S2 = sum((x - K)^2) in double,
/// M2 = S2 - S1^2 / n loses about (1 + n (K - mean)^2 / M2) ulps to cancellation, and
/// (K - mean)^2 is at most M2 / m for K the mean of m of the values: a few ulps for any data,
/// however large its mean is next to its spread.
inline constexpr Index kShiftValues = 64;

template <class T>
double shift_of(const T* x, Index m) {
  // In packets: one scalar chain of 64 dependent additions would cost a small block a third of
  // its time.
  Wide acc[2] = {ei::pset1<Wide>(0.0), ei::pset1<Wide>(0.0)};
  Index i = 0;
  for (int u = 0; i + kWideLanes <= m; i += kWideLanes, u ^= 1)
    acc[u] = ei::padd(acc[u], load_wide(x + i));
  if (i < m) acc[1] = ei::padd(acc[1], load_wide_first(x + i, m - i, 0.0));
  const double sum = ei::predux(ei::padd(acc[0], acc[1]));
  if (std::isfinite(sum)) return sum / double(m);
  return std::isfinite(static_cast<double>(x[0])) ? static_cast<double>(x[0]) : 0.0;  // NaN, inf
}

}  // namespace detail
BNORM_END_NAMESPACE

#include "../warnings_end.hpp"
