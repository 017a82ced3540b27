#pragma once
// BatchNorm1d / BatchNorm2d / BatchNorm3d: PyTorch's nn.BatchNorm*d over Eigen tensors.

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "detail/isa.hpp"
#include "functional.hpp"
#include "options.hpp"

BNORM_BEGIN_NAMESPACE

using Index = std::ptrdiff_t;

namespace detail {

/// Rank, scalar and storage order of an Eigen Tensor or TensorMap (const or not).
template <class X>
struct TensorTraits {
  using Plain = std::remove_cv_t<std::remove_reference_t<X>>;
  using Scalar = std::remove_const_t<typename Eigen::internal::traits<Plain>::Scalar>;
  static constexpr int rank = Plain::NumIndices;
  static constexpr bool row_major = (int(Plain::Layout) == int(Eigen::RowMajor));
};

template <int Rank>
std::string dims_string(const std::array<Index, std::size_t(Rank)>& d) {
  std::string s = "[";
  for (int i = 0; i < Rank; ++i) s += (i ? ", " : "") + std::to_string(d[std::size_t(i)]);
  return s + "]";
}

}  // namespace detail

/// Batch normalization over the channel dimension of tensors of rank MinRank..MaxRank.
/// BatchNorm1d, BatchNorm2d and BatchNorm3d below are the three instances.
///
/// Thread safety: const member functions (infer, the const accessors, options, ...) may run
/// concurrently with each other on one module; forward, backward and every other non-const
/// function need exclusive access to it. Modules share nothing with each other.
template <class Scalar, int MinRank, int MaxRank>
class BatchNorm {
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>,
                "bnorm::BatchNorm supports float and double");

 public:
  using Vector = Eigen::Tensor<Scalar, 1>;

 private:
  template <class Y>
  using NotADevice =
      std::enable_if_t<!std::is_same_v<std::decay_t<Y>, Eigen::ThreadPoolDevice>>;

 public:
  template <int Rank>
  using Output = Eigen::Tensor<Scalar, Rank, Eigen::RowMajor>;

  explicit BatchNorm(Index num_features, Options options = {})
      : num_features_(num_features), options_(std::move(options)) {
    if (num_features < 1) fail("expected num_features >= 1, got " + std::to_string(num_features));
    if (!(options_.eps >= 0) || !std::isfinite(options_.eps))
      fail("expected eps finite and >= 0, got " + std::to_string(options_.eps));
    if (options_.momentum && !(*options_.momentum >= 0 && *options_.momentum <= 1))
      fail("expected momentum in [0, 1] or std::nullopt, got " + std::to_string(*options_.momentum));
    const Index C = num_features;
    if (options_.affine) {
      weight_.resize(C);
      bias_.resize(C);
      grad_weight_.resize(C);
      grad_bias_.resize(C);
      step_grad_weight_.resize(C);
      step_grad_bias_.resize(C);
    }
    if (options_.track_running_stats) {
      running_mean_.resize(C);
      running_var_.resize(C);
    }
    saved_mean_.resize(std::size_t(C));
    saved_invstd_.resize(std::size_t(C));
    reset_parameters();
    zero_grad();
  }

  // --- modes ---------------------------------------------------------------------------------
  void train(bool on = true) { training_ = on; }
  void eval() { training_ = false; }
  bool is_training() const { return training_; }

  // --- forward -------------------------------------------------------------------------------

  /// Normalizes x (a Tensor or TensorMap, RowMajor) into a new tensor of the same dims.
  template <class X>
  auto forward(const X& x) {
    return forward_impl_new(x, nullptr);
  }
  template <class X>
  auto forward(const X& x, const Eigen::ThreadPoolDevice& device) {
    return forward_impl_new(x, &device);
  }
  /// Normalizes x into the caller's y (a TensorMap or Tensor of the same dims; may be x itself).
  template <class X, class Y, class = NotADevice<Y>>
  void forward(const X& x, Y&& y) {
    forward_impl(x, y, nullptr);
  }
  template <class X, class Y>
  void forward(const X& x, Y&& y, const Eigen::ThreadPoolDevice& device) {
    forward_impl(x, y, &device);
  }

  /// Inference that changes nothing and saves nothing for backward: normalizes with the running
  /// statistics whatever the mode (batch statistics when track_running_stats is off). A const
  /// member: any number of threads may call it on one module at once. Also the fastest way to
  /// run a trained model, as nothing is copied for a backward that will not come.
  template <class X>
  auto infer(const X& x) const {
    return infer_new(x, nullptr);
  }
  template <class X>
  auto infer(const X& x, const Eigen::ThreadPoolDevice& device) const {
    return infer_new(x, &device);
  }
  template <class X, class Y, class = NotADevice<Y>>
  void infer(const X& x, Y&& y) const {
    infer_impl(x, y, nullptr);
  }
  template <class X, class Y>
  void infer(const X& x, Y&& y, const Eigen::ThreadPoolDevice& device) const {
    infer_impl(x, y, &device);
  }

  // --- backward ------------------------------------------------------------------------------

  /// Gradient of the loss with respect to the last forward's input, given dy (the gradient with
  /// respect to its output), from the copy of the input the forward kept (Options::save_input).
  /// Adds to grad_weight() and grad_bias().
  template <class DY>
  auto backward(const DY& dy) {
    return backward_impl_new(dy, nullptr);
  }
  template <class DY>
  auto backward(const DY& dy, const Eigen::ThreadPoolDevice& device) {
    return backward_impl_new(dy, &device);
  }
  template <class DY, class DX, class = NotADevice<DX>>
  void backward(const DY& dy, DX&& dx) {
    backward_impl(dy, dx, nullptr);
  }
  template <class DY, class DX>
  void backward(const DY& dy, DX&& dx, const Eigen::ThreadPoolDevice& device) {
    backward_impl(dy, dx, &device);
  }
  /// The same, given the last forward's input x again (its shape is checked; its values must be
  /// what the forward read): copies nothing, whatever Options::save_input is. With save_input =
  /// false, a training step is forward(x, y) then backward(x, dy, dx).
  template <class X, class DY, class DX, class = NotADevice<DX>>
  void backward(const X& x, const DY& dy, DX&& dx) {
    backward_given(x, dy, dx, nullptr);
  }
  template <class X, class DY, class DX>
  void backward(const X& x, const DY& dy, DX&& dx, const Eigen::ThreadPoolDevice& device) {
    backward_given(x, dy, dx, &device);
  }

  // --- parameters and buffers (empty tensors when affine / track_running_stats is off) -------
  Vector& weight() { return weight_; }
  const Vector& weight() const { return weight_; }
  Vector& bias() { return bias_; }
  const Vector& bias() const { return bias_; }
  Vector& running_mean() { return running_mean_; }
  const Vector& running_mean() const { return running_mean_; }
  Vector& running_var() { return running_var_; }
  const Vector& running_var() const { return running_var_; }
  Vector& grad_weight() { return grad_weight_; }
  const Vector& grad_weight() const { return grad_weight_; }
  Vector& grad_bias() { return grad_bias_; }
  const Vector& grad_bias() const { return grad_bias_; }
  std::int64_t num_batches_tracked() const { return num_batches_tracked_; }
  /// Sets the count of training forwards (as loading a state does). Must be >= 0.
  void set_num_batches_tracked(std::int64_t n) {
    if (n < 0) fail("expected num_batches_tracked >= 0, got " + std::to_string(n));
    num_batches_tracked_ = n;
  }

  void zero_grad() {
    grad_weight_.setZero();
    grad_bias_.setZero();
  }
  void reset_running_stats() {
    running_mean_.setZero();
    running_var_.setConstant(Scalar(1));
    num_batches_tracked_ = 0;
  }
  void reset_parameters() {
    reset_running_stats();
    weight_.setConstant(Scalar(1));
    bias_.setZero();
  }

  Index num_features() const { return num_features_; }
  const Options& options() const { return options_; }

  /// "BatchNorm1d", "BatchNorm2d" or "BatchNorm3d".
  static std::string name() { return "BatchNorm" + std::to_string(MaxRank - 2) + "d"; }

 private:
  [[noreturn]] static void fail(const std::string& what) {
    throw std::invalid_argument("bnorm::" + name() + ": " + what);
  }

  template <int Rank>
  static std::array<Index, std::size_t(Rank)> dims_of(const Eigen::DSizes<Index, Rank>& d) {
    std::array<Index, std::size_t(Rank)> a{};
    for (int i = 0; i < Rank; ++i) a[std::size_t(i)] = d[std::size_t(i)];
    return a;
  }

  template <class X>
  static constexpr void check_type() {
    using TT = detail::TensorTraits<X>;
    static_assert(std::is_same_v<typename TT::Scalar, Scalar>,
                  "bnorm: the tensor's scalar type differs from the module's");
    static_assert(TT::row_major, "bnorm: tensors must be Eigen::RowMajor (PyTorch's order)");
  }

  static std::string rank_expectation() {
    if (MinRank == MaxRank) return std::to_string(MinRank) + "D";
    return std::to_string(MinRank) + "D or " + std::to_string(MaxRank) + "D";
  }

  /// Checks an input's rank and channel count; returns its shape for the kernels.
  template <int Rank>
  functional::Shape shape_of(const std::array<Index, std::size_t(Rank)>& d) const {
    if (Rank < MinRank || Rank > MaxRank)
      fail("expected " + rank_expectation() + " input (got " + std::to_string(Rank) + "D input)");
    const bool last = options_.layout == Layout::ChannelsLast;
    const int channel_dim = last ? Rank - 1 : 1;
    const Index C = d[std::size_t(channel_dim)];
    if (C != num_features_)
      fail("expected " + std::to_string(num_features_) + " channels in dimension " +
           std::to_string(channel_dim) + (last ? " (ChannelsLast)" : " (ChannelsFirst)") +
           ", got input of shape " + detail::dims_string<Rank>(d));
    Index spatial = 1;
    for (int i = 1; i < Rank; ++i)
      if (i != channel_dim) spatial *= d[std::size_t(i)];
    return {d[0], C, spatial, options_.layout};
  }

  /// Parameters and buffers must still have num_features values (the accessors let a caller
  /// resize them).
  void check_state() const {
    auto check = [&](const Vector& v, bool present, const char* what) {
      const Index want = present ? num_features_ : 0;
      if (v.size() != want)
        fail(std::string(what) + " has " + std::to_string(v.size()) + " values, expected " +
             std::to_string(want));
    };
    check(weight_, options_.affine, "weight");
    check(bias_, options_.affine, "bias");
    check(grad_weight_, options_.affine, "grad_weight");
    check(grad_bias_, options_.affine, "grad_bias");
    check(running_mean_, options_.track_running_stats, "running_mean");
    check(running_var_, options_.track_running_stats, "running_var");
  }

  bool uses_batch_stats() const { return training_ || !options_.track_running_stats; }

  template <class X>
  auto forward_impl_new(const X& x, const Eigen::ThreadPoolDevice* device) {
    check_type<X>();
    constexpr int R = detail::TensorTraits<X>::rank;
    Output<R> y(x.dimensions());
    forward_impl(x, y, device);
    return y;
  }

  /// Every check of a forward: types, rank, channels, output dims, parameter sizes, batch size
  /// and (with check_finite) the values. Returns the shape for the kernels.
  template <class X, class Y>
  functional::Shape checked_forward(const X& x, const Y& y, bool batch_stats) const {
    check_type<X>();
    check_type<Y>();
    constexpr int R = detail::TensorTraits<X>::rank;
    static_assert(detail::TensorTraits<Y>::rank == R, "bnorm: output rank differs from input");
    const auto dims = dims_of<R>(x.dimensions());
    const functional::Shape shape = shape_of<R>(dims);
    if (dims_of<R>(y.dimensions()) != dims)
      fail("expected an output of shape " + detail::dims_string<R>(dims) + ", got " +
           detail::dims_string<R>(dims_of<R>(y.dimensions())));
    check_state();
    if (batch_stats && shape.per_channel() == 1)
      fail("Expected more than 1 value per channel when training, got input size " +
           detail::dims_string<R>(dims));
    if (options_.check_finite) {
      const Scalar* xp = x.data();
      for (Index i = 0; i < shape.size(); ++i)
        if (!std::isfinite(xp[i]))
          fail("input holds a non-finite value at flat index " + std::to_string(i) +
               " (Options::check_finite)");
    }
    return shape;
  }

  template <class X, class Y>
  void infer_impl(const X& x, Y& y, const Eigen::ThreadPoolDevice* device) const {
    const bool batch_stats = !options_.track_running_stats;
    const functional::Shape shape = checked_forward(x, y, batch_stats);
    if (shape.size() == 0) return;
    // The calling thread's own workspace: nothing of the module is written.
    const functional::Execution<Scalar> ex{device, nullptr};
    const functional::Affine<Scalar> affine{weight_ptr(), bias_ptr()};
    if (batch_stats) {
      functional::forward_training<Scalar>(shape, x.data(), y.data(), options_.eps, affine, {},
                                           {}, ex);
    } else {
      functional::forward_inference<Scalar>(shape, x.data(), y.data(), options_.eps, affine,
                                            running_mean_.data(), running_var_.data(), ex);
    }
  }

  template <class X, class Y>
  void forward_impl(const X& x, Y& y, const Eigen::ThreadPoolDevice* device) {
    constexpr int R = detail::TensorTraits<X>::rank;
    const bool batch_stats = uses_batch_stats();
    const functional::Shape shape = checked_forward(x, y, batch_stats);
    const auto dims = dims_of<R>(x.dimensions());
    if (shape.size() == 0) return;  // an empty batch: nothing to normalize, nothing learned
    const Scalar* xp = x.data();
    // Everything that can fail has been checked; allocate before changing any state.
    if (options_.save_input) saved_input_.resize(std::size_t(shape.size()));
    Scalar* copy = options_.save_input ? saved_input_.data() : nullptr;
    const functional::Execution<Scalar> ex{device, &workspace_};
    const functional::Affine<Scalar> affine{weight_ptr(), bias_ptr()};

    if (!batch_stats) {
      functional::detail::forward_inference(shape, xp, y.data(), options_.eps, affine,
                                            running_mean_.data(), running_var_.data(), ex, copy,
                                            saved_invstd_.data());
      for (Index c = 0; c < num_features_; ++c)
        saved_mean_[std::size_t(c)] = double(running_mean_(c));
    } else {
      functional::Running<Scalar> running;
      const bool update = training_ && options_.track_running_stats;
      if (update) {
        const double batches = double(num_batches_tracked_ + 1);
        running = {running_mean_.data(), running_var_.data(),
                   options_.momentum ? *options_.momentum : 1.0 / batches,
                   options_.running_variance == RunningVariance::Unbiased};
      }
      functional::detail::forward_training(shape, xp, y.data(), options_.eps, affine,
                                           {nullptr, saved_invstd_.data()}, running, ex, copy,
                                           saved_mean_.data());
      if (update) ++num_batches_tracked_;
    }
    saved_kind_ = batch_stats ? functional::Statistics::Batch : functional::Statistics::Frozen;
    saved_rank_ = R;
    saved_dims_.fill(0);
    for (int i = 0; i < R; ++i) saved_dims_[std::size_t(i)] = dims[std::size_t(i)];
    saved_shape_ = shape;
  }

  template <class X>
  auto infer_new(const X& x, const Eigen::ThreadPoolDevice* device) const {
    check_type<X>();
    Output<detail::TensorTraits<X>::rank> y(x.dimensions());
    infer_impl(x, y, device);
    return y;
  }

  template <class DY>
  auto backward_impl_new(const DY& dy, const Eigen::ThreadPoolDevice* device) {
    check_type<DY>();
    constexpr int R = detail::TensorTraits<DY>::rank;
    Output<R> dx(dy.dimensions());
    backward_impl(dy, dx, device);
    return dx;
  }

  /// Checks that t (dy, dx or x) has the last forward's input shape.
  template <class Z>
  void check_like_saved(const Z& t, const char* what) const {
    check_type<Z>();
    constexpr int R = detail::TensorTraits<Z>::rank;
    if (saved_rank_ == 0)
      throw std::logic_error("bnorm::" + name() + ": backward called before any forward");
    const auto dims = dims_of<R>(t.dimensions());
    std::array<Index, 5> padded{};
    for (int i = 0; i < R; ++i) padded[std::size_t(i)] = dims[std::size_t(i)];
    if (R != saved_rank_ || padded != saved_dims_) {
      std::string want = "[";
      for (int i = 0; i < saved_rank_; ++i)
        want += (i ? ", " : "") + std::to_string(saved_dims_[std::size_t(i)]);
      fail(std::string("expected ") + what + " of the last forward's input shape " + want +
           "], got " + detail::dims_string<R>(dims));
    }
  }

  template <class DY, class DX>
  void backward_impl(const DY& dy, DX& dx, const Eigen::ThreadPoolDevice* device) {
    check_like_saved(dy, "dy");
    if (!options_.save_input)
      throw std::logic_error("bnorm::" + name() +
                             ": backward(dy) needs the forward's input, which this module does "
                             "not keep (Options::save_input = false): call backward(x, dy, dx) "
                             "with that input");
    backward_from(saved_input_.data(), dy, dx, device);
  }

  template <class X, class DY, class DX>
  void backward_given(const X& x, const DY& dy, DX& dx, const Eigen::ThreadPoolDevice* device) {
    check_like_saved(x, "x");
    check_like_saved(dy, "dy");
    backward_from(x.data(), dy, dx, device);
  }

  /// Backward from the forward's input x, once dy has been checked.
  template <class DY, class DX>
  void backward_from(const Scalar* x, const DY& dy, DX& dx, const Eigen::ThreadPoolDevice* device) {
    check_like_saved(dx, "dx");
    check_state();
    const bool grads = options_.affine;
    functional::detail::backward(saved_shape_, dy.data(), x, dx.data(), saved_kind_,
                                 saved_mean_.data(), saved_invstd_.data(), weight_ptr(),
                                 grads ? step_grad_weight_.data() : nullptr,
                                 grads ? step_grad_bias_.data() : nullptr,
                                 functional::Execution<Scalar>{device, &workspace_});
    if (grads) {
      grad_weight_ += step_grad_weight_;
      grad_bias_ += step_grad_bias_;
    }
  }

  const Scalar* weight_ptr() const { return options_.affine ? weight_.data() : nullptr; }
  const Scalar* bias_ptr() const { return options_.affine ? bias_.data() : nullptr; }

  Index num_features_;
  Options options_;
  bool training_ = true;
  Vector weight_, bias_, running_mean_, running_var_, grad_weight_, grad_bias_;
  Vector step_grad_weight_, step_grad_bias_;
  std::int64_t num_batches_tracked_ = 0;

  // What backward needs from the last forward.
  int saved_rank_ = 0;  // 0: no forward yet
  std::array<Index, 5> saved_dims_{};
  functional::Shape saved_shape_;
  functional::Statistics saved_kind_ = functional::Statistics::Batch;
  std::vector<Scalar, Eigen::aligned_allocator<Scalar>> saved_input_;  // aligned: streamed to
  std::vector<Scalar> saved_invstd_;
  std::vector<double> saved_mean_;  // unrounded: backward centers x on the exact batch mean
  functional::Workspace<Scalar> workspace_;
};

template <class Scalar>
using BatchNorm1d = BatchNorm<Scalar, 2, 3>;
template <class Scalar>
using BatchNorm2d = BatchNorm<Scalar, 4, 4>;
template <class Scalar>
using BatchNorm3d = BatchNorm<Scalar, 5, 5>;

BNORM_END_NAMESPACE
