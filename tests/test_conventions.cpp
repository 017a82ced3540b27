// Other frameworks' conventions (Keras's and Flax's presets, the biased running variance), Batch
// Renormalization (beside the reference module in test_module.cpp), and folding a batch norm into
// the layer before it, against PyTorch's own folding
// (fixtures/pytorch_fold.txt, from fixtures/generate_fold.py) and against the layer followed by
// the batch norm.

#include <fstream>
#include <map>
#include <sstream>

#include "util.hpp"

using testing::Index;

namespace {

struct FoldCase {
  std::string kind;
  Index out = 0, fan_in = 0;
  double eps = 0;
  bool affine = true;
  std::map<std::string, std::vector<double>> arrays;
};

std::vector<FoldCase> fold_cases() {
  std::vector<FoldCase> cases;
  for (const testing::FixtureCase& f : testing::read_fixtures("pytorch_fold.txt")) {
    FoldCase c;
    c.kind = f.key("kind");
    c.out = Index(f.number("out"));
    c.fan_in = Index(f.number("fan_in"));
    c.eps = f.number("eps");
    c.affine = f.flag("affine");
    c.arrays = f.arrays;
    cases.push_back(std::move(c));
  }
  REQUIRE(cases.size() == 4);
  return cases;
}

/// A module of fixture c's statistics and parameters (BatchNorm2d for a conv, 1d for a linear).
template <class Module>
Module module_of(const FoldCase& c) {
  bnorm::Options o;
  o.eps = c.eps;
  o.affine = c.affine;
  Module bn(c.out, o);
  using T = typename Module::Vector::Scalar;
  for (Index k = 0; k < c.out; ++k) {
    bn.running_mean()(k) = T(c.arrays.at("running_mean")[std::size_t(k)]);
    bn.running_var()(k) = T(c.arrays.at("running_var")[std::size_t(k)]);
    if (c.affine) {
      bn.weight()(k) = T(c.arrays.at("bn_weight")[std::size_t(k)]);
      bn.bias()(k) = T(c.arrays.at("bn_bias")[std::size_t(k)]);
    }
  }
  return bn;
}

template <class T, class Module>
void check_fold_against_pytorch(const FoldCase& c) {
  const Module bn = module_of<Module>(c);
  std::vector<T> weight(c.arrays.at("weight").begin(), c.arrays.at("weight").end());
  std::vector<T> bias(c.arrays.at("bias").begin(), c.arrays.at("bias").end());
  REQUIRE(Index(weight.size()) == c.out * c.fan_in);
  bnorm::fold_into_previous(bn, weight.data(), c.fan_in, bias.data());
  testing::check_close(weight, c.arrays.at("fused_weight"), "fused weight");
  testing::check_close(bias, c.arrays.at("fused_bias"), "fused bias");
}

}  // namespace

TEST_CASE("fold_into_previous gives PyTorch's folded Conv2d and Linear", "[fold]") {
  for (const FoldCase& c : fold_cases()) {
    INFO(c.kind << ", affine " << c.affine);
    if (c.kind == "conv") {
      check_fold_against_pytorch<double, bnorm::BatchNorm2d<double>>(c);
      check_fold_against_pytorch<float, bnorm::BatchNorm2d<float>>(c);
    } else {
      check_fold_against_pytorch<double, bnorm::BatchNorm1d<double>>(c);
      check_fold_against_pytorch<float, bnorm::BatchNorm1d<float>>(c);
    }
  }
}

