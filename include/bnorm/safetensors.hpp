#pragma once
// Module state in and out of safetensors files, under PyTorch's state_dict names: the format
// PyTorch's ecosystem keeps weights in. Needs nlohmann/json (Debian nlohmann-json3-dev), which no
// other bnorm header does.
//
//   bnorm::save_safetensors("bn.safetensors", {{"layer1.0.bn1", &bn1}, {"layer1.0.bn2", &bn2}});
//   bnorm::load_safetensors("bn.safetensors", {{"layer1.0.bn1", &bn1}, {"layer1.0.bn2", &bn2}});
//
// The file: an 8-byte little-endian header length N, N bytes of JSON
// {"name": {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}
// with offsets relative to the byte after the header, then the tensors' bytes, little-endian.

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <map>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "bnorm.hpp"

BNORM_BEGIN_NAMESPACE

namespace detail {

/// One tensor of a module's state: its name under the module's prefix, its shape ({} for a
/// scalar), and how to read and write its values. Integer tensors (num_batches_tracked) use
/// get_integer / set_integer, the others get / set.
struct StateTensor {
  std::string name;
  std::vector<std::int64_t> shape;
  bool integer = false;
  std::size_t float_bytes = 4;  ///< F32 or F64 when saved: the module's Scalar
  std::function<std::vector<double>()> get;
  std::function<void(const std::vector<double>&)> set;
  std::function<std::int64_t()> get_integer;
  std::function<void(std::int64_t)> set_integer;
  std::int64_t elements() const {
    std::int64_t n = 1;
    for (std::int64_t d : shape) n *= d;
    return n;
  }
};

[[noreturn]] inline void safetensors_fail(const std::string& what) {
  throw std::invalid_argument("bnorm: safetensors: " + what);
}

template <class M, class = void>
struct HasRunningStats : std::false_type {};
template <class M>
struct HasRunningStats<M, std::void_t<decltype(std::declval<M&>().running_mean())>>
    : std::true_type {};

template <class M, class = void>
struct HasNormalizedShape : std::false_type {};
template <class M>
struct HasNormalizedShape<M, std::void_t<decltype(std::declval<const M&>().normalized_shape())>>
    : std::true_type {};

}  // namespace detail

/// A module under a prefix: what save_safetensors writes and load_safetensors reads. Keys are
/// PyTorch's state_dict names under the prefix ("prefix.weight"; an empty prefix: "weight"):
/// weight and bias where the module has them (LayerNorm's and RMSNorm's in normalized_shape),
/// and running_mean, running_var and num_batches_tracked where it tracks running statistics.
class NamedModule {
 public:
  template <class M>
  NamedModule(std::string prefix, M* module) : prefix_(std::move(prefix)) {
    using Vector = typename M::Vector;
    using Scalar = typename Vector::Scalar;
    if (module == nullptr) detail::safetensors_fail("module '" + prefix_ + "' is a null pointer");
    auto add = [&](const char* name, Vector& (*access)(M&), std::vector<std::int64_t> shape) {
      if (access(*module).size() == 0) return;  // the module has no such tensor
      detail::StateTensor t;
      t.name = name;
      t.shape = std::move(shape);
      t.float_bytes = sizeof(Scalar);
      t.get = [module, access] {
        const Vector& v = access(*module);
        return std::vector<double>(v.data(), v.data() + v.size());
      };
      t.set = [module, access](const std::vector<double>& values) {
        Vector& v = access(*module);
        v.resize(Index(values.size()));
        for (Index i = 0; i < v.size(); ++i) v(i) = Scalar(values[std::size_t(i)]);
      };
      tensors_.push_back(std::move(t));
    };
    const std::vector<std::int64_t> parameter_shape = parameter_shape_of(*module);
    add("weight", [](M& m) -> Vector& { return m.weight(); }, parameter_shape);
    add("bias", [](M& m) -> Vector& { return m.bias(); }, parameter_shape);
    if constexpr (detail::HasRunningStats<M>::value) {
      if (module->running_mean().size() == 0) return;
      const std::vector<std::int64_t> channels{std::int64_t(module->running_mean().size())};
      add("running_mean", [](M& m) -> Vector& { return m.running_mean(); }, channels);
      add("running_var", [](M& m) -> Vector& { return m.running_var(); }, channels);
      detail::StateTensor t;
      t.name = "num_batches_tracked";
      t.integer = true;
      t.get_integer = [module] { return std::int64_t(module->num_batches_tracked()); };
      t.set_integer = [module](std::int64_t n) { module->set_num_batches_tracked(n); };
      tensors_.push_back(std::move(t));
    }
  }

