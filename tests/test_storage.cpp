// Tensors stored as Eigen::bfloat16 and Eigen::half (issue 27): the conversions of every vector
// width round to nearest even as Eigen's scalar ones do; the kernels compute in float, so a pass
// over data of 16 bits gives, bit for bit, the float pass over the same values rounded to 16 bits;
// and that is within an ulp of 16 bits of a double reference.

#include <cstring>
#include <limits>

#include "util.hpp"

namespace fn = bnorm::functional;
namespace bd = bnorm::detail;
using bnorm::Layout;
using reference::Shape;
using testing::Index;

namespace {

template <class S>
std::uint16_t bits(S v) {
  std::uint16_t b;
  std::memcpy(&b, &v, sizeof b);
  return b;
}
std::uint32_t bits(float v) {
  std::uint32_t b;
  std::memcpy(&b, &v, sizeof b);
  return b;
}

/// The same value, or both NaN.
template <class S>
bool same(S a, S b) {
  const float fa = static_cast<float>(a), fb = static_cast<float>(b);
  return (std::isnan(fa) && std::isnan(fb)) || bits(a) == bits(b);
}

/// Significant bits of S, and the spacing of its smallest values.
template <class S>
constexpr int kDigits = std::is_same_v<S, Eigen::half> ? 11 : 8;
template <class S>
double ulp_of(double v) {
  int e;
  std::frexp(v, &e);
  const double least = std::is_same_v<S, Eigen::half> ? std::ldexp(1.0, -24) : 0.0;
  return std::max(std::ldexp(1.0, e - kDigits<S>), least);
}

template <class S>
std::vector<S> narrowed(const std::vector<float>& v) {
  std::vector<S> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = S(v[i]);
  return out;
}
template <class S>
std::vector<float> widened(const std::vector<S>& v) {
  std::vector<float> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = static_cast<float>(v[i]);
  return out;
}

/// v rounded to S as a store does: Eigen's scalar conversion, except that AVX-512 BF16's
/// instruction (where the flags allow it) takes float's subnormal values as 0, as it is defined.
template <class S>
S rounded(float v) {
#if defined(EIGEN_VECTORIZE_AVX512BF16)
  if (std::is_same_v<S, Eigen::bfloat16> && std::fpclassify(v) == FP_SUBNORMAL)
    return S(std::signbit(v) ? -0.0f : 0.0f);
#endif
  return S(v);
}

/// Each value of `got` is the float value at the same place rounded to S.
template <class S>
void check_rounded(const std::vector<S>& got, const std::vector<float>& from, const char* what) {
  REQUIRE(got.size() == from.size());
  for (std::size_t i = 0; i < got.size(); ++i)
    if (!same(got[i], rounded<S>(from[i]))) {
      INFO(what << "[" << i << "]: got " << static_cast<float>(got[i]) << ", expected "
                << from[i] << " rounded, " << static_cast<float>(rounded<S>(from[i])));
      REQUIRE(false);
    }
}

/// |got - expected| <= 1 ulp of S at expected, plus what float's own rounding adds to a result
/// whose terms add up to terms[i] (a result near 0 from terms far larger).
template <class S>
void check_ulp(const std::vector<S>& got, const std::vector<double>& expected,
               const std::vector<double>& terms, const char* what) {
  double worst = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double g = static_cast<float>(got[i]), e = expected[i];
    const double allowed = ulp_of<S>(e) + 32 * std::ldexp(terms[i], -24);
    worst = std::max(worst, std::abs(g - e) / ulp_of<S>(e));
    if (!(std::abs(g - e) <= allowed)) {
      INFO(what << "[" << i << "]: got " << g << ", expected " << e << " (" << std::abs(g - e) / ulp_of<S>(e)
                << " ulp; terms " << terms[i] << ")");
      REQUIRE(false);
    }
  }
  SUCCEED(what << ": worst " << worst << " ulp");
}

std::vector<float> special_values() {
  std::vector<float> v = {0.0f, -0.0f, 1.0f, -1.0f, 65504.0f, 65520.0f, 1e5f, -1e30f,
                          std::numeric_limits<float>::infinity(),
                          -std::numeric_limits<float>::infinity(),
                          std::numeric_limits<float>::quiet_NaN(),
                          std::numeric_limits<float>::max(),
                          std::numeric_limits<float>::denorm_min(),
                          std::ldexp(1.0f, -24), std::ldexp(1.0f, -25), std::ldexp(3.0f, -26),
                          std::ldexp(1.0f, -14), 1e-40f};
  // Ties of both kinds: halfway between two values of 16 bits, with an even and an odd last bit.
  for (int k = 0; k < 8; ++k) {
    v.push_back(1.0f + std::ldexp(float(2 * k + 1), -8));   // bfloat16's halfway points
    v.push_back(1.0f + std::ldexp(float(2 * k + 1), -11));  // half's
    v.push_back(-(3.0f + std::ldexp(float(2 * k + 1), -7)));
  }
  std::normal_distribution<float> normal;
  for (int e = -30; e <= 30; e += 3)
    for (int k = 0; k < 5; ++k) v.push_back(std::ldexp(normal(testing::rng()), e));
  return v;
}

}  // namespace

