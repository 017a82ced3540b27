// The normalization family's kernels (GroupNorm, InstanceNorm, LayerNorm, RMSNorm), at every
// vector width: the functional layer against the plain double reference on odd shapes of every
// plan, finite differences through the modules, data whose mean dwarfs its spread, and
// bit-identical results for any thread count. The modules' errors, conventions and PyTorch
// fixtures are in test_family_modules.cpp.

#include "reference_family.hpp"
#include "util.hpp"

namespace fn = bnorm::functional;
using bnorm::Layout;
using reference::Shape;
using testing::Index;

namespace {

template <class T>
std::vector<double> inverse_std(const std::vector<double>& var, double eps) {
  std::vector<double> out;
  for (double v : var) out.push_back(1 / std::sqrt(v + eps));
  return out;
}

/// GroupNorm's functional forward and backward against the reference, dx written over dy when
/// `in_place`.
template <class T>
void check_groups(const Shape& sh, Index groups, bool affine, bool in_place,
                  double mean_scale = 10.0) {
  INFO("batch " << sh.batch << ", channels " << sh.channels << ", spatial " << sh.spatial
                << (sh.layout == Layout::ChannelsLast ? ", channels last" : ", channels first")
                << ", groups " << groups << ", affine " << affine);
  const auto x = testing::random_input<T>(sh, mean_scale);
  const auto dy = testing::random_input<T>(sh, 1.0);
  const auto w = affine ? testing::random_vector<T>(sh.channels, 0.5, 2) : std::vector<T>{};
  const auto b = affine ? testing::random_vector<T>(sh.channels, -1, 1) : std::vector<T>{};
  const double eps = 1e-4;
  const fn::Shape shape{sh.batch, sh.channels, sh.spatial, sh.layout};
  auto y = testing::poisoned<T>(sh.size());
  auto mean = testing::poisoned<T>(sh.batch * groups), invstd = mean;
  const fn::Affine<T> params{affine ? w.data() : nullptr, affine ? b.data() : nullptr};
  fn::group_norm_forward<T>(shape, groups, x.data(), y.data(), eps, params,
                            {mean.data(), invstd.data()});

  const auto members = reference::group_members(sh, groups);
  const auto param = reference::channel_of(sh);
  const auto fwd = reference::normalize_groups(members, x, eps, false, param, testing::widen(w),
                                               testing::widen(b));
  testing::check_close(y, fwd.y, "y");
  testing::check_close(mean, fwd.mean, "mean");
  testing::check_close(invstd, inverse_std<T>(fwd.var, eps), "invstd");

  auto dx = in_place ? dy : testing::poisoned<T>(sh.size());
  auto gw = testing::poisoned<T>(sh.channels), gb = gw;
  fn::group_norm_backward<T>(shape, groups, dy.data(), x.data(), dx.data(), mean.data(),
                             invstd.data(), affine ? w.data() : nullptr, gw.data(), gb.data());
  // The reference takes the statistics the kernels return, rounded to T, as backward does.
  reference::Normalized used = fwd;
  for (std::size_t j = 0; j < used.mean.size(); ++j) {
    used.mean[j] = double(mean[j]);
    used.var[j] = 1 / (double(invstd[j]) * double(invstd[j])) - eps;
  }
  const auto grads = reference::backward_groups(members, x, dy, used, eps, false, param,
                                                sh.channels, testing::widen(w));
  testing::check_sum_close(dx, grads.dx, grads.dx_terms, "dx");
  testing::check_sum_close(gw, grads.weight, grads.weight_terms, "grad_weight");
  testing::check_sum_close(gb, grads.bias, grads.bias_terms, "grad_bias");
}

/// LayerNorm's (rms: RMSNorm's) functional forward and backward against the reference. dy is
/// random around zero, or where dy_low is not 0, uniform in [dy_low, 2 dy_low]: of one sign, so
/// that its sums grow with the width.
template <class T>
void check_rows(Index rows, Index width, bool rms, bool weight, bool bias, bool in_place,
                double mean_scale = 10.0, double dy_low = 0) {
  INFO((rms ? "RMSNorm" : "LayerNorm") << ", rows " << rows << ", width " << width
                                       << ", weight " << weight << ", bias " << bias);
  const Shape flat{rows, 1, width, Layout::ChannelsFirst};
  auto x = testing::random_input<T>({rows * width, 1, 1, Layout::ChannelsFirst}, mean_scale);
  // A mean per row: random_input's means go by channel.
  const auto offsets = testing::random_vector<double>(rows, -mean_scale, mean_scale);
  for (Index i = 0; i < rows * width; ++i) x[std::size_t(i)] += T(offsets[std::size_t(i / width)]);
  const auto dy = dy_low == 0 ? testing::random_input<T>(flat, 1.0)
                               : testing::random_vector<T>(rows * width, dy_low, 2 * dy_low);
  const auto w = weight ? testing::random_vector<T>(width, 0.5, 2) : std::vector<T>{};
  const auto b = bias ? testing::random_vector<T>(width, -1, 1) : std::vector<T>{};
  const double eps = 1e-4;
  auto y = testing::poisoned<T>(rows * width);
  auto mean = testing::poisoned<T>(rows), invstd = mean;
  if (rms)
    fn::rms_norm_forward<T>(rows, width, x.data(), y.data(), eps, weight ? w.data() : nullptr,
                            invstd.data());
  else
    fn::layer_norm_forward<T>(rows, width, x.data(), y.data(), eps,
                              {weight ? w.data() : nullptr, bias ? b.data() : nullptr},
                              {mean.data(), invstd.data()});
  const auto members = reference::row_members(rows, width);
  const auto param = reference::position_of(rows, width);
  const auto fwd = reference::normalize_groups(members, x, eps, rms, param, testing::widen(w),
                                               testing::widen(b));
  testing::check_close(y, fwd.y, "y");
  if (!rms) testing::check_close(mean, fwd.mean, "mean");
  testing::check_close(invstd, inverse_std<T>(fwd.var, eps), "invstd");

  auto dx = in_place ? dy : testing::poisoned<T>(rows * width);
  auto gw = testing::poisoned<T>(width), gb = gw;
  if (rms)
    fn::rms_norm_backward<T>(rows, width, dy.data(), x.data(), dx.data(), invstd.data(),
                             weight ? w.data() : nullptr, gw.data());
  else
    fn::layer_norm_backward<T>(rows, width, dy.data(), x.data(), dx.data(), mean.data(),
                               invstd.data(), weight ? w.data() : nullptr, gw.data(), gb.data());
  reference::Normalized used = fwd;
  for (std::size_t j = 0; j < used.mean.size(); ++j) {
    if (!rms) used.mean[j] = double(mean[j]);
    used.var[j] = 1 / (double(invstd[j]) * double(invstd[j])) - eps;
  }
  const auto grads = reference::backward_groups(members, x, dy, used, eps, rms, param, width,
                                                testing::widen(w));
  testing::check_sum_close(dx, grads.dx, grads.dx_terms, "dx");
  testing::check_sum_close(gw, grads.weight, grads.weight_terms, "grad_weight");
  if (!rms) testing::check_sum_close(gb, grads.bias, grads.bias_terms, "grad_bias");
}

}  // namespace

