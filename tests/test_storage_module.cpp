// BatchNorm of Eigen::bfloat16 tensors (issue 27): parameters, statistics and gradients in float,
// and every step the float module's on the same values, rounded to 16 bits. The modules' code is
// the same for both 16-bit types; only the kernels' loads and stores differ, and test_storage.cpp
// checks those for Eigen::half too, at every vector width. Instantiating the modules for half as
// well doubled this unit's build time.

#include "util.hpp"

using testing::Index;

namespace {

template <class S, int R>
Eigen::Tensor<S, R, Eigen::RowMajor> narrowed(const Eigen::Tensor<float, R, Eigen::RowMajor>& t) {
  return t.template cast<S>();
}

/// Each value of `got` is the float value at the same place rounded to S.
template <class S, int R>
void check_rounded(const Eigen::Tensor<S, R, Eigen::RowMajor>& got,
                   const Eigen::Tensor<float, R, Eigen::RowMajor>& from, const char* what) {
  REQUIRE(got.size() == from.size());
  for (Index i = 0; i < got.size(); ++i) {
    const float g = static_cast<float>(got.data()[i]), e = static_cast<float>(S(from.data()[i]));
    if (!(g == e || (std::isnan(g) && std::isnan(e)))) {
      INFO(what << "[" << i << "]: got " << g << ", expected " << from.data()[i] << " rounded, " << e);
      REQUIRE(false);
    }
  }
}

void check_same(const Eigen::Tensor<float, 1>& a, const Eigen::Tensor<float, 1>& b,
                const char* what) {
  INFO(what);
  REQUIRE(testing::same_bits(testing::values(a), testing::values(b)));
}

template <class S>
void run_steps(const bnorm::Options& o, bool channels_last) {
  using Tensor = Eigen::Tensor<float, 4, Eigen::RowMajor>;
  const Index N = 7, C = 5, H = 6, W = 9;
  const Eigen::DSizes<Index, 4> dims =
      channels_last ? Eigen::DSizes<Index, 4>(N, H, W, C) : Eigen::DSizes<Index, 4>(N, C, H, W);
  bnorm::BatchNorm2d<S> bn(C, o);
  bnorm::BatchNorm2d<float> ref(C, o);
  static_assert(std::is_same_v<typename std::decay_t<decltype(bn.weight())>::Scalar, float>);
  static_assert(std::is_same_v<typename std::decay_t<decltype(bn.running_var())>::Scalar, float>);
  const auto w = testing::random_vector<float>(C, 0.5, 2.0);
  for (Index c = 0; c < C; ++c) bn.weight()(c) = ref.weight()(c) = w[std::size_t(c)];
  for (int step = 0; step < 3; ++step) {
    if (step == 2) {
      bn.eval();
      ref.eval();
    }
    Tensor x(dims), z(dims), dy(dims);
    x.setRandom();
    x = x * 3.0f + 2.0f;
    z.setRandom();
    dy.setRandom();
    // The float module takes the 16-bit values, widened.
    const auto xs = narrowed<S>(x), zs = narrowed<S>(z), dys = narrowed<S>(dy);
    x = xs.template cast<float>();
    z = zs.template cast<float>();
    dy = dys.template cast<float>();
    Eigen::Tensor<S, 4, Eigen::RowMajor> y(dims), dx(dims), dz(dims);
    y.setConstant(S(std::numeric_limits<float>::quiet_NaN()));
    dx.setConstant(S(std::numeric_limits<float>::quiet_NaN()));
    dz.setConstant(S(std::numeric_limits<float>::quiet_NaN()));
    Tensor yf(dims), dxf(dims), dzf(dims);
    bn.forward_add(xs, zs, y);
    ref.forward_add(x, z, yf);
    check_rounded(y, yf, "y");
    bn.backward_add(dys, dx, dz);
    ref.backward_add(dy, dxf, dzf);
    check_rounded(dx, dxf, "dx");
    check_rounded(dz, dzf, "dz");
    check_rounded(bn.infer(xs), ref.infer(x), "infer");
    check_same(bn.grad_weight(), ref.grad_weight(), "grad_weight");
    check_same(bn.grad_bias(), ref.grad_bias(), "grad_bias");
    check_same(bn.running_mean(), ref.running_mean(), "running_mean");
    check_same(bn.running_var(), ref.running_var(), "running_var");
  }
  CHECK(bn.num_batches_tracked() == ref.num_batches_tracked());
}

}  // namespace

