#pragma once
// The plan: every decision of a call, made once from the shape, the thread count and the
// machine's caches, before any kernel runs.

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

#include "../../tuning.hpp"
#include "../parallel.hpp"
#include "io.hpp"
#include "problem.hpp"
#include "reduce_rows.hpp"

#include "../warnings_begin.hpp"

BNORM_BEGIN_NAMESPACE
namespace detail {

/// Tensors smaller than this are not worth handing out in pieces finer than the reduction
/// blocks: waking a thread costs about as much as the work.
inline constexpr Index kFineSplitBytes = Index{1} << 20;
inline bool fine_split(const Geometry& g, Index workers, std::size_t element_bytes) {
  return workers > 1 && g.size() * Index(element_bytes) >= kFineSplitBytes;
}

/// ACROSS: whether workers take whole blocks of rows. Otherwise (fewer blocks than workers, on
/// a tensor worth it) they share out every block's channels for the reduction and its rows for
/// the elementwise pass.
inline bool whole_blocks(const Geometry& g, const Blocking& bl, Index workers,
                         std::size_t element_bytes) {
  return bl.blocks >= workers || !fine_split(g, workers, element_bytes);
}

/// Main memory is written and read faster with two streams far apart in flight than with one
/// (not so data in cache, where more streams only cost): the elementwise passes over data too
/// large for half the usable last-level cache (other processes share it), or for
/// Tuning::far_bytes where that is set, walk two parts of their rows side by side. (Half of one
/// core's share instead made one-thread inference on 12.8 MB slower.)
inline constexpr int kFarParts = 2;
inline int apply_parts(const Geometry& g, int tensors, std::size_t element_bytes,
                       const Tuning& machine) {
  const Index far = machine.far_bytes.value_or(machine.usable_last_level_bytes() / 2);
  return g.size() * tensors * Index(element_bytes) > far ? kFarParts : 1;
}

/// Whether an elementwise pass over `tensors` tensors streams its output. One thread does so
/// from Tuning::stream_bytes on. Several threads do so only where the pass's tensors do not fit
/// in seven eighths of their share of the last-level cache (the rest holds code, tables and
/// other processes' lines): the cache's bandwidth grows with the threads, memory's much less.
/// Tuning::stream_by_size_alone makes the size alone decide, whatever the threads. Only stores
/// of whole cache lines stream (see Tuning::line_bytes): `store_bytes`, what the pass streams
/// at once (a packet, or the packets of a line, kLinePackets), must fill one.
inline bool streams_output(const Geometry& g, int tensors, std::size_t element_bytes,
                           Index store_bytes, Index workers, const Tuning& machine) {
  const Index bytes = g.size() * Index(element_bytes);
  const bool by_threads = machine.stream_by_size_alone || workers == 1 ||
                          bytes * tensors > machine.cache_share(workers) / 8 * 7;
  return store_bytes >= machine.line_bytes && bytes >= machine.stream_bytes && by_threads;
}

/// ALONG, one worker: how many channels it takes at a time, so that their inputs stay in cache
/// until the elementwise pass reads them again. Each group may take a quarter of the usable
/// last-level cache, split among the workers, and at least 512 KiB: large groups give the
/// reduction long runs of memory to read in order (a row's channels lie one after the other).
/// The whole cache, not the workers' share: a group lives from its reduction to its elementwise
/// pass, and the workers are the only ones sure to use the cache meanwhile (on one thread,
/// groups sized by one core's share made training slower). Tuning::group_bytes, where set, is
/// the room of a group.
inline Index channels_per_group(const Geometry& g, int inputs, std::size_t element_bytes,
                                Index workers, const Tuning& machine) {
  const Index bytes = g.per_channel() * inputs * Index(element_bytes);
  const Index room = machine.group_bytes.value_or(
      std::max<Index>(Index{512} << 10, machine.usable_last_level_bytes() / (4 * workers)));
  return std::max<Index>(1, room / std::max<Index>(bytes, 1));
}

/// Whether runs short enough for row order (see in_row_order) go in groups of channels too:
/// where a reduction reads two inputs (backward) and they do not fit in the usable last-level
/// cache together (as for channels_per_group, the whole cache). The elementwise pass, which reads both again for every value it
/// writes, then finds them in cache instead of memory. (Training, whose one input is read again
/// while its output streams to memory, was slower in groups.)
inline bool rows_in_groups(const Geometry& g, int inputs, std::size_t element_bytes,
                           Index cache) {
  return inputs > 1 && g.size() * inputs * Index(element_bytes) > cache;
}

/// What a call reads and writes: the inputs of its reduction (0: none, the elementwise pass
/// alone), the inputs of its elementwise pass, and whether that pass also copies its input.
struct Traffic {
  int reduce_inputs = 1;
  int apply_inputs = 1;
  bool copy = false;
  /// Views like this one that the call walks in turn (channels-last GroupNorm: a sample each).
  /// Whether outputs stream depends on all of them together: the views after a view push its
  /// output out of the cache.
  Index views = 1;
};

/// How step 1 reads a block: long ALONG runs one by one, rows swept with a table of accumulators
/// per position (ACROSS, short ALONG runs), or rows in memory order (see in_row_order).
/// None: the call has no reduction (inference), only the elementwise pass.
enum class Reduction { Runs, Sweep, Rows, None };
/// How the reduction is shared out: each worker takes whole channels and does all three steps a
/// group of them at a time; or whole blocks of rows (ACROSS); or every block's channels, a packet
/// of them at a time (ACROSS, fewer blocks than workers); or its channels of every row (row
/// order); or pieces of channels of each block (ALONG).
enum class Split { Groups, WholeBlocks, ChannelPackets, Channels, Pieces };

/// Every decision of a call, made once from the shape, the threads and the machine's caches
/// (Tuning) before any kernel runs. The kernels read it; they decide nothing themselves.
struct Plan {
  Geometry whole;         ///< the tensor, x[outer][channels][inner]
  Traffic traffic;        ///< what the call reads and writes
  Index period = 1;       ///< ACROSS rows of few channels are seen `period` at a time (period_rows)
  Geometry view;          ///< what the kernels walk: whole, or `period` rows as one
  Index workers = 1;      ///< threads of the call, the calling one included
  Index cache_bytes = 0;  ///< the last-level cache these threads can count on (Tuning::cache_share)
  Index whole_cache_bytes = 0;  ///< the usable last-level cache (Tuning::usable_last_level_bytes)
  Reduction reduction = Reduction::Sweep;
  Blocking blocking;
  Index sweep_piece = 0;  ///< channels one sweep covers
  int sweep_sets = 1;     ///< sets of accumulators of a sweep (sweep_sets)
  Split split = Split::Pieces;
  Index group_channels = 0;  ///< Split::Groups: channels a worker takes at a time
  bool merge_on_workers = false;  ///< step 2 shared out too, or on the calling thread alone
  bool stream = false;  ///< step 3 stores non-temporally
  int parts = 1;        ///< step 3 walks this many distant parts of its rows side by side
};

/// S: the type the tensors are stored in; its size is what the decisions on bytes take, its
/// compute type's packets what the decisions on lanes take.
template <class S>
Plan make_plan(const Geometry& whole, const Traffic& traffic, Index workers,
               const Tuning& machine = tuning()) {
  using T = Compute<S>;
  Plan p;
  p.whole = whole;
  p.traffic = traffic;
  p.period = period_rows<T>(whole);
  p.view = p.period > 1 ? Geometry{whole.outer / p.period, p.period * whole.channels, 1} : whole;
  const Geometry& g = p.view;
  const Index C = g.channels;
  p.workers = std::max<Index>(1, workers);
  p.cache_bytes = machine.cache_share(p.workers);
  p.whole_cache_bytes = machine.usable_last_level_bytes();
  const bool by_rows = in_row_order<T>(g);
  p.reduction = by_rows ? Reduction::Rows
                        : g.across() || g.inner < kShortRun ? Reduction::Sweep : Reduction::Runs;
  p.blocking = Blocking(g, p.reduction != Reduction::Runs);
  p.sweep_piece = g.across() ? C : std::max<Index>(1, kSweepWidth / g.inner);
  p.sweep_sets = sweep_sets<T>(std::min(C, p.sweep_piece) * g.inner);
  const bool groups =
      traffic.reduce_inputs > 0 &&
      (p.reduction == Reduction::Runs ||
       (by_rows && rows_in_groups(g, traffic.reduce_inputs, sizeof(S), p.whole_cache_bytes))) &&
      (p.workers == 1 || C >= 4 * p.workers);
  if (groups) {
    p.split = Split::Groups;
    p.group_channels =
        channels_per_group(g, traffic.reduce_inputs, sizeof(S), p.workers, machine);
  } else if (g.across()) {
    p.split = whole_blocks(g, p.blocking, p.workers, sizeof(S)) ? Split::WholeBlocks
                                                                : Split::ChannelPackets;
  } else {
    p.split = by_rows ? Split::Channels : Split::Pieces;
  }
  p.merge_on_workers = fine_split(g, p.workers, sizeof(S));
  const int tensors = traffic.apply_inputs + 1 + (traffic.copy ? 1 : 0);
  if (traffic.reduce_inputs == 0) p.reduction = Reduction::None;
  const Geometry call{whole.outer * std::max<Index>(1, traffic.views), whole.channels, whole.inner};
  p.stream = streams_output(call, tensors, sizeof(S), kLinePackets<S> * kPacketBytes<S>,
                            p.workers, machine);
  p.parts = apply_parts(g, traffic.apply_inputs + 1, sizeof(S), machine);
  return p;
}

/// The plan in words, one decision a line, for a user who wants to know what a call does.
inline std::string describe(const Plan& p) {
  static const char* const reductions[] = {"runs (one channel's run at a time)",
                                           "sweep (rows, a table of accumulators per position)",
                                           "rows (memory order, channel after channel)",
                                           "none"};
  static const char* const splits[] = {"groups of channels, all three steps per group",
                                       "whole blocks of rows", "packets of channels of every block",
                                       "channels of every row", "pieces of channels of each block"};
  auto geometry = [](const Geometry& g) {
    return std::to_string(g.outer) + " x " + std::to_string(g.channels) + " x " +
           std::to_string(g.inner) + (g.across() ? " (across channels)" : " (along runs)");
  };
  std::string s;
  s += "tensor:      " + geometry(p.whole) + "\n";
  if (p.period > 1)
    s += "view:        " + geometry(p.view) + ", " + std::to_string(p.period) + " rows as one\n";
  s += "threads:     " + std::to_string(p.workers) + ", counting on " +
       std::to_string(p.cache_bytes >> 10) + " KiB of the last-level cache's " +
       std::to_string(p.whole_cache_bytes >> 10) + " KiB\n";
  if (p.reduction == Reduction::None) s += "reduction:   none\n";
  else s += "reduction:   " + std::string(reductions[int(p.reduction)]) + ", " +
       std::to_string(p.blocking.blocks) + " blocks of " + std::to_string(p.blocking.rows) +
       " rows" + (p.blocking.pieces > 1 ? " x " + std::to_string(p.blocking.pieces) + " pieces" : "") +
       (p.reduction == Reduction::Sweep ? ", " + std::to_string(p.sweep_sets) + " accumulator set(s)"
                                        : "") + "\n";
  s += "split:       " + std::string(splits[int(p.split)]) +
       (p.split == Split::Groups ? " (" + std::to_string(p.group_channels) + " channels)" : "") +
       "\n";
  if (p.reduction != Reduction::None) s += "merge:       " + std::string(p.merge_on_workers ? "shared out" : "calling thread") + "\n";
  s += "elementwise: " + std::to_string(p.parts) + " part(s), " +
       (p.stream ? "streamed stores" : "plain stores") + "\n";
  return s;
}

}  // namespace detail
BNORM_END_NAMESPACE

#include "../warnings_end.hpp"
