#pragma once
// Compiles bnorm's kernels once per program, not once per translation unit that calls them.
//
// Every unit that uses bnorm includes this header (it includes bnorm.hpp) before it calls
// anything; exactly one unit of the program defines BNORM_INSTANTIATE before including it, and
// compiles the kernels for float and double there. The others declare them (extern template), so
// their compiler neither instantiates nor optimizes them again. The kernels are the same code
// either way; only the build gets shorter, by about the time one unit takes to compile them.
//
// Build every unit of the program with the same instruction-set flags: a unit built with others
// names other functions (see detail/isa.hpp), so a mismatch fails to link instead of mixing code.

#include "bnorm.hpp"
#include "detail/isa.hpp"

#ifdef BNORM_INSTANTIATE
#define BNORM_DETAIL_INSTANCE template
#else
#define BNORM_DETAIL_INSTANCE extern template
#endif

// The entry points of the kernels the modules and the functional layer call, for one type T.
#define BNORM_DETAIL_INSTANCES(T)                                                                 \
  BNORM_DETAIL_INSTANCE void functional::detail::forward_training<T, false>(                      \
      const functional::Shape&, const T*, T*, double, functional::Affine<T>,                     \
      functional::BatchStats<T>, functional::Running<T>, const functional::Execution<T>&, T*,    \
      double*, functional::detail::Renormalize<T>, functional::Fused<T>, functional::Index);     \
  BNORM_DETAIL_INSTANCE void functional::detail::forward_training<T, true>(                       \
      const functional::Shape&, const T*, T*, double, functional::Affine<T>,                     \
      functional::BatchStats<T>, functional::Running<T>, const functional::Execution<T>&, T*,    \
      double*, functional::detail::Renormalize<T>, functional::Fused<T>, functional::Index);     \
  BNORM_DETAIL_INSTANCE void functional::detail::forward_inference<T, false>(                     \
      const functional::Shape&, const T*, T*, double, functional::Affine<T>, const T*, const T*, \
      const functional::Execution<T>&, T*, T*, functional::Fused<T>);                            \
  BNORM_DETAIL_INSTANCE void functional::detail::forward_inference<T, true>(                      \
      const functional::Shape&, const T*, T*, double, functional::Affine<T>, const T*, const T*, \
      const functional::Execution<T>&, T*, T*, functional::Fused<T>);                            \
  BNORM_DETAIL_INSTANCE void functional::detail::forward_from_moments<T, false>(                  \
      const functional::Shape&, const detail::Partial*, const T*, T*, double,                    \
      functional::Affine<T>, functional::BatchStats<T>, functional::Running<T>,                  \
      const functional::Execution<T>&, T*, double*, functional::detail::Renormalize<T>,          \
      functional::Fused<T>, functional::Index);                                                   \
  BNORM_DETAIL_INSTANCE void functional::detail::forward_from_moments<T, true>(                   \
      const functional::Shape&, const detail::Partial*, const T*, T*, double,                    \
      functional::Affine<T>, functional::BatchStats<T>, functional::Running<T>,                  \
      const functional::Execution<T>&, T*, double*, functional::detail::Renormalize<T>,          \
      functional::Fused<T>, functional::Index);                                                   \
  BNORM_DETAIL_INSTANCE void functional::detail::local_moments<T>(                                \
      const functional::Shape&, const T*, detail::Partial*, const functional::Execution<T>&);    \
  BNORM_DETAIL_INSTANCE void functional::detail::local_gradient_sums<T>(                          \
      const functional::Shape&, const T*, const T*, const double*, detail::Partial*,             \
      const functional::Execution<T>&);                                                           \
  BNORM_DETAIL_INSTANCE void functional::detail::backward_from_sums<T>(                           \
      const functional::Shape&, const detail::Partial*, double, const T*, const T*, T*,          \
      const double*, const T*, const T*, const functional::Execution<T>&);                       \
  BNORM_DETAIL_INSTANCE void functional::detail::backward<T>(                                     \
      const functional::Shape&, const T*, const T*, T*, functional::Statistics, const double*,   \
      const T*, const T*, T*, T*, const functional::Execution<T>&, functional::Index);           \
  BNORM_DETAIL_INSTANCE void functional::detail::group_norm_forward<T>(                           \
      const functional::Shape&, functional::Index, const T*, T*, double, functional::Affine<T>,  \
      functional::BatchStats<T>, const functional::Execution<T>&, T*, double*);                  \
  BNORM_DETAIL_INSTANCE void functional::detail::group_norm_backward<T>(                          \
      const functional::Shape&, functional::Index, const T*, const T*, T*, const double*,        \
      const T*, const T*, T*, T*, const functional::Execution<T>&);                              \
  BNORM_DETAIL_INSTANCE void detail::rows_forward<detail::RowCenter::Mean, T>(                    \
      const detail::Rows&, const T*, T*, T*, double, const T*, const T*, double*, T*,            \
      detail::Workspace<T>&, const Eigen::ThreadPoolDevice*);                                    \
  BNORM_DETAIL_INSTANCE void detail::rows_forward<detail::RowCenter::Zero, T>(                    \
      const detail::Rows&, const T*, T*, T*, double, const T*, const T*, double*, T*,            \
      detail::Workspace<T>&, const Eigen::ThreadPoolDevice*);                                    \
  BNORM_DETAIL_INSTANCE void detail::rows_backward<detail::RowCenter::Mean, T>(                   \
      const detail::Rows&, const T*, const T*, T*, const double*, const T*, const T*, T*, T*,    \
      detail::Workspace<T>&, const Eigen::ThreadPoolDevice*);                                    \
  BNORM_DETAIL_INSTANCE void detail::rows_backward<detail::RowCenter::Zero, T>(                   \
      const detail::Rows&, const T*, const T*, T*, const double*, const T*, const T*, T*, T*,    \
      detail::Workspace<T>&, const Eigen::ThreadPoolDevice*);

BNORM_BEGIN_NAMESPACE
BNORM_DETAIL_INSTANCES(float)
BNORM_DETAIL_INSTANCES(double)
BNORM_END_NAMESPACE

#undef BNORM_DETAIL_INSTANCES
#undef BNORM_DETAIL_INSTANCE
