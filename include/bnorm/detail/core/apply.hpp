#pragma once
// Step 3: the elementwise pass over the whole tensor, split over the workers.

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <vector>

#include "coefs.hpp"
#include "ops.hpp"
#include "plan.hpp"
#include "reduce_sweep.hpp"
#include "workspace.hpp"

#include "../warnings_begin.hpp"

BNORM_BEGIN_NAMESPACE
namespace detail {

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
/// part. Cutting the rows into pieces as wide as a table that fits is slower: the reads of a
/// piece's rows jump from page to page. The forward passes, one input, already run at the pace
/// of their streamed stores, where more parts only add streams.
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

/// Op over elements [0, n) of K runs at off[0..K), which share their coefficients (the same
/// sequence of them from the start of each run), side by side. With kStream, whole lines are
/// stored non-temporally (a packet, or two where a line takes two, kLinePackets); runs whose
/// alignments differ go one by one, as do runs with an output that trails an input closely (see
/// kAliasBytes), loaded kAhead packets ahead.
template <class Op, bool kStream, int K, int kAhead = 0, class S, class Coefs>
void apply_runs(const Streams<S, Op::kInputs>& s, const Index* off, Index n, Coefs k) {
  using T = Compute<S>;
  using P = Packet<T>;
  constexpr Index L = kLanes<T>;
  constexpr auto kBytes = std::uintptr_t(kPacketBytes<S>);
  // Where a line takes two packets, whole packets go two at a time from the start of a line:
  // one streamed store of the line, and half the loop's steps.
  constexpr bool kPairs = kLinePackets<S> == 2 && kAhead == 0;
  constexpr auto kLine = 2 * kBytes;
  // What the runs (and the copy) must share their misalignment modulo, to be walked together.
  constexpr auto kStoreUnit = kPairs && kStream ? kLine : kBytes;
  auto misalignment = [](const S* p, std::uintptr_t unit) {
    return reinterpret_cast<std::uintptr_t>(p) % unit;
  };
  for (int r = 1; r < K; ++r) {
    if (misalignment(s.out + off[r], kStoreUnit) != misalignment(s.out + off[0], kStoreUnit) ||
        (s.copy && misalignment(s.copy + off[r], kStoreUnit) !=
                       misalignment(s.copy + off[0], kStoreUnit))) {
      for (int j = 0; j < K; ++j) apply_runs<Op, kStream, 1, kAhead>(s, off + j, n, k);
      return;
    }
  }
  if constexpr (kAhead == 0 && Op::kInputs == 1) {
    bool trails = false;
    for (int r = 0; r < K; ++r)
      for (int q = 0; q < K; ++q)
        for (int j = 0; j < Op::kInputs; ++j) {
          const S* input = s.in[j] + off[q];
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
  const S* in[std::size_t(K)][std::size_t(Op::kInputs)];
  S* out[std::size_t(K)];
  S* copy[std::size_t(K)];
  std::uint8_t* positive[std::size_t(K)];
  for (int r = 0; r < K; ++r) {
    for (int j = 0; j < Op::kInputs; ++j) in[r][j] = s.in[j] + off[r];
    out[r] = s.out + off[r];
    copy[r] = s.copy ? s.copy + off[r] : nullptr;
    positive[r] = s.positive ? s.positive + off[r] : nullptr;
  }
  // With kAhead, ahead[a][r] holds run r's inputs of the whole packet a packets after the next
  // one to apply (ahead[0]: that one), in registers: their indices are constants.
  P ahead[std::size_t(std::max(kAhead, 1))][std::size_t(K)][std::size_t(Op::kInputs)];
  // Elements [i, i + count) of every run: W whole packets (1, or 2 from a line's start), or
  // (W = 0) the first count < L of one. Their coefficients are t packets on from k's position.
  auto packets = [&](Index i, Index t, Index count, auto packets_tag, bool stream,
                     bool stream_copy) {
    constexpr int W = decltype(packets_tag)::value;
    P kp[std::size_t(std::max(W, 1))][Op::kCoefs];
    unroll<std::max(W, 1)>([&](int w) {
      unroll<Op::kCoefs>([&](int j) { kp[w][j] = k.packet(j, t + w); });
    });
    unroll<K>([&](int r) {
      if constexpr (W == 0) {
        P v[Op::kInputs];
        unroll<Op::kInputs>([&](int j) { v[j] = load_first(in[r][j] + i, count); });
        const P y = Op::apply(v, kp[0]);
        store_first(out[r] + i, y, count);
        if (copy[r]) store_first(copy[r] + i, v[0], count);
        if (positive[r]) store_positive<T>(positive[r] + i, y, count);
      } else {
        P v[std::size_t(W)][std::size_t(Op::kInputs)], y[std::size_t(W)];
        if constexpr (kAhead > 0) {
          unroll<Op::kInputs>([&](int j) {
            v[0][j] = ahead[0][r][j];
            unroll<kAhead - 1>([&](int a) { ahead[a][r][j] = ahead[a + 1][r][j]; });
          });
          if (i + (kAhead + 1) * L <= n)  // before this packet's stores
            unroll<Op::kInputs>([&](int j) {
              ahead[kAhead - 1][r][j] = load(in[r][j] + i + kAhead * L);
            });
        } else {
          unroll<W>([&](int w) {
            unroll<Op::kInputs>([&](int j) { v[w][j] = load(in[r][j] + i + w * L); });
          });
        }
        unroll<W>([&](int w) { y[w] = Op::apply(v[w], kp[w]); });
        if constexpr (W == 2) {
          if (kStream && stream) stream_store_line(out[r] + i, y[0], y[1]);
          else unroll<W>([&](int w) { store(out[r] + i + w * L, y[w]); });
          if (kStream && stream_copy) stream_store_line(copy[r] + i, v[0][0], v[1][0]);
          else if (copy[r]) unroll<W>([&](int w) { store(copy[r] + i + w * L, v[w][0]); });
        } else {
          if (kStream && stream) stream_store(out[r] + i, y[0]);
          else store(out[r] + i, y[0]);
          if (kStream && stream_copy) stream_store(copy[r] + i, v[0][0]);
          else if (copy[r]) store(copy[r] + i, v[0][0]);
        }
        if (positive[r])
          unroll<W>([&](int w) { store_positive<T>(positive[r] + i + w * L, y[w]); });
      }
    });
  };
  using Part = std::integral_constant<int, 0>;
  using One = std::integral_constant<int, 1>;
  using Two = std::integral_constant<int, 2>;
  // The first packet is cut short where that aligns the stores that follow (and the loads, where
  // inputs and output are equally misaligned, as buffers from one allocator are): a packet
  // across two cache lines costs two accesses.
  Index i = 0;
  bool stream = false, stream_copy = false;
  const auto m = misalignment(out[0], kBytes);
  if (m % sizeof(S) == 0 && (kCutsFirstPacket<Coefs> || m == 0)) {  // else misaligned packets
    i = std::min(n, Index((kBytes - m) % kBytes / sizeof(S)));
    if (i > 0) packets(0, 0, i, Part{}, false, false);
    k.next(i);
    stream = kStream;
    stream_copy = kStream && copy[0] &&
                  misalignment(copy[0] + i, kStoreUnit) == misalignment(out[0] + i, kStoreUnit);
  }
  if constexpr (kAhead > 0)
    unroll<kAhead>([&](int a) {
      if (i + (a + 1) * L <= n)
        unroll<K>([&](int r) {
          unroll<Op::kInputs>([&](int j) { ahead[a][r][j] = load(in[r][j] + i + a * L); });
        });
    });
  // A packet alone, where a line takes two (or where kAhead walks packet by packet), has half a
  // line: stored plainly.
  const bool single_streams = stream && kLinePackets<S> == 1,
             single_streams_copy = stream_copy && kLinePackets<S> == 1;
  // Stretches of whole packets up to where the coefficients wrap around.
  while (i + L <= n) {
    const Index stretch = std::min((n - i) / L, k.span());
    assert(stretch > 0 && "a packet straddles two channels' coefficients");
    Index t = 0;
    if constexpr (kPairs) {
      if (misalignment(out[0] + i, kLine) != 0) {
        packets(i, 0, L, One{}, false, false);
        t = 1;
      }
      for (; t + 2 <= stretch; t += 2)
        packets(i + t * L, t, 2 * L, Two{}, stream, stream_copy);
    }
    for (; t < stretch; ++t)
      packets(i + t * L, t, L, One{}, single_streams, single_streams_copy);
    i += stretch * L;
    k.next(stretch * L);
  }
  if (i < n) packets(i, 0, n - i, Part{}, false, false);
}

/// ALONG: rows [o0, o1) of channels [c0, c1), in `parts` parts side by side.
/// coef[k * channels + c] is coefficient k of c.
template <class Op, bool kStream, class S>
void apply_along(const Geometry& g, const Streams<S, Op::kInputs>& s, const Compute<S>* coef,
                 Index o0, Index o1, Index c0, Index c1, int parts) {
  using T = Compute<S>;
  // A row's channels go as one run where no packet straddles two of them: runs of a multiple of
  // the packet size, and no cut first packet (apply_runs aligns its stores); or where packets
  // take their coefficients blended from two channels' (short runs). Else a run per channel.
  const bool whole_rows = g.inner % kLanes<T> == 0 &&
                          reinterpret_cast<std::uintptr_t>(s.out) % kPacketBytes<S> == 0;
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
template <class Op, bool kStream, class S, class T>
void apply_chunk(const Geometry& g, const Streams<S, Op::kInputs>& s, const T* coef, T* table,
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
template <class Op, bool kStream, class S>
void apply_all(const Plan& p, const Geometry& g, const Streams<S, Op::kInputs>& s,
               Workspace<Compute<S>>& ws, const Eigen::ThreadPoolDevice* device) {
  using T = Compute<S>;
  const T* coef = ws.coefs.data();
  int parts = p.parts;
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
    // apart_from).
    ws.row_coefs.resize(std::size_t(Op::kCoefs * RowCoefs<T>::stride_for(g.channels)) +
                        kPageBytes / sizeof(T));
    const S* streams[Op::kInputs + 2];
    for (int j = 0; j < Op::kInputs; ++j) streams[j] = s.in[j];
    streams[Op::kInputs] = s.out;
    streams[Op::kInputs + 1] = s.copy ? s.copy : s.out;
    T* table = apart_from<Op::kInputs + 2>(ws.row_coefs.data(), streams, g.channels);
    const auto k = layout_row_coefs(Op::kCoefs, g.channels, 0, g.channels, 1, coef, table);
    const Blocking& bl = p.blocking;
    using Most = std::integral_constant<int, Op::kInputs == 2 ? kTableParts : kFarParts>;
    if (parts == kFarParts && Op::kCoefs * g.channels * Index(sizeof(T)) > kL1TableBytes)
      parts = Most::value;
    if (p.split == Split::WholeBlocks) {
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
    ws.row_coefs.resize(std::size_t(slot * p.workers));
    // Split over chunks where there are enough, else over rows.
    const bool by_chunks = groups >= p.workers;
    parallel_workers(device, by_chunks ? groups : g.outer, [&](Index w, Index i0, Index i1) {
      T* table = ws.row_coefs.data() + w * slot;
      for (Index q = by_chunks ? i0 : 0; q < (by_chunks ? i1 : groups); ++q)
        apply_chunk<Op, kStream>(g, s, coef, table, q * group, std::min(g.channels, (q + 1) * group),
                                 by_chunks ? 0 : i0, by_chunks ? g.outer : i1, parts);
      if constexpr (kStream) stream_fence();
    });
  } else if (g.outer >= p.workers) {
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

/// Step 3 over the whole tensor as plan p says, with the coefficients in ws.coefs.
template <class Op, class S>
void apply_all(const Plan& p, const Streams<S, Op::kInputs>& s, Workspace<Compute<S>>& ws,
               const Eigen::ThreadPoolDevice* device) {
  const Geometry& g = p.whole;
  const Index C = g.channels, P = p.view.channels, head = p.view.outer * p.period;
  if (p.period > 1) {
    // period rows at a time as one row of P channels, with channel c % C's coefficients at c.
    ws.period_coefs.resize(std::size_t(Op::kCoefs * P));
    for (int j = 0; j < Op::kCoefs; ++j)
      for (Index c = 0; c < P; ++c)
        ws.period_coefs[std::size_t(j * P + c)] = ws.coefs[std::size_t(j * C + c % C)];
    std::swap(ws.coefs, ws.period_coefs);
  }
  if (p.stream) apply_all<Op, true>(p, p.view, s, ws, device);
  else apply_all<Op, false>(p, p.view, s, ws, device);
  if (p.period > 1) {
    std::swap(ws.coefs, ws.period_coefs);
    if (head < g.outer) {  // the rows left over, as they are
      Streams<S, Op::kInputs> rest = s;
      for (auto& in : rest.in) in += head * C;
      rest.out += head * C;
      if (rest.copy) rest.copy += head * C;
      if (rest.positive) rest.positive += head * C;
      apply_all<Op>(make_plan<S>(Geometry{g.outer - head, C, 1}, p.traffic, 1), rest, ws, nullptr);
    }
  }
}

/// Step 3 alone (inference), planned here; `views` as in Traffic.
template <class Op, class S>
void apply_all(const Geometry& g, const Streams<S, Op::kInputs>& s, Workspace<Compute<S>>& ws,
               const Eigen::ThreadPoolDevice* device, Index views = 1) {
  const Traffic traffic{0, Op::kInputs, s.copy != nullptr, views};
  apply_all<Op>(make_plan<S>(g, traffic, workers(device)), s, ws, device);
}

}  // namespace detail
BNORM_END_NAMESPACE

#include "../warnings_end.hpp"
