// crop_flip: batched bilinear crop-resize + horizontal flip + normalize on CPU (SPEC §3.2).
//
// out[n, c, i, j] = (bilinear(x[n, c], y_i, x_j) - mean_c) / std_c with zeros outside the image, where
// x_j = x0 + (j' + 0.5)(x1 - x0)/ow - 0.5 (j' = ow - 1 - j when flip[n]) and y_i likewise: the same as
// grid_sample(align_corners=False, padding_mode="zeros"). The resampling is separable, so the column and row
// taps (index, two weights) are computed once per image in double precision; the planes (n, c) are then
// processed in parallel with OpenMP. The input may have any strides; the output is contiguous NCHW.
// Backward: each (n, c) plane of grad_x is owned by one thread, which scatters the bilinear weights into
// it (no races, no atomics), accumulating in float (double for float64) and casting at the end.
#include <omp.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <cmath>
#include <vector>

#include "dfkd_fast.h"

namespace dfkd_fast {
namespace {

// Taps of one axis for every image: idx[n * out + k] is the lower input index, w0/w1 the weights of idx and
// idx + 1 (zero for taps outside [0, in)).
template <typename acc_t>
struct AxisTaps {
  std::vector<int64_t> idx;
  std::vector<acc_t> w0, w1;
};

template <typename acc_t>
AxisTaps<acc_t> axis_taps(const double* boxes, const bool* flip, int64_t N, int lo, int hi, int64_t out,
                          int64_t in, bool use_flip) {
  AxisTaps<acc_t> t;
  t.idx.resize(N * out);
  t.w0.resize(N * out);
  t.w1.resize(N * out);
  for (int64_t n = 0; n < N; ++n) {
    const double b0 = boxes[n * 4 + lo], b1 = boxes[n * 4 + hi];
    const bool mirrored = use_flip && flip[n];
    for (int64_t k = 0; k < out; ++k) {
      const int64_t kk = mirrored ? out - 1 - k : k;
      double s = b0 + (static_cast<double>(kk) + 0.5) * (b1 - b0) / static_cast<double>(out) - 0.5;
      // clamp far-outside coordinates so the integer cast stays in range; their taps stay invalid
      s = std::min(std::max(s, -2.0), static_cast<double>(in) + 1.0);
      const double f = std::floor(s);
      const double a = s - f;
      const int64_t i0 = static_cast<int64_t>(f);
      t.idx[n * out + k] = i0;
      t.w0[n * out + k] = (i0 >= 0 && i0 < in) ? static_cast<acc_t>(1.0 - a) : acc_t(0);
      t.w1[n * out + k] = (i0 + 1 >= 0 && i0 + 1 < in) ? static_cast<acc_t>(a) : acc_t(0);
    }
  }
  return t;
}

struct Params {
  at::Tensor boxes;  // (N, 4) double, contiguous
  at::Tensor flip;   // (N,) bool, contiguous
};

Params check_params(const at::Tensor& x, const at::Tensor& boxes, const at::Tensor& flip, const char* xname) {
  TORCH_CHECK(x.device().is_cpu(), "crop_flip (cpp): '", xname, "' must be a CPU tensor");
  TORCH_CHECK(x.dim() == 4, "crop_flip (cpp): '", xname, "' must be 4-D (N, C, H, W), got ", x.sizes());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "crop_flip (cpp): '", xname, "' must be float32/float64/float16/bfloat16, got ", st);
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(0) == x.size(0) && boxes.size(1) == 4,
              "crop_flip (cpp): 'boxes' must be (N, 4) with N = ", x.size(0), ", got ", boxes.sizes());
  TORCH_CHECK(flip.dim() == 1 && flip.size(0) == x.size(0), "crop_flip (cpp): 'flip' must be (N,) with N = ",
              x.size(0), ", got ", flip.sizes());
  return {boxes.to(at::kCPU, at::kDouble).contiguous(), flip.to(at::kCPU, at::kBool).contiguous()};
}

