// bnorm's kernels, compiled once per test program, or once for all those of the default flags
// (see bnorm/instances.hpp and tests/CMakeLists.txt).
#define BNORM_INSTANTIATE
#include <bnorm/instances.hpp>
