// BatchNorm2d on an image-like batch, on a thread pool.
//
// 16 RGB-like images of 64 x 64 pixels whose channels have different brightness and contrast
// are normalized per channel, once on the calling thread and once on a thread pool: the
// results are identical bit for bit, whatever the number of threads.

#include <bnorm/bnorm.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <thread>

int main() {
  using Images = Eigen::Tensor<float, 4, Eigen::RowMajor>;
  constexpr int N = 16, C = 3, H = 64, W = 64;
  Images x(N, C, H, W);
  x.setRandom();  // uniform in [0, 1)
  const float brightness[C] = {0.8f, 0.4f, 0.1f}, contrast[C] = {0.2f, 0.5f, 0.05f};
  for (int n = 0; n < N; ++n)
    for (int c = 0; c < C; ++c)
      for (int h = 0; h < H; ++h)
        for (int w = 0; w < W; ++w)
          x(n, c, h, w) = brightness[c] + contrast[c] * (x(n, c, h, w) - 0.5f);

  const int threads = int(std::max(2u, std::thread::hardware_concurrency()));
  Eigen::ThreadPool pool(threads);
  Eigen::ThreadPoolDevice device(&pool, threads);

  bnorm::BatchNorm2d<float> single(C), pooled(C);
  const Images y1 = single.forward(x);
  const auto start = std::chrono::steady_clock::now();
  const Images y2 = pooled.forward(x, device);
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();

  std::printf("bnorm BatchNorm2d(%d) on a (%d, %d, %d, %d) image batch, %d threads (%.2f ms)\n\n",
              C, N, C, H, W, threads, ms);
  std::printf("  channel   mean before  std before   mean after  std after   running mean  running var\n");
  auto moments = [&](const Images& t, int c, double& mean, double& std_dev) {
    double sum = 0, sq = 0;
    const double n = double(N) * H * W;
    for (int i = 0; i < N; ++i)
      for (int h = 0; h < H; ++h)
        for (int w = 0; w < W; ++w) sum += t(i, c, h, w);
    mean = sum / n;
    for (int i = 0; i < N; ++i)
      for (int h = 0; h < H; ++h)
        for (int w = 0; w < W; ++w) sq += (t(i, c, h, w) - mean) * (t(i, c, h, w) - mean);
    std_dev = std::sqrt(sq / n);
  };
  for (int c = 0; c < C; ++c) {
    double mi, si, mo, so;
    moments(x, c, mi, si);
    moments(y2, c, mo, so);
    std::printf("  %7d   %11.4f  %10.4f   %10.4f  %9.4f   %12.5f  %11.6f\n", c, mi, si, mo, so,
                double(pooled.running_mean()(c)), double(pooled.running_var()(c)));
  }
  const bool same = std::memcmp(y1.data(), y2.data(), sizeof(float) * std::size_t(y1.size())) == 0;
  std::printf("\n  1 thread and %d threads give %s outputs\n", threads,
              same ? "bit-identical" : "DIFFERENT");
  return same ? 0 : 1;
}
