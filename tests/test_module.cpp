// The modules' semantics against the reference module (PyTorch's rules written out plainly):
// every accepted rank and layout, every option, train and eval, running statistics, gradient
// accumulation; then bad input: a clear std::invalid_argument and the module exactly as before.

#include <sstream>

#include "util.hpp"

using bnorm::Layout;
using testing::Index;

namespace {

template <class T>
std::vector<double> values(const Eigen::Tensor<T, 1>& t) {
  return std::vector<double>(t.data(), t.data() + t.size());
}

template <class T>
std::vector<T> raw(const Eigen::Tensor<T, 1>& t) {
  return std::vector<T>(t.data(), t.data() + t.size());
}

/// The module's accumulated gradients, running statistics and count against the reference's.
template <class Module>
void check_state_matches(const Module& bn, const reference::Module& ref) {
  testing::check_sum_close(raw(bn.grad_weight()), ref.grad_weight, ref.grad_weight_terms,
                           "grad_weight");
  testing::check_sum_close(raw(bn.grad_bias()), ref.grad_bias, ref.grad_bias_terms, "grad_bias");
  testing::check_close(raw(bn.running_mean()), ref.running_mean, "running_mean");
  testing::check_close(raw(bn.running_var()), ref.running_var, "running_var");
  CHECK(bn.num_batches_tracked() == ref.num_batches_tracked);
}

/// Runs a sequence of steps on a module and on the reference, comparing everything after each.
template <class Module, int Rank>
void compare_sequence(const std::array<Index, Rank>& dims, const bnorm::Options& opt,
                      int workers) {
  using T = typename Module::Vector::Scalar;
  const bool last = opt.layout == Layout::ChannelsLast;
  const Index C = last ? dims[Rank - 1] : dims[1];
  Index spatial = 1;
  for (int i = 1; i < Rank; ++i)
    if (i != (last ? Rank - 1 : 1)) spatial *= dims[std::size_t(i)];
  const reference::Shape sh{dims[0], C, spatial, opt.layout};

  Module bn(C, opt);
  reference::Module ref(C, opt);
  if (opt.affine) {
    const auto w = testing::random_vector<T>(C, 0.5, 2.0), b = testing::random_vector<T>(C, -1, 1);
    for (Index c = 0; c < C; ++c) {
      bn.weight()(c) = w[c];
      bn.bias()(c) = b[c];
      ref.weight[c] = w[c];
      ref.bias[c] = b[c];
    }
  }
  testing::Pool pool(workers);
  Eigen::array<Eigen::Index, Rank> edims;
  std::copy(dims.begin(), dims.end(), edims.begin());
  const char* modes[] = {"train", "train", "eval", "train", "eval"};
  for (const char* mode : modes) {
    INFO("step " << mode);
    const bool training = std::string(mode) == "train";
    bn.train(training);
    ref.training = training;
    const auto x = testing::random_input<T>(sh), dy = testing::random_input<T>(sh, 1.0);
    const auto expected = ref.step(sh, x, dy);

    Eigen::TensorMap<const Eigen::Tensor<T, Rank, Eigen::RowMajor>> xm(x.data(), edims);
    Eigen::TensorMap<const Eigen::Tensor<T, Rank, Eigen::RowMajor>> dym(dy.data(), edims);
    Eigen::Tensor<T, Rank, Eigen::RowMajor> y, dx;
    if (workers > 0) {
      y = bn.forward(xm, *pool.device);
      dx = bn.backward(dym, *pool.device);
    } else {
      y = bn.forward(xm);
      dx = bn.backward(dym);
    }
    CHECK(y.dimensions() == xm.dimensions());
    testing::check_close(std::vector<T>(y.data(), y.data() + y.size()), expected.y, "y");
    testing::check_close(std::vector<T>(dx.data(), dx.data() + dx.size()), expected.dx, "dx");
    check_state_matches(bn, ref);
    CHECK(bn.is_training() == training);
  }
}

std::vector<bnorm::Options> option_sets(Layout layout) {
  std::vector<bnorm::Options> sets;
  for (bool affine : {true, false})
    for (bool track : {true, false})
      for (std::optional<double> momentum : {std::optional<double>(0.1), std::optional<double>()}) {
        if (!track && !momentum) continue;
        bnorm::Options o;
        o.affine = affine;
        o.track_running_stats = track;
        o.momentum = momentum;
        o.eps = affine ? 1e-5 : 1e-3;
        o.layout = layout;
        // Keras's and Flax's running variance where there is one.
        if (track && !affine) o.running_variance = bnorm::RunningVariance::Biased;
        sets.push_back(o);
        // Batch Renormalization, with bounds that clip some channels' r and d and not others'.
        if (track && momentum) {
          o.renorm = bnorm::Renorm{1.5, 0.5};
          sets.push_back(o);
        }
      }
  return sets;
}

std::string describe(const bnorm::Options& o) {
  std::ostringstream s;
  s << "affine " << o.affine << ", track " << o.track_running_stats << ", momentum "
    << (o.momentum ? std::to_string(*o.momentum) : "none") << ", eps " << o.eps << ", "
    << (o.layout == Layout::ChannelsFirst ? "ChannelsFirst" : "ChannelsLast") << ", "
    << (o.running_variance == bnorm::RunningVariance::Biased ? "biased" : "unbiased")
    << (o.renorm ? ", renorm " + std::to_string(o.renorm->rmax) + " " +
                       std::to_string(o.renorm->dmax)
                 : std::string());
  return s.str();
}

}  // namespace

