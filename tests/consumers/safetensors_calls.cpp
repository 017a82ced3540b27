// Every call of the optional safetensors header, float and double modules: compiled with a
// demanding user's warnings (tests/CMakeLists.txt), not run.
#include <bnorm/safetensors.hpp>

int main() {
  bnorm::BatchNorm2d<float> a(3);
  bnorm::BatchNorm1d<double> b(4);
  bnorm::save_safetensors("state.safetensors", {{"a", &a}, {"b", &b}});
  bnorm::load_safetensors("state.safetensors", {{"a", &a}, {"b", &b}});
  return 0;
}
