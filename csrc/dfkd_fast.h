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
std::vector<at::Tensor> bn_stats_fwd(const at::Tensor& x);
at::Tensor bn_stats_bwd(const at::Tensor& x, const at::Tensor& mean, const c10::optional<at::Tensor>& g_mean,
                        const c10::optional<at::Tensor>& g_var, const c10::optional<at::Tensor>& g_inst);
std::vector<at::Tensor> bn_stat_loss_terms(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& rmean,
                                           const at::Tensor& rvar, const at::Tensor& offsets,
                                           const at::Tensor& weights, int64_t kind,
                                           const c10::optional<at::Tensor>& mean_bar,
                                           const c10::optional<at::Tensor>& var_bar,
                                           const c10::optional<at::Tensor>& beta, double kl_eps);
// ---- soft_ce (csrc/soft_ce.cpp) ----
// Row losses (N,) fp32 (fp64 for double) and, when asked, the gradients times `scale` (the reduction factor):
// returns {loss, grad_logits | undefined, grad_targets | undefined}.
std::vector<at::Tensor> soft_ce_fwd(const at::Tensor& logits, const at::Tensor& targets, double temperature,
                                    double scale, bool need_grad_logits, bool need_grad_targets);
// Row losses T^2 KL(softmax(t/T) || softmax(s/T)) and, when asked, both gradients times `scale`:
// returns {loss, grad_student | undefined, grad_teacher | undefined}.
std::vector<at::Tensor> kd_kl_fwd(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                                  double scale, bool need_grad_student, bool need_grad_teacher);
// ---- crop_flip (csrc/crop_flip.cpp) ----
// x (N, C, H, W) any strides, boxes (N, 4) (x0, y0, x1, y1) pixels, flip (N,) -> (N, C, out_h, out_w) contiguous.
at::Tensor crop_flip_fwd(const at::Tensor& x, const at::Tensor& boxes, const at::Tensor& flip, int64_t out_h,
                         int64_t out_w, const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& std);
// grad_out (N, C, oh, ow) any strides -> grad_x (N, C, in_h, in_w) contiguous, grad_out's dtype.
at::Tensor crop_flip_bwd(const at::Tensor& grad_out, const at::Tensor& boxes, const at::Tensor& flip, int64_t in_h,
                         int64_t in_w, const std::optional<at::Tensor>& std);

}  // namespace dfkd_fast
