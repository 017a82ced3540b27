#pragma once
// The portable SIMD layer: Eigen's own packet functions (SSE, AVX, AVX-512, NEON, AltiVec, ...
// chosen by the compiler flags of the translation unit, a plain scalar when EIGEN_DONT_VECTORIZE
// is defined) plus the one operation Eigen 3.4 lacks on x86 beyond SSE: loading floats widened to
// a packet of doubles. Statistics and gradient sums accumulate in double: accurate for data whose
// mean is 1e4 times its spread, and no overflow for float values near FLT_MAX.
//
// Why Eigen's packets rather than another SIMD library: Eigen is already our only dependency,
// its packet layer is what the Tensor module itself runs on, and it covers every target we care
// about. Nothing here forces an instruction set: a consumer who compiles with -march=native gets
// the wide vectors, everyone else gets SSE2 (x86-64's baseline) or NEON.

#include <cstddef>
#include <type_traits>
#include <utility>

#include "eigen.hpp"

#include "warnings_begin.hpp"

namespace bnorm::detail {

using Index = std::ptrdiff_t;
namespace ei = Eigen::internal;

template <class T>
using Packet = typename ei::packet_traits<T>::type;

template <class T>
inline constexpr Index kLanes = ei::unpacket_traits<Packet<T>>::size;

/// A packet of doubles.
using Wide = Packet<double>;
inline constexpr Index kWideLanes = kLanes<double>;

/// Loads kWideLanes values of type T starting at p, converted to double.
template <class T>
inline Wide load_wide(const T* p) {
  if constexpr (std::is_same_v<T, double>) {
    return ei::ploadu<Wide>(p);
  } else {
    static_assert(std::is_same_v<T, float>, "bnorm supports float and double");
#if defined(EIGEN_VECTORIZE_AVX512)
    return _mm512_cvtps_pd(_mm256_loadu_ps(p));
#elif defined(EIGEN_VECTORIZE_AVX)
    return _mm256_cvtps_pd(_mm_loadu_ps(p));
#elif defined(EIGEN_VECTORIZE_SSE2)
    return _mm_cvtps_pd(_mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
    double widened[kWideLanes];
    for (Index i = 0; i < kWideLanes; ++i) widened[i] = static_cast<double>(p[i]);
    return ei::ploadu<Wide>(widened);
#endif
  }
}

/// Stores a packet at an address aligned to the packet's size, bypassing the caches where the
/// target has such a store.
template <class T>
inline void stream_store(T* p, const Packet<T>& v) {
#if defined(EIGEN_VECTORIZE_AVX512)
  if constexpr (std::is_same_v<T, float>) _mm512_stream_ps(p, v);
  else _mm512_stream_pd(p, v);
#elif defined(EIGEN_VECTORIZE_AVX)
  if constexpr (std::is_same_v<T, float>) _mm256_stream_ps(p, v);
  else _mm256_stream_pd(p, v);
#elif defined(EIGEN_VECTORIZE_SSE2)
  if constexpr (std::is_same_v<T, float>) _mm_stream_ps(p, v);
  else _mm_stream_pd(p, v);
#else
  ei::pstore(p, v);
#endif
}

/// Makes non-temporal stores visible to other threads before the work is reported done.
inline void stream_fence() {
#if defined(EIGEN_VECTORIZE_SSE2)
  _mm_sfence();
#endif
}

/// Calls f(0), ..., f(N - 1), unrolled: the loops over an op's inputs and coefficients must not
/// stay loops (and spill their packets to the stack) at -O2.
template <class F, int... I>
EIGEN_ALWAYS_INLINE void unroll_impl(F& f, std::integer_sequence<int, I...>) {
  (f(I), ...);
}
template <int N, class F>
EIGEN_ALWAYS_INLINE void unroll(F&& f) {
  unroll_impl(f, std::make_integer_sequence<int, N>{});
}

/// Sum of a packet's lanes, as double.
template <class P>
inline double lane_sum(const P& p) {
  return static_cast<double>(ei::predux(p));
}

}  // namespace bnorm::detail

#include "warnings_end.hpp"
