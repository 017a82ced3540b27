// A consumer of bnorm: one training step and one inference step of a BatchNorm2d.
#include <bnorm/bnorm.hpp>

#include <cmath>
#include <cstdio>

int main() {
  bnorm::BatchNorm2d<float> bn(3);
  Eigen::Tensor<float, 4, Eigen::RowMajor> x(4, 3, 5, 5);
  x.setRandom();
  x = x * 3.f + 7.f;
  Eigen::Tensor<float, 4, Eigen::RowMajor> y = bn.forward(x);
  // Normalized: each channel's mean is ~0 now.
  Eigen::Tensor<float, 0, Eigen::RowMajor> mean = y.chip(0, 1).mean();
  bn.eval();
  y = bn.forward(x);
  const bool ok = std::abs(mean()) < 1e-4f && bn.num_batches_tracked() == 1;
  std::printf("bnorm consumer: channel 0 mean after normalization %g: %s\n", double(mean()),
              ok ? "ok" : "WRONG");
  return ok ? 0 : 1;
}
