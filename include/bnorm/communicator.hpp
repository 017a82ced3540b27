#pragma once
// bnorm::Communicator: what SyncBatchNorm needs from the processes (ranks) that share a batch.
// Implement it over MPI (bnorm/mpi.hpp does), NCCL, gloo or a transport of your own.

#include <cstddef>

// Outside the per-instruction-set namespace of the kernels: one interface, whatever flags each
// translation unit is built with.
namespace bnorm {

class Communicator {
 public:
  virtual ~Communicator() = default;
  /// Replaces data[0, count) on every rank with its element-wise sum over all ranks. Every rank
  /// calls it with the same count, and every rank must receive the same values. (bnorm sums
  /// arrays in which one rank's values meet only zeros, so any summation order gives them
  /// exactly.)
  virtual void allreduce_sum(double* data, std::ptrdiff_t count) = 0;
  /// This process's rank, in [0, size()), distinct from every other rank's.
  virtual int rank() const = 0;
  /// The number of ranks.
  virtual int size() const = 0;
};

}  // namespace bnorm