  const std::string& prefix() const { return prefix_; }
  const std::vector<detail::StateTensor>& tensors() const { return tensors_; }
  std::string key(const detail::StateTensor& t) const {
    return prefix_.empty() ? t.name : prefix_ + "." + t.name;
  }

 private:
  /// The weight's and bias's shape: normalized_shape where the module has one, else one value
  /// per channel.
  template <class M>
  static std::vector<std::int64_t> parameter_shape_of(const M& m) {
    if constexpr (detail::HasNormalizedShape<M>::value) {
      return {m.normalized_shape().begin(), m.normalized_shape().end()};
    } else {
      return {std::int64_t(std::max(m.weight().size(), m.bias().size()))};
    }
  }

  std::string prefix_;
  std::vector<detail::StateTensor> tensors_;
};

namespace detail {

inline std::size_t dtype_bytes(const std::string& dtype) {
  static const std::map<std::string, std::size_t> sizes = {
      {"F64", 8}, {"F32", 4},  {"F16", 2}, {"BF16", 2}, {"I64", 8},     {"I32", 4},
      {"I16", 2}, {"I8", 1},   {"U64", 8}, {"U32", 4},  {"U16", 2},     {"U8", 1},
      {"BOOL", 1}, {"F8_E4M3", 1}, {"F8_E5M2", 1}};
  const auto it = sizes.find(dtype);
  return it == sizes.end() ? 0 : it->second;
}

inline std::uint64_t load_le(const unsigned char* p, std::size_t bytes) {
  std::uint64_t u = 0;
  for (std::size_t i = 0; i < bytes; ++i) u |= std::uint64_t(p[i]) << (8 * i);
  return u;
}

inline void store_le(std::uint64_t u, std::size_t bytes, std::string& out) {
  for (std::size_t i = 0; i < bytes; ++i) out.push_back(char((u >> (8 * i)) & 0xff));
}

/// IEEE half precision to double, subnormals, infinities and NaN included.
inline double half_to_double(std::uint16_t h) {
  const int exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
  double v;
  if (exponent == 0) v = std::ldexp(double(mantissa), -24);
  else if (exponent == 31)
    v = mantissa ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  else v = std::ldexp(double(mantissa + 1024), exponent - 25);
  return (h & 0x8000) ? -v : v;
}

/// A floating-point value of `dtype` (F64, F32, F16, BF16) at p, as a double.
inline double decode_float(const std::string& dtype, const unsigned char* p) {
  if (dtype == "F64") {
    const std::uint64_t u = load_le(p, 8);
    double d;
    std::memcpy(&d, &u, 8);
    return d;
  }
  if (dtype == "F32" || dtype == "BF16") {
    const std::uint32_t u = dtype == "F32" ? std::uint32_t(load_le(p, 4))
                                           : std::uint32_t(load_le(p, 2)) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return double(f);
  }
  return half_to_double(std::uint16_t(load_le(p, 2)));
}

/// A tensor's entry in the header.
struct Entry {
  std::string dtype;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0, end = 0;
};

/// A parsed file: the header's entries and the data that follows it. Checks the structure:
/// sizes, JSON, every entry's fields, offsets inside the data, no two tensors overlapping, and a
/// byte count that matches the shape for every dtype it knows.
struct File {
  std::map<std::string, Entry> entries;
  std::string bytes;
  std::size_t data = 0;  ///< where the data starts in `bytes`

