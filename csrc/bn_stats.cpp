// BatchNorm-statistic matching on CPU (SPEC §3.1): per-channel mean / biased variance / instance means in
// one read of x, the fused backward in one more read, and the loss terms of all layers in one call.
//
// Layout: x is addressed as (N, C, H, W) with explicit strides (2-D (N, C) is seen as (1, C, 1, N)), so
// contiguous, channels_last and sliced inputs run without a copy. Two loop orders: "rows" (one (n, c) pair
// per task, the spatial axis innermost; vectorized when it is unit-stride) and "channels inner" (channels_last:
// for each spatial position the channel vector is contiguous). Accumulation: each (n, c) uses sums shifted by
// its first element, in fp32 over short blocks flushed into double, then Chan's combination over n, so large
// means (1e3 + noise) keep their variance. Inputs float / half / bfloat16 (double is served by the torch path).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "dfkd_fast.h"

namespace dfkd_fast {
namespace {

constexpr int64_t kFlush = 256;  // fp32 partial sums are flushed into double every kFlush elements
constexpr int64_t kCBlock = 256;  // channel block of the channels-inner loops

struct View {
  int64_t n, c, h, w;
  int64_t sn, sc, sh, sw;
};

View make_view(const at::Tensor& t, const char* name) {
  View v{};
  if (t.dim() == 2) {
    v = {1, t.size(1), 1, t.size(0), 0, t.stride(1), 0, t.stride(0)};
  } else if (t.dim() == 3) {
    v = {t.size(0), t.size(1), 1, t.size(2), t.stride(0), t.stride(1), 0, t.stride(2)};
  } else {
    TORCH_CHECK(t.dim() == 4, name, " must have 2, 3 or 4 dims (N, C[, L | H, W]), got ", t.dim());
    v = {t.size(0), t.size(1), t.size(2), t.size(3), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
  }
  return v;
}

bool mergeable(const View& v) { return v.h == 1 || v.sh == v.w * v.sw; }

// Merge (h, w) into one spatial axis (the caller checked that the strides allow it).
void merge_hw(View& v) {
  v.w = v.h * v.w;
  v.h = 1;
  v.sh = 0;
}

// Per-(n, c) shifted sums over the spatial axis: shift K = first element, s1 = sum(x - K), s2 = sum((x - K)^2).
template <typename T, bool kUnit>
void row_sums(const T* p, const View& v, double& s1, double& s2, float& shift) {
  const float k = static_cast<float>(p[0]);
  shift = k;
  double d1 = 0.0, d2 = 0.0;
  for (int64_t h = 0; h < v.h; ++h) {
    const T* row = p + h * v.sh;
    for (int64_t w0 = 0; w0 < v.w; w0 += kFlush) {
      const int64_t w1 = std::min(v.w, w0 + kFlush);
      float a1 = 0.f, a2 = 0.f;
      if (kUnit) {
#pragma omp simd reduction(+ : a1, a2)
        for (int64_t w = w0; w < w1; ++w) {
          const float d = static_cast<float>(row[w]) - k;
          a1 += d;
          a2 += d * d;
        }
      } else {
        for (int64_t w = w0; w < w1; ++w) {
          const float d = static_cast<float>(row[w * v.sw]) - k;
          a1 += d;
          a2 += d * d;
        }
      }
      d1 += a1;
      d2 += a2;
    }
  }
  s1 = d1;
  s2 = d2;
}

template <typename T>
void stats_fwd_impl(const at::Tensor& x, const View& v, std::vector<double>& inst, std::vector<double>& m2) {
  const T* base = x.data_ptr<T>();
  const int64_t hw = v.h * v.w;
  const double inv_s = 1.0 / static_cast<double>(hw);
  const bool channels_inner = v.sc == 1 && v.sw != 1 && v.h == 1;
  if (!channels_inner) {
    const bool unit = v.sw == 1;
    at::parallel_for(0, v.n * v.c, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t n = i / v.c, c = i % v.c;
        const T* p = base + n * v.sn + c * v.sc;
        double s1, s2;
        float k;
        if (unit) {
          row_sums<T, true>(p, v, s1, s2, k);
        } else {
          row_sums<T, false>(p, v, s1, s2, k);
        }
        inst[i] = static_cast<double>(k) + s1 * inv_s;
        m2[i] = std::max(0.0, s2 - s1 * s1 * inv_s);
      }
    });
    return;
  }
  const int64_t nblk = (v.c + kCBlock - 1) / kCBlock;
  at::parallel_for(0, v.n * nblk, 1, [&](int64_t b, int64_t e) {
    float k[kCBlock], a1[kCBlock], a2[kCBlock];
    double d1[kCBlock], d2[kCBlock];
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / nblk, c0 = (t % nblk) * kCBlock, cn = std::min(kCBlock, v.c - c0);
      const T* p = base + n * v.sn + c0;
      for (int64_t c = 0; c < cn; ++c) {
        k[c] = static_cast<float>(p[c]);
        d1[c] = 0.0;
        d2[c] = 0.0;
      }
      for (int64_t s0 = 0; s0 < hw; s0 += kFlush) {
        const int64_t s1 = std::min(hw, s0 + kFlush);
        for (int64_t c = 0; c < cn; ++c) a1[c] = a2[c] = 0.f;
        for (int64_t s = s0; s < s1; ++s) {
          const T* q = p + s * v.sw;
#pragma omp simd
          for (int64_t c = 0; c < cn; ++c) {
            const float d = static_cast<float>(q[c]) - k[c];
            a1[c] += d;
            a2[c] += d * d;
          }
        }
        for (int64_t c = 0; c < cn; ++c) {
          d1[c] += a1[c];
          d2[c] += a2[c];
        }
      }
      for (int64_t c = 0; c < cn; ++c) {
        const int64_t i = n * v.c + c0 + c;
        inst[i] = static_cast<double>(k[c]) + d1[c] * inv_s;
        m2[i] = std::max(0.0, d2[c] - d1[c] * d1[c] * inv_s);
      }
    }
  });
}

