// SyncBatchNorm with its ranks as threads of this process, over an in-process Communicator:
// the results of single-process BatchNorm on the whole batch, the same bits on every rank and
// thread count, errors every rank throws alike, and the functional layer's three steps.

#include <chrono>
#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <thread>

#include "util.hpp"
// After util.hpp, whose instances.hpp comes before any call of bnorm.
#include "sync_scenarios.hpp"

namespace {

using testing::Index;

/// Ranks as threads: allreduce_sum waits for every rank, then the last to arrive sums the arrays
/// in rank order into each of them.
class ThreadGroup {
 public:
  explicit ThreadGroup(int size) : size_(size), data_(std::size_t(size)), counts_(std::size_t(size)) {}
  int size() const { return size_; }

  void allreduce_sum(int rank, double* data, Index count) {
    std::unique_lock<std::mutex> lock(mutex_);
    data_[std::size_t(rank)] = data;
    counts_[std::size_t(rank)] = count;
    const std::uint64_t generation = generation_;
    if (++arrived_ == size_) {
      for (int r = 1; r < size_; ++r)
        if (counts_[std::size_t(r)] != counts_[0]) failed_ = true;
      if (!failed_) {
        sum_.assign(std::size_t(count), 0.0);
        for (int r = 0; r < size_; ++r)
          for (Index i = 0; i < count; ++i) sum_[std::size_t(i)] += data_[std::size_t(r)][i];
        for (int r = 0; r < size_; ++r) std::copy(sum_.begin(), sum_.end(), data_[std::size_t(r)]);
      }
      arrived_ = 0;
      ++generation_;
      changed_.notify_all();
    } else if (!changed_.wait_for(lock, std::chrono::seconds(60),
                                  [&] { return generation_ != generation; })) {
      failed_ = true;
      throw std::runtime_error("ThreadGroup: the ranks are out of step (a rank never came)");
    }
    if (failed_) throw std::runtime_error("ThreadGroup: the ranks' counts differ");
  }

 private:
  int size_;
  std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<double*> data_;
  std::vector<Index> counts_;
  std::vector<double> sum_;
  int arrived_ = 0;
  std::uint64_t generation_ = 0;
  bool failed_ = false;
};

class ThreadCommunicator : public bnorm::Communicator {
 public:
  ThreadCommunicator(ThreadGroup& group, int rank) : group_(group), rank_(rank) {}
  void allreduce_sum(double* data, std::ptrdiff_t count) override {
    group_.allreduce_sum(rank_, data, count);
  }
  int rank() const override { return rank_; }
  int size() const override { return group_.size(); }

 private:
  ThreadGroup& group_;
  int rank_;
};

/// Runs fn(comm) on `size` ranks, each a thread; returns what each returned, rethrowing none.
template <class R>
std::vector<R> on_ranks(int size, const std::function<R(bnorm::Communicator&)>& fn) {
  ThreadGroup group(size);
  std::vector<R> results(static_cast<std::size_t>(size));
  std::vector<std::thread> threads;
  for (int r = 0; r < size; ++r)
    threads.emplace_back([&, r] {
      ThreadCommunicator comm(group, r);
      results[std::size_t(r)] = fn(comm);
    });
  for (auto& t : threads) t.join();
  return results;
}

/// What a rank's call threw: its message, or "" where it returned.
using Outcome = std::string;
template <class Fn>
Outcome outcome_of(Fn&& fn) {
  try {
    fn();
  } catch (const std::invalid_argument& e) {
    return std::string("invalid_argument: ") + e.what();
  } catch (const std::exception& e) {
    return std::string("other: ") + e.what();
  }
  return "";
}

}  // namespace

TEMPLATE_TEST_CASE("SyncBatchNorm over ranks gives single-process BatchNorm's results on the "
                   "whole batch, the same running statistics on every rank",
                   "[sync]", float, double) {
  using T = TestType;
  const auto layout = GENERATE(bnorm::Layout::ChannelsFirst, bnorm::Layout::ChannelsLast);
  // Uneven batches, an empty rank, a rank of one sample.
  const auto batches = GENERATE(
      Catch::Generators::values<std::vector<Index>>({{3, 4}, {5, 0, 2}, {1, 6, 3}}));
  const std::uint64_t seed = testing::rng()();
  CAPTURE(int(layout), batches.size(), batches[0], batches[1]);
  const auto results = on_ranks<sync_testing::Result<T>>(int(batches.size()), [&](auto& comm) {
    return sync_testing::train_beside_single_process<T>(comm, batches, layout, 3, seed);
  });
  for (const auto& r : results) sync_testing::check_result(r);
}