TEST_CASE("a folded Linear computes what the Linear and bn.infer compute", "[fold]") {
  // Random sizes and values, non-zero means; the module trained a few steps first.
  const Index out = std::uniform_int_distribution<Index>(1, 9)(testing::rng());
  const Index fan_in = std::uniform_int_distribution<Index>(1, 13)(testing::rng());
  const Index batch = 6;
  bnorm::BatchNorm1d<double> bn(out);
  const auto gamma = testing::random_vector<double>(out, 0.5, 2.0);
  const auto beta = testing::random_vector<double>(out, -1.0, 1.0);
  for (Index c = 0; c < out; ++c) {
    bn.weight()(c) = gamma[std::size_t(c)];
    bn.bias()(c) = beta[std::size_t(c)];
  }
  const reference::Shape sh{batch, out, 1, bnorm::Layout::ChannelsFirst};
  for (int step = 0; step < 3; ++step) {
    const auto x = testing::random_input<double>(sh);
    bn.forward(Eigen::TensorMap<const Eigen::Tensor<double, 2, Eigen::RowMajor>>(x.data(), batch, out));
  }
  bn.eval();
  const auto W = testing::random_vector<double>(out * fan_in, -1.0, 1.0);
  const auto b = testing::random_vector<double>(out, -3.0, 3.0);
  const auto x = testing::random_vector<double>(batch * fan_in, 2.0, 5.0);
  // The layer, then the batch norm.
  Eigen::Tensor<double, 2, Eigen::RowMajor> z(batch, out);
  for (Index i = 0; i < batch; ++i)
    for (Index o = 0; o < out; ++o) {
      double sum = b[std::size_t(o)];
      for (Index k = 0; k < fan_in; ++k)
        sum += W[std::size_t(o * fan_in + k)] * x[std::size_t(i * fan_in + k)];
      z(i, o) = sum;
    }
  const Eigen::Tensor<double, 2, Eigen::RowMajor> expected = bn.infer(z);
  // The folded layer alone.
  auto Wf = W;
  auto bf = b;
  const auto mean_before = bn.running_mean();
  bnorm::fold_into_previous(bn, Wf.data(), fan_in, bf.data());
  for (Index i = 0; i < batch; ++i)
    for (Index o = 0; o < out; ++o) {
      double sum = bf[std::size_t(o)];
      for (Index k = 0; k < fan_in; ++k)
        sum += Wf[std::size_t(o * fan_in + k)] * x[std::size_t(i * fan_in + k)];
      CHECK(sum == Approx(expected(i, o)).epsilon(1e-12).margin(1e-12));
    }
  for (Index c = 0; c < out; ++c) CHECK(bn.running_mean()(c) == mean_before(c));  // unchanged
}