TEMPLATE_TEST_CASE("every module, rank, layout and option set follows PyTorch's rules",
                   "[module]", float, double) {
  using T = TestType;
  for (Layout layout : {Layout::ChannelsFirst, Layout::ChannelsLast}) {
    for (const auto& opt : option_sets(layout)) {
      INFO(describe(opt));
      const bool last = layout == Layout::ChannelsLast;
      for (int workers : {0, 2}) {
        INFO("workers " << workers);
        compare_sequence<bnorm::BatchNorm1d<T>, 2>({9, 5}, opt, workers);
        compare_sequence<bnorm::BatchNorm1d<T>, 3>(last ? std::array<Index, 3>{3, 7, 5}
                                                        : std::array<Index, 3>{3, 5, 7},
                                                   opt, workers);
        compare_sequence<bnorm::BatchNorm2d<T>, 4>(last ? std::array<Index, 4>{2, 3, 5, 3}
                                                        : std::array<Index, 4>{2, 3, 3, 5},
                                                   opt, workers);
        compare_sequence<bnorm::BatchNorm3d<T>, 5>(last ? std::array<Index, 5>{2, 1, 3, 5, 4}
                                                        : std::array<Index, 5>{2, 4, 1, 3, 5},
                                                   opt, workers);
      }
    }
  }
}

TEST_CASE("accessors, resets and gradient accumulation", "[module]") {
  bnorm::BatchNorm2d<double> bn(3);
  CHECK(bn.num_features() == 3);
  CHECK(bn.options().momentum == 0.1);
  CHECK(bnorm::BatchNorm1d<float>::name() == "BatchNorm1d");
  CHECK(bnorm::BatchNorm3d<float>::name() == "BatchNorm3d");
  CHECK(values(bn.weight()) == std::vector<double>(3, 1.0));
  CHECK(values(bn.bias()) == std::vector<double>(3, 0.0));
  CHECK(values(bn.running_var()) == std::vector<double>(3, 1.0));

  Eigen::Tensor<double, 4, Eigen::RowMajor> x(2, 3, 2, 2), dy(2, 3, 2, 2);
  x.setRandom();
  dy.setRandom();
  bn.forward(x);
  bn.backward(dy);
  const auto once = values(bn.grad_weight());
  bn.forward(x);
  bn.backward(dy);
  for (std::size_t c = 0; c < 3; ++c) CHECK(bn.grad_weight()(c) == Approx(2 * once[c]));
  CHECK(bn.num_batches_tracked() == 2);

  bn.zero_grad();
  CHECK(values(bn.grad_weight()) == std::vector<double>(3, 0.0));
  bn.weight().setConstant(4.0);
  bn.reset_running_stats();
  CHECK(bn.num_batches_tracked() == 0);
  CHECK(values(bn.running_mean()) == std::vector<double>(3, 0.0));
  CHECK(values(bn.weight()) == std::vector<double>(3, 4.0));
  bn.forward(x);
  bn.reset_parameters();
  CHECK(values(bn.weight()) == std::vector<double>(3, 1.0));
  CHECK(bn.num_batches_tracked() == 0);
}

TEST_CASE("caller-owned outputs, in-place forward and TensorMap inputs", "[module]") {
  bnorm::Options opt;
  opt.layout = Layout::ChannelsLast;
  bnorm::BatchNorm2d<float> a(4, opt), b(4, opt);
  Eigen::Tensor<float, 4, Eigen::RowMajor> x(3, 5, 2, 4);
  x.setRandom();
  const Eigen::Tensor<float, 4, Eigen::RowMajor> y = a.forward(x);

  std::vector<float> buffer(std::size_t(x.size()));
  std::copy(x.data(), x.data() + x.size(), buffer.begin());
  Eigen::TensorMap<Eigen::Tensor<float, 4, Eigen::RowMajor>> inplace(buffer.data(), 3, 5, 2, 4);
  b.forward(inplace, inplace);
  CHECK(std::equal(buffer.begin(), buffer.end(), y.data()));
  CHECK(raw(a.running_var()) == raw(b.running_var()));

  // Backward after an in-place forward still sees the original input.
  Eigen::Tensor<float, 4, Eigen::RowMajor> dy(3, 5, 2, 4);
  dy.setRandom();
  const Eigen::Tensor<float, 4, Eigen::RowMajor> dxa = a.backward(dy);
  std::vector<float> dxb(buffer.size());
  b.backward(dy, Eigen::TensorMap<Eigen::Tensor<float, 4, Eigen::RowMajor>>(dxb.data(), 3, 5, 2, 4));
  CHECK(std::equal(dxb.begin(), dxb.end(), dxa.data()));
}