TEST_CASE("SyncBatchNorm: every rank's bits are the same on any thread count", "[sync][threads]") {
  const std::vector<Index> batches{4, 3, 5};
  const std::uint64_t seed = testing::rng()();
  using Result = sync_testing::Result<float>;
  const auto alone = on_ranks<Result>(3, [&](auto& comm) {
    return sync_testing::train_beside_single_process<float>(comm, batches,
                                                            bnorm::Layout::ChannelsFirst, 2, seed);
  });
  // Each rank on a pool of its own, of 1 + rank workers.
  const auto pooled = on_ranks<Result>(3, [&](auto& comm) {
    testing::Pool pool(1 + comm.rank());
    return sync_testing::train_beside_single_process<float>(
        comm, batches, bnorm::Layout::ChannelsFirst, 2, seed, pool.device.get());
  });
  for (int r = 0; r < 3; ++r) {
    CAPTURE(r);
    CHECK(testing::same_bits(alone[std::size_t(r)].last_y, pooled[std::size_t(r)].last_y));
    CHECK(testing::same_bits(alone[std::size_t(r)].last_dx, pooled[std::size_t(r)].last_dx));
  }
}

TEST_CASE("SyncBatchNorm exchanges once per training pass, never in eval or infer", "[sync]") {
  using Tensor = Eigen::Tensor<float, 4, Eigen::RowMajor>;
  struct Calls {
    Index first_forward = 0, backward = 0, second_forward = 0, eval = 0;
  };
  const auto calls = on_ranks<Calls>(2, [](bnorm::Communicator& inner) {
    sync_testing::Counting comm(inner);
    bnorm::SyncBatchNorm2d<float> bn(3, {}, comm);
    Tensor x(2, 3, 4, 4);
    x.setRandom();
    Calls c;
    bn.forward(x);
    c.first_forward = comm.calls;
    bn.backward(x);
    c.backward = comm.calls - c.first_forward;
    bn.forward(x);
    c.second_forward = comm.calls - c.first_forward - c.backward;
    const Index before = comm.calls;
    bn.eval();
    bn.forward(x);
    bn.backward(x);
    bn.infer(x);
    bn.train();
    bn.infer(x);
    c.eval = comm.calls - before;
    return c;
  });
  for (const auto& c : calls) {
    CHECK(c.first_forward == 2);  // the channel counts agreed, then the moments
    CHECK(c.backward == 1);
    CHECK(c.second_forward == 1);
    CHECK(c.eval == 0);
  }
}

namespace {

/// A rank's module state, to check that a failed call changed none of it.
struct State {
  std::vector<float> running_mean, running_var, weight;
  std::int64_t tracked = 0;
  bool operator==(const State& o) const {
    return testing::same_bits(running_mean, o.running_mean) &&
           testing::same_bits(running_var, o.running_var) && testing::same_bits(weight, o.weight) &&
           tracked == o.tracked;
  }
};
template <class BN>
State state_of(const BN& bn) {
  return {testing::values(bn.running_mean()), testing::values(bn.running_var()),
          testing::values(bn.weight()), bn.num_batches_tracked()};
}

struct Failure {
  Outcome outcome;
  bool state_kept = false;
  bool next_call_works = false;
};

}  // namespace

