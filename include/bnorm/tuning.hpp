#pragma once
// The machine description the kernels plan by: its caches, read once, and the sizes at which a
// pass changes how it walks memory. A program may set others at run time (a VM whose reported
// cache is not what it gets, a test that wants the paths of large tensors on small ones):
// set_tuning, before the calls it should change.

#include <algorithm>
#include <cstddef>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <thread>

#include "detail/eigen.hpp"
#include "detail/isa.hpp"

BNORM_BEGIN_NAMESPACE

struct Tuning {
  using Index = std::ptrdiff_t;
  /// The data cache of one core, level 1 and level 2.
  Index l1_bytes = Index{32} << 10;
  Index l2_bytes = Index{1} << 20;
  /// The last-level cache as the system reports it, and the number of logical CPUs it says share
  /// it. Linux's figures come first: a hypervisor may report another through CPUID, which Eigen
  /// reads (a VM may be told of a whole host's cache).
  Index last_level_cache_bytes = 0;
  Index last_level_cpus = 1;
  /// Outputs at least this large may be written with non-temporal stores: they would not stay in
  /// cache anyway, and streaming them skips the read-for-ownership of every output line.
  Index stream_bytes = Index{8} << 20;
  /// A cache line. Only a pass whose packet stores fill whole lines streams its output: a
  /// narrower non-temporal store leaves its line partly written until the next one, and where the
  /// pass's other streams come between them a processor may write the partial line to memory
  /// (docs/design.md, "Streamed stores of whole lines").
  Index line_bytes = 64;
  /// With several threads, outputs are streamed only where the pass's tensors exceed seven eighths
  /// of the threads' share of the last-level cache (its bandwidth grows with the threads, memory's
  /// much less). true: from stream_bytes on whatever the threads.
  bool stream_by_size_alone = false;
  /// Elementwise passes over more bytes than this walk two distant parts of their rows side by
  /// side. std::nullopt: half the call's share of the last-level cache.
  std::optional<Index> far_bytes;
  /// The room of a group of channels whose data stays in cache from its reduction to its
  /// elementwise pass. std::nullopt: a quarter of the call's share of the last-level cache, split
  /// over the workers, and at least 512 KiB.
  std::optional<Index> group_bytes;

  /// No processor without stacked cache dies has more last-level cache per core than 8 times its
  /// L2 (AMD's Zen 2 and 3); stacked ones reach 12. A VM that reports a whole socket's cache to a
  /// few of its cores gives each far more: a CPU is counted at most this many L2s.
  static constexpr Index kMostLastLevelPerL2 = 16;

  /// The last-level cache, at most kMostLastLevelPerL2 L2s for each CPU that shares it.
  Index usable_last_level_bytes() const {
    return std::min(last_level_cache_bytes,
                    std::max<Index>(1, last_level_cpus) * kMostLastLevelPerL2 * l2_bytes);
  }

  /// The part of the last-level cache that `threads` threads can count on where every CPU that
  /// shares it is busy: each thread's share, as many times as there are threads, at most the
  /// whole (usable) cache.
  Index cache_share(Index threads) const {
    const Index usable = usable_last_level_bytes();
    return std::min(usable, std::max<Index>(1, threads) * (usable / std::max<Index>(1, last_level_cpus)));
  }
};

namespace detail {

/// The number of CPUs in a Linux CPU list such as "0-7,16-23".
inline Tuning::Index count_cpus(const std::string& list) {
  Tuning::Index n = 0;
  std::stringstream in(list);
  std::string range;
  while (std::getline(in, range, ',')) {
    const auto dash = range.find('-');
    try {
      const long first = std::stol(range.substr(0, dash));
      const long last = dash == std::string::npos ? first : std::stol(range.substr(dash + 1));
      n += std::max(0L, last - first + 1);
    } catch (const std::exception&) {
      return 0;
    }
  }
  return n;
}

}  // namespace detail

/// The machine's figures, read now: Linux's description of cpu0's caches, else Eigen's (CPUID).
inline Tuning machine_tuning() {
  using Index = Tuning::Index;
  Tuning t;
  t.l1_bytes = Index(Eigen::l1CacheSize());
  t.l2_bytes = Index(Eigen::l2CacheSize());
  t.last_level_cache_bytes = Index(Eigen::l3CacheSize());
  t.last_level_cpus = std::max<Index>(1, Index(std::thread::hardware_concurrency()));
#if defined(__linux__)
  Index last_level = 0;
  for (int i = 0; i < 8; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    int level = 0;
    std::string type, cpus;
    Index kib = 0, line = 0;
    std::ifstream(dir + "level") >> level;
    std::ifstream(dir + "coherency_line_size") >> line;
    std::ifstream(dir + "type") >> type;
    std::ifstream(dir + "size") >> kib;  // "32768K"
    std::ifstream(dir + "shared_cpu_list") >> cpus;
    if (level == 0 || kib <= 0 || type == "Instruction") continue;
    if (level == 1) t.l1_bytes = kib << 10;
    if (level == 1 && line > 0) t.line_bytes = line;
    if (level == 2) t.l2_bytes = kib << 10;
    if (level >= 2 && level >= last_level) {
      last_level = level;
      t.last_level_cache_bytes = kib << 10;
      t.last_level_cpus = std::max<Index>(1, detail::count_cpus(cpus));
    }
  }
#endif
  t.l1_bytes = std::max<Index>(t.l1_bytes, Index{16} << 10);
  t.l2_bytes = std::max<Index>(t.l2_bytes, Index{256} << 10);
  t.last_level_cache_bytes = std::max<Index>(t.last_level_cache_bytes, t.l2_bytes);
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
