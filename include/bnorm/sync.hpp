#pragma once
// SyncBatchNorm1d / 2d / 3d: batch normalization of one batch split over processes (ranks), each
// rank normalizing its part with the statistics of the whole, as PyTorch's nn.SyncBatchNorm.
//
//   bnorm::MpiCommunicator comm(MPI_COMM_WORLD);        // bnorm/mpi.hpp, or a Communicator of yours
//   bnorm::SyncBatchNorm2d<float> bn(64, {}, comm);
//   auto y = bn.forward(x);                             // x: this rank's part of the batch
//
// In training, a forward merges every rank's per-channel moments in rank order (Chan's formula),
// so every rank normalizes with the same statistics, whatever each rank's batch size (empty
// included) and thread count, and moves its running statistics alike; a backward sums every
// rank's gradient sums. One exchange (Communicator::allreduce_sum) per forward and per backward,
// and one more before the first, which checks that every rank has the same num_features. The
// parameters' gradients are each rank's own: sum them over the ranks as data parallelism does.
// In eval mode, and in infer, each rank is on its own. Every rank must make the same calls in the
// same order; where one rank's checks of a call fail, every rank throws, and none changes state.
//
// Needs Eigen alone: the communication is the Communicator's.

#include <string>
#include <utility>

#include "batch_norm.hpp"
#include "communicator.hpp"
#include "functional_sync.hpp"

BNORM_BEGIN_NAMESPACE

template <class Scalar, int MinRank, int MaxRank>
class SyncBatchNorm : public BatchNorm<Scalar, MinRank, MaxRank> {
  using Base = BatchNorm<Scalar, MinRank, MaxRank>;

 public:
  /// As BatchNorm's, over the ranks of `comm`, which must outlive the module. The options are
  /// BatchNorm's but virtual_batch_size, which must be 0.
  SyncBatchNorm(Index num_features, Options options, Communicator& comm)
      : Base(num_features, std::move(options), comm) {}
  SyncBatchNorm(Index num_features, Communicator& comm) : SyncBatchNorm(num_features, {}, comm) {}

  Communicator& communicator() const { return Base::sync().communicator(); }

  /// "SyncBatchNorm1d", "SyncBatchNorm2d" or "SyncBatchNorm3d".
  static std::string name() { return "Sync" + Base::name(); }
};

template <class Scalar>
using SyncBatchNorm1d = SyncBatchNorm<Scalar, 2, 3>;
template <class Scalar>
using SyncBatchNorm2d = SyncBatchNorm<Scalar, 4, 4>;
template <class Scalar>
using SyncBatchNorm3d = SyncBatchNorm<Scalar, 5, 5>;

BNORM_END_NAMESPACE