TEMPLATE_TEST_CASE("GroupNorm and InstanceNorm match the double reference", "[family]", float,
                   double) {
  // Spatial sizes of every reduction: rows of channels (1, 3), short runs swept (7, 49), runs
  // taken one by one (300, in groups of channels); channel counts around the packet sizes.
  struct Case {
    Index batch, channels, spatial;
  };
  for (const Case& k : {Case{3, 6, 1}, Case{2, 6, 7}, Case{3, 12, 49}, Case{2, 32, 300},
                        Case{1, 64, 3}, Case{4, 20, 5}, Case{2, 130, 9}}) {
    for (Layout layout : {Layout::ChannelsFirst, Layout::ChannelsLast}) {
      const Shape sh{k.batch, k.channels, k.spatial, layout};
      for (Index groups : {Index{1}, k.channels / 2, k.channels}) {
        if (groups < 1 || k.channels % groups != 0) continue;
        if (k.spatial == 1 && groups == k.channels) continue;  // one value per group
        check_groups<TestType>(sh, groups, groups != k.channels, groups == 1);
      }
    }
  }
}

TEMPLATE_TEST_CASE("LayerNorm and RMSNorm match the double reference", "[family]", float,
                   double) {
  // Widths below, at and past a packet, long rows cut into blocks (2050), more rows than
  // backward's blocks (67, 130), and blocks of more rows than its sums in T take (2200).
  struct Case {
    Index rows, width;
  };
  for (const Case& k : {Case{1, 2}, Case{7, 3}, Case{5, 17}, Case{3, 773}, Case{2, 2050},
                        Case{67, 33}, Case{130, 16}, Case{2200, 5}}) {
    for (bool rms : {false, true}) {
      check_rows<TestType>(k.rows, k.width, rms, true, !rms, false);
      check_rows<TestType>(k.rows, k.width, rms, false, false, true);
      if (!rms) check_rows<TestType>(k.rows, k.width, false, true, false, false);
    }
  }
}