TEST_CASE("SyncBatchNorm: where one rank's call is wrong, every rank throws and keeps its state",
          "[sync][errors]") {
  using Tensor = Eigen::Tensor<float, 4, Eigen::RowMajor>;
  SECTION("different num_features") {
    const auto out = on_ranks<Failure>(3, [](bnorm::Communicator& comm) {
      const Index C = comm.rank() == 1 ? 4 : 3;
      bnorm::SyncBatchNorm2d<float> bn(C, {}, comm);
      Tensor x(2, C, 3, 3);
      x.setRandom();
      const State before = state_of(bn);
      Failure f;
      f.outcome = outcome_of([&] { bn.forward(x); });
      f.state_kept = state_of(bn) == before;
      return f;
    });
    for (const auto& f : out) {
      CHECK_THAT(f.outcome, Catch::Contains("invalid_argument") &&
                                Catch::Contains("expected every rank to have") &&
                                Catch::Contains("rank by rank: 3, 4, 3"));
      CHECK(f.state_kept);
    }
  }
  SECTION("one rank's input of the wrong shape, in a forward and in a backward") {
    const bool in_backward = GENERATE(false, true);
    const auto out = on_ranks<Failure>(3, [&](bnorm::Communicator& comm) {
      bnorm::SyncBatchNorm2d<float> bn(3, {}, comm);
      Tensor x(2, 3, 3, 3), wrong(2, 5, 3, 3);
      x.setRandom();
      wrong.setRandom();
      if (in_backward) bn.forward(x);
      const State before = state_of(bn);
      const Eigen::Tensor<float, 1> grad_before = bn.grad_weight();
      Failure f;
      const bool wrong_here = comm.rank() == 2;
      f.outcome = outcome_of([&] {
        if (in_backward) bn.backward(wrong_here ? wrong : x);
        else bn.forward(wrong_here ? wrong : x);
      });
      f.state_kept = state_of(bn) == before &&
                     testing::values(bn.grad_weight()) == testing::values(grad_before);
      // The ranks are still in step: the same call, right everywhere, goes through.
      f.next_call_works = outcome_of([&] {
        if (in_backward) bn.backward(x);
        else bn.forward(x);
      }).empty();
      return f;
    });
    CAPTURE(in_backward);
    // The rank whose own check failed names the module it is too.
    CHECK_THAT(out[2].outcome, Catch::Contains("bnorm::SyncBatchNorm2d: ") &&
                                   Catch::Contains("2, 5, 3, 3]"));
    for (int r : {0, 1})
      CHECK_THAT(out[std::size_t(r)].outcome,
                 Catch::Contains("invalid_argument") && Catch::Contains("SyncBatchNorm2d") &&
                     Catch::Contains("rank 2 of 3 rejected its call"));
    for (const auto& f : out) {
      CHECK(f.state_kept);
      CHECK(f.next_call_works);
    }
  }
  SECTION("one value per channel over all ranks") {
    const auto out = on_ranks<Failure>(2, [](bnorm::Communicator& comm) {
      bnorm::SyncBatchNorm1d<float> bn(3, {}, comm);
      Eigen::Tensor<float, 2, Eigen::RowMajor> x(comm.rank() == 0 ? 1 : 0, 3);
      x.setRandom();
      const State before = state_of(bn);
      Failure f;
      f.outcome = outcome_of([&] { bn.forward(x); });
      f.state_kept = state_of(bn) == before;
      // One value per channel on each rank, two in all: fine.
      Eigen::Tensor<float, 2, Eigen::RowMajor> one(1, 3);
      one.setRandom();
      f.next_call_works = outcome_of([&] { bn.forward(one); }).empty();
      return f;
    });
    for (const auto& f : out) {
      CHECK_THAT(f.outcome, Catch::Contains("Expected more than 1 value per channel when "
                                            "training, got 1 over all ranks"));
      CHECK(f.state_kept);
      CHECK(f.next_call_works);
    }
  }
  SECTION("virtual_batch_size") {
    ThreadGroup group(1);
    ThreadCommunicator comm(group, 0);
    bnorm::Options o;
    o.virtual_batch_size = 4;
    CHECK_THROWS_WITH((bnorm::SyncBatchNorm2d<float>(3, o, comm)),
                      Catch::Contains("bnorm::SyncBatchNorm2d: expected virtual_batch_size 0"));
    o.virtual_batch_size = 0;
    o.eps = -1;
    CHECK_THROWS_WITH((bnorm::SyncBatchNorm2d<float>(3, o, comm)),
                      Catch::StartsWith("bnorm::SyncBatchNorm2d: expected eps"));
  }
}

