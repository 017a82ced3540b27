// Eigen's Tensor module first, without EIGEN_USE_THREADS: bnorm must still provide
// Eigen::ThreadPoolDevice.
#include <unsupported/Eigen/CXX11/Tensor>

#include <bnorm/options.hpp>
#include <bnorm/functional.hpp>
#include <bnorm/bnorm.hpp>
#include <bnorm/batch_norm.hpp>

float second_translation_unit() {
  Eigen::ThreadPool pool(2);
  Eigen::ThreadPoolDevice device(&pool, 2);
  bnorm::BatchNorm1d<float> bn(2);
  Eigen::Tensor<float, 2, Eigen::RowMajor> x(3, 2);
  x.setValues({{1, 2}, {3, 4}, {5, 9}});
  return bn.forward(x, device)(0, 0);
}