template <typename T, bool kUnit>
void row_bwd(const T* xp, T* op, const View& v, const View& o, float mu, float c0, float gb) {
  for (int64_t h = 0; h < v.h; ++h) {
    const T* xr = xp + h * v.sh;
    T* orow = op + h * o.sh;
    if (kUnit) {
#pragma omp simd
      for (int64_t w = 0; w < v.w; ++w) orow[w] = static_cast<T>(c0 + gb * (static_cast<float>(xr[w]) - mu));
    } else {
      for (int64_t w = 0; w < v.w; ++w) {
        orow[w * o.sw] = static_cast<T>(c0 + gb * (static_cast<float>(xr[w * v.sw]) - mu));
      }
    }
  }
}

template <typename T>
void stats_bwd_impl(const at::Tensor& x, at::Tensor& dx, const View& v, const View& o, const float* mu,
                    const float* ga, const float* gb, const float* gi, int64_t gn, int64_t gc, int64_t gw) {
  const T* xb = x.data_ptr<T>();
  T* ob = dx.data_ptr<T>();
  // gi (pre-scaled) is per (n, c) when gw == 0, per element of the spatial axis (2-D inputs) otherwise.
  const bool same_layout = v.sn == o.sn && v.sc == o.sc && v.sh == o.sh && v.sw == o.sw && v.h == o.h;
  const bool channels_inner = same_layout && v.sc == 1 && v.sw != 1 && v.h == 1 && (gi == nullptr || gc == 1);
  if (!channels_inner) {
    const bool unit = v.sw == 1 && o.sw == 1;
    at::parallel_for(0, v.n * v.c, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t n = i / v.c, c = i % v.c;
        const T* xp = xb + n * v.sn + c * v.sc;
        T* op = ob + n * o.sn + c * o.sc;
        if (gi != nullptr && gw != 0) {
          const float* g = gi + n * gn + c * gc;
          for (int64_t h = 0; h < v.h; ++h) {
            for (int64_t w = 0; w < v.w; ++w) {
              const float xv = static_cast<float>(xp[h * v.sh + w * v.sw]);
              op[h * o.sh + w * o.sw] = static_cast<T>(ga[c] + g[w * gw] + gb[c] * (xv - mu[c]));
            }
          }
          continue;
        }
        const float c0 = ga[c] + (gi != nullptr ? gi[n * gn + c * gc] : 0.f);
        if (unit) {
          row_bwd<T, true>(xp, op, v, o, mu[c], c0, gb[c]);
        } else {
          row_bwd<T, false>(xp, op, v, o, mu[c], c0, gb[c]);
        }
      }
    });
    return;
  }
  const int64_t hw = v.w;
  const int64_t chunk = 64;
  const int64_t nchunk = (hw + chunk - 1) / chunk;
  at::parallel_for(0, v.n * nchunk, 1, [&](int64_t b, int64_t e) {
    std::vector<float> c0(v.c);
    int64_t cur_n = -1;
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / nchunk, s0 = (t % nchunk) * chunk, s1 = std::min(hw, s0 + chunk);
      if (n != cur_n && gw == 0) {
        for (int64_t c = 0; c < v.c; ++c) c0[c] = ga[c] + (gi != nullptr ? gi[n * gn + c] : 0.f);
        cur_n = n;
      }
      for (int64_t s = s0; s < s1; ++s) {
        const T* xp = xb + n * v.sn + s * v.sw;
        T* op = ob + n * o.sn + s * o.sw;
        if (gw != 0 && gi != nullptr) {
          const float* g = gi + n * gn + s * gw;
#pragma omp simd
          for (int64_t c = 0; c < v.c; ++c) {
            op[c] = static_cast<T>(ga[c] + g[c] + gb[c] * (static_cast<float>(xp[c]) - mu[c]));
          }
        } else {
#pragma omp simd
          for (int64_t c = 0; c < v.c; ++c) {
            op[c] = static_cast<T>(c0[c] + gb[c] * (static_cast<float>(xp[c]) - mu[c]));
          }
        }
      }
    }
  });
}

