#pragma once
// The kernel core, in the three steps every normalization is made of:
//
//   1. per-block reductions (moments of x, or the two gradient sums), each block fixed by the
//      shape alone and reduced with SIMD (in T where few values meet in each accumulator, else in
//      double), centered near the block's mean;
//   2. their merge per channel, in a fixed order (Chan's formula for moments, plain sums for
//      gradients), which turns into per-channel coefficients;
//   3. an elementwise pass that applies the coefficients (normalize, or the input gradient).
//
// Because blocks never depend on the thread count and are merged in block order, results are
// bit-identical for any number of threads. Keeping the steps apart is what lets statistics be
// merged across processes (SyncBatchNorm) or over other axes (GroupNorm, LayerNorm) later.
//
// The tensor is seen as x[outer][channels][inner], contiguous: channels-first data has
// outer = N and inner = the spatial size; channels-last data (and (N, C) data) has
// outer = N * spatial and inner = 1. With inner > 1 the kernels vectorize ALONG the inner run of
// one channel; with inner == 1 they vectorize ACROSS channels.

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "../tuning.hpp"
#include "parallel.hpp"
#include "simd.hpp"

#include "warnings_begin.hpp"

BNORM_BEGIN_NAMESPACE
namespace detail {

/// ALONG runs shorter than this (and longer ones that in_row_order takes) are handled a row of
/// channels at a time, as the rows of ACROSS data are: reduced in memory order (see in_row_order;
/// position by position, see sweep_across, where that cannot be) and applied in memory order
/// (see BlendCoefs and SelectCoefs; RowCoefs for runs shorter than a packet). A run per channel
/// would spend much of its time on its ends, and could not stream its stores.
inline constexpr Index kShortRun = 256;
/// Short ALONG runs are swept a piece of channels at a time, about this many positions wide: the
/// accumulators the sweep reads and writes with every row (three values of T per position on
/// rows this wide, see kWideRow: 12 KiB of floats) then stay in L1. (512 to 4096 measured alike
/// on 7 x 7 and 14 x 14 images.)
inline constexpr Index kSweepWidth = 1024;

struct Geometry {
  Index outer = 0;
  Index channels = 0;
  Index inner = 1;

  Index size() const { return outer * channels * inner; }
  Index per_channel() const { return outer * inner; }
  bool across() const { return inner == 1; }
};

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

/// How the data is cut into reduction blocks: a function of the shape alone.
struct Blocking {
  // ALONG (inner > 1): block b of a channel covers rows [first_row, first_row + rows) of that
  // channel, and within each row the elements [first, first + len) of the inner run.
  static constexpr Index kAlongElems = 2048;  // 8 KiB of floats: pass two reads from L1
  // ALONG, read a row of channels at a time (`by_rows`: runs shorter than kShortRun, or
  // in_row_order): block b covers rows [b * rows, ...) of a channel.
  static constexpr Index kShortRows = 128;
  // ACROSS (inner == 1): block b covers rows [b * rows, ...) of every channel. Blocks are
  // large, since each one ends with scalar work per channel (finishing its sums, merging them),
  // all of about the same size, and a multiple of four of them where there are several, so
  // that two or four threads share them evenly.
  static constexpr Index kAcrossElems = Index{1} << 20;
  static constexpr Index kAcrossRowsMax = 4096;

  Index rows = 1;    // rows per block
  Index pieces = 1;  // ALONG: blocks per row (long rows are cut into pieces)
  Index piece = 0;   // ALONG: elements per piece
  Index blocks = 0;  // ALONG: blocks per channel; ACROSS: blocks in all

  Blocking(const Geometry& g, bool by_rows) {
    if (g.across()) {
      const Index most =
          std::clamp<Index>(kAcrossElems / std::max<Index>(g.channels, 1), 16, kAcrossRowsMax);
      Index wanted = std::max<Index>(1, (g.outer + most - 1) / most);
      if (wanted > 1) wanted = (wanted + 3) / 4 * 4;
      rows = std::max<Index>(1, (g.outer + wanted - 1) / wanted);
      blocks = (g.outer + rows - 1) / rows;
    } else if (by_rows) {
      rows = kShortRows;
      piece = g.inner;
      blocks = (g.outer + rows - 1) / rows;
    } else if (g.inner >= kAlongElems) {
      pieces = (g.inner + kAlongElems - 1) / kAlongElems;
      piece = (g.inner + pieces - 1) / pieces;
      blocks = g.outer * pieces;
    } else {
      rows = kAlongElems / g.inner;
      piece = g.inner;
      blocks = (g.outer + rows - 1) / rows;
    }
  }

