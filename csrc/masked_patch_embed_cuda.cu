// beit_fast::masked_patch_embed on CUDA: device checks, the stream and the registration. The flow (checks,
// GEMMs, kernel order) is masked_patch_embed.cpp's forward_impl / backward_impl; the kernels and their
// launch: masked_patch_embed_kernels.cuh.
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: it needs the cuSPARSE/cuBLAS headers
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "launch.cuh"
#include "masked_patch_embed_kernels.cuh"
#include "partial_sums.h"

namespace beit_fast {
namespace mpe {
namespace {

CudaLaunch on_stream() { return CudaLaunch{c10::cuda::getCurrentCUDAStream()}; }

void gather_cuda(const Prepared& p, at::Tensor& patches) { dev::gather_on(on_stream(), p, patches); }
void epilogue_cuda(const Prepared& p, const at::Tensor& gemm, at::Tensor& out) {
  dev::epilogue_on(on_stream(), p, gemm, out);
}
void token_sums_cuda(const Prepared& p, const at::Tensor& grad, at::Tensor& unmasked, at::Tensor& masked) {
  dev::token_sums_on(on_stream(), p, grad, unmasked, masked);
}
void scatter_cuda(const Prepared& p, const at::Tensor& dpatches, at::Tensor& dimages) {
  dev::scatter_on(on_stream(), p, dpatches, dimages);
}

const Kernels kCudaKernels{&gather_cuda, &epilogue_cuda, &token_sums_cuda, &scatter_cuda, &column_sum_cuda};

at::Tensor forward_cuda(const at::Tensor& images, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                        const c10::optional<at::Tensor>& bool_masked_pos, const c10::optional<at::Tensor>& mask_token,
                        const at::Tensor& cls_token, const c10::optional<at::Tensor>& pos_embed) {
  BEIT_CHECK_VALUE(images.is_cuda(), dev::kOp, ": images must be a CUDA tensor, got ", images.device());
  const c10::cuda::CUDAGuard guard(images.device());
  return forward_impl(kCudaKernels, images, weight, bias, bool_masked_pos, mask_token, cls_token, pos_embed, false);
}

BackwardResult backward_cuda(const at::Tensor& grad_out, const at::Tensor& images, const at::Tensor& weight,
                             const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& bool_masked_pos,
                             const c10::optional<at::Tensor>& mask_token, const at::Tensor& cls_token,
                             const c10::optional<at::Tensor>& pos_embed, std::array<bool, 6> output_mask) {
  BEIT_CHECK_VALUE(images.is_cuda(), dev::kOp, ": images must be a CUDA tensor, got ", images.device());
  const c10::cuda::CUDAGuard guard(images.device());
  return backward_impl(kCudaKernels, grad_out, images, weight, bias, bool_masked_pos, mask_token, cls_token,
                       pos_embed, output_mask, false);
}

}  // namespace

TORCH_LIBRARY_IMPL(beit_fast, CUDA, m) {
  m.impl("masked_patch_embed", &forward_cuda);
  m.impl("masked_patch_embed_backward", &backward_cuda);
}

}  // namespace mpe
}  // namespace beit_fast