void check_stats_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              op, ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.numel() > 0, op, ": x must be non-empty");
}

at::Tensor f32_vec(const at::Tensor& t, int64_t c, const char* name) {
  TORCH_CHECK(t.numel() == c, name, " must have ", c, " elements (one per channel), got ", t.numel());
  return t.to(at::kFloat).contiguous();
}

}  // namespace

std::vector<at::Tensor> bn_stats_fwd(const at::Tensor& x) {
  DFKD_COUNT("bn_stats_fwd");
  check_stats_input(x, "bn_stats_fwd");
  View v = make_view(x, "x");
  if (mergeable(v)) merge_hw(v);
  const int64_t nc = v.n * v.c;
  std::vector<double> inst(nc), m2(nc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stats_fwd",
                                  [&] { stats_fwd_impl<scalar_t>(x, v, inst, m2); });
  const int64_t hw = v.h * v.w;
  at::Tensor mean = at::empty({v.c}, x.options().dtype(at::kFloat));
  at::Tensor var = at::empty({v.c}, x.options().dtype(at::kFloat));
  float* mp = mean.data_ptr<float>();
  float* vp = var.data_ptr<float>();
  const double total = static_cast<double>(v.n) * static_cast<double>(hw);
  at::parallel_for(0, v.c, 16, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      double s = 0.0;
      for (int64_t n = 0; n < v.n; ++n) s += inst[n * v.c + c];
      const double mu = s / static_cast<double>(v.n);
      double acc = 0.0, dev = 0.0;
      for (int64_t n = 0; n < v.n; ++n) {
        const double d = inst[n * v.c + c] - mu;
        acc += m2[n * v.c + c];
        dev += d * d;
      }
      mp[c] = static_cast<float>(mu);
      vp[c] = static_cast<float>((acc + static_cast<double>(hw) * dev) / total);
    }
  });
  at::Tensor inst_t;
  if (x.dim() == 2) {
    inst_t = x.to(at::kFloat);
  } else {
    inst_t = at::empty({v.n, v.c}, x.options().dtype(at::kFloat));
    float* ip = inst_t.data_ptr<float>();
    for (int64_t i = 0; i < nc; ++i) ip[i] = static_cast<float>(inst[i]);
  }
  return {mean, var, inst_t};
}

