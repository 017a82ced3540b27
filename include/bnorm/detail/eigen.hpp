#pragma once
// Brings in Eigen's Tensor module with Eigen::ThreadPoolDevice, whatever the user included first.
//
// The Tensor module declares ThreadPoolDevice only when EIGEN_USE_THREADS is defined. If the user
// included the Tensor module without it, including it again with the macro defined adds the
// thread-pool device: every part of the module is guarded separately, and the device's header is
// guarded on the macro as well.

#ifndef EIGEN_USE_THREADS
#define EIGEN_USE_THREADS
#endif
#include <unsupported/Eigen/CXX11/Tensor>

#if !defined(EIGEN_CXX11_TENSOR_TENSOR_DEVICE_THREAD_POOL_H)
#error "bnorm needs Eigen::ThreadPoolDevice: define EIGEN_USE_THREADS before including Eigen's Tensor module"
#endif
#if !EIGEN_VERSION_AT_LEAST(3, 4, 0)
#error "bnorm needs Eigen 3.4 or newer"
#endif
