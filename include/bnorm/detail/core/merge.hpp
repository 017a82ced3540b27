#pragma once
// Step 2's merge: a block's partial reduction and Chan's pairwise formula, which merge
// blocks, threads and (later) processes in a fixed order.

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <vector>

#include "../storage.hpp"

#include "../warnings_begin.hpp"

BNORM_BEGIN_NAMESPACE
namespace detail {

/// A block's (or a channel's) reduction: count and two accumulated quantities. For moments,
/// the mean is shift + a (kept as two doubles: a double alone holds a mean 1e8 times the spread
/// to only 1e-8 of the spread, and merging such means would lose the variance) and b = M2, the
/// sum of squared deviations. For gradients, a = sum(dy) and b = sum(dy * (x - center)).
struct Partial {
  double n = 0, a = 0, b = 0, shift = 0;

  double mean() const { return shift + a; }
};

/// Chan et al.'s pairwise update: moments of the union of two disjoint sets. The shifts are
/// near each other, so their difference is exact and delta keeps the offsets' precision.
inline Partial merge_moments(const Partial& x, const Partial& y) {
  if (y.n == 0) return x;
  if (x.n == 0) return y;
  const double n = x.n + y.n;
  const double delta = (y.shift - x.shift) + (y.a - x.a);
  const double share = y.n / n;
  return {n, x.a + delta * share, x.b + y.b + delta * delta * x.n * share, x.shift};
}

inline Partial merge_sums(const Partial& x, const Partial& y) {
  return {x.n + y.n, x.a + y.a, x.b + y.b};
}

}  // namespace detail
BNORM_END_NAMESPACE

#include "../warnings_end.hpp"
