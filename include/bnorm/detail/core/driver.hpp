#pragma once
// The three steps together: reduce, merge and finish, apply, for one normalization call.

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <vector>

#include "apply.hpp"
#include "reduce_rows.hpp"

#include "../warnings_begin.hpp"

BNORM_BEGIN_NAMESPACE
namespace detail {

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
/// and `finish(c, n, total, coef)`, which turns the totals of channels [c, c + n) into their
/// coefficients. Statistics may span `granule` channels in a row (GroupNorm's groups): c and n
/// are then multiples of it, and n is at most kFinishBatch rounded down to a multiple of it (or
/// one granule). `views`: how many calls like this one the caller makes in turn (Traffic::views).
///
/// Runs step 1 over every block, step 2 per channel, and step 3 with Op. ALONG with runs too
/// long for in_row_order, where there are enough channels for every worker, each worker takes
/// whole channels and does all three steps on a group of them at a time, so the elementwise pass
/// reads the group back from cache. Otherwise the steps run one after the other, each split over
/// all workers: shorter runs are read a whole row at a time, which groups would cut into short
/// pieces, slower where the elementwise pass waits on its stores, not on its loads. Either way, every block is reduced by the same code and merged in the same order:
/// the results do not depend on the split.
template <class Op, class Step, class S, class Merge, class Finish>
void reduce_then_apply(const Geometry& whole, const S* const* reduce_in, const double* centers,
                       Merge merge, Finish finish, const Streams<S, Op::kInputs>& s,
                       Workspace<Compute<S>>& ws, const Eigen::ThreadPoolDevice* device,
                       Index granule = 1, Index views = 1) {
  using T = Compute<S>;  // S: how the tensors are stored
  constexpr bool kMoments = std::is_void_v<Step>;
  constexpr bool kApplies = !std::is_same_v<Op, ReduceOnly>;
  constexpr int kReduceInputs = [] {
    if constexpr (kMoments) return 1;
    else return Step::kInputs;
  }();
  const Plan plan = make_plan<S>(
      whole, Traffic{kReduceInputs, kApplies ? Op::kInputs : 0, s.copy != nullptr, views},
      workers(device));
  // ACROSS rows of few channels are reduced q at a time, as rows of q * C channels (see
  // period_rows): g is that view, whose channel p is channel p % C of `whole`, and whose sums are
  // folded into the whole's channels before they are finished.
  const Index q = plan.period, head = whole.outer / q * q;
  const Geometry& g = plan.view;
  if (q > 1 && centers) {
    ws.period_centers.resize(std::size_t(g.channels));
    for (Index p = 0; p < g.channels; ++p)
      ws.period_centers[std::size_t(p)] = centers[p % whole.channels];
    centers = ws.period_centers.data();
  }
  const Index C = g.channels;
  const bool by_rows = plan.reduction == Reduction::Rows;
  const bool swept = plan.reduction != Reduction::Runs;  // a row of channels at a time
  const Blocking& bl = plan.blocking;
  // Channels a sweep covers: all of them ACROSS, a piece as wide as kSweepWidth ALONG. A worker
  // may sweep fewer, but every sweep takes its accumulator sets from this width (sweep_sets).
  const Index sweep_piece = plan.sweep_piece;
  const Index swept_width = std::min(C, sweep_piece) * g.inner;
  ws.coefs.resize(std::size_t(Op::kCoefs * C));
  T* coef = ws.coefs.data();
  // Block b's of channel c at part[b * C + c]; with q > 1, then the rows left over and the
  // whole's totals, per channel of the whole.
  ws.partials.resize(std::size_t(C * bl.blocks + (q > 1 ? 2 * whole.channels : 0)));
  Partial* part = ws.partials.data();

  assert(granule >= 1 && whole.channels % granule == 0);
  const Index batch = std::max(granule, kFinishBatch / granule * granule);
  // Step 2 for channels [c0, c1): blocks merged into block 0's partials, in block order.
  auto merge_and_finish = [&](Index c0, Index c1) {
    for (Index first = c0; first < c1; first += batch) {
      const Index n = std::min(batch, c1 - first);
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
        const S* in[Step::kInputs];
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
    const S* in[std::size_t(kReduceInputs)];
    for (int k = 0; k < kReduceInputs; ++k)
      in[k] = reduce_in[k] + b * bl.rows * pitch + c0 * g.inner;
    if (by_rows) {
      if constexpr (kMoments)
        moments_in_rows(in[0], pitch, c1 - c0, g.inner, rows, scratch, out);
      else
        step_sums_in_rows<Step>(in, pitch, c1 - c0, g.inner, rows, centers + c0, scratch, out);
    } else {
      const int sets = plan.sweep_sets;
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

  if (plan.split == Split::Groups) {
    // Each worker takes whole channels, a group at a time, and does all three steps on a group,
    // whose data the elementwise pass then reads back from cache.
    const int parts = plan.parts;
    const Index group = (plan.group_channels + granule - 1) / granule * granule;
    const auto scratch = scratch_room(by_rows ? row_values_size<T>(group) : 0,
                                      by_rows ? row_sums_size<T>(group) : 0);
    auto run = [&](auto streaming) {
      constexpr bool kStream = decltype(streaming)::value;
      parallel_workers(device, C / granule, [&](Index worker, Index u0, Index u1) {
        const Index c0 = u0 * granule, c1 = u1 * granule;
        // A group is reduced whole, then applied (interleaving the next group's reduction with
        // this one's pass was slower). The reduction walks a group's blocks row by row and, within a row,
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
          if constexpr (kApplies) apply_along<Op, kStream>(g, s, coef, 0, g.outer, gc0, gc1, parts);
        }
        if constexpr (kStream) stream_fence();
      });
    };
    if (plan.stream) run(std::true_type{});
    else run(std::false_type{});
    return;
  }

  if (g.across()) {
    // Workers take whole blocks, or share out the channels of every block in whole packets (a
    // channel's sums do not depend on which channels are swept with it).
    constexpr Index L = kLanes<T>;
    const bool by_blocks = plan.split == Split::WholeBlocks;
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
      const S* in[std::size_t(kReduceInputs)];
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
    for (Index first = 0; first < wc; first += batch)
      finish(first, std::min(batch, wc - first), total + first, coef);
    if constexpr (kApplies) apply_all<Op>(plan, s, ws, device);
    return;
  }
  // Channels are merged side by side, so that their chains of merges overlap. On a small
  // tensor, the calling thread merges alone: waking a worker costs more than the merges.
  const Eigen::ThreadPoolDevice* merging = plan.merge_on_workers ? device : nullptr;
  parallel_ranges(merging, C / granule,
                  [&](Index u0, Index u1) { merge_and_finish(u0 * granule, u1 * granule); });
  if constexpr (kApplies) apply_all<Op>(plan, s, ws, device);
}

}  // namespace detail
BNORM_END_NAMESPACE

#include "../warnings_end.hpp"