TEST_CASE("SyncBatchNorm: a batch empty on every rank learns nothing", "[sync]") {
  const auto out = on_ranks<Failure>(2, [](bnorm::Communicator& comm) {
    bnorm::SyncBatchNorm2d<float> bn(3, {}, comm);
    Eigen::Tensor<float, 4, Eigen::RowMajor> x(0, 3, 2, 2), dx(0, 3, 2, 2);
    const State before = state_of(bn);
    Failure f;
    f.outcome = outcome_of([&] {
      bn.forward(x);
      bn.backward(x, dx);
    });
    f.state_kept = state_of(bn) == before && testing::values(bn.grad_weight()) ==
                                                 std::vector<float>(3, 0.0f);
    return f;
  });
  for (const auto& f : out) {
    CHECK(f.outcome.empty());
    CHECK(f.state_kept);
  }
}

TEMPLATE_TEST_CASE("functional: local moments, merged in order, then applied, give "
                   "forward_training and backward on the whole batch",
                   "[sync][functional]", float, double) {
  using T = TestType;
  namespace F = bnorm::functional;
  const auto layout = GENERATE(bnorm::Layout::ChannelsFirst, bnorm::Layout::ChannelsLast);
  const Index C = 6, S = 13;
  const std::vector<Index> shards{4, 0, 7, 2};
  Index N = 0;
  for (Index n : shards) N += n;
  const reference::Shape whole_ref{N, C, S, layout};
  const std::vector<T> x = testing::random_input<T>(whole_ref, 50.0);
  // (dy of one scale: channels of widely different spreads make dx's float terms cancel.)
  const std::vector<T> dy = testing::random_vector<T>(whole_ref.size(), -1.0, 1.0);
  const std::vector<T> weight = testing::random_vector<T>(C, 0.5, 2.0);
  const std::vector<T> bias = testing::random_vector<T>(C, -1.0, 1.0);
  const F::Affine<T> affine{weight.data(), bias.data()};

  // The whole batch at once.
  std::vector<T> y(x.size()), mean(C), invstd(C), dx(x.size()), gw(C), gb(C);
  std::vector<T> rmean(C, T(0.5)), rvar(C, T(2));
  const F::Shape whole{N, C, S, layout};
  F::forward_training<T>(whole, x.data(), y.data(), 1e-5, affine, {mean.data(), invstd.data()},
                         {rmean.data(), rvar.data(), 0.1});
  F::backward<T>(whole, dy.data(), x.data(), dx.data(), F::Statistics::Batch, mean.data(),
                 invstd.data(), weight.data(), gw.data(), gb.data());

  // Shard by shard.
  std::vector<F::Moments> total(C), local(C);
  for (std::size_t k = 0, first = 0; k < shards.size(); first += std::size_t(shards[k] * C * S), ++k) {
    F::local_moments<T>({shards[k], C, S, layout}, x.data() + first, local.data());
    for (Index c = 0; c < C; ++c) total[std::size_t(c)] = F::merge(total[std::size_t(c)], local[std::size_t(c)]);
  }
  for (Index c = 0; c < C; ++c) CHECK(total[std::size_t(c)].count == double(N * S));
  std::vector<T> ys = testing::poisoned<T>(Index(x.size())), dxs = testing::poisoned<T>(Index(x.size()));
  std::vector<T> ms(C), is(C), rm(C, T(0.5)), rv(C, T(2));
  std::vector<double> gw_sum(C, 0.0), gb_sum(C, 0.0);
  std::vector<F::BackwardSums> sums(C), local_sums(C);
  for (std::size_t k = 0, first = 0; k < shards.size(); first += std::size_t(shards[k] * C * S), ++k)
    F::forward_from_moments<T>({shards[k], C, S, layout}, total.data(), x.data() + first,
                               ys.data() + first, 1e-5, affine, {ms.data(), is.data()},
                               {k == 0 ? rm.data() : nullptr, k == 0 ? rv.data() : nullptr, 0.1});
  for (std::size_t k = 0, first = 0; k < shards.size(); first += std::size_t(shards[k] * C * S), ++k) {
    F::local_gradient_sums<T>({shards[k], C, S, layout}, dy.data() + first, x.data() + first,
                              ms.data(), local_sums.data());
    for (Index c = 0; c < C; ++c) {
      sums[std::size_t(c)] = F::merge(sums[std::size_t(c)], local_sums[std::size_t(c)]);
      gb_sum[std::size_t(c)] += local_sums[std::size_t(c)].dy;
      gw_sum[std::size_t(c)] += local_sums[std::size_t(c)].dy_centered * double(is[std::size_t(c)]);
    }
  }
  for (std::size_t k = 0, first = 0; k < shards.size(); first += std::size_t(shards[k] * C * S), ++k)
    F::backward_from_sums<T>({shards[k], C, S, layout}, sums.data(), dy.data() + first,
                             x.data() + first, dxs.data() + first, ms.data(), is.data(),
                             weight.data());
  const double tol = sync_testing::tolerance<T>();
  auto close = [&](const std::vector<T>& a, const std::vector<T>& b) {
    double w = 0;
    for (std::size_t i = 0; i < a.size(); ++i) w = sync_testing::worst(w, double(a[i]), double(b[i]));
    return w;
  };
  CHECK(close(ys, y) <= tol);
  CHECK(close(dxs, dx) <= tol);
  CHECK(close(ms, mean) <= tol);
  CHECK(close(is, invstd) <= tol);
  CHECK(close(rm, rmean) <= tol);
  CHECK(close(rv, rvar) <= tol);
  CHECK(close(std::vector<T>(gw_sum.begin(), gw_sum.end()), gw) <= tol);
  CHECK(close(std::vector<T>(gb_sum.begin(), gb_sum.end()), gb) <= tol);

  SECTION("merged moments of one value per channel are refused") {
    std::vector<F::Moments> one(C);
    for (auto& m : one) m.count = 1;
    CHECK_THROWS_WITH(F::forward_from_moments<T>({1, C, 1, layout}, one.data(), x.data(),
                                                 ys.data(), 1e-5),
                      Catch::Contains("more than 1 value per channel"));
  }
}