  struct Extent {
    Index first_row, rows, first, len;
  };
  Extent along(const Geometry& g, Index b) const {
    const Index row = (b / pieces) * rows;
    const Index first = (b % pieces) * piece;
    return {row, std::min(rows, g.outer - row), first, std::min(piece, g.inner - first)};
  }
  /// Swept blocks (ACROSS, short ALONG runs): the rows of block b.
  Index swept_rows(const Geometry& g, Index b) const { return std::min(rows, g.outer - b * rows); }
};

/// Scratch memory of the kernels, reused from call to call so that steady-state calls allocate
/// nothing. Tables read and written in packets are aligned to the packet size (and each
/// worker's part of them to a cache line): a packet across two cache lines costs two accesses.
template <class T>
struct Workspace {
  template <class V>
  using Aligned = std::vector<V, Eigen::aligned_allocator<V>>;
  std::vector<Partial> partials;  // per block and channel
  std::vector<T> coefs;           // coefficient k of channel c at [k * channels + c]
  Aligned<T> row_coefs;           // coefficients laid out for RowCoefs (per worker)
  std::vector<double> centers;    // per channel
  Aligned<T> sweeps;              // ACROSS reductions' accumulators (per worker)
  Aligned<double> sweep_sums;     // ACROSS reductions' block sums (per worker)
  std::vector<LaneIndex<T>> lane_index;  // GroupCoefs' indices
  std::vector<T> period_coefs;           // coefficients of channel p % C at p (see period_rows)
  std::vector<double> period_centers;    // centers likewise
};

/// Tensors smaller than this are not worth handing out in pieces finer than the reduction
/// blocks: waking a thread costs about as much as the work.
inline constexpr Index kFineSplitBytes = Index{1} << 20;
inline bool fine_split(const Geometry& g, const Eigen::ThreadPoolDevice* device,
                       std::size_t element_bytes) {
  return workers(device) > 1 && g.size() * Index(element_bytes) >= kFineSplitBytes;
}

/// ACROSS: whether workers take whole blocks of rows. Otherwise (fewer blocks than workers, on
/// a tensor worth it) they share out every block's channels for the reduction and its rows for
/// the elementwise pass.
inline bool whole_blocks(const Geometry& g, const Blocking& bl,
                         const Eigen::ThreadPoolDevice* device, std::size_t element_bytes) {
  return bl.blocks >= workers(device) || !fine_split(g, device, element_bytes);
}

/// Values of T to give each worker for a table of n values of its own in a shared vector: n
/// rounded up to whole cache lines, and a line more, so that no two workers ever write to the
/// same line (false sharing cost two threads a third of their speed on 64 channels).
template <class T>
Index worker_slot(Index n) {
  constexpr Index line = Index{64} / Index(sizeof(T));
  return (n + line - 1) / line * line + line;
}

// ---------------------------------------------------------------------------------------------
// Step 1: block reductions.

/// Requests the cache line that holds p.
template <class T>
inline void prefetch(const T* p) {
#if defined(__GNUC__)
  __builtin_prefetch(p);
#else
  (void)p;
#endif
}

/// Requests every cache line that holds a byte of [p, p + bytes).
template <class T>
void prefetch_lines(const T* p, Index bytes) {
  const auto end = reinterpret_cast<std::uintptr_t>(p) + std::uintptr_t(bytes);
  for (auto line = reinterpret_cast<std::uintptr_t>(p) & ~std::uintptr_t{63}; line < end;
       line += 64)
    prefetch(reinterpret_cast<const char*>(line));
}

/// While a run is read: requests the lines of the `bytes` bytes that start `ahead` bytes after p
/// (which may lie past the end of p's array: a prefetch never faults), one per 64 bytes, which
/// over the run's steps requests each line once.
template <class T>
inline void prefetch_ahead(const T* p, Index ahead, Index bytes) {
  const auto first = reinterpret_cast<std::uintptr_t>(p) + std::uintptr_t(ahead);
  for (std::uintptr_t b = 0; b < std::uintptr_t(bytes); b += 64)
    prefetch(reinterpret_cast<const char*>(first + b));
}

/// ALONG runs are a channel's rows, a whole batch row apart: with short rows (7 x 7 images)
/// every run starts in another page, where the hardware prefetcher does not follow. The
/// reductions ask for the run kRunsAhead ahead themselves. Longer runs are asked for
/// kReadAhead bytes ahead of where they are read, and the next run's first bytes when a run
/// starts: one core reads main memory up to 1.4x faster this way than with the hardware
/// prefetcher alone.
inline constexpr Index kRunsAhead = 4;
inline constexpr Index kShortRunBytes = 2048;
inline constexpr Index kReadAhead = 2048;

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
    auto load = [&](const T* p) {
      if constexpr (std::is_same_v<Scalar, T>) return ei::ploadu<P>(p);
      else return load_wide(p);
    };
    auto load_first_n = [&](const T* p, Index n, Scalar fill) {
      if constexpr (std::is_same_v<Scalar, T>) return load_first(p, n, T(fill));
      else return load_wide_first(p, n, fill);
    };
    Index i = 0;
    P v[U][Step::kInputs];
    for (; i + U * L <= len; i += U * L) {
      if (ahead > 0)
        for (int k = 0; k < Step::kInputs; ++k)
          prefetch_ahead(in[k] + off + i, ahead, U * L * Index(sizeof(T)));
      unroll<U>([&](int u) {
        unroll<Step::kInputs>([&](int k) { v[u][k] = load(in[k] + off + i + u * L); });
        Step::add(v[u], c, a[u], b[u]);
      });
    }
    for (int u = 0; i + L <= len; i += L, ++u) {
      for (int k = 0; k < Step::kInputs; ++k) v[0][k] = load(in[k] + off + i);
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

template <class Step, class T>
Partial step_sums_along(const T* const* in, Index stride, Index runs, Index len, double center) {
  auto sums_in = [&](auto sums, auto at) {
    const auto c = ei::pset1<typename decltype(sums)::P>(at);
    const Index bytes = len * Index(sizeof(T));
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

/// Moments of one ALONG block in one pass over it.
template <class T>
Partial moments_along(const T* x, Index stride, Index runs, Index len) {
  const double shift = double(static_cast<T>(shift_of(x, std::min(len, kShiftValues))));  // see recenter
  return centered_to_moments(step_sums_along<CenteredSums>(&x, stride, runs, len, shift), shift,
                             1.0 / double(runs * len));
}

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
inline constexpr std::uintptr_t kPageBytes = 4096;
template <class T>
Index sweep_values_size(Index width) {
  return 5 * padded<T>(width) + Index(kPageBytes / sizeof(T));
}

/// Where in `room` (with a page to spare) a sweep of rows `pitch` values apart, starting at
/// in[0..kInputs), puts its tables (and an elementwise pass over such rows, its table of
/// coefficients): as far as it can from the rows modulo 4 KiB. The rows' lines of a position
/// fall in a few L1 sets, the same for every row where rows lie a multiple of 4 KiB apart (rows
/// of 1024 or 2048 floats, or of 9 x 1024); the tables' lines of that position, in one of
/// those sets or next to it, evicted lines of rows ahead of the sweep. On the AMD EPYC VM,
/// 32 x 1024 x 3 x 3 channels-first backward took 190-213 us with the tables up to 128 bytes
/// from the rows modulo 4 KiB, 135-163 us at 128-256 bytes, 109-122 us from 512 bytes to half a
/// page; the training forward, 114-125 us against 76-79 us. Rows modulo 4 KiB lie on a lattice
/// with the period gcd(pitch bytes, 4 KiB), shifted by each input's start: the tables go to the
/// middle of the widest gap between the inputs' lattices, on a cache line.
template <int kInputs, class T>
T* apart_from(T* room, const T* const* in, Index pitch) {
  constexpr std::uintptr_t line = 64;
  const auto step = std::uintptr_t(pitch) * sizeof(T) % kPageBytes;
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
/// two in turn. With one set, having half the accumulators to load and store, a sweep over 128
/// rows of 256 or 1024 channels (in L2) took 0.8-0.95 of the time of two, and over 32 rows of
/// 113 x 9 positions 0.6-0.8; but on narrow rows it was slower (channels-last training on
/// 32 x 64 x 56 x 56, from main memory, took 1.3x as long), where a position's additions, which
/// chain from one group of rows to the next, have few other positions' to overlap with.
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
template <class Step, int R, int kSets, int S, bool kFresh, class T>
void sweep_rows(const T* const* in, Index pitch, Index width, const Index* row, const T* near,
                T* acc, Index stride) {
  using P = Packet<T>;
  constexpr Index L = kLanes<T>;
  const T* at[std::size_t(R)][std::size_t(Step::kInputs)];
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
        else v[i] = ei::ploadu<P>(at[j][i] + c);
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
template <class Step, class T>
Partial sums_in_double(const T* const* in, Index pitch, Index rows, Index first, Index len,
                       double center) {
  double a = 0, b = 0, v[Step::kInputs];
  for (Index r = 0; r < rows; ++r) {
    for (Index p = first; p < first + len; ++p) {
      for (int i = 0; i < Step::kInputs; ++i) v[i] = double(in[i][r * pitch + p]);
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
template <class Step, class T>
void sweep_across(const T* const* in, Index pitch, Index C, Index inner, Index rows, int sets,
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
template <class Step, class T>
void step_sums_across(const T* const* in, Index pitch, Index C, Index inner, Index rows, int sets,
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
template <class T>
void moments_across(const T* x, Index pitch, Index C, Index inner, Index rows, int sets,
                    SweepScratch<T> scratch, Partial* out) {
  using P = Packet<T>;
  constexpr Index L = kLanes<T>;
  const Index width = C * inner, stride = padded<T>(width);
  const Index m = std::min(rows, (kShiftValues / 4 + inner - 1) / inner);
  scratch.values = apart_from<1>(scratch.values, &x, pitch);
  T* shift = scratch.values;  // first per position, then per channel, then spread
  std::fill_n(shift, stride, T(0));
  for (Index r = 0; r < m; ++r) {
    const T* row = x + r * pitch;
    Index c = 0;
    for (; c + L <= width; c += L)
      ei::pstoreu(shift + c, ei::padd(ei::ploadu<P>(shift + c), ei::ploadu<P>(row + c)));
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
    if (!std::isfinite(shift[c])) shift[c] = std::isfinite(x[c * inner]) ? x[c * inner] : T(0);
  if (inner > 1)  // from the last channel down: channel c's value is read before it is covered
    for (Index c = C; c-- > 0;) std::fill_n(shift + c * inner, inner, shift[c]);
  sweep_across<CenteredSums>(&x, pitch, C, inner, rows, sets, shift, scratch, out);
  const double inverse = 1.0 / double(rows * inner);  // every channel's count
  for (Index c = 0; c < C; ++c)
    out[c] = centered_to_moments(out[c], double(shift[c * inner]), inverse);
}

/// ALONG runs of at least a packet, short enough that a run adds at most kTermsInT values to
/// each lane (up to 1024 floats with AVX-512), are reduced in memory order: row after row and,
/// within a row, channel after channel, each channel's run into packets of its own. Short runs
/// were swept instead, with a table of accumulators per position that goes through L1 with
/// every row (models of the two read 14 x 14 images at 1.6x and 1.1x the time of a plain read of
/// the same bytes; on 32 x 1024 x 14 x 14, forward training went from 2.1x to 1.2x a memcpy).
/// Longer runs, up to that limit, were read run by run in groups of channels (see
/// reduce_then_apply); in row order, 32 x 512 x 28 x 28 backward went from 2.1-2.5x to 1.5-1.8x
/// a memcpy (two A/B runs).
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
/// (Four rather than two, on the AMD EPYC VM, medians of 7 runs of two builds in turn, 1 thread:
/// 0.92-0.95x the time on 128 x 256 x 25 channels-first, 0.97-1.01x on 32 x 512 x 7 x 7,
/// 32 x 1024 x 14 x 14 and 64 x 128 x 100.) A channel's sums in T add up `flush` rows, at most
/// kTermsInT values per lane, before they are added lane by lane to its sums in double (at
/// wide), whose lanes are added up at the end. A channel whose sums are not finite is summed
/// again in double on its own.
template <class Step, class T>
void row_sums(const T* const* in, Index pitch, Index C, Index inner, Index rows, T* room,
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
          unroll<Step::kInputs>([&](int i) { v[i] = ei::ploadu<P>(in[i] + at); });
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
template <class Step, class T>
void step_sums_in_rows(const T* const* in, Index pitch, Index C, Index inner, Index rows,
                       const double* center, SweepScratch<T> scratch, Partial* out) {
  T* room = scratch.values;
  T* near = room + 2 * kLanes<T> * C;  // the centers rounded to T: subtractions near them are exact
  for (Index c = 0; c < C; ++c) near[c] = T(center[c]);
  row_sums<Step>(in, pitch, C, inner, rows, room, scratch.sums, out);
  for (Index c = 0; c < C; ++c) out[c] = Step::recenter(out[c], double(near[c]), center[c]);
}

/// Moments over a block of rows in row order, in one pass: a channel's shift is the mean of its
/// first kShiftValues values (or all of its first row's, if fewer), see shift_of.
template <class T>
void moments_in_rows(const T* x, Index pitch, Index C, Index inner, Index rows,
                     SweepScratch<T> scratch, Partial* out) {
  T* shift = scratch.values + 2 * kLanes<T> * C;
  for (Index c = 0; c < C; ++c) shift[c] = T(shift_of(x + c * inner, std::min(inner, kShiftValues)));
  row_sums<CenteredSums>(&x, pitch, C, inner, rows, scratch.values, scratch.sums, out);
  const double inverse = 1.0 / double(rows * inner);
  for (Index c = 0; c < C; ++c) out[c] = centered_to_moments(out[c], double(shift[c]), inverse);
}

// ---------------------------------------------------------------------------------------------
// Step 3: elementwise passes. An Op maps kInputs input packets and kCoefs per-channel
// coefficient packets to one output packet.

/// y = (x - k0) * k1 + k2, in training: k0 = the mean rounded to T (`high` of split_mean),
/// k1 = weight * invstd, k2 = bias - (mean - k0) * k1. x - k0 is exact for x near the mean, and
/// the part of the mean that k0 lost is folded into k2 in double: y keeps full precision however
/// large the mean is next to the spread, where y = x * scale + shift would lose |mean| / spread
/// ulps.
struct NormalizeOp {
  static constexpr int kInputs = 1, kCoefs = 3;
  template <class P>
  static P apply(const P* in, const P* k) {
    return ei::pmadd(ei::psub(in[0], k[0]), k[1], k[2]);
  }
};

/// y = x * k0 + k1: inference, with weight, bias and the running statistics folded into one
/// scale and shift per channel; also dx = dy * scale for frozen statistics.
struct ScaleShiftOp {
  static constexpr int kInputs = 1, kCoefs = 2;
  template <class P>
  static P apply(const P* in, const P* k) {
    return ei::pmadd(in[0], k[0], k[1]);
  }
};

/// dx = dy * k0 + (x - k1) * k2 + k3, with k1 the mean rounded to T and what it lost folded
/// into k3, as in NormalizeOp. Inputs: {dy, x}.
struct InputGradOp {
  static constexpr int kInputs = 2, kCoefs = 4;
  template <class P>
  static P apply(const P* in, const P* k) {
    return ei::pmadd(in[0], k[0], ei::pmadd(ei::psub(in[1], k[1]), k[2], k[3]));
  }
};

/// The mean of `m` rounded to T, and what that rounding lost, in double.
template <class T>
struct SplitMean {
  T high;
  double low;
};
template <class T>
inline SplitMean<T> split_mean(const Partial& m) {
  const T high = T(m.mean());
  return {high, (m.shift - double(high)) + m.a};
}

/// Where an elementwise pass reads and writes. `copy`, when set, receives a copy of input 0
/// (the module keeps its input for backward this way without a second read).
template <class T, int kInputs>
struct Streams {
  const T* in[std::size_t(kInputs)];
  T* out;
  T* copy = nullptr;
};

/// ALONG coefficients: channel c's for `inner` values, then channel c + 1's, and so on (a row's
/// channels lie one after the other). A packet must not straddle two channels: runs span one
/// channel, or start at a channel's start with `inner` a multiple of the packet size.
template <class T, int kCoefs>
struct RunCoefs {
  const T* coef;
  Index channels, c, inner;
  Index pos = 0;  // of the current element in its channel's values
  Packet<T> p[std::size_t(kCoefs)];

  RunCoefs(const T* coef_, Index channels_, Index c_, Index inner_)
      : coef(coef_), channels(channels_), c(c_), inner(inner_) {
    load();
  }
  void load() {
    for (int j = 0; j < kCoefs; ++j) p[j] = ei::pset1<Packet<T>>(coef[j * channels + c]);
  }
  /// Coefficient j of the packet t packets on, for t < span().
  Packet<T> packet(int j, Index) const { return p[j]; }
  /// Whole packets left in this channel's values.
  Index span() const { return (inner - pos) / kLanes<T>; }
  void next(Index n) {
    pos += n;
    if (pos == inner && c + 1 < channels) {
      pos = 0;
      ++c;
      load();
    }
  }
};

/// ALONG coefficients for runs of whole rows of channels-first data (a run may span several
/// rows), with inner >= kLanes: a packet then holds the values of at most two channels, and takes
/// its coefficients from their broadcasts, blended where the channels meet. Unlike RowCoefs,
/// this needs no table of every position's coefficients, so a run can span any number of
/// channels and the pass walks memory in order. A run may also cover a row's channels
/// [c0, c0 + channels) alone: coef then points at c0's, with `stride` the row's channel count.
template <class T, int kCoefs>
struct BlendCoefs {
  using P = Packet<T>;
  static constexpr Index L = kLanes<T>;
  const T* coef;
  Index channels, inner, stride;
  Index c = 0;     // channel of the current element
  Index left = 0;  // values of channel c from the current element on
  P lane = ei::plset<P>(T(0));  // 0, 1, 2, ...
  P now[std::size_t(kCoefs)], then[std::size_t(kCoefs)];  // channel c's, and the next channel's (0 after the last)
  P last[std::size_t(kCoefs)];  // of the last packet that starts in channel c: now and then blended

  BlendCoefs(const T* coef_, Index channels_, Index inner_)
      : BlendCoefs(coef_, channels_, inner_, channels_) {}
  BlendCoefs(const T* coef_, Index channels_, Index inner_, Index stride_)
      : coef(coef_), channels(channels_), inner(inner_), stride(stride_), left(inner_) {
    assert(inner >= L);
    load(now, 0);
    load(then, 1 % channels);
    blend();
  }
  void load(P* to, Index channel) {
    for (int j = 0; j < kCoefs; ++j) to[j] = ei::pset1<P>(coef[j * stride + channel]);
  }
  void blend() {
    const P mine = ei::pcmp_lt(lane, ei::pset1<P>(T((left - 1) % L + 1)));
    for (int j = 0; j < kCoefs; ++j) last[j] = ei::pselect(mine, now[j], then[j]);
  }
  /// Coefficient j of the packet t packets on, for t < span().
  P packet(int j, Index t) const { return t + 1 < span() ? now[j] : last[j]; }
  /// Packets that start in channel c, the last one perhaps across its end. Once per channel
  /// rather than once per packet across an end, the bookkeeping cost 7 x 7 images less.
  Index span() const { return (left + L - 1) / L; }
  void next(Index n) {
    for (left -= n; left <= 0; left += inner) {
      c = c + 1 == channels ? 0 : c + 1;
      for (int j = 0; j < kCoefs; ++j) now[j] = then[j];
      load(then, c + 1 == channels ? 0 : c + 1);
    }
    blend();
  }
};

/// What BlendCoefs gives, for channels of fewer than kSelectPackets packets: every packet selects
/// its coefficients from channel c's and the next one's, lane by lane, with no branch. Where most
/// packets straddle two channels, that costs less than BlendCoefs' bookkeeping and branches
/// once per channel; on longer runs, the selects on every packet cost more. (A/B over 3 rounds
/// on the AMD EPYC VM, bnorm / memcpy, 1 thread, NCHW: 128 x 256 x 25 inference 2.08 -> 1.47,
/// training 3.32 -> 3.17, backward 4.31 -> 4.41; with selects on every short run, 7 x 7 images
/// trained at 2.46 -> 2.93 and 64 x 128 x 100 at 1.84 -> 2.51.) GroupCoefs, faster still, takes
/// its place where the target permutes in one instruction and the channels fill whole packets.
inline constexpr Index kSelectPackets = 3;
template <class T, int kCoefs>
struct SelectCoefs {
  using P = Packet<T>;
  static constexpr Index L = kLanes<T>;
  const T* coef;
  Index channels, inner;
  Index c = 0, c_next;  // channel of the current element, and the one after it
  Index left;           // values of channel c from the current element on
  P lane = ei::plset<P>(T(0));  // 0, 1, 2, ...

  SelectCoefs(const T* coef_, Index channels_, Index inner_)
      : coef(coef_), channels(channels_), inner(inner_), c_next(1 % channels_), left(inner_) {
    assert(inner >= L);
  }
  P packet(int j, Index) const {
    const T* k = coef + j * channels;
    return ei::pselect(ei::pcmp_lt(lane, ei::pset1<P>(T(left))), ei::pset1<P>(k[c]),
                       ei::pset1<P>(k[c_next]));
  }
  Index span() const { return 1; }
  /// n <= L <= inner: channel c ends at most once, and selects track it without a branch.
  void next(Index n) {
    left -= n;
    const bool ends = left <= 0;
    left = ends ? left + inner : left;
    c = ends ? c_next : c;
    const Index after = c_next + 1 == channels ? 0 : c_next + 1;
    c_next = ends ? after : c_next;
  }
};

/// ALONG coefficients for runs of whole rows of channels-first data whose channels come in whole
/// groups of kLanes (C a multiple of it), each group `inner` packets long: a group's coefficients
/// are loaded once, a packet of them per coefficient, and each packet of values takes its lanes'
/// from those with a permute, by its place in the group (lane l of the group's packet t belongs
/// to its channel index[t * kLanes + l] = (t * kLanes + l) / inner). No bookkeeping per channel
/// (BlendCoefs) nor selects per packet (SelectCoefs): where the target permutes in one
/// instruction, this is the fastest of the three on runs of fewer than kGroupPackets packets.
/// (A/B on the AMD EPYC VM with AVX-512, bnorm / memcpy, NCHW, 1 thread, against SelectCoefs on
/// 128 x 256 x 25: inference 1.47 -> 1.07, training 3.00 -> 2.27, backward 4.04 -> 3.56; against
/// BlendCoefs on 512 x 7 x 7: inference 1.31 -> 1.09, training 2.39 -> 2.28, backward 3.56 ->
/// 3.38; on 64 x 128 x 100, 6 packets a channel, it was slower: training 1.75 -> 1.96. Against
/// RowCoefs' tables, by chunks of channels, on runs shorter than a packet, 32 x 1024 x 3 x 3:
/// inference 2.04 -> 1.32, training 4.26 -> 3.59, backward 6.17 -> 5.18.)
/// A run must start at a row's start, with no packet cut short before it (kCutsFirstPacket).
inline constexpr Index kGroupPackets = 4;
template <class T, int kCoefs>
struct GroupCoefs {
  using P = Packet<T>;
  static constexpr Index L = kLanes<T>;
  const T* coef;
  const LaneIndex<T>* index;
  Index channels, inner;
  Index c = 0;  // first channel of the current group
  Index t = 0;  // packet of the current element in its group
  P group[std::size_t(kCoefs)];

  GroupCoefs(const T* coef_, Index channels_, Index inner_, const LaneIndex<T>* index_)
      : coef(coef_), index(index_), channels(channels_), inner(inner_) {
    assert(channels % L == 0);
    load();
  }
  void load() {
    for (int j = 0; j < kCoefs; ++j) group[j] = ei::ploadu<P>(coef + j * channels + c);
  }
  P packet(int j, Index u) const { return permute<T>(group[j], index + (t + u) * L); }
  Index span() const { return inner - t; }
  void next(Index n) {  // whole packets
    t += n / L;
    if (t == inner) {
      t = 0;
      c = c + L == channels ? 0 : c + L;
      load();
    }
  }
};

/// Whether apply_runs may cut its first packet short to align the stores that follow: not so
/// where the coefficients go by whole packets from the run's start.
template <class Coefs>
inline constexpr bool kCutsFirstPacket = true;
template <class T, int kCoefs>
inline constexpr bool kCutsFirstPacket<GroupCoefs<T, kCoefs>> = false;

/// Coefficients that change along the run. A row holds `width` positions; ACROSS, a row is the
/// C channels and a run spans whole rows; ALONG with short runs, a row is a group of channels,
/// each repeated `inner` times, and a run is one such row of the tensor. Coefficient j of
/// position t is at ext[j * stride + t], and the row is followed by its first kLanes positions
/// again, so that a packet starting anywhere reads its coefficients contiguously: rows of any
/// width, even 3 channels, vectorize.
template <class T>
struct RowCoefs {
  const T* ext;
  Index stride, width;
  Index pos = 0;  // position of the current element

  static Index stride_for(Index width) { return width + kLanes<T>; }
  /// Coefficient j of the packet t packets on, for t < span().
  Packet<T> packet(int j, Index t) const {
    return ei::ploadu<Packet<T>>(ext + j * stride + pos + t * kLanes<T>);
  }
  /// Whole packets that start before the row wraps around.
  Index span() const { return (width - pos + kLanes<T> - 1) / kLanes<T>; }
  void next(Index n) {
    pos += n;
    if (pos >= width) pos = (pos - width) % width;
  }
};

/// Lays out channels [c0, c1) of coef[j * C + c], each repeated `inner` times, for RowCoefs;
/// ext has room for `coefs` rows of stride_for((c1 - c0) * inner).
template <class T>
RowCoefs<T> layout_row_coefs(int coefs, Index C, Index c0, Index c1, Index inner, const T* coef,
                             T* ext) {
  const Index width = (c1 - c0) * inner, stride = RowCoefs<T>::stride_for(width);
  for (int j = 0; j < coefs; ++j) {
    T* row = ext + j * stride;
    if (inner == 1)  // one copy: a fill_n call per value cost about ten instructions each
      std::copy(coef + j * C + c0, coef + j * C + c1, row);
    else
      for (Index c = c0; c < c1; ++c) std::fill_n(row + (c - c0) * inner, inner, coef[j * C + c]);
    for (Index t = width; t < stride; ++t) row[t] = row[t - width];  // wraps around
  }
  return {ext, stride, width};
}

/// The last-level cache the kernels plan by (see Tuning).
inline Index last_level_cache_bytes() { return tuning().last_level_cache_bytes; }

/// Main memory is written and read faster with two streams far apart in flight than with one
/// (not so data in cache, where more streams only cost): the elementwise passes over data too
/// large for half the last-level cache (other processes share it), or for Tuning::far_bytes
/// where that is set, walk two parts of their rows side by side.
inline constexpr int kFarParts = 2;
inline int apply_parts(const Geometry& g, int tensors, std::size_t element_bytes) {
  const Index far = tuning().far_bytes.value_or(last_level_cache_bytes() / 2);
  return g.size() * tensors * Index(element_bytes) > far ? kFarParts : 1;
}

/// Cuts [first, first + count) into K parts of count / K and calls fn(starts, part, K) with
/// the K starts, then fn(&start, rest, 1) for what is left over (rest < K), if anything.
template <int K, class Fn>
void split_in(Index first, Index count, Fn& fn) {
  const Index part = count / K;
  if (part > 0) {
    Index starts[std::size_t(K)];
    for (int j = 0; j < K; ++j) starts[j] = first + j * part;
    fn(static_cast<const Index*>(starts), part, std::integral_constant<int, K>{});
  }
  if (count > K * part) {
    const Index start = first + K * part;
    fn(&start, count - K * part, std::integral_constant<int, 1>{});
  }
}

/// Passes over far ACROSS data whose table of coefficients is larger than kL1TableBytes, and
/// that read two inputs (backward), walk kTableParts parts instead of kFarParts. Such a table
/// does not stay in L1 beside the rows streaming through it (four coefficients of 1024 channels
/// take 16 KiB of a 32 KiB L1), so its packets come from L2, and each of them serves one run per
/// part. (On the AMD EPYC VM, channels-last backward's elementwise pass alone, bnorm / memcpy,
/// over 12.8 MB: 2.1-2.4 with two parts on 1024 and 2048 channels against 1.4-1.7 on 512, where
/// the table fits, and 1.35 with the table cut to 256 channels' worth, wrong results but the
/// same streams; 1.6-2.1 with four parts, 2.0-2.1 with three. Whole backward passes, medians of
/// 9 runs of two builds in turn, 1 thread: 32 x 1024 x 14 x 14 0.92x the time, 32 x 2048 x 7 x 7
/// and 4096 x 1024 0.89x. Cutting the rows into pieces as wide as a table that fits was slower,
/// 2.4-3.4: the reads of a piece's rows jump from page to page. The forward passes, one input,
/// already run at the pace of their streamed stores: four parts made their pass alone 1.0-1.4x
/// slower, mostly 1.2-1.35x; in cache, where more runs only add streams, so did four parts on
/// backward.)
inline constexpr int kTableParts = 4;
inline constexpr Index kL1TableBytes = Index{8} << 10;

/// split_in with K = `parts`: 1, kFarParts, or kMost.
template <int kMost, class Fn>
void split_in(int parts, Index first, Index count, Fn fn) {
  if constexpr (kMost != kFarParts)
    if (parts == kMost) return split_in<kMost>(first, count, fn);
  if (parts == kFarParts) split_in<kFarParts>(first, count, fn);
  else split_in<1>(first, count, fn);
}
template <class Fn>
void split_in(int parts, Index first, Index count, Fn fn) {
  split_in<kFarParts>(parts, first, count, fn);
}

/// A load that follows a store to an address equal in its low 12 bits (4K aliasing) waits for
/// that store. Walking forward, where an output lies a little past an input modulo 4 KiB (up to
/// kAliasBytes), every load would follow a store it matches by a packet or two: on the AMD EPYC
/// VM, an output 64 bytes past its input took 1.6-2.3x as long to stream (inference on 12.8 MB
/// tensors) and 1.1-1.4x as long to train or run backward. Tensors allocated one after another
/// lie so (a heap's chunks are a header apart). Such runs load each packet kAheadPackets packets
/// before it is used, so that every load comes before the stores it matches; their loads then
/// follow the stores kAheadPackets + 1 packets before them, which is where runs walked this way
/// are slow and runs walked the plain way are not. This is done for the forward passes (one
/// input), one run at a time. Backward, with two inputs, lost less to aliasing and gained
/// nothing that held from loading ahead: 8 packets ahead, one run at a time, it was faster on
/// some shapes and slower on others (channels-last 32 x 2048 x 7 x 7, 3.9 -> 4.5x a memcpy);
/// 16 packets ahead, two runs side by side, it was slower.
inline constexpr std::uintptr_t kAliasBytes = 192;
inline constexpr int kAheadPackets = 4;
template <class T>
bool trails_closely(const T* out, const T* in) {
  const auto d =
      (reinterpret_cast<std::uintptr_t>(out) - reinterpret_cast<std::uintptr_t>(in)) % kPageBytes;
  return d > 0 && d <= kAliasBytes;
}

/// Op over elements [0, n) of K runs at off[0..K), which share their coefficients (the same
/// sequence of them from the start of each run), side by side. With kStream, packets are
/// stored non-temporally at aligned addresses; runs whose alignments differ go one by one, as do
/// runs with an output that trails an input closely (see kAliasBytes), loaded kAhead packets
/// ahead.
template <class Op, bool kStream, int K, int kAhead = 0, class T, class Coefs>
void apply_runs(const Streams<T, Op::kInputs>& s, const Index* off, Index n, Coefs k) {
  using P = Packet<T>;
  constexpr Index L = kLanes<T>;
  auto misalignment = [](const T* p) { return reinterpret_cast<std::uintptr_t>(p) % sizeof(P); };
  for (int r = 1; r < K; ++r) {
    if (misalignment(s.out + off[r]) != misalignment(s.out + off[0]) ||
        (s.copy && misalignment(s.copy + off[r]) != misalignment(s.copy + off[0]))) {
      for (int j = 0; j < K; ++j) apply_runs<Op, kStream, 1, kAhead>(s, off + j, n, k);
      return;
    }
  }
  if constexpr (kAhead == 0 && Op::kInputs == 1) {
    bool trails = false;
    for (int r = 0; r < K; ++r)
      for (int q = 0; q < K; ++q)
        for (int j = 0; j < Op::kInputs; ++j) {
          const T* input = s.in[j] + off[q];
          trails = trails || trails_closely(s.out + off[r], input) ||
                   (s.copy && trails_closely(s.copy + off[r], input));
        }
    if (trails) {
      for (int j = 0; j < K; ++j) apply_runs<Op, kStream, 1, kAheadPackets>(s, off + j, n, k);
      return;
    }
  }
  // Where each run reads and writes, in locals: the compiler must assume that stores through
  // packets may change anything in memory, s and off[] included.
  const T* in[std::size_t(K)][std::size_t(Op::kInputs)];
  T* out[std::size_t(K)];
  T* copy[std::size_t(K)];
  for (int r = 0; r < K; ++r) {
    for (int j = 0; j < Op::kInputs; ++j) in[r][j] = s.in[j] + off[r];
    out[r] = s.out + off[r];
    copy[r] = s.copy ? s.copy + off[r] : nullptr;
  }
  // With kAhead, ahead[a][r] holds run r's inputs of the whole packet a packets after the next
  // one to apply (ahead[0]: that one), in registers: their indices are constants.
  P ahead[std::size_t(std::max(kAhead, 1))][std::size_t(K)][std::size_t(Op::kInputs)];
  // Elements [i, i + count) of every run: one whole packet, or the first count < L of one;
  // its coefficients are t packets on from k's position.
  auto packets = [&](Index i, Index t, Index count, auto whole, bool stream, bool stream_copy) {
    P kp[Op::kCoefs];
    unroll<Op::kCoefs>([&](int j) { kp[j] = k.packet(j, t); });
    unroll<K>([&](int r) {
      P v[Op::kInputs];
      if constexpr (decltype(whole)::value) {
        if constexpr (kAhead > 0) {
          unroll<Op::kInputs>([&](int j) {
            v[j] = ahead[0][r][j];
            unroll<kAhead - 1>([&](int a) { ahead[a][r][j] = ahead[a + 1][r][j]; });
          });
          if (i + (kAhead + 1) * L <= n)  // before this packet's stores
            unroll<Op::kInputs>([&](int j) {
              ahead[kAhead - 1][r][j] = ei::ploadu<P>(in[r][j] + i + kAhead * L);
            });
        } else {
          unroll<Op::kInputs>([&](int j) { v[j] = ei::ploadu<P>(in[r][j] + i); });
        }
        const P y = Op::apply(v, kp);
        if (kStream && stream) stream_store(out[r] + i, y);
        else ei::pstoreu(out[r] + i, y);
        if (kStream && stream_copy) stream_store(copy[r] + i, v[0]);
        else if (copy[r]) ei::pstoreu(copy[r] + i, v[0]);
      } else {
        unroll<Op::kInputs>([&](int j) { v[j] = load_first(in[r][j] + i, count); });
        store_first(out[r] + i, Op::apply(v, kp), count);
        if (copy[r]) store_first(copy[r] + i, v[0], count);
      }
    });
  };
  // The first packet is cut short where that aligns the stores that follow (and the loads, where
  // inputs and output are equally misaligned, as buffers from one allocator are): a packet
  // across two cache lines costs two accesses.
  Index i = 0;
  bool stream = false, stream_copy = false;
  const auto m = misalignment(out[0]);
  if (m % sizeof(T) == 0 && (kCutsFirstPacket<Coefs> || m == 0)) {  // else misaligned packets
    i = std::min(n, Index((sizeof(P) - m) % sizeof(P) / sizeof(T)));
    if (i > 0) packets(0, 0, i, std::false_type{}, false, false);
    k.next(i);
    stream = kStream;
    stream_copy = kStream && copy[0] && misalignment(copy[0] + i) == 0;
  }
  if constexpr (kAhead > 0)
    unroll<kAhead>([&](int a) {
      if (i + (a + 1) * L <= n)
        unroll<K>([&](int r) {
          unroll<Op::kInputs>([&](int j) { ahead[a][r][j] = ei::ploadu<P>(in[r][j] + i + a * L); });
        });
    });
  // Stretches of whole packets up to where the coefficients wrap around.
  while (i + L <= n) {
    const Index stretch = std::min((n - i) / L, k.span());
    assert(stretch > 0 && "a packet straddles two channels' coefficients");
    for (Index t = 0; t < stretch; ++t)
      packets(i + t * L, t, L, std::true_type{}, stream, stream_copy);
    i += stretch * L;
    k.next(stretch * L);
  }
  if (i < n) packets(i, 0, n - i, std::false_type{}, false, false);
}

/// ALONG: rows [o0, o1) of channels [c0, c1), in `parts` parts side by side.
/// coef[k * channels + c] is coefficient k of c.
template <class Op, bool kStream, class T>
void apply_along(const Geometry& g, const Streams<T, Op::kInputs>& s, const T* coef, Index o0,
                 Index o1, Index c0, Index c1, int parts) {
  // A row's channels go as one run where no packet straddles two of them: runs of a multiple of
  // the packet size, and no cut first packet (apply_runs aligns its stores); or where packets
  // take their coefficients blended from two channels' (short runs). Else a run per channel.
  const bool whole_rows = g.inner % kLanes<T> == 0 &&
                          reinterpret_cast<std::uintptr_t>(s.out) % sizeof(Packet<T>) == 0;
  const bool blended = !whole_rows && g.inner >= kLanes<T> && g.inner < kShortRun;
  split_in(parts, o0, o1 - o0, [&](const Index* starts, Index rows, auto tag) {
    constexpr int K = decltype(tag)::value;
    for (Index o = 0; o < rows; ++o) {
      for (Index c = c0; c < c1; c = whole_rows || blended ? c1 : c + 1) {
        Index off[std::size_t(K)];
        for (int j = 0; j < K; ++j) off[j] = ((starts[j] + o) * g.channels + c) * g.inner;
        if (blended)
          apply_runs<Op, kStream, K>(
              s, off, (c1 - c) * g.inner,
              BlendCoefs<T, Op::kCoefs>(coef + c, c1 - c, g.inner, g.channels));
        else
          apply_runs<Op, kStream, K>(s, off, (whole_rows ? c1 - c : 1) * g.inner,
                                     RunCoefs<T, Op::kCoefs>(coef, g.channels, c, g.inner));
      }
    }
  });
}

// A chunk's table of coefficients takes at most this much: a third of a 48 KiB L1 data cache,
// beside the inputs streaming through it. (32 KiB, for the four of backward, was 5-12% slower.)
inline constexpr Index kChunkTableBytes = Index{16} << 10;

/// ALONG, short runs: channels per chunk, and the room a chunk's RowCoefs take.
template <class Op, class T>
Index chunk_channels(const Geometry& g) {
  return std::max<Index>(1, kChunkTableBytes / (Op::kCoefs * Index(sizeof(T))) / g.inner);
}
template <class T>
Index chunk_table_size(const Geometry& g, Index channels, int coefs) {
  return coefs * RowCoefs<T>::stride_for(channels * g.inner);
}

/// ALONG, short runs: Op over rows [o0, o1) of channels [c0, c1), each row's channels as one
/// run, in `parts` parts side by side. `table` has room for chunk_table_size.
template <class Op, bool kStream, class T>
void apply_chunk(const Geometry& g, const Streams<T, Op::kInputs>& s, const T* coef, T* table,
                 Index c0, Index c1, Index o0, Index o1, int parts) {
  const auto k = layout_row_coefs(Op::kCoefs, g.channels, c0, c1, g.inner, coef, table);
  split_in(parts, o0, o1 - o0, [&](const Index* starts, Index rows, auto tag) {
    constexpr int K = decltype(tag)::value;
    for (Index o = 0; o < rows; ++o) {
      Index off[std::size_t(K)];
      for (int j = 0; j < K; ++j) off[j] = ((starts[j] + o) * g.channels + c0) * g.inner;
      apply_runs<Op, kStream, K>(s, off, (c1 - c0) * g.inner, k);
    }
  });
}

/// Step 3 alone, split over rows, with the coefficients in ws.coefs. ACROSS, each worker
/// takes the blocks of rows it reduced and walks them from the last to the first, so that it
/// starts on what is still in its cache (where there are fewer blocks than workers, the rows
/// are shared out evenly instead).
template <class Op, bool kStream, class T>
void apply_all(const Geometry& g, const Streams<T, Op::kInputs>& s, Workspace<T>& ws,
               const Eigen::ThreadPoolDevice* device) {
  const T* coef = ws.coefs.data();
  int parts = apply_parts(g, Op::kInputs + 1, sizeof(T));
  const Index width = g.channels * g.inner;  // of a row
  // Rows [r0, r1) in `parts` parts (at most `most`), each one run with coefficients k from its
  // start.
  using Far = std::integral_constant<int, kFarParts>;
  auto apply_rows = [&](Index r0, Index r1, const auto& k, auto most) {
    split_in<decltype(most)::value>(parts, r0, r1 - r0,
                                    [&](const Index* starts, Index rows, auto tag) {
      constexpr int K = decltype(tag)::value;
      Index off[std::size_t(K)];
      for (int j = 0; j < K; ++j) off[j] = starts[j] * width;
      apply_runs<Op, kStream, K>(s, off, rows * width, k);
    });
    if constexpr (kStream) stream_fence();
  };
  constexpr Index L = kLanes<T>;
  const bool permuted =
      kPermutes<T> && !g.across() && g.channels % L == 0 && g.inner < kGroupPackets * L;
  if (g.across()) {
    // The table of coefficients goes between the rows modulo 4 KiB, as a sweep's tables do (see
    // apart_from). On the AMD EPYC VM, with the table a line behind the rows' sets instead
    // (medians of 5, 1 thread): 4096 x 1024 training took 1.35 ms against 1.11, channels-last
    // 32 x 1024 x 3 x 3 backward 114 us against 99.
    ws.row_coefs.resize(std::size_t(Op::kCoefs * RowCoefs<T>::stride_for(g.channels)) +
                        kPageBytes / sizeof(T));
    const T* streams[Op::kInputs + 2];
    for (int j = 0; j < Op::kInputs; ++j) streams[j] = s.in[j];
    streams[Op::kInputs] = s.out;
    streams[Op::kInputs + 1] = s.copy ? s.copy : s.out;
    T* table = apart_from<Op::kInputs + 2>(ws.row_coefs.data(), streams, g.channels);
    const auto k = layout_row_coefs(Op::kCoefs, g.channels, 0, g.channels, 1, coef, table);
    const Blocking bl(g, true);
    using Most = std::integral_constant<int, Op::kInputs == 2 ? kTableParts : kFarParts>;
    if (parts == kFarParts && Op::kCoefs * g.channels * Index(sizeof(T)) > kL1TableBytes)
      parts = Most::value;
    if (whole_blocks(g, bl, device, sizeof(T))) {
      parallel_ranges(device, bl.blocks, [&](Index b0, Index b1) {
        for (Index b = b1; b-- > b0;)
          apply_rows(b * bl.rows, std::min(g.outer, (b + 1) * bl.rows), k, Most{});
      });
    } else {
      parallel_ranges(device, g.outer, [&](Index r0, Index r1) { apply_rows(r0, r1, k, Most{}); });
    }
  } else if (g.inner < kShortRun && (g.inner >= kLanes<T> || permuted)) {
    // Each worker's rows in memory order, as one run (in `parts` parts).
    if (permuted) {
      ws.lane_index.resize(std::size_t(g.inner * L));
      for (Index i = 0; i < g.inner * L; ++i)
        ws.lane_index[std::size_t(i)] = LaneIndex<T>(i / g.inner);
    }
    const LaneIndex<T>* index = ws.lane_index.data();
    parallel_ranges(device, g.outer, [&](Index r0, Index r1) {
      if (permuted)
        apply_rows(r0, r1, GroupCoefs<T, Op::kCoefs>(coef, g.channels, g.inner, index), Far{});
      else if (g.inner < kSelectPackets * kLanes<T>)
        apply_rows(r0, r1, SelectCoefs<T, Op::kCoefs>(coef, g.channels, g.inner), Far{});
      else
        apply_rows(r0, r1, BlendCoefs<T, Op::kCoefs>(coef, g.channels, g.inner), Far{});
    });
  } else if (g.inner < kShortRun) {
    const Index group = chunk_channels<Op, T>(g), groups = (g.channels + group - 1) / group;
    const Index slot = worker_slot<T>(chunk_table_size<T>(g, group, Op::kCoefs));
    ws.row_coefs.resize(std::size_t(slot * workers(device)));
    // Split over chunks where there are enough, else over rows.
    const bool by_chunks = groups >= workers(device);
    parallel_workers(device, by_chunks ? groups : g.outer, [&](Index w, Index i0, Index i1) {
      T* table = ws.row_coefs.data() + w * slot;
      for (Index q = by_chunks ? i0 : 0; q < (by_chunks ? i1 : groups); ++q)
        apply_chunk<Op, kStream>(g, s, coef, table, q * group, std::min(g.channels, (q + 1) * group),
                                 by_chunks ? 0 : i0, by_chunks ? g.outer : i1, parts);
      if constexpr (kStream) stream_fence();
    });
  } else if (g.outer >= workers(device)) {
    parallel_ranges(device, g.outer, [&](Index o0, Index o1) {
      apply_along<Op, kStream>(g, s, coef, o0, o1, 0, g.channels, parts);
      if constexpr (kStream) stream_fence();
    });
  } else {
    parallel_ranges(device, g.channels, [&](Index c0, Index c1) {
      apply_along<Op, kStream>(g, s, coef, 0, g.outer, c0, c1, parts);
      if constexpr (kStream) stream_fence();
    });
  }
}

/// Whether the elementwise pass of s streams its output. One thread does so from
/// Tuning::stream_bytes on. Several threads do so only where the pass's tensors do not fit in
/// seven eighths of the last-level cache together (the rest holds code, tables and other
/// processes' lines): the cache's bandwidth grows with the threads, memory's much less. (On the AMD EPYC VM, 2 threads
/// over tensors of 12.8 MB, 80% of the L3 for two, streamed an inference at 1.7-1.9x a 2-thread
/// memcpy, 1.1-1.3x not streamed; one thread at 1.0-1.1x streamed, 1.0-1.5x not. Over two of
/// 16 MiB, the whole L3, 2-thread forward training took 1.8-2.1x not streamed, 1.4-1.7x
/// streamed, in two A/B runs; inference was even.)
/// Tuning::stream_by_size_alone makes the size alone decide, whatever the threads.
template <class T, int kInputs>
bool streams_output(const Geometry& g, const Streams<T, kInputs>& s,
                    const Eigen::ThreadPoolDevice* device) {
  const Index bytes = g.size() * Index(sizeof(T));
  const int tensors = kInputs + 1 + (s.copy ? 1 : 0);
  const bool by_threads = tuning().stream_by_size_alone || workers(device) == 1 ||
                          bytes * tensors > last_level_cache_bytes() / 8 * 7;
  return bytes >= tuning().stream_bytes && by_threads;
}

template <class Op, class T>
void apply_all(const Geometry& g, const Streams<T, Op::kInputs>& s, Workspace<T>& ws,
               const Eigen::ThreadPoolDevice* device) {
  if (const Index q = period_rows<T>(g); q > 1) {
    // q rows at a time as one row of P channels, with channel p % C's coefficients at p; then
    // the rows left over as they are.
    const Index C = g.channels, P = q * C, head = g.outer / q * q;
    ws.period_coefs.resize(std::size_t(Op::kCoefs * P));
    for (int j = 0; j < Op::kCoefs; ++j)
      for (Index p = 0; p < P; ++p)
        ws.period_coefs[std::size_t(j * P + p)] = ws.coefs[std::size_t(j * C + p % C)];
    std::swap(ws.coefs, ws.period_coefs);
    apply_all<Op>(Geometry{g.outer / q, P, 1}, s, ws, device);
    std::swap(ws.coefs, ws.period_coefs);
    if (head < g.outer) {
      Streams<T, Op::kInputs> rest = s;
      for (auto& in : rest.in) in += head * C;
      rest.out += head * C;
      if (rest.copy) rest.copy += head * C;
      apply_all<Op>(Geometry{g.outer - head, C, 1}, rest, ws, nullptr);
    }
    return;
  }
  if (streams_output(g, s, device)) apply_all<Op, true>(g, s, ws, device);
  else apply_all<Op, false>(g, s, ws, device);
}

// ---------------------------------------------------------------------------------------------
// The three steps together.

/// ALONG, one worker: how many channels it takes at a time, so that their inputs stay in cache
/// until the elementwise pass reads them again. The last-level cache is shared with other
/// processes: each group may take a quarter of it, split among the workers. Groups this large
/// give the reduction long runs of memory to read in order (a row's channels lie one after the
/// other): in groups of 512 KiB, walked a channel at a time, backward took 1.2-1.4x as long on
/// 28 x 28 and 56 x 56 images. (Tuning::group_bytes, where set, is the room of a group.)
inline Index channels_per_group(const Geometry& g, int inputs, std::size_t element_bytes,
                                Index workers) {
  const Index bytes = g.per_channel() * inputs * Index(element_bytes);
  const Index room = tuning().group_bytes.value_or(
      std::max<Index>(Index{512} << 10, last_level_cache_bytes() / (4 * workers)));
  return std::max<Index>(1, room / std::max<Index>(bytes, 1));
}

/// Whether runs short enough for row order (see in_row_order) go in groups of channels too:
/// where a reduction reads two inputs (backward) and they do not fit in the last-level cache
/// together. The elementwise pass, which reads both again for every value it writes, then finds
/// them in cache instead of memory. (On the AMD EPYC VM, medians of 5 to 9 runs of two builds in
/// turn, backward, 1 thread: 32 x 512 x 28 x 28 0.88-0.92x the time, 2 threads 0.76-0.84x;
/// 64 x 1024 x 14 x 14 0.88x; on inputs of twice the cache, 32 x 1024 x 14 x 14, 64 x 512 x 14 x 14
/// and 128 x 512 x 7 x 7, 0.96-0.99x. Training, whose one input is read again while its output
/// streams to memory, took 1.05-1.12x as long on 32 x 512 x 28 x 28 in groups.)
inline bool rows_in_groups(const Geometry& g, int inputs, std::size_t element_bytes) {
  return inputs > 1 && g.size() * inputs * Index(element_bytes) > last_level_cache_bytes();
}

/// Step 2 hands finish() the totals of at most this many channels at a time, so that its work
/// per channel (square roots and divisions) runs as vector loops: the work per channel, one
/// channel after another, took about a quarter of a (256, 512) forward.
inline constexpr Index kFinishBatch = 64;

/// invstd[j] = 1 / sqrt(var[j] + eps) for j < n, var in T or double, in packets of doubles: a
/// loop of std::sqrt does not vectorize where sqrt may set errno (GCC's default), and one channel
/// at a time took 12% of a (256, 512) forward. Bit for bit what the scalar expression gives.
template <class V>
void inverse_std(const V* var, Index n, double eps, double* invstd) {
  const Wide one = ei::pset1<Wide>(1.0), shift = ei::pset1<Wide>(eps);
  Index j = 0;
  for (; j + kWideLanes <= n; j += kWideLanes)
    ei::pstoreu(invstd + j, ei::pdiv(one, sqrt_exact(ei::padd(load_wide(var + j), shift))));
  for (; j < n; ++j) invstd[j] = 1.0 / std::sqrt(double(var[j]) + eps);
}

/// A reduction: what is summed per block (Step, or moments when Step is void), how blocks merge,
/// and `finish(c, n, total, coef)`, which turns the totals of channels [c, c + n) (n at most
/// kFinishBatch) into their coefficients.
///
/// Runs step 1 over every block, step 2 per channel, and step 3 with Op. ALONG with runs too
/// long for in_row_order, where there are enough channels for every worker, each worker takes
/// whole channels and does all three steps on a group of them at a time, so the elementwise pass
/// reads the group back from cache. Otherwise the steps run one after the other, each split over
/// all workers: shorter runs are read a whole row at a time, which groups would cut into short
/// pieces (1.2-1.4x slower on 7 x 7 images; on the AMD EPYC VM, groups small enough for L2 were
/// slower still on 7 x 7 and 14 x 14 images, whose elementwise pass waits on its stores, not on
/// its loads). Either way, every block is reduced by the same code and merged in the same order:
/// the results do not depend on the split.
template <class Op, class Step, class T, class Merge, class Finish>
void reduce_then_apply(const Geometry& whole, const T* const* reduce_in, const double* centers,
                       Merge merge, Finish finish, const Streams<T, Op::kInputs>& s,
                       Workspace<T>& ws, const Eigen::ThreadPoolDevice* device) {
  constexpr bool kMoments = std::is_void_v<Step>;
  constexpr int kReduceInputs = [] {
    if constexpr (kMoments) return 1;
    else return Step::kInputs;
  }();
  // ACROSS rows of few channels are reduced q at a time, as rows of q * C channels (see
  // period_rows): g is that view, whose channel p is channel p % C of `whole`, and whose sums are
  // folded into the whole's channels before they are finished.
  const Index q = period_rows<T>(whole), head = whole.outer / q * q;
  const Geometry g = q > 1 ? Geometry{whole.outer / q, q * whole.channels, 1} : whole;
  if (q > 1 && centers) {
    ws.period_centers.resize(std::size_t(g.channels));
    for (Index p = 0; p < g.channels; ++p)
      ws.period_centers[std::size_t(p)] = centers[p % whole.channels];
    centers = ws.period_centers.data();
  }
  const Index C = g.channels;
  const bool by_rows = in_row_order<T>(g);
  const bool swept = by_rows || g.inner < kShortRun;  // a row of channels at a time (or ACROSS)
  const Blocking bl(g, swept);
  // Channels a sweep covers: all of them ACROSS, a piece as wide as kSweepWidth ALONG. A worker
  // may sweep fewer, but every sweep takes its accumulator sets from this width (sweep_sets).
  const Index sweep_piece = g.across() ? C : std::max<Index>(1, kSweepWidth / g.inner);
  const Index swept_width = std::min(C, sweep_piece) * g.inner;
  ws.coefs.resize(std::size_t(Op::kCoefs * C));
  T* coef = ws.coefs.data();
  // Block b's of channel c at part[b * C + c]; with q > 1, then the rows left over and the
  // whole's totals, per channel of the whole.
  ws.partials.resize(std::size_t(C * bl.blocks + (q > 1 ? 2 * whole.channels : 0)));
  Partial* part = ws.partials.data();
  const bool by_groups = (!swept || (by_rows && rows_in_groups(g, kReduceInputs, sizeof(T)))) &&
                         (workers(device) == 1 || C >= 4 * workers(device));

  // Step 2 for channels [c0, c1): blocks merged into block 0's partials, in block order.
  auto merge_and_finish = [&](Index c0, Index c1) {
    for (Index first = c0; first < c1; first += kFinishBatch) {
      const Index n = std::min(kFinishBatch, c1 - first);
      Partial* total = part + first;
      for (Index b = 1; b < bl.blocks; ++b)
        for (Index j = 0; j < n; ++j) total[j] = merge(total[j], part[b * C + first + j]);
      finish(first, n, total, coef);
    }
  };
  // Step 1 for block b of channels [c0, c1), long ALONG runs: run by run.
  auto reduce_runs = [&](Index b, Index c0, Index c1) {
    Partial* out = part + b * C + c0;
    const auto e = bl.along(g, b);
    for (Index c = c0; c < c1; ++c) {
      const Index off = (e.first_row * C + c) * g.inner + e.first;
      if constexpr (kMoments) {
        out[c - c0] = moments_along(reduce_in[0] + off, C * g.inner, e.rows, e.len);
      } else {
        const T* in[Step::kInputs];
        for (int k = 0; k < Step::kInputs; ++k) in[k] = reduce_in[k] + off;
        out[c - c0] = step_sums_along<Step>(in, C * g.inner, e.rows, e.len, centers[c]);
      }
    }
  };
  // Step 1 for block b of channels [c0, c1): swept, in row order, or run by run.
  auto reduce = [&](SweepScratch<T> scratch, Index b, Index c0, Index c1) {
    if (!swept) return reduce_runs(b, c0, c1);
    Partial* out = part + b * C + c0;
    const Index pitch = C * g.inner, rows = bl.swept_rows(g, b);
    const T* in[std::size_t(kReduceInputs)];
    for (int k = 0; k < kReduceInputs; ++k)
      in[k] = reduce_in[k] + b * bl.rows * pitch + c0 * g.inner;
    if (by_rows) {
      if constexpr (kMoments)
        moments_in_rows(in[0], pitch, c1 - c0, g.inner, rows, scratch, out);
      else
        step_sums_in_rows<Step>(in, pitch, c1 - c0, g.inner, rows, centers + c0, scratch, out);
    } else {
      const int sets = sweep_sets<T>(swept_width);
      if constexpr (kMoments)
        moments_across(in[0], pitch, c1 - c0, g.inner, rows, sets, scratch, out);
      else
        step_sums_across<Step>(in, pitch, c1 - c0, g.inner, rows, sets, centers + c0, scratch, out);
    }
  };
  // Room for `values` values of T and `sums` doubles, per worker.
  auto scratch_room = [&](Index values, Index sums) {
    const Index room = worker_slot<T>(values), sums_room = worker_slot<double>(sums);
    ws.sweeps.resize(std::size_t(room * workers(device)));
    ws.sweep_sums.resize(std::size_t(sums_room * workers(device)));
    return [&ws, room, sums_room](Index worker) {
      return SweepScratch<T>{ws.sweeps.data() + worker * room,
                             ws.sweep_sums.data() + worker * sums_room};
    };
  };

  if (by_groups) {
    // Each worker takes whole channels, a group at a time, and does all three steps on a group,
    // whose data the elementwise pass then reads back from cache.
    const int parts = apply_parts(g, Op::kInputs + 1, sizeof(T));
    const Index group = channels_per_group(g, kReduceInputs, sizeof(T), workers(device));
    const auto scratch = scratch_room(by_rows ? row_values_size<T>(group) : 0,
                                      by_rows ? row_sums_size<T>(group) : 0);
    auto run = [&](auto streaming) {
      constexpr bool kStream = decltype(streaming)::value;
      parallel_workers(device, C, [&](Index worker, Index c0, Index c1) {
        // A group is reduced whole, then applied. (Reducing the next group while applying this
        // one, a row in proportion at a time, took 1.02-1.13x as long: on the AMD EPYC VM,
        // medians of 7 runs of two builds in turn, 1 thread, 32 x 64 x 112 x 112 backward 1.13x,
        // 32 x 256 x 56 x 56 training 1.08x, backward 1.03x; in pieces of 1024 to 4096 values of
        // a run, 1.09-1.32x.) The reduction walks a group's blocks row by row and, within a row,
        // channel by channel: in memory order, since the channels of a row lie one after the
        // other (in row order, see row_sums, or run by run).
        for (Index gc0 = c0; gc0 < c1; gc0 += group) {
          const Index gc1 = std::min(gc0 + group, c1), n = gc1 - gc0;
          if (by_rows) {
            for (Index b = 0; b < bl.blocks; ++b) reduce(scratch(worker), b, gc0, gc1);
          } else {
            for (Index i = 0; i < n * bl.blocks; ++i) {
              const Index row = i / (n * bl.pieces), c = gc0 + i / bl.pieces % n;
              reduce_runs(row * bl.pieces + i % bl.pieces, c, c + 1);
            }
          }
          merge_and_finish(gc0, gc1);
          apply_along<Op, kStream>(g, s, coef, 0, g.outer, gc0, gc1, parts);
        }
        if constexpr (kStream) stream_fence();
      });
    };
    if (streams_output(g, s, device)) run(std::true_type{});
    else run(std::false_type{});
    return;
  }

  if (g.across()) {
    // Workers take whole blocks, or share out the channels of every block in whole packets (a
    // channel's sums do not depend on which channels are swept with it).
    constexpr Index L = kLanes<T>;
    const bool by_blocks = whole_blocks(g, bl, device, sizeof(T));
    const auto scratch = scratch_room(sweep_values_size<T>(C), sweep_sums_size<T>(C));
    parallel_workers(device, by_blocks ? bl.blocks : (C + L - 1) / L,
                     [&](Index worker, Index u0, Index u1) {
      const Index c0 = by_blocks ? 0 : u0 * L, c1 = by_blocks ? C : std::min(C, u1 * L);
      for (Index b = by_blocks ? u0 : 0; b < (by_blocks ? u1 : bl.blocks); ++b)
        reduce(scratch(worker), b, c0, c1);
    });
  } else if (by_rows) {
    // Each worker walks its channels of every row.
    const auto scratch = scratch_room(row_values_size<T>(C), row_sums_size<T>(C));
    parallel_workers(device, C, [&](Index worker, Index c0, Index c1) {
      for (Index b = 0; b < bl.blocks; ++b) reduce(scratch(worker), b, c0, c1);
    });
  } else {
    // ALONG: the blocks of pieces of channels, a piece of short runs as wide as a sweep's
    // accumulators stay in L1 for.
    const Index piece = swept ? sweep_piece : 1;
    const Index pieces = (C + piece - 1) / piece;
    const Index width = swept ? swept_width : 0;
    const auto scratch = scratch_room(sweep_values_size<T>(width), sweep_sums_size<T>(width));
    parallel_workers(device, pieces * bl.blocks, [&](Index worker, Index i0, Index i1) {
      for (Index i = i0; i < i1; ++i) {
        const Index c0 = i / bl.blocks * piece;
        reduce(scratch(worker), i % bl.blocks, c0, std::min(C, c0 + piece));
      }
    });
  }
  if (q > 1) {
    // The whole's channel c: its channels c, c + C, ... of the view, each merged over the blocks,
    // then the rows left over, always in that order.
    const Index wc = whole.channels;
    Partial* rest = part + C * bl.blocks;
    Partial* total = rest + wc;
    if (head < whole.outer) {
      const T* in[std::size_t(kReduceInputs)];
      for (int k = 0; k < kReduceInputs; ++k) in[k] = reduce_in[k] + head * wc;
      const auto scratch = scratch_room(sweep_values_size<T>(wc), sweep_sums_size<T>(wc));
      const Index rows = whole.outer - head;
      if constexpr (kMoments)
        moments_across(in[0], wc, wc, 1, rows, sweep_sets<T>(wc), scratch(0), rest);
      else
        step_sums_across<Step>(in, wc, wc, 1, rows, sweep_sets<T>(wc), centers, scratch(0), rest);
    }
    for (Index p = 0; p < C; ++p)
      for (Index b = 1; b < bl.blocks; ++b) part[p] = merge(part[p], part[b * C + p]);
    for (Index c = 0; c < wc; ++c) {
      total[c] = part[c];
      for (Index p = c + wc; p < C; p += wc) total[c] = merge(total[c], part[p]);
      if (head < whole.outer) total[c] = merge(total[c], rest[c]);
    }
    for (Index first = 0; first < wc; first += kFinishBatch)
      finish(first, std::min(kFinishBatch, wc - first), total + first, coef);
    apply_all<Op>(whole, s, ws, device);
    return;
  }
  // Channels are merged side by side, so that their chains of merges overlap. On a small
  // tensor, the calling thread merges alone: waking a worker costs more than the merges.
  const Eigen::ThreadPoolDevice* merging = fine_split(g, device, sizeof(T)) ? device : nullptr;
  parallel_ranges(merging, C, merge_and_finish);
  apply_all<Op>(g, s, ws, device);
}

}  // namespace detail
BNORM_END_NAMESPACE

#include "warnings_end.hpp"
