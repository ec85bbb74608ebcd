// beit_fast::layer_scale_residual_norm on CUDA: device checks, the stream, the grid size from the GPU model,
// and the registration. Kernels and their launch: layer_scale_residual_norm_kernels.cuh.
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: it needs the cuSPARSE/cuBLAS headers
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "launch.cuh"
#include "layer_scale_residual_norm_kernels.cuh"
#include "partial_sums.h"

namespace beit_fast {
namespace lsrn {
namespace {

ForwardResult forward_cuda(const at::Tensor& x, const at::Tensor& y, const c10::optional<at::Tensor>& gamma,
                           const c10::optional<at::Tensor>& drop_path_scale,
                           const c10::optional<at::Tensor>& ln_weight, const c10::optional<at::Tensor>& ln_bias,
                           double eps) {
  BEIT_CHECK_VALUE(x.is_cuda(), dev::kOp, ": x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  return dev::forward_on(CudaLaunch{c10::cuda::getCurrentCUDAStream()}, x, y, gamma, drop_path_scale, ln_weight,
                         ln_bias, eps);
}

BackwardResult backward_cuda(const c10::optional<at::Tensor>& grad_sum, const c10::optional<at::Tensor>& grad_norm,
                             const at::Tensor& sum, const c10::optional<at::Tensor>& y, at::ScalarType y_dtype,
                             const c10::optional<at::Tensor>& gamma, const c10::optional<at::Tensor>& drop_path_scale,
                             const c10::optional<at::Tensor>& ln_weight, const c10::optional<at::Tensor>& ln_bias,
                             const c10::optional<at::Tensor>& mean, const c10::optional<at::Tensor>& rstd,
                             std::array<bool, 5> output_mask) {
  BEIT_CHECK_VALUE(sum.is_cuda(), dev::kOp, "_backward: sum must be a CUDA tensor, got ", sum.device());
  const c10::cuda::CUDAGuard guard(sum.device());
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return dev::backward_on(CudaLaunch{c10::cuda::getCurrentCUDAStream()}, sms, &column_sum_cuda, grad_sum, grad_norm,
                          sum, y, y_dtype, gamma, drop_path_scale, ln_weight, ln_bias, mean, rstd, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(beit_fast, CUDA, m) {
  m.impl("layer_scale_residual_norm", &forward_cuda);
  m.impl("layer_scale_residual_norm_backward", &backward_cuda);
}

}  // namespace lsrn
}  // namespace beit_fast
