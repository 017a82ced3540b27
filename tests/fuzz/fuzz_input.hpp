#pragma once
// What the fuzz targets share: the input read as a stream of bytes, values drawn from it (NaN,
// Inf, huge, subnormal, zero and ordinary ones), a failure report, and a two-thread device.

#include <bnorm/bnorm.hpp>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>

namespace fuzz {

using Index = std::ptrdiff_t;

/// The fuzzer's input, read a byte at a time; zeros once it runs out.
struct Bytes {
  const std::uint8_t* p;
  std::size_t n;
  std::uint8_t next() {
    if (n == 0) return 0;
    --n;
    return *p++;
  }
};

/// A value near `base`, or one time in `period` each: NaN, +-Inf, a huge value, a subnormal,
/// zero.
template <class T>
T draw_value(Bytes& in, double base, int period) {
  const std::uint8_t kind = in.next();
  const double v = base + (int(in.next()) - 128) / 16.0;
  switch (kind % period) {
    case 0: return std::numeric_limits<T>::quiet_NaN();
    case 1: return std::numeric_limits<T>::infinity() * ((kind / period) & 1 ? -1 : 1);
    case 2: return std::numeric_limits<T>::max() / T(1 + (kind >> 5));
    case 3: return std::numeric_limits<T>::denorm_min() * T(1 + (kind >> 4));
    case 4: return T(0);
    default: return T(v);
  }
}

[[noreturn]] inline void fail(const char* what, Index i, double got, double want) {
  std::fprintf(stderr, "bnorm fuzzer: %s at %td: got %.17g, expected %.17g\n", what, i, got, want);
  std::abort();
}

inline const Eigen::ThreadPoolDevice& two_threads() {
  static Eigen::ThreadPool pool(2);
  static Eigen::ThreadPoolDevice device(&pool, 2);
  return device;
}

}  // namespace fuzz
