// bnorm's kernels, compiled once for the whole test program (see bnorm/instances.hpp).
#define BNORM_INSTANTIATE
#include <bnorm/instances.hpp>
