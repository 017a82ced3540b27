#pragma once
// What every normalization module shares: the forward, infer and backward overloads over Eigen
// Tensors and TensorMaps, their checks of type, rank and dims, the train / eval mode, the
// learnable parameters, and what a forward keeps for backward. A module (CRTP) says what its kernels are called with (its
// Problem) and calls them.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../functional.hpp"
#include "parameters.hpp"

BNORM_BEGIN_NAMESPACE

using Index = std::ptrdiff_t;

namespace detail {

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

template <class X>
using Plain = std::remove_cv_t<std::remove_reference_t<X>>;

/// How a module sees an argument: an Eigen Tensor or TensorMap (const or not) by its rank and
/// dims, in its storage order.
template <class X, class = void>
struct ArgTraits {
  using Scalar = std::remove_const_t<typename Eigen::internal::traits<Plain<X>>::Scalar>;
  static constexpr bool is_matrix = false;
  static constexpr int rank = Plain<X>::NumIndices;
  static constexpr bool row_major = (int(Plain<X>::Layout) == int(Eigen::RowMajor));
  using Output = Eigen::Tensor<Scalar, rank, Eigen::RowMajor>;
  static std::array<Index, std::size_t(rank)> dims(const X& x) {
    return dims_of<rank>(x.dimensions());
  }
  static Output make_like(const X& x) { return Output(x.dimensions()); }
  static bool contiguous(const X&) { return true; }
};

/// A dense Eigen matrix (Matrix, Map, Ref, Block) is a rank-2 (rows, cols) argument stored in
/// its own order; its storage must be contiguous.
template <class X>
struct ArgTraits<X, std::enable_if_t<std::is_base_of_v<Eigen::DenseBase<Plain<X>>, Plain<X>>>> {
  using Scalar = typename Plain<X>::Scalar;
  static constexpr bool is_matrix = true;
  static constexpr int rank = 2;
  static constexpr bool row_major = bool(Plain<X>::IsRowMajor);
  static constexpr bool direct = (Eigen::internal::traits<Plain<X>>::Flags & Eigen::DirectAccessBit) != 0;
  using Output = typename Plain<X>::PlainObject;
  static std::array<Index, 2> dims(const X& x) { return {Index(x.rows()), Index(x.cols())}; }
  static Output make_like(const X& x) { return Output(x.rows(), x.cols()); }
  static bool contiguous(const X& x) {
    return x.size() == 0 ||
           (x.innerStride() == 1 && x.outerStride() == (row_major ? x.cols() : x.rows()));
  }
};

/// The shared part of a module. Derived provides:
///   static std::string name();
///   template <std::size_t R> Problem problem(const std::array<Index, R>& dims,
///                                            bool batch_stats) const;  // checks, or fails
///   bool uses_batch_stats() const;        // in forward (training, or no running statistics)
///   bool infer_uses_batch_stats() const;  // in infer
///   bool keeps_input() const;             // a forward copies its input for backward(dy)
///   void check_state() const;             // parameters and buffers still have their sizes
///   void forward_kernel(const Problem&, const Scalar* x, Scalar* y, Scalar* copy,
///                       const functional::Execution<Param>&, bool batch_stats);
///   void infer_kernel(const Problem&, const Scalar* x, Scalar* y,
///                     const Eigen::ThreadPoolDevice*, bool batch_stats) const;
///   void backward_kernel(const Problem&, const Scalar* dy, const Scalar* x, Scalar* dx,
///                        const functional::Execution<Param>&);
/// and may hide check_input (a forward's check of the values). Problem has size(). A module
/// takes a dense Eigen matrix as the rank-2 tensor of its (rows, cols), and a column-major one
/// too where Derived hides kColumnMajorMatrices and column_major_problem, which gives the Problem
/// of the same dims stored column by column.
///
/// Thread safety: const member functions (infer, the const accessors, options, ...) may run
/// concurrently with each other on one module; forward, backward and every other non-const
/// function need exclusive access to it. Modules share nothing with each other.
template <class Derived, class Scalar, class Problem>
class Module {
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double> ||
                    std::is_same_v<Scalar, Eigen::bfloat16> || std::is_same_v<Scalar, Eigen::half>,
                "bnorm's modules support float and double, and BatchNorm Eigen::bfloat16 and "
                "Eigen::half");

