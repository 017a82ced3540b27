#pragma once
// Step 1 in row order: ALONG runs short enough to be read row after row, channel after channel.

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <vector>

#include "reduce_sweep.hpp"

#include "../warnings_begin.hpp"

BNORM_BEGIN_NAMESPACE
namespace detail {

/// ALONG runs of at least a packet, short enough that a run adds at most kTermsInT values to
/// each lane (up to 1024 floats with AVX-512), are reduced in memory order: row after row and,
/// within a row, channel after channel, each channel's run into packets of its own. Short runs
/// were swept instead, with a table of accumulators per position that goes through L1 with
/// every row; longer runs, up to that limit, were read run by run in groups of channels (see
/// reduce_then_apply). Memory order is faster than both (docs/design.md, "Measurements behind
/// the constants").
template <class T>
bool in_row_order(const Geometry& g) {
  return !g.across() && g.inner >= kLanes<T> && (g.inner + kLanes<T> - 1) / kLanes<T> <= kTermsInT;
}

/// A worker's room for row_sums over C channels: `values`, row_values_size(C) of them, for two
/// packets of sums per channel and each channel's center, and `sums`, row_sums_size(C), for the
/// same sums in double.
template <class T>
Index row_values_size(Index C) {
  return (2 * kLanes<T> + 1) * C;
}
template <class T>
Index row_sums_size(Index C) {
  return 2 * kLanes<T> * C;
}

/// Step's sums over a block of `rows` rows (`pitch` values apart) for C channels of `inner`
/// positions, channel c centered on near[c] (at room + 2 * kLanes<T> * C), into out[c]. Four rows
/// go side by side (then two, then one, at the end of a flush), each into sums of its own: more
/// loads in flight per channel than two rows give, for the same loads and stores of its sums.
/// A channel's sums in T add up `flush` rows, at most
/// kTermsInT values per lane, before they are added lane by lane to its sums in double (at
/// wide), whose lanes are added up at the end. A channel whose sums are not finite is summed
/// again in double on its own.
template <class Step, class S, class T>
void row_sums(const S* const* in, Index pitch, Index C, Index inner, Index rows, T* room,
              double* wide, Partial* out) {
  using P = Packet<T>;
  constexpr Index L = kLanes<T>;
  const T* near = room + 2 * L * C;
  const Index whole = inner / L, cut = inner % L;
  const Index flush = std::max<Index>(1, kTermsInT / ((inner + L - 1) / L));
  // Rows [r, r + R) into the sums at room; `fresh` when they are the flush's first.
  auto add_rows = [&](Index r, auto count, bool fresh) {
    constexpr int R = decltype(count)::value;
    for (Index c = 0; c < C; ++c) {
      T* sums = room + 2 * L * c;
      const P k = ei::pset1<P>(near[c]);
      P a[std::size_t(R)], b[std::size_t(R)];
      a[0] = fresh ? ei::pset1<P>(T(0)) : ei::ploadu<P>(sums);
      b[0] = fresh ? ei::pset1<P>(T(0)) : ei::ploadu<P>(sums + L);
      for (int j = 1; j < R; ++j) a[j] = b[j] = ei::pset1<P>(T(0));
      for (Index t = 0; t < whole; ++t) {
        unroll<R>([&](int j) {
          P v[Step::kInputs];
          const Index at = (r + j) * pitch + c * inner + t * L;
          unroll<Step::kInputs>([&](int i) { v[i] = load(in[i] + at); });
          Step::add(v, k, a[j], b[j]);
        });
      }
      if (cut > 0) {
        unroll<R>([&](int j) {
          P v[Step::kInputs];
          const Index at = (r + j) * pitch + c * inner + whole * L;
          unroll<Step::kInputs>([&](int i) {
            v[i] = load_first(in[i] + at, cut, T(Step::fill(i, double(near[c]))));
          });
          Step::add(v, k, a[j], b[j]);
        });
      }
      for (int j = 1; j < R; ++j) {
        a[0] = ei::padd(a[0], a[j]);
        b[0] = ei::padd(b[0], b[j]);
      }
      ei::pstoreu(sums, a[0]);
      ei::pstoreu(sums + L, b[0]);
    }
  };
  for (Index r0 = 0; r0 < rows; r0 += flush) {
    const Index r1 = std::min(rows, r0 + flush);
    Index r = r0;
    for (; r + 4 <= r1; r += 4) add_rows(r, std::integral_constant<int, 4>{}, r == r0);
    for (; r + 2 <= r1; r += 2) add_rows(r, std::integral_constant<int, 2>{}, r == r0);
    if (r < r1) add_rows(r, std::integral_constant<int, 1>{}, r == r0);
    // Lane by lane into the sums in double: adding up a channel's lanes at every flush took a
    // third of the instructions.
    for (Index j = 0; j < 2 * L * C; j += kWideLanes) {
      const Wide sum = load_wide(room + j);
      ei::pstoreu(wide + j, r0 == 0 ? sum : ei::padd(ei::ploadu<Wide>(wide + j), sum));
    }
  }
  for (Index c = 0; c < C; ++c)
    out[c] = {double(rows * inner), sum_of(wide + 2 * L * c, L), sum_of(wide + 2 * L * c + L, L)};
  if constexpr (!std::is_same_v<T, double>) {
    for (Index c = 0; c < C; ++c)
      if (!std::isfinite(out[c].a) || !std::isfinite(out[c].b))
        out[c] = sums_in_double<Step>(in, pitch, rows, c * inner, inner, double(near[c]));
  }
}

/// Step's sums over a block of rows in row order, centered on center[c] (see row_sums).
template <class Step, class S, class T>
void step_sums_in_rows(const S* const* in, Index pitch, Index C, Index inner, Index rows,
                       const double* center, SweepScratch<T> scratch, Partial* out) {
  T* room = scratch.values;
  T* near = room + 2 * kLanes<T> * C;  // the centers rounded to T: subtractions near them are exact
  for (Index c = 0; c < C; ++c) near[c] = T(center[c]);
  row_sums<Step>(in, pitch, C, inner, rows, room, scratch.sums, out);
  for (Index c = 0; c < C; ++c) out[c] = Step::recenter(out[c], double(near[c]), center[c]);
}

/// Moments over a block of rows in row order, in one pass: a channel's shift is the mean of its
/// first kShiftValues values (or all of its first row's, if fewer), see shift_of.
template <class S, class T>
void moments_in_rows(const S* x, Index pitch, Index C, Index inner, Index rows,
                     SweepScratch<T> scratch, Partial* out) {
  T* shift = scratch.values + 2 * kLanes<T> * C;
  for (Index c = 0; c < C; ++c) shift[c] = T(shift_of(x + c * inner, std::min(inner, kShiftValues)));
  row_sums<CenteredSums>(&x, pitch, C, inner, rows, scratch.values, scratch.sums, out);
  const double inverse = 1.0 / double(rows * inner);
  for (Index c = 0; c < C; ++c) out[c] = centered_to_moments(out[c], double(shift[c]), inverse);
}

}  // namespace detail
BNORM_END_NAMESPACE

#include "../warnings_end.hpp"