TEMPLATE_TEST_CASE("storage: a BatchNorm of 16-bit tensors is the float one's steps, rounded",
                   "[storage][module]", Eigen::bfloat16) {
  using S = TestType;
  bnorm::Options relu;
  relu.activation = bnorm::Activation::ReLU;
  bnorm::Options ghost = relu;
  ghost.virtual_batch_size = 3;
  bnorm::Options renorm;
  renorm.renorm = bnorm::Renorm{1.5, 0.5};
  bnorm::Options keras = bnorm::keras_options();
  for (bool last : {false, true}) {
    for (auto [name, o] : {std::pair{"plain", bnorm::Options{}}, std::pair{"relu", relu},
                           std::pair{"ghost", ghost}, std::pair{"renorm", renorm},
                           std::pair{"keras", keras}}) {
      INFO(name << (last ? ", channels last" : ", channels first"));
      o.layout = last ? bnorm::Layout::ChannelsLast : bnorm::Layout::ChannelsFirst;
      run_steps<S>(o, last);
    }
  }
}

TEMPLATE_TEST_CASE("storage: a BatchNorm of 16-bit tensors rejects bad input and keeps its state",
                   "[storage][module]", Eigen::bfloat16) {
  using S = TestType;
  bnorm::BatchNorm2d<S> bn(4);
  Eigen::Tensor<S, 4, Eigen::RowMajor> x(2, 3, 5, 5), one(1, 4, 1, 1);
  x.setConstant(S(1.0f));
  one.setConstant(S(2.0f));
  const auto mean = testing::values(bn.running_mean());
  REQUIRE_THROWS_AS(bn.forward(x), std::invalid_argument);
  REQUIRE_THROWS_AS(bn.forward(one), std::invalid_argument);
  REQUIRE(testing::same_bits(testing::values(bn.running_mean()), mean));
  REQUIRE(bn.num_batches_tracked() == 0);
}

namespace {
struct OneRank : bnorm::Communicator {
  void allreduce_sum(double*, std::ptrdiff_t) override {}
  int rank() const override { return 0; }
  int size() const override { return 1; }
};
}  // namespace

TEMPLATE_TEST_CASE("storage: a SyncBatchNorm of 16-bit tensors on one rank is the BatchNorm",
                   "[storage][module]", Eigen::bfloat16) {
  using S = TestType;
  using Tensor = Eigen::Tensor<S, 4, Eigen::RowMajor>;
  OneRank one;
  bnorm::SyncBatchNorm2d<S> synced(3, {}, one);
  bnorm::BatchNorm2d<S> plain(3);
  Tensor x(4, 3, 5, 7), dy(4, 3, 5, 7);
  x.setRandom();
  dy.setRandom();
  const Tensor ys = synced.forward(x), yp = plain.forward(x);
  const Tensor dxs = synced.backward(dy), dxp = plain.backward(dy);
  for (Index i = 0; i < x.size(); ++i) {
    REQUIRE(static_cast<float>(ys.data()[i]) == static_cast<float>(yp.data()[i]));
    REQUIRE(static_cast<float>(dxs.data()[i]) == static_cast<float>(dxp.data()[i]));
  }
  REQUIRE(testing::same_bits(testing::values(synced.running_var()), testing::values(plain.running_var())));
  REQUIRE(testing::same_bits(testing::values(synced.grad_weight()), testing::values(plain.grad_weight())));
}
