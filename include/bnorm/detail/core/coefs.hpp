#pragma once
// How an elementwise pass finds each packet's per-channel coefficients, for every geometry.

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <vector>

#include "io.hpp"

#include "../warnings_begin.hpp"

BNORM_BEGIN_NAMESPACE
namespace detail {

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
/// once per channel; on longer runs, the selects on every packet cost more. GroupCoefs, faster still, takes
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
/// instruction, this is the fastest of the three on runs of fewer than kGroupPackets packets,
/// and faster than RowCoefs' tables on runs shorter than a packet.
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

}  // namespace detail
BNORM_END_NAMESPACE

#include "../warnings_end.hpp"
