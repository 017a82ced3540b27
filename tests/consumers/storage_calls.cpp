// BatchNorm's calls on 16-bit tensors (Eigen::bfloat16 and Eigen::half), kept apart from
// every_call.cpp: only the warnings tests compile them (tests/CMakeLists.txt), so that each
// 16-bit kernel is checked under a user's warnings on every instruction set, while the consumer
// projects, which test how bnorm is found, stay quick to build. The test programs run the same
// kernels (test_storage.cpp) and modules (test_storage_module.cpp).
#include <bnorm/bnorm.hpp>

#include <cmath>

namespace {

/// BatchNorm of 16-bit tensors (parameters and statistics in float).
template <class S>
bool storage_calls(const Eigen::ThreadPoolDevice& device) {
  bool ok = true;
  for (auto layout : {bnorm::Layout::ChannelsFirst, bnorm::Layout::ChannelsLast}) {
    bnorm::Options o;
    o.layout = layout;
    o.activation = bnorm::Activation::ReLU;
    bnorm::BatchNorm2d<S> bn(5, o);
    const Eigen::Index c = layout == bnorm::Layout::ChannelsFirst ? 1 : 3;
    Eigen::array<Eigen::Index, 4> dims{{4, 4, 9, 9}};
    dims[std::size_t(c)] = 5;
    Eigen::Tensor<S, 4, Eigen::RowMajor> x(dims), z(dims), y(dims), dx(dims), dz(dims);
    x.setRandom();
    z.setRandom();
    y = bn.forward(x);
    bn.forward(x, y, device);
    dx = bn.backward(y);
    bn.forward_add(x, z, y, device);
    bn.backward_add(z, dx, dz, device);
    bn.eval();
    bn.forward(x, y);
    const Eigen::Tensor<S, 4, Eigen::RowMajor> inferred = bn.infer(x);
    ok = ok && std::isfinite(static_cast<float>(inferred(0, 0, 0, 0)));
  }
  return ok;
}
}  // namespace

int main() {
  Eigen::ThreadPool pool(2);
  Eigen::ThreadPoolDevice device(&pool, 2);
  return storage_calls<Eigen::bfloat16>(device) && storage_calls<Eigen::half>(device) ? 0 : 1;
}