TEST_CASE("The family keeps float precision where the mean is 1e4 times the spread",
          "[family]") {
  check_groups<float>({3, 8, 300, Layout::ChannelsFirst}, 4, true, false, 1e4);
  check_groups<float>({3, 8, 49, Layout::ChannelsLast}, 2, true, false, 1e4);
  check_rows<float>(9, 1000, false, true, true, false, 1e4);
  check_rows<float>(9, 1000, true, true, false, false, 1e4);
}

TEST_CASE("LayerNorm's and RMSNorm's backward row sums pass the float maximum and stay exact",
          "[family]") {
  // Each dy * weight is at most 4e36, but a row's sum of them is past 4e38: the kernels sum
  // each block of a row in float while it stays finite, and again in double where it does not.
  for (bool rms : {false, true}) check_rows<float>(2, 2050, rms, true, !rms, false, 10.0, 1e36);
}

namespace {

/// dx, grad_weight and grad_bias of a double module against five-point central differences of
/// L = sum(y * g).
template <class Module, int Rank>
void gradcheck(Module module, const std::array<Index, std::size_t(Rank)>& dims) {
  using Tensor = Eigen::Tensor<double, Rank, Eigen::RowMajor>;
  Eigen::array<Eigen::Index, Rank> edims;
  std::copy(dims.begin(), dims.end(), edims.begin());
  Tensor x(edims), g(edims);
  const auto xv = testing::random_input<double>({1, 1, Index(x.size()), Layout::ChannelsFirst});
  const auto gv = testing::random_input<double>({1, 1, Index(x.size()), Layout::ChannelsFirst}, 1);
  std::copy(xv.begin(), xv.end(), x.data());
  std::copy(gv.begin(), gv.end(), g.data());
  for (Index i = 0; i < module.weight().size(); ++i) module.weight()(i) = 0.5 + 0.1 * double(i);
  for (Index i = 0; i < module.bias().size(); ++i) module.bias()(i) = 0.2 - 0.05 * double(i);
  auto loss = [&](Module m) {
    const Tensor y = m.forward(x);
    const Eigen::Tensor<double, 0, Eigen::RowMajor> l = (y * g).sum();
    return l();
  };
  Module probe = module;
  probe.forward(x);
  const Tensor dx = probe.backward(g);
  const double h = 1e-4, tol = 1e-6;
  auto derivative = [h](auto f) {
    return (f(-2 * h) - 8 * f(-h) + 8 * f(h) - f(2 * h)) / (12 * h);
  };
  for (Index i = 0; i < x.size(); ++i) {
    const double numeric = derivative([&](double step) {
      const double kept = x.data()[i];
      x.data()[i] += step;
      const double l = loss(module);
      x.data()[i] = kept;
      return l;
    });
    INFO("dx[" << i << "]");
    CHECK(dx.data()[i] == Approx(numeric).epsilon(tol).margin(tol));
  }
  for (int which = 0; which < 2; ++which) {
    const Index n = which == 0 ? module.weight().size() : module.bias().size();
    for (Index i = 0; i < n; ++i) {
      const double numeric = derivative([&](double step) {
        Module moved = module;
        (which == 0 ? moved.weight() : moved.bias())(i) += step;
        return loss(moved);
      });
      const double analytic = which == 0 ? probe.grad_weight()(i) : probe.grad_bias()(i);
      INFO((which == 0 ? "grad_weight[" : "grad_bias[") << i << "]");
      CHECK(analytic == Approx(numeric).epsilon(tol).margin(tol));
    }
  }
}

}  // namespace

