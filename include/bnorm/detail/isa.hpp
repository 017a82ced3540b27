#pragma once
// The namespace that holds bnorm's code, named after the instruction sets the translation unit is
// compiled for, as PyTorch's CPU_CAPABILITY and Highway's HWY_NAMESPACE do.
//
// bnorm is header-only: its functions are inline, and their bodies depend on -mavx2, -mavx512f,
// -march and EIGEN_DONT_VECTORIZE. Two translation units built with different flags would each
// define, say, BatchNorm<float, 4, 4>::forward, and the linker would keep one body for both: an
// AVX-512 body in a program whose AVX-512 unit runs only where the CPU has it would then run on a
// CPU without it, from the baseline unit too. With a namespace per configuration, each unit has
// its own names: both bodies are kept, and a module passed from one unit to the other fails to
// link instead of running another unit's code.
//
// The namespace is inline, so users write bnorm::BatchNorm2d and never the tag. It is spelled
// out, feature by feature (bnorm::isa_sse3_ssse3_sse41_sse42_avx_avx2_fma, ...), so that a link
// error names what differs. Plain data (options.hpp) has no code and stays in bnorm itself.

#if defined(EIGEN_DONT_VECTORIZE)
#define BNORM_ISA_NOVEC _novec
#else
#define BNORM_ISA_NOVEC
#endif

#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64) || defined(_M_IX86)
// The features of x86-64's microarchitecture levels v2 to v4, where compilers emit them.
#if defined(__SSE3__)
#define BNORM_ISA_F1 _sse3
#else
#define BNORM_ISA_F1
#endif
#if defined(__SSSE3__)
#define BNORM_ISA_F2 _ssse3
#else
#define BNORM_ISA_F2
#endif
#if defined(__SSE4_1__)
#define BNORM_ISA_F3 _sse41
#else
#define BNORM_ISA_F3
#endif
#if defined(__SSE4_2__)
#define BNORM_ISA_F4 _sse42
#else
#define BNORM_ISA_F4
#endif
#if defined(__AVX__)
#define BNORM_ISA_F5 _avx
#else
#define BNORM_ISA_F5
#endif
#if defined(__AVX2__)
#define BNORM_ISA_F6 _avx2
#else
#define BNORM_ISA_F6
#endif
#if defined(__FMA__)
#define BNORM_ISA_F7 _fma
#else
#define BNORM_ISA_F7
#endif
#if defined(__F16C__)
#define BNORM_ISA_F8 _f16c
#else
#define BNORM_ISA_F8
#endif
#if defined(__BMI2__)
#define BNORM_ISA_F9 _bmi2
#else
#define BNORM_ISA_F9
#endif
#if defined(__AVX512F__)
#define BNORM_ISA_F10 _avx512f
#else
#define BNORM_ISA_F10
#endif
#if defined(__AVX512DQ__)
#define BNORM_ISA_F11 _avx512dq
#else
#define BNORM_ISA_F11
#endif
#if defined(__AVX512VL__)
#define BNORM_ISA_F12 _avx512vl
#else
#define BNORM_ISA_F12
#endif
#if defined(__AVX512BW__)
#define BNORM_ISA_F13 _avx512bw
#else
#define BNORM_ISA_F13
#endif
#define BNORM_ISA_BASE _x86

#elif defined(__aarch64__) || defined(_M_ARM64) || defined(__arm__)
#if defined(__ARM_NEON) || defined(__ARM_NEON__)
#define BNORM_ISA_F1 _neon
#else
#define BNORM_ISA_F1
#endif
#if defined(__ARM_FEATURE_FMA)
#define BNORM_ISA_F2 _fma
#else
#define BNORM_ISA_F2
#endif
#if defined(__ARM_FEATURE_SVE)
#define BNORM_ISA_F3 _sve
#else
#define BNORM_ISA_F3
#endif
#if defined(__ARM_FEATURE_FP16_VECTOR_ARITHMETIC)
#define BNORM_ISA_F4 _fp16
#else
#define BNORM_ISA_F4
#endif
#define BNORM_ISA_BASE _arm
#else
#define BNORM_ISA_BASE _generic
#endif

#ifndef BNORM_ISA_F1
#define BNORM_ISA_F1
#endif
#ifndef BNORM_ISA_F2
#define BNORM_ISA_F2
#endif
#ifndef BNORM_ISA_F3
#define BNORM_ISA_F3
#endif
#ifndef BNORM_ISA_F4
#define BNORM_ISA_F4
#endif
#ifndef BNORM_ISA_F5
#define BNORM_ISA_F5
#endif
#ifndef BNORM_ISA_F6
#define BNORM_ISA_F6
#endif
#ifndef BNORM_ISA_F7
#define BNORM_ISA_F7
#endif
#ifndef BNORM_ISA_F8
#define BNORM_ISA_F8
#endif
#ifndef BNORM_ISA_F9
#define BNORM_ISA_F9
#endif
#ifndef BNORM_ISA_F10
#define BNORM_ISA_F10
#endif
#ifndef BNORM_ISA_F11
#define BNORM_ISA_F11
#endif
#ifndef BNORM_ISA_F12
#define BNORM_ISA_F12
#endif
#ifndef BNORM_ISA_F13
#define BNORM_ISA_F13
#endif

// Pasted in two steps, so that the feature macros expand first (an empty one pastes to nothing).
#define BNORM_ISA_PASTE(b, n, f1, f2, f3, f4, f5, f6, f7, f8, f9, f10, f11, f12, f13) \
  isa##b##n##f1##f2##f3##f4##f5##f6##f7##f8##f9##f10##f11##f12##f13
#define BNORM_ISA_NAME(...) BNORM_ISA_PASTE(__VA_ARGS__)

/// The inline namespace of this translation unit's configuration, e.g. isa_x86_sse3_..._fma.
#define BNORM_ISA_NAMESPACE                                                                     \
  BNORM_ISA_NAME(BNORM_ISA_BASE, BNORM_ISA_NOVEC, BNORM_ISA_F1, BNORM_ISA_F2, BNORM_ISA_F3,        \
                 BNORM_ISA_F4, BNORM_ISA_F5, BNORM_ISA_F6, BNORM_ISA_F7, BNORM_ISA_F8,             \
                 BNORM_ISA_F9, BNORM_ISA_F10, BNORM_ISA_F11, BNORM_ISA_F12, BNORM_ISA_F13)

#define BNORM_BEGIN_NAMESPACE \
  namespace bnorm {           \
  inline namespace BNORM_ISA_NAMESPACE {
#define BNORM_END_NAMESPACE \
  }                         \
  }

#define BNORM_ISA_STRINGIFY_(x) #x
#define BNORM_ISA_STRINGIFY(x) BNORM_ISA_STRINGIFY_(x)
/// The namespace's name as a string, for messages and tests.
#define BNORM_ISA_STRING BNORM_ISA_STRINGIFY(BNORM_ISA_NAMESPACE)
