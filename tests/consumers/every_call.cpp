// Every public call of bnorm, float and double, both layouts, every rank: compiled with a
// demanding user's warnings (tests/CMakeLists.txt) so that each kernel the calls instantiate is
// checked, on every instruction set the build compiles it for. Also run: it must work too.
// One unit, which also compiles the kernels' explicit instances (bnorm/instances.hpp).
#define BNORM_INSTANTIATE
#include <bnorm/instances.hpp>

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
  // The fused residual add and ReLU.
  bnorm::Options fused_options = options;
  fused_options.activation = bnorm::Activation::ReLU;
  Module fused(channels, fused_options);
  fused.forward_add(x, dy, y);
  fused.forward_add(x, dy, y, device);
  if (save_input) {
    fused.backward_add(dy, dx, y);
    fused.backward_add(dy, dx, y, device);
  }
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
  fn::forward_inference<Scalar>(shape, x.data(), dx.data(), 1e-5, {weight.data(), bias.data()},
                                running_mean.data(), running_var.data(), ex, {y.data(), true});
  fn::forward_training<Scalar>(shape, x.data(), dx.data(), 1e-5, {}, {}, {}, ex, {y.data(), false});
  for (auto kind : {fn::Statistics::Batch, fn::Statistics::Frozen})
    fn::backward<Scalar>(shape, y.data(), x.data(), dx.data(), kind, mean.data(), invstd.data(),
                         weight.data(), grad.data(), grad.data(), ex);
  const std::string plan = fn::describe_plan<Scalar>(shape, fn::Pass::BackwardFrozen, 2, true);
  return std::isfinite(dx[0]) && !plan.empty();
}

/// The calls every module shares (detail::Module), and what each has of its own.
template <int Rank, class Module>
bool exercise_module(Module& m, const Eigen::array<Eigen::Index, std::size_t(Rank)>& dims,
                     const Eigen::ThreadPoolDevice& device) {
  using Scalar = typename Module::Vector::Scalar;
  using Tensor = Eigen::Tensor<Scalar, Rank, Eigen::RowMajor>;
  Tensor x(dims), dy(dims), y(dims), dx(dims);
  x.setRandom();
  dy.setRandom();
  y = m.forward(x);
  m.forward(x, y, device);
  dx = m.backward(dy);
  m.backward(dy, dx, device);
  m.backward(x, dy, dx);
  m.backward(x, dy, dx, device);
  m.eval();
  const Tensor inferred = m.infer(x);
  m.infer(x, y, device);
  m.train();
  m.zero_grad();
  m.reset_parameters();
  bool finite = m.weight().size() == m.grad_weight().size() && m.options().save_input;
  for (Eigen::Index i = 0; i < x.size(); ++i)
    finite = finite && std::isfinite(inferred.data()[i]) && std::isfinite(dx.data()[i]);
  return finite;
}

template <class Scalar>
bool family_calls(const Eigen::ThreadPoolDevice& device) {
  namespace fn = bnorm::functional;
  bnorm::LayerNorm<Scalar> ln({5, 7});
  bnorm::RMSNorm<Scalar> rn({7});
  bnorm::GroupNormOptions go;
  go.layout = bnorm::Layout::ChannelsLast;
  bnorm::GroupNorm<Scalar> gn(2, 6, go);
  bnorm::InstanceNormOptions io;
  io.affine = io.track_running_stats = true;
  bnorm::InstanceNorm2d<Scalar> in(6, io);
  bnorm::InstanceNorm1d<Scalar> in1(6);
  bnorm::InstanceNorm3d<Scalar> in3(6);
  bool ok = exercise_module<3>(ln, {3, 5, 7}, device) && exercise_module<4>(rn, {2, 3, 5, 7}, device) &&
            exercise_module<4>(gn, {2, 3, 5, 6}, device) &&
            exercise_module<4>(in, {2, 6, 5, 3}, device) &&
            exercise_module<2>(in1, {6, 9}, device) &&
            exercise_module<5>(in3, {2, 6, 2, 3, 3}, device);
  in.reset_running_stats();
  ok = ok && in.num_batches_tracked() == 0 && in.running_mean().size() == 6 &&
       rn.eps() > 0 && ln.normalized_shape().size() == 2 && gn.num_groups() == 2;

  const fn::Shape shape{4, 6, 10, bnorm::Layout::ChannelsFirst};
  std::vector<Scalar> x(240), y(240), dx(240), weight(6, Scalar(1)), bias(6, Scalar(0)),
      mean(24), invstd(24), running_mean(6, Scalar(0)), running_var(6, Scalar(1)), grad(60);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = Scalar(i % 7);
  const fn::Execution<Scalar> ex{&device, nullptr};
  fn::group_norm_forward<Scalar>(shape, 3, x.data(), y.data(), 1e-5,
                                 {weight.data(), bias.data()}, {mean.data(), invstd.data()}, ex);
  fn::group_norm_backward<Scalar>(shape, 3, y.data(), x.data(), dx.data(), mean.data(),
                                  invstd.data(), weight.data(), grad.data(), grad.data(), ex);
  fn::instance_norm_forward<Scalar>(shape, x.data(), y.data(), 1e-5, {}, {mean.data(), invstd.data()},
                                    {running_mean.data(), running_var.data(), 0.1}, ex);
  fn::instance_norm_backward<Scalar>(shape, y.data(), x.data(), dx.data(), mean.data(),
                                     invstd.data(), nullptr, nullptr, nullptr, ex);
  fn::layer_norm_forward<Scalar>(24, 10, x.data(), y.data(), 1e-5, {grad.data(), nullptr},
                                 {mean.data(), invstd.data()}, ex);
  fn::layer_norm_backward<Scalar>(24, 10, y.data(), x.data(), dx.data(), mean.data(),
                                  invstd.data(), nullptr, grad.data(), grad.data() + 10, ex);
  fn::rms_norm_forward<Scalar>(24, 10, x.data(), y.data(), 1e-6, nullptr, invstd.data(), ex);
  fn::rms_norm_backward<Scalar>(24, 10, y.data(), x.data(), dx.data(), invstd.data(), nullptr,
                                nullptr, ex);
  return ok && std::isfinite(dx[0]);
}

