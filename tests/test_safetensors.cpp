// Module state in and out of safetensors files: PyTorch's files load into bnorm and give
// PyTorch's outputs (fixtures/pytorch_state.*, from fixtures/generate_safetensors.py), what bnorm
// writes is what the committed fixtures/bnorm_written.safetensors holds (which the generator
// loads into PyTorch), round trips keep every bit, and every kind of bad file gets a clear error
// that changes no module.

#include <bnorm/safetensors.hpp>

#include <cstdio>
#include <fstream>
#include <map>
#include <sstream>

#include "util.hpp"

using testing::Index;

namespace {

const std::string kFixtures = BNORM_FIXTURE_DIR;

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  REQUIRE(in.good());
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), std::streamsize(bytes.size()));
  REQUIRE(out.good());
}

/// pytorch_state.txt: "name count values..." per line.
std::map<std::string, std::vector<double>> expected_state() {
  std::ifstream in(kFixtures + "/pytorch_state.txt");
  REQUIRE(in.good());
  std::map<std::string, std::vector<double>> out;
  std::string line;
  while (std::getline(in, line)) out.insert(testing::parse_array(line));
  return out;
}

/// The modules of the fixtures, with state other than the file's.
struct Modules {
  bnorm::BatchNorm2d<float> bn1{5};
  bnorm::BatchNorm2d<double> bn2{3};
  bnorm::BatchNorm1d<float> head{4, [] {
    bnorm::Options o;
    o.affine = false;
    return o;
  }()};
  bnorm::BatchNorm1d<double> f16{3};
  bnorm::BatchNorm1d<float> bf16{3};
  bnorm::LayerNorm<float> ln{{2, 3}};
  bnorm::RMSNorm<double> rms{{4}};
  bnorm::GroupNorm<float> gn{2, 4};
  bnorm::InstanceNorm2d<float> in{3, [] {
    bnorm::InstanceNormOptions o;
    o.affine = o.track_running_stats = true;
    return o;
  }()};

  std::vector<bnorm::NamedModule> named() {
    return {{"layer1.0.bn1", &bn1}, {"layer1.0.bn2", &bn2}, {"head.bn", &head},
            {"f16.bn", &f16},       {"bf16.bn", &bf16},     {"encoder.ln", &ln},
            {"encoder.rms", &rms},  {"stem.gn", &gn},       {"stem.in", &in}};
  }
  /// Every value of every module, as doubles, for before/after comparisons.
  std::vector<double> snapshot() {
    std::vector<double> all;
    auto add_parameters = [&](const auto& m) {
      for (const auto* v : {&m.weight(), &m.bias()})
        all.insert(all.end(), v->data(), v->data() + v->size());
    };
    auto add = [&](const auto& m) {
      add_parameters(m);
      for (const auto* v : {&m.running_mean(), &m.running_var()})
        all.insert(all.end(), v->data(), v->data() + v->size());
      all.push_back(double(m.num_batches_tracked()));
    };
    add(bn1);
    add(bn2);
    add(head);
    add(f16);
    add(bf16);
    add_parameters(ln);
    add_parameters(rms);
    add_parameters(gn);
    add(in);
    return all;
  }
};

/// Checks that m holds, exactly, every value the file has under prefix (the keys PyTorch's
/// state_dict gives the module).
template <class M>
void check_module(const M& m, const std::string& prefix,
                  const std::map<std::string, std::vector<double>>& want) {
  INFO(prefix);
  auto same = [&](const typename M::Vector& v, const std::string& name) {
    const auto it = want.find(prefix + "." + name);
    if (it == want.end()) {  // PyTorch's module has no such tensor
      CHECK(v.size() == 0);
      return;
    }
    REQUIRE(Index(it->second.size()) == v.size());
    for (Index i = 0; i < v.size(); ++i) CHECK(double(v(i)) == it->second[std::size_t(i)]);
  };
  same(m.weight(), "weight");
  same(m.bias(), "bias");
  if constexpr (bnorm::detail::HasRunningStats<M>::value) {
    same(m.running_mean(), "running_mean");
    same(m.running_var(), "running_var");
    CHECK(double(m.num_batches_tracked()) == want.at(prefix + ".num_batches_tracked")[0]);
  }
}

