#pragma once
// The calls of tests/isa/unit.cpp, compiled once per instruction-set configuration.

#include <string>

struct UnitResult {
  double sum = 0;         ///< of every output of the calls
  std::string namespace_;  ///< the inline namespace bnorm's code got in that unit
};

UnitResult baseline_unit();
UnitResult wide_unit();
