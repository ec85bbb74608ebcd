// column_sum_cuda: the fixed-order second stage of the deterministic parameter-gradient reductions.
// Kernel and launch: partial_sums_kernels.cuh.
#include "partial_sums.h"

#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: it needs the cuSPARSE/cuBLAS headers
#include <c10/cuda/CUDAGuard.h>

#include "launch.cuh"
#include "partial_sums_kernels.cuh"

namespace beit_fast {

at::Tensor column_sum_cuda(const at::Tensor& part) {
  BEIT_CHECK(part.is_cuda() && part.dim() == 2 && part.is_contiguous() && part.scalar_type() == at::kFloat,
              "column_sum_cuda: expected a contiguous (R, C) float32 CUDA tensor, got ", part.sizes(), " ",
              part.scalar_type(), " on ", part.device());
  const c10::cuda::CUDAGuard guard(part.device());
  return colsum::column_sum_on(CudaLaunch{c10::cuda::getCurrentCUDAStream()}, part);
}

}  // namespace beit_fast