/// One process alone: the exchanges change nothing.
struct Solo : bnorm::Communicator {
  void allreduce_sum(double*, std::ptrdiff_t) override {}
  int rank() const override { return 0; }
  int size() const override { return 1; }
};

/// SyncBatchNorm and the functional layer's three steps.
template <class Scalar>
bool sync_calls(const Eigen::ThreadPoolDevice& device) {
  namespace fn = bnorm::functional;
  Solo solo;
  bnorm::SyncBatchNorm2d<Scalar> bn2(3, {}, solo);
  bnorm::SyncBatchNorm1d<Scalar> bn1(3, solo);
  bnorm::SyncBatchNorm3d<Scalar> bn3(3, solo);
  bool ok = exercise_module<4>(bn2, {2, 3, 4, 5}, device) && exercise_module<2>(bn1, {5, 3}, device) &&
            exercise_module<5>(bn3, {2, 3, 2, 2, 3}, device) && &bn2.communicator() == &solo;
  const fn::Shape shape{4, 3, 10, bnorm::Layout::ChannelsLast};
  std::vector<Scalar> x(120), y(120), dx(120), weight(3, Scalar(1)), mean(3), invstd(3);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = Scalar(i % 7);
  const fn::Execution<Scalar> ex{&device, nullptr};
  std::vector<fn::Moments> moments(3);
  std::vector<fn::BackwardSums> sums(3);
  fn::local_moments<Scalar>(shape, x.data(), moments.data(), ex);
  moments[0] = fn::merge(moments[0], fn::Moments{});
  fn::forward_from_moments<Scalar>(shape, moments.data(), x.data(), y.data(), 1e-5,
                                   {weight.data(), nullptr}, {mean.data(), invstd.data()}, {}, ex);
  fn::local_gradient_sums<Scalar>(shape, y.data(), x.data(), mean.data(), sums.data(), ex);
  sums[1] = fn::merge(sums[1], fn::BackwardSums{});
  fn::backward_from_sums<Scalar>(shape, sums.data(), y.data(), x.data(), dx.data(), mean.data(),
                                 invstd.data(), weight.data(), ex);
  return ok && std::isfinite(dx[0]) && moments[2].variance() > 0;
}

/// Eigen matrices: column-major into BatchNorm1d, row-major into LayerNorm.
template <class Scalar>
bool matrix_calls(const Eigen::ThreadPoolDevice& device) {
  using Columns = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;
  using Rows = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  bnorm::BatchNorm1d<Scalar> bn(5);
  Columns x = Columns::Random(9, 5), dy = Columns::Random(9, 5), y(9, 5), dx(9, 5);
  y = bn.forward(x);
  bn.forward(x, y, device);
  dx = bn.backward(dy);
  bn.backward(x, dy, dx, device);
  Eigen::Map<Columns> in_place(y.data(), 9, 5);
  bn.forward(in_place, in_place);
  const Columns inferred = bn.infer(x);
  bnorm::LayerNorm<Scalar> ln({5});
  const Rows rows = Rows::Random(9, 5), row_dy = Rows::Random(9, 5);
  Rows row_y = ln.forward(rows), row_dx = ln.backward(row_dy);
  return std::isfinite(inferred(0, 0)) && std::isfinite(dx(0, 0)) && std::isfinite(row_dx(0, 0));
}

template <class Scalar>
bool every_module(const Eigen::ThreadPoolDevice& device) {
  bool ok = functional_calls<Scalar>(device) && family_calls<Scalar>(device) &&
            matrix_calls<Scalar>(device) && sync_calls<Scalar>(device);
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
