// Host-side pieces of beit_fast::layer_scale_residual_norm shared by the CPU (.cpp) and CUDA (.cu) files:
// argument checking, output allocation and the dtype dispatch.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>
#include <utility>

#include "dtype_dispatch.h"

namespace beit_fast {
namespace lsrn {

// Inputs made contiguous; gamma / drop_path_scale / ln_weight / ln_bias converted to the accumulation
// dtype (fp32, fp64 for fp64 x); undefined tensors stand for "absent".
struct Forward {
  at::Tensor x, y, gamma, scale, w, b;
  int64_t B = 0, N = 0, C = 0;
  double eps = 0;
  at::ScalarType acc_dtype = at::kFloat;
};

struct Backward {
  at::Tensor grad_sum, grad_norm, sum, y, gamma, scale, w, mean, rstd;
  int64_t B = 0, N = 0, C = 0;
  at::ScalarType y_dtype = at::kFloat, acc_dtype = at::kFloat;
  at::ScalarType gamma_dtype = at::kFloat, w_dtype = at::kFloat, b_dtype = at::kFloat;
  std::array<bool, 5> need{};  // dx, dy, dgamma, dln_weight, dln_bias
};

Forward prepare_forward(const at::Tensor& x, const at::Tensor& y, const c10::optional<at::Tensor>& gamma,
                        const c10::optional<at::Tensor>& drop_path_scale, const c10::optional<at::Tensor>& ln_weight,
                        const c10::optional<at::Tensor>& ln_bias, double eps, bool allow_double);

Backward prepare_backward(const c10::optional<at::Tensor>& grad_sum, const c10::optional<at::Tensor>& grad_norm,
                          const at::Tensor& sum, const c10::optional<at::Tensor>& y, at::ScalarType y_dtype,
                          const c10::optional<at::Tensor>& gamma, const c10::optional<at::Tensor>& drop_path_scale,
                          const c10::optional<at::Tensor>& ln_weight, const c10::optional<at::Tensor>& ln_bias,
                          const c10::optional<at::Tensor>& mean, const c10::optional<at::Tensor>& rstd,
                          std::array<bool, 5> output_mask, bool allow_double);

using ForwardResult = std::tuple<at::Tensor, c10::optional<at::Tensor>, c10::optional<at::Tensor>,
                                 c10::optional<at::Tensor>>;
using BackwardResult = std::tuple<c10::optional<at::Tensor>, c10::optional<at::Tensor>, c10::optional<at::Tensor>,
                                  c10::optional<at::Tensor>, c10::optional<at::Tensor>>;

// dx and dy as output_mask asks (undefined where not asked for), on the device of a.sum.
std::pair<at::Tensor, at::Tensor> allocate_input_grads(const Backward& a);

// The backward's result from the device's dx, dy and the (R, C) partial sums of the gamma / ln_weight / ln_bias
// gradients, each summed over its rows by the device's fixed-order column_sum and cast to its parameter's
// dtype; an asked-for gradient whose partials are undefined (none were written) is exactly zero.
BackwardResult backward_result(const Backward& a, const at::Tensor& dx, const at::Tensor& dy, const at::Tensor& pg,
                               const at::Tensor& pw, const at::Tensor& pb,
                               at::Tensor (*column_sum)(const at::Tensor&));

}  // namespace lsrn
}  // namespace beit_fast
