#pragma once
// Step 3's operations: an Op maps kInputs input packets and kCoefs per-channel coefficient
// packets to one output packet.

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <vector>

#include "merge.hpp"

#include "../warnings_begin.hpp"

BNORM_BEGIN_NAMESPACE
namespace detail {

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

/// Op followed by a forward's fused epilogue: + z, a residual of x's shape (one more input,
/// after Op's), then ReLU, max(v, 0) with NaN kept (as PyTorch's relu).
template <class Op, bool kAdd, bool kRelu>
struct EpilogueOp {
  static constexpr int kInputs = Op::kInputs + (kAdd ? 1 : 0), kCoefs = Op::kCoefs;
  template <class P>
  static P apply(const P* in, const P* k) {
    P v = Op::apply(in, k);
    if constexpr (kAdd) v = ei::padd(v, in[Op::kInputs]);
    if constexpr (kRelu) v = ei::pmax<Eigen::PropagateNaN>(v, ei::pzero(v));
    return v;
  }
};

/// Runs fn with Op wrapped in the epilogue that `residual` (null: none) and `relu` ask for, and
/// the inputs it reads: x, then the residual where there is one.
template <class Op, class T, class Fn>
void with_epilogue(const T* x, const T* residual, bool relu, const Fn& fn) {
  static_assert(Op::kInputs == 1, "the epilogue follows a one-input Op");
  if (residual) {
    const T* in[] = {x, residual};
    if (relu) fn(EpilogueOp<Op, true, true>{}, in);
    else fn(EpilogueOp<Op, true, false>{}, in);
  } else {
    const T* in[] = {x};
    if (relu) fn(EpilogueOp<Op, false, true>{}, in);
    else fn(Op{}, in);
  }
}

/// The Op of a call that only reduces: finish() receives the totals and no elementwise pass
/// runs (statistics merged elsewhere before they are applied, as across processes).
struct ReduceOnly {
  static constexpr int kInputs = 1, kCoefs = 0;
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

}  // namespace detail
BNORM_END_NAMESPACE

#include "../warnings_end.hpp"
