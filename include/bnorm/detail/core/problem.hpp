#pragma once
// The geometry every normalization maps to, x[outer][channels][inner], and how it is cut into
// reduction blocks: a function of the shape alone, never of the thread count.

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

/// ALONG runs shorter than this (and longer ones that in_row_order takes) are handled a row of
/// channels at a time, as the rows of ACROSS data are: reduced in memory order (see in_row_order;
/// position by position, see sweep_across, where that cannot be) and applied in memory order
/// (see BlendCoefs and SelectCoefs; RowCoefs for runs shorter than a packet). A run per channel
/// would spend much of its time on its ends, and could not stream its stores.
inline constexpr Index kShortRun = 256;
/// Short ALONG runs are swept a piece of channels at a time, about this many positions wide: the
/// accumulators the sweep reads and writes with every row (three values of T per position on
/// rows this wide, see kWideRow: 12 KiB of floats) then stay in L1.
inline constexpr Index kSweepWidth = 1024;

struct Geometry {
  Index outer = 0;
  Index channels = 0;
  Index inner = 1;

  Index size() const { return outer * channels * inner; }
  Index per_channel() const { return outer * inner; }
  bool across() const { return inner == 1; }
};

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

  Blocking() = default;
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

}  // namespace detail
BNORM_END_NAMESPACE

#include "../warnings_end.hpp"