std::vector<double> channel_vector(const std::optional<at::Tensor>& v, int64_t C, double fill, const char* name) {
  std::vector<double> out(C, fill);
  if (v.has_value()) {
    TORCH_CHECK(v->numel() == C, "crop_flip (cpp): '", name, "' must have C = ", C, " entries, got ", v->numel());
    auto d = v->to(at::kCPU, at::kDouble).contiguous();
    const double* p = d.data_ptr<double>();
    for (int64_t c = 0; c < C; ++c) out[c] = p[c];
  }
  return out;
}

template <typename scalar_t>
void fwd_impl(const scalar_t* xp, scalar_t* op, const Params& p, const std::vector<double>& mu,
              const std::vector<double>& sd, int64_t N, int64_t C, int64_t H, int64_t W, int64_t out_h, int64_t out_w,
              at::IntArrayRef strides) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t sn = strides[0], sc = strides[1], sh = strides[2], sw = strides[3];
  const auto tx = axis_taps<acc_t>(p.boxes.data_ptr<double>(), p.flip.data_ptr<bool>(), N, 0, 2, out_w, W, true);
  const auto ty = axis_taps<acc_t>(p.boxes.data_ptr<double>(), p.flip.data_ptr<bool>(), N, 1, 3, out_h, H, false);
#pragma omp parallel for schedule(static)
  for (int64_t plane = 0; plane < N * C; ++plane) {
    const int64_t n = plane / C, c = plane % C;
    const scalar_t* src = xp + n * sn + c * sc;
    scalar_t* dst = op + plane * out_h * out_w;
    const acc_t m = static_cast<acc_t>(mu[c]);
    const acc_t inv = static_cast<acc_t>(1.0 / sd[c]);
    const int64_t* cx = tx.idx.data() + n * out_w;
    const acc_t* cw0 = tx.w0.data() + n * out_w;
    const acc_t* cw1 = tx.w1.data() + n * out_w;
    for (int64_t i = 0; i < out_h; ++i) {
      const int64_t r = n * out_h + i;
      const acc_t wy0 = ty.w0[r], wy1 = ty.w1[r];
      const scalar_t* row0 = src + ty.idx[r] * sh;
      const scalar_t* row1 = row0 + sh;
      scalar_t* drow = dst + i * out_w;
      for (int64_t j = 0; j < out_w; ++j) {
        const acc_t wx0 = cw0[j], wx1 = cw1[j];
        const int64_t o0 = cx[j] * sw, o1 = o0 + sw;
        acc_t v0 = 0, v1 = 0;
        if (wy0 != acc_t(0)) {
          if (wx0 != acc_t(0)) v0 += wx0 * static_cast<acc_t>(row0[o0]);
          if (wx1 != acc_t(0)) v0 += wx1 * static_cast<acc_t>(row0[o1]);
        }
        if (wy1 != acc_t(0)) {
          if (wx0 != acc_t(0)) v1 += wx0 * static_cast<acc_t>(row1[o0]);
          if (wx1 != acc_t(0)) v1 += wx1 * static_cast<acc_t>(row1[o1]);
        }
        drow[j] = static_cast<scalar_t>((wy0 * v0 + wy1 * v1 - m) * inv);
      }
    }
  }
}

template <typename scalar_t>
void bwd_impl(const scalar_t* gp, at::opmath_type<scalar_t>* gxp, const Params& p, const std::vector<double>& sd,
              int64_t N, int64_t C, int64_t in_h, int64_t in_w, int64_t OH, int64_t OW, at::IntArrayRef strides) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t sn = strides[0], sc = strides[1], sh = strides[2], sw = strides[3];
  const auto tx = axis_taps<acc_t>(p.boxes.data_ptr<double>(), p.flip.data_ptr<bool>(), N, 0, 2, OW, in_w, true);
  const auto ty = axis_taps<acc_t>(p.boxes.data_ptr<double>(), p.flip.data_ptr<bool>(), N, 1, 3, OH, in_h, false);