namespace {

template <class T, int Rank>
std::vector<T> raw(const Eigen::Tensor<T, Rank, Eigen::RowMajor>& t) {
  return std::vector<T>(t.data(), t.data() + t.size());
}

/// A module that keeps its input (backward(dy)) and one that does not (backward(x, dy, dx)),
/// through training and eval steps: every output, gradient and running statistic bit for bit.
template <class Module, int Rank>
void compare_saved_and_given(const std::array<Index, Rank>& dims, Layout layout, int workers) {
  using T = typename Module::Vector::Scalar;
  using Tensor = Eigen::Tensor<T, Rank, Eigen::RowMajor>;
  const Index C = layout == Layout::ChannelsLast ? dims[Rank - 1] : dims[1];
  bnorm::Options keep, give;
  keep.layout = give.layout = layout;
  give.save_input = false;
  Module saved(C, keep), given(C, give);
  for (Index c = 0; c < C; ++c) {
    saved.weight()(c) = given.weight()(c) = T(0.5 + 0.1 * double(c));
    saved.bias()(c) = given.bias()(c) = T(0.2 * double(c) - 0.3);
  }
  testing::Pool pool(workers);
  Eigen::array<Eigen::Index, Rank> edims;
  std::copy(dims.begin(), dims.end(), edims.begin());
  for (bool training : {true, true, false, true}) {
    INFO((training ? "train" : "eval") << ", workers " << workers);
    saved.train(training);
    given.train(training);
    Tensor x(edims), dy(edims);
    x.setRandom();
    x = x * T(3) + T(7);  // non-zero means
    dy.setRandom();
    Tensor ys(edims), yg(edims), dxs(edims), dxg(edims);
    yg.setConstant(std::numeric_limits<T>::quiet_NaN());
    dxg.setConstant(std::numeric_limits<T>::quiet_NaN());
    if (workers > 0) {
      saved.forward(x, ys, *pool.device);
      given.forward(x, yg, *pool.device);
      saved.backward(dy, dxs, *pool.device);
      given.backward(x, dy, dxg, *pool.device);
    } else {
      saved.forward(x, ys);
      given.forward(x, yg);
      saved.backward(dy, dxs);
      given.backward(x, dy, dxg);
    }
    CHECK(raw(yg) == raw(ys));
    CHECK(raw(dxg) == raw(dxs));
    CHECK(raw(given.grad_weight()) == raw(saved.grad_weight()));
    CHECK(raw(given.grad_bias()) == raw(saved.grad_bias()));
    CHECK(raw(given.running_mean()) == raw(saved.running_mean()));
    CHECK(raw(given.running_var()) == raw(saved.running_var()));
    CHECK(given.num_batches_tracked() == saved.num_batches_tracked());
    // A module that keeps its input takes it given as well, with the same result (a copy of it:
    // backward adds to the gradients).
    Module copy = saved;
    Tensor again(edims);
    copy.backward(x, dy, again);
    CHECK(raw(again) == raw(dxs));
  }
}

}  // namespace

TEMPLATE_TEST_CASE("save_input = false: backward(x, dy, dx) gives backward(dy)'s bits",
                   "[module]", float, double) {
  for (int workers : {0, 3}) {
    compare_saved_and_given<bnorm::BatchNorm1d<TestType>, 2>({37, 5}, Layout::ChannelsFirst, workers);
    compare_saved_and_given<bnorm::BatchNorm1d<TestType>, 3>({6, 19, 11}, Layout::ChannelsLast, workers);
    compare_saved_and_given<bnorm::BatchNorm2d<TestType>, 4>({4, 7, 9, 13}, Layout::ChannelsFirst, workers);
    compare_saved_and_given<bnorm::BatchNorm3d<TestType>, 5>({2, 3, 5, 4, 17}, Layout::ChannelsLast, workers);
  }
}

TEST_CASE("save_input = false: backward(dy) says how to call it, and changes nothing", "[module][errors]") {
  using Tensor = Eigen::Tensor<float, 4, Eigen::RowMajor>;
  bnorm::Options opt;
  opt.save_input = false;
  bnorm::BatchNorm2d<float> bn(3, opt);
  Tensor x(4, 3, 2, 5), dy(4, 3, 2, 5), dx(4, 3, 2, 5);
  x.setRandom();
  dy.setRandom();
  CHECK_THROWS_WITH(bn.backward(x, dy, dx), "bnorm::BatchNorm2d: backward called before any forward");
  bn.forward(x);
  bn.backward(x, dy, dx);
  bn.forward(x);
  const bnorm::BatchNorm2d<float> before = bn;
  CHECK_THROWS_AS(bn.backward(dy), std::logic_error);
  CHECK_THROWS_WITH(bn.backward(dy, dx),
                    "bnorm::BatchNorm2d: backward(dy) needs the forward's input, which this module "
                    "does not keep (save_input = false): call backward(x, dy, dx) with "
                    "that input");
  Tensor wrong(4, 3, 5, 2);
  wrong.setRandom();
  CHECK_THROWS_WITH(bn.backward(wrong, dy, dx), Catch::Contains("expected x of the last forward's input shape"));
  CHECK_THROWS_WITH(bn.backward(x, dy, wrong), Catch::Contains("expected dx of the last forward's input shape"));
  CHECK(raw(bn.grad_weight()) == raw(before.grad_weight()));
  CHECK(raw(bn.grad_bias()) == raw(before.grad_bias()));
  bnorm::BatchNorm2d<float> untouched = before;
  Tensor a(4, 3, 2, 5), b(4, 3, 2, 5);
  bn.backward(x, dy, a);
  untouched.backward(x, dy, b);
  CHECK(raw(a) == raw(b));
  CHECK(raw(bn.grad_weight()) == raw(untouched.grad_weight()));
}

