#pragma once
// bnorm::MpiCommunicator: SyncBatchNorm's Communicator over an MPI communicator. The one bnorm
// header that needs MPI (link MPI::MPI_CXX, or your MPI's compiler wrapper).

#include <mpi.h>

#include <climits>
#include <stdexcept>
#include <string>

#include "communicator.hpp"

namespace bnorm {

/// Wraps an MPI communicator, which must outlive it (MPI_Init before, MPI_Finalize after). Its
/// allreduce_sum is virtual, so a class of yours may wrap it further (to count or time calls).
class MpiCommunicator : public Communicator {
 public:
  explicit MpiCommunicator(MPI_Comm comm) : comm_(comm) {
    check(MPI_Comm_rank(comm, &rank_), "MPI_Comm_rank");
    check(MPI_Comm_size(comm, &size_), "MPI_Comm_size");
  }

  /// MPI_Allreduce of doubles with MPI_SUM, in place.
  void allreduce_sum(double* data, std::ptrdiff_t count) override {
    if (count < 0 || count > INT_MAX)
      throw std::invalid_argument("bnorm::MpiCommunicator: expected a count in [0, INT_MAX], got " +
                                  std::to_string(count));
    check(MPI_Allreduce(MPI_IN_PLACE, data, int(count), MPI_DOUBLE, MPI_SUM, comm_),
          "MPI_Allreduce");
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  MPI_Comm comm() const { return comm_; }

 private:
  // (MPI's default error handler aborts; one that returns makes these errors exceptions.)
  static void check(int code, const char* call) {
    if (code == MPI_SUCCESS) return;
    char text[MPI_MAX_ERROR_STRING];
    int length = 0;
    MPI_Error_string(code, text, &length);
    throw std::runtime_error(std::string("bnorm::MpiCommunicator: ") + call + " failed: " +
                             std::string(text, std::size_t(length)));
  }

  MPI_Comm comm_;
  int rank_ = 0, size_ = 1;
};

}  // namespace bnorm
