// libFuzzer target: the safetensors reader on arbitrary bytes. Every input either loads or throws
// std::invalid_argument, and an input that throws leaves the modules exactly as they were.
//
//   clang++ -fsanitize=fuzzer,address,undefined ... ; ./bnorm_fuzz_safetensors corpus/ seeds/

#include <bnorm/safetensors.hpp>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

template <class M>
void add(std::vector<double>& all, const M& m) {
  for (const auto* v : {&m.weight(), &m.bias(), &m.running_mean(), &m.running_var()})
    all.insert(all.end(), v->data(), v->data() + v->size());
  all.push_back(double(m.num_batches_tracked()));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // The modules of tests/fixtures/pytorch_state.safetensors, the seed.
  bnorm::BatchNorm2d<float> bn1(5);
  bnorm::BatchNorm1d<double> f16(3);
  bn1.running_var().setConstant(2.0f);
  f16.set_num_batches_tracked(7);
  auto snapshot = [&] {
    std::vector<double> all;
    add(all, bn1);
    add(all, f16);
    return all;
  };
  const std::vector<double> before = snapshot();
  const std::vector<bnorm::NamedModule> modules = {{"layer1.0.bn1", &bn1}, {"f16.bn", &f16}};
  try {
    const auto file = bnorm::detail::File::parse(
        std::string(reinterpret_cast<const char*>(data), size), "input");
    bnorm::detail::load_modules(file, modules, "input");
  } catch (const std::invalid_argument&) {
    if (snapshot() != before) std::abort();  // a failed load changed a module
  }
  return 0;
}
