// SyncBatchNorm over MPI processes (mpirun -np 2 and -np 3, CTest): every rank runs the same
// checks in the same order. CHECK, not REQUIRE: a rank that left a check early would leave the
// other ranks waiting in an exchange.

#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <mpi.h>

#include <bnorm/instances.hpp>  // the kernels compiled once, in instances.cpp
#include <bnorm/mpi.hpp>

#include "../sync_scenarios.hpp"

using Index = std::ptrdiff_t;

namespace {

/// Each rank's batch, one of the ranks' empty where there are more than two.
std::vector<Index> batches(int size, bool with_empty) {
  std::vector<Index> b;
  for (int r = 0; r < size; ++r) b.push_back(with_empty && r == 1 ? 0 : 2 + r);
  return b;
}

}  // namespace

TEMPLATE_TEST_CASE("SyncBatchNorm over MPI gives single-process BatchNorm's results on the "
                   "whole batch, the same running statistics on every rank",
                   "[mpi]", float, double) {
  using T = TestType;
  bnorm::MpiCommunicator comm(MPI_COMM_WORLD);
  const auto layout = GENERATE(bnorm::Layout::ChannelsFirst, bnorm::Layout::ChannelsLast);
  const bool with_empty = GENERATE(false, true);
  const std::uint64_t seed = sync_testing::shared_seed(comm, Catch::rngSeed());
  const auto r = sync_testing::train_beside_single_process<T>(
      comm, batches(comm.size(), with_empty), layout, 3, seed);
  CAPTURE(comm.rank(), int(layout), with_empty);
  sync_testing::check_result(r);
}

TEST_CASE("SyncBatchNorm over MPI: a rank's wrong input makes every rank throw, in step",
          "[mpi][errors]") {
  bnorm::MpiCommunicator comm(MPI_COMM_WORLD);
  bnorm::SyncBatchNorm2d<float> bn(3, {}, comm);
  Eigen::Tensor<float, 4, Eigen::RowMajor> x(2, 3, 3, 3), wrong(2, 4, 3, 3);
  x.setRandom();
  wrong.setRandom();
  const bool wrong_here = comm.rank() == comm.size() - 1;
  CHECK_THROWS_AS(bn.forward(wrong_here ? wrong : x), std::invalid_argument);
  CHECK(bn.num_batches_tracked() == 0);
  CHECK_NOTHROW(bn.forward(x));
  CHECK(bn.num_batches_tracked() == 1);
}

TEST_CASE("SyncBatchNorm over MPI: ranks of different num_features all throw", "[mpi][errors]") {
  bnorm::MpiCommunicator comm(MPI_COMM_WORLD);
  const Index C = comm.rank() == 0 ? 3 : 4;
  bnorm::SyncBatchNorm2d<double> bn(C, {}, comm);
  Eigen::Tensor<double, 4, Eigen::RowMajor> x(2, C, 2, 2);
  x.setRandom();
  CHECK_THROWS_WITH(bn.forward(x), Catch::Contains("expected every rank to have"));
  CHECK(bn.num_batches_tracked() == 0);
}

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  // Errors as return codes, which MpiCommunicator turns into exceptions.
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  const int result = Catch::Session().run(argc, argv);
  MPI_Finalize();
  return result;
}
