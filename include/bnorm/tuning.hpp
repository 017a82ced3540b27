#pragma once
// The figures the kernels choose their strategies by: the machine's last-level cache, read once,
// and the sizes at which a pass changes how it walks memory. A program may set others at run time
// (a VM whose reported cache is not what it gets, a test that wants the paths of large tensors on
// small ones): set_tuning, before the calls it should change.

#include <cstddef>
#include <fstream>
#include <optional>

#include "detail/eigen.hpp"
#include "detail/isa.hpp"

BNORM_BEGIN_NAMESPACE

struct Tuning {
  using Index = std::ptrdiff_t;
  /// The last-level cache that the threads share. Linux's own figure comes first: a hypervisor
  /// may report another through CPUID, which Eigen reads (on an AMD EPYC VM, 320 MiB for a cache
  /// of 32 MiB).
  Index last_level_cache_bytes = 0;
  /// Outputs at least this large may be written with non-temporal stores: they would not stay in
  /// cache anyway, and streaming them skips the read-for-ownership of every output line.
  Index stream_bytes = Index{8} << 20;
  /// With several threads, outputs are streamed only where the pass's tensors exceed seven eighths
  /// of the last-level cache (its bandwidth grows with the threads, memory's much less). true:
  /// from stream_bytes on whatever the threads.
  bool stream_by_size_alone = false;
  /// Elementwise passes over more bytes than this walk two distant parts of their rows side by
  /// side. std::nullopt: half the last-level cache.
  std::optional<Index> far_bytes;
  /// The room of a group of channels whose data stays in cache from its reduction to its
  /// elementwise pass. std::nullopt: a quarter of the last-level cache, split over the workers,
  /// and at least 512 KiB.
  std::optional<Index> group_bytes;
};

/// The machine's figures, read now.
inline Tuning machine_tuning() {
  Tuning t;
  Tuning::Index kib = 0;
#if defined(__linux__)
  std::ifstream("/sys/devices/system/cpu/cpu0/cache/index3/size") >> kib;  // "32768K"
#endif
  t.last_level_cache_bytes = kib > 0 ? kib << 10 : Tuning::Index(Eigen::l3CacheSize());
  return t;
}

namespace detail {
inline Tuning& tuning_storage() {
  static Tuning t = machine_tuning();
  return t;
}
}  // namespace detail

/// The figures the kernels use: the machine's, read at the first call, unless set_tuning set
/// others.
inline const Tuning& tuning() { return detail::tuning_storage(); }

/// Makes the calls that follow use t. Not while any call of bnorm runs. Translation units built
/// for other instruction sets have their own figures (see detail/isa.hpp): set them from each.
inline void set_tuning(const Tuning& t) { detail::tuning_storage() = t; }

BNORM_END_NAMESPACE
