#pragma once
// Storage types apart from the type the kernels compute in: a tensor of Eigen::bfloat16 or
// Eigen::half is read into packets of float and written back rounded to nearest even, so that
// every pass moves half the bytes of float and computes as it does for float. For float and
// double, storage and compute are one type and these functions are the plain packet loads and
// stores.

#include <cstdint>
#include <type_traits>

#include "simd.hpp"

#include "warnings_begin.hpp"

BNORM_BEGIN_NAMESPACE
namespace detail {

template <class S>
struct StorageTraits {
  using Compute = S;
};
template <>
struct StorageTraits<Eigen::bfloat16> {
  using Compute = float;
};
template <>
struct StorageTraits<Eigen::half> {
  using Compute = float;
};

/// The type the kernels compute a tensor of S in (and keep its coefficients in).
template <class S>
using Compute = typename StorageTraits<S>::Compute;

/// Whether S is stored narrower than it is computed in.
template <class S>
inline constexpr bool kNarrow = !std::is_same_v<S, Compute<S>>;

/// Bytes that one packet of Compute<S> takes in memory as S.
template <class S>
inline constexpr Index kPacketBytes = kLanes<Compute<S>> * Index(sizeof(S));

/// A packet of S as Eigen holds it, where its lanes match a packet of float's: AVX and AVX-512,
/// with Eigen's conversions (AVX-512 BF16's where the flags allow) or F16C's. SSE2 has bfloat16's
/// below; elsewhere (half without AVX, NEON, no vectors) a tensor of S is converted a value at a
/// time.
#if defined(EIGEN_VECTORIZE_AVX)
template <class S>
inline constexpr bool kNarrowPackets = kNarrow<S>;

// Half's conversions call F16C (AVX-512F's for 16 lanes) here: Eigen 3.4 uses them only under
// Clang (its test of the compiler is false under GCC), and otherwise converts a value at a time.
template <class S>
inline Packet<float> widen(const Packet<S>& v) {
  if constexpr (std::is_same_v<S, Eigen::bfloat16>) {
    return ei::Bf16ToF32(v);
  } else {
#if defined(EIGEN_VECTORIZE_AVX512)
    return _mm512_cvtph_ps(v);
#elif defined(__F16C__)
    return _mm256_cvtph_ps(v);
#else
    return ei::half2float(v);
#endif
  }
}
template <class S>
inline Packet<S> narrow(const Packet<float>& v) {
  if constexpr (std::is_same_v<S, Eigen::bfloat16>) {
    return ei::F32ToBf16(v);
  } else {
#if defined(EIGEN_VECTORIZE_AVX512)
    // (The masked form: the plain one is a macro whose mask of -1 trips -Wsign-conversion.)
    return Packet<S>(_mm512_maskz_cvtps_ph(0xFFFF, v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__F16C__)
    return Packet<S>(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
    return ei::float2half(v);
#endif
  }
}
#else
template <class S>
inline constexpr bool kNarrowPackets = false;
#endif

#if !defined(EIGEN_VECTORIZE_AVX) && defined(EIGEN_VECTORIZE_SSE2)
/// SSE2 (x86-64's baseline), where Eigen has no 16-bit packets: bfloat16's four values of a packet
/// of float, its upper halves; rounding to nearest even as Eigen's F32ToBf16 does (NaN: 0x7fc0).
inline Packet<float> load_bf16(const Eigen::bfloat16* p) {
  const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), v));
}
inline void store_bf16(Eigen::bfloat16* p, const Packet<float>& v) {
  const __m128i bits = _mm_castps_si128(v);
  const __m128i odd = _mm_and_si128(_mm_srli_epi32(bits, 16), _mm_set1_epi32(1));
  // Shifted arithmetically, every value lies in int16's range, which _mm_packs_epi32 keeps.
  __m128i t = _mm_srai_epi32(_mm_add_epi32(_mm_add_epi32(bits, _mm_set1_epi32(0x7fff)), odd), 16);
  const __m128i nan = _mm_castps_si128(_mm_cmpunord_ps(v, v));
  t = _mm_or_si128(_mm_andnot_si128(nan, t), _mm_and_si128(nan, _mm_set1_epi32(0x7fc0)));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packs_epi32(t, t));
}
template <class S>
inline constexpr bool kSse2Packets = std::is_same_v<S, Eigen::bfloat16>;
#else
template <class S>
inline constexpr bool kSse2Packets = false;
#endif

/// A packet of Compute<S> from the kLanes values at p.
template <class S>
inline Packet<Compute<S>> load(const S* p) {
  if constexpr (!kNarrow<S>) {
    return ei::ploadu<Packet<S>>(p);
#if defined(EIGEN_VECTORIZE_AVX)
  } else if constexpr (kNarrowPackets<S>) {
    return widen<S>(ei::ploadu<Packet<S>>(p));
#elif defined(EIGEN_VECTORIZE_SSE2)
  } else if constexpr (kSse2Packets<S>) {
    return load_bf16(p);
#endif
  } else {
    alignas(64) float lanes[kLanes<float>];
    for (Index i = 0; i < kLanes<float>; ++i) lanes[i] = static_cast<float>(p[i]);
    return ei::pload<Packet<float>>(lanes);
  }
}