TEMPLATE_TEST_CASE("storage: loads and stores of every width round as Eigen's scalar conversion",
                   "[storage]", Eigen::bfloat16, Eigen::half) {
  using S = TestType;
  using P = bd::Packet<float>;
  constexpr Index L = bd::kLanes<float>;
  std::vector<float> from = special_values();
  from.resize(std::size_t((Index(from.size()) + L - 1) / L * L), 0.5f);
  const Index n = Index(from.size());
  // Whole packets.
  std::vector<S> stored(from.size(), S(-3.0f));
  for (Index i = 0; i < n; i += L) bd::store(stored.data() + i, Eigen::internal::ploadu<P>(from.data() + i));
  check_rounded(stored, from, "store");
  std::vector<float> loaded(from.size(), -5.0f);
  for (Index i = 0; i < n; i += L) Eigen::internal::pstoreu(loaded.data() + i, bd::load(stored.data() + i));
  for (std::size_t i = 0; i < loaded.size(); ++i) {
    const float expected = static_cast<float>(stored[i]);
    REQUIRE((std::isnan(expected) ? std::isnan(loaded[i]) : bits(loaded[i]) == bits(expected)));
  }
  // Widened to packets of double (the reductions' shift and the double accumulators).
  constexpr Index W = bd::kWideLanes;
  for (Index i = 0; i + W <= n; i += W) {
    double lanes[W];
    Eigen::internal::pstoreu(lanes, bd::load_wide(stored.data() + i));
    for (Index j = 0; j < W; ++j) {
      const double expected = double(static_cast<float>(stored[std::size_t(i + j)]));
      INFO("load_wide at " << i + j);
      REQUIRE((std::isnan(expected) ? std::isnan(lanes[j]) : lanes[j] == expected));
    }
  }
  // The first m lanes: nothing past them written or read (the rest of a load holds the fill).
  for (Index m = 1; m < L; ++m) {
    std::vector<S> out(std::size_t(L), S(-2.0f));
    bd::store_first(out.data(), Eigen::internal::ploadu<P>(from.data() + m), m);
    for (Index i = 0; i < L; ++i) {
      INFO("m " << m << ", lane " << i);
      REQUIRE(same(out[std::size_t(i)], i < m ? rounded<S>(from[std::size_t(m + i)]) : S(-2.0f)));
    }
    float lanes[L];
    Eigen::internal::pstoreu(lanes, bd::load_first(stored.data() + m, m, 7.5f));
    for (Index i = 0; i < L; ++i) {
      const float expected = i < m ? static_cast<float>(stored[std::size_t(m + i)]) : 7.5f;
      INFO("m " << m << ", lane " << i);
      REQUIRE((std::isnan(expected) ? std::isnan(lanes[i]) : bits(lanes[i]) == bits(expected)));
    }
  }
}

namespace {

const Layout kFirst = Layout::ChannelsFirst, kLast = Layout::ChannelsLast;

/// Shapes that reach the kernels' paths: long runs cut into pieces, short runs read in row order
/// or swept, runs shorter than a packet, channels across (few of them seen several rows at a
/// time, many in blocks), and tails everywhere.
std::vector<Shape> storage_shapes() {
  return {{2, 3, 7, kFirst},     {5, 4, 100, kFirst},  {3, 2, 9001, kFirst}, {300, 2, 17, kFirst},
          {2, 37, 33, kFirst},   {150, 70, 15, kFirst}, {3, 5, 272, kFirst}, {7, 3, 1, kLast},
          {5, 37, 3, kLast},     {300, 1030, 1, kLast}, {2000, 3, 1, kLast}, {9, 17, 13, kLast}};
}

fn::Shape functional_shape(const Shape& sh) { return {sh.batch, sh.channels, sh.spatial, sh.layout}; }

/// What float's rounding of y grows with, per value: the float kernels' statistics are exact to
/// a few float ulps of the spread (the mean of a channel whose spread is 27 times its mean was
/// off by 5e-7 of the spread), so y's error is a few ulps of weight * (|xhat| + a few), beside
/// those of bias and of the terms that cancel to y.
std::vector<double> forward_terms(const Shape& sh, const std::vector<double>& x,
                                  const reference::Stats& st, double eps,
                                  const std::vector<double>& w, const std::vector<double>& b) {
  std::vector<double> t(x.size());
  for (Index n = 0; n < sh.batch; ++n)
    for (Index c = 0; c < sh.channels; ++c)
      for (Index s = 0; s < sh.spatial; ++s) {
        const Index i = sh.at(n, c, s);
        const double invstd = 1 / std::sqrt(st.var[c] + eps);
        const double xhat = std::abs(x[i] - st.mean[c]) * invstd;
        t[i] = std::abs(w[c]) * (xhat + 4) + std::abs(w[c] * invstd) * std::abs(x[i]) + std::abs(b[c]);
      }
  return t;
}

}  // namespace