TEST_CASE("SyncBatchNorm on one rank is BatchNorm, bit for bit, Batch Renormalization and the "
          "fused add + ReLU included", "[sync][renorm][fused]") {
  using Tensor = Eigen::Tensor<float, 4, Eigen::RowMajor>;
  ThreadGroup group(1);
  ThreadCommunicator comm(group, 0);
  for (bool renorm : {false, true}) {
    for (bool fused : {false, true}) {
      bnorm::Options o;
      o.layout = bnorm::Layout::ChannelsLast;
      if (renorm) o.renorm = bnorm::Renorm{1.2, 0.3};
      if (fused) o.activation = bnorm::Activation::ReLU;
      bnorm::SyncBatchNorm2d<float> synced(4, o, comm);
      bnorm::BatchNorm2d<float> local(4, o);
      const reference::Shape sh{3, 4, 10, bnorm::Layout::ChannelsLast};
      for (int step = 0; step < 3; ++step) {
        const auto x = testing::random_input<float>(sh), dy = testing::random_input<float>(sh, 1.0);
        const auto z = testing::random_vector<float>(sh.size(), -1, 1);
        Eigen::TensorMap<const Tensor> xm(x.data(), 3, 2, 5, 4), dym(dy.data(), 3, 2, 5, 4),
            zm(z.data(), 3, 2, 5, 4);
        Tensor y1(3, 2, 5, 4), y2(3, 2, 5, 4), d1(3, 2, 5, 4), d2(3, 2, 5, 4), dz1(3, 2, 5, 4),
            dz2(3, 2, 5, 4);
        if (fused) {
          synced.forward_add(xm, zm, y1);
          local.forward_add(xm, zm, y2);
          synced.backward_add(dym, d1, dz1);
          local.backward_add(dym, d2, dz2);
          CHECK(std::equal(dz1.data(), dz1.data() + dz1.size(), dz2.data()));
        } else {
          synced.forward(xm, y1);
          local.forward(xm, y2);
          synced.backward(dym, d1);
          local.backward(dym, d2);
        }
        CAPTURE(renorm, fused, step);
        CHECK(std::equal(y1.data(), y1.data() + y1.size(), y2.data()));
        CHECK(std::equal(d1.data(), d1.data() + d1.size(), d2.data()));
      }
      CHECK(testing::values(synced.grad_weight()) == testing::values(local.grad_weight()));
      CHECK(testing::values(synced.running_mean()) == testing::values(local.running_mean()));
    }
  }
}
