#pragma once
// The portable SIMD layer: Eigen's own packet functions (SSE, AVX, AVX-512, NEON, AltiVec, ...
// chosen by the compiler flags of the translation unit, a plain scalar when EIGEN_DONT_VECTORIZE
// is defined) plus the one operation Eigen 3.4 lacks on x86 beyond SSE: loading floats widened to
// a packet of doubles, and masked loads and stores for the ends of runs. Blocks of statistics and
// gradient sums accumulate in T where each accumulator adds few values, else in double, and
// always merge in double (see kernels.hpp): accurate for data whose mean is 1e4 times its
// spread, and no overflow for float values near FLT_MAX.
//
// Why Eigen's packets rather than another SIMD library: Eigen is already our only dependency,
// its packet layer is what the Tensor module itself runs on, and it covers every target we care
// about. Nothing here forces an instruction set: a consumer who compiles with -march=native gets
// the wide vectors, everyone else gets SSE2 (x86-64's baseline) or NEON.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "eigen.hpp"
#include "isa.hpp"

#include "warnings_begin.hpp"

BNORM_BEGIN_NAMESPACE
namespace detail {

using Index = std::ptrdiff_t;
namespace ei = Eigen::internal;

template <class T>
using Packet = typename ei::packet_traits<T>::type;

template <class T>
inline constexpr Index kLanes = ei::unpacket_traits<Packet<T>>::size;

/// A packet of doubles.
using Wide = Packet<double>;
inline constexpr Index kWideLanes = kLanes<double>;

/// kWideLanes values of Eigen::bfloat16 or Eigen::half at p, converted exactly to double: in
/// packets where the instruction set converts them (bfloat16 is float's upper half; half needs
/// F16C, or AVX-512F's 16-lane form), else a value at a time through Eigen's conversion, which
/// for half under GCC is a software routine of a dozen operations.
template <class T>
inline Wide load_wide_16(const T* p) {
#if defined(EIGEN_VECTORIZE_AVX512)
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (std::is_same_v<T, Eigen::bfloat16>)
    return _mm512_cvtps_pd(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16)));
  else
    return _mm512_cvtps_pd(
        _mm512_castps512_ps256(_mm512_cvtph_ps(_mm256_set_m128i(_mm_setzero_si128(), v))));
#else
#if defined(EIGEN_VECTORIZE_AVX)
  const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  if constexpr (std::is_same_v<T, Eigen::bfloat16>)
    return _mm256_cvtps_pd(_mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), v)));
#if defined(__F16C__)
  else
    return _mm256_cvtps_pd(_mm_cvtph_ps(v));
#endif
#elif defined(EIGEN_VECTORIZE_SSE2)
  if constexpr (std::is_same_v<T, Eigen::bfloat16>) {
    std::uint32_t two;
    std::memcpy(&two, p, sizeof two);
    const __m128i v = _mm_cvtsi32_si128(static_cast<int>(two));
    return _mm_cvtps_pd(_mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), v)));
  }
#endif
  alignas(64) double widened[kWideLanes];
  for (Index i = 0; i < kWideLanes; ++i) widened[i] = static_cast<double>(static_cast<float>(p[i]));
  return ei::pload<Wide>(widened);
#endif
}

/// Loads kWideLanes values of type T starting at p, converted to double (T: float, double, or
/// a 16-bit storage type, see storage.hpp).
template <class T>
inline Wide load_wide(const T* p) {
  if constexpr (std::is_same_v<T, double>) {
    return ei::ploadu<Wide>(p);
  } else if constexpr (std::is_same_v<T, float>) {
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
  } else {  // 16-bit storage (storage.hpp)
    return load_wide_16(p);
  }
}

