// Soft-target cross-entropy and KD KL divergence on CPU (SPEC §3.3): loss and gradients in one call.
//
// Per row (u = z / T):  soft CE  loss = -sum y log softmax(u),  dz = (softmax(u) sum y - y) r / T,
//                                  dy = (lse(u) - u) r;
//                       KD       loss = T^2 KL(softmax(t/T) || softmax(s/T)),  ds = T (q - p) r,
//                                  dt = T p (log p - log q - KL) r.
// r is the reduction scale (1/N for mean). Rows are split over the intra-op thread pool (at::parallel_for,
// so torch.set_num_threads applies); each row is converted once into a per-thread fp32 buffer (fp64 for
// double inputs), then every loop is a branch-free `omp simd` loop; exp is a vectorizable polynomial
// (rel. error < 2e-7 on the whole float range). Inputs are made contiguous; gradients come back in the
// input dtype, losses in fp32 (fp64 for double).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "dfkd_fast.h"

namespace dfkd_fast {
namespace {

// exp(x) = 2^n * e^r, n = round(x / ln2), |r| <= ln2 / 2, degree-6 minimax-like Taylor polynomial.
// Branch-free so that GCC vectorizes the calling loops; x is clamped to the finite float range.
#pragma omp declare simd notinbranch
inline float vexp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693145751953125f;  // Cody-Waite split of ln2
  r = r - n * 1.428606765330187045e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  return p * scale;
}

inline double vexp(double x) { return std::exp(x); }

template <typename acc_t>
inline acc_t row_max(const acc_t* u, int64_t k) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < k; ++j) m = u[j] > m ? u[j] : m;
  return m;
}

// e[j] = exp(u[j] - m); returns sum e.
template <typename acc_t>
inline acc_t exp_shift_sum(const acc_t* u, acc_t m, acc_t* e, int64_t k) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < k; ++j) {
    e[j] = vexp(u[j] - m);
    s += e[j];
  }
  return s;
}

template <typename scalar_t, typename acc_t>
inline void load_scaled(const scalar_t* src, acc_t mult, acc_t* dst, int64_t k) {
  for (int64_t j = 0; j < k; ++j) dst[j] = static_cast<acc_t>(src[j]) * mult;
}

int64_t grain_rows(int64_t k) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1)); }

void check_pair(const at::Tensor& a, const at::Tensor& b, const char* na, const char* nb) {
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), na, " and ", nb, " must be CPU tensors");
  TORCH_CHECK(a.dim() == 2, na, " must be 2-D (N, K), got ", a.sizes());
  TORCH_CHECK(a.sizes() == b.sizes(), na, " and ", nb, " must have the same shape, got ", a.sizes(), " and ",
              b.sizes());
}

template <typename scalar_t, typename tscalar_t>
void soft_ce_kernel(const at::Tensor& z, const at::Tensor& y, at::Tensor& loss, at::Tensor* gz, at::Tensor* gy,
                    double temperature, double scale) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t n = z.size(0), k = z.size(1);
  const scalar_t* zp = z.data_ptr<scalar_t>();
  const tscalar_t* yp = y.data_ptr<tscalar_t>();
  acc_t* lp = loss.data_ptr<acc_t>();
  scalar_t* gzp = gz ? gz->data_ptr<scalar_t>() : nullptr;
  tscalar_t* gyp = gy ? gy->data_ptr<tscalar_t>() : nullptr;
  const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
  const acc_t gz_mult = static_cast<acc_t>(scale / temperature);
  const acc_t r = static_cast<acc_t>(scale);
  at::parallel_for(0, n, grain_rows(k), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(3 * k);
    acc_t* u = buf.data();
    acc_t* yb = u + k;
    acc_t* e = yb + k;
    for (int64_t i = begin; i < end; ++i) {
      load_scaled(zp + i * k, inv_t, u, k);
      load_scaled(yp + i * k, acc_t(1), yb, k);
      const acc_t m = row_max(u, k);
      const acc_t s = exp_shift_sum(u, m, e, k);
      acc_t sy = 0, syu = 0;  // sum y, sum y (u - m) (terms <= 0: no cancellation)
#pragma omp simd reduction(+ : sy, syu)
      for (int64_t j = 0; j < k; ++j) {
        sy += yb[j];
        syu += yb[j] * (u[j] - m);
      }
      const acc_t log_s = std::log(s);
      lp[i] = sy * log_s - syu;
      if (gzp) {
        const acc_t a = sy / s * gz_mult;
        scalar_t* g = gzp + i * k;
        for (int64_t j = 0; j < k; ++j) g[j] = static_cast<scalar_t>(e[j] * a - yb[j] * gz_mult);
      }
      if (gyp) {
        tscalar_t* g = gyp + i * k;
        for (int64_t j = 0; j < k; ++j) g[j] = static_cast<tscalar_t>(((m - u[j]) + log_s) * r);
      }
    }
  });
}

