// dfkd_fast compiled extension: declarations of the C++ CPU kernels (OpenMP, fp32 accumulation).
// Bindings live only in bindings.cpp. Every entry point bumps a named call counter (DFKD_COUNT) so tests
// can prove that the cpp backend really ran.
#pragma once
#include <torch/extension.h>

#include <string>
#include <vector>

namespace dfkd_fast {

void count_call(const std::string& name);
int64_t call_count(const std::string& name);

#define DFKD_COUNT(name) ::dfkd_fast::count_call(name)

// ---- bn_stats (csrc/bn_stats.cpp) ----
// ---- soft_ce (csrc/soft_ce.cpp) ----
// ---- crop_flip (csrc/crop_flip.cpp) ----

}  // namespace dfkd_fast
