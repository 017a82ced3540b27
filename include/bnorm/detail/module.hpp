#pragma once
// What every normalization module shares: the forward, infer and backward overloads over Eigen
// Tensors and TensorMaps, their checks of type, rank and dims, the train / eval mode, and what a
// forward keeps for backward. A module (CRTP) says what its kernels are called with (its
// Problem) and calls them.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../functional.hpp"

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

template <std::size_t Rank>
std::string dims_string(const std::array<Index, Rank>& d) {
  std::string s = "[";
  for (std::size_t i = 0; i < Rank; ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

template <int Rank>
std::array<Index, std::size_t(Rank)> dims_of(const Eigen::DSizes<Index, Rank>& d) {
  std::array<Index, std::size_t(Rank)> a{};
  for (int i = 0; i < Rank; ++i) a[std::size_t(i)] = d[std::size_t(i)];
  return a;
}

/// The shared part of a module. Derived provides:
///   static std::string name();
///   template <std::size_t R> Problem problem(const std::array<Index, R>& dims,
///                                            bool batch_stats) const;  // checks, or fails
///   bool uses_batch_stats() const;        // in forward (training, or no running statistics)
///   bool infer_uses_batch_stats() const;  // in infer
///   bool keeps_input() const;             // a forward copies its input for backward(dy)
///   void check_state() const;             // parameters and buffers still have their sizes
///   void forward_kernel(const Problem&, const Scalar* x, Scalar* y, Scalar* copy,
///                       const functional::Execution<Scalar>&, bool batch_stats);
///   void infer_kernel(const Problem&, const Scalar* x, Scalar* y,
///                     const Eigen::ThreadPoolDevice*, bool batch_stats) const;
///   void backward_kernel(const Problem&, const Scalar* dy, const Scalar* x, Scalar* dx,
///                        const functional::Execution<Scalar>&);
/// and may hide check_input (a forward's check of the values). Problem has size().
///
/// Thread safety: const member functions (infer, the const accessors, options, ...) may run
/// concurrently with each other on one module; forward, backward and every other non-const
/// function need exclusive access to it. Modules share nothing with each other.
template <class Derived, class Scalar, class Problem>
class Module {
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>,
                "bnorm's modules support float and double");

  template <class Y>
  using NotADevice =
      std::enable_if_t<!std::is_same_v<std::decay_t<Y>, Eigen::ThreadPoolDevice>>;

 public:
  using Vector = Eigen::Tensor<Scalar, 1>;
  template <int Rank>
  using Output = Eigen::Tensor<Scalar, Rank, Eigen::RowMajor>;

  // --- modes ---------------------------------------------------------------------------------
  void train(bool on = true) { training_ = on; }
  void eval() { training_ = false; }
  bool is_training() const { return training_; }

  // --- forward -------------------------------------------------------------------------------

  /// Normalizes x (a Tensor or TensorMap, RowMajor) into a new tensor of the same dims.
  template <class X>
  auto forward(const X& x) {
    return forward_new(x, nullptr);
  }
  template <class X>
  auto forward(const X& x, const Eigen::ThreadPoolDevice& device) {
    return forward_new(x, &device);
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
  /// statistics whatever the mode, where the module keeps them (else with the input's own). A
  /// const member: any number of threads may call it on one module at once.
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
  /// respect to its output), from the copy of the input the forward kept (save_input). Adds to
  /// the parameters' gradients.
  template <class DY>
  auto backward(const DY& dy) {
    return backward_new(dy, nullptr);
  }
  template <class DY>
  auto backward(const DY& dy, const Eigen::ThreadPoolDevice& device) {
    return backward_new(dy, &device);
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
  /// what the forward read): copies nothing, whatever save_input is. With save_input = false, a
  /// training step is forward(x, y) then backward(x, dy, dx).
  template <class X, class DY, class DX, class = NotADevice<DX>>
  void backward(const X& x, const DY& dy, DX&& dx) {
    backward_given(x, dy, dx, nullptr);
  }
  template <class X, class DY, class DX>
  void backward(const X& x, const DY& dy, DX&& dx, const Eigen::ThreadPoolDevice& device) {
    backward_given(x, dy, dx, &device);
  }

 protected:
  Module() = default;

  [[noreturn]] static void fail(const std::string& what) {
    throw std::invalid_argument("bnorm::" + Derived::name() + ": " + what);
  }

  /// A forward's check of the input's values (Derived may hide it).
  template <std::size_t R>
  void check_input(const Scalar*, const Problem&, const std::array<Index, R>&) const {}

  bool training_ = true;
  functional::Workspace<Scalar> workspace_;

 private:
  Derived& self() { return static_cast<Derived&>(*this); }
  const Derived& self() const { return static_cast<const Derived&>(*this); }

  template <class X>
  static constexpr void check_type() {
    using TT = TensorTraits<X>;
    static_assert(std::is_same_v<typename TT::Scalar, Scalar>,
                  "bnorm: the tensor's scalar type differs from the module's");
    static_assert(TT::row_major, "bnorm: tensors must be Eigen::RowMajor (PyTorch's order)");
  }

  /// Every check of a forward: types, ranks, dims, parameter sizes and the module's own.
  template <class X, class Y>
  Problem checked_forward(const X& x, const Y& y, bool batch_stats) const {
    check_type<X>();
    check_type<Y>();
    constexpr int R = TensorTraits<X>::rank;
    static_assert(TensorTraits<Y>::rank == R, "bnorm: output rank differs from input");
    const auto dims = dims_of<R>(x.dimensions());
    const Problem p = self().problem(dims, batch_stats);
    if (dims_of<R>(y.dimensions()) != dims)
      fail("expected an output of shape " + dims_string(dims) + ", got " +
           dims_string(dims_of<R>(y.dimensions())));
    self().check_state();
    self().check_input(x.data(), p, dims);
    return p;
  }

  template <class X>
  auto forward_new(const X& x, const Eigen::ThreadPoolDevice* device) {
    check_type<X>();
    Output<TensorTraits<X>::rank> y(x.dimensions());
    forward_impl(x, y, device);
    return y;
  }

  template <class X, class Y>
  void forward_impl(const X& x, Y& y, const Eigen::ThreadPoolDevice* device) {
    constexpr int R = TensorTraits<X>::rank;
    const bool batch_stats = self().uses_batch_stats();
    const Problem p = checked_forward(x, y, batch_stats);
    if (p.size() == 0) return;  // an empty batch: nothing to normalize, nothing learned
    // Everything that can fail has been checked; allocate before changing any state.
    const bool keep = self().keeps_input();
    if (keep) saved_input_.resize(std::size_t(p.size()));
    self().forward_kernel(p, x.data(), y.data(), keep ? saved_input_.data() : nullptr,
                          functional::Execution<Scalar>{device, &workspace_}, batch_stats);
    const auto dims = dims_of<R>(x.dimensions());
    saved_dims_.assign(dims.begin(), dims.end());  // allocates once: its capacity stays
    saved_ = true;
    saved_problem_ = p;
  }

  template <class X>
  auto infer_new(const X& x, const Eigen::ThreadPoolDevice* device) const {
    check_type<X>();
    Output<TensorTraits<X>::rank> y(x.dimensions());
    infer_impl(x, y, device);
    return y;
  }

  template <class X, class Y>
  void infer_impl(const X& x, Y& y, const Eigen::ThreadPoolDevice* device) const {
    const bool batch_stats = self().infer_uses_batch_stats();
    const Problem p = checked_forward(x, y, batch_stats);
    if (p.size() == 0) return;
    self().infer_kernel(p, x.data(), y.data(), device, batch_stats);
  }

  template <class DY>
  auto backward_new(const DY& dy, const Eigen::ThreadPoolDevice* device) {
    check_type<DY>();
    Output<TensorTraits<DY>::rank> dx(dy.dimensions());
    backward_impl(dy, dx, device);
    return dx;
  }

  /// Checks that t (dy, dx or x) has the last forward's input shape.
  template <class Z>
  void check_like_saved(const Z& t, const char* what) const {
    check_type<Z>();
    constexpr int R = TensorTraits<Z>::rank;
    if (!saved_)
      throw std::logic_error("bnorm::" + Derived::name() + ": backward called before any forward");
    const auto dims = dims_of<R>(t.dimensions());
    if (!std::equal(dims.begin(), dims.end(), saved_dims_.begin(), saved_dims_.end())) {
      std::string want = "[";
      for (std::size_t i = 0; i < saved_dims_.size(); ++i)
        want += (i ? ", " : "") + std::to_string(saved_dims_[i]);
      fail(std::string("expected ") + what + " of the last forward's input shape " + want +
           "], got " + dims_string(dims));
    }
  }

  template <class DY, class DX>
  void backward_impl(const DY& dy, DX& dx, const Eigen::ThreadPoolDevice* device) {
    check_like_saved(dy, "dy");
    if (!self().keeps_input())
      throw std::logic_error("bnorm::" + Derived::name() +
                             ": backward(dy) needs the forward's input, which this module does "
                             "not keep (save_input = false): call backward(x, dy, dx) with that "
                             "input");
    backward_from(saved_input_.data(), dy, dx, device);
  }

  template <class X, class DY, class DX>
  void backward_given(const X& x, const DY& dy, DX& dx, const Eigen::ThreadPoolDevice* device) {
    check_like_saved(x, "x");
    check_like_saved(dy, "dy");
    backward_from(x.data(), dy, dx, device);
  }

  template <class DY, class DX>
  void backward_from(const Scalar* x, const DY& dy, DX& dx, const Eigen::ThreadPoolDevice* device) {
    check_like_saved(dx, "dx");
    self().check_state();
    self().backward_kernel(saved_problem_, dy.data(), x, dx.data(),
                           functional::Execution<Scalar>{device, &workspace_});
  }

  // What backward needs from the last forward (the module keeps its own statistics).
  bool saved_ = false;  // a forward has run
  std::vector<Index> saved_dims_;
  Problem saved_problem_{};
  std::vector<Scalar, Eigen::aligned_allocator<Scalar>> saved_input_;  // aligned: streamed to
};

}  // namespace detail
BNORM_END_NAMESPACE
