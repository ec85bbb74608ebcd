// column_sum kernel (the fixed-order second stage of the deterministic parameter-gradient reductions) and its
// launch, written against a launcher (launch.cuh) so that the tests can also run it on the CPU.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "device_hooks.cuh"

namespace beit_fast {
namespace colsum {
namespace {

// Block (32, 32): threadIdx.x picks the column, threadIdx.y a row group (rows y, y+32, ...); the 32 group
// sums are then added in order of y. The order depends only on the shape: bitwise reproducible.
__global__ void column_sum_kernel(const float* __restrict__ part, int64_t rows, int64_t cols,
                                  float* __restrict__ out) {
  __shared__ float sums[32][33];
  BEIT_SHARED_ARRAY(sums);
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

// (R, C) contiguous float32 -> (C), on part's device.
template <typename Launch>
at::Tensor column_sum_on(const Launch& launch, const at::Tensor& part) {
  at::Tensor out = at::empty({part.size(1)}, part.options());
  const int64_t rows = part.size(0), cols = part.size(1);
  if (cols == 0) return out;
  launch(column_sum_kernel, dim3(static_cast<unsigned>((cols + 31) / 32)), dim3(32, 32), part.data_ptr<float>(),
         rows, cols, out.data_ptr<float>());
  return out;
}

}  // namespace colsum
}  // namespace beit_fast
