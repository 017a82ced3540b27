// The normalization family's modules: clear errors that change nothing, InstanceNorm's running
// statistics, and PyTorch's own results (fixtures/generate_family.py). Module logic does not
// depend on the vector width, so this file is built once; the kernels' own checks, in
// test_family.cpp, run at every width.

#include <fstream>
#include <map>

#include "util.hpp"

using bnorm::Layout;
using testing::Index;
using testing::values;

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

using Fixture = testing::FixtureCase;

/// The case's own array `name` (the initial parameters), empty where it has none.
std::vector<double> initial(const Fixture& f, const char* name) {
  const auto it = f.arrays.find(name);
  return it == f.arrays.end() ? std::vector<double>{} : it->second;
}

template <class T, int Rank, class Module>
void run_fixture(const Fixture& f, Module& m) {
  const std::vector<double> weight = initial(f, "weight"), bias = initial(f, "bias");
  if (!weight.empty())
    for (Index i = 0; i < m.weight().size(); ++i) m.weight()(i) = T(weight[std::size_t(i)]);
  if (!bias.empty())
    for (Index i = 0; i < m.bias().size(); ++i) m.bias()(i) = T(bias[std::size_t(i)]);
  CHECK(m.weight().size() == Index(weight.size()));
  CHECK(m.bias().size() == Index(bias.size()));
  const std::vector<Index> fixture_dims = f.sizes("dims");
  Eigen::array<Eigen::Index, Rank> dims;
  for (int i = 0; i < Rank; ++i) dims[std::size_t(i)] = fixture_dims[std::size_t(i)];
  using Map = Eigen::TensorMap<Eigen::Tensor<T, Rank, Eigen::RowMajor>>;
  using ConstMap = Eigen::TensorMap<const Eigen::Tensor<T, Rank, Eigen::RowMajor>>;
  for (std::size_t s = 0; s < f.steps.size(); ++s) {
    const testing::FixtureStep& step = f.steps[s];
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
  const std::string module = f.key("module");
  const std::vector<Index> dims = f.sizes("dims");
  const Layout layout = f.keys.count("layout") && f.keys.at("layout") == "last"
                            ? Layout::ChannelsLast
                            : Layout::ChannelsFirst;
  if (module == "layer") {
    bnorm::LayerNormOptions o;
    o.eps = f.number("eps");
    o.elementwise_affine = f.flag("affine");
    o.bias = f.flag("bias");
    bnorm::LayerNorm<T> m(f.sizes("normalized"), o);
    run_fixture<T, Rank>(f, m);
  } else if (module == "rms") {
    bnorm::RMSNormOptions o;
    if (!f.flag("eps_default")) o.eps = f.number("eps");
    o.elementwise_affine = f.flag("affine");
    bnorm::RMSNorm<T> m(f.sizes("normalized"), o);
    CHECK(m.eps() == f.number("eps"));
    run_fixture<T, Rank>(f, m);
  } else if (module == "group") {
    bnorm::GroupNormOptions o;
    o.eps = f.number("eps");
    o.affine = f.flag("affine");
    o.layout = layout;
    const Index C = layout == Layout::ChannelsLast ? dims.back() : dims[1];
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
    const Index C = layout == Layout::ChannelsLast ? dims.back() : dims[batched ? 1 : 0];
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
  const auto cases = testing::read_fixtures("pytorch_family.txt");
  REQUIRE(cases.size() >= 150);
  std::map<std::string, int> checked;
  for (const Fixture& f : cases) {
    if (f.key("dtype") != dtype) continue;
    INFO("fixture " << f.name);
    REQUIRE(f.steps.size() == 4);
    switch (f.sizes("dims").size()) {
      case 2: run_fixture_of_rank<T, 2>(f); break;
      case 3: run_fixture_of_rank<T, 3>(f); break;
      case 4: run_fixture_of_rank<T, 4>(f); break;
      case 5: run_fixture_of_rank<T, 5>(f); break;
      default: FAIL("rank " << f.sizes("dims").size());
    }
    ++checked[f.key("module")];
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
