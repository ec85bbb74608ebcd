// Deterministic parameter-gradient reductions: kernels write per-block (GPU) or per-chunk (CPU) partial sums
// into an (R, C) buffer in the accumulation dtype, then these sum its rows in a fixed order. No atomics:
// the result is bitwise reproducible for a given shape (and, on the GPU, a given device model).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "error_message.h"

namespace beit_fast {

// (R, C) float/double -> (C), each column summed from row 0 to row R-1.
inline at::Tensor column_sum_cpu(const at::Tensor& part) {
  BEIT_CHECK(part.dim() == 2 && part.is_contiguous() && part.device().is_cpu(),
              "column_sum_cpu: expected a contiguous (R, C) CPU tensor, got ", part.sizes());
  at::Tensor out = at::empty({part.size(1)}, part.options());
  AT_DISPATCH_FLOATING_TYPES(part.scalar_type(), "column_sum_cpu", [&] {
    const scalar_t* p = part.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t rows = part.size(0), C = part.size(1);
    at::parallel_for(0, C, 256, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) o[c] = 0;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = c0; c < c1; ++c) o[c] += p[r * C + c];
    });
  });
  return out;
}

#ifdef BEIT_FAST_WITH_CUDA
// The same on the current CUDA stream (fp32 only): 32 columns per block, 32 row groups per column summed
// in a fixed order. Defined in partial_sums_cuda.cu.
at::Tensor column_sum_cuda(const at::Tensor& part);
#endif

}  // namespace beit_fast
