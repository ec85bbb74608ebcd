// column_sum_cuda: the fixed-order second stage of the deterministic parameter-gradient reductions.
#include "partial_sums.h"

#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: it needs the cuSPARSE/cuBLAS headers
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace beit_fast {
namespace {

// Block (32, 32): threadIdx.x picks the column, threadIdx.y a row group (rows y, y+32, ...); the 32 group
// sums are then added in order of y. The order depends only on the shape: bitwise reproducible.
__global__ void column_sum_kernel(const float* __restrict__ part, int64_t rows, int64_t cols,
                                  float* __restrict__ out) {
  __shared__ float sums[32][33];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  float acc = 0.f;
  if (c < cols) {
    for (int64_t r = threadIdx.y; r < rows; r += 32) acc += part[r * cols + c];
  }
  sums[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    float t = 0.f;
    for (int i = 0; i < 32; ++i) t += sums[i][threadIdx.x];
    out[c] = t;
  }
}

}  // namespace

at::Tensor column_sum_cuda(const at::Tensor& part) {
  TORCH_CHECK(part.is_cuda() && part.dim() == 2 && part.is_contiguous() && part.scalar_type() == at::kFloat,
              "column_sum_cuda: expected a contiguous (R, C) float32 CUDA tensor, got ", part.sizes(), " ",
              part.scalar_type(), " on ", part.device());
  const c10::cuda::CUDAGuard guard(part.device());
  at::Tensor out = at::empty({part.size(1)}, part.options());
  const int64_t rows = part.size(0), cols = part.size(1);
  if (cols == 0) return out;
  const dim3 block(32, 32);
  const dim3 grid(static_cast<unsigned>((cols + 31) / 32));
  column_sum_kernel<<<grid, block, 0, c10::cuda::getCurrentCUDAStream()>>>(part.data_ptr<float>(), rows, cols,
                                                                          out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace beit_fast
