#pragma once
// Options of the batch-norm modules: a plain aggregate with PyTorch's defaults.

#include <cstddef>
#include <optional>

namespace bnorm {

/// Where the channel dimension sits. Always explicit: a (N, C, L) and an (N, L, C) tensor of the
/// same sizes cannot be told apart by shape.
enum class Layout {
  ChannelsFirst,  ///< PyTorch's dims: (N,C), (N,C,L), (N,C,H,W), (N,C,D,H,W)
  ChannelsLast,   ///< C last: (N,C), (N,L,C), (N,H,W,C), (N,D,H,W,C)
};

/// The activation a batch norm's forward applies to its output in the same pass (and its
/// backward differentiates).
enum class Activation {
  None,
  ReLU,  ///< max(y, 0); its gradient at exactly 0 is 0, as PyTorch's
};

/// Which batch variance the running variance averages.
enum class RunningVariance {
  Unbiased,  ///< var * n / (n - 1): PyTorch's
  Biased,    ///< the variance that normalizes: Keras's and Flax's
};

/// Batch Renormalization (Ioffe, 2017): in training, the batch's normalization is corrected
/// toward the running statistics, y = weight * (xhat * r + d) + bias, with
/// r = clip(sigma_B / sigma, 1 / rmax, rmax) and d = clip((mu_B - mu) / sigma, -dmax, dmax), where
/// sigma_B = sqrt(var_B + eps), sigma = sqrt(running_var + eps) and mu = running_mean, as they
/// were before the batch updates them. r and d are constants to backward (stop-gradient).
struct Renorm {
  double rmax = 3.0;  ///< >= 1; 1: r = 1, plain batch norm's scale
  double dmax = 5.0;  ///< >= 0; 0: d = 0
};

struct Options {
  /// Added to the variance before the square root. Must be finite and >= 0.
  double eps = 1e-5;
  /// Weight of the NEW batch statistic in the running average (PyTorch's convention; Keras's
  /// momentum is 1 - this). std::nullopt: cumulative average, factor 1 / num_batches_tracked.
  std::optional<double> momentum = 0.1;
  /// Learnable per-channel weight (gamma, starts at 1) and bias (beta, starts at 0).
  bool affine = true;
  /// Keep running_mean / running_var and use them in eval mode. When false there are no buffers
  /// and batch statistics are used in eval mode too.
  bool track_running_stats = true;
  Layout layout = Layout::ChannelsFirst;
  /// Reject a batch holding NaN or Inf before any state changes, so that one bad batch cannot
  /// poison the running statistics. Costs one extra read of the input.
  bool check_finite = false;
  /// Keep a copy of a forward's input, written in the same pass as the output, for backward(dy):
  /// the input may then be overwritten or freed. false: a forward saves only its per-channel
  /// statistics, and backward takes the input again, backward(x, dy, dx), which copies nothing.
  bool save_input = true;
  /// The batch variance the running variance averages (PyTorch: Unbiased).
  RunningVariance running_variance = RunningVariance::Unbiased;
  /// Ghost Batch Normalization: in training, consecutive chunks of this many samples (the last
  /// may be smaller) are each normalized with their own statistics; the running statistics move
  /// once per forward, toward the plain mean over the chunks of their means and variances.
  /// 0: off. Must be >= 0.
  std::ptrdiff_t virtual_batch_size = 0;
  /// Applied to the output by forward, forward_add and infer (see Activation).
  Activation activation = Activation::None;
  /// Batch Renormalization's bounds; std::nullopt: off. Needs track_running_stats; not with
  /// virtual_batch_size.
  std::optional<Renorm> renorm;
};

/// Keras's BatchNormalization defaults: epsilon 1e-3, momentum 0.99 of the OLD value (0.01 of
/// the new one here), the biased variance in the running average.
inline Options keras_options() {
  Options o;
  o.eps = 1e-3;
  o.momentum = 0.01;
  o.running_variance = RunningVariance::Biased;
  return o;
}

/// Flax's nn.BatchNorm defaults: Keras's, but for epsilon 1e-5.
inline Options flax_options() {
  Options o = keras_options();
  o.eps = 1e-5;
  return o;
}

}  // namespace bnorm

namespace bnorm {

/// LayerNorm's options, PyTorch's defaults.
struct LayerNormOptions {
  /// Added to the variance before the square root. Must be finite and >= 0.
  double eps = 1e-5;
  /// Learnable weight (starts at 1) and, with `bias`, bias (starts at 0), one per position of
  /// the normalized shape.
  bool elementwise_affine = true;
  bool bias = true;
  /// As Options::save_input: keep a copy of a forward's input for backward(dy).
  bool save_input = true;
};

/// RMSNorm's options, PyTorch's defaults.
struct RMSNormOptions {
  /// Added to the mean square before the square root; std::nullopt: the machine epsilon of the
  /// module's Scalar (PyTorch's torch.finfo(x.dtype).eps).
  std::optional<double> eps = std::nullopt;
  /// Learnable weight (starts at 1), one per position of the normalized shape.
  bool elementwise_affine = true;
  bool save_input = true;
};

/// GroupNorm's options, PyTorch's defaults.
struct GroupNormOptions {
  double eps = 1e-5;
  /// Learnable per-channel weight (starts at 1) and bias (starts at 0).
  bool affine = true;
  Layout layout = Layout::ChannelsFirst;
  bool save_input = true;
};

/// InstanceNorm's options, PyTorch's defaults (which differ from BatchNorm's: no parameters, no
/// running statistics).
struct InstanceNormOptions {
  double eps = 1e-5;
  /// Weight of the new batch's statistics in the running average. std::nullopt: 0, as
  /// PyTorch's InstanceNorm does (the running statistics then stay as they are).
  std::optional<double> momentum = 0.1;
  bool affine = false;
  /// Keep running_mean / running_var, updated in training and used in eval mode.
  bool track_running_stats = false;
  Layout layout = Layout::ChannelsFirst;
  bool save_input = true;
};

}  // namespace bnorm
