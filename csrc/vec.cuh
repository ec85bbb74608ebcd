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

inline bool aligned_to(const void* p, int64_t bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

}  // namespace beit_fast
