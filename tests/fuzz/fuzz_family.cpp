// libFuzzer target: GroupNorm (and InstanceNorm, its case of one channel per group), LayerNorm
// and RMSNorm through the functional layer, on shapes, groups, layouts and values drawn from the
// input (NaN, Inf, huge, subnormal and ordinary values). Each statistics group whose values are
// finite and of ordinary size is checked against the double reference; every result must be
// bit-identical on one and on two threads, and nothing may crash.

#include <bnorm/bnorm.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "fuzz_input.hpp"
#include "../reference_family.hpp"

namespace {

namespace fn = bnorm::functional;
using Index = std::ptrdiff_t;

using fuzz::Bytes;
using fuzz::fail;
using fuzz::two_threads;

template <class T>
void same_bits(const std::vector<T>& a, const std::vector<T>& b, const char* what) {
  if (std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) != 0) fail(what, 0, 0, 0);
}

template <class T>
void check(Bytes in) {
  const int kind = in.next() % 3;  // GroupNorm, LayerNorm, RMSNorm
  const Index batch = 1 + in.next() % 5, channels = 1 + in.next() % 12;
  const Index spatial = 1 + in.next() % 40;
  const std::uint8_t flags = in.next();
  const bnorm::Layout layout = flags & 1 ? bnorm::Layout::ChannelsLast : bnorm::Layout::ChannelsFirst;
  const bool affine = flags & 2;
  const double eps = flags & 4 ? 1e-5 : 1e-3;
  Index groups = 1 + in.next() % channels;
  while (channels % groups != 0) --groups;
  // LayerNorm and RMSNorm: rows of channels * spatial values.
  const reference::Shape sh{batch, channels, spatial,
                            kind == 0 ? layout : bnorm::Layout::ChannelsFirst};
  std::vector<double> base(static_cast<std::size_t>(batch));
  for (auto& b : base) b = (int(in.next()) - 128) * 4.0;
  std::vector<T> x(std::size_t(sh.size())), dy(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    x[i] = fuzz::draw_value<T>(in, base[i / std::size_t(channels * spatial)], 24);
    dy[i] = T((int(in.next()) - 128) / 64.0);
  }
  const Index params = kind == 0 ? channels : channels * spatial;
  std::vector<T> w(static_cast<std::size_t>(params)), b(w.size());
  for (std::size_t j = 0; j < w.size(); ++j) {
    w[j] = T(0.5 + in.next() / 128.0);
    b[j] = T((int(in.next()) - 128) / 32.0);
  }
  const T* weight = affine ? w.data() : nullptr;
  const T* bias = affine && kind != 2 ? b.data() : nullptr;  // RMSNorm has none
  const Index stats = kind == 0 ? batch * groups : batch;
  const fn::Shape shape{batch, channels, spatial, sh.layout};
  const Index width = channels * spatial;

  std::vector<T> y[2], mean[2], invstd[2], dx[2], gw[2], gb[2];
  for (int run = 0; run < 2; ++run) {
    const fn::Execution<T> ex{run ? &two_threads() : nullptr, nullptr};
    y[run].resize(x.size());
    dx[run].resize(x.size());
    mean[run].resize(std::size_t(stats));
    invstd[run].resize(std::size_t(stats));
    gw[run].resize(w.size());
    gb[run].resize(w.size());
    if (kind == 0) {
      fn::group_norm_forward<T>(shape, groups, x.data(), y[run].data(), eps, {weight, bias},
                                {mean[run].data(), invstd[run].data()}, ex);
      fn::group_norm_backward<T>(shape, groups, dy.data(), x.data(), dx[run].data(),
                                 mean[run].data(), invstd[run].data(), weight, gw[run].data(),
                                 gb[run].data(), ex);
    } else if (kind == 1) {
      fn::layer_norm_forward<T>(batch, width, x.data(), y[run].data(), eps, {weight, bias},
                                {mean[run].data(), invstd[run].data()}, ex);
      fn::layer_norm_backward<T>(batch, width, dy.data(), x.data(), dx[run].data(),
                                 mean[run].data(), invstd[run].data(), weight, gw[run].data(),
                                 gb[run].data(), ex);
    } else {
      fn::rms_norm_forward<T>(batch, width, x.data(), y[run].data(), eps, weight,
                              invstd[run].data(), ex);
      fn::rms_norm_backward<T>(batch, width, dy.data(), x.data(), dx[run].data(),
                               invstd[run].data(), weight, gw[run].data(), ex);
    }
  }
  same_bits(y[0], y[1], "y differs between 1 and 2 threads");
  same_bits(invstd[0], invstd[1], "invstd differs between 1 and 2 threads");
  same_bits(dx[0], dx[1], "dx differs between 1 and 2 threads");
  same_bits(gw[0], gw[1], "grad_weight differs between 1 and 2 threads");

  const auto members = kind == 0 ? reference::group_members(sh, groups)
                                 : reference::row_members(batch, width);
  const auto param = kind == 0 ? reference::channel_of(sh) : reference::position_of(batch, width);
  const std::vector<double> wd = affine ? std::vector<double>(w.begin(), w.end()) : std::vector<double>{};
  const std::vector<double> bd = bias ? std::vector<double>(b.begin(), b.end()) : std::vector<double>{};
  const auto ref = reference::normalize_groups(members, x, eps, kind == 2, param, wd, bd);
  const double tol = std::is_same_v<T, float> ? 1e-4 : 1e-9;
  for (std::size_t j = 0; j < members.size(); ++j) {
    bool judged = true;
    for (Index i : members[j]) {
      const double v = double(x[std::size_t(i)]);
      judged = judged && std::isfinite(v) && std::abs(v) < 1e6;
    }
    if (!judged) continue;
    for (Index i : members[j]) {
      const double got = double(y[0][std::size_t(i)]), want = ref.y[std::size_t(i)];
      if (!(std::abs(got - want) <= tol * (1 + std::abs(want)))) fail("forward", i, got, want);
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 2) return 0;
  Bytes in{data + 1, size - 1};
  if (data[0] & 1) check<double>(in);
  else check<float>(in);
  return 0;
}
