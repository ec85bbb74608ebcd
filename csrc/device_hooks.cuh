// Hooks through which the CPU emulator of the tests (tests/cuda_emulator) checks the CUDA kernels; on the GPU
// (and in the CPU twins) they expand to nothing.
//   BEIT_SHARED_ARRAY(a)            after a __shared__ array's declaration: the emulator fills it with NaN
//                                   bytes at the start of each block, so a read before the block wrote it
//                                   shows up (on a GPU its content is undefined)
//   BEIT_VECTOR_ACCESS(p, bytes)    before each vectorized load/store: the emulator stops the kernel when p
//                                   is not aligned to the access size (a misaligned-address fault on a GPU)
#pragma once

#ifndef BEIT_SHARED_ARRAY
#define BEIT_SHARED_ARRAY(a)
#endif

#ifndef BEIT_VECTOR_ACCESS
#define BEIT_VECTOR_ACCESS(p, bytes)
#endif