/// The message of the std::invalid_argument that call throws ("no exception" if none).
template <class F>
std::string message_of(F&& call) {
  try {
    call();
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "no exception";
}

/// A valid file's bytes with its header replaced by `header` (padded to 8 bytes) and `data`.
std::string with_header(const std::string& header, const std::string& data) {
  std::string text = header;
  text.append((8 - text.size() % 8) % 8, ' ');
  std::string out;
  for (int i = 0; i < 8; ++i) out.push_back(char((std::uint64_t(text.size()) >> (8 * i)) & 0xff));
  return out + text + data;
}

}  // namespace

TEST_CASE("a file PyTorch wrote loads, in every float dtype, and gives PyTorch's outputs",
          "[safetensors]") {
  const auto want = expected_state();
  Modules m;
  bnorm::load_safetensors(kFixtures + "/pytorch_state.safetensors", m.named());
  check_module(m.bn1, "layer1.0.bn1", want);
  check_module(m.bn2, "layer1.0.bn2", want);
  check_module(m.head, "head.bn", want);
  check_module(m.f16, "f16.bn", want);   // F16 data: exact in double
  check_module(m.bf16, "bf16.bn", want);  // BF16 data: exact in float
  check_module(m.ln, "encoder.ln", want);   // weight and bias of normalized_shape [2, 3]
  check_module(m.rms, "encoder.rms", want);
  check_module(m.gn, "stem.gn", want);
  check_module(m.in, "stem.in", want);
  // The eval-mode output of layer1.0.bn1, as PyTorch computed it.
  const auto& x = want.at("x");
  const std::vector<float> xf(x.begin(), x.end());
  Eigen::TensorMap<const Eigen::Tensor<float, 4, Eigen::RowMajor>> xm(xf.data(), 2, 5, 3, 3);
  m.bn1.eval();
  const Eigen::Tensor<float, 4, Eigen::RowMajor> y = m.bn1.infer(xm);
  testing::check_close(std::vector<float>(y.data(), y.data() + y.size()), want.at("y"), "y");
  const auto& ln_x = want.at("ln_x");
  const std::vector<float> ln_xf(ln_x.begin(), ln_x.end());
  Eigen::TensorMap<const Eigen::Tensor<float, 3, Eigen::RowMajor>> ln_xm(ln_xf.data(), 3, 2, 3);
  const Eigen::Tensor<float, 3, Eigen::RowMajor> ln_y = m.ln.infer(ln_xm);
  testing::check_close(std::vector<float>(ln_y.data(), ln_y.data() + ln_y.size()), want.at("ln_y"),
                       "ln_y");
}

TEST_CASE("what bnorm writes is the committed file PyTorch loads, and round trips exactly",
          "[safetensors]") {
  Modules m;
  bnorm::load_safetensors(kFixtures + "/pytorch_state.safetensors", m.named());
  const std::string path = "bnorm_written_test.safetensors";
  bnorm::save_safetensors(path, m.named());
  const std::string written = read_file(path);
  if (std::getenv("BNORM_WRITE_FIXTURES"))  // how the committed file was made
    write_file(kFixtures + "/bnorm_written.safetensors", written);
  CHECK(written == read_file(kFixtures + "/bnorm_written.safetensors"));
  // Back into modules of other values: every bit as saved.
  Modules other;
  other.bn1.running_mean().setConstant(7.0f);
  other.bf16.set_num_batches_tracked(99);
  other.ln.weight().setConstant(5.0f);
  other.in.set_num_batches_tracked(4);
  const auto before = m.snapshot();
  bnorm::load_safetensors(path, other.named());
  CHECK(other.snapshot() == before);
  std::remove(path.c_str());
}

TEST_CASE("keys no module asks for are ignored, and a module's own key is required",
          "[safetensors]") {
  Modules m;
  // Only two of the file's modules: the others' keys and fc.weight are ignored.
  bnorm::load_safetensors(kFixtures + "/pytorch_state.safetensors",
                          {{"layer1.0.bn1", &m.bn1}, {"head.bn", &m.head}});
  CHECK(m.bn1.num_batches_tracked() == 3);
  // A module whose prefix the file lacks: the error names the module and the key.
  bnorm::BatchNorm2d<float> missing(5);
  const auto msg = message_of([&] {
    bnorm::load_safetensors(kFixtures + "/pytorch_state.safetensors", {{"layer9.bn", &missing}});
  });
  CHECK(msg.find("module 'layer9.bn', key 'layer9.bn.weight': the file has no such tensor") !=
        std::string::npos);
  // Two modules writing one key.
  CHECK(message_of([&] {
          bnorm::save_safetensors("never.safetensors", {{"a", &m.bn1}, {"a", &m.bn1}});
        }).find("two modules write the key 'a.weight'") != std::string::npos);
}

