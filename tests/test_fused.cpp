// The fused epilogues of BatchNorm's elementwise pass: ReLU (Options::activation) and the
// residual add (forward_add / backward_add), against PyTorch (fixtures/pytorch_fused.txt, from
// fixtures/generate_fused.py), against the reference module, and against finite differences.

#include <fstream>
#include <map>

#include "util.hpp"

using testing::Index;
using Tensor4 = Eigen::Tensor<double, 4, Eigen::RowMajor>;

namespace {

struct FusedStep {
  bool training = true;
  std::map<std::string, std::vector<double>> arrays;
};

struct FusedCase {
  std::string kind, layout;
  std::array<Index, 4> nchw{};
  std::vector<double> weight, bias;
  std::vector<FusedStep> steps;
};

std::vector<FusedCase> load_fused() {
  std::vector<FusedCase> cases;
  for (const testing::FixtureCase& f : testing::read_fixtures("pytorch_fused.txt")) {
    FusedCase c;
    c.kind = f.key("kind");
    c.layout = f.key("layout");
    const std::vector<Index> dims = f.sizes("dims");
    REQUIRE(dims.size() == 4);
    std::copy(dims.begin(), dims.end(), c.nchw.begin());
    c.weight = f.arrays.at("weight");
    c.bias = f.arrays.at("bias");
    for (const testing::FixtureStep& step : f.steps) c.steps.push_back({step.mode == "train", step.arrays});
    cases.push_back(std::move(c));
  }
  return cases;
}

template <class T>
std::vector<T> narrow(const std::vector<double>& v) {
  return std::vector<T>(v.begin(), v.end());
}

template <class T>
void run_fused_case(const FusedCase& k) {
  using Tensor = Eigen::Tensor<T, 4, Eigen::RowMajor>;
  using Map = Eigen::TensorMap<const Tensor>;
  const bool last = k.layout == "nhwc";
  const Index N = k.nchw[0], C = k.nchw[1], H = k.nchw[2], W = k.nchw[3];
  const Eigen::DSizes<Index, 4> dims = last ? Eigen::DSizes<Index, 4>(N, H, W, C)
                                            : Eigen::DSizes<Index, 4>(N, C, H, W);
  bnorm::Options o;
  o.layout = last ? bnorm::Layout::ChannelsLast : bnorm::Layout::ChannelsFirst;
  o.activation = k.kind == "add" ? bnorm::Activation::None : bnorm::Activation::ReLU;
  const bool add = k.kind != "relu";
  bnorm::BatchNorm2d<T> bn(C, o);
  for (Index c = 0; c < C; ++c) {
    bn.weight()(c) = T(k.weight[std::size_t(c)]);
    bn.bias()(c) = T(k.bias[std::size_t(c)]);
  }
  for (const FusedStep& step : k.steps) {
    INFO((step.training ? "train" : "eval"));
    bn.train(step.training);
    const auto& a = step.arrays;
    const std::vector<T> x = narrow<T>(a.at("x")), dy = narrow<T>(a.at("dy"));
    Tensor y(dims), dx(dims), dz(dims);
    y.setConstant(T(-7));  // poisoned: every value must be written
    dx.setConstant(T(-7));
    dz.setConstant(T(-7));
    if (add) {
      const std::vector<T> z = narrow<T>(a.at("z"));
      bn.forward_add(Map(x.data(), dims), Map(z.data(), dims), y);
      bn.backward_add(Map(dy.data(), dims), dx, dz);
      testing::check_close(std::vector<T>(dz.data(), dz.data() + dz.size()), a.at("dz"), "dz");
    } else {
      bn.forward(Map(x.data(), dims), y);
      bn.backward(Map(dy.data(), dims), dx);
    }
    testing::check_close(std::vector<T>(y.data(), y.data() + y.size()), a.at("y"), "y");
    testing::check_close(std::vector<T>(dx.data(), dx.data() + dx.size()), a.at("dx"), "dx");
    testing::check_close(testing::values(bn.grad_weight()), a.at("grad_weight"), "grad_weight");
    testing::check_close(testing::values(bn.grad_bias()), a.at("grad_bias"), "grad_bias");
    testing::check_close(testing::values(bn.running_mean()), a.at("running_mean"), "running_mean");
    testing::check_close(testing::values(bn.running_var()), a.at("running_var"), "running_var");
  }
}

/// relu(v), where relu is on.
double act(double v, bool relu) { return relu && !(v > 0) && !std::isnan(v) ? 0.0 : v; }

}  // namespace

