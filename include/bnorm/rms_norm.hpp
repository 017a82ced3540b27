#pragma once
// RMSNorm: PyTorch's nn.RMSNorm (2.4+) over Eigen tensors. It shares LayerNorm's module,
// detail::RowNorm, and differs in centering on nothing and in its options.

#include "layer_norm.hpp"