TEST_CASE("The family's gradients are the derivatives of its forwards", "[family]") {
  bnorm::GroupNormOptions last;
  last.layout = Layout::ChannelsLast;
  gradcheck<bnorm::GroupNorm<double>, 4>(bnorm::GroupNorm<double>(3, 6), {2, 6, 3, 2});
  gradcheck<bnorm::GroupNorm<double>, 3>(bnorm::GroupNorm<double>(2, 4, last), {3, 5, 4});
  bnorm::InstanceNormOptions affine;
  affine.affine = true;
  gradcheck<bnorm::InstanceNorm2d<double>, 4>(bnorm::InstanceNorm2d<double>(3, affine),
                                              {2, 3, 2, 3});
  gradcheck<bnorm::InstanceNorm1d<double>, 2>(bnorm::InstanceNorm1d<double>(3, affine), {3, 5});
  gradcheck<bnorm::LayerNorm<double>, 3>(bnorm::LayerNorm<double>({3, 4}), {2, 3, 4});
  gradcheck<bnorm::RMSNorm<double>, 2>(bnorm::RMSNorm<double>({5}), {3, 5});
}

TEST_CASE("The family's results are bit-identical for any thread count", "[family][threads]") {
  // Large enough for the kernels to split blocks finely (1 MiB and more).
  const fn::Shape shapes[] = {{6, 64, 900, Layout::ChannelsFirst},
                              {5, 96, 700, Layout::ChannelsLast},
                              {40, 64, 49, Layout::ChannelsFirst}};
  for (const fn::Shape& sh : shapes) {
    for (Index groups : {Index{1}, Index{16}, sh.channels}) {
      INFO("channels " << sh.channels << ", spatial " << sh.spatial << ", groups " << groups);
      const auto x = testing::random_input<float>(
          {sh.batch, sh.channels, sh.spatial, sh.layout});
      const auto dy = testing::random_input<float>(
          {sh.batch, sh.channels, sh.spatial, sh.layout}, 1.0);
      const auto w = testing::random_vector<float>(sh.channels, 0.5, 2);
      const auto b = testing::random_vector<float>(sh.channels, -1, 1);
      std::vector<std::vector<float>> results;
      for (int threads : {0, 2, 3, 5}) {
        testing::Pool pool(threads);
        const fn::Execution<float> ex{pool.device.get(), nullptr};
        std::vector<float> y(x.size()), mean(static_cast<std::size_t>(sh.batch * groups)),
            invstd(mean), dx(x.size()), gw(static_cast<std::size_t>(sh.channels)), gb(gw);
        fn::group_norm_forward<float>(sh, groups, x.data(), y.data(), 1e-5, {w.data(), b.data()},
                                      {mean.data(), invstd.data()}, ex);
        fn::group_norm_backward<float>(sh, groups, dy.data(), x.data(), dx.data(), mean.data(),
                                       invstd.data(), w.data(), gw.data(), gb.data(), ex);
        std::vector<float> all = y;
        for (const auto* v : {&mean, &invstd, &dx, &gw, &gb}) all.insert(all.end(), v->begin(), v->end());
        results.push_back(all);
      }
      for (std::size_t i = 1; i < results.size(); ++i) CHECK(testing::same_bits(results[0], results[i]));
    }
  }
  for (bool rms : {false, true}) {
    const Index rows = 700, width = 1030;
    const auto x = testing::random_input<float>({rows, 1, width, Layout::ChannelsFirst});
    const auto dy = testing::random_input<float>({rows, 1, width, Layout::ChannelsFirst}, 1.0);
    const auto w = testing::random_vector<float>(width, 0.5, 2);
    const auto b = testing::random_vector<float>(width, -1, 1);
    std::vector<std::vector<float>> results;
    for (int threads : {0, 2, 3, 5}) {
      testing::Pool pool(threads);
      const fn::Execution<float> ex{pool.device.get(), nullptr};
      std::vector<float> y(x.size()), mean(static_cast<std::size_t>(rows)), invstd(mean),
          dx(x.size()), gw(static_cast<std::size_t>(width)), gb(gw);
      if (rms) {
        fn::rms_norm_forward<float>(rows, width, x.data(), y.data(), 1e-5, w.data(),
                                    invstd.data(), ex);
        fn::rms_norm_backward<float>(rows, width, dy.data(), x.data(), dx.data(), invstd.data(),
                                     w.data(), gw.data(), ex);
      } else {
        fn::layer_norm_forward<float>(rows, width, x.data(), y.data(), 1e-5,
                                      {w.data(), b.data()}, {mean.data(), invstd.data()}, ex);
        fn::layer_norm_backward<float>(rows, width, dy.data(), x.data(), dx.data(), mean.data(),
                                       invstd.data(), w.data(), gw.data(), gb.data(), ex);
      }
      std::vector<float> all = y;
      for (const auto* v : {&invstd, &dx, &gw}) all.insert(all.end(), v->begin(), v->end());
      results.push_back(all);
    }
    for (std::size_t i = 1; i < results.size(); ++i) CHECK(testing::same_bits(results[0], results[i]));
  }
}