TEST_CASE("bad files get a clear error and change no module", "[safetensors]") {
  const std::string good = read_file(kFixtures + "/pytorch_state.safetensors");
  const std::uint64_t header_length = [&] {
    std::uint64_t n = 0;
    for (int i = 0; i < 8; ++i) n |= std::uint64_t(static_cast<unsigned char>(good[std::size_t(i)])) << (8 * i);
    return n;
  }();
  const std::string header = good.substr(8, std::size_t(header_length));
  const std::string data = good.substr(8 + std::size_t(header_length));
  // The first tensor's entry, to mutate: "layer1.0.bn1.weight" is F32 of shape [5] at bytes
  // [0, 20) (the header is Python's json.dumps, with its spaces).
  auto replaced = [&](const std::string& from, const std::string& to) {
    std::string h = header;
    const auto at = h.find(from);
    REQUIRE(at != std::string::npos);
    return with_header(h.replace(at, from.size(), to), data);
  };
  const std::string weight_entry = [&] {
    const auto at = header.find("\"layer1.0.bn1.weight\"");
    REQUIRE(at != std::string::npos);
    return header.substr(at, header.find('}', at) + 1 - at);
  }();
  const std::string weight_offsets = [&] {
    const auto at = weight_entry.find("\"data_offsets\"");
    return weight_entry.substr(at, weight_entry.find(']', at) + 1 - at);
  }();
  const std::pair<std::string, std::string> cases[] = {
      {"", "at least the 8 bytes"},
      {good.substr(0, 5), "at least the 8 bytes"},
      {std::string("\xff\xff\xff\xff\xff\xff\xff\x7f", 8) + "{}", "runs past the end"},
      {good.substr(0, 8 + std::size_t(header_length) / 2), "runs past the end"},
      {with_header("{\"a\": [1, 2", data), "not valid JSON"},
      {with_header("[1, 2]", data), "expected a JSON object"},
      {replaced(weight_offsets, "\"data_offsets\":[0,999999]"), "lie outside"},
      {replaced(weight_offsets, "\"data_offsets\": [4, 24]"), "overlap"},  // the bias's bytes
      {replaced("\"dtype\": \"F32\", \"shape\": [5]", "\"dtype\": \"I32\", \"shape\": [5]"),
       "expected dtype F64, F32, F16 or BF16, got I32"},
      {replaced("\"dtype\": \"F32\", \"shape\": [5]", "\"dtype\": \"F32\", \"shape\": [6]"),
       "expected 24 bytes for F32 of shape [6], got 20"},
      {replaced("\"shape\": [5]", "\"shape\": [-5]"), "sizes >= 0"},
      {replaced("\"layer1.0.bn1.weight\"", "\"layer1.0.bn1.wait\""),
       "key 'layer1.0.bn1.weight': the file has no such tensor"},
      {good.substr(0, good.size() - 3), "lie outside"},  // truncated data
  };
  for (const auto& [bytes, expected] : cases) {
    INFO("expected: " << expected);
    const std::string path = "bad_test.safetensors";
    write_file(path, bytes);
    Modules m;
    m.bn1.running_var().setConstant(3.0f);
    m.bf16.set_num_batches_tracked(11);
    const auto before = m.snapshot();
    const std::string msg = message_of([&] { bnorm::load_safetensors(path, m.named()); });
    CHECK(msg.find(expected) != std::string::npos);
    CHECK(msg.rfind("bnorm: safetensors: ", 0) == 0);
    CHECK(m.snapshot() == before);
    std::remove(path.c_str());
  }
  Modules m;
  CHECK(message_of([&] { bnorm::load_safetensors("no/such/file.safetensors", m.named()); })
            .find("cannot open 'no/such/file.safetensors'") != std::string::npos);
}