TEMPLATE_TEST_CASE("fused ReLU and residual add follow PyTorch", "[fused][fixtures]", float,
                   double) {
  const auto cases = load_fused();
  REQUIRE(cases.size() == 6);
  for (const auto& k : cases) {
    INFO(k.kind << " " << k.layout);
    REQUIRE(k.steps.size() == 3);
    run_fused_case<TestType>(k);
  }
}

TEMPLATE_TEST_CASE("fused ReLU and residual add against the reference, every layout, threads "
                   "and mode", "[fused]", float, double) {
  using T = TestType;
  using Tensor = Eigen::Tensor<T, 3, Eigen::RowMajor>;
  using Map = Eigen::TensorMap<const Tensor>;
  const auto layout = GENERATE(bnorm::Layout::ChannelsFirst, bnorm::Layout::ChannelsLast);
  const bool relu = GENERATE(false, true);
  const bool add = GENERATE(false, true);
  const int workers = GENERATE(0, 2);
  // Short runs, one value per sample and channel (rows taken a few at a time), long runs.
  const Index L = GENERATE(33, 1, 700);
  if (!relu && !add) return;  // plain BatchNorm: test_module.cpp
  CAPTURE(int(layout), relu, add, workers, L);
  const Index N = 5, C = 7;
  const bool last = layout == bnorm::Layout::ChannelsLast;
  const Eigen::DSizes<Index, 3> dims = last ? Eigen::DSizes<Index, 3>(N, L, C)
                                            : Eigen::DSizes<Index, 3>(N, C, L);
  const reference::Shape sh{N, C, L, layout};
  bnorm::Options o;
  o.layout = layout;
  if (relu) o.activation = bnorm::Activation::ReLU;
  bnorm::BatchNorm1d<T> bn(C, o);
  reference::Module ref(C, o);
  const auto w = testing::random_vector<T>(C, 0.5, 2.0), b = testing::random_vector<T>(C, -1, 1);
  for (Index c = 0; c < C; ++c) {
    bn.weight()(c) = w[std::size_t(c)];
    bn.bias()(c) = b[std::size_t(c)];
    ref.weight[std::size_t(c)] = w[std::size_t(c)];
    ref.bias[std::size_t(c)] = b[std::size_t(c)];
  }
  testing::Pool pool(workers);
  for (bool training : {true, true, false}) {
    bn.train(training);
    ref.training = training;
    const auto x = testing::random_input<T>(sh, 2.0), dy = testing::random_input<T>(sh, 1.0);
    const auto z = testing::random_vector<T>(sh.size(), -1.5, 1.5);
    Tensor y(dims), dx(dims), dz(dims);
    y.setConstant(T(-7));
    dz.setConstant(T(-7));
    const Map xm(x.data(), dims), dym(dy.data(), dims), zm(z.data(), dims);
    if (add) {
      if (workers) bn.forward_add(xm, zm, y, *pool.device);
      else bn.forward_add(xm, zm, y);
    } else {
      if (workers) bn.forward(xm, y, *pool.device);
      else bn.forward(xm, y);
    }
    // The reference's batch norm on the gradient the module's output masks (where it is
    // positive), and its y before the epilogue.
    std::vector<T> masked(dy.size());
    for (std::size_t i = 0; i < dy.size(); ++i) masked[i] = !relu || y.data()[i] > 0 ? dy[i] : T(0);
    const auto expected = ref.step(sh, x, masked);
    std::vector<double> expected_y(expected.y.size());
    for (std::size_t i = 0; i < expected_y.size(); ++i)
      expected_y[i] = act(expected.y[i] + (add ? double(z[i]) : 0.0), relu);
    testing::check_close(std::vector<T>(y.data(), y.data() + y.size()), expected_y, "y");
    if (add) {
      if (workers) bn.backward_add(dym, dx, dz, *pool.device);
      else bn.backward_add(dym, dx, dz);
      CHECK(std::vector<T>(dz.data(), dz.data() + dz.size()) == masked);
    } else {
      if (workers) bn.backward(dym, dx, *pool.device);
      else bn.backward(dym, dx);
    }
    testing::check_close(std::vector<T>(dx.data(), dx.data() + dx.size()), expected.dx, "dx");
    testing::check_sum_close(testing::values(bn.grad_weight()), ref.grad_weight,
                             ref.grad_weight_terms, "grad_weight");
    testing::check_sum_close(testing::values(bn.grad_bias()), ref.grad_bias, ref.grad_bias_terms,
                             "grad_bias");
    testing::check_close(testing::values(bn.running_mean()), ref.running_mean, "running_mean");
  }
  // infer applies the activation too, and no residual.
  const auto x = testing::random_input<T>(sh, 2.0);
  bnorm::Options plain_options = o;
  plain_options.activation = bnorm::Activation::None;
  bnorm::BatchNorm1d<T> plain(C, plain_options);
  plain.weight() = bn.weight();
  plain.bias() = bn.bias();
  plain.running_mean() = bn.running_mean();
  plain.running_var() = bn.running_var();
  const Tensor fused = bn.infer(Map(x.data(), dims)), unfused = plain.infer(Map(x.data(), dims));
  for (Index i = 0; i < fused.size(); ++i)
    REQUIRE(fused.data()[i] == T(act(double(unfused.data()[i]), relu)));
}

