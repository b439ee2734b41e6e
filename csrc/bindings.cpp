// pybind11 bindings of the dfkd_fast extension (the only file with bindings).
#include <omp.h>

#include <map>
#include <mutex>

#include "dfkd_fast.h"

namespace dfkd_fast {
namespace {
std::mutex g_count_mutex;
std::map<std::string, int64_t> g_counts;
}  // namespace

void count_call(const std::string& name) {
  std::lock_guard<std::mutex> lock(g_count_mutex);
  ++g_counts[name];
}

int64_t call_count(const std::string& name) {
  std::lock_guard<std::mutex> lock(g_count_mutex);
  auto it = g_counts.find(name);
  return it == g_counts.end() ? 0 : it->second;
}
}  // namespace dfkd_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dfkd_fast C++ CPU kernels (OpenMP)";
  m.def("call_count", &dfkd_fast::call_count, "number of calls of a named C++ entry point", py::arg("name"));
  m.def("num_threads", []() { return omp_get_max_threads(); }, "OpenMP threads available");
  // ---- bn_stats ----
  // ---- soft_ce ----
  // ---- crop_flip ----
}
