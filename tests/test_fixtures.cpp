// bnorm's modules against real PyTorch: multi-step sequences recorded by fixtures/generate.py
// (training steps, eval, training again) for every module class, layout and option set, in float
// and double. Outputs, input gradients, accumulated parameter gradients, running statistics and
// num_batches_tracked are compared after every step.

#include <algorithm>
#include <fstream>
#include <map>
#include <sstream>

#include "util.hpp"

using testing::values;

namespace {

/// A case of pytorch_<dtype>.txt or pytorch_ghost.txt (fixtures/generate.py).
struct Case {
  std::string name, dtype, layout;
  int module = 0;
  double eps = 0;
  std::optional<double> momentum;
  bool affine = false, track = false;
  testing::Index virtual_batch_size = 0;  // Ghost BN's chunks (pytorch_ghost.txt)
  std::vector<testing::Index> dims;
  std::vector<double> weight, bias;
  std::vector<testing::FixtureStep> steps;
};

std::vector<Case> load(const std::string& file) {
  std::vector<Case> cases;
  for (const testing::FixtureCase& f : testing::read_fixtures(file)) {
    Case c;
    c.name = f.name;
    c.dtype = f.key("dtype");
    c.module = int(f.number("module"));
    c.layout = f.key("layout");
    c.eps = f.number("eps");
    if (f.key("momentum") != "none") c.momentum = f.number("momentum");
    c.affine = f.flag("affine");
    c.track = f.flag("track");
    if (f.has("virtual_batch_size")) c.virtual_batch_size = testing::Index(f.number("virtual_batch_size"));
    c.dims = f.sizes("dims");
    if (c.affine) {
      c.weight = f.arrays.at("weight");
      c.bias = f.arrays.at("bias");
    }
    c.steps = f.steps;
    cases.push_back(std::move(c));
  }
  return cases;
}

template <class T>
std::vector<T> narrow(const std::vector<double>& v) {
  return std::vector<T>(v.begin(), v.end());
}

template <class Module, int Rank>
void run_case(const Case& k) {
  using T = typename std::remove_reference_t<decltype(std::declval<Module&>().weight())>::Scalar;
  bnorm::Options opt;
  opt.eps = k.eps;
  opt.momentum = k.momentum;
  opt.affine = k.affine;
  opt.track_running_stats = k.track;
  opt.virtual_batch_size = k.virtual_batch_size;
  opt.layout = k.layout == "last" ? bnorm::Layout::ChannelsLast : bnorm::Layout::ChannelsFirst;
  const testing::Index channels = k.layout == "last" ? k.dims.back() : k.dims[1];
  Module bn(channels, opt);
  if (k.affine) {
    for (testing::Index c = 0; c < channels; ++c) {
      bn.weight()(c) = T(k.weight[std::size_t(c)]);
      bn.bias()(c) = T(k.bias[std::size_t(c)]);
    }
  }
  Eigen::array<Eigen::Index, Rank> dims;
  for (int i = 0; i < Rank; ++i) dims[std::size_t(i)] = k.dims[std::size_t(i)];
  for (std::size_t s = 0; s < k.steps.size(); ++s) {
    const testing::FixtureStep& step = k.steps[s];
    INFO("step " << s << " (" << step.mode << ")");
    bn.train(step.mode == "train");
    auto x = narrow<T>(step.arrays.at("x")), dy = narrow<T>(step.arrays.at("dy"));
    Eigen::TensorMap<const Eigen::Tensor<T, Rank, Eigen::RowMajor>> xm(x.data(), dims);
    auto y = testing::poisoned<T>(testing::Index(x.size()));
    auto dx = testing::poisoned<T>(testing::Index(x.size()));
    Eigen::TensorMap<Eigen::Tensor<T, Rank, Eigen::RowMajor>> ym(y.data(), dims), dxm(dx.data(), dims);
    bn.forward(xm, ym);
    bn.backward(Eigen::TensorMap<const Eigen::Tensor<T, Rank, Eigen::RowMajor>>(dy.data(), dims),
                dxm);
    testing::check_close(y, step.arrays.at("y"), "y");
    testing::check_close(dx, step.arrays.at("dx"), "dx");
    if (k.affine) {
      testing::check_close(values(bn.grad_weight()), step.arrays.at("grad_weight"), "grad_weight");
      testing::check_close(values(bn.grad_bias()), step.arrays.at("grad_bias"), "grad_bias");
    } else {
      CHECK(bn.grad_weight().size() == 0);
    }
    if (k.track) {
      testing::check_close(values(bn.running_mean()), step.arrays.at("running_mean"), "running_mean");
      testing::check_close(values(bn.running_var()), step.arrays.at("running_var"), "running_var");
      CHECK(bn.num_batches_tracked() == std::stoll(step.keys.at("num_batches_tracked")));
    } else {
      CHECK(bn.running_mean().size() == 0);
      CHECK(bn.num_batches_tracked() == 0);
    }
  }
}

/// The cases of `file` in T (dtype), at least `expected` of them.
template <class T>
void run_file(const std::string& file, std::size_t expected) {
  const std::string dtype = sizeof(T) == 4 ? "float" : "double";
  auto cases = load(file);
  cases.erase(std::remove_if(cases.begin(), cases.end(),
                             [&](const Case& k) { return k.dtype != dtype; }),
              cases.end());
  REQUIRE(cases.size() >= expected);
  int checked = 0;
  for (const Case& k : cases) {
    INFO("fixture " << k.name);
    REQUIRE(!k.steps.empty());
    const std::size_t rank = k.dims.size();
    if (k.module == 1 && rank == 2) run_case<bnorm::BatchNorm1d<T>, 2>(k);
    else if (k.module == 1 && rank == 3) run_case<bnorm::BatchNorm1d<T>, 3>(k);
    else if (k.module == 2) run_case<bnorm::BatchNorm2d<T>, 4>(k);
    else if (k.module == 3) run_case<bnorm::BatchNorm3d<T>, 5>(k);
    else FAIL("unknown module " << k.module << " of rank " << rank);
    ++checked;
  }
  CHECK(checked == int(cases.size()));
}

}  // namespace

TEST_CASE("BatchNorm matches PyTorch fixtures (float)", "[fixtures]") {
  run_file<float>("pytorch_float.txt", 40);
}

TEST_CASE("BatchNorm matches PyTorch fixtures (double)", "[fixtures]") {
  run_file<double>("pytorch_double.txt", 40);
}

// Ghost BN (virtual_batch_size) against PyTorch's batch norm over the same chunks, with the
// running statistics moved once per forward toward the mean over the chunks of their statistics.
TEMPLATE_TEST_CASE("Ghost BatchNorm matches PyTorch's batch norm over the chunks", "[fixtures][ghost]",
                   float, double) {
  run_file<TestType>("pytorch_ghost.txt", 21);
}