TEST_CASE("fused add + ReLU: finite differences of x, z and the parameters", "[fused][gradcheck]") {
  bnorm::Options o;
  o.activation = bnorm::Activation::ReLU;
  o.momentum = 0.0;  // the running statistics stay put from one forward to the next
  const Index C = 3;
  bnorm::BatchNorm2d<double> bn(C, o), pre(C);  // pre: the values before the epilogue
  const reference::Shape sh{4, C, 6, bnorm::Layout::ChannelsFirst};
  const auto xv = testing::random_input<double>(sh, 3.0), gv = testing::random_input<double>(sh, 1.0);
  const auto zv = testing::random_vector<double>(sh.size(), -1, 1);
  Tensor4 x(4, C, 2, 3), g(4, C, 2, 3), z(4, C, 2, 3), y(4, C, 2, 3), dx(4, C, 2, 3), dz(4, C, 2, 3);
  std::copy(xv.begin(), xv.end(), x.data());
  std::copy(gv.begin(), gv.end(), g.data());
  std::copy(zv.begin(), zv.end(), z.data());
  for (Index c = 0; c < C; ++c) {
    bn.weight()(c) = pre.weight()(c) = 0.5 + double(c);
    bn.bias()(c) = pre.bias()(c) = 0.3 - 0.2 * double(c);
  }
  auto loss = [&](const Tensor4& xs, const Tensor4& zs) {
    Tensor4 out(xs.dimensions());
    bn.forward_add(xs, zs, out);
    double sum = 0;
    for (Index i = 0; i < out.size(); ++i) sum += out.data()[i] * g.data()[i];
    return sum;
  };
  loss(x, z);
  bn.backward_add(g, dx, dz);
  const Tensor4 before = pre.forward(x);
  const double h = 1e-6;
  // A central difference errs by h^2 times the loss's third derivative, which is large in a
  // channel of small spread: there the gradients are large too (up to 200 here, beside values
  // of 0.04 in the same channel), so the margin is a part of the largest.
  double dx_scale = 0;
  for (Index i = 0; i < dx.size(); ++i) dx_scale = std::max(dx_scale, std::abs(dx.data()[i]));
  Index checked = 0;
  for (Index i = 0; i < x.size(); ++i) {
    // ReLU's kink: skip values within reach of it.
    if (std::abs(before.data()[i] + z.data()[i]) < 1e-3) continue;
    Tensor4 up = x, down = x;
    up.data()[i] += h;
    down.data()[i] -= h;
    CHECK(dx.data()[i] ==
          Approx((loss(up, z) - loss(down, z)) / (2 * h)).epsilon(1e-6).margin(1e-6 * dx_scale));
    Tensor4 zu = z, zd = z;
    zu.data()[i] += h;
    zd.data()[i] -= h;
    CHECK(dz.data()[i] == Approx((loss(x, zu) - loss(x, zd)) / (2 * h)).epsilon(1e-6).margin(1e-7));
    ++checked;
  }
  CHECK(checked > x.size() / 2);
  const std::vector<double> grad_weight = testing::values(bn.grad_weight());
  for (Index c = 0; c < C; ++c) {
    const double w0 = bn.weight()(c);
    bn.weight()(c) = w0 + h;
    const double up = loss(x, z);
    bn.weight()(c) = w0 - h;
    const double down = loss(x, z);
    bn.weight()(c) = w0;
    CHECK(grad_weight[std::size_t(c)] == Approx((up - down) / (2 * h)).epsilon(1e-6));
  }
}