// ----------------------------------------------------------------------------------------------
// Bad input: a clear error, and the module exactly as it was.

namespace {

/// Everything observable about a module, including what it saved for backward (seen through
/// the dx a backward produces).
template <class Module, int Rank>
struct Snapshot {
  std::vector<float> weight, bias, running_mean, running_var, grad_weight, grad_bias, dx;
  std::int64_t batches;

  Snapshot(Module bn, const Eigen::Tensor<float, Rank, Eigen::RowMajor>& dy)  // a copy
      : weight(raw(bn.weight())), bias(raw(bn.bias())), running_mean(raw(bn.running_mean())),
        running_var(raw(bn.running_var())), grad_weight(raw(bn.grad_weight())),
        grad_bias(raw(bn.grad_bias())), batches(bn.num_batches_tracked()) {
    const Eigen::Tensor<float, Rank, Eigen::RowMajor> d = bn.backward(dy);
    dx.assign(d.data(), d.data() + d.size());
  }
  bool operator==(const Snapshot& o) const {
    return weight == o.weight && bias == o.bias && running_mean == o.running_mean &&
           running_var == o.running_var && grad_weight == o.grad_weight &&
           grad_bias == o.grad_bias && dx == o.dx && batches == o.batches;
  }
};

}  // namespace

TEST_CASE("bad input throws a clear error and changes nothing", "[module][errors]") {
  using BN = bnorm::BatchNorm2d<float>;
  BN bn(3);
  Eigen::Tensor<float, 4, Eigen::RowMajor> x(4, 3, 2, 5), dy(4, 3, 2, 5);
  x.setRandom();
  dy.setRandom();
  bn.forward(x);
  bn.backward(dy);
  bn.forward(x);
  const Snapshot<BN, 4> before(bn, dy);
  auto unchanged = [&] { CHECK(Snapshot<BN, 4>(bn, dy) == before); };

  SECTION("wrong rank") {
    Eigen::Tensor<float, 3, Eigen::RowMajor> bad(4, 3, 10);
    bad.setRandom();
    CHECK_THROWS_AS(bn.forward(bad), std::invalid_argument);
    CHECK_THROWS_WITH(bn.forward(bad),
                      "bnorm::BatchNorm2d: expected 4D input (got 3D input)");
    bnorm::BatchNorm1d<float> one(3);
    Eigen::Tensor<float, 4, Eigen::RowMajor> four(2, 3, 1, 1);
    CHECK_THROWS_WITH(one.forward(four), Catch::Contains("expected 2D or 3D input (got 4D input)"));
  }
  SECTION("wrong channel count, either layout") {
    Eigen::Tensor<float, 4, Eigen::RowMajor> bad(4, 2, 2, 5);
    bad.setRandom();
    CHECK_THROWS_WITH(bn.forward(bad), Catch::Contains("expected 3 channels in dimension 1") &&
                                           Catch::Contains("got input of shape [4, 2, 2, 5]"));
    bnorm::Options opt;
    opt.layout = Layout::ChannelsLast;
    BN last(3, opt);
    CHECK_THROWS_WITH(last.forward(x), Catch::Contains("expected 3 channels in dimension 3 (ChannelsLast)"));
    CHECK(last.num_batches_tracked() == 0);
  }
  SECTION("one value per channel in training: PyTorch's message, nothing counted") {
    Eigen::Tensor<float, 4, Eigen::RowMajor> single(1, 3, 1, 1);
    single.setRandom();
    CHECK_THROWS_WITH(bn.forward(single),
                      "bnorm::BatchNorm2d: Expected more than 1 value per channel when training, "
                      "got input size [1, 3, 1, 1]");
    BN evaluating = bn;
    evaluating.eval();
    CHECK_NOTHROW(evaluating.forward(single));  // eval with running statistics is fine
    bnorm::Options opt;
    opt.track_running_stats = false;
    BN batch_only(3, opt);
    batch_only.eval();
    CHECK_THROWS_AS(batch_only.forward(single), std::invalid_argument);
  }
  SECTION("caller-owned output of another shape") {
    Eigen::Tensor<float, 4, Eigen::RowMajor> y(4, 3, 5, 2);
    CHECK_THROWS_WITH(bn.forward(x, y), Catch::Contains("expected an output of shape [4, 3, 2, 5], got [4, 3, 5, 2]"));
  }
  SECTION("dy of another shape, dx of another shape") {
    Eigen::Tensor<float, 4, Eigen::RowMajor> other(4, 3, 5, 2);
    other.setRandom();
    CHECK_THROWS_WITH(bn.backward(other), Catch::Contains("expected dy of the last forward's input shape [4, 3, 2, 5], got [4, 3, 5, 2]"));
    CHECK_THROWS_WITH(bn.backward(dy, other), Catch::Contains("expected dx of the last forward's input shape [4, 3, 2, 5], got [4, 3, 5, 2]"));
    CHECK_THROWS_WITH(bn.backward(other, dy, x), Catch::Contains("expected x of the last forward's input shape [4, 3, 2, 5], got [4, 3, 5, 2]"));
    CHECK_THROWS_WITH(bn.backward(x, other, x), Catch::Contains("expected dy of the last"));
  }
  SECTION("parameters resized through the accessors") {
    bn.weight().resize(2);
    CHECK_THROWS_WITH(bn.forward(x), Catch::Contains("weight has 2 values, expected 3"));
    CHECK_THROWS_WITH(bn.backward(dy), Catch::Contains("weight has 2 values, expected 3"));
    bn.weight().resize(3);
    bn.weight().setValues({before.weight[0], before.weight[1], before.weight[2]});
    bn.running_var().resize(7);
    CHECK_THROWS_WITH(bn.forward(x), Catch::Contains("running_var has 7 values, expected 3"));
    bn.running_var().resize(3);
    bn.running_var().setValues({before.running_var[0], before.running_var[1], before.running_var[2]});
  }
  SECTION("non-finite input with check_finite") {
    bnorm::Options opt;
    opt.check_finite = true;
    BN strict(3, opt);
    Eigen::Tensor<float, 4, Eigen::RowMajor> bad = x;
    bad(1, 2, 0, 3) = std::numeric_limits<float>::quiet_NaN();
    CHECK_THROWS_WITH(strict.forward(bad), Catch::Contains("non-finite"));
    CHECK(strict.num_batches_tracked() == 0);
    CHECK(raw(strict.running_mean()) == std::vector<float>(3, 0.f));
  }
  unchanged();
}

