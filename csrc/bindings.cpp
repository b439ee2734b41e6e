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
  m.def("bn_stats_fwd", &dfkd_fast::bn_stats_fwd, "channel mean, biased var, instance means (fp32)", py::arg("x"));
  m.def("bn_stats_bwd", &dfkd_fast::bn_stats_bwd, "dL/dx of (mean, var, inst_mean) in x's dtype and layout",
        py::arg("x"), py::arg("mean"), py::arg("g_mean"), py::arg("g_var"), py::arg("g_inst"));
  m.def("bn_stat_loss_terms", &dfkd_fast::bn_stat_loss_terms, "weighted per-layer BN-prior terms and stat grads",
        py::arg("mean"), py::arg("var"), py::arg("rmean"), py::arg("rvar"), py::arg("offsets"), py::arg("weights"),
        py::arg("kind"), py::arg("mean_bar"), py::arg("var_bar"), py::arg("beta"), py::arg("kl_eps"));
  // ---- soft_ce ----
  m.def("soft_ce_fwd", &dfkd_fast::soft_ce_fwd, "soft-target CE: row losses + scaled gradients (CPU)",
        py::arg("logits"), py::arg("targets"), py::arg("temperature"), py::arg("scale"),
        py::arg("need_grad_logits"), py::arg("need_grad_targets"));
  m.def("kd_kl_fwd", &dfkd_fast::kd_kl_fwd, "KD KL * T^2: row losses + scaled gradients (CPU)",
        py::arg("student"), py::arg("teacher"), py::arg("temperature"), py::arg("scale"),
        py::arg("need_grad_student"), py::arg("need_grad_teacher"));
  // ---- crop_flip ----
  m.def("crop_flip_fwd", &dfkd_fast::crop_flip_fwd, "bilinear crop-resize + flip + normalize (CPU)", py::arg("x"),
        py::arg("boxes"), py::arg("flip"), py::arg("out_h"), py::arg("out_w"), py::arg("mean") = py::none(),
        py::arg("std") = py::none());
  m.def("crop_flip_bwd", &dfkd_fast::crop_flip_bwd, "gradient of crop_flip_fwd w.r.t. x (CPU)", py::arg("grad_out"),
        py::arg("boxes"), py::arg("flip"), py::arg("in_h"), py::arg("in_w"), py::arg("std") = py::none());
}
