// Vectorized global-memory access for the CUDA kernels: N elements of T moved as one aligned access
// (16 bytes for the main tensors). Callers check alignment on the host (aligned_to) and fall back to N = 1.
#pragma once

#include <cstdint>

#include "device_hooks.cuh"

namespace beit_fast {

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  BEIT_VECTOR_ACCESS(p, sizeof(Vec<T, N>));
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
  BEIT_VECTOR_ACCESS(p, sizeof(Vec<T, N>));
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

// VEC consecutive fp32 values p[c0] .. p[c0 + VEC - 1] (`none` each when p is null; c0 a multiple of VEC), for
// the (C,) parameters a kernel reads next to a vector of a row. With VEC a multiple of 4 and p 16-byte aligned
// (checked here, uniform over the grid) they come as float4 loads: when a warp's lanes hold vectors VEC
// elements apart, each of its scalar load instructions would touch 8 cache lines (VEC = 8) for 32 floats,
// and a row's parameters would cost the L1 many times the wavefronts of the row's own data.
template <int VEC>
__device__ __forceinline__ void load_f32(const float* __restrict__ p, int c0, float (&out)[VEC], float none) {
  if (p == nullptr) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = none;
    return;
  }
  if constexpr (VEC % 4 == 0) {
    if ((reinterpret_cast<uintptr_t>(p) & 15) == 0) {
#pragma unroll
      for (int k = 0; k < VEC / 4; ++k) {
        const Vec<float, 4> q = load_vec<float, 4>(p + c0 + 4 * k);
#pragma unroll
        for (int j = 0; j < 4; ++j) out[4 * k + j] = q.v[j];
      }
      return;
    }
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = p[c0 + j];
}

inline bool aligned_to(const void* p, int64_t bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

}  // namespace beit_fast