TEST_CASE("bad options and misuse order", "[module][errors]") {
  bnorm::Options opt;
  opt.eps = -1;
  CHECK_THROWS_WITH(bnorm::BatchNorm2d<float>(3, opt), Catch::Contains("expected eps finite and >= 0"));
  opt.eps = std::numeric_limits<double>::infinity();
  CHECK_THROWS_AS(bnorm::BatchNorm2d<float>(3, opt), std::invalid_argument);
  opt.eps = 1e-5;
  opt.momentum = 1.5;
  CHECK_THROWS_WITH(bnorm::BatchNorm2d<float>(3, opt), Catch::Contains("momentum in [0, 1]"));
  opt.momentum = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_AS(bnorm::BatchNorm2d<float>(3, opt), std::invalid_argument);
  CHECK_THROWS_WITH(bnorm::BatchNorm1d<double>(0), Catch::Contains("expected num_features >= 1, got 0"));

  bnorm::BatchNorm1d<double> bn(2);
  Eigen::Tensor<double, 2, Eigen::RowMajor> dy(3, 2);
  dy.setZero();
  CHECK_THROWS_AS(bn.backward(dy), std::logic_error);
  CHECK_THROWS_WITH(bn.backward(dy), Catch::Contains("backward called before any forward"));
}

TEST_CASE("an empty batch returns an empty output and changes nothing", "[module]") {
  bnorm::BatchNorm2d<float> bn(3);
  Eigen::Tensor<float, 4, Eigen::RowMajor> empty(0, 3, 4, 4);
  const auto y = bn.forward(empty);
  CHECK(y.size() == 0);
  CHECK(bn.num_batches_tracked() == 0);
  CHECK(raw(bn.running_var()) == std::vector<float>(3, 1.f));
}

TEST_CASE("NaN in one channel leaves the other channels untouched", "[module]") {
  for (Layout layout : {Layout::ChannelsFirst, Layout::ChannelsLast}) {
    const bool last = layout == Layout::ChannelsLast;
    bnorm::Options opt;
    opt.layout = layout;
    bnorm::BatchNorm1d<float> clean(4, opt), dirty(4, opt);
    // (N, C, L) = (5, 4, 6) or (N, L, C) = (5, 6, 4)
    Eigen::Tensor<float, 3, Eigen::RowMajor> x(5, last ? 6 : 4, last ? 4 : 6);
    x.setRandom();
    Eigen::Tensor<float, 3, Eigen::RowMajor> bad = x;
    auto channel = [&](Index i, Index j) { return last ? j : i; };
    (last ? bad(1, 3, 2) : bad(1, 2, 3)) = std::numeric_limits<float>::quiet_NaN();
    const auto y = clean.forward(x), yb = dirty.forward(bad);
    for (Index n = 0; n < 5; ++n)
      for (Index i = 0; i < x.dimension(1); ++i)
        for (Index j = 0; j < x.dimension(2); ++j) {
          if (channel(i, j) == 2) CHECK(std::isnan(yb(n, i, j)));
          else CHECK(y(n, i, j) == yb(n, i, j));
        }
    for (Index c = 0; c < 4; ++c) {
      if (c == 2) CHECK(std::isnan(dirty.running_mean()(c)));
      else CHECK(dirty.running_mean()(c) == clean.running_mean()(c));
    }
  }
}