/// permute(p, index): lane l of the result is lane index[l] of p, for kLanes<T> indices of
/// LaneIndex<T> below kLanes<T>. kPermutes<T> tells where one instruction does it (AVX-512;
/// AVX2 for floats); elsewhere it goes through memory.
template <class T>
using LaneIndex = std::conditional_t<sizeof(T) == 4, std::int32_t, std::int64_t>;
#if defined(EIGEN_VECTORIZE_AVX512)
template <class T>
inline constexpr bool kPermutes = true;
#elif defined(EIGEN_VECTORIZE_AVX2)
template <class T>
inline constexpr bool kPermutes = std::is_same_v<T, float>;
#else
template <class T>
inline constexpr bool kPermutes = false;
#endif

template <class T>
inline Packet<T> permute(const Packet<T>& p, const LaneIndex<T>* index) {
#if defined(EIGEN_VECTORIZE_AVX512)
  const __m512i i = _mm512_loadu_si512(index);
  if constexpr (std::is_same_v<T, float>) return _mm512_permutexvar_ps(i, p);
  else return _mm512_permutexvar_pd(i, p);
#else
#if defined(EIGEN_VECTORIZE_AVX2)
  if constexpr (std::is_same_v<T, float>)
    return _mm256_permutevar8x32_ps(p,
                                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(index)));
#endif
  T from[kLanes<T>], to[kLanes<T>];
  ei::pstoreu(from, p);
  for (Index l = 0; l < kLanes<T>; ++l) to[l] = from[index[l]];
  return ei::ploadu<Packet<T>>(to);
#endif
}

/// Tails of runs go through the same vector code as their bodies, with packets cut to their first
/// n lanes (0 < n < lanes): masked loads and stores where the target has them (AVX2, AVX-512),
/// a copy through a small buffer elsewhere. Nothing at or past p + n is read or written.
/// The other lanes of a loaded packet hold `fill`.
template <class T>
inline Packet<T> load_first_native(const T* p, Index n, T fill = T(0)) {
#if defined(EIGEN_VECTORIZE_AVX512)
  const auto m = static_cast<__mmask16>((1u << n) - 1);
  if constexpr (std::is_same_v<T, float>) return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), m, p);
  else return _mm512_mask_loadu_pd(_mm512_set1_pd(fill), static_cast<__mmask8>(m), p);
#elif defined(EIGEN_VECTORIZE_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m));
  } else {
    const __m256i m = _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
    return _mm256_blendv_pd(_mm256_set1_pd(fill), _mm256_maskload_pd(p, m), _mm256_castsi256_pd(m));
  }
#else
  alignas(64) T buffer[kLanes<T>];
  for (Index i = 0; i < kLanes<T>; ++i) buffer[i] = i < n ? p[i] : fill;
  return ei::pload<Packet<T>>(buffer);
#endif
}

template <class T>
inline void store_first_native(T* p, const Packet<T>& v, Index n) {
#if defined(EIGEN_VECTORIZE_AVX512)
  const auto m = static_cast<__mmask16>((1u << n) - 1);
  if constexpr (std::is_same_v<T, float>) _mm512_mask_storeu_ps(p, m, v);
  else _mm512_mask_storeu_pd(p, static_cast<__mmask8>(m), v);
#elif defined(EIGEN_VECTORIZE_AVX2)
  if constexpr (std::is_same_v<T, float>)
    _mm256_maskstore_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)), v);
  else _mm256_maskstore_pd(p, _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3)), v);
#else
  alignas(64) T buffer[kLanes<T>];
  ei::pstore(buffer, v);
  for (Index i = 0; i < n; ++i) p[i] = buffer[i];
#endif
}

