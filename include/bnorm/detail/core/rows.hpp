#pragma once
// Row normalizations (LayerNorm, RMSNorm): each row of `width` values is normalized over itself,
// with a weight and bias per position of the row. The core's reducers sum each row, and its
// elementwise pass (apply_runs) maps it, with the row's statistics broadcast and the positions'
// parameters from a RowCoefs table; a row is read back from L1 or L2.

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "apply.hpp"
#include "reduce_runs.hpp"

#include "../warnings_begin.hpp"

BNORM_BEGIN_NAMESPACE
namespace detail {

/// x[rows][width]: LayerNorm's and RMSNorm's view of any tensor, the normalized dims flattened.
struct Rows {
  Index rows = 0;
  Index width = 0;
  Index size() const { return rows * width; }
};

/// What a row normalization centers on: its mean (LayerNorm), or zero (RMSNorm, whose mean
/// square is the second moment: M2 / n + mean^2, from the same centered moments).
enum class RowCenter { Mean, Zero };

/// Moments of a row, a block of kAlongElems values at a time (each block's sums stay within a
/// few ulps in T, see step_sums_along), merged in order.
template <class T>
Partial row_moments(const T* x, Index width) {
  Partial m;
  for (Index i = 0; i < width; i += Blocking::kAlongElems)
    m = merge_moments(m, moments_along(x + i, 0, 1, std::min(Blocking::kAlongElems, width - i)));
  return m;
}

/// Backward's one read of a row's dy and x before dx: the row's sums against the positions'
/// weights, a = sum(w * dy) and b = sum(w * dy * xhat), and with kColumns, dy * xhat and dy
/// added to the columns' accumulators acc[0, W) and acc[W, 2W); xhat = (x - hi) * scale + shift
/// in T. The row's sums stay in T over blocks of kTermsInT values per lane, in double across
/// them; a block whose sums overflow T is summed again in double.
template <bool kColumns, class T>
void row_backward_sums(const T* dy, const T* x, const T* w, Index W, T hi, T scale, T shift,
                       T* acc, double& a, double& b) {
  using P = Packet<T>;
  constexpr Index L = kLanes<T>, kBlock = kTermsInT * 2 * L;
  const P hi_p = ei::pset1<P>(hi), scale_p = ei::pset1<P>(scale), shift_p = ei::pset1<P>(shift);
  auto xhat_of = [&](T v) { return T((v - hi) * scale + shift); };
  a = b = 0;
  for (Index i0 = 0; i0 < W; i0 += kBlock) {
    const Index i1 = std::min(W, i0 + kBlock);
    P sa[2], sb[2];
    sa[0] = sa[1] = sb[0] = sb[1] = ei::pset1<P>(T(0));
    auto step = [&](Index d, int u) {
      const P g = ei::ploadu<P>(dy + d), xhat = ei::pmadd(ei::psub(ei::ploadu<P>(x + d), hi_p),
                                                           scale_p, shift_p);
      if constexpr (kColumns) {
        ei::pstoreu(acc + d, ei::pmadd(g, xhat, ei::ploadu<P>(acc + d)));
        ei::pstoreu(acc + W + d, ei::padd(g, ei::ploadu<P>(acc + W + d)));
      }
      const P gw = ei::pmul(g, ei::ploadu<P>(w + d));
      sa[u] = ei::padd(sa[u], gw);
      sb[u] = ei::pmadd(gw, xhat, sb[u]);
    };
    Index d = i0;
    for (; d + 2 * L <= i1; d += 2 * L) {
      step(d, 0);
      step(d + L, 1);
    }
    if (d + L <= i1) {
      step(d, 0);
      d += L;
    }
    T ta = 0, tb = 0;
    for (; d < i1; ++d) {  // the tail, value by value: acc has no room past W
      const T xhat = xhat_of(x[d]);
      if constexpr (kColumns) {
        acc[d] += dy[d] * xhat;
        acc[W + d] += dy[d];
      }
      ta += dy[d] * w[d];
      tb += dy[d] * w[d] * xhat;
    }
    const T block_a = ei::predux(ei::padd(sa[0], sa[1])) + ta;
    const T block_b = ei::predux(ei::padd(sb[0], sb[1])) + tb;
    if (std::isfinite(block_a) && std::isfinite(block_b)) {
      a += double(block_a);
      b += double(block_b);
    } else {
      for (Index j = i0; j < i1; ++j) {
        const double gw = double(dy[j]) * double(w[j]);
        a += gw;
        b += gw * double(xhat_of(x[j]));
      }
    }
  }
}

/// y = ((x - k0) * k1 + k2) * k3 + k4: k0..k2 the row's (NormalizeOp's, see there), k3 and k4
/// the position's weight and bias.
struct RowNormalizeOp {
  static constexpr int kInputs = 1, kCoefs = 5, kRowCoefs = 3;
  template <class P>
  static P apply(const P* in, const P* k) {
    return ei::pmadd(ei::pmadd(ei::psub(in[0], k[0]), k[1], k[2]), k[3], k[4]);
  }
};

/// dx = dy * k4 * k0 + (x - k1) * k2 + k3: k0..k3 the row's (InputGradOp's), k4 the position's
/// weight. Inputs: {dy, x}.
struct RowInputGradOp {
  static constexpr int kInputs = 2, kCoefs = 5, kRowCoefs = 4;
  template <class P>
  static P apply(const P* in, const P* k) {
    return ei::pmadd(ei::pmul(in[0], k[4]), k[0], ei::pmadd(ei::psub(in[1], k[1]), k[2], k[3]));
  }
};

/// Coefficients of one row: Op::kRowCoefs broadcast values, then the positions' from a table.
template <class T, class Op>
struct RowScalarCoefs {
  Packet<T> row[std::size_t(Op::kRowCoefs)];
  RowCoefs<T> positions;

