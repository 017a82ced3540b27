// Every public call of bnorm, float and double, both layouts, every rank: compiled with a
// demanding user's warnings (tests/CMakeLists.txt) so that each kernel the calls instantiate is
// checked, on every instruction set the build compiles it for. Also run: it must work too.
#include <bnorm/bnorm.hpp>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

namespace {

template <class Module, int Rank>
bool exercise(const Eigen::array<Eigen::Index, std::size_t(Rank)>& dims, bnorm::Layout layout, bool save_input,
              const Eigen::ThreadPoolDevice& device) {
  using Scalar = typename Module::Vector::Scalar;
  using Tensor = Eigen::Tensor<Scalar, Rank, Eigen::RowMajor>;
  bnorm::Options options = save_input ? bnorm::keras_options() : bnorm::flax_options();
  options.layout = layout;
  options.save_input = save_input;
  const Eigen::Index channels = layout == bnorm::Layout::ChannelsFirst ? dims[1] : dims[Rank - 1];
  Module bn(channels, options);
  Tensor x(dims), dy(dims), y(dims), dx(dims);
  x.setRandom();
  dy.setRandom();
  y = bn.forward(x);
  bn.forward(x, y, device);
  if (save_input) {
    dx = bn.backward(dy);
    bn.backward(dy, dx, device);
  }
  bn.backward(x, dy, dx);
  bn.backward(x, dy, dx, device);
  bn.eval();
  bn.forward(x, y);
  bn.backward(x, dy, dx);
  const Tensor inferred = bn.infer(x);
  bn.infer(x, y, device);
  std::vector<Scalar> layer_weight(std::size_t(channels) * 3, Scalar(1)),
      layer_bias(std::size_t(channels), Scalar(0));
  bnorm::fold_into_previous(bn, layer_weight.data(), 3, layer_bias.data());
  bn.set_num_batches_tracked(bn.num_batches_tracked());
  bn.zero_grad();
  bn.reset_parameters();
  bool finite = true;
  for (Eigen::Index i = 0; i < x.size(); ++i)
    finite = finite && std::isfinite(inferred.data()[i]) && std::isfinite(dx.data()[i]);
  return finite;
}

template <class Scalar>
bool functional_calls(const Eigen::ThreadPoolDevice& device) {
  namespace fn = bnorm::functional;
  const fn::Shape shape{4, 3, 10, bnorm::Layout::ChannelsFirst};
  std::vector<Scalar> x(120), y(120), dx(120), weight(3, Scalar(1)), bias(3, Scalar(0)),
      mean(3), invstd(3), running_mean(3, Scalar(0)), running_var(3, Scalar(1)), grad(3);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = Scalar(i % 7);
  fn::Workspace<Scalar> workspace;
  const fn::Execution<Scalar> ex{&device, &workspace};
  fn::forward_training<Scalar>(shape, x.data(), y.data(), 1e-5, {weight.data(), bias.data()},
                               {mean.data(), invstd.data()},
                               {running_mean.data(), running_var.data(), 0.1}, ex);
  fn::forward_inference<Scalar>(shape, x.data(), y.data(), 1e-5, {weight.data(), bias.data()},
                                running_mean.data(), running_var.data(), ex);
  for (auto kind : {fn::Statistics::Batch, fn::Statistics::Frozen})
    fn::backward<Scalar>(shape, y.data(), x.data(), dx.data(), kind, mean.data(), invstd.data(),
                         weight.data(), grad.data(), grad.data(), ex);
  const std::string plan = fn::describe_plan<Scalar>(shape, fn::Pass::BackwardFrozen, 2, true);
  return std::isfinite(dx[0]) && !plan.empty();
}

template <class Scalar>
bool every_module(const Eigen::ThreadPoolDevice& device) {
  bool ok = functional_calls<Scalar>(device);
  for (auto layout : {bnorm::Layout::ChannelsFirst, bnorm::Layout::ChannelsLast}) {
    for (bool save : {true, false}) {
      ok = ok && exercise<bnorm::BatchNorm1d<Scalar>, 2>({64, 5}, layout, save, device);
      ok = ok && exercise<bnorm::BatchNorm1d<Scalar>, 3>({4, 5, 300}, layout, save, device);
      ok = ok && exercise<bnorm::BatchNorm2d<Scalar>, 4>({4, 5, 9, 9}, layout, save, device);
      ok = ok && exercise<bnorm::BatchNorm3d<Scalar>, 5>({2, 3, 3, 5, 70}, layout, save, device);
    }
  }
  return ok;
}

}  // namespace

int main() {
  Eigen::ThreadPool pool(2);
  Eigen::ThreadPoolDevice device(&pool, 2);
  const bool ok = every_module<float>(device) && every_module<double>(device);
  std::printf("every call of bnorm, float and double: %s\n", ok ? "ok" : "WRONG");
  return ok ? 0 : 1;
}
