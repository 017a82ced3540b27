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

#include "core/driver.hpp"
