// Marks the per-element math shared by the C++ CPU kernels (g++) and the CUDA kernels (nvcc): the CPU
// tests then exercise the same formulas that run on the GPU.
#pragma once

#if defined(__CUDACC__)
#define BEIT_HD __host__ __device__ __forceinline__
#else
#define BEIT_HD inline
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

namespace beit_fast {

// Accumulation type: fp32 for fp32/fp16/bf16 (CPU and GPU alike), fp64 for fp64 (CPU gradcheck).
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <typename T> using acc_t = typename Acc<T>::type;
// ... and for math that reads one type and writes another: fp64 when either is.
template <typename T, typename O>
using acc_pair_t = typename std::conditional<std::is_same<acc_t<T>, double>::value ||
                                                 std::is_same<acc_t<O>, double>::value,
                                             double, float>::type;

// The value a float takes once stored as T and read back: the kernels normalize what they store.
template <typename T, typename A>
BEIT_HD A round_to(A v) { return static_cast<A>(static_cast<T>(v)); }

}  // namespace beit_fast
