#pragma once
// bnorm: batch normalization over Eigen tensors with PyTorch's semantics.
//
//   #include <bnorm/bnorm.hpp>
//   bnorm::BatchNorm2d<float> bn(64);
//   Eigen::Tensor<float, 4, Eigen::RowMajor> y = bn.forward(x);
//
// Needs Eigen 3.4 (its Tensor module, with Eigen::ThreadPoolDevice) and nothing else.

#include "batch_norm.hpp"
#include "fold.hpp"
#include "functional.hpp"
#include "options.hpp"
#include "tuning.hpp"

#define BNORM_VERSION_MAJOR 0
#define BNORM_VERSION_MINOR 1
#define BNORM_VERSION_PATCH 0