  template <class Y>
  using NotADevice =
      std::enable_if_t<!std::is_same_v<std::decay_t<Y>, Eigen::ThreadPoolDevice>>;

 public:
  /// The type of parameters, statistics and their gradients: Scalar, float for a Scalar of 16 bits.
  using Param = functional::Param<Scalar>;
  using Vector = Eigen::Tensor<Param, 1>;
  template <int Rank>
  using Output = Eigen::Tensor<Scalar, Rank, Eigen::RowMajor>;

  // --- modes ---------------------------------------------------------------------------------
  void train(bool on = true) { training_ = on; }
  void eval() { training_ = false; }
  bool is_training() const { return training_; }

  // --- learnable parameters and their accumulated gradients (empty tensors where absent) -----
  Vector& weight() { return params_.weight; }
  const Vector& weight() const { return params_.weight; }
  Vector& bias() { return params_.bias; }
  const Vector& bias() const { return params_.bias; }
  Vector& grad_weight() { return params_.grad_weight; }
  const Vector& grad_weight() const { return params_.grad_weight; }
  Vector& grad_bias() { return params_.grad_bias; }
  const Vector& grad_bias() const { return params_.grad_bias; }
  void zero_grad() { params_.zero_grad(); }

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

 /// The module's name as its errors give it: Derived's own, or one that tells an instance apart
  /// (a SyncBatchNorm is a BatchNorm).
  std::string instance_name() const { return Derived::name(); }

 protected:
  Module() = default;

  [[noreturn]] void fail(const std::string& what) const {
    throw std::invalid_argument("bnorm::" + self().instance_name() + ": " + what);
  }
  /// fail as a callable, for the checks shared by the modules.
  auto failure() const {
    return [this](const std::string& what) { fail(what); };
  }
  void check_eps(double eps) const { functional::detail::check_eps(eps, failure()); }
  /// std::nullopt (the cumulative average) passes.
  void check_momentum(const std::optional<double>& momentum) const {
    if (momentum) functional::detail::check_momentum(*momentum, failure());
  }

  Parameters<Param> params_;

  /// A forward's check of the input's values (Derived may hide it).
  template <std::size_t R>
  void check_input(const Scalar*, const Problem&, const std::array<Index, R>&) const {}

  /// Checks a forward's (not infer's) Problem further (Derived may hide it).
  template <std::size_t R>
  void check_forward_problem(const Problem&, const std::array<Index, R>&, bool) const {}

  /// Whether a forward of an empty batch runs the kernel all the same (Derived may hide it).
  bool runs_on_empty(bool) const { return false; }

  /// Work of a forward that may still fail, after its checks and before it changes any state
  /// (Derived may hide it).
  template <std::size_t R>
  void prepare_forward(const Problem&, const Scalar*, const functional::Execution<Param>&, bool,
                       const std::array<Index, R>&) {}

  /// Called where a forward's (forward true) or a backward's checks failed, before the
  /// exception goes on (Derived may hide it).
  void rejected(bool /*forward*/, bool /*batch_stats*/) noexcept {}

  /// Whether the module takes column-major matrices, and their Problem, given whether a
  /// training forward normalizes them with batch statistics (Derived may hide both).
  static constexpr bool kColumnMajorMatrices = false;
  static Problem column_major_problem(const Problem& p, bool) { return p; }

  bool training_ = true;
  functional::Workspace<Param> workspace_;

  /// Runs checks(), telling Derived where they fail.
  template <class Checks>
  void guarded(bool forward, bool batch_stats, const Checks& checks) {
    try {
      checks();
    } catch (...) {
      self().rejected(forward, batch_stats);
      throw;
    }
  }