  static File parse(std::string contents, const std::string& where) {
    auto fail = [&](const std::string& what) { safetensors_fail(where + ": " + what); };
    File f;
    f.bytes = std::move(contents);
    if (f.bytes.size() < 8)
      fail("expected at least the 8 bytes of the header length, got a file of " +
           std::to_string(f.bytes.size()) + " bytes");
    const auto* base = reinterpret_cast<const unsigned char*>(f.bytes.data());
    const std::uint64_t header = load_le(base, 8);
    if (header > f.bytes.size() - 8)
      fail("the header length " + std::to_string(header) + " runs past the end of the file (" +
           std::to_string(f.bytes.size() - 8) + " bytes follow it)");
    f.data = 8 + std::size_t(header);
    const std::uint64_t data_bytes = f.bytes.size() - f.data;
    nlohmann::json json;
    try {
      json = nlohmann::json::parse(f.bytes.begin() + 8, f.bytes.begin() + std::ptrdiff_t(f.data));
    } catch (const nlohmann::json::exception& e) {
      fail(std::string("the header is not valid JSON (") + e.what() + ")");
    }
    if (!json.is_object()) fail("expected a JSON object as the header, got " + json.dump());
    std::vector<std::pair<std::uint64_t, std::uint64_t>> ranges;
    for (const auto& item : json.items()) {
      const std::string name = item.key();  // (a lambda cannot capture a structured binding)
      const nlohmann::json& value = item.value();
      if (name == "__metadata__") continue;
      auto bad = [&](const std::string& what) { fail("tensor '" + name + "': " + what); };
      if (!value.is_object()) bad("expected an object, got " + value.dump());
      Entry e;
      const auto dtype = value.find("dtype");
      if (dtype == value.end() || !dtype->is_string()) bad("expected a string dtype");
      e.dtype = dtype->get<std::string>();
      const auto shape = value.find("shape");
      if (shape == value.end() || !shape->is_array()) bad("expected a shape array");
      std::uint64_t count = 1;
      for (const auto& d : *shape) {
        if (!d.is_number_unsigned()) bad("expected sizes >= 0 in the shape, got " + shape->dump());
        const std::uint64_t n = d.get<std::uint64_t>();
        if (n > (std::uint64_t(1) << 62) || (n > 0 && count > (std::uint64_t(1) << 62) / n))
          bad("the shape " + shape->dump() + " is too large");
        count *= n;
        e.shape.push_back(std::int64_t(n));
      }
      const auto offsets = value.find("data_offsets");
      if (offsets == value.end() || !offsets->is_array() || offsets->size() != 2 ||
          !(*offsets)[0].is_number_unsigned() || !(*offsets)[1].is_number_unsigned())
        bad("expected data_offsets [begin, end]");
      e.begin = (*offsets)[0].get<std::uint64_t>();
      e.end = (*offsets)[1].get<std::uint64_t>();
      if (e.begin > e.end || e.end > data_bytes)
        bad("data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) +
            "] lie outside the " + std::to_string(data_bytes) + " bytes of data");
      if (const std::size_t size = dtype_bytes(e.dtype); size > 0 && e.end - e.begin != count * size)
        bad("expected " + std::to_string(count * size) + " bytes for " + e.dtype + " of shape " +
            shape->dump() + ", got " + std::to_string(e.end - e.begin));
      ranges.emplace_back(e.begin, e.end);
      f.entries.emplace(name, std::move(e));
    }
    std::sort(ranges.begin(), ranges.end());
    for (std::size_t i = 1; i < ranges.size(); ++i)
      if (ranges[i].first < ranges[i - 1].second)
        fail("two tensors overlap in the data (bytes " + std::to_string(ranges[i].first) + " to " +
             std::to_string(std::min(ranges[i].second, ranges[i - 1].second)) + ")");
    return f;
  }

