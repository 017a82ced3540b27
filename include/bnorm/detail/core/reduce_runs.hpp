#pragma once
// Step 1 over long ALONG runs: a block's runs of one channel, run by run.

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <vector>

#include "io.hpp"
#include "problem.hpp"
#include "reducers.hpp"

#include "../warnings_begin.hpp"

BNORM_BEGIN_NAMESPACE
namespace detail {

/// Step's two sums over runs of one channel (ALONG), run by run, in packets of Scalar: T (the
/// block's values are few enough per lane for T's precision, see step_sums_along) or double.
/// Four independent accumulators keep the adder pipeline busy and every chain short.
template <class Scalar>
struct RunSums {
  using P = Packet<Scalar>;
  static constexpr int U = 4;
  static constexpr Index L = kLanes<Scalar>;
  P a[U], b[U];

  RunSums() {
    for (int u = 0; u < U; ++u) a[u] = b[u] = ei::pset1<P>(Scalar(0));
  }
  /// Adds the run of `len` values at in[k] + off, centered on `center`, asking for the bytes
  /// `ahead` bytes ahead of the loads as it goes (if ahead > 0).
  template <class Step, class T>
  void add(const T* const* in, Index off, Index len, const P& c, Scalar center, Index ahead) {
    auto load_packet = [&](const T* p) {
      if constexpr (std::is_same_v<Scalar, Compute<T>>) return detail::load(p);
      else return load_wide(p);
    };
    auto load_first_n = [&](const T* p, Index n, Scalar fill) {
      if constexpr (std::is_same_v<Scalar, Compute<T>>) return load_first(p, n, fill);
      else return load_wide_first(p, n, fill);
    };
    Index i = 0;
    P v[U][Step::kInputs];
    for (; i + U * L <= len; i += U * L) {
      if (ahead > 0)
        for (int k = 0; k < Step::kInputs; ++k)
          prefetch_ahead(in[k] + off + i, ahead, U * L * Index(sizeof(T)));
      unroll<U>([&](int u) {
        unroll<Step::kInputs>([&](int k) { v[u][k] = load_packet(in[k] + off + i + u * L); });
        Step::add(v[u], c, a[u], b[u]);
      });
    }
    for (int u = 0; i + L <= len; i += L, ++u) {
      for (int k = 0; k < Step::kInputs; ++k) v[0][k] = load_packet(in[k] + off + i);
      Step::add(v[0], c, a[u], b[u]);
    }
    if (i < len) {
      for (int k = 0; k < Step::kInputs; ++k)
        v[0][k] = load_first_n(in[k] + off + i, len - i, Scalar(Step::fill(k, double(center))));
      Step::add(v[0], c, a[U - 1], b[U - 1]);
    }
  }
  Partial total(Index n) const {
    return {double(n), wide_sum(ei::padd(ei::padd(a[0], a[1]), ei::padd(a[2], a[3]))),
            wide_sum(ei::padd(ei::padd(b[0], b[1]), ei::padd(b[2], b[3])))};
  }
  static double wide_sum(const P& p) {
    Scalar lanes[std::size_t(L)];
    ei::pstoreu(lanes, p);
    double sum = 0;
    for (Index l = 0; l < L; ++l) sum += static_cast<double>(lanes[l]);
    return sum;
  }
};

/// Step's sums over `runs` runs of `len` values, `stride` apart; in[k] points at run 0 of
/// input k. An ALONG block holds at most kAlongElems values, so each lane of each accumulator
/// adds at most kAlongElems / (4 * lanes) of them: 32 floats with AVX-512, 64 with AVX2. Where
/// that is at most kTermsInT, the sums run in T, three times less work than widening every value
/// to double, for a few ulps at most; else (SSE, scalar code) in double. Sums in T are centered
/// on the center rounded to T (subtractions near the mean are exact) and moved to the exact
/// center in double; a block whose sums overflow T (values near T's maximum) or are not finite
/// is summed again in double.
inline constexpr Index kTermsInT = 64;

template <class Step, class S>
Partial step_sums_along(const S* const* in, Index stride, Index runs, Index len, double center) {
  using T = Compute<S>;
  auto sums_in = [&](auto sums, auto at) {
    const auto c = ei::pset1<typename decltype(sums)::P>(at);
    const Index bytes = len * Index(sizeof(S));
    const bool short_runs = bytes <= kShortRunBytes;
    for (Index r = 0; r < runs; ++r) {
      if (short_runs && r + kRunsAhead < runs)
        for (int k = 0; k < Step::kInputs; ++k)
          prefetch_lines(in[k] + (r + kRunsAhead) * stride, bytes);
      if (!short_runs && r + 1 < runs)
        for (int k = 0; k < Step::kInputs; ++k)
          prefetch_lines(in[k] + (r + 1) * stride, std::min(bytes, kReadAhead));
      sums.template add<Step>(in, r * stride, len, c, at, short_runs ? 0 : kReadAhead);
    }
    return sums.total(runs * len);
  };
  if constexpr (Blocking::kAlongElems / (RunSums<T>::U * kLanes<T>) <= kTermsInT) {
    const T near = T(center);
    const Partial p = sums_in(RunSums<T>{}, near);
    if (std::isfinite(p.a) && std::isfinite(p.b)) return Step::recenter(p, double(near), center);
  }
  return sums_in(RunSums<double>{}, center);
}

/// Moments of one ALONG block in one pass over it.
template <class S>
Partial moments_along(const S* x, Index stride, Index runs, Index len) {
  const double shift = double(static_cast<Compute<S>>(shift_of(x, std::min(len, kShiftValues))));  // see recenter
  return centered_to_moments(step_sums_along<CenteredSums>(&x, stride, runs, len, shift), shift,
                             1.0 / double(runs * len));
}

}  // namespace detail
BNORM_END_NAMESPACE

#include "../warnings_end.hpp"