at::Tensor bn_stats_bwd(const at::Tensor& x, const at::Tensor& mean, const c10::optional<at::Tensor>& g_mean,
                        const c10::optional<at::Tensor>& g_var, const c10::optional<at::Tensor>& g_inst) {
  DFKD_COUNT("bn_stats_bwd");
  check_stats_input(x, "bn_stats_bwd");
  View v = make_view(x, "x");
  const int64_t c = v.c;
  const double m_total = static_cast<double>(x.numel() / c);
  at::Tensor mu = f32_vec(mean, c, "mean");
  at::Tensor ga = g_mean.has_value() ? (f32_vec(*g_mean, c, "g_mean") / m_total).contiguous()
                                     : at::zeros({c}, mu.options());
  at::Tensor gb = g_var.has_value() ? (f32_vec(*g_var, c, "g_var") * (2.0 / m_total)).contiguous()
                                    : at::zeros({c}, mu.options());
  at::Tensor gi;
  int64_t gn = 0, gc = 0, gw = 0;
  if (g_inst.has_value()) {
    TORCH_CHECK(g_inst->dim() == 2 && g_inst->size(0) == (x.dim() == 2 ? x.size(0) : v.n) && g_inst->size(1) == c,
                "g_inst must have shape (N, C) = (", x.size(0), ", ", c, "), got ", g_inst->sizes());
    if (x.dim() == 2) {
      gi = g_inst->to(at::kFloat).contiguous();
      gc = 1;
      gw = c;
    } else {
      gi = (g_inst->to(at::kFloat) / static_cast<double>(v.h * v.w)).contiguous();
      gn = c;
      gc = 1;
    }
  }
  at::Tensor dx = at::empty_like(x);
  View o = make_view(dx, "dx");
  if (mergeable(v) && mergeable(o)) {
    merge_hw(v);
    merge_hw(o);
  }
  const float* gip = gi.defined() ? gi.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stats_bwd", [&] {
    stats_bwd_impl<scalar_t>(x, dx, v, o, mu.data_ptr<float>(), ga.data_ptr<float>(), gb.data_ptr<float>(), gip, gn,
                             gc, gw);
  });
  return dx;
}

