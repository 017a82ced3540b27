// The same calls, in a unit whose name (BNORM_TEST_UNIT) and instruction sets are set by its
// build: modules and the functional layer, float and double, training, backward and inference.

#include <vector>

#include <bnorm/bnorm.hpp>

#include "unit.hpp"

UnitResult BNORM_TEST_UNIT() {
  UnitResult r;
  bnorm::BatchNorm2d<float> bn(5);
  Eigen::Tensor<float, 4, Eigen::RowMajor> x(3, 5, 7, 9);
  for (Eigen::Index i = 0; i < x.size(); ++i) x.data()[i] = float(i % 23) * 0.5f - 3.0f;
  Eigen::Tensor<float, 4, Eigen::RowMajor> y = bn.forward(x), dx = bn.backward(y);
  Eigen::Tensor<float, 4, Eigen::RowMajor> inferred = bn.infer(x);
  for (Eigen::Index i = 0; i < x.size(); ++i) r.sum += double(y.data()[i] + dx.data()[i] + inferred.data()[i]);

  bnorm::Options last;
  last.layout = bnorm::Layout::ChannelsLast;
  bnorm::BatchNorm1d<double> bn1(11, last);
  Eigen::Tensor<double, 3, Eigen::RowMajor> x1(4, 13, 11);
  for (Eigen::Index i = 0; i < x1.size(); ++i) x1.data()[i] = double(i % 17) - 4.0;
  Eigen::Tensor<double, 3, Eigen::RowMajor> y1 = bn1.forward(x1), dx1 = bn1.backward(y1);
  for (Eigen::Index i = 0; i < x1.size(); ++i) r.sum += y1.data()[i] + dx1.data()[i];

  namespace fn = bnorm::functional;
  std::vector<float> in(2 * 3 * 40), out(in.size());
  for (std::size_t i = 0; i < in.size(); ++i) in[i] = float(i % 7);
  fn::forward_training<float>({2, 3, 40, bnorm::Layout::ChannelsFirst}, in.data(), out.data(), 1e-5);
  for (float v : out) r.sum += double(v);
  r.namespace_ = BNORM_ISA_STRING;
  return r;
}
