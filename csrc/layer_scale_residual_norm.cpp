// beit_fast::layer_scale_residual_norm: argument checks (shared with the CUDA file) and the CPU kernels.
// Per-element math: layer_scale_residual_norm.cuh. CUDA kernels: layer_scale_residual_norm_cuda.cu.
#include "layer_scale_residual_norm.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "layer_scale_residual_norm.cuh"
#include "partial_sums.h"

namespace beit_fast {
namespace lsrn {
namespace {

constexpr const char* kOp = "layer_scale_residual_norm";

at::ScalarType acc_dtype_for(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_device(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  BEIT_CHECK_VALUE(t.device() == ref.device(), kOp, ": ", name, " is on ", t.device(), " but x is on ", ref.device(),
              "; all tensors must be on one device");
}

// A (C,)-shaped per-channel parameter, converted to the accumulation dtype; undefined when absent.
at::Tensor channel_param(const c10::optional<at::Tensor>& t, const at::Tensor& ref, int64_t C, const char* name,
                         at::ScalarType acc) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  check_device(ref, *t, name);
  BEIT_CHECK_VALUE(t->dim() == 1 && t->size(0) == C, kOp, ": ", name, " must have shape (C,) = (", C, ",), got ",
              t->sizes());
  BEIT_CHECK_VALUE(at::isFloatingType(t->scalar_type()), kOp, ": ", name, " must be floating point, got ",
              t->scalar_type());
  return t->to(acc).contiguous();
}

at::Tensor batch_scale(const c10::optional<at::Tensor>& t, const at::Tensor& ref, int64_t B, at::ScalarType acc) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  check_device(ref, *t, "drop_path_scale");
  BEIT_CHECK_VALUE(t->dim() == 1 && t->size(0) == B, kOp, ": drop_path_scale must have shape (B,) = (", B,
              ",), got ", t->sizes());
  BEIT_CHECK_VALUE(at::isFloatingType(t->scalar_type()), kOp, ": drop_path_scale must be floating point, got ",
              t->scalar_type());
  return t->to(acc).contiguous();
}

bool present(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

}  // namespace

Forward prepare_forward(const at::Tensor& x, const at::Tensor& y, const c10::optional<at::Tensor>& gamma,
                        const c10::optional<at::Tensor>& drop_path_scale, const c10::optional<at::Tensor>& ln_weight,
                        const c10::optional<at::Tensor>& ln_bias, double eps, bool allow_double) {
  BEIT_CHECK_VALUE(x.dim() == 3, kOp, ": x must have shape (B, N, C), got ", x.sizes());
  BEIT_CHECK_VALUE(y.sizes() == x.sizes(), kOp, ": y must have x's shape ", x.sizes(), ", got ", y.sizes());
  check_device(x, y, "y");
  BEIT_CHECK_VALUE(x.size(2) > 0, kOp, ": the channel dimension C must be positive, got x ", x.sizes());
  BEIT_CHECK_VALUE(!present(ln_bias) || present(ln_weight), kOp, ": ln_bias was given without ln_weight");
  BEIT_CHECK_VALUE(eps >= 0, kOp, ": eps must be >= 0, got ", eps);
  // Fails with the dtype message before any work is done.
  dispatch_pair(x.scalar_type(), y.scalar_type(), allow_double, kOp, [](auto, auto) {});
  Forward a;
  a.B = x.size(0);
  a.N = x.size(1);
  a.C = x.size(2);
  a.eps = eps;
  a.acc_dtype = acc_dtype_for(x.scalar_type());
  a.x = x.contiguous();
  a.y = y.contiguous();
  a.gamma = channel_param(gamma, x, a.C, "gamma", a.acc_dtype);
  a.scale = batch_scale(drop_path_scale, x, a.B, a.acc_dtype);
  a.w = channel_param(ln_weight, x, a.C, "ln_weight", a.acc_dtype);
  a.b = channel_param(ln_bias, x, a.C, "ln_bias", a.acc_dtype);
  return a;
}

Backward prepare_backward(const c10::optional<at::Tensor>& grad_sum, const c10::optional<at::Tensor>& grad_norm,
                          const at::Tensor& sum, const c10::optional<at::Tensor>& y, at::ScalarType y_dtype,
                          const c10::optional<at::Tensor>& gamma, const c10::optional<at::Tensor>& drop_path_scale,
                          const c10::optional<at::Tensor>& ln_weight, const c10::optional<at::Tensor>& ln_bias,
                          const c10::optional<at::Tensor>& mean, const c10::optional<at::Tensor>& rstd,
                          std::array<bool, 5> output_mask, bool allow_double) {
  BEIT_CHECK_VALUE(sum.dim() == 3 && sum.size(2) > 0, kOp, "_backward: sum must have shape (B, N, C) with C > 0, got ",
              sum.sizes());
  dispatch_pair(sum.scalar_type(), y_dtype, allow_double, kOp, [](auto, auto) {});
  Backward a;
  a.B = sum.size(0);
  a.N = sum.size(1);
  a.C = sum.size(2);
  a.need = output_mask;
  a.y_dtype = y_dtype;
  a.acc_dtype = acc_dtype_for(sum.scalar_type());
  a.sum = sum.contiguous();
  auto grad = [&](const c10::optional<at::Tensor>& g, const char* name) {
    if (!present(g)) return at::Tensor();
    check_device(sum, *g, name);
    BEIT_CHECK_VALUE(g->sizes() == sum.sizes() && g->scalar_type() == sum.scalar_type(), kOp, "_backward: ", name,
                " must match the forward output (", sum.sizes(), ", ", sum.scalar_type(), "), got (", g->sizes(),
                ", ", g->scalar_type(), ")");
    return g->contiguous();
  };
  a.grad_sum = grad(grad_sum, "grad_sum");
  a.grad_norm = grad(grad_norm, "grad_norm");
  a.gamma = channel_param(gamma, sum, a.C, "gamma", a.acc_dtype);
  a.scale = batch_scale(drop_path_scale, sum, a.B, a.acc_dtype);
  a.w = channel_param(ln_weight, sum, a.C, "ln_weight", a.acc_dtype);
  if (present(gamma)) a.gamma_dtype = gamma->scalar_type();
  if (present(ln_weight)) a.w_dtype = ln_weight->scalar_type();
  if (present(ln_bias)) a.b_dtype = ln_bias->scalar_type();
  BEIT_CHECK_VALUE(!a.need[2] || a.gamma.defined(), kOp, "_backward: the gamma gradient was requested without gamma");
  BEIT_CHECK_VALUE(!(a.need[3] || a.need[4]) || a.w.defined(), kOp,
              "_backward: LayerNorm parameter gradients were requested without ln_weight");
  BEIT_CHECK_VALUE(!a.need[4] || present(ln_bias), kOp,
                    "_backward: the ln_bias gradient was requested without ln_bias");
  BEIT_CHECK_VALUE(!a.grad_norm.defined() || a.w.defined(), kOp,
                    "_backward: grad_norm given without ln_weight (there is no LayerNorm output to differentiate)");
  if (a.need[2]) {
    BEIT_CHECK_VALUE(present(y), kOp, "_backward: the gamma gradient needs y");
    check_device(sum, *y, "y");
    BEIT_CHECK_VALUE(y->sizes() == sum.sizes() && y->scalar_type() == y_dtype, kOp, "_backward: y must have shape ",
                sum.sizes(), " and dtype ", y_dtype, ", got ", y->sizes(), " ", y->scalar_type());
    a.y = y->contiguous();
  }
  if (a.w.defined()) {
    for (const auto* stat : {&mean, &rstd}) {
      BEIT_CHECK_VALUE(present(*stat), kOp, "_backward: mean and rstd are needed when ln_weight is given");
      check_device(sum, **stat, "mean/rstd");
      BEIT_CHECK_VALUE((*stat)->sizes() == sum.sizes().slice(0, 2) && (*stat)->scalar_type() == a.acc_dtype, kOp,
                  "_backward: mean and rstd must have shape (B, N) = ", sum.sizes().slice(0, 2), " and dtype ",
                  a.acc_dtype, ", got ", (*stat)->sizes(), " ", (*stat)->scalar_type());
    }
    a.mean = mean->contiguous();
    a.rstd = rstd->contiguous();
  }
  return a;
}

std::pair<at::Tensor, at::Tensor> allocate_input_grads(const Backward& a) {
  return {a.need[0] ? at::empty_like(a.sum) : at::Tensor(),
          a.need[1] ? at::empty_like(a.sum, a.sum.options().dtype(a.y_dtype)) : at::Tensor()};
}

BackwardResult backward_result(const Backward& a, const at::Tensor& dx, const at::Tensor& dy, const at::Tensor& pg,
                               const at::Tensor& pw, const at::Tensor& pb,
                               at::Tensor (*column_sum)(const at::Tensor&)) {
  auto param_grad = [&](bool need, const at::Tensor& part, at::ScalarType dtype) -> c10::optional<at::Tensor> {
    if (!need) return c10::nullopt;
    if (!part.defined()) return at::zeros({a.C}, a.sum.options().dtype(dtype));
    return column_sum(part).to(dtype);
  };
  return {a.need[0] ? c10::optional<at::Tensor>(dx) : c10::nullopt,
          a.need[1] ? c10::optional<at::Tensor>(dy) : c10::nullopt,
          param_grad(a.need[2], pg, a.gamma_dtype), param_grad(a.need[3], pw, a.w_dtype),
          param_grad(a.need[4], pb, a.b_dtype)};
}

namespace {

template <typename T>
T* ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; }

template <typename Tx, typename Ty>
void forward_rows(const Forward& a, at::Tensor& s_t, at::Tensor& n_t, at::Tensor& mean_t, at::Tensor& rstd_t) {
  using A = acc_t<Tx>;
  const Tx* x = a.x.data_ptr<Tx>();
  const Ty* y = a.y.data_ptr<Ty>();
  const A *gamma = ptr<A>(a.gamma), *scale = ptr<A>(a.scale), *w = ptr<A>(a.w), *b = ptr<A>(a.b);
  Tx *s = s_t.data_ptr<Tx>(), *n = ptr<Tx>(n_t);
  A *mean = ptr<A>(mean_t), *rstd = ptr<A>(rstd_t);
  const int64_t C = a.C, N = a.N;
  const A eps = static_cast<A>(a.eps);
  const int64_t grain = std::max<int64_t>(1, 16384 / C);
  at::parallel_for(0, a.B * a.N, grain, [&](int64_t r0, int64_t r1) {
    std::vector<A> row(C);
    for (int64_t r = r0; r < r1; ++r) {
      const A sc = scale ? scale[r / N] : A(1);
      const int64_t o = r * C;
      A total = 0;
      for (int64_t c = 0; c < C; ++c) {
        const A v = residual<A>(static_cast<A>(x[o + c]), static_cast<A>(y[o + c]), gamma ? gamma[c] : A(1), sc);
        s[o + c] = static_cast<Tx>(v);
        row[c] = static_cast<A>(s[o + c]);
        total += row[c];
      }
      if (!n) continue;
      const A mu = total / A(C);
      A sq = 0;
      for (int64_t c = 0; c < C; ++c) sq += (row[c] - mu) * (row[c] - mu);
      const A rs = rstd_from<A>(sq, C, eps);
      mean[r] = mu;
      rstd[r] = rs;
      for (int64_t c = 0; c < C; ++c) n[o + c] = static_cast<Tx>(normalize<A>(row[c], mu, rs, w[c], b ? b[c] : A(0)));
    }
  });
}

// Parameter gradients are reduced through per-chunk partial sums (chunks of kChunkRows rows, a function of
// the shape only) followed by a fixed-order sum: bitwise identical for any number of threads.
constexpr int64_t kChunkRows = 32;

template <typename Tx, typename Ty>
void backward_rows(const Backward& a, at::Tensor& dx_t, at::Tensor& dy_t, at::Tensor& pg_t, at::Tensor& pw_t,
                   at::Tensor& pb_t) {
  using A = acc_t<Tx>;
  const Tx *gs = ptr<Tx>(a.grad_sum), *gn = ptr<Tx>(a.grad_norm), *s = a.sum.data_ptr<Tx>();
  const Ty* y = ptr<Ty>(a.y);
  const A *gamma = ptr<A>(a.gamma), *scale = ptr<A>(a.scale), *w = ptr<A>(a.w);
  const A *mean = ptr<A>(a.mean), *rstd = ptr<A>(a.rstd);
  Tx* dx = ptr<Tx>(dx_t);
  Ty* dy = ptr<Ty>(dy_t);
  A *pg = ptr<A>(pg_t), *pw = ptr<A>(pw_t), *pb = ptr<A>(pb_t);
  const int64_t C = a.C, N = a.N, rows = a.B * a.N;
  const bool ln = gn != nullptr;  // without a norm gradient the LayerNorm adds nothing to ds
  const int64_t chunks = (rows + kChunkRows - 1) / kChunkRows;
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    std::vector<A> xhat(C), g(C);
    for (int64_t k = k0; k < k1; ++k) {
      A *pgk = pg ? pg + k * C : nullptr, *pwk = pw ? pw + k * C : nullptr, *pbk = pb ? pb + k * C : nullptr;
      for (int64_t r = k * kChunkRows; r < std::min(rows, (k + 1) * kChunkRows); ++r) {
        const int64_t o = r * C;
        const A sc = scale ? scale[r / N] : A(1);
        A sum_g = 0, sum_gx = 0, rs = 0;
        if (ln) {
          const A mu = mean[r];
          rs = rstd[r];
          for (int64_t c = 0; c < C; ++c) {
            const A d = static_cast<A>(gn[o + c]);
            xhat[c] = xhat_of<A>(static_cast<A>(s[o + c]), mu, rs);
            g[c] = d * w[c];
            sum_g += g[c];
            sum_gx += g[c] * xhat[c];
            if (pwk) pwk[c] += d * xhat[c];
            if (pbk) pbk[c] += d;
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          const A dsum = gs ? static_cast<A>(gs[o + c]) : A(0);
          const A ds = ln ? residual_grad<A>(dsum, g[c], xhat[c], rs, sum_g, sum_gx, C) : dsum;
          if (dx) dx[o + c] = static_cast<Tx>(ds);
          if (dy) dy[o + c] = static_cast<Ty>(branch_grad<A>(ds, gamma ? gamma[c] : A(1), sc));
          if (pgk) pgk[c] += gamma_grad_term<A>(ds, static_cast<A>(y[o + c]), sc);
        }
      }
    }
  });
}

ForwardResult forward_cpu(const at::Tensor& x, const at::Tensor& y, const c10::optional<at::Tensor>& gamma,
                          const c10::optional<at::Tensor>& drop_path_scale, const c10::optional<at::Tensor>& ln_weight,
                          const c10::optional<at::Tensor>& ln_bias, double eps) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // autograd is registered from Python
  Forward a = prepare_forward(x, y, gamma, drop_path_scale, ln_weight, ln_bias, eps, /*allow_double=*/true);
  at::Tensor s = at::empty_like(a.x);
  at::Tensor n, mean, rstd;
  if (a.w.defined()) {
    n = at::empty_like(a.x);
    mean = at::empty({a.B, a.N}, a.x.options().dtype(a.acc_dtype));
    rstd = at::empty_like(mean);
  }
  dispatch_pair(a.x.scalar_type(), a.y.scalar_type(), true, kOp, [&](auto tx, auto ty) {
    forward_rows<typename decltype(tx)::type, typename decltype(ty)::type>(a, s, n, mean, rstd);
  });
  if (!a.w.defined()) return {s, c10::nullopt, c10::nullopt, c10::nullopt};
  return {s, n, mean, rstd};
}