TEST_CASE("forward_add and backward_add: bad shapes and misuse order are errors that change "
          "nothing", "[fused][errors]") {
  using Tensor = Eigen::Tensor<float, 4, Eigen::RowMajor>;
  bnorm::Options o;
  o.activation = bnorm::Activation::ReLU;
  bnorm::BatchNorm2d<float> bn(3, o);
  Tensor x(2, 3, 4, 4), z(2, 3, 4, 4), wrong(2, 3, 4, 5), y(2, 3, 4, 4), dx(2, 3, 4, 4);
  x.setRandom();
  z.setRandom();
  wrong.setRandom();
  CHECK_THROWS_WITH(bn.forward_add(x, wrong, y),
                    "bnorm::BatchNorm2d: expected z of the input's shape [2, 3, 4, 4], got "
                    "[2, 3, 4, 5]");
  CHECK(bn.num_batches_tracked() == 0);
  bn.forward(x, y);
  CHECK_THROWS_WITH(bn.backward_add(x, dx, z),
                    Catch::Contains("backward_add needs the last forward to be forward_add"));
  CHECK(testing::values(bn.grad_weight()) == std::vector<float>(3, 0.0f));
  bn.forward_add(x, z, y);
  CHECK(bn.num_batches_tracked() == 2);
  CHECK_THROWS_WITH(bn.backward_add(x, dx, wrong),
                    Catch::Contains("expected dz of the last forward's input shape"));
  CHECK(testing::values(bn.grad_weight()) == std::vector<float>(3, 0.0f));
  CHECK_NOTHROW(bn.backward_add(x, dx, z));

  // save_input = false: the input given again, with the same result.
  o.save_input = false;
  bnorm::BatchNorm2d<float> given(3, o);
  Tensor y2(2, 3, 4, 4), dx2(2, 3, 4, 4), dz2(2, 3, 4, 4), dy(2, 3, 4, 4), dz(2, 3, 4, 4);
  dy.setRandom();
  bn.forward_add(x, z, y);
  bn.backward_add(dy, dx, dz);
  given.forward_add(x, z, y2);
  given.backward_add(x, dy, dx2, dz2);
  CHECK(std::equal(dx.data(), dx.data() + dx.size(), dx2.data()));
  CHECK(std::equal(dz.data(), dz.data() + dz.size(), dz2.data()));
  CHECK_THROWS_AS(given.backward_add(dy, dx2, dz2), std::logic_error);
}