TEST_CASE("fold_into_previous rejects what it cannot fold and writes nothing", "[fold]") {
  bnorm::Options untracked;
  untracked.track_running_stats = false;
  const bnorm::BatchNorm2d<float> without(3, untracked);
  bnorm::BatchNorm2d<float> bn(3);
  std::vector<float> weight(6, 1.5f), bias(3, 0.25f);
  const auto w0 = weight, b0 = bias;
  auto message_of = [&](auto&& call) {
    try {
      call();
    } catch (const std::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string("no exception");
  };
  CHECK(message_of([&] { bnorm::fold_into_previous(without, weight.data(), 2, bias.data()); })
            .find("track_running_stats") != std::string::npos);
  CHECK(message_of([&] { bnorm::fold_into_previous(bn, weight.data(), 0, bias.data()); })
            .find("fan_in >= 1, got 0") != std::string::npos);
  CHECK(message_of([&] { bnorm::fold_into_previous(bn, weight.data(), 2, static_cast<float*>(nullptr)); })
            .find("bias") != std::string::npos);
  bn.running_var()(1) = -1.0f;
  CHECK(message_of([&] { bnorm::fold_into_previous(bn, weight.data(), 2, bias.data()); })
            .find("channel 1") != std::string::npos);
  CHECK(weight == w0);
  CHECK(bias == b0);
}

TEST_CASE("Keras's and Flax's presets, and the biased running variance", "[conventions]") {
  const bnorm::Options keras = bnorm::keras_options(), flax = bnorm::flax_options();
  CHECK(keras.eps == 1e-3);
  CHECK(flax.eps == 1e-5);
  for (const bnorm::Options& o : {keras, flax}) {
    CHECK(o.momentum == 0.01);  // Keras's and Flax's momentum 0.99 is the weight of the old value
    CHECK(o.running_variance == bnorm::RunningVariance::Biased);
    CHECK(o.affine);
    CHECK(o.track_running_stats);
  }
  CHECK(bnorm::Options{}.running_variance == bnorm::RunningVariance::Unbiased);

  // One training step on (N, C) data, written out: the running variance averages the variance
  // that normalized, not n / (n - 1) times it.
  const Index N = 5, C = 3;
  const reference::Shape sh{N, C, 1, bnorm::Layout::ChannelsFirst};
  const auto x = testing::random_input<double>(sh);
  Eigen::TensorMap<const Eigen::Tensor<double, 2, Eigen::RowMajor>> xm(x.data(), N, C);
  bnorm::BatchNorm1d<double> biased(C, keras), unbiased(C);
  biased.forward(xm);
  unbiased.forward(xm);
  for (Index c = 0; c < C; ++c) {
    double mean = 0, m2 = 0;
    for (Index i = 0; i < N; ++i) mean += x[std::size_t(i * C + c)] / double(N);
    for (Index i = 0; i < N; ++i) m2 += std::pow(x[std::size_t(i * C + c)] - mean, 2);
    // (A margin too: a mean near 0, summed in another order, is off by far more than 1e-13 of
    // itself; one run of the suite met such a mean.)
    CHECK(biased.running_mean()(c) == Approx(0.01 * mean).epsilon(1e-13).margin(1e-15));
    CHECK(biased.running_var()(c) == Approx(0.99 + 0.01 * m2 / double(N)).epsilon(1e-13));
    CHECK(unbiased.running_var()(c) == Approx(0.9 + 0.1 * m2 / double(N - 1)).epsilon(1e-13));
  }
}

namespace {

using Tensor2 = Eigen::Tensor<double, 2, Eigen::RowMajor>;
using Tensor4 = Eigen::Tensor<double, 4, Eigen::RowMajor>;

/// sum(y * g) of a forward: its gradient with respect to x is backward(g).
double loss(bnorm::BatchNorm2d<double>& bn, const Tensor4& x, const Tensor4& g) {
  const Tensor4 y = bn.forward(x);
  double sum = 0;
  for (Index i = 0; i < y.size(); ++i) sum += y.data()[i] * g.data()[i];
  return sum;
}

}  // namespace

TEST_CASE("Batch Renormalization: finite differences where r and d are clipped", "[renorm]") {
  // Running statistics far from the batch's clip every channel's r (sigma_B / sigma < 1 / rmax)
  // and d: there, r and d are constant, and the true gradient is the stop-gradient one.
  // Momentum 0 keeps the running statistics where they are from one forward to the next.
  bnorm::Options o;
  o.renorm = bnorm::Renorm{2.0, 1.5};
  o.momentum = 0.0;
  const Index C = 3;
  bnorm::BatchNorm2d<double> bn(C, o);
  for (Index c = 0; c < C; ++c) {
    bn.running_mean()(c) = c % 2 ? 40.0 : -40.0;
    bn.running_var()(c) = 400.0;
    bn.weight()(c) = 0.5 + double(c);
    bn.bias()(c) = 0.25 * double(c);
  }
  const reference::Shape sh{4, C, 6, bnorm::Layout::ChannelsFirst};
  // A batch spread of at most 3 (sigma_B / sigma < 3 / 20, below 1 / rmax) and means within 3
  // of 0 (|mu_B - mu| / sigma > 1.85, above dmax).
  const auto xv = testing::random_vector<double>(sh.size(), -3.0, 3.0);
  const auto gv = testing::random_vector<double>(sh.size(), -1.0, 1.0);
  Tensor4 x(4, C, 2, 3), g(4, C, 2, 3);
  std::copy(xv.begin(), xv.end(), x.data());
  std::copy(gv.begin(), gv.end(), g.data());
  loss(bn, x, g);
  const Tensor4 dx = bn.backward(g);
  const std::vector<double> grad_weight = testing::values(bn.grad_weight());
  const std::vector<double> grad_bias = testing::values(bn.grad_bias());
  const double h = 1e-6;
  for (Index i = 0; i < x.size(); i += 5) {
    Tensor4 up = x, down = x;
    up.data()[i] += h;
    down.data()[i] -= h;
    const double numeric = (loss(bn, up, g) - loss(bn, down, g)) / (2 * h);
    // (The central difference of a loss of magnitude ~10 at h = 1e-6 carries ~1e-9 of rounding.)
    CHECK(dx.data()[i] == Approx(numeric).epsilon(1e-5).margin(1e-7));
  }
  for (Index c = 0; c < C; ++c) {
    auto nudge = [&](double& p) {
      const double p0 = p;
      p = p0 + h;
      const double up = loss(bn, x, g);
      p = p0 - h;
      const double down = loss(bn, x, g);
      p = p0;
      return (up - down) / (2 * h);
    };
    CHECK(grad_weight[std::size_t(c)] == Approx(nudge(bn.weight()(c))).epsilon(1e-5).margin(1e-7));
    CHECK(grad_bias[std::size_t(c)] == Approx(nudge(bn.bias()(c))).epsilon(1e-5).margin(1e-7));
  }
}

TEST_CASE("Batch Renormalization with rmax 1 and dmax 0 is batch norm, bit for bit", "[renorm]") {
  bnorm::Options o;
  o.renorm = bnorm::Renorm{1.0, 0.0};
  bnorm::BatchNorm1d<float> renorm(5, o), plain(5);
  const reference::Shape sh{7, 5, 1, bnorm::Layout::ChannelsFirst};
  for (int step = 0; step < 2; ++step) {
    const auto x = testing::random_input<float>(sh), dy = testing::random_input<float>(sh, 1.0);
    Eigen::TensorMap<const Eigen::Tensor<float, 2, Eigen::RowMajor>> xm(x.data(), 7, 5),
        dym(dy.data(), 7, 5);
    const Eigen::Tensor<float, 2, Eigen::RowMajor> y1 = renorm.forward(xm), y2 = plain.forward(xm);
    const Eigen::Tensor<float, 2, Eigen::RowMajor> d1 = renorm.backward(dym), d2 = plain.backward(dym);
    CHECK(std::equal(y1.data(), y1.data() + y1.size(), y2.data()));
    CHECK(std::equal(d1.data(), d1.data() + d1.size(), d2.data()));
  }
  CHECK(testing::values(renorm.grad_weight()) == testing::values(plain.grad_weight()));
  CHECK(testing::values(renorm.running_var()) == testing::values(plain.running_var()));
}

TEST_CASE("Batch Renormalization: bad bounds and combinations are errors", "[renorm][errors]") {
  bnorm::Options o;
  o.renorm = bnorm::Renorm{0.5, 1.0};
  CHECK_THROWS_WITH(bnorm::BatchNorm2d<float>(3, o),
                    Catch::Contains("expected renorm's rmax >= 1 and dmax >= 0") &&
                        Catch::Contains("rmax 0.5"));
  o.renorm = bnorm::Renorm{2.0, -1.0};
  CHECK_THROWS_WITH(bnorm::BatchNorm2d<float>(3, o), Catch::Contains("dmax -1"));
  o.renorm = bnorm::Renorm{std::numeric_limits<double>::quiet_NaN(), 1.0};
  CHECK_THROWS_AS(bnorm::BatchNorm2d<float>(3, o), std::invalid_argument);
  o.renorm = bnorm::Renorm{};
  o.track_running_stats = false;
  CHECK_THROWS_WITH(bnorm::BatchNorm2d<float>(3, o), Catch::Contains("needs track_running_stats"));
  o.track_running_stats = true;
  o.virtual_batch_size = 4;
  CHECK_THROWS_WITH(bnorm::BatchNorm2d<float>(3, o), Catch::Contains("not supported"));
}
