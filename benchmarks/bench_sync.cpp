// The cost of synchronizing batch norm across processes: a training step (forward and backward)
// of SyncBatchNorm against the same step of BatchNorm on the same part of the batch, per rank,
// at whatever number of ranks mpirun starts. Each step starts behind a barrier and lasts until its
// slowest rank ends; the table gives medians, their ratio, and the share of the synchronized step
// spent in the exchanges (timed by a Communicator that wraps MpiCommunicator).
//
//   mpirun -np 4 bnorm_bench_sync [--reps N] [--threads T]
//
// --threads: each rank's thread pool (default: none, the calling thread alone). On one machine,
// keep ranks x threads within its cores.

#include <mpi.h>

#include <bnorm/bnorm.hpp>
#include <bnorm/mpi.hpp>
#include <bnorm/sync.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

/// MpiCommunicator, timing its exchanges.
class TimedCommunicator : public bnorm::MpiCommunicator {
 public:
  using bnorm::MpiCommunicator::MpiCommunicator;
  void allreduce_sum(double* data, std::ptrdiff_t count) override {
    const auto start = Clock::now();
    bnorm::MpiCommunicator::allreduce_sum(data, count);
    seconds += std::chrono::duration<double>(Clock::now() - start).count();
  }
  double seconds = 0;
};

double slowest(double mine) {
  double all = 0;
  MPI_Allreduce(&mine, &all, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return all;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct Row {
  double local_ms, sync_ms, exchange_share;
};

/// Medians over `reps` steps of each, alternating, after two of each to warm up.
template <class Local, class Synced, int Rank>
Row measure(const Eigen::DSizes<Eigen::Index, Rank>& dims, Eigen::Index channels,
            TimedCommunicator& comm, int reps, const Eigen::ThreadPoolDevice* device) {
  using Tensor = Eigen::Tensor<float, Rank, Eigen::RowMajor>;
  Tensor x(dims), dy(dims), y(dims), dx(dims);
  x.setRandom();
  dy.setRandom();
  Local local(channels);
  Synced synced(channels, bnorm::Options{}, comm);
  auto step = [&](auto& bn) {
    MPI_Barrier(MPI_COMM_WORLD);
    const auto start = Clock::now();
    if (device) {
      bn.forward(x, y, *device);
      bn.backward(dy, dx, *device);
    } else {
      bn.forward(x, y);
      bn.backward(dy, dx);
    }
    return slowest(std::chrono::duration<double>(Clock::now() - start).count());
  };
  for (int i = 0; i < 2; ++i) {
    step(local);
    step(synced);
  }
  std::vector<double> local_s, sync_s, share;
  for (int i = 0; i < reps; ++i) {
    local_s.push_back(step(local));
    comm.seconds = 0;
    const double s = step(synced);
    sync_s.push_back(s);
    share.push_back(slowest(comm.seconds) / s);
  }
  return {1e3 * median(local_s), 1e3 * median(sync_s), median(share)};
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  int reps = 30, threads = 0;
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], "--reps") == 0) reps = std::max(1, std::atoi(argv[++i]));
    else if (std::strcmp(argv[i], "--threads") == 0) threads = std::max(0, std::atoi(argv[++i]));
  }
  int status = 0;
  try {
    TimedCommunicator comm(MPI_COMM_WORLD);
    std::unique_ptr<Eigen::ThreadPool> pool;
    std::unique_ptr<Eigen::ThreadPoolDevice> device;
    if (threads > 0) {
      pool = std::make_unique<Eigen::ThreadPool>(threads);
      device = std::make_unique<Eigen::ThreadPoolDevice>(pool.get(), threads);
    }
    if (comm.rank() == 0)
      std::printf("%d ranks, %d thread(s) each; a training step (forward + backward) on each "
                  "rank's part of the batch, float, medians of %d\n\n"
                  "| per rank | BatchNorm ms | SyncBatchNorm ms | sync / local | exchanges' share "
                  "|\n|---|---|---|---|---|\n",
                  comm.size(), std::max(threads, 1), reps);
    auto report = [&](const char* shape, const Row& r) {
      if (comm.rank() == 0)
        std::printf("| %s | %.3f | %.3f | %.2f | %.0f%% |\n", shape, r.local_ms, r.sync_ms,
                    r.sync_ms / r.local_ms, 100 * r.exchange_share);
    };
    report("8x64x56x56", measure<bnorm::BatchNorm2d<float>, bnorm::SyncBatchNorm2d<float>, 4>(
                             Eigen::DSizes<Eigen::Index, 4>(8, 64, 56, 56), 64, comm, reps, device.get()));
    report("32x256x14x14", measure<bnorm::BatchNorm2d<float>, bnorm::SyncBatchNorm2d<float>, 4>(
                               Eigen::DSizes<Eigen::Index, 4>(32, 256, 14, 14), 256, comm, reps, device.get()));
    report("64x1024", measure<bnorm::BatchNorm1d<float>, bnorm::SyncBatchNorm1d<float>, 2>(
                          Eigen::DSizes<Eigen::Index, 2>(64, 1024), 1024, comm, reps, device.get()));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    status = 1;
  }
  MPI_Finalize();
  return status;
}