  const unsigned char* at(const Entry& e) const {
    return reinterpret_cast<const unsigned char*>(bytes.data()) + data + e.begin;
  }
};

inline std::string shape_string(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

/// Loads every module's tensors from a parsed file: all are checked and converted before any
/// module changes, so a file that fails leaves every module as it was.
inline void load_modules(const File& f, const std::vector<NamedModule>& modules,
                         const std::string& where) {
  struct Staged {
    const StateTensor* tensor;
    std::vector<double> values;
    std::int64_t integer = 0;
  };
  std::vector<Staged> staged;
  for (const NamedModule& m : modules) {
    for (const StateTensor& t : m.tensors()) {
      const std::string key = m.key(t);
      auto fail = [&](const std::string& what) {
        safetensors_fail(where + ": module '" + m.prefix() + "', key '" + key + "': " + what);
      };
      const auto it = f.entries.find(key);
      if (it == f.entries.end()) fail("the file has no such tensor");
      const Entry& e = it->second;
      if (e.shape != t.shape)
        fail("expected shape " + shape_string(t.shape) + ", got " + shape_string(e.shape));
      Staged s{&t, {}, 0};
      if (t.integer) {
        if (e.dtype != "I64") fail("expected dtype I64, got " + e.dtype);
        s.integer = std::int64_t(load_le(f.at(e), 8));
        if (s.integer < 0) fail("expected a count >= 0, got " + std::to_string(s.integer));
      } else {
        if (e.dtype != "F64" && e.dtype != "F32" && e.dtype != "F16" && e.dtype != "BF16")
          fail("expected dtype F64, F32, F16 or BF16, got " + e.dtype);
        const std::size_t size = dtype_bytes(e.dtype);
        s.values.resize(std::size_t(t.elements()));
        for (std::size_t i = 0; i < s.values.size(); ++i)
          s.values[i] = decode_float(e.dtype, f.at(e) + i * size);
      }
      staged.push_back(std::move(s));
    }
  }
  for (const Staged& s : staged) {
    if (s.tensor->integer) s.tensor->set_integer(s.integer);
    else s.tensor->set(s.values);
  }
}

/// The bytes of a file holding every module's tensors, in the modules' order.
inline std::string save_modules(const std::vector<NamedModule>& modules) {
  nlohmann::json header = nlohmann::json::object();
  header["__metadata__"] = {{"format", "pt"}};
  std::string data;
  for (const NamedModule& m : modules) {
    for (const StateTensor& t : m.tensors()) {
      const std::string key = m.key(t);
      if (header.contains(key)) safetensors_fail("two modules write the key '" + key + "'");
      const std::size_t begin = data.size();
      std::string dtype;
      if (t.integer) {
        dtype = "I64";
        store_le(std::uint64_t(t.get_integer()), 8, data);
      } else {
        const std::vector<double> values = t.get();
        if (std::int64_t(values.size()) != t.elements())
          safetensors_fail("module '" + m.prefix() + "': " + t.name + " has " +
                           std::to_string(values.size()) + " values, expected " +
                           std::to_string(t.elements()));
        dtype = t.float_bytes == 8 ? "F64" : "F32";
        for (double v : values) {
          if (t.float_bytes == 8) {
            std::uint64_t u;
            std::memcpy(&u, &v, 8);
            store_le(u, 8, data);
          } else {
            const float f = float(v);
            std::uint32_t u;
            std::memcpy(&u, &f, 4);
            store_le(u, 4, data);
          }
        }
      }
      header[key] = {{"dtype", dtype}, {"shape", t.shape}, {"data_offsets", {begin, data.size()}}};
    }
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // the data starts 8-byte aligned
  std::string out;
  store_le(text.size(), 8, out);
  return out + text + data;
}

}  // namespace detail

/// Writes the modules' parameters and buffers to `path` (F32 or F64 as the module's Scalar,
/// num_batches_tracked as I64 of shape []). Throws std::invalid_argument where the file cannot be
/// written or two modules would write the same key.
inline void save_safetensors(const std::string& path, const std::vector<NamedModule>& modules) {
  const std::string bytes = detail::save_modules(modules);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), std::streamsize(bytes.size()));
  out.close();
  if (!out) detail::safetensors_fail("cannot write '" + path + "'");
}

/// Reads the modules' parameters and buffers from `path`: F64, F32, F16 and BF16 data converted to
/// each module's Scalar, num_batches_tracked as I64. Keys no module asks for are ignored (as
/// PyTorch's strict=False). A missing or malformed file, or a key a module needs that is missing
/// or of the wrong dtype or shape, throws std::invalid_argument that says what, and no module
/// changes.
inline void load_safetensors(const std::string& path, const std::vector<NamedModule>& modules) {
  std::ifstream in(path, std::ios::binary);
  if (!in) detail::safetensors_fail("cannot open '" + path + "'");
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) detail::safetensors_fail("cannot read '" + path + "'");
  detail::load_modules(detail::File::parse(std::move(bytes), path), modules, path);
}

BNORM_END_NAMESPACE