  RowScalarCoefs(const double* values, RowCoefs<T> positions_) : positions(positions_) {
    for (int j = 0; j < Op::kRowCoefs; ++j) row[j] = ei::pset1<Packet<T>>(T(values[j]));
  }
  Packet<T> packet(int j, Index t) const {
    return j < Op::kRowCoefs ? row[j] : positions.packet(j - Op::kRowCoefs, t);
  }
  Index span() const { return positions.span(); }
  void next(Index n) { positions.next(n); }
};

/// The positions' parameters laid out for RowCoefs: `count` rows of `width` values (weight,
/// then bias), each null one as 1 (weight) or 0 (bias).
template <class T>
RowCoefs<T> row_parameters(Index width, const T* const* params, int count, Workspace<T>& ws) {
  ws.coefs.resize(std::size_t(count * width));
  for (int j = 0; j < count; ++j) {
    T* to = ws.coefs.data() + j * width;
    if (params[j]) std::copy(params[j], params[j] + width, to);
    else std::fill(to, to + width, T(j == 0 ? 1 : 0));
  }
  ws.row_coefs.resize(std::size_t(count * RowCoefs<T>::stride_for(width)));
  return layout_row_coefs(count, width, 0, width, 1, ws.coefs.data(), ws.row_coefs.data());
}

/// Whether the row passes stream their outputs, as the plan decides for the same traffic.
template <class T>
bool rows_stream(const Rows& r, int tensors, Index workers) {
  return streams_output(Geometry{r.rows, 1, r.width}, tensors, sizeof(T), kPacketBytes<T>,
                        workers, tuning());
}

/// The rows' statistics as a forward computes them: the mean (0 for RowCenter::Zero) in
/// double and 1 / sqrt(variance + eps) (or mean square + eps).
template <RowCenter kCenter>
inline void row_statistics(const Partial& m, Index width, double eps, double& mean,
                           double& invstd) {
  const double var = m.b / double(width);
  if constexpr (kCenter == RowCenter::Mean) {
    mean = m.mean();
    invstd = 1.0 / std::sqrt(var + eps);
  } else {
    const double mu = m.mean();
    mean = 0;
    invstd = 1.0 / std::sqrt(var + mu * mu + eps);
  }
}

/// Forward over every row: y = (x - mean) * invstd * weight + bias (RowCenter::Zero: x * invstd
/// * weight). mean (double) and invstd receive each row's, where not null; copy, where not
/// null, a copy of x.
template <RowCenter kCenter, class T>
void rows_forward(const Rows& r, const T* x, T* y, T* copy, double eps, const T* weight,
                  const T* bias, double* mean_out, T* invstd_out, Workspace<T>& ws,
                  const Eigen::ThreadPoolDevice* device) {
  if (r.size() == 0) return;
  const T* params[] = {weight, bias};
  const RowCoefs<T> table = row_parameters<T>(r.width, params, 2, ws);
  const Streams<T, 1> s{{x}, y, copy};
  auto run = [&](auto streaming) {
    constexpr bool kStream = decltype(streaming)::value;
    parallel_ranges(device, r.rows, [&](Index r0, Index r1) {
      for (Index row = r0; row < r1; ++row) {
        const Index off = row * r.width;
        const Partial m = row_moments(x + off, r.width);
        double mean, invstd;
        row_statistics<kCenter>(m, r.width, eps, mean, invstd);
        const auto split = split_mean<T>(kCenter == RowCenter::Mean ? m : Partial{});
        const double k[] = {double(split.high), invstd, -split.low * invstd};
        if (mean_out) mean_out[row] = mean;
        if (invstd_out) invstd_out[row] = T(invstd);
        apply_runs<RowNormalizeOp, kStream, 1>(s, &off, r.width,
                                               RowScalarCoefs<T, RowNormalizeOp>(k, table));
      }
      if constexpr (kStream) stream_fence();
    });
  };
  if (rows_stream<T>(r, copy ? 3 : 2, workers(device))) run(std::true_type{});
  else run(std::false_type{});
}

/// Rows of a backward whose weight and bias gradients are summed in T before they are added to
/// the block's sums in double: few enough terms per value for T's precision (see kTermsInT).
inline constexpr Index kColumnRows = 32;
/// Backward cuts the rows into at most kRowBlocks blocks of at least kRowsPerBlock rows (where
/// there are that many), fixed by the shape alone, whose weight and bias gradients are summed
/// separately and merged in block order: the same result for any number of workers, up to
/// kRowBlocks of them. Blocks of a few rows would spend their time merging.
inline constexpr Index kRowBlocks = 64;
inline constexpr Index kRowsPerBlock = 8;

/// Backward over every row, given the forward's statistics (mean in double, 0 for
/// RowCenter::Zero, and invstd): dx, and grad_weight / grad_bias (OVERWRITTEN, each may be
/// null) summed over the rows. dx may alias dy.
template <RowCenter kCenter, class T>
void rows_backward(const Rows& r, const T* dy, const T* x, T* dx, const double* mean,
                   const T* invstd, const T* weight, T* grad_weight, T* grad_bias,
                   Workspace<T>& ws, const Eigen::ThreadPoolDevice* device) {
  const Index W = r.width;
  const bool columns = grad_weight || grad_bias;
  if (r.size() == 0) {
    for (Index d = 0; d < W; ++d) {
      if (grad_weight) grad_weight[d] = T(0);
      if (grad_bias) grad_bias[d] = T(0);
    }
    return;
  }
  const T* params[] = {weight};
  const RowCoefs<T> table = row_parameters<T>(W, params, 1, ws);
  const T* w = table.ext;
  const Index blocks = std::clamp<Index>(r.rows / kRowsPerBlock, 1, kRowBlocks);
  const Index slot = worker_slot<T>(2 * W);
  if (columns) {
    // Each block's sums, then their total (written, not accumulated: nothing to clear).
    ws.sweep_sums.resize(std::size_t((blocks + 1) * 2 * W));
    ws.sweeps.resize(std::size_t(slot * workers(device)));
  }
  const Streams<T, 2> s{{dy, x}, dx};
  auto run = [&](auto streaming) {
    constexpr bool kStream = decltype(streaming)::value;
    parallel_workers(device, blocks, [&](Index worker, Index b0, Index b1) {
      T* acc = columns ? ws.sweeps.data() + worker * slot : nullptr;  // [dw | db] in T
      bool first_flush = true;  // of the block: sets its sums
      auto flush = [&](double* sums) {
        if (first_flush)
          for (Index d = 0; d < 2 * W; ++d) sums[d] = double(acc[d]);
        else
          for (Index d = 0; d < 2 * W; ++d) sums[d] += double(acc[d]);
        first_flush = false;
        std::fill(acc, acc + 2 * W, T(0));
      };
      for (Index b = b0; b < b1; ++b) {
        const Index first = r.rows * b / blocks, last = r.rows * (b + 1) / blocks;
        double* sums = columns ? ws.sweep_sums.data() + b * 2 * W : nullptr;
        first_flush = true;
        if (columns) std::fill(acc, acc + 2 * W, T(0));
        for (Index row = first; row < last; ++row) {
          const Index off = row * W;
          const double center = kCenter == RowCenter::Mean ? mean[row] : 0.0;
          const double is = double(invstd[row]), m = double(W);
          const auto split = split_mean<T>(Partial{1, 0, 0, center});
          // The sums before dx is written (it may be dy).
          double ga, gb;
          const T hi = split.high, scale = T(is), shift = T(-split.low * is);
          if (columns) {
            row_backward_sums<true>(dy + off, x + off, w, W, hi, scale, shift, acc, ga, gb);
            if ((row - first + 1) % kColumnRows == 0) flush(sums);
          } else {
            row_backward_sums<false>(dy + off, x + off, w, W, hi, scale, shift, acc, ga, gb);
          }
          const double slope = -is * is * gb / m;
          const double k[] = {is, double(split.high), slope,
                              (kCenter == RowCenter::Mean ? -is * ga / m : 0.0) -
                                  split.low * slope};
          apply_runs<RowInputGradOp, kStream, 1>(s, &off, W,
                                                 RowScalarCoefs<T, RowInputGradOp>(k, table));
        }
        if (columns) flush(sums);
      }
      if constexpr (kStream) stream_fence();
    });
  };
  if (rows_stream<T>(r, 3, workers(device))) run(std::true_type{});
  else run(std::false_type{});
  if (!columns) return;
  // The blocks' sums in block order, a block's row at a time (in memory order).
  double* total = ws.sweep_sums.data() + blocks * 2 * W;
  std::copy(ws.sweep_sums.data(), ws.sweep_sums.data() + 2 * W, total);
  for (Index b = 1; b < blocks; ++b) {
    const double* part = ws.sweep_sums.data() + b * 2 * W;
    for (Index d = 0; d < 2 * W; ++d) total[d] += part[d];
  }
  for (Index d = 0; d < W; ++d) {
    if (grad_weight) grad_weight[d] = T(total[d]);
    if (grad_bias) grad_bias[d] = T(total[W + d]);
  }
}

}  // namespace detail
BNORM_END_NAMESPACE

#include "../warnings_end.hpp"
