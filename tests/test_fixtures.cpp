// bnorm's modules against real PyTorch: multi-step sequences recorded by fixtures/generate.py
// (training steps, eval, training again) for every module class, layout and option set, in float
// and double. Outputs, input gradients, accumulated parameter gradients, running statistics and
// num_batches_tracked are compared after every step.

#include <fstream>
#include <map>
#include <sstream>

#include "util.hpp"

using testing::values;

namespace {

struct Step {
  std::string mode;
  std::map<std::string, std::vector<double>> arrays;
  std::int64_t num_batches_tracked = -1;
};

struct Case {
  std::string name, dtype, layout;
  int module = 0;
  double eps = 0;
  std::optional<double> momentum;
  bool affine = false, track = false;
  std::vector<testing::Index> dims;
  std::vector<double> weight, bias;
  std::vector<Step> steps;
};

std::vector<Case> load(const std::string& file) {
  std::ifstream in(std::string(BNORM_FIXTURE_DIR) + "/" + file);
  REQUIRE(in.good());
  std::vector<Case> cases;
  std::string word;
  while (in >> word) {
    if (word[0] == '#') {
      std::getline(in, word);
    } else if (word == "case") {
      cases.emplace_back();
      in >> cases.back().name;
    } else {
      Case& c = cases.back();
      if (word == "dtype") in >> c.dtype;
      else if (word == "module") in >> c.module;
      else if (word == "layout") in >> c.layout;
      else if (word == "eps") in >> c.eps;
      else if (word == "momentum") {
        std::string m;
        in >> m;
        if (m != "none") c.momentum = std::stod(m);
      } else if (word == "affine") in >> c.affine;
      else if (word == "track") in >> c.track;
      else if (word == "dims") {
        int rank = 0;
        in >> rank;
        c.dims.resize(std::size_t(rank));
        for (auto& d : c.dims) in >> d;
      } else if (word == "weight") c.weight = testing::read_counted(in);
      else if (word == "bias") c.bias = testing::read_counted(in);
      else if (word == "step") {
        c.steps.emplace_back();
        in >> c.steps.back().mode;
      } else if (word == "num_batches_tracked") in >> c.steps.back().num_batches_tracked;
      else if (word == "end") continue;
      else c.steps.back().arrays[word] = testing::read_counted(in);
    }
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
    const Step& step = k.steps[s];
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
      CHECK(bn.num_batches_tracked() == step.num_batches_tracked);
    } else {
      CHECK(bn.running_mean().size() == 0);
      CHECK(bn.num_batches_tracked() == 0);
    }
  }
}

template <class T>
void run_file(const std::string& file) {
  const auto cases = load(file);
  REQUIRE(cases.size() >= 40);
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
  run_file<float>("pytorch_float.txt");
}

TEST_CASE("BatchNorm matches PyTorch fixtures (double)", "[fixtures]") {
  run_file<double>("pytorch_double.txt");
}