#pragma omp parallel for schedule(static)
  for (int64_t plane = 0; plane < N * C; ++plane) {
    const int64_t n = plane / C, c = plane % C;
    const scalar_t* src = gp + n * sn + c * sc;
    acc_t* dst = gxp + plane * in_h * in_w;
    const acc_t inv = static_cast<acc_t>(1.0 / sd[c]);
    const int64_t* cx = tx.idx.data() + n * OW;
    const acc_t* cw0 = tx.w0.data() + n * OW;
    const acc_t* cw1 = tx.w1.data() + n * OW;
    for (int64_t i = 0; i < OH; ++i) {
      const int64_t r = n * OH + i;
      const acc_t wy0 = ty.w0[r] * inv, wy1 = ty.w1[r] * inv;
      if (wy0 == acc_t(0) && wy1 == acc_t(0)) continue;
      acc_t* row0 = dst + ty.idx[r] * in_w;
      acc_t* row1 = row0 + in_w;
      const scalar_t* grow = src + i * sh;
      for (int64_t j = 0; j < OW; ++j) {
        const acc_t g = static_cast<acc_t>(grow[j * sw]);
        const acc_t wx0 = cw0[j], wx1 = cw1[j];
        const int64_t x0 = cx[j];
        if (wy0 != acc_t(0)) {
          if (wx0 != acc_t(0)) row0[x0] += g * wy0 * wx0;
          if (wx1 != acc_t(0)) row0[x0 + 1] += g * wy0 * wx1;
        }
        if (wy1 != acc_t(0)) {
          if (wx0 != acc_t(0)) row1[x0] += g * wy1 * wx0;
          if (wx1 != acc_t(0)) row1[x0 + 1] += g * wy1 * wx1;
        }
      }
    }
  }
}

}  // namespace

at::Tensor crop_flip_fwd(const at::Tensor& x, const at::Tensor& boxes, const at::Tensor& flip, int64_t out_h,
                         int64_t out_w, const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& std) {
  DFKD_COUNT("crop_flip_fwd");
  auto p = check_params(x, boxes, flip, "x");
  TORCH_CHECK(out_h > 0 && out_w > 0, "crop_flip (cpp): out_size must be positive, got (", out_h, ", ", out_w, ")");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const std::vector<double> mu = channel_vector(mean, C, 0.0, "mean");
  const std::vector<double> sd = channel_vector(std, C, 1.0, "std");
  auto out = at::empty({N, C, out_h, out_w}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "crop_flip_fwd", [&] {
    fwd_impl<scalar_t>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), p, mu, sd, N, C, H, W, out_h, out_w,
                       x.strides());
  });
  return out;
}

at::Tensor crop_flip_bwd(const at::Tensor& grad_out, const at::Tensor& boxes, const at::Tensor& flip, int64_t in_h,
                         int64_t in_w, const std::optional<at::Tensor>& std) {
  DFKD_COUNT("crop_flip_bwd");
  auto p = check_params(grad_out, boxes, flip, "grad_out");
  TORCH_CHECK(in_h > 0 && in_w > 0, "crop_flip (cpp): input size must be positive, got (", in_h, ", ", in_w, ")");
  const int64_t N = grad_out.size(0), C = grad_out.size(1), OH = grad_out.size(2), OW = grad_out.size(3);
  const std::vector<double> sd = channel_vector(std, C, 1.0, "std");
  const auto st = grad_out.scalar_type();
  const auto acc_type = st == at::kDouble ? at::kDouble : at::kFloat;
  auto gx = at::zeros({N, C, in_h, in_w},
                     grad_out.options().dtype(acc_type).memory_format(at::MemoryFormat::Contiguous));
  if (grad_out.numel() == 0) return gx.to(st);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "crop_flip_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    bwd_impl<scalar_t>(grad_out.data_ptr<scalar_t>(), gx.data_ptr<acc_t>(), p, sd, N, C, in_h, in_w, OH, OW,
                       grad_out.strides());
  });
  return gx.scalar_type() == st ? gx : gx.to(st);
}

}  // namespace dfkd_fast