TEMPLATE_TEST_CASE("infer normalizes like eval mode and changes nothing", "[module]", float,
                   double) {
  using T = TestType;
  for (bool track : {true, false}) {
    bnorm::Options opt;
    opt.track_running_stats = track;
    bnorm::BatchNorm2d<T> bn(3, opt);
    Eigen::Tensor<T, 4, Eigen::RowMajor> x(4, 3, 5, 2), other(4, 3, 5, 2);
    x.setRandom();
    other.setRandom();
    for (int i = 0; i < 3; ++i) bn.forward(Eigen::Tensor<T, 4, Eigen::RowMajor>(x * x.constant(T(2))));
    const std::int64_t batches = bn.num_batches_tracked();
    const auto running = raw(bn.running_mean());
    bn.forward(other);  // what backward will use
    const auto dx_before = bn.backward(other);

    const Eigen::Tensor<T, 4, Eigen::RowMajor> inferred = bn.infer(x);  // in train mode
    bnorm::BatchNorm2d<T> copy = bn;
    copy.eval();
    const auto evaluated = copy.forward(x);
    CHECK(std::equal(inferred.data(), inferred.data() + inferred.size(), evaluated.data()));
    Eigen::ThreadPool pool(2);
    Eigen::ThreadPoolDevice device(&pool, 2);
    Eigen::Tensor<T, 4, Eigen::RowMajor> into(4, 3, 5, 2);
    bn.infer(x, into, device);
    CHECK(std::equal(into.data(), into.data() + into.size(), evaluated.data()));

    CHECK(bn.num_batches_tracked() == batches + (track ? 1 : 0));
    if (track) CHECK(raw(bn.running_mean()) != running);  // the forward(other) above moved them
    bn.zero_grad();
    const auto dx_after = bn.backward(other);  // still the saved state of forward(other)
    CHECK(std::equal(dx_after.data(), dx_after.data() + dx_after.size(), dx_before.data()));
    Eigen::Tensor<T, 3, Eigen::RowMajor> bad(4, 3, 10);
    CHECK_THROWS_WITH(bn.infer(bad), Catch::Contains("expected 4D input (got 3D input)"));
  }
}

// --- Eigen matrices ----------------------------------------------------------------------------

namespace {

template <class T, int Order>
using MatrixOf = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Order>;

/// A (samples, features) matrix of the row-major values v, stored in `Order`.
template <class T, int Order>
MatrixOf<T, Order> matrix_of(const std::vector<T>& v, Index rows, Index cols) {
  return Eigen::Map<const MatrixOf<T, Eigen::RowMajor>>(v.data(), rows, cols);
}

/// A matrix's elements in row-major order, as the reference holds them.
template <class M>
std::vector<typename M::Scalar> row_major_values(const M& m) {
  std::vector<typename M::Scalar> v;
  for (Index r = 0; r < m.rows(); ++r)
    for (Index c = 0; c < m.cols(); ++c) v.push_back(m(r, c));
  return v;
}

/// compare_sequence's steps on BatchNorm1d fed (samples, features) matrices stored in `Order`,
/// outputs in caller-owned poisoned matrices and in returned ones.
template <class T, int Order>
void compare_matrix_sequence(Index rows, Index cols, const bnorm::Options& opt, int workers) {
  const reference::Shape sh{rows, cols, 1, Layout::ChannelsFirst};
  bnorm::BatchNorm1d<T> bn(cols, opt);
  reference::Module ref(cols, opt);
  testing::Pool pool(workers);
  for (const char* mode : {"train", "train", "eval", "train"}) {
    INFO("step " << mode);
    const bool training = std::string(mode) == "train";
    bn.train(training);
    ref.training = training;
    const auto x = testing::random_input<T>(sh), dy = testing::random_input<T>(sh, 1.0);
    const auto expected = ref.step(sh, x, dy);
    const MatrixOf<T, Order> xm = matrix_of<T, Order>(x, rows, cols);
    const MatrixOf<T, Order> dym = matrix_of<T, Order>(dy, rows, cols);
    MatrixOf<T, Order> y = MatrixOf<T, Order>::Constant(rows, cols, std::numeric_limits<T>::quiet_NaN());
    MatrixOf<T, Order> dx = y;
    if (workers > 0) {
      bn.forward(xm, y, *pool.device);
      bn.backward(dym, dx, *pool.device);
    } else {
      bn.forward(xm, y);
      bn.backward(dym, dx);
    }
    testing::check_close(row_major_values(y), expected.y, "y");
    testing::check_close(row_major_values(dx), expected.dx, "dx");
    check_state_matches(bn, ref);
    // infer returns a matrix of the input's type, normalized as eval mode does.
    const MatrixOf<T, Order> inferred = bn.infer(xm);
    bnorm::BatchNorm1d<T> copy = bn;
    copy.eval();
    const MatrixOf<T, Order> eval_y = copy.forward(xm);
    CHECK(testing::same_bits(row_major_values(inferred), row_major_values(eval_y)));
  }
}

}  // namespace

TEMPLATE_TEST_CASE("BatchNorm1d takes (samples, features) Eigen matrices in either order",
                   "[module][matrix]", float, double) {
  using T = TestType;
  for (const auto& opt : option_sets(Layout::ChannelsFirst)) {
    INFO(describe(opt));
    for (int workers : {0, 3}) {
      INFO("workers " << workers);
      compare_matrix_sequence<T, Eigen::ColMajor>(37, 5, opt, workers);
      compare_matrix_sequence<T, Eigen::RowMajor>(37, 5, opt, workers);
      compare_matrix_sequence<T, Eigen::ColMajor>(300, 67, opt, workers);
    }
  }
}

