#pragma once
// Memory traffic: prefetching ahead of a read, the streams an elementwise pass reads and writes,
// and the 4K aliasing its stores must avoid.

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <vector>

#include "../storage.hpp"

#include "../warnings_begin.hpp"

BNORM_BEGIN_NAMESPACE
namespace detail {

/// Requests the cache line that holds p.
template <class T>
inline void prefetch(const T* p) {
#if defined(__GNUC__)
  __builtin_prefetch(p);
#else
  (void)p;
#endif
}

/// Requests every cache line that holds a byte of [p, p + bytes).
template <class T>
void prefetch_lines(const T* p, Index bytes) {
  const auto end = reinterpret_cast<std::uintptr_t>(p) + std::uintptr_t(bytes);
  for (auto line = reinterpret_cast<std::uintptr_t>(p) & ~std::uintptr_t{63}; line < end;
       line += 64)
    prefetch(reinterpret_cast<const char*>(line));
}

/// While a run is read: requests the lines of the `bytes` bytes that start `ahead` bytes after p
/// (which may lie past the end of p's array: a prefetch never faults), one per 64 bytes, which
/// over the run's steps requests each line once.
template <class T>
inline void prefetch_ahead(const T* p, Index ahead, Index bytes) {
  const auto first = reinterpret_cast<std::uintptr_t>(p) + std::uintptr_t(ahead);
  for (std::uintptr_t b = 0; b < std::uintptr_t(bytes); b += 64)
    prefetch(reinterpret_cast<const char*>(first + b));
}

/// ALONG runs are a channel's rows, a whole batch row apart: with short rows (7 x 7 images)
/// every run starts in another page, where the hardware prefetcher does not follow. The
/// reductions ask for the run kRunsAhead ahead themselves. Longer runs are asked for
/// kReadAhead bytes ahead of where they are read, and the next run's first bytes when a run
/// starts: one core reads main memory faster this way than with the hardware prefetcher alone
/// (docs/design.md, "Measurements behind the constants").
inline constexpr Index kRunsAhead = 4;
inline constexpr Index kShortRunBytes = 2048;
inline constexpr Index kReadAhead = 2048;

/// Where an elementwise pass reads and writes. `copy`, when set, receives a copy of input 0
/// (the module keeps its input for backward this way without a second read).
template <class T, int kInputs>
struct Streams {
  const T* in[std::size_t(kInputs)];
  T* out;
  T* copy = nullptr;
  /// Where set, receives a byte per output value: 1 where it is > 0, else 0 (a fused ReLU's
  /// gradient mask, written by the pass that writes the output rather than by a pass of its own).
  std::uint8_t* positive = nullptr;
};

/// The page size that 4K aliasing and the placement of tables (see apart_from) work modulo.
inline constexpr std::uintptr_t kPageBytes = 4096;

/// A load that follows a store to an address equal in its low 12 bits (4K aliasing) waits for
/// that store. Walking forward, where an output lies a little past an input modulo 4 KiB (up to
/// kAliasBytes), every load would follow a store it matches by a packet or two, and wait for it.
/// Tensors allocated one after another lie so (a heap's chunks are a header apart). Such runs load each packet kAheadPackets packets
/// before it is used, so that every load comes before the stores it matches; their loads then
/// follow the stores kAheadPackets + 1 packets before them, which is where runs walked this way
/// are slow and runs walked the plain way are not. This is done for the forward passes (one
/// input), one run at a time. Backward, with two inputs, lost less to aliasing and gained
/// nothing that held from loading ahead (docs/design.md, "Measurements behind the constants").
inline constexpr std::uintptr_t kAliasBytes = 192;
inline constexpr int kAheadPackets = 4;
template <class T>
bool trails_closely(const T* out, const T* in) {
  const auto d =
      (reinterpret_cast<std::uintptr_t>(out) - reinterpret_cast<std::uintptr_t>(in)) % kPageBytes;
  return d > 0 && d <= kAliasBytes;
}

}  // namespace detail
BNORM_END_NAMESPACE

#include "../warnings_end.hpp"