TEMPLATE_TEST_CASE("storage: the kernels on 16-bit data give the float kernels' results rounded, "
                   "within an ulp of a double reference",
                   "[storage]", Eigen::bfloat16, Eigen::half) {
  using S = TestType;
  const double eps = 1e-5;
  for (int workers : {0, 2}) {
    testing::Pool pool(workers);
    for (const Shape& sh : storage_shapes()) {
      INFO("shape " << sh.batch << " x " << sh.channels << " x " << sh.spatial << ", layout "
                    << int(sh.layout) << ", workers " << workers);
      const fn::Shape shape = functional_shape(sh);
      const Index C = sh.channels, N = sh.size();
      const std::vector<S> x = narrowed<S>(testing::random_input<float>(sh, 4.0));
      const std::vector<float> xf = widened(x);
      const auto w = testing::random_vector<float>(C, 0.5, 2.0);
      const auto b = testing::random_vector<float>(C, -1.0, 1.0);
      fn::Execution<float> ex{pool.device.get()};

      // Training forward, with the running statistics and the batch's.
      std::vector<S> y(std::size_t(N), S(std::numeric_limits<float>::quiet_NaN()));
      std::vector<float> yf(static_cast<std::size_t>(N)), mean(C), invstd(C), meanf(C), invstdf(C);
      std::vector<float> rmean(C, 0.5f), rvar(C, 2.0f), rmeanf = rmean, rvarf = rvar;
      fn::forward_training<S>(shape, x.data(), y.data(), eps, {w.data(), b.data()},
                              {mean.data(), invstd.data()}, {rmean.data(), rvar.data(), 0.1}, ex);
      fn::forward_training<float>(shape, xf.data(), yf.data(), eps, {w.data(), b.data()},
                                  {meanf.data(), invstdf.data()},
                                  {rmeanf.data(), rvarf.data(), 0.1}, ex);
      check_rounded(y, yf, "training y");
      REQUIRE(testing::same_bits(mean, meanf));
      REQUIRE(testing::same_bits(invstd, invstdf));
      REQUIRE(testing::same_bits(rmean, rmeanf));
      REQUIRE(testing::same_bits(rvar, rvarf));
      const auto st = reference::batch_stats(sh, x);
      const auto wd = testing::widen(w), bd64 = testing::widen(b);
      check_ulp(y, reference::normalize(sh, x, st, eps, wd, bd64),
                forward_terms(sh, testing::widen(xf), st, eps, wd, bd64), "training y");

      // Add + ReLU in the same pass.
      const std::vector<S> z = narrowed<S>(testing::random_vector<float>(N, -2.0, 2.0));
      const std::vector<float> zf = widened(z);
      fn::forward_training<S>(shape, x.data(), y.data(), eps, {w.data(), b.data()}, {}, {}, ex,
                              fn::Fused<S>{z.data(), true});
      fn::forward_training<float>(shape, xf.data(), yf.data(), eps, {w.data(), b.data()}, {}, {},
                                  ex, fn::Fused<float>{zf.data(), true});
      check_rounded(y, yf, "training add + ReLU y");

      // Inference.
      std::fill(y.begin(), y.end(), S(std::numeric_limits<float>::quiet_NaN()));
      fn::forward_inference<S>(shape, x.data(), y.data(), eps, {w.data(), b.data()}, rmean.data(),
                               rvar.data(), ex);
      fn::forward_inference<float>(shape, xf.data(), yf.data(), eps, {w.data(), b.data()},
                                   rmean.data(), rvar.data(), ex);
      check_rounded(y, yf, "inference y");

      // Backward with the batch's statistics.
      const std::vector<S> dy = narrowed<S>(testing::random_vector<float>(N, -1.0, 1.0));
      const std::vector<float> dyf = widened(dy);
      std::vector<S> dx(std::size_t(N), S(std::numeric_limits<float>::quiet_NaN()));
      std::vector<float> dxf(static_cast<std::size_t>(N)), gw(C), gb(C), gwf(C), gbf(C);
      fn::backward<S>(shape, dy.data(), x.data(), dx.data(), fn::Statistics::Batch, mean.data(),
                      invstd.data(), w.data(), gw.data(), gb.data(), ex);
      fn::backward<float>(shape, dyf.data(), xf.data(), dxf.data(), fn::Statistics::Batch,
                          mean.data(), invstd.data(), w.data(), gwf.data(), gbf.data(), ex);
      check_rounded(dx, dxf, "dx");
      REQUIRE(testing::same_bits(gw, gwf));
      REQUIRE(testing::same_bits(gb, gbf));
      const auto g = reference::backward(sh, x, dy, st, eps, wd, true);
      std::vector<double> terms(static_cast<std::size_t>(N));
      const double count = double(sh.per_channel());
      for (Index n = 0; n < sh.batch; ++n)
        for (Index c = 0; c < C; ++c)
          for (Index s = 0; s < sh.spatial; ++s) {
            const Index i = sh.at(n, c, s);
            const double is = 1 / std::sqrt(st.var[c] + eps), xmu = std::abs(double(xf[i]) - st.mean[c]);
            terms[i] = wd[c] * is *
                       (std::abs(double(dyf[i])) + g.bias_terms[c] / count +
                        (xmu + std::abs(st.mean[c])) * is * g.weight_terms[c] / count);
          }
      check_ulp(dx, g.dx, terms, "dx");
    }
  }
}