TEMPLATE_TEST_CASE("functional: a fused forward, relu_backward and backward give the module's "
                   "forward_add and backward_add", "[fused][functional]", float, double) {
  namespace fn = bnorm::functional;
  using T = TestType;
  using Tensor = Eigen::Tensor<T, 3, Eigen::RowMajor>;
  using Map = Eigen::TensorMap<const Tensor>;
  const auto layout = GENERATE(bnorm::Layout::ChannelsFirst, bnorm::Layout::ChannelsLast);
  CAPTURE(int(layout));
  const Index N = 4, C = 5, L = 19;
  const bool last = layout == bnorm::Layout::ChannelsLast;
  const Eigen::DSizes<Index, 3> dims = last ? Eigen::DSizes<Index, 3>(N, L, C)
                                            : Eigen::DSizes<Index, 3>(N, C, L);
  const reference::Shape sh{N, C, L, layout};
  const fn::Shape shape{N, C, L, layout};
  bnorm::Options o;
  o.layout = layout;
  o.activation = bnorm::Activation::ReLU;
  bnorm::BatchNorm1d<T> bn(C, o);
  const auto w = testing::random_vector<T>(C, 0.5, 2.0), b = testing::random_vector<T>(C, -1, 1);
  for (Index c = 0; c < C; ++c) {
    bn.weight()(c) = w[std::size_t(c)];
    bn.bias()(c) = b[std::size_t(c)];
  }
  const auto x = testing::random_input<T>(sh, 2.0), dy = testing::random_input<T>(sh, 1.0);
  const auto z = testing::random_vector<T>(sh.size(), -1.5, 1.5);
  const Map xm(x.data(), dims), dym(dy.data(), dims), zm(z.data(), dims);
  Tensor y(dims), dx(dims), dz(dims);
  bn.forward_add(xm, zm, y);
  bn.backward_add(dym, dx, dz);

  const Index n = sh.size();
  auto fy = testing::poisoned<T>(n), fdz = testing::poisoned<T>(n), fdx = testing::poisoned<T>(n);
  const std::size_t nc = std::size_t(C);
  std::vector<T> mean(nc), invstd(nc), gw(nc), gb(nc);
  std::vector<std::uint8_t> positive(std::size_t(n), 7);  // poisoned: neither 0 nor 1
  fn::forward_training<T>(shape, x.data(), fy.data(), o.eps, {w.data(), b.data()},
                          {mean.data(), invstd.data()}, {}, {},
                          fn::Fused<T>{z.data(), true, positive.data()});
  CHECK(testing::same_bits(fy, std::vector<T>(y.data(), y.data() + n)));
  for (Index i = 0; i < n; ++i) REQUIRE(positive[std::size_t(i)] == (fy[std::size_t(i)] > T(0)));
  fn::relu_backward<T>(n, fy.data(), dy.data(), fdz.data());
  CHECK(testing::same_bits(fdz, std::vector<T>(dz.data(), dz.data() + n)));
  auto from_mask = testing::poisoned<T>(n);
  fn::relu_backward<T>(n, positive.data(), dy.data(), from_mask.data());
  CHECK(testing::same_bits(from_mask, fdz));
  // In place, dy's buffer becoming dz.
  std::vector<T> in_place = dy;
  fn::relu_backward<T>(n, fy.data(), in_place.data(), in_place.data());
  CHECK(testing::same_bits(in_place, fdz));
  fn::backward<T>(shape, fdz.data(), x.data(), fdx.data(), fn::Statistics::Batch, mean.data(),
                  invstd.data(), w.data(), gw.data(), gb.data());
  std::vector<double> module_dx(dx.data(), dx.data() + n);
  // The module centers on the unrounded mean, the functional call on the mean rounded to T.
  testing::check_close(fdx, module_dx, "dx");
  testing::check_close(gb, std::vector<double>(bn.grad_bias().data(), bn.grad_bias().data() + C),
                       "grad_bias");

  CHECK_THROWS_WITH(fn::relu_backward<T>(-1, fy.data(), dy.data(), fdz.data()),
                    Catch::Contains("expected n >= 0, got -1"));
  CHECK_THROWS_WITH(fn::relu_backward<T>(n, static_cast<const T*>(nullptr), dy.data(), fdz.data()),
                    Catch::Contains("y is null"));
  CHECK_NOTHROW(fn::relu_backward<T>(0, static_cast<const T*>(nullptr), nullptr, nullptr));
}