TEST_CASE("matrices: no copy, in place through a Map, and clear errors", "[module][matrix]") {
  using ColMatrix = Eigen::MatrixXf;
  using RowMatrix = MatrixOf<float, Eigen::RowMajor>;
  const reference::Shape sh{11, 4, 1, Layout::ChannelsFirst};
  const auto x = testing::random_input<float>(sh);
  // A column-major matrix is the same numbers as a tensor (1, features, samples): the same bits.
  bnorm::BatchNorm1d<float> by_matrix(4), by_tensor(4);
  ColMatrix xm = matrix_of<float, Eigen::ColMajor>(x, 11, 4);
  Eigen::TensorMap<Eigen::Tensor<float, 3, Eigen::RowMajor>> xt(xm.data(), 1, 4, 11);
  const ColMatrix y = by_matrix.forward(xm);
  const Eigen::Tensor<float, 3, Eigen::RowMajor> yt = by_tensor.forward(xt);
  CHECK(testing::same_bits(std::vector<float>(y.data(), y.data() + y.size()),
                           std::vector<float>(yt.data(), yt.data() + yt.size())));
  CHECK(testing::same_bits(raw(by_matrix.running_var()), raw(by_tensor.running_var())));
  // In place through a Map of the caller's buffer.
  std::vector<float> buffer(xm.data(), xm.data() + xm.size());
  Eigen::Map<ColMatrix> in_place(buffer.data(), 11, 4);
  bnorm::BatchNorm1d<float> mapped(4);
  mapped.forward(in_place, in_place);
  CHECK(testing::same_bits(buffer, std::vector<float>(y.data(), y.data() + y.size())));

  // Errors name the matrix's own (samples, features) and change nothing.
  bnorm::BatchNorm1d<float> bn(4);
  bn.forward(xm);
  const auto before = raw(bn.running_mean());
  ColMatrix wrong(11, 5);
  wrong.setRandom();
  CHECK_THROWS_WITH(bn.forward(wrong), "bnorm::BatchNorm1d: expected 4 channels in dimension 1 "
                                       "(ChannelsFirst), got input of shape [11, 5]");
  ColMatrix one_sample(1, 4);
  one_sample.setRandom();
  CHECK_THROWS_WITH(bn.forward(one_sample), "bnorm::BatchNorm1d: Expected more than 1 value per "
                                            "channel when training, got input size [1, 4]");
  ColMatrix wide(12, 4);
  wide.setRandom();
  CHECK_THROWS_WITH(bn.forward(wide.topRows(11)),
                    "bnorm::BatchNorm1d: expected x to be a contiguous matrix (inner stride 1, "
                    "outer stride its inner size), got one of strides [1, 12]");
  CHECK_THROWS_AS(bn.forward(xm, wide.topRows(11)), std::invalid_argument);
  const RowMatrix dy_rows = RowMatrix::Ones(11, 4);
  CHECK_THROWS_WITH(bn.backward(dy_rows),
                    "bnorm::BatchNorm1d: expected dy stored like the last forward's input (a "
                    "column-major matrix), got row-major storage");
  CHECK(testing::same_bits(raw(bn.running_mean()), before));
  const ColMatrix dy_columns = ColMatrix::Ones(11, 4);
  CHECK_NOTHROW(bn.backward(dy_columns));

  // Row-major matrices are PyTorch's (N, C) layout: LayerNorm takes them too.
  bnorm::LayerNorm<float> ln({4});
  const RowMatrix xr = matrix_of<float, Eigen::RowMajor>(x, 11, 4);
  const RowMatrix yr = ln.forward(xr);
  Eigen::TensorMap<const Eigen::Tensor<float, 2, Eigen::RowMajor>> xrt(xr.data(), 11, 4);
  const Eigen::Tensor<float, 2, Eigen::RowMajor> yrt = ln.forward(xrt);
  CHECK(testing::same_bits(std::vector<float>(yr.data(), yr.data() + yr.size()),
                           std::vector<float>(yrt.data(), yrt.data() + yrt.size())));
}

// --- Ghost Batch Normalization ------------------------------------------------------------------

