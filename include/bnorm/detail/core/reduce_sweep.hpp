#pragma once
// Step 1 row by row with a table of accumulators per position: ACROSS rows, and short ALONG
// runs that row order cannot take.

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <vector>

#include "reduce_runs.hpp"

#include "../warnings_begin.hpp"

BNORM_BEGIN_NAMESPACE
namespace detail {

/// ACROSS reductions, and ALONG ones over short runs, sweep a block row by row: memory is read in
/// order, which the hardware prefetches, with eight streams of rows in flight. A row holds C
/// channels of `inner` positions each (inner = 1 ACROSS); every position has its own
/// accumulators in a per-worker table (a few KiB per thousand positions, so it stays in L1 or
/// L2), loaded and stored once per four or eight rows, and a channel's sums are its positions'
/// sums added up at the end of the block. Summed run by run instead, 7 x 7 images spent more time
/// on the ends of their runs than on their values. Rows go into one set of accumulators, or two
/// in turn (see kWideRow); each set's sums in T of at most kTermsInT rows are added up in double:
/// each lane adds at most kTermsInT values in T, as in step_sums_along.

/// Values of T per position table, padded to whole packets: the padding lanes load zeros
/// (inputs and centers alike) and so add nothing.
template <class T>
Index padded(Index positions) {
  return (positions + kLanes<T> - 1) / kLanes<T> * kLanes<T>;
}

/// A worker's room for sweeping `width` positions: `values`, sweep_values_size(width) of them,
/// for the centers and up to two sets of two sums in T (and a page to place them, see
/// apart_from), and `sums`, sweep_sums_size(width), for the block's two sums in double (added
/// up in packets: on 16 rows of 512 channels, adding them up a channel at a time cost more than
/// the sweep itself).
template <class T>
struct SweepScratch {
  T* values;
  double* sums;
};
template <class T>
Index sweep_values_size(Index width) {
  return 5 * padded<T>(width) + Index(kPageBytes / sizeof(T));
}

/// Where in `room` (with a page to spare) a sweep of rows `pitch` values apart, starting at
/// in[0..kInputs), puts its tables (and an elementwise pass over such rows, its table of
/// coefficients): as far as it can from the rows modulo 4 KiB. The rows' lines of a position
/// fall in a few L1 sets, the same for every row where rows lie a multiple of 4 KiB apart (rows
/// of 1024 or 2048 floats, or of 9 x 1024); the tables' lines of that position, in one of
/// those sets or next to it, evicted lines of rows ahead of the sweep, which then took up to
/// twice as long (docs/design.md, "Measurements behind the constants"). Rows modulo 4 KiB lie on
/// a lattice
/// with the period gcd(pitch bytes, 4 KiB), shifted by each input's start: the tables go to the
/// middle of the widest gap between the inputs' lattices, on a cache line.
template <int kInputs, class T, class S>
T* apart_from(T* room, const S* const* in, Index pitch) {
  constexpr std::uintptr_t line = 64;
  const auto step = std::uintptr_t(pitch) * sizeof(S) % kPageBytes;
  const std::uintptr_t period = std::max(line, step == 0 ? kPageBytes : std::gcd(step, kPageBytes));
  std::uintptr_t at[std::size_t(kInputs)];
  for (int i = 0; i < kInputs; ++i) at[i] = reinterpret_cast<std::uintptr_t>(in[i]) % period;
  std::sort(at, at + kInputs);
  std::uintptr_t start = at[kInputs - 1], gap = at[0] + period - start;  // the gap that wraps
  for (int i = 0; i + 1 < kInputs; ++i)
    if (at[i + 1] - at[i] > gap) start = at[i], gap = at[i + 1] - at[i];
  const std::uintptr_t want = (start + gap / 2) % period / line * line;
  const std::uintptr_t have = reinterpret_cast<std::uintptr_t>(room) % period;
  return room + (want + period - have) % period / sizeof(T);
}
template <class T>
Index sweep_sums_size(Index width) {
  return 2 * padded<T>(width);
}

/// Rows of at least this many packets are swept into one set of accumulators, narrower ones into
/// two in turn. One set has half the accumulators to load and store, which is faster on wide
/// rows; on narrow rows it is slower, since a position's additions, which chain from one group
/// of rows to the next, have few other positions' to overlap with.
inline constexpr Index kWideRow = 16;

/// The sets of accumulators for a sweep of rows of `row_width` positions: decided by the whole
/// row, never by the part of it one worker sweeps, so that a channel's sums do not depend on how
/// the channels are split over the workers.
template <class T>
int sweep_sets(Index row_width) {
  return row_width >= kWideRow * kLanes<T> ? 1 : 2;
}

/// ACROSS rows narrower than kPeriodPackets packets, or whose channels do not fill whole packets
/// (as few channels as an input layer has), are seen q at a time, as one row of q * C positions:
/// a whole number of packets, at least kPeriodPackets of them, whose position p belongs to
/// channel p % C. Each packet is then loaded and stored whole, each lane always holds the same
/// channel, and the elementwise pass walks several packets between the wraps of its table of
/// coefficients. q is the least multiple of L / gcd(C, L) that makes the row that wide, where
/// such a row is at most kWideRow packets and the tensor has q rows; 1 (no such view) otherwise.
/// The first outer / q * q rows are seen so, the rest as they are.
inline constexpr Index kPeriodPackets = 8;
template <class T>
Index period_rows(const Geometry& g) {
  constexpr Index L = kLanes<T>;
  if (!g.across() || (g.channels % L == 0 && g.channels >= kPeriodPackets * L)) return 1;
  const Index whole = L / std::gcd(g.channels, L);  // rows that fill whole packets
  const Index q = whole * std::max<Index>(1, (kPeriodPackets * L + whole * g.channels - 1) /
                                                 (whole * g.channels));
  return q > 1 && q * g.channels <= kWideRow * L && g.outer >= q ? q : 1;
}

/// Step's sums of `width` positions over the R rows row[0..R) of a block (rows `pitch` values
/// apart), centered on near[], added to the accumulators acc (set s of sum q at
/// acc[(2 * s + q) * stride]; row[j] into set (S + j) % kSets), or written there if kFresh.
template <class Step, int R, int kSets, int S, bool kFresh, class Stored>
void sweep_rows(const Stored* const* in, Index pitch, Index width, const Index* row,
                const Compute<Stored>* near, Compute<Stored>* acc, Index stride) {
  using T = Compute<Stored>;
  using P = Packet<T>;
  constexpr Index L = kLanes<T>;
  const Stored* at[std::size_t(R)][std::size_t(Step::kInputs)];
  for (int j = 0; j < R; ++j)
    for (int i = 0; i < Step::kInputs; ++i) at[j][i] = in[i] + row[j] * pitch;
  auto packets = [&](Index c, auto cut) {
    P sum[std::size_t(kSets)][2];
    unroll<2 * kSets>([&](int i) {
      sum[i / 2][i % 2] = kFresh ? ei::pset1<P>(T(0)) : ei::ploadu<P>(acc + i * stride + c);
    });
    const P k = ei::ploadu<P>(near + c);
    unroll<R>([&](int j) {
      P v[Step::kInputs];
      unroll<Step::kInputs>([&](int i) {
        if constexpr (decltype(cut)::value) v[i] = load_first(at[j][i] + c, width - c);
        else v[i] = load(at[j][i] + c);
      });
      Step::add(v, k, sum[(S + j) % kSets][0], sum[(S + j) % kSets][1]);
    });
    unroll<2 * kSets>([&](int i) { ei::pstoreu(acc + i * stride + c, sum[i / 2][i % 2]); });
  };
  Index c = 0;
  for (; c + L <= width; c += L) packets(c, std::false_type{});
  if (c < width) packets(c, std::true_type{});
}

/// The sum of n doubles, in packets: a channel's positions give the same sum wherever they lie.
inline double sum_of(const double* p, Index n) {
  Wide acc = ei::pset1<Wide>(0.0);
  Index i = 0;
  for (; i + kWideLanes <= n; i += kWideLanes) acc = ei::padd(acc, ei::ploadu<Wide>(p + i));
  if (i < n) acc = ei::padd(acc, load_first(p + i, n - i));
  return ei::predux(acc);
}

/// Step's sums in double of positions [first, first + len) of `rows` rows (`pitch` values apart),
/// centered on `center`: a channel whose sums in T are not finite (values near T's maximum, NaN,
/// inf) is summed again this way, on its own, so that it cannot change another channel's bits.
template <class Step, class S>
Partial sums_in_double(const S* const* in, Index pitch, Index rows, Index first, Index len,
                       double center) {
  double a = 0, b = 0, v[Step::kInputs];
  for (Index r = 0; r < rows; ++r) {
    for (Index p = first; p < first + len; ++p) {
      for (int i = 0; i < Step::kInputs; ++i) v[i] = double(computed(in[i][r * pitch + p]));
      Step::add(v, center, a, b);
    }
  }
  return {double(rows * len), a, b};
}

/// Step's sums over a block of `rows` rows (`pitch` values apart) for C channels of `inner`
/// positions, position p centered on near[p], into out[c], with `sets` sets of accumulators (see
/// sweep_sets). near[] may be the first part of scratch.values. A channel whose sums in T are not
/// finite (values near T's maximum, NaN, inf) is summed again in double on its own, so it cannot
/// change another channel's bits.
template <class Step, class S, class T>
void sweep_across(const S* const* in, Index pitch, Index C, Index inner, Index rows, int sets,
                  const T* near, SweepScratch<T> scratch, Partial* out) {
  const Index width = C * inner;
  const Index stride = padded<T>(width);  // a whole number of packets of T, and so of doubles
  T* acc = scratch.values + stride;
  double* sums = scratch.sums;  // sum q of position p at sums[q * stride + p]
  // Each set of accumulators in T takes at most kTermsInT rows of a sub-block before they are
  // added to the sums in double (the first time, written there); the sub-block's first rows
  // write them. Rows go into one set, or into two in turn where rows are narrow (see kWideRow).
  auto run = [&](auto set_count) {
    constexpr int kSets = decltype(set_count)::value;
    constexpr Index sub = kSets * kTermsInT;
    for (Index r0 = 0; r0 < rows; r0 += sub) {
      const Index r1 = std::min(rows, r0 + sub);
      // R rows at a time, one from each R-th of the sub-block: eight streams far apart (R per
      // input) keep more memory requests in flight than one, and moments load and store their
      // accumulators once per eight rows (four was 3-10% slower on most shapes, 4% faster on
      // 100 x 128 channels).
      constexpr int R = 8 / Step::kInputs;
      const Index q = (r1 - r0) / R;
      if (q == 0) std::fill_n(acc, 2 * kSets * stride, T(0));
      for (Index r = r0; r < r0 + q; ++r) {
        Index row[std::size_t(R)];
        for (int j = 0; j < R; ++j) row[j] = r + j * q;
        if (r == r0) sweep_rows<Step, R, kSets, 0, true>(in, pitch, width, row, near, acc, stride);
        else sweep_rows<Step, R, kSets, 0, false>(in, pitch, width, row, near, acc, stride);
      }
      for (Index r = r0 + R * q; r < r1; ++r) {
        if ((r - r0) % 2 == 0)
          sweep_rows<Step, 1, kSets, 0, false>(in, pitch, width, &r, near, acc, stride);
        else
          sweep_rows<Step, 1, kSets, kSets - 1, false>(in, pitch, width, &r, near, acc, stride);
      }
      for (Index c = 0; c < 2 * stride; c += kWideLanes) {  // sums (+)= the sub-block's
        Wide part = load_wide(acc + c);
        if constexpr (kSets == 2) part = ei::padd(part, load_wide(acc + 2 * stride + c));
        ei::pstoreu(sums + c, r0 == 0 ? part : ei::padd(ei::ploadu<Wide>(sums + c), part));
      }
    }
  };
  if (rows == 0) std::fill_n(sums, 2 * stride, 0.0);
  if (sets == 1) run(std::integral_constant<int, 1>{});
  else run(std::integral_constant<int, 2>{});
  bool finite = true;
  const double count = double(rows * inner);
  for (Index c = 0; c < C; ++c) {
    const double* a = sums + c * inner;
    const double* b = sums + stride + c * inner;
    out[c] = inner == 1 ? Partial{count, *a, *b} : Partial{count, sum_of(a, inner), sum_of(b, inner)};
    finite = finite && std::isfinite(out[c].a) && std::isfinite(out[c].b);
  }
  if constexpr (!std::is_same_v<T, double>) {
    for (Index c = 0; c < C && !finite; ++c)
      if (!std::isfinite(out[c].a) || !std::isfinite(out[c].b))
        out[c] = sums_in_double<Step>(in, pitch, rows, c * inner, inner, double(near[c * inner]));
  }
}

/// Fills each channel's `inner` positions of table[] with its value[c], and the padding with 0.
template <class T, class V>
void spread(const V* value, Index C, Index inner, T* table) {
  for (Index c = 0; c < C; ++c) std::fill_n(table + c * inner, inner, T(value[c]));
  std::fill(table + C * inner, table + padded<T>(C * inner), T(0));
}

/// Step's sums over a block of rows, centered on center[c] (see sweep_across).
template <class Step, class S, class T>
void step_sums_across(const S* const* in, Index pitch, Index C, Index inner, Index rows, int sets,
                      const double* center, SweepScratch<T> scratch, Partial* out) {
  scratch.values = apart_from<Step::kInputs>(scratch.values, in, pitch);
  T* near = scratch.values;  // the centers rounded to T: subtractions near them are exact
  spread(center, C, inner, near);
  sweep_across<Step>(in, pitch, C, inner, rows, sets, near, scratch, out);
  for (Index c = 0; c < C; ++c)
    out[c] = Step::recenter(out[c], double(near[c * inner]), center[c]);
}

/// Moments over a block of rows in one pass: a channel's shift is the mean of its first
/// positions of its first rows, at least 16 values where the block has them (see shift_of).
template <class S, class T>
void moments_across(const S* x, Index pitch, Index C, Index inner, Index rows, int sets,
                    SweepScratch<T> scratch, Partial* out) {
  using P = Packet<T>;
  constexpr Index L = kLanes<T>;
  const Index width = C * inner, stride = padded<T>(width);
  const Index m = std::min(rows, (kShiftValues / 4 + inner - 1) / inner);
  scratch.values = apart_from<1>(scratch.values, &x, pitch);
  T* shift = scratch.values;  // first per position, then per channel, then spread
  std::fill_n(shift, stride, T(0));
  for (Index r = 0; r < m; ++r) {
    const S* row = x + r * pitch;
    Index c = 0;
    for (; c + L <= width; c += L)
      ei::pstoreu(shift + c, ei::padd(ei::ploadu<P>(shift + c), load(row + c)));
    if (c < width)
      ei::pstoreu(shift + c, ei::padd(ei::ploadu<P>(shift + c), load_first(row + c, width - c)));
  }
  if (inner == 1) {
    const T share = T(1) / T(m);  // a shift need only be near the mean
    for (Index c = 0; c < C; ++c) shift[c] *= share;
  } else {  // the first packet of each channel's positions (those of a channel are contiguous)
    const Index k = std::min(inner, L);
    const T share = T(1) / T(m * k);
    for (Index c = 0; c < C; ++c) {
      const T* at = shift + c * inner;
      shift[c] = ei::predux(k == L ? ei::ploadu<P>(at) : load_first(at, k)) * share;
    }
  }
  for (Index c = 0; c < C; ++c)
    if (!std::isfinite(shift[c])) {
      const T first = computed(x[c * inner]);
      shift[c] = std::isfinite(first) ? first : T(0);
    }
  if (inner > 1)  // from the last channel down: channel c's value is read before it is covered
    for (Index c = C; c-- > 0;) std::fill_n(shift + c * inner, inner, shift[c]);
  sweep_across<CenteredSums>(&x, pitch, C, inner, rows, sets, shift, scratch, out);
  const double inverse = 1.0 / double(rows * inner);  // every channel's count
  for (Index c = 0; c < C; ++c)
    out[c] = centered_to_moments(out[c], double(shift[c * inner]), inverse);
}

}  // namespace detail
BNORM_END_NAMESPACE

#include "../warnings_end.hpp"
