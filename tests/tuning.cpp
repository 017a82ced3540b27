// The figures this test program's kernels plan by, set before any test runs from the program's
// BNORM_TEST_* definitions (tests/CMakeLists.txt): small enough for the tests' tensors to take
// the paths of large ones (streamed stores, far parts, groups of channels). Compiled with the
// program's instruction sets, so it sets the figures of the program's own bnorm code.

#include <bnorm/tuning.hpp>

namespace {

[[maybe_unused]] const bool kTuned = [] {
  bnorm::Tuning t = bnorm::tuning();
#ifdef BNORM_TEST_CACHE_BYTES
  t.last_level_cache_bytes = BNORM_TEST_CACHE_BYTES;
  t.last_level_cpus = 1;  // the whole figure for any number of threads
#endif
#ifdef BNORM_TEST_STREAM_BYTES
  t.stream_bytes = BNORM_TEST_STREAM_BYTES;
  t.stream_by_size_alone = true;
  t.line_bytes = 0;  // packets narrower than a cache line (16-bit data, AVX2, SSE2) too
#endif
#ifdef BNORM_TEST_FAR_BYTES
  t.far_bytes = BNORM_TEST_FAR_BYTES;
#endif
#ifdef BNORM_TEST_GROUP_BYTES
  t.group_bytes = BNORM_TEST_GROUP_BYTES;
#endif
  bnorm::set_tuning(t);
  return true;
}();

}  // namespace
