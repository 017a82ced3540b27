// Soak: a million small training steps on one module, then many threads sharing one eval-mode
// module through the const infer(), each checking every output. Built and run under
// AddressSanitizer (leaks: LeakSanitizer) and ThreadSanitizer (data races) in CI.
//
//   bnorm_soak [steps]      (default 1000000; BNORM_SOAK_STEPS overrides too)

#include <bnorm/instances.hpp>  // the kernels compiled once, in instances.cpp

#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace {

int fail(const std::string& what) {
  std::fprintf(stderr, "bnorm_soak: FAILED: %s\n", what.c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  long steps = 1000000;
  if (const char* env = std::getenv("BNORM_SOAK_STEPS")) steps = std::atol(env);
  if (argc > 1) steps = std::atol(argv[1]);

  // 1. Many small training steps: forward, backward, now and then an eval step and a reset.
  bnorm::BatchNorm1d<float> bn(3);
  Eigen::Tensor<float, 2, Eigen::RowMajor> x(4, 3), dy(4, 3);
  std::uint32_t state = 7;
  auto uniform = [&state] {
    state = state * 1664525u + 1013904223u;
    return float(state >> 8) * (1.f / 16777216.f);
  };
  for (long step = 0; step < steps; ++step) {
    for (Eigen::Index i = 0; i < x.size(); ++i) {
      x.data()[i] = 5.f + uniform();
      dy.data()[i] = uniform() - 0.5f;
    }
    bn.train(step % 10 != 9);
    const auto y = bn.forward(x);
    const auto dx = bn.backward(dy);
    if (!std::isfinite(y(0, 0)) || !std::isfinite(dx(3, 2)))
      return fail("non-finite result at step " + std::to_string(step));
    if (step % 1000 == 999) bn.zero_grad();
    if (step % 100000 == 99999) bn.reset_running_stats();
  }
  if (bn.num_batches_tracked() != (steps % 100000) - (steps % 100000) / 10)
    return fail("num_batches_tracked " + std::to_string(bn.num_batches_tracked()));

  // 2. One eval-mode module shared by many threads, some with a thread pool of their own.
  bnorm::BatchNorm2d<float> shared(5);
  Eigen::Tensor<float, 4, Eigen::RowMajor> batch(6, 5, 7, 9);
  for (Eigen::Index i = 0; i < batch.size(); ++i) batch.data()[i] = 2.f + 3.f * uniform();
  for (int i = 0; i < 20; ++i) shared.forward(batch);
  shared.eval();
  const Eigen::Tensor<float, 4, Eigen::RowMajor> expected = shared.infer(batch);
  std::atomic<int> mismatches{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      Eigen::ThreadPool pool(2);
      Eigen::ThreadPoolDevice device(&pool, 2);
      for (int i = 0; i < 200; ++i) {
        const Eigen::Tensor<float, 4, Eigen::RowMajor> y =
            t % 2 ? shared.infer(batch, device) : shared.infer(batch);
        if (std::memcmp(y.data(), expected.data(), sizeof(float) * std::size_t(y.size())) != 0)
          ++mismatches;
      }
    });
  }
  for (auto& t : threads) t.join();
  if (mismatches != 0) return fail(std::to_string(mismatches.load()) + " shared inferences differ");

  std::printf("bnorm_soak: ok: %ld training steps, 1600 concurrent inferences\n",
              steps);
  return 0;
}