  /// Checks that t (dy, dx or x) has the last forward's input shape and storage order.
  template <class Z>
  void check_like_saved(const Z& t, const char* what) const {
    check_type<Z>();
    if (!saved_)
      throw std::logic_error("bnorm::" + self().instance_name() +
                             ": backward called before any forward");
    const auto dims = ArgTraits<Z>::dims(t);
    if (!std::equal(dims.begin(), dims.end(), saved_dims_.begin(), saved_dims_.end())) {
      std::string want = "[";
      for (std::size_t i = 0; i < saved_dims_.size(); ++i)
        want += (i ? ", " : "") + std::to_string(saved_dims_[i]);
      fail(std::string("expected ") + what + " of the last forward's input shape " + want +
           "], got " + dims_string(dims));
    }
    if (column_major<Z>() != saved_column_major_)
      fail(std::string("expected ") + what + " stored like the last forward's input (" +
           storage_name(saved_column_major_) + "), got " + storage_name(column_major<Z>()));
    if constexpr (ArgTraits<Z>::is_matrix) check_contiguous(t, what);
  }

  /// Checks that z (forward_add's residual) has x's type, rank, dims and storage order.
  template <class X, class Z>
  void check_like_input(const X& x, const Z& z, const char* what) const {
    check_type<Z>();
    static_assert(ArgTraits<Z>::rank == ArgTraits<X>::rank, "bnorm: the residual's rank differs "
                                                            "from the input's");
    static_assert(column_major<X>() == column_major<Z>(),
                  "bnorm: the residual must be stored in the input's order");
    if (ArgTraits<Z>::dims(z) != ArgTraits<X>::dims(x))
      fail(std::string("expected ") + what + " of the input's shape " +
           dims_string(ArgTraits<X>::dims(x)) + ", got " + dims_string(ArgTraits<Z>::dims(z)));
    if constexpr (ArgTraits<Z>::is_matrix) check_contiguous(z, what);
  }


 private:
  Derived& self() { return static_cast<Derived&>(*this); }
  const Derived& self() const { return static_cast<const Derived&>(*this); }

  /// Column-major storage: only column-major matrices are stored so.
  template <class X>
  static constexpr bool column_major() {
    return !ArgTraits<X>::row_major;
  }

  template <class X>
  static constexpr void check_type() {
    using A = ArgTraits<X>;
    static_assert(std::is_same_v<typename A::Scalar, Scalar>,
                  "bnorm: the argument's scalar type differs from the module's");
    if constexpr (A::is_matrix) {
      static_assert(A::direct, "bnorm: matrices must have storage (Matrix, Map, Ref or Block), "
                               "not be expressions");
      static_assert(A::row_major || Derived::kColumnMajorMatrices,
                    "bnorm: this module takes row-major matrices only (samples by features in "
                    "PyTorch's order); column-major ones are BatchNorm1d's");
    } else {
      static_assert(A::row_major, "bnorm: tensors must be Eigen::RowMajor (PyTorch's order)");
    }
  }

  static const char* storage_name(bool column_major) {
    return column_major ? "a column-major matrix" : "row-major storage";
  }

  /// Fails where a matrix argument's storage has gaps (a Block of a wider matrix, strides).
  template <class Z>
  void check_contiguous(const Z& z, const char* what) const {
    check_type<Z>();
    if (!ArgTraits<Z>::contiguous(z))
      fail(std::string("expected ") + what + " to be a contiguous matrix (inner stride 1, outer "
           "stride its inner size), got one of strides " +
           dims_string(std::array<Index, 2>{Index(z.innerStride()), Index(z.outerStride())}));
  }

  /// Every check of a forward: types, ranks, dims, parameter sizes and the module's own.
  template <class X, class Y>
  Problem checked_forward(const X& x, const Y& y, bool batch_stats, bool forward) const {
    check_type<X>();
    check_type<Y>();
    constexpr int R = ArgTraits<X>::rank;
    static_assert(ArgTraits<Y>::rank == R, "bnorm: output rank differs from input");
    static_assert(column_major<X>() == column_major<Y>(),
                  "bnorm: the output must be stored in the input's order");
    const auto dims = ArgTraits<X>::dims(x);
    Problem p = self().problem(dims, batch_stats);
    if (ArgTraits<Y>::dims(y) != dims)
      fail("expected an output of shape " + dims_string(dims) + ", got " +
           dims_string(ArgTraits<Y>::dims(y)));
    if constexpr (ArgTraits<X>::is_matrix) check_contiguous(x, "x");
    if constexpr (ArgTraits<Y>::is_matrix) check_contiguous(y, "y");
    if constexpr (column_major<X>()) p = self().column_major_problem(p, forward && batch_stats);
    if (forward) self().check_forward_problem(p, dims, batch_stats);
    self().check_state();
    self().check_input(x.data(), p, dims);
    return p;
  }