std::vector<at::Tensor> bn_stat_loss_terms(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& rmean,
                                           const at::Tensor& rvar, const at::Tensor& offsets,
                                           const at::Tensor& weights, int64_t kind,
                                           const c10::optional<at::Tensor>& mean_bar,
                                           const c10::optional<at::Tensor>& var_bar,
                                           const c10::optional<at::Tensor>& beta, double kl_eps) {
  DFKD_COUNT("bn_stat_loss_terms");
  TORCH_CHECK(kind >= 0 && kind <= 2, "kind must be 0 (l2), 1 (kl) or 2 (mse), got ", kind);
  const int64_t total = mean.numel();
  at::Tensor m = f32_vec(mean, total, "mean"), vv = f32_vec(var, total, "var");
  at::Tensor rm = f32_vec(rmean, total, "running_mean"), rv = f32_vec(rvar, total, "running_var");
  at::Tensor off = offsets.to(at::kLong).contiguous();
  const int64_t layers = off.numel() - 1;
  TORCH_CHECK(layers >= 1, "offsets must have at least 2 entries");
  at::Tensor w = f32_vec(weights, layers, "weights");
  const bool mmt = beta.has_value();
  at::Tensor mb, vb, bt;
  if (mmt) {
    TORCH_CHECK(mean_bar.has_value() && var_bar.has_value(), "mean_bar and var_bar are required with beta");
    mb = f32_vec(*mean_bar, total, "mean_bar");
    vb = f32_vec(*var_bar, total, "var_bar");
    bt = f32_vec(*beta, total, "beta");
  }
  at::Tensor losses = at::empty({layers}, m.options());
  at::Tensor gm = at::empty({total}, m.options());
  at::Tensor gv = at::empty({total}, m.options());
  const float *mp = m.data_ptr<float>(), *vp = vv.data_ptr<float>();
  const float *rmp = rm.data_ptr<float>(), *rvp = rv.data_ptr<float>(), *wp = w.data_ptr<float>();
  const float *mbp = mmt ? mb.data_ptr<float>() : nullptr, *vbp = mmt ? vb.data_ptr<float>() : nullptr;
  const float* bp = mmt ? bt.data_ptr<float>() : nullptr;
  const int64_t* op = off.data_ptr<int64_t>();
  float *lp = losses.data_ptr<float>(), *gmp = gm.data_ptr<float>(), *gvp = gv.data_ptr<float>();
  const float eps = static_cast<float>(kl_eps);
  for (int64_t l = 0; l < layers; ++l) {
    const int64_t lo = op[l], hi = op[l + 1];
    TORCH_CHECK(lo < hi && hi <= total, "offsets must be increasing within [0, ", total, "]");
    auto blended = [&](int64_t i, float& mi, float& vi, float& fac) {
      mi = mp[i];
      vi = vp[i];
      fac = 1.f;
      if (mmt) {
        mi += bp[i] * (mbp[i] - mi);
        vi += bp[i] * (vbp[i] - vi);
        fac = 1.f - bp[i];
      }
    };
    double sm = 0.0, sv = 0.0;
    for (int64_t i = lo; i < hi; ++i) {
      float mi, vi, fac;
      blended(i, mi, vi, fac);
      const double dm = static_cast<double>(mi) - rmp[i], dv = static_cast<double>(vi) - rvp[i];
      if (kind == 1) {
        const double v1 = static_cast<double>(vi) + eps, v2 = static_cast<double>(rvp[i]) + eps;
        sm += 0.5 * std::log(v2 / v1) + (v1 + dm * dm) / (2.0 * v2) - 0.5;
      } else {
        sm += dm * dm;
        sv += dv * dv;
      }
    }
    const double wl = wp[l], cnt = static_cast<double>(hi - lo);
    double scale_m, scale_v;
    if (kind == 0) {
      const double nm = std::sqrt(sm), nv = std::sqrt(sv);
      lp[l] = static_cast<float>(wl * (nm + nv));
      scale_m = nm > 0 ? wl / nm : 0.0;
      scale_v = nv > 0 ? wl / nv : 0.0;
    } else if (kind == 2) {
      lp[l] = static_cast<float>(wl * (sm + sv) / cnt);
      scale_m = scale_v = 2.0 * wl / cnt;
    } else {
      lp[l] = static_cast<float>(wl * sm);
      scale_m = scale_v = wl;
    }
    for (int64_t i = lo; i < hi; ++i) {
      float mi, vi, fac;
      blended(i, mi, vi, fac);
      const double dm = static_cast<double>(mi) - rmp[i];
      if (kind == 1) {
        const double v1 = static_cast<double>(vi) + eps, v2 = static_cast<double>(rvp[i]) + eps;
        gmp[i] = static_cast<float>(scale_m * dm / v2 * fac);
        gvp[i] = static_cast<float>(scale_v * (0.5 / v2 - 0.5 / v1) * fac);
      } else {
        gmp[i] = static_cast<float>(scale_m * dm * fac);
        gvp[i] = static_cast<float>(scale_v * (static_cast<double>(vi) - rvp[i]) * fac);
      }
    }
  }
  return {losses, gm, gv};
}

}  // namespace dfkd_fast
