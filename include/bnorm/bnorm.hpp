#pragma once
// bnorm: normalization layers over Eigen tensors with PyTorch's semantics: BatchNorm1d/2d/3d,
// SyncBatchNorm1d/2d/3d, LayerNorm, GroupNorm, InstanceNorm1d/2d/3d and RMSNorm, and the
// functional layer under them.
//
//   #include <bnorm/bnorm.hpp>
//   bnorm::BatchNorm2d<float> bn(64);
//   Eigen::Tensor<float, 4, Eigen::RowMajor> y = bn.forward(x);
//
// Needs Eigen 3.4 (its Tensor module, with Eigen::ThreadPoolDevice) and nothing else.

#include "batch_norm.hpp"
#include "fold.hpp"
#include "functional.hpp"
#include "functional_norms.hpp"
#include "functional_sync.hpp"
#include "group_norm.hpp"
#include "instance_norm.hpp"
#include "layer_norm.hpp"
#include "options.hpp"
#include "rms_norm.hpp"
#include "sync.hpp"
#include "tuning.hpp"

#define BNORM_VERSION_MAJOR 0
#define BNORM_VERSION_MINOR 1
#define BNORM_VERSION_PATCH 0