TEMPLATE_TEST_CASE("virtual_batch_size normalizes each chunk of samples as BatchNorm would alone",
                   "[module][ghost]", float, double) {
  using T = TestType;
  for (Layout layout : {Layout::ChannelsFirst, Layout::ChannelsLast}) {
    for (auto variance : {bnorm::RunningVariance::Unbiased, bnorm::RunningVariance::Biased}) {
      for (int workers : {0, 3}) {
        INFO((layout == Layout::ChannelsLast ? "ChannelsLast" : "ChannelsFirst")
             << ", workers " << workers);
        const Index N = 7, V = 3, C = 5, H = 2, W = 3, S = H * W;
        bnorm::Options o;
        o.layout = layout;
        o.virtual_batch_size = V;
        o.running_variance = variance;
        bnorm::BatchNorm2d<T> bn(C, o);
        const auto w = testing::random_vector<T>(C, 0.5, 2), b = testing::random_vector<T>(C, -1, 1);
        bnorm::Options chunk_options = o;
        chunk_options.track_running_stats = false;
        reference::Module ref(C, chunk_options);  // its gradients add up over the chunks
        for (Index c = 0; c < C; ++c) {
          bn.weight()(c) = w[std::size_t(c)];
          bn.bias()(c) = b[std::size_t(c)];
          ref.weight[std::size_t(c)] = w[std::size_t(c)];
          ref.bias[std::size_t(c)] = b[std::size_t(c)];
        }
        const reference::Shape sh{N, C, S, layout};
        const auto x = testing::random_input<T>(sh), dy = testing::random_input<T>(sh, 1.0);
        const std::array<Index, 4> dims = layout == Layout::ChannelsLast
                                              ? std::array<Index, 4>{N, H, W, C}
                                              : std::array<Index, 4>{N, C, H, W};
        Eigen::TensorMap<const Eigen::Tensor<T, 4, Eigen::RowMajor>> xm(x.data(), dims);
        Eigen::TensorMap<const Eigen::Tensor<T, 4, Eigen::RowMajor>> dym(dy.data(), dims);
        testing::Pool pool(workers);
        Eigen::Tensor<T, 4, Eigen::RowMajor> y, dx;
        y = workers ? bn.forward(xm, *pool.device) : bn.forward(xm);
        dx = workers ? bn.backward(dym, *pool.device) : bn.backward(dym);

        std::vector<double> mean_sum(C, 0.0), var_sum(C, 0.0);
        const Index chunks = (N + V - 1) / V;
        for (Index k = 0; k < chunks; ++k) {
          INFO("chunk " << k);
          const Index n = std::min(V, N - k * V), begin = k * V * C * S, end = begin + n * C * S;
          const reference::Shape part{n, C, S, layout};
          const std::vector<T> xk(x.begin() + begin, x.begin() + end),
              dyk(dy.begin() + begin, dy.begin() + end);
          const auto expected = ref.step(part, xk, dyk);
          testing::check_close(std::vector<T>(y.data() + begin, y.data() + end), expected.y, "y");
          testing::check_close(std::vector<T>(dx.data() + begin, dx.data() + end), expected.dx,
                               "dx");
          const auto st = reference::batch_stats(part, xk);
          const double count = double(n * S);
          for (Index c = 0; c < C; ++c) {
            mean_sum[std::size_t(c)] += st.mean[std::size_t(c)];
            var_sum[std::size_t(c)] +=
                st.var[std::size_t(c)] *
                (variance == bnorm::RunningVariance::Unbiased ? count / (count - 1) : 1.0);
          }
        }
        testing::check_sum_close(raw(bn.grad_weight()), ref.grad_weight, ref.grad_weight_terms,
                                 "grad_weight");
        testing::check_sum_close(raw(bn.grad_bias()), ref.grad_bias, ref.grad_bias_terms,
                                 "grad_bias");
        std::vector<double> running_mean(C), running_var(C);
        for (Index c = 0; c < C; ++c) {  // once per forward: momentum 0.1 toward the chunks' mean
          running_mean[std::size_t(c)] = 0.1 * mean_sum[std::size_t(c)] / double(chunks);
          running_var[std::size_t(c)] = 0.9 + 0.1 * var_sum[std::size_t(c)] / double(chunks);
        }
        testing::check_close(raw(bn.running_mean()), running_mean, "running_mean");
        testing::check_close(raw(bn.running_var()), running_var, "running_var");
        CHECK(bn.num_batches_tracked() == 1);

        // Eval is plain BatchNorm's.
        bnorm::Options plain_options = o;
        plain_options.virtual_batch_size = 0;
        bnorm::BatchNorm2d<T> plain(C, plain_options);
        plain.weight() = bn.weight();
        plain.bias() = bn.bias();
        plain.running_mean() = bn.running_mean();
        plain.running_var() = bn.running_var();
        bn.eval();
        plain.eval();
        const Eigen::Tensor<T, 4, Eigen::RowMajor> ye = bn.forward(xm), ype = plain.forward(xm);
        CHECK(testing::same_bits(std::vector<T>(ye.data(), ye.data() + ye.size()),
                                 std::vector<T>(ype.data(), ype.data() + ype.size())));
      }
    }
  }
}

TEST_CASE("virtual_batch_size: bad values and one-value chunks are errors that change nothing",
          "[module][ghost][errors]") {
  bnorm::Options o;
  o.virtual_batch_size = -1;
  CHECK_THROWS_WITH(bnorm::BatchNorm1d<float>(3, o),
                    "bnorm::BatchNorm1d: expected virtual_batch_size >= 0 (0: off), got -1");
  o.virtual_batch_size = 2;
  bnorm::BatchNorm1d<float> bn(3, o);
  Eigen::Tensor<float, 2, Eigen::RowMajor> x(7, 3), fine(8, 3);
  x.setRandom();
  fine.setRandom();
  bn.forward(fine);
  const auto mean = raw(bn.running_mean());
  CHECK_THROWS_WITH(bn.forward(x), "bnorm::BatchNorm1d: Expected more than 1 value per channel in "
                                   "every virtual batch of 2 samples, got input size [7, 3]");
  CHECK(testing::same_bits(raw(bn.running_mean()), mean));
  CHECK(bn.num_batches_tracked() == 1);
  Eigen::MatrixXf columns = Eigen::MatrixXf::Random(8, 3);
  CHECK_THROWS_AS(bn.forward(columns), std::invalid_argument);
  bn.eval();  // eval normalizes the whole batch with the running statistics
  CHECK_NOTHROW(bn.forward(x));
  CHECK_NOTHROW(bn.forward(columns));
  // Without running statistics, infer normalizes the whole batch with its own: no chunks.
  bnorm::Options untracked = o;
  untracked.track_running_stats = false;
  bnorm::BatchNorm1d<float> batch_only(3, untracked);
  CHECK_NOTHROW(batch_only.infer(x));
  CHECK_NOTHROW(batch_only.infer(columns));
  CHECK_THROWS_AS(batch_only.forward(x), std::invalid_argument);
  CHECK_THROWS_AS(batch_only.forward(columns), std::invalid_argument);
}