template <typename scalar_t, typename tscalar_t>
void kd_kl_kernel(const at::Tensor& s_in, const at::Tensor& t_in, at::Tensor& loss, at::Tensor* gs, at::Tensor* gt,
                  double temperature, double scale) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t n = s_in.size(0), k = s_in.size(1);
  const scalar_t* sp = s_in.data_ptr<scalar_t>();
  const tscalar_t* tp = t_in.data_ptr<tscalar_t>();
  acc_t* lp = loss.data_ptr<acc_t>();
  scalar_t* gsp = gs ? gs->data_ptr<scalar_t>() : nullptr;
  tscalar_t* gtp = gt ? gt->data_ptr<tscalar_t>() : nullptr;
  const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
  const acc_t t2 = static_cast<acc_t>(temperature * temperature);
  const acc_t g_mult = static_cast<acc_t>(temperature * scale);
  at::parallel_for(0, n, grain_rows(k), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(4 * k);
    acc_t* a = buf.data();  // teacher t / T, then log p
    acc_t* b = a + k;       // student s / T, then log q
    acc_t* ea = b + k;      // p
    acc_t* eb = ea + k;     // q
    for (int64_t i = begin; i < end; ++i) {
      load_scaled(tp + i * k, inv_t, a, k);
      load_scaled(sp + i * k, inv_t, b, k);
      const acc_t ma = row_max(a, k), mb = row_max(b, k);
      const acc_t sa = exp_shift_sum(a, ma, ea, k), sb = exp_shift_sum(b, mb, eb, k);
      const acc_t log_sa = std::log(sa), log_sb = std::log(sb);
      const acc_t inv_sa = acc_t(1) / sa, inv_sb = acc_t(1) / sb;
      acc_t kl = 0;
#pragma omp simd reduction(+ : kl)
      for (int64_t j = 0; j < k; ++j) {
        a[j] = (a[j] - ma) - log_sa;  // (x - max) - log(sum): no rounding of max + log(sum)
        b[j] = (b[j] - mb) - log_sb;
        ea[j] *= inv_sa;
        eb[j] *= inv_sb;
        kl += ea[j] * (a[j] - b[j]);
      }
      lp[i] = kl * t2;
      if (gsp) {
        scalar_t* g = gsp + i * k;
        for (int64_t j = 0; j < k; ++j) g[j] = static_cast<scalar_t>((eb[j] - ea[j]) * g_mult);
      }
      if (gtp) {
        tscalar_t* g = gtp + i * k;
        for (int64_t j = 0; j < k; ++j) g[j] = static_cast<tscalar_t>(ea[j] * (a[j] - b[j] - kl) * g_mult);
      }
    }
  });
}

at::ScalarType acc_type(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

std::vector<at::Tensor> soft_ce_fwd(const at::Tensor& logits, const at::Tensor& targets, double temperature,
                                    double scale, bool need_grad_logits, bool need_grad_targets) {
  DFKD_COUNT("soft_ce_fwd");
  check_pair(logits, targets, "logits", "targets");
  TORCH_CHECK(temperature > 0, "temperature must be > 0, got ", temperature);
  const at::Tensor z = logits.contiguous();
  const at::Tensor y = targets.contiguous();
  at::Tensor loss = at::empty({z.size(0)}, z.options().dtype(acc_type(z.scalar_type())));
  at::Tensor gz, gy;
  if (need_grad_logits) gz = at::empty(z.sizes(), z.options());
  if (need_grad_targets) gy = at::empty(y.sizes(), y.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "soft_ce_fwd", [&] {
    using zs_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "soft_ce_fwd_targets", [&] {
      soft_ce_kernel<zs_t, scalar_t>(z, y, loss, need_grad_logits ? &gz : nullptr,
                                     need_grad_targets ? &gy : nullptr, temperature, scale);
    });
  });
  return {loss, gz, gy};
}

std::vector<at::Tensor> kd_kl_fwd(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                                  double scale, bool need_grad_student, bool need_grad_teacher) {
  DFKD_COUNT("kd_kl_fwd");
  check_pair(student, teacher, "student_logits", "teacher_logits");
  TORCH_CHECK(temperature > 0, "temperature must be > 0, got ", temperature);
  const at::Tensor s = student.contiguous();
  const at::Tensor t = teacher.contiguous();
  at::Tensor loss = at::empty({s.size(0)}, s.options().dtype(acc_type(s.scalar_type())));
  at::Tensor gs, gt;
  if (need_grad_student) gs = at::empty(s.sizes(), s.options());
  if (need_grad_teacher) gt = at::empty(t.sizes(), t.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "kd_kl_fwd", [&] {
    using ss_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "kd_kl_fwd_teacher", [&] {
      kd_kl_kernel<ss_t, scalar_t>(s, t, loss, need_grad_student ? &gs : nullptr,
                                   need_grad_teacher ? &gt : nullptr, temperature, scale);
    });
  });
  return {loss, gs, gt};
}

}  // namespace dfkd_fast
