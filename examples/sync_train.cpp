// Data-parallel training over MPI processes, with SyncBatchNorm and without. Each step's batch of
// 64 spirals points is split over the ranks; each rank runs the MLP of mlp.hpp on its part, and
// the parameters' gradients are summed over the ranks (as PyTorch's DistributedDataParallel
// does), so every rank keeps the same weights. The batch norms differ:
//   - SyncBatchNorm1d normalizes with the statistics of the whole batch of 64: its results, and
//     its running statistics, are those of one process training on the whole batch, and the same
//     on every rank;
//   - BatchNorm1d normalizes each rank's part with its own statistics: with 4 ranks, batches of
//     16, whose noisier statistics each rank's running averages follow apart.
// Beside them every rank trains the same network on the whole batch in one process, the
// reference. Rank 0 prints, epoch by epoch, how far the running means of the first batch norm
// lie apart across the ranks and from the reference's, and the held-out accuracy.
//
//   mpirun -np 4 bnorm_sync_train [--epochs N] [--require]
//
// --require: exit 1 unless SyncBatchNorm's running statistics are the same on every rank and
// within 1e-3 of the reference's, while BatchNorm1d's differ across the ranks.

#include <mpi.h>

#include <bnorm/bnorm.hpp>
#include <bnorm/mpi.hpp>
#include <bnorm/sync.hpp>

#include "mlp.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace {

using example::Matrix;
constexpr int kBatch = 64;
constexpr float kLearningRate = 0.1f;

/// Every rank's running mean of the first batch norm: the largest difference from rank 0's, and
/// rank 0's largest difference from the reference's.
template <class Net>
std::pair<double, double> spread(bnorm::Communicator& comm, const Net& net,
                                 const example::Mlp<>& reference) {
  const auto& mean = net.bn1->running_mean();
  const Eigen::Index C = mean.size();
  std::vector<double> all(std::size_t(C * comm.size()), 0.0);
  for (Eigen::Index c = 0; c < C; ++c) all[std::size_t(comm.rank() * C + c)] = mean(c);
  comm.allreduce_sum(all.data(), Eigen::Index(all.size()));
  double across = 0, from_reference = 0;
  for (Eigen::Index c = 0; c < C; ++c) {
    for (int r = 1; r < comm.size(); ++r)
      across = std::max(across, std::abs(all[std::size_t(r * C + c)] - all[std::size_t(c)]));
    from_reference =
        std::max(from_reference, std::abs(all[std::size_t(c)] - reference.bn1->running_mean()(c)));
  }
  return {across, from_reference};
}

/// One data-parallel step on this rank's rows [first, last) of the batch.
template <class Net>
void data_parallel_step(bnorm::Communicator& comm, Net& net, const Matrix& xb,
                        const std::vector<int>& yb, Eigen::Index first, Eigen::Index last) {
  const Matrix x = xb.middleRows(first, last - first);
  const std::vector<int> y(yb.begin() + first, yb.begin() + last);
  Matrix grad;
  example::cross_entropy(net.forward(x), y, &grad);
  grad *= float(last - first) / float(kBatch);  // the gradient of the whole batch's mean loss
  net.backward(grad);
  std::vector<double> sum;
  net.for_each_gradient([&](float* g, Eigen::Index n) {
    sum.assign(g, g + n);
    comm.allreduce_sum(sum.data(), n);
    std::transform(sum.begin(), sum.end(), g, [](double v) { return float(v); });
  });
  net.step(kLearningRate);
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  int epochs = 5;
  bool require = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--epochs") == 0 && i + 1 < argc) epochs = std::atoi(argv[++i]);
    else if (std::strcmp(argv[i], "--require") == 0) require = true;
  }
  int status = 0;
  try {
    bnorm::MpiCommunicator comm(MPI_COMM_WORLD);
    const int rank = comm.rank(), size = comm.size();
    std::mt19937 data_rng(2024);
    const example::Data train_set = example::spirals(2048, data_rng),
                        test_set = example::spirals(1024, data_rng);
    // The same initial weights everywhere (the Linear layers draw them; batch norms start at 1, 0).
    std::mt19937 a(7), b(7), c(7);
    bnorm::Options options;
    example::Mlp<bnorm::SyncBatchNorm1d<float>> synced(true, 1.0f, a, options, comm);
    example::Mlp<> local(true, 1.0f, b), reference(true, 1.0f, c);
    const Eigen::Index first = Eigen::Index(rank) * kBatch / size,
                       last = Eigen::Index(rank + 1) * kBatch / size;
    if (rank == 0)
      std::printf("%d ranks, batches of %d split %ld..%ld rows per rank. Running means of the "
                  "first batch norm: largest difference across the ranks / from one process on "
                  "the whole batch; held-out accuracy\n\n"
                  "| epoch | SyncBatchNorm1d: across | from one process | accuracy | "
                  "BatchNorm1d per rank: across | from one process | accuracy |\n"
                  "|---|---|---|---|---|---|---|\n",
                  size, kBatch, long(kBatch / size), long((kBatch + size - 1) / size));
    std::vector<int> order(train_set.label.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = int(i);
    std::mt19937 shuffle_rng(11);
    Matrix xb(kBatch, 2), grad;
    std::vector<int> yb(kBatch);
    std::pair<double, double> sync_spread, local_spread;
    for (int epoch = 1; epoch <= epochs; ++epoch) {
      std::shuffle(order.begin(), order.end(), shuffle_rng);
      for (std::size_t start = 0; start + kBatch <= order.size(); start += kBatch) {
        for (int i = 0; i < kBatch; ++i) {
          xb.row(i) = train_set.x.row(order[start + std::size_t(i)]);
          yb[std::size_t(i)] = train_set.label[std::size_t(order[start + std::size_t(i)])];
        }
        data_parallel_step(comm, synced, xb, yb, first, last);
        data_parallel_step(comm, local, xb, yb, first, last);
        example::cross_entropy(reference.forward(xb), yb, &grad);
        reference.backward(grad);
        reference.step(kLearningRate);
      }
      sync_spread = spread(comm, synced, reference);
      local_spread = spread(comm, local, reference);
      if (rank == 0)
        std::printf("| %d | %.3g | %.3g | %.1f%% | %.3g | %.3g | %.1f%% |\n", epoch,
                    sync_spread.first, sync_spread.second,
                    100 * example::accuracy(synced.infer(test_set.x), test_set.label),
                    local_spread.first, local_spread.second,
                    100 * example::accuracy(local.infer(test_set.x), test_set.label));
    }
    if (require && !(sync_spread.first == 0 && sync_spread.second < 1e-3 &&
                     (size == 1 || local_spread.first > 0))) {
      if (rank == 0) std::printf("FAILED: the running statistics are not as expected\n");
      status = 1;
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    status = 1;
  }
  MPI_Finalize();
  return status;
}