/// Stores, for each of the first n lanes of v, the byte 1 where the lane is > 0, else 0 (0 for
/// NaN). One compare and one byte store where AVX-512 has them (BW, VL); a loop elsewhere.
template <class T>
inline void store_positive(std::uint8_t* p, const Packet<T>& v, Index n = kLanes<T>) {
#if defined(EIGEN_VECTORIZE_AVX512) && defined(__AVX512BW__) && defined(__AVX512VL__)
  __mmask16 m;
  if constexpr (std::is_same_v<T, float>) m = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GT_OQ);
  else m = _mm512_cmp_pd_mask(v, _mm512_setzero_pd(), _CMP_GT_OQ);
  const __m128i bytes = _mm_maskz_set1_epi8(m, 1);
  if (n == kLanes<T>) {
    if constexpr (kLanes<T> == 16) _mm_storeu_si128(reinterpret_cast<__m128i*>(p), bytes);
    else _mm_storel_epi64(reinterpret_cast<__m128i*>(p), bytes);
  } else {
    _mm_mask_storeu_epi8(p, static_cast<__mmask16>((1u << n) - 1), bytes);
  }
#else
  alignas(64) T lanes[kLanes<T>];
  ei::pstore(lanes, v);
  for (Index i = 0; i < n; ++i) p[i] = lanes[i] > T(0);
#endif
}

/// load_wide for the first n < kWideLanes values; the other lanes hold `fill`.
template <class T>
inline Wide load_wide_first(const T* p, Index n, double fill) {
  if constexpr (std::is_same_v<T, double>) {
    return load_first_native(p, n, fill);
  } else if constexpr (std::is_same_v<T, float>) {
#if defined(EIGEN_VECTORIZE_AVX512)
    const auto m = static_cast<__mmask8>((1u << n) - 1);
    const __m256 v = _mm512_castps512_ps256(_mm512_maskz_loadu_ps(m, p));
    return _mm512_mask_mov_pd(_mm512_set1_pd(fill), m, _mm512_cvtps_pd(v));
#elif defined(EIGEN_VECTORIZE_AVX2)
    const __m128i m = _mm_cmpgt_epi32(_mm_set1_epi32(int(n)), _mm_setr_epi32(0, 1, 2, 3));
    const __m256d wide = _mm256_cvtps_pd(_mm_maskload_ps(p, m));
    return _mm256_blendv_pd(_mm256_set1_pd(fill), wide, _mm256_castsi256_pd(_mm256_cvtepi32_epi64(m)));
#else
    alignas(64) double buffer[kWideLanes];
    for (Index i = 0; i < kWideLanes; ++i) buffer[i] = i < n ? static_cast<double>(p[i]) : fill;
    return ei::pload<Wide>(buffer);
#endif
  } else {
    alignas(64) double buffer[kWideLanes];
    for (Index i = 0; i < kWideLanes; ++i)
      buffer[i] = i < n ? static_cast<double>(static_cast<float>(p[i])) : fill;
    return ei::pload<Wide>(buffer);
  }
}

/// The square root of each lane, correctly rounded as std::sqrt's is. (Eigen's psqrt may
/// approximate it: with EIGEN_FAST_MATH, its default, AVX-512 doubles go through rsqrt14.)
inline Wide sqrt_exact(const Wide& v) {
#if defined(EIGEN_VECTORIZE_AVX512)
  return _mm512_sqrt_pd(v);
#elif defined(EIGEN_VECTORIZE_AVX)
  return _mm256_sqrt_pd(v);
#elif defined(EIGEN_VECTORIZE_SSE2)
  return _mm_sqrt_pd(v);
#elif defined(EIGEN_VECTORIZE_NEON) && EIGEN_ARCH_ARM64
  return vsqrtq_f64(v);
#else
  double lanes[kWideLanes];
  ei::pstoreu(lanes, v);
  for (Index i = 0; i < kWideLanes; ++i) lanes[i] = std::sqrt(lanes[i]);
  return ei::ploadu<Wide>(lanes);
#endif
}

/// Stores a packet at an address aligned to the packet's size, bypassing the caches where the
/// target has such a store.
template <class T>
inline void stream_store_native(T* p, const Packet<T>& v) {
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

}  // namespace detail
BNORM_END_NAMESPACE

#include "warnings_end.hpp"