TEST_CASE("fused add + ReLU with Ghost BN: each chunk as a BatchNorm of its own", "[fused][ghost]") {
  using T = float;
  using Tensor = Eigen::Tensor<T, 3, Eigen::RowMajor>;
  using Map = Eigen::TensorMap<const Tensor>;
  const auto layout = GENERATE(bnorm::Layout::ChannelsFirst, bnorm::Layout::ChannelsLast);
  const int workers = GENERATE(0, 2);
  CAPTURE(int(layout), workers);
  const Index N = 7, V = 3, C = 6, L = 5, sample = C * L;  // chunks of 3, 3 and 1 samples
  const bool last = layout == bnorm::Layout::ChannelsLast;
  auto dims = [&](Index n) {
    return last ? Eigen::DSizes<Index, 3>(n, L, C) : Eigen::DSizes<Index, 3>(n, C, L);
  };
  bnorm::Options o;
  o.layout = layout;
  o.activation = bnorm::Activation::ReLU;
  o.track_running_stats = false;
  bnorm::Options ghost_options = o;
  ghost_options.virtual_batch_size = V;
  bnorm::BatchNorm1d<T> ghost(C, ghost_options);
  const auto w = testing::random_vector<T>(C, 0.5, 2.0), b = testing::random_vector<T>(C, -1, 1);
  for (Index c = 0; c < C; ++c) {
    ghost.weight()(c) = w[std::size_t(c)];
    ghost.bias()(c) = b[std::size_t(c)];
  }
  const reference::Shape sh{N, C, L, layout};
  const auto x = testing::random_input<T>(sh, 2.0), dy = testing::random_input<T>(sh, 1.0);
  const auto z = testing::random_vector<T>(sh.size(), -1.5, 1.5);
  testing::Pool pool(workers);
  Tensor y(dims(N)), dx(dims(N)), dz(dims(N));
  const Map xm(x.data(), dims(N)), zm(z.data(), dims(N)), dym(dy.data(), dims(N));
  if (workers) {
    ghost.forward_add(xm, zm, y, *pool.device);
    ghost.backward_add(dym, dx, dz, *pool.device);
  } else {
    ghost.forward_add(xm, zm, y);
    ghost.backward_add(dym, dx, dz);
  }
  for (Index first = 0; first < N; first += V) {
    const Index n = std::min(V, N - first), off = first * sample;
    CAPTURE(first);
    bnorm::BatchNorm1d<T> one(C, o);
    one.weight() = ghost.weight();
    one.bias() = ghost.bias();
    Tensor cy(dims(n)), cdx(dims(n)), cdz(dims(n));
    one.forward_add(Map(x.data() + off, dims(n)), Map(z.data() + off, dims(n)), cy);
    one.backward_add(Map(dy.data() + off, dims(n)), cdx, cdz);
    for (Index i = 0; i < n * sample; ++i) {
      REQUIRE(y.data()[off + i] == cy.data()[i]);
      REQUIRE(dz.data()[off + i] == cdz.data()[i]);
      REQUIRE(dx.data()[off + i] == cdx.data()[i]);
    }
  }
}
