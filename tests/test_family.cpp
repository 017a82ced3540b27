// The normalization family (GroupNorm, InstanceNorm, LayerNorm, RMSNorm): the functional layer
// against the plain double reference on odd shapes of every plan, finite differences through
// the modules, data whose mean dwarfs its spread, bit-identical results for any thread count,
// clear errors that change nothing, and PyTorch's own results (fixtures/generate_family.py).

#include <fstream>
#include <map>

#include "reference_family.hpp"
#include "util.hpp"

namespace fn = bnorm::functional;
using bnorm::Layout;
using reference::Shape;
using testing::Index;

namespace {

template <class T>
std::vector<T> values(const Eigen::Tensor<T, 1>& t) {
  return std::vector<T>(t.data(), t.data() + t.size());
}

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

/// LayerNorm's (rms: RMSNorm's) functional forward and backward against the reference.
template <class T>
void check_rows(Index rows, Index width, bool rms, bool weight, bool bias, bool in_place,
                double mean_scale = 10.0) {
  INFO((rms ? "RMSNorm" : "LayerNorm") << ", rows " << rows << ", width " << width
                                       << ", weight " << weight << ", bias " << bias);
  const Shape flat{rows, 1, width, Layout::ChannelsFirst};
  auto x = testing::random_input<T>({rows * width, 1, 1, Layout::ChannelsFirst}, mean_scale);
  // A mean per row: random_input's means go by channel.
  const auto offsets = testing::random_vector<double>(rows, -mean_scale, mean_scale);
  for (Index i = 0; i < rows * width; ++i) x[std::size_t(i)] += T(offsets[std::size_t(i / width)]);
  const auto dy = testing::random_input<T>(flat, 1.0);
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

namespace {

template <class Module, class Tensor>
void check_rejected(Module& m, const Tensor& x, const std::string& message) {
  const Module before = m;
  CHECK_THROWS_WITH(m.forward(x), message);
  CHECK(testing::same_bits(values(m.weight()), values(before.weight())));
  CHECK(testing::same_bits(values(m.grad_weight()), values(before.grad_weight())));
}

}  // namespace

TEST_CASE("The family rejects bad input with PyTorch's words and changes nothing",
          "[family][errors]") {
  using T3 = Eigen::Tensor<float, 3, Eigen::RowMajor>;
  using T4 = Eigen::Tensor<float, 4, Eigen::RowMajor>;
  T3 x3(2, 6, 5);
  x3.setRandom();
  bnorm::LayerNorm<float> ln({4});
  check_rejected(ln, x3,
                 "bnorm::LayerNorm: Given normalized_shape=[4], expected input with shape [*, 4], "
                 "but got input of size[2, 6, 5]");
  bnorm::RMSNorm<float> rn({6, 4});
  check_rejected(rn, x3,
                 "bnorm::RMSNorm: Given normalized_shape=[6, 4], expected input with shape [*, 6, "
                 "4], but got input of size[2, 6, 5]");
  CHECK_THROWS_WITH(bnorm::GroupNorm<float>(4, 6),
                    "bnorm::GroupNorm: num_channels must be divisible by num_groups, got "
                    "num_channels 6 and num_groups 4");
  CHECK_THROWS_AS(bnorm::LayerNorm<float>(std::vector<Index>{}), std::invalid_argument);
  bnorm::LayerNormOptions bad_eps;
  bad_eps.eps = -1;
  CHECK_THROWS_AS(bnorm::LayerNorm<float>({4}, bad_eps), std::invalid_argument);
  bnorm::GroupNorm<float> gn(2, 4);
  check_rejected(gn, x3,
                 "bnorm::GroupNorm: expected 4 channels in dimension 1 (ChannelsFirst), got input "
                 "of shape [2, 6, 5]");
  bnorm::InstanceNormOptions tracked;
  tracked.track_running_stats = true;
  tracked.affine = true;
  bnorm::InstanceNorm2d<float> in(6, tracked);
  check_rejected(in, x3,
                 "bnorm::InstanceNorm2d: expected 6 channels in dimension 0 (ChannelsFirst), got "
                 "input of shape [2, 6, 5]");
  T4 single(3, 6, 1, 1);
  single.setRandom();
  const auto running = values(in.running_mean());
  check_rejected(in, single,
                 "bnorm::InstanceNorm2d: Expected more than 1 spatial element when training, got "
                 "input size [3, 6, 1, 1]");
  CHECK(testing::same_bits(values(in.running_mean()), running));
  in.eval();  // running statistics: one value per instance is fine
  CHECK_NOTHROW(in.forward(single));
  bnorm::InstanceNorm1d<float> in1(6);
  Eigen::Tensor<float, 4, Eigen::RowMajor> x4(2, 6, 5, 1);
  CHECK_THROWS_WITH(in1.forward(x4),
                    "bnorm::InstanceNorm1d: expected 2D or 3D input (got 4D input)");
  // backward before forward, and with another shape
  bnorm::LayerNorm<float> fresh({5});
  CHECK_THROWS_AS(fresh.backward(x3), std::logic_error);
  fresh.forward(x3);
  CHECK_THROWS_WITH(fresh.backward(T3(2, 3, 5)),
                    "bnorm::LayerNorm: expected dy of the last forward's input shape [2, 6, 5], "
                    "got [2, 3, 5]");
}

TEST_CASE("InstanceNorm's running statistics follow PyTorch's conventions", "[family]") {
  // momentum std::nullopt: no update (PyTorch passes 0); num_batches_tracked is never counted.
  bnorm::InstanceNormOptions o;
  o.track_running_stats = true;
  o.momentum = std::nullopt;
  bnorm::InstanceNorm1d<double> in(3, o);
  Eigen::Tensor<double, 3, Eigen::RowMajor> x(4, 3, 9);
  x.setRandom();
  in.forward(x);
  for (Index c = 0; c < 3; ++c) {
    CHECK(in.running_mean()(c) == 0.0);
    CHECK(in.running_var()(c) == 1.0);
  }
  CHECK(in.num_batches_tracked() == 0);
  // save_input = false: backward takes the input again, and agrees with backward(dy).
  o.momentum = 0.5;
  o.save_input = false;
  bnorm::InstanceNorm1d<double> lean(3, o);
  bnorm::InstanceNormOptions kept_options = o;
  kept_options.save_input = true;
  bnorm::InstanceNorm1d<double> kept(3, kept_options);
  Eigen::Tensor<double, 3, Eigen::RowMajor> dy(4, 3, 9), dx(4, 3, 9);
  dy.setRandom();
  lean.forward(x);
  kept.forward(x);
  CHECK_THROWS_AS(lean.backward(dy), std::logic_error);
  lean.backward(x, dy, dx);
  const Eigen::Tensor<double, 3, Eigen::RowMajor> expected = kept.backward(dy);
  for (Index i = 0; i < dx.size(); ++i) CHECK(dx.data()[i] == expected.data()[i]);
  CHECK(lean.running_mean()(0) == kept.running_mean()(0));
}

// --- PyTorch fixtures ------------------------------------------------------------------------

namespace {

struct FixtureStep {
  std::string mode;
  std::map<std::string, std::vector<double>> arrays;
};

struct Fixture {
  std::string name;
  std::map<std::string, std::string> keys;
  std::vector<Index> dims, normalized;
  std::vector<double> weight, bias;
  std::vector<FixtureStep> steps;
  double number(const std::string& key) const { return std::stod(keys.at(key)); }
  bool flag(const std::string& key) const { return keys.at(key) == "1"; }
};

std::vector<double> read_values(std::istream& in) {
  std::size_t n = 0;
  in >> n;
  std::vector<double> v(n);
  for (auto& e : v) in >> e;
  return v;
}

std::vector<Fixture> load_fixtures() {
  std::ifstream in(std::string(BNORM_FIXTURE_DIR) + "/pytorch_family.txt");
  REQUIRE(in.good());
  std::vector<Fixture> cases;
  std::string word;
  while (in >> word) {
    if (word[0] == '#') {
      std::getline(in, word);
    } else if (word == "case") {
      cases.emplace_back();
      in >> cases.back().name;
    } else if (word == "end") {
      continue;
    } else {
      Fixture& f = cases.back();
      if (word == "dims" || word == "normalized") {
        std::size_t rank = 0;
        in >> rank;
        auto& to = word == "dims" ? f.dims : f.normalized;
        to.resize(rank);
        for (auto& d : to) in >> d;
      } else if (word == "weight" && f.steps.empty()) {
        f.weight = read_values(in);
      } else if (word == "bias" && f.steps.empty() && f.keys.count("layout")) {
        f.bias = read_values(in);
      } else if (word == "step") {
        f.steps.emplace_back();
        in >> f.steps.back().mode;
      } else if (!f.steps.empty()) {
        f.steps.back().arrays[word] = read_values(in);
      } else {
        in >> f.keys[word];
      }
    }
  }
  return cases;
}

template <class T, int Rank, class Module>
void run_fixture(const Fixture& f, Module& m) {
  if (!f.weight.empty())
    for (Index i = 0; i < m.weight().size(); ++i) m.weight()(i) = T(f.weight[std::size_t(i)]);
  if (!f.bias.empty())
    for (Index i = 0; i < m.bias().size(); ++i) m.bias()(i) = T(f.bias[std::size_t(i)]);
  CHECK(m.weight().size() == Index(f.weight.size()));
  CHECK(m.bias().size() == Index(f.bias.size()));
  Eigen::array<Eigen::Index, Rank> dims;
  for (int i = 0; i < Rank; ++i) dims[std::size_t(i)] = f.dims[std::size_t(i)];
  using Map = Eigen::TensorMap<Eigen::Tensor<T, Rank, Eigen::RowMajor>>;
  using ConstMap = Eigen::TensorMap<const Eigen::Tensor<T, Rank, Eigen::RowMajor>>;
  for (std::size_t s = 0; s < f.steps.size(); ++s) {
    const FixtureStep& step = f.steps[s];
    INFO("step " << s << " (" << step.mode << ")");
    m.train(step.mode == "train");
    const auto& xs = step.arrays.at("x");
    const auto& dys = step.arrays.at("dy");
    std::vector<T> x(xs.begin(), xs.end()), dy(dys.begin(), dys.end());
    auto y = testing::poisoned<T>(Index(x.size())), dx = y;
    m.forward(ConstMap(x.data(), dims), Map(y.data(), dims));
    m.backward(ConstMap(dy.data(), dims), Map(dx.data(), dims));
    testing::check_close(y, step.arrays.at("y"), "y");
    testing::check_close(dx, step.arrays.at("dx"), "dx");
    if (m.weight().size() > 0)
      testing::check_close(values(m.grad_weight()), step.arrays.at("grad_weight"), "grad_weight");
    if (m.bias().size() > 0)
      testing::check_close(values(m.grad_bias()), step.arrays.at("grad_bias"), "grad_bias");
    if constexpr (std::is_same_v<Module, bnorm::InstanceNorm<T, 1>> ||
                  std::is_same_v<Module, bnorm::InstanceNorm<T, 2>> ||
                  std::is_same_v<Module, bnorm::InstanceNorm<T, 3>>) {
      if (f.flag("track")) {
        testing::check_close(values(m.running_mean()), step.arrays.at("running_mean"),
                             "running_mean");
        testing::check_close(values(m.running_var()), step.arrays.at("running_var"),
                             "running_var");
      }
    }
  }
}

template <class T, int Rank>
void run_fixture_of_rank(const Fixture& f) {
  const std::string module = f.keys.at("module");
  const Layout layout = f.keys.count("layout") && f.keys.at("layout") == "last"
                            ? Layout::ChannelsLast
                            : Layout::ChannelsFirst;
  if (module == "layer") {
    bnorm::LayerNormOptions o;
    o.eps = f.number("eps");
    o.elementwise_affine = f.flag("affine");
    o.bias = f.flag("bias");
    bnorm::LayerNorm<T> m(f.normalized, o);
    run_fixture<T, Rank>(f, m);
  } else if (module == "rms") {
    bnorm::RMSNormOptions o;
    if (!f.flag("eps_default")) o.eps = f.number("eps");
    o.elementwise_affine = f.flag("affine");
    bnorm::RMSNorm<T> m(f.normalized, o);
    CHECK(m.eps() == f.number("eps"));
    run_fixture<T, Rank>(f, m);
  } else if (module == "group") {
    bnorm::GroupNormOptions o;
    o.eps = f.number("eps");
    o.affine = f.flag("affine");
    o.layout = layout;
    const Index C = layout == Layout::ChannelsLast ? f.dims.back() : f.dims[1];
    bnorm::GroupNorm<T> m(Index(f.number("groups")), C, o);
    run_fixture<T, Rank>(f, m);
  } else if (module == "instance") {
    bnorm::InstanceNormOptions o;
    o.eps = f.number("eps");
    o.momentum = f.number("momentum");
    o.affine = f.flag("affine");
    o.track_running_stats = f.flag("track");
    o.layout = layout;
    const int spatial = int(f.number("spatial"));
    const bool batched = Rank == spatial + 2;
    const Index C = layout == Layout::ChannelsLast ? f.dims.back() : f.dims[batched ? 1 : 0];
    if constexpr (Rank >= 2 && Rank <= 3)
      if (spatial == 1) {
        bnorm::InstanceNorm1d<T> m(C, o);
        return run_fixture<T, Rank>(f, m);
      }
    if constexpr (Rank >= 3 && Rank <= 4)
      if (spatial == 2) {
        bnorm::InstanceNorm2d<T> m(C, o);
        return run_fixture<T, Rank>(f, m);
      }
    if constexpr (Rank >= 4 && Rank <= 5)
      if (spatial == 3) {
        bnorm::InstanceNorm3d<T> m(C, o);
        return run_fixture<T, Rank>(f, m);
      }
    FAIL("no InstanceNorm for spatial " << spatial << " and rank " << Rank);
  } else {
    FAIL("unknown module " << module);
  }
}

template <class T>
void run_fixtures(const std::string& dtype) {
  const auto cases = load_fixtures();
  REQUIRE(cases.size() >= 150);
  std::map<std::string, int> checked;
  for (const Fixture& f : cases) {
    if (f.keys.at("dtype") != dtype) continue;
    INFO("fixture " << f.name);
    REQUIRE(f.steps.size() == 4);
    switch (f.dims.size()) {
      case 2: run_fixture_of_rank<T, 2>(f); break;
      case 3: run_fixture_of_rank<T, 3>(f); break;
      case 4: run_fixture_of_rank<T, 4>(f); break;
      case 5: run_fixture_of_rank<T, 5>(f); break;
      default: FAIL("rank " << f.dims.size());
    }
    ++checked[f.keys.at("module")];
  }
  for (const char* module : {"layer", "rms", "group", "instance"}) CHECK(checked[module] >= 10);
}

}  // namespace

TEST_CASE("The family matches PyTorch fixtures (float)", "[family][fixtures]") {
  run_fixtures<float>("float");
}

TEST_CASE("The family matches PyTorch fixtures (double)", "[family][fixtures]") {
  run_fixtures<double>("double");
}
