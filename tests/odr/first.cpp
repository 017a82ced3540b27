// Includes every public header the usual way; second.cpp includes Eigen first, without
// EIGEN_USE_THREADS. Both define the same inline functions and templates: the program links only
// if nothing in the headers breaks the one-definition rule.
#include <bnorm/batch_norm.hpp>
#include <bnorm/bnorm.hpp>
#include <bnorm/functional.hpp>
#include <bnorm/options.hpp>
#include <bnorm/sync.hpp>

float second_translation_unit();

static float first_translation_unit() {
  bnorm::BatchNorm1d<float> bn(2);
  Eigen::Tensor<float, 2, Eigen::RowMajor> x(3, 2);
  x.setValues({{1, 2}, {3, 4}, {5, 9}});
  return bn.forward(x)(0, 0);
}

int main() {
  // Channel 0 holds 1, 3, 5: its first value normalizes to (1 - 3) / sqrt(8 / 3 + 1e-5) = -1.2247.
  const float a = first_translation_unit(), b = second_translation_unit();
  return (a == b && a < -1.22f && a > -1.23f) ? 0 : 1;
}