TEMPLATE_TEST_CASE("storage: outputs and the copy of x are the same wherever their buffers lie "
                   "against a cache line",
                   "[storage]", float, Eigen::bfloat16, Eigen::half) {
  // Where a line takes two packets, the elementwise pass stores them together from a line's
  // start, and a packet alone plainly: buffers at every offset from a line, the output's and the
  // copy's apart, take every way in.
  using S = TestType;
  const double eps = 1e-5;
  constexpr Index kLineValues = 64 / Index(sizeof(S));
  testing::Pool pool(0);
  fn::Execution<float> ex{pool.device.get()};
  for (const Shape& sh : {Shape{3, 5, 272, kFirst}, Shape{4, 3, 1001, kFirst},
                          Shape{150, 70, 15, kFirst}, Shape{40, 48, 1, kLast},
                          Shape{9, 1030, 1, kLast}}) {
    const fn::Shape shape = functional_shape(sh);
    const Index C = sh.channels, N = sh.size();
    const std::vector<S> x = narrowed<S>(testing::random_input<float>(sh, 4.0));
    const auto w = testing::random_vector<float>(C, 0.5, 2.0);
    const auto b = testing::random_vector<float>(C, -1.0, 1.0);
    std::vector<S> y0(static_cast<std::size_t>(N));
    fn::forward_training<S>(shape, x.data(), y0.data(), eps, {w.data(), b.data()}, {}, {}, ex);
    // One buffer each, 64-byte aligned, so that an offset in values is an offset from a line.
    const S poison(std::numeric_limits<float>::quiet_NaN());
    std::vector<S> ybuf(std::size_t(N + 2 * kLineValues)), cbuf(ybuf.size());
    auto line_start = [](S* p) {
      const auto a = reinterpret_cast<std::uintptr_t>(p);
      return p + Index((64 - a % 64) % 64) / Index(sizeof(S));
    };
    for (Index yo : {Index(0), kLineValues / 2, kLineValues / 4, Index(1)}) {
      for (Index co : {Index(0), kLineValues / 2, kLineValues / 4 + 1}) {
        INFO("shape " << sh.batch << " x " << C << " x " << sh.spatial << ", layout "
                      << int(sh.layout) << ", y at " << yo << ", copy at " << co
                      << " values from a line");
        std::fill(ybuf.begin(), ybuf.end(), poison);
        std::fill(cbuf.begin(), cbuf.end(), poison);
        S* y = line_start(ybuf.data()) + yo;
        S* copy = line_start(cbuf.data()) + co;
        fn::detail::forward_training<S>(shape, x.data(), y, eps, {w.data(), b.data()}, {}, {}, ex,
                                        copy, nullptr);
        for (Index i = 0; i < N; ++i) {
          INFO("value " << i);
          REQUIRE(same(y[i], y0[std::size_t(i)]));
          REQUIRE(same(copy[i], x[std::size_t(i)]));
        }
      }
    }
  }
}
