#pragma once
// What SyncBatchNorm adds to BatchNorm: the ranks' exchanges of per-channel statistics over a
// Communicator, and the training passes built on them from the kernel core's three steps.

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "../communicator.hpp"
#include "../functional_sync.hpp"

BNORM_BEGIN_NAMESPACE
namespace detail {

/// The ranks' exchanges. Each all-gathers one slot per rank, a status word and the rank's
/// values, by one allreduce_sum of an array that each rank zeroes but for its own slot: a value
/// meets only zeros, so the sum is exact whatever its order. Every rank then reads the slots in
/// rank order, so every rank reaches the same decisions and the same bits. A rank whose own
/// checks failed still takes part, with a status that makes every rank throw: no rank is left
/// waiting, and none changes its state.
class RankExchange {
 public:
  RankExchange() = default;
  RankExchange(Communicator& comm, Index channels, std::string who)
      : comm_(&comm), channels_(channels), who_(std::move(who)) {
    const int size = comm.size(), rank = comm.rank();
    if (size < 1 || rank < 0 || rank >= size)
      throw std::invalid_argument("bnorm::" + who_ + ": expected a communicator of rank in [0, " +
                                  "size) and size >= 1, got rank " + std::to_string(rank) +
                                  " of size " + std::to_string(size));
  }

  bool active() const { return comm_ != nullptr; }
  Communicator& communicator() const { return *comm_; }
  const std::string& who() const { return who_; }

  /// Every rank's `values` doubles (this rank's from `mine`), rank r's at result + r * values.
  /// The first exchange is preceded by one that checks that every rank has the same channels.
  const double* all_gather(const double* mine, Index values) {
    agree();
    exchange(kOk, mine, values);
    check_statuses(values);
    gathered_.resize(std::size_t(comm_->size() * values));
    for (int r = 0; r < comm_->size(); ++r)
      std::copy_n(slot(r, values) + 1, values, gathered_.data() + r * values);
    return gathered_.data();
  }

  /// This rank's checks of a call whose exchange carries `values` doubles failed: it takes part
  /// in the exchange the other ranks make, so that they throw too.
  void reject(Index values) noexcept {
    try {
      if (!agreed_) {
        const double mine = double(channels_);
        exchange(kRejected, &mine, 1);
      } else {
        exchange(kRejected, nullptr, values);
      }
    } catch (...) {
      // The rank's own error is the one to report.
    }
  }

 private:
  static constexpr double kOk = 1, kRejected = 2;

  double* slot(int r, Index values) { return buffer_.data() + r * (values + 1); }

  void exchange(double status, const double* mine, Index values) {
    const int size = comm_->size(), rank = comm_->rank();
    buffer_.assign(std::size_t(size * (values + 1)), 0.0);
    double* own = slot(rank, values);
    own[0] = status;
    if (mine) std::copy_n(mine, values, own + 1);
    comm_->allreduce_sum(buffer_.data(), Index(buffer_.size()));
  }

  void check_statuses(Index values) {
    for (int r = 0; r < comm_->size(); ++r) {
      const double status = slot(r, values)[0];
      if (status == kRejected)
        throw std::invalid_argument("bnorm::" + who_ + ": rank " + std::to_string(r) + " of " +
                                    std::to_string(comm_->size()) +
                                    " rejected its call (its own exception says why); no rank "
                                    "changed its state");
      if (status != kOk)
        throw std::logic_error("bnorm::" + who_ + ": the communicator's ranks are not distinct " +
                               "(slot " + std::to_string(r) + " summed to " +
                               std::to_string(status) + "): each rank() must be in [0, size())");
    }
  }

  /// The first time: every rank must have this rank's channel count.
  void agree() {
    if (agreed_) return;
    const double mine = double(channels_);
    exchange(kOk, &mine, 1);
    check_statuses(1);
    for (int r = 0; r < comm_->size(); ++r)
      if (slot(r, 1)[1] != mine) {
        std::string counts;
        for (int q = 0; q < comm_->size(); ++q)
          counts += (q ? ", " : "") + std::to_string(Index(slot(q, 1)[1]));
        throw std::invalid_argument("bnorm::" + who_ + ": expected every rank to have " +
                                    std::to_string(channels_) +
                                    " channels (num_features), got, rank by rank: " + counts);
      }
    agreed_ = true;
  }

