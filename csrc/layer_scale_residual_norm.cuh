// Per-element math of beit_fast::layer_scale_residual_norm, shared by the CPU kernel (.cpp) and the CUDA
// kernel (.cu). A is the accumulation type (fp32, or fp64 for fp64 inputs).
//
// Forward, per row of C values:   s = x + scale * (gamma * y)          (stored in x's dtype)
//                                  mean = sum(s) / C,  rstd = 1 / sqrt(sum((s - mean)^2) / C + eps)
//                                  n = (s - mean) * rstd * w + b
// Backward, with xhat = (s - mean) * rstd and g = dn * w:
//                                  ds = dsum + rstd * (g - sum(g) / C - xhat * sum(g * xhat) / C)
//                                  dx = ds,  dy = scale * gamma * ds
//                                  dgamma += scale * y * ds,  dw += dn * xhat,  db += dn   (over rows)
// The LayerNorm statistics use s as stored (rounded to x's dtype), exactly as the unfused reference does.
#pragma once

#include <cmath>
#include <cstdint>

#include "hostdevice.cuh"

namespace beit_fast {
namespace lsrn {

BEIT_HD float sqrt_acc(float v) {
#if defined(__CUDA_ARCH__)
  return sqrtf(v);  // IEEE round-to-nearest (no fast-math in this build), like std::sqrt
#else
  return std::sqrt(v);
#endif
}
BEIT_HD double sqrt_acc(double v) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(v);
#else
  return std::sqrt(v);
#endif
}

template <typename A>
BEIT_HD A residual(A x, A y, A gamma, A scale) { return x + scale * (gamma * y); }

template <typename A>
BEIT_HD A rstd_from(A sum_sq_dev, int64_t C, A eps) { return A(1) / sqrt_acc(sum_sq_dev / A(C) + eps); }

template <typename A>
BEIT_HD A normalize(A s, A mean, A rstd, A w, A b) { return (s - mean) * rstd * w + b; }

template <typename A>
BEIT_HD A xhat_of(A s, A mean, A rstd) { return (s - mean) * rstd; }

// ds from the row sums sum_g = sum(g) and sum_gx = sum(g * xhat).
template <typename A>
BEIT_HD A residual_grad(A dsum, A g, A xhat, A rstd, A sum_g, A sum_gx, int64_t C) {
  return dsum + rstd * (g - sum_g / A(C) - xhat * (sum_gx / A(C)));
}

template <typename A>
BEIT_HD A branch_grad(A ds, A gamma, A scale) { return scale * gamma * ds; }

template <typename A>
BEIT_HD A gamma_grad_term(A ds, A y, A scale) { return scale * y * ds; }

}  // namespace lsrn
}  // namespace beit_fast
