// A program of two units of the same calls, one built for the baseline instruction set and one
// for AVX2 with FMA: each unit must run its own bnorm code. The wide unit runs only where the CPU
// has AVX2 and FMA, as a program that dispatches by CPU would do.

#include <cmath>
#include <cstdio>

#include "unit.hpp"

int main() {
  const UnitResult base = baseline_unit();
  std::printf("baseline unit: bnorm::%s, sum %.9g\n", base.namespace_.c_str(), base.sum);
  if (!(std::isfinite(base.sum) && base.sum != 0)) return 1;
#if defined(__GNUC__)
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
    std::printf("this CPU has no AVX2 and FMA: the wide unit is linked but not run\n");
    return 0;
  }
#endif
  const UnitResult wide = wide_unit();
  std::printf("wide unit: bnorm::%s, sum %.9g\n", wide.namespace_.c_str(), wide.sum);
  if (wide.namespace_ == base.namespace_) return 1;
  return std::abs(wide.sum - base.sum) <= 1e-4 * std::abs(base.sum) ? 0 : 1;
}