  Communicator* comm_ = nullptr;
  Index channels_ = 0;
  std::string who_;
  bool agreed_ = false;
  std::vector<double> buffer_;    // the slots of every rank
  std::vector<double> gathered_;  // their values, without the status words
};

/// SyncBatchNorm's training passes: statistics of the whole batch, merged over the ranks in
/// rank order, whatever each rank's batch (empty included) and thread count.
template <class Scalar>
class BatchSync {
 public:
  BatchSync() = default;
  BatchSync(Communicator& comm, Index channels, std::string who)
      : ranks_(comm, channels, std::move(who)) {}

  bool active() const { return ranks_.active(); }
  Communicator& communicator() const { return ranks_.communicator(); }

  /// Step 1 and 2 of a training forward: this rank's moments, every rank's, merged in rank
  /// order into totals().
  void merge_moments(const functional::Shape& shape, const Scalar* x,
                     const functional::Execution<functional::Param<Scalar>>& ex) {
    const Index C = shape.channels;
    totals_.resize(std::size_t(C));
    functional::detail::local_moments(shape, x, totals_.data(), ex);
    // This rank's values: its count, then each channel's mean (two doubles) and M2.
    mine_.resize(std::size_t(1 + 3 * C));
    mine_[0] = C > 0 ? totals_[0].n : 0.0;
    for (Index c = 0; c < C; ++c) {
      mine_[std::size_t(1 + 3 * c)] = totals_[std::size_t(c)].shift;
      mine_[std::size_t(2 + 3 * c)] = totals_[std::size_t(c)].a;
      mine_[std::size_t(3 + 3 * c)] = totals_[std::size_t(c)].b;
    }
    const Index values = forward_values(C);
    const double* all = ranks_.all_gather(mine_.data(), values);
    for (Index c = 0; c < C; ++c) {
      Partial total;
      for (int r = 0; r < communicator().size(); ++r) {
        const double* v = all + r * values;
        total = bnorm::detail::merge_moments(
            total, Partial{v[0], v[2 + 3 * c], v[3 + 3 * c], v[1 + 3 * c]});
      }
      totals_[std::size_t(c)] = total;
    }
    count_ = C > 0 ? totals_[0].n : 0.0;
  }

  /// The whole batch's moments per channel, and its values per channel (0: every rank empty).
  const Partial* totals() const { return totals_.data(); }
  double count() const { return count_; }

  /// A backward with the statistics of the last merge_moments (mean, invstd): every rank's
  /// gradient sums summed in rank order give dx; the parameters' gradients are this rank's own.
  void backward(const functional::Shape& shape, const Scalar* dy, const Scalar* x, Scalar* dx,
                const double* mean, const functional::Param<Scalar>* invstd,
                const functional::Param<Scalar>* weight, functional::Param<Scalar>* grad_weight,
                functional::Param<Scalar>* grad_bias,
                const functional::Execution<functional::Param<Scalar>>& ex) {
    const Index C = shape.channels;
    sums_.resize(std::size_t(C));
    functional::detail::local_gradient_sums(shape, dy, x, mean, sums_.data(), ex);
    mine_.resize(std::size_t(2 * C));
    for (Index c = 0; c < C; ++c) {
      mine_[std::size_t(2 * c)] = sums_[std::size_t(c)].a;
      mine_[std::size_t(2 * c + 1)] = sums_[std::size_t(c)].b;
    }
    const double* all = ranks_.all_gather(mine_.data(), backward_values(C));
    functional::detail::parameter_grads(0, C, sums_.data(), invstd, grad_weight, grad_bias);
    for (Index c = 0; c < C; ++c) {
      Partial total{count_, 0, 0};
      for (int r = 0; r < communicator().size(); ++r) {
        total.a += all[r * 2 * C + 2 * c];
        total.b += all[r * 2 * C + 2 * c + 1];
      }
      sums_[std::size_t(c)] = total;
    }
    functional::detail::backward_from_sums(shape, sums_.data(), count_, dy, x, dx, mean, invstd,
                                           weight, ex);
  }

  /// This rank's checks of a forward (or backward) failed: the other ranks must throw too.
  void reject(bool forward, Index channels) noexcept {
    ranks_.reject(forward ? forward_values(channels) : backward_values(channels));
  }

 private:
  static Index forward_values(Index C) { return 1 + 3 * C; }
  static Index backward_values(Index C) { return 2 * C; }
  const std::string& who() const { return ranks_.who(); }

  RankExchange ranks_;
  std::vector<Partial> totals_, sums_;
  std::vector<double> mine_;
  double count_ = 0;
};

}  // namespace detail
BNORM_END_NAMESPACE