TEST_CASE("An empty batch gives the family's parameters zero gradients", "[family]") {
  for (const Layout layout : {Layout::ChannelsFirst, Layout::ChannelsLast}) {
    for (const fn::Shape shape : {fn::Shape{0, 6, 5, layout}, fn::Shape{3, 6, 0, layout}}) {
      INFO("batch " << shape.batch << ", spatial " << shape.spatial);
      auto gw = testing::poisoned<float>(6), gb = gw;
      fn::group_norm_backward<float>(shape, 3, nullptr, nullptr, nullptr, nullptr, nullptr,
                                     nullptr, gw.data(), gb.data());
      CHECK(gw == std::vector<float>(6, 0.0f));
      CHECK(gb == std::vector<float>(6, 0.0f));
      gw = gb = testing::poisoned<float>(6);
      fn::instance_norm_backward<float>(shape, nullptr, nullptr, nullptr, nullptr, nullptr,
                                        nullptr, gw.data(), gb.data());
      CHECK(gw == std::vector<float>(6, 0.0f));
      CHECK(gb == std::vector<float>(6, 0.0f));
    }
  }
  auto gw = testing::poisoned<double>(7), gb = gw;
  fn::layer_norm_backward<double>(0, 7, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                                  gw.data(), gb.data());
  CHECK(gw == std::vector<double>(7, 0.0));
  CHECK(gb == std::vector<double>(7, 0.0));
  gw = testing::poisoned<double>(7);
  fn::rms_norm_backward<double>(0, 7, nullptr, nullptr, nullptr, nullptr, nullptr, gw.data());
  CHECK(gw == std::vector<double>(7, 0.0));
}
