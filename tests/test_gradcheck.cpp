// Finite differences: the gradients backward returns are the derivatives of the forward.
// Loss L = sum(y * g) for a random g, so dL/dy = g is what backward receives. Five-point
// central differences in double, for inputs, weights and biases, in training and eval mode.

#include "util.hpp"

using bnorm::Layout;
using testing::Index;

namespace {

template <class Module, int Rank>
void gradcheck(const std::array<Index, Rank>& dims, Layout layout, bool training) {
  using Tensor = Eigen::Tensor<double, Rank, Eigen::RowMajor>;
  bnorm::Options opt;
  opt.layout = layout;
  const Index C = layout == Layout::ChannelsLast ? dims[Rank - 1] : dims[1];
  Module bn(C, opt);
  Eigen::array<Eigen::Index, Rank> edims;
  std::copy(dims.begin(), dims.end(), edims.begin());
  Tensor x(edims), g(edims);
  const reference::Shape flat{edims[0], 1, Index(x.size()) / edims[0], Layout::ChannelsFirst};
  const auto xv = testing::random_input<double>({1, 1, Index(x.size()), Layout::ChannelsFirst});
  const auto gv = testing::random_input<double>(flat, 1.0);
  std::copy(xv.begin(), xv.end(), x.data());
  std::copy(gv.begin(), gv.end(), g.data());
  for (Index c = 0; c < C; ++c) {
    bn.weight()(c) = 0.5 + 0.3 * double(c);
    bn.bias()(c) = 0.1 * double(c) - 0.2;
  }
  // A few training steps give eval mode running statistics that are not the batch's.
  for (int i = 0; i < 3; ++i) bn.forward(Tensor(x * x.constant(1.5) + x.constant(2.0)));
  bn.train(training);

  auto loss = [&](Module m, const Tensor& input) {  // a copy: forward changes running stats
    const Tensor y = m.forward(input);
    const Eigen::Tensor<double, 0, Eigen::RowMajor> l = (y * g).sum();
    return l();
  };
  Module probe = bn;
  probe.forward(x);
  const Tensor dx = probe.backward(g);

  // Five-point central differences: truncation error O(h^4), so that a batch whose spread
  // happens to be small (large higher derivatives) does not make the check flaky.
  const double h = 1e-4, tol = 1e-6;
  auto derivative = [h](auto f) {
    return (f(-2 * h) - 8 * f(-h) + 8 * f(h) - f(2 * h)) / (12 * h);
  };
  for (Index i = 0; i < x.size(); ++i) {
    const double numeric = derivative([&](double step) {
      Tensor moved = x;
      moved.data()[i] += step;
      return loss(bn, moved);
    });
    INFO("dx[" << i << "]");
    CHECK(dx.data()[i] == Approx(numeric).epsilon(tol).margin(tol));
  }
  for (Index c = 0; c < C; ++c) {
    for (int which = 0; which < 2; ++which) {
      const double numeric = derivative([&](double step) {
        Module moved = bn;
        (which == 0 ? moved.weight() : moved.bias())(c) += step;
        return loss(moved, x);
      });
      const double analytic = which == 0 ? probe.grad_weight()(c) : probe.grad_bias()(c);
      INFO((which == 0 ? "grad_weight[" : "grad_bias[") << c << "]");
      CHECK(analytic == Approx(numeric).epsilon(tol).margin(tol));
    }
  }
}

}  // namespace

TEST_CASE("gradients match finite differences", "[gradcheck]") {
  for (bool training : {true, false}) {
    INFO((training ? "training" : "eval"));
    gradcheck<bnorm::BatchNorm2d<double>, 4>({3, 2, 2, 3}, Layout::ChannelsFirst, training);
    gradcheck<bnorm::BatchNorm2d<double>, 4>({2, 3, 2, 3}, Layout::ChannelsLast, training);
    gradcheck<bnorm::BatchNorm1d<double>, 2>({5, 3}, Layout::ChannelsFirst, training);
    gradcheck<bnorm::BatchNorm3d<double>, 5>({2, 2, 1, 2, 3}, Layout::ChannelsFirst, training);
  }
}
