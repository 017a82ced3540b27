// libFuzzer target: the functional kernels on shapes, layouts, options and values drawn from the
// input (NaN, Inf, huge, subnormal and ordinary values), checked against the double reference on
// every channel whose values are finite and of ordinary size, and checked to be bit-identical on
// one and on two threads. Other channels must not crash anything or leak into their neighbours.
//
//   clang++ -fsanitize=fuzzer,address,undefined ... ; ./bnorm_fuzz -max_total_time=60 corpus/

#include <bnorm/bnorm.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "fuzz_input.hpp"
#include "../reference.hpp"

namespace {

namespace fn = bnorm::functional;
using Index = std::ptrdiff_t;

using fuzz::Bytes;
using fuzz::fail;
using fuzz::two_threads;

template <class T>
void check(Bytes in) {
  const Index batch = 1 + in.next() % 6, channels = 1 + in.next() % 20;
  const Index spatial = 1 + in.next() % 40;
  const std::uint8_t flags = in.next();
  const bnorm::Layout layout = flags & 1 ? bnorm::Layout::ChannelsLast : bnorm::Layout::ChannelsFirst;
  const bool affine = flags & 2;
  const double eps = flags & 4 ? 1e-5 : 1e-3;
  const reference::Shape sh{batch, channels, spatial, layout};
  const fn::Shape shape{batch, channels, spatial, layout};

  std::vector<double> base(static_cast<std::size_t>(channels));
  for (auto& b : base) b = (int(in.next()) - 128) * 4.0;
  std::vector<T> x(std::size_t(sh.size())), dy(x.size());
  for (Index n = 0; n < batch; ++n)
    for (Index c = 0; c < channels; ++c)
      for (Index s = 0; s < spatial; ++s) {
        x[sh.at(n, c, s)] = fuzz::draw_value<T>(in, base[std::size_t(c)], 16);
        dy[sh.at(n, c, s)] = T((int(in.next()) - 128) / 64.0);
      }
  std::vector<T> w(static_cast<std::size_t>(channels)), b(w.size());
  for (Index c = 0; c < channels; ++c) {
    w[std::size_t(c)] = T(0.5 + in.next() / 128.0);
    b[std::size_t(c)] = T((int(in.next()) - 128) / 32.0);
  }
  const fn::Affine<T> aff{affine ? w.data() : nullptr, affine ? b.data() : nullptr};

  // Channels the reference can judge: finite values of ordinary size.
  std::vector<bool> judged(static_cast<std::size_t>(channels), true);
  for (Index n = 0; n < batch; ++n)
    for (Index c = 0; c < channels; ++c)
      for (Index s = 0; s < spatial; ++s) {
        const double v = double(x[sh.at(n, c, s)]);
        if (!std::isfinite(v) || std::abs(v) > 1e6) judged[std::size_t(c)] = false;
      }
  const double tol = std::is_same_v<T, float> ? 1e-4 : 1e-9;
  const auto st = reference::batch_stats(sh, x);

  if (sh.per_channel() >= 2) {
    std::vector<T> y1(x.size()), y2(x.size()), mean(w.size()), invstd(w.size()), m2(w.size()),
        i2(w.size());
    fn::forward_training<T>(shape, x.data(), y1.data(), eps, aff, {mean.data(), invstd.data()});
    fn::forward_training<T>(shape, x.data(), y2.data(), eps, aff, {m2.data(), i2.data()}, {},
                            {&two_threads()});
    if (std::memcmp(y1.data(), y2.data(), y1.size() * sizeof(T)) != 0)
      fail("forward differs between 1 and 2 threads", 0, 0, 0);
    const auto ref = reference::normalize(sh, x, st, eps, affine ? std::vector<double>(w.begin(), w.end()) : std::vector<double>{},
                                          affine ? std::vector<double>(b.begin(), b.end()) : std::vector<double>{});
    for (Index n = 0; n < batch; ++n)
      for (Index c = 0; c < channels; ++c)
        for (Index s = 0; s < spatial; ++s) {
          const Index i = sh.at(n, c, s);
          if (judged[std::size_t(c)] && !(std::abs(double(y1[i]) - ref[i]) <= tol * (1 + std::abs(ref[i]))))
            fail("forward_training", i, double(y1[i]), ref[i]);
        }

    std::vector<T> dx1(x.size()), dx2(x.size()), gw(w.size()), gb(w.size()), gw2(w.size()), gb2(w.size());
    fn::backward<T>(shape, dy.data(), x.data(), dx1.data(), fn::Statistics::Batch, mean.data(),
                    invstd.data(), aff.weight, gw.data(), gb.data());
    fn::backward<T>(shape, dy.data(), x.data(), dx2.data(), fn::Statistics::Batch, mean.data(),
                    invstd.data(), aff.weight, gw2.data(), gb2.data(), {&two_threads()});
    if (std::memcmp(dx1.data(), dx2.data(), dx1.size() * sizeof(T)) != 0 ||
        std::memcmp(gw.data(), gw2.data(), gw.size() * sizeof(T)) != 0)
      fail("backward differs between 1 and 2 threads", 0, 0, 0);
  }
  std::vector<T> rm(w.size()), rv(w.size()), y(x.size());
  for (Index c = 0; c < channels; ++c) {
    rm[std::size_t(c)] = T(base[std::size_t(c)]);
    rv[std::size_t(c)] = T(1 + c);
  }
  fn::forward_inference<T>(shape, x.data(), y.data(), eps, aff, rm.data(), rv.data());
  const reference::Stats running{std::vector<double>(rm.begin(), rm.end()), std::vector<double>(rv.begin(), rv.end())};
  const auto ref = reference::normalize(sh, x, running, eps, affine ? std::vector<double>(w.begin(), w.end()) : std::vector<double>{},
                                        affine ? std::vector<double>(b.begin(), b.end()) : std::vector<double>{});
  for (Index i = 0; i < sh.size(); ++i) {
    // Inference folds mean and bias into one shift: x * scale + shift cancels, so the error
    // scales with |x| (scale <= 2.5 here) rather than with |y|.
    const bool ok = std::abs(double(y[i]) - ref[i]) <= tol * (1 + std::abs(ref[i]) + 3 * std::abs(double(x[i])));
    const Index c = layout == bnorm::Layout::ChannelsFirst ? (i / spatial) % channels : i % channels;
    if (judged[std::size_t(c)] && !ok) fail("forward_inference", i, double(y[i]), ref[i]);
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