/// Stores the kLanes values of v at p, rounded to S.
template <class S>
inline void store(S* p, const Packet<Compute<S>>& v) {
  if constexpr (!kNarrow<S>) {
    ei::pstoreu(p, v);
#if defined(EIGEN_VECTORIZE_AVX)
  } else if constexpr (kNarrowPackets<S>) {
    ei::pstoreu(p, narrow<S>(v));
#elif defined(EIGEN_VECTORIZE_SSE2)
  } else if constexpr (kSse2Packets<S>) {
    store_bf16(p, v);
#endif
  } else {
    alignas(64) float lanes[kLanes<float>];
    ei::pstore(lanes, v);
    for (Index i = 0; i < kLanes<float>; ++i) p[i] = S(lanes[i]);
  }
}

/// load for the first n < kLanes values at p (nothing at or past p + n is read); the other
/// lanes hold `fill`.
template <class S>
inline Packet<Compute<S>> load_first(const S* p, Index n, Compute<S> fill = Compute<S>(0)) {
  if constexpr (!kNarrow<S>) {
    return load_first_native(p, n, fill);
  } else {
#if defined(EIGEN_VECTORIZE_AVX512) && defined(__AVX512BW__) && defined(__AVX512VL__)
    const auto m = static_cast<__mmask16>((1u << n) - 1);
    const Packet<S> v(_mm256_maskz_loadu_epi16(m, p));
    return _mm512_mask_blend_ps(m, _mm512_set1_ps(fill), widen<S>(v));
#else
    alignas(64) float lanes[kLanes<float>];
    for (Index i = 0; i < kLanes<float>; ++i) lanes[i] = i < n ? static_cast<float>(p[i]) : fill;
    return ei::pload<Packet<float>>(lanes);
#endif
  }
}

/// store for the first n < kLanes lanes of v (nothing at or past p + n is written).
template <class S>
inline void store_first(S* p, const Packet<Compute<S>>& v, Index n) {
  if constexpr (!kNarrow<S>) {
    store_first_native(p, v, n);
  } else {
#if defined(EIGEN_VECTORIZE_AVX512) && defined(__AVX512BW__) && defined(__AVX512VL__)
    _mm256_mask_storeu_epi16(p, static_cast<__mmask16>((1u << n) - 1), narrow<S>(v));
#else
    alignas(64) float lanes[kLanes<float>];
    ei::pstore(lanes, v);
    for (Index i = 0; i < n; ++i) p[i] = S(lanes[i]);
#endif
  }
}

/// store at an address aligned to kPacketBytes<S>, bypassing the caches where the target has
/// such a store.
template <class S>
inline void stream_store(S* p, const Packet<Compute<S>>& v) {
  if constexpr (!kNarrow<S>) {
    stream_store_native(p, v);
#if defined(EIGEN_VECTORIZE_AVX512)
  } else if constexpr (kNarrowPackets<S>) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), narrow<S>(v));
#elif defined(EIGEN_VECTORIZE_AVX)
  } else if constexpr (kNarrowPackets<S>) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), narrow<S>(v));
#endif
  } else {
    store(p, v);
  }
}

/// Packets of Compute<S> that one streamed line takes: 2 for 16-bit types at AVX-512, whose
/// packet fills half of a 64-byte line, else 1. The elementwise pass computes such a line's two
/// packets in one step and streams them as one store (stream_store_line). (Float and double at
/// AVX2 would pair the same way; not measured, so their half-line packets store plainly.)
template <class S>
inline constexpr int kLinePackets =
#if defined(EIGEN_VECTORIZE_AVX512)
    kNarrowPackets<S> ? 2 : 1;
#else
    1;
#endif

/// Streams lo and, after it, hi: the kLinePackets == 2 packets of one line, at p aligned to
/// the line.
template <class S>
inline void stream_store_line(S* p, const Packet<Compute<S>>& lo, const Packet<Compute<S>>& hi) {
  static_assert(kLinePackets<S> == 2, "a line of one packet is one stream_store");
#if defined(EIGEN_VECTORIZE_AVX512)
  const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(narrow<S>(lo)), narrow<S>(hi), 1);
  _mm512_stream_si512(reinterpret_cast<__m512i*>(p), both);
#else
  (void)p;
  (void)lo;
  (void)hi;
#endif
}

/// A value of S in Compute<S>.
template <class S>
inline Compute<S> computed(const S& v) {
  return static_cast<Compute<S>>(v);
}

}  // namespace detail
BNORM_END_NAMESPACE

#include "warnings_end.hpp"
