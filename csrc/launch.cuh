// How the kernel headers (*_kernels.cuh) launch a kernel: through a launcher object, called as
// launch(kernel, grid, block, args...). Here, for nvcc, the CUDA launch on a stream; the tests supply one that
// runs the same kernels on the CPU (tests/cuda_emulator), so every line of the kernels and of their host-side
// launch logic is also exercised on machines without a GPU.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

namespace beit_fast {

struct CudaLaunch {
  cudaStream_t stream;

  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), dim3 grid, dim3 block, Args... args) const {
    kernel<<<grid, block, 0, stream>>>(args...);  // implicit conversions only, as in a direct launch
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // Blocks of `threads` threads (no dynamic shared memory) that one multiprocessor of the current device holds.
  template <typename... Params>
  int blocks_per_sm(void (*kernel)(Params...), int threads) const {
    int n = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, 0));
    return n;
  }
};

}  // namespace beit_fast
