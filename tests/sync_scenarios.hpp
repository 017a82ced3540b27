#pragma once
// SyncBatchNorm's checks as one rank sees them, for any Communicator: the ranks as threads of one
// process (test_sync.cpp) or as MPI processes (mpi/test_sync_mpi.cpp). A rank asserts nothing:
// Catch's assertions are not thread-safe, so a rank returns what it saw, and check_result asserts
// on the calling thread.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include <catch2/catch.hpp>

#include <bnorm/bnorm.hpp>
#include <bnorm/sync.hpp>

namespace sync_testing {

using Index = std::ptrdiff_t;

/// Wraps a communicator and counts its exchanges.
class Counting : public bnorm::Communicator {
 public:
  explicit Counting(bnorm::Communicator& inner) : inner_(inner) {}
  void allreduce_sum(double* data, std::ptrdiff_t count) override {
    ++calls;
    inner_.allreduce_sum(data, count);
  }
  int rank() const override { return inner_.rank(); }
  int size() const override { return inner_.size(); }
  Index calls = 0;

 private:
  bnorm::Communicator& inner_;
};

/// Every rank's copy of `mine` (n values each), rank r's at r * n: a sum of zeroed slots.
inline std::vector<double> all_gather(bnorm::Communicator& comm, const std::vector<double>& mine) {
  const std::size_t n = mine.size();
  std::vector<double> all(n * std::size_t(comm.size()), 0.0);
  std::copy(mine.begin(), mine.end(), all.begin() + std::ptrdiff_t(n * std::size_t(comm.rank())));
  comm.allreduce_sum(all.data(), Index(all.size()));
  return all;
}

/// The same seed on every rank: rank 0's.
inline std::uint64_t shared_seed(bnorm::Communicator& comm, std::uint64_t mine) {
  double seed = comm.rank() == 0 ? double(mine % (std::uint64_t(1) << 52)) : 0.0;
  comm.allreduce_sum(&seed, 1);
  return std::uint64_t(seed);
}

/// What one rank saw, training SyncBatchNorm2d on its part of a batch beside a single-process
/// BatchNorm2d on the whole batch. Errors are relative: |a - b| / max(1, |b|), the worst.
template <class T>
struct Result {
  double y = 0, dx = 0, grads = 0, running = 0;
  bool running_same_on_every_rank = true;  ///< bit for bit
  bool tracked_same = true;                ///< num_batches_tracked as the single process's
  std::vector<T> last_y, last_dx;          ///< this rank's, for comparisons of bits
};

inline double worst(double so_far, double a, double b) {
  if (std::isnan(a) != std::isnan(b)) return INFINITY;
  return std::max(so_far, std::abs(a - b) / std::max(1.0, std::abs(b)));
}

/// `steps` training steps (forward, backward, the parameters' gradients summed over the ranks,
/// an SGD update) of a batch whose samples go to the ranks in rank order, batches[r] to rank r,
/// in NCHW or NHWC.
template <class T>
Result<T> train_beside_single_process(bnorm::Communicator& comm, const std::vector<Index>& batches,
                                      bnorm::Layout layout, int steps, std::uint64_t seed,
                                      const Eigen::ThreadPoolDevice* device = nullptr) {
  using Tensor = Eigen::Tensor<T, 4, Eigen::RowMajor>;
  using Map = Eigen::TensorMap<Tensor>;
  constexpr Index C = 5, H = 3, W = 7;
  const bool last = layout == bnorm::Layout::ChannelsLast;
  const int rank = comm.rank();
  Index total = 0, offset = 0;
  for (std::size_t r = 0; r < batches.size(); ++r) {
    if (Index(r) < rank) offset += batches[r];
    total += batches[r];
  }
  const Index mine = batches[std::size_t(rank)], sample = C * H * W;
  auto dims = [&](Index n) {
    return last ? Eigen::DSizes<Index, 4>(n, H, W, C) : Eigen::DSizes<Index, 4>(n, C, H, W);
  };

  bnorm::Options options;
  options.layout = layout;
  bnorm::SyncBatchNorm2d<T> sync(C, options, comm);
  bnorm::BatchNorm2d<T> single(C, options);
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> normal;
  for (Index c = 0; c < C; ++c) {
    sync.weight()(c) = single.weight()(c) = T(1 + 0.2 * normal(gen));
    sync.bias()(c) = single.bias()(c) = T(0.5 * normal(gen));
  }

  Result<T> result;
  Tensor x(dims(total)), dy(dims(total)), y_mine(dims(mine)), dx_mine(dims(mine));
  for (int step = 0; step < steps; ++step) {
    // Channels with non-zero means and spreads of their own.
    for (Index i = 0; i < x.size(); ++i) {
      const Index c = last ? i % C : i / (H * W) % C;
      x.data()[i] = T(3.0 * double(c + 1) + double(c + 1) * normal(gen));
      dy.data()[i] = T(normal(gen) + 0.1 * double(c));
    }
    const Map x_mine(x.data() + offset * sample, dims(mine));
    const Map dy_mine(dy.data() + offset * sample, dims(mine));
    if (device) sync.forward(x_mine, y_mine, *device);
    else sync.forward(x_mine, y_mine);
    const Tensor y = single.forward(x);
    if (device) sync.backward(dy_mine, dx_mine, *device);
    else sync.backward(dy_mine, dx_mine);
    const Tensor dx = single.backward(dy);
    for (Index i = 0; i < mine * sample; ++i) {
      result.y = worst(result.y, double(y_mine.data()[i]), double(y.data()[offset * sample + i]));
      result.dx = worst(result.dx, double(dx_mine.data()[i]), double(dx.data()[offset * sample + i]));
    }
    // Data parallelism: the parameters' gradients summed over the ranks, then one SGD step.
    std::vector<double> grads(2 * C);
    for (Index c = 0; c < C; ++c) {
      grads[std::size_t(c)] = double(sync.grad_weight()(c));
      grads[std::size_t(C + c)] = double(sync.grad_bias()(c));
    }
    comm.allreduce_sum(grads.data(), Index(grads.size()));
    for (Index c = 0; c < C; ++c) {
      result.grads = worst(result.grads, grads[std::size_t(c)], double(single.grad_weight()(c)));
      result.grads = worst(result.grads, grads[std::size_t(C + c)], double(single.grad_bias()(c)));
      sync.weight()(c) -= T(0.05 * grads[std::size_t(c)]);
      sync.bias()(c) -= T(0.05 * grads[std::size_t(C + c)]);
      single.weight()(c) -= T(0.05 * double(single.grad_weight()(c)));
      single.bias()(c) -= T(0.05 * double(single.grad_bias()(c)));
    }
    sync.zero_grad();
    single.zero_grad();

    std::vector<double> running(2 * C);
    for (Index c = 0; c < C; ++c) {
      running[std::size_t(c)] = double(sync.running_mean()(c));
      running[std::size_t(C + c)] = double(sync.running_var()(c));
      result.running = worst(result.running, running[std::size_t(c)],
                             double(single.running_mean()(c)));
      result.running = worst(result.running, running[std::size_t(C + c)],
                             double(single.running_var()(c)));
    }
    const std::vector<double> every = all_gather(comm, running);
    for (std::size_t i = 0; i < every.size(); ++i)
      if (std::memcmp(&every[i], &running[i % running.size()], sizeof(double)) != 0)
        result.running_same_on_every_rank = false;
    if (sync.num_batches_tracked() != single.num_batches_tracked()) result.tracked_same = false;
  }
  result.last_y.assign(y_mine.data(), y_mine.data() + y_mine.size());
  result.last_dx.assign(dx_mine.data(), dx_mine.data() + dx_mine.size());
  return result;
}

/// The tolerances of the contract: relative to single-process BatchNorm on the whole batch.
template <class T>
constexpr double tolerance() {
  return sizeof(T) == 4 ? 1e-5 : 1e-12;
}

/// CHECK, not REQUIRE: an MPI rank that left a test case early would leave the others waiting in
/// an exchange.
template <class T>
void check_result(const Result<T>& r) {
  const double tol = tolerance<T>();
  CHECK(r.y <= tol);
  CHECK(r.dx <= tol);
  CHECK(r.grads <= tol);
  CHECK(r.running <= tol);
  CHECK(r.running_same_on_every_rank);
  CHECK(r.tracked_same);
}

}  // namespace sync_testing