BackwardResult backward_cpu(const c10::optional<at::Tensor>& grad_sum, const c10::optional<at::Tensor>& grad_norm,
                            const at::Tensor& sum, const c10::optional<at::Tensor>& y, at::ScalarType y_dtype,
                            const c10::optional<at::Tensor>& gamma, const c10::optional<at::Tensor>& drop_path_scale,
                            const c10::optional<at::Tensor>& ln_weight, const c10::optional<at::Tensor>& ln_bias,
                            const c10::optional<at::Tensor>& mean, const c10::optional<at::Tensor>& rstd,
                            std::array<bool, 5> output_mask) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  Backward a = prepare_backward(grad_sum, grad_norm, sum, y, y_dtype, gamma, drop_path_scale, ln_weight, ln_bias,
                                mean, rstd, output_mask, /*allow_double=*/true);
  const int64_t rows = a.B * a.N, chunks = (rows + kChunkRows - 1) / kChunkRows;
  const bool ln_grads = a.grad_norm.defined();
  at::Tensor dx, dy;  // not a structured binding: the kernel lambda captures them (C++17)
  std::tie(dx, dy) = allocate_input_grads(a);
  auto partial = [&](bool need) {
    return need ? at::zeros({chunks, a.C}, a.sum.options().dtype(a.acc_dtype)) : at::Tensor();
  };
  at::Tensor pg = partial(a.need[2]), pw = partial(a.need[3] && ln_grads), pb = partial(a.need[4] && ln_grads);
  dispatch_pair(a.sum.scalar_type(), a.y_dtype, true, kOp, [&](auto tx, auto ty) {
    backward_rows<typename decltype(tx)::type, typename decltype(ty)::type>(a, dx, dy, pg, pw, pb);
  });
  return backward_result(a, dx, dy, pg, pw, pb, &column_sum_cpu);  // no norm gradient (pw, pb undefined): zero
}

}  // namespace

// The CUDA-kernel tests compile this file into their own module for its host-side flow, without
// registering the ops a second time.
#ifndef BEIT_FAST_NO_OP_REGISTRATION
TORCH_LIBRARY_IMPL(beit_fast, CPU, m) {
  m.impl("layer_scale_residual_norm", &forward_cpu);
  m.impl("layer_scale_residual_norm_backward", &backward_cpu);
}
#endif

}  // namespace lsrn
}  // namespace beit_fast