  template <class X>
  auto forward_new(const X& x, const Eigen::ThreadPoolDevice* device) {
    check_type<X>();
    auto y = ArgTraits<X>::make_like(x);
    forward_impl(x, y, device);
    return y;
  }

  template <class X, class Y>
  void forward_impl(const X& x, Y& y, const Eigen::ThreadPoolDevice* device) {
    const bool batch_stats = self().uses_batch_stats();
    Problem p{};
    guarded(true, batch_stats, [&] { p = checked_forward(x, y, batch_stats, true); });
    // An empty batch: nothing to normalize, nothing learned (unless Derived runs it all the same).
    if (p.size() == 0 && !self().runs_on_empty(batch_stats)) return;
    const auto dims = ArgTraits<X>::dims(x);
    const functional::Execution<Param> ex{device, &workspace_};
    self().prepare_forward(p, x.data(), ex, batch_stats, dims);
    // Everything that can fail has been checked; allocate before changing any state.
    const bool keep = self().keeps_input();
    if (keep) saved_input_.resize(std::size_t(p.size()));
    self().forward_kernel(p, x.data(), y.data(), keep ? saved_input_.data() : nullptr, ex,
                          batch_stats);
    saved_dims_.assign(dims.begin(), dims.end());  // allocates once: its capacity stays
    saved_column_major_ = column_major<X>();
    saved_ = true;
    saved_problem_ = p;
  }

  template <class X>
  auto infer_new(const X& x, const Eigen::ThreadPoolDevice* device) const {
    check_type<X>();
    auto y = ArgTraits<X>::make_like(x);
    infer_impl(x, y, device);
    return y;
  }

  template <class X, class Y>
  void infer_impl(const X& x, Y& y, const Eigen::ThreadPoolDevice* device) const {
    const bool batch_stats = self().infer_uses_batch_stats();
    const Problem p = checked_forward(x, y, batch_stats, false);
    if (p.size() == 0) return;
    self().infer_kernel(p, x.data(), y.data(), device, batch_stats);
  }

  template <class DY>
  auto backward_new(const DY& dy, const Eigen::ThreadPoolDevice* device) {
    check_type<DY>();
    auto dx = ArgTraits<DY>::make_like(dy);
    backward_impl(dy, dx, device);
    return dx;
  }

  template <class DY, class DX>
  void backward_impl(const DY& dy, DX& dx, const Eigen::ThreadPoolDevice* device) {
    guarded(false, false, [&] {
      check_like_saved(dy, "dy");
      if (!self().keeps_input())
        throw std::logic_error("bnorm::" + self().instance_name() +
                               ": backward(dy) needs the forward's input, which this module does "
                               "not keep (save_input = false): call backward(x, dy, dx) with "
                               "that input");
      check_backward(dx);
    });
    backward_from(saved_input_.data(), dy, dx, device);
  }

  template <class X, class DY, class DX>
  void backward_given(const X& x, const DY& dy, DX& dx, const Eigen::ThreadPoolDevice* device) {
    guarded(false, false, [&] {
      check_like_saved(x, "x");
      check_like_saved(dy, "dy");
      check_backward(dx);
    });
    backward_from(x.data(), dy, dx, device);
  }

  template <class DX>
  void check_backward(const DX& dx) const {
    check_like_saved(dx, "dx");
    self().check_state();
  }

  /// A backward whose arguments have been checked.
  template <class DY, class DX>
  void backward_from(const Scalar* x, const DY& dy, DX& dx, const Eigen::ThreadPoolDevice* device) {
    self().backward_kernel(saved_problem_, dy.data(), x, dx.data(),
                           functional::Execution<Param>{device, &workspace_});
  }

  // What backward needs from the last forward (the module keeps its own statistics).
  bool saved_ = false;  // a forward has run
  bool saved_column_major_ = false;  // its input was a column-major matrix
  std::vector<Index> saved_dims_;
  Problem saved_problem_{};
  std::vector<Scalar, Eigen::aligned_allocator<Scalar>> saved_input_;  // aligned: streamed to
};

}  // namespace detail
BNORM_END_NAMESPACE
