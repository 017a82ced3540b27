// Every call of the optional safetensors header, float and double modules of every kind:
// compiled with a demanding user's warnings (tests/CMakeLists.txt), not run.
#include <bnorm/safetensors.hpp>

int main() {
  bnorm::BatchNorm2d<float> a(3);
  bnorm::BatchNorm1d<double> b(4);
  bnorm::LayerNorm<float> ln({2, 3});
  bnorm::RMSNorm<double> rms({4});
  bnorm::GroupNorm<float> gn(2, 4);
  bnorm::InstanceNorm3d<double> in(3);
  const std::vector<bnorm::NamedModule> all = {{"a", &a},     {"b", &b},   {"ln", &ln},
                                               {"rms", &rms}, {"gn", &gn}, {"in", &in}};
  bnorm::save_safetensors("state.safetensors", all);
  bnorm::load_safetensors("state.safetensors", all);
  return 0;
}
