// beit_fast::masked_patch_embed, CUDA kernels (fp32 / fp16 / bf16; fp32 epilogue math) and their launch,
// written against a launcher (launch.cuh): masked_patch_embed_cuda.cu launches them on a CUDA stream, the tests
// (tests/cuda_emulator) run the same code on the CPU. The GEMMs are at::mm (cuBLAS on the GPU); these kernels
// do what surrounds them:
//   gather      images -> patch matrix (B*(1+P), K), 16-byte accesses along the patch rows; cls and masked
//               rows are written as zeros without reading pixels
//   epilogue    GEMM output -> tokens: + bias, mask_token at masked patches, cls_token in row 0, + pos_embed,
//               one read and one write per element (in place when the tokens have the GEMM's dtype; into
//               the wider output under autocast)
//   token_sums  grad (B, 1+P, C) -> per-token sums over the batch, split by masked / unmasked, in fixed
//               order over b (gives d_bias, d_mask_token, d_cls_token, d_pos_embed deterministically)
//   scatter     d_patches -> d_images, zero at masked patches
// Index math is int32 (the host checks that every tensor has fewer than 2^31 elements).
// Per-element math: masked_patch_embed.cuh; the flow around them: masked_patch_embed.h.
#pragma once

#include <ATen/ATen.h>

#include <limits>

#include "dtype_dispatch.h"
#include "masked_patch_embed.cuh"
#include "masked_patch_embed.h"
#include "vec.cuh"

namespace beit_fast {
namespace mpe {
namespace dev {

constexpr const char* kOp = "masked_patch_embed (CUDA)";
constexpr int kThreads = 256;

// The kernels index in int32, and a launch over n elements rounds up to whole blocks of kThreads: the last
// block's thread indices reach n + kThreads - 1, which must not wrap, so n is at most 2^31 - 1 - kThreads.
constexpr int64_t kMaxElements = static_cast<int64_t>(std::numeric_limits<int32_t>::max()) - kThreads;

inline int32_t i32(int64_t v, const char* what) {
  BEIT_CHECK(v <= kMaxElements, kOp, ": ", what, " has ", v, " elements; at most 2^31 - 1 - ", kThreads,
              " = ", kMaxElements, " are supported (int32 indexing)");
  return static_cast<int32_t>(v);
}

inline PatchGeom<int32_t> geom32(const Prepared& p) {
  i32(p.images.numel(), "images");
  return {static_cast<int32_t>(p.Cin), static_cast<int32_t>(p.H), static_cast<int32_t>(p.W),
          static_cast<int32_t>(p.ph), static_cast<int32_t>(p.pw), static_cast<int32_t>(p.Wp),
          static_cast<int32_t>(p.P), static_cast<int32_t>(p.K)};
}

inline unsigned blocks_for(int32_t n) {
  return static_cast<unsigned>((static_cast<int64_t>(n) + kThreads - 1) / kThreads);
}

inline const bool* mask_ptr(const Prepared& p) { return p.mask.defined() ? p.mask.data_ptr<bool>() : nullptr; }

// Pixel runs are VEC-contiguous when the patch width and the image width are multiples of VEC.
template <typename T>
int pixel_vec(const Prepared& p, const void* a, const void* b) {
  constexpr int VW = 16 / sizeof(T);
  return (p.pw % VW == 0 && p.W % VW == 0 && aligned_to(a, 16) && aligned_to(b, 16)) ? VW : 1;
}

template <typename T, int VEC>
__global__ void gather_kernel(const T* __restrict__ img, T* __restrict__ patches, const bool* __restrict__ mask,
                              PatchGeom<int32_t> g, int32_t total_vecs) {
  const int32_t idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= total_vecs) return;
  const int32_t kv = g.K / VEC;
  const int32_t row = idx / kv, k = (idx - row * kv) * VEC;
  const int32_t b = row / (g.P + 1), t = row - b * (g.P + 1);
  Vec<T, VEC> v;
  if (t == 0 || token_masked<int32_t>(mask, b, t, g.P)) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) v.v[j] = static_cast<T>(0.f);
  } else {
    v = load_vec<T, VEC>(img + pixel_offset<int32_t>(g, b, t - 1, k));
  }
  store_vec<T, VEC>(patches + static_cast<int64_t>(idx) * VEC, v);
}

// src and dst may be one buffer (in place): neither is __restrict__.
template <typename T, typename O, int VEC>
__global__ void epilogue_kernel(const T* src, O* dst, const float* __restrict__ bias,
                                const float* __restrict__ mask_token, const float* __restrict__ cls_token,
                                const float* __restrict__ pos, const bool* __restrict__ mask, int32_t P, int32_t C,
                                int32_t total_vecs) {
  const int32_t idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= total_vecs) return;
  const int32_t cv = C / VEC;
  const int32_t row = idx / cv, c0 = (idx - row * cv) * VEC;
  const int32_t b = row / (P + 1), t = row - b * (P + 1);
  const bool masked = token_masked<int32_t>(mask, b, t, P);
  const Vec<T, VEC> v = load_vec<T, VEC>(src + static_cast<int64_t>(idx) * VEC);
  Vec<O, VEC> o;
  // only the parameter the token takes (cls token, mask token or bias) and its position embedding: passed as
  // all three to token_value, which selects one of them
  float own[VEC], pe[VEC];
  load_f32<VEC>(t == 0 ? cls_token : (masked ? mask_token : bias), c0, own, 0.f);
  load_f32<VEC>(pos ? pos + static_cast<int64_t>(t) * C : nullptr, c0, pe, 0.f);
#pragma unroll
  for (int j = 0; j < VEC; ++j)
    o.v[j] = static_cast<O>(token_value<float>(t == 0, masked, static_cast<float>(v.v[j]), own[j], own[j], own[j],
                                               pe[j]));
  store_vec<O, VEC>(dst + static_cast<int64_t>(idx) * VEC, o);
}

template <typename T>
__global__ void token_sums_kernel(const T* __restrict__ grad, const bool* __restrict__ mask,
                                  float* __restrict__ unmasked, float* __restrict__ masked, int32_t B, int32_t P,
                                  int32_t C) {
  const int32_t idx = blockIdx.x * blockDim.x + threadIdx.x;  // over (1+P) * C
  if (idx >= (P + 1) * C) return;
  const int32_t t = idx / C;
  const int64_t stride = static_cast<int64_t>(P + 1) * C;
  float u = 0.f, m = 0.f;
#pragma unroll 4
  for (int32_t b = 0; b < B; ++b) {
    const float v = static_cast<float>(grad[b * stride + idx]);
    if (token_masked<int32_t>(mask, b, t, P)) m += v;
    else u += v;
  }
  unmasked[idx] = u;
  masked[idx] = m;
}

template <typename T, int VEC>
__global__ void scatter_kernel(const T* __restrict__ dpatches, T* __restrict__ dimg, const bool* __restrict__ mask,
                               PatchGeom<int32_t> g, int32_t total_vecs) {
  const int32_t idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= total_vecs) return;
  const int32_t pix = idx * VEC;
  const int32_t xx = pix % g.W, rest = pix / g.W;
  const int32_t yy = rest % g.H, rest2 = rest / g.H;
  const int32_t ci = rest2 % g.Cin, b = rest2 / g.Cin;
  int32_t patch, k;
  patch_of_pixel<int32_t>(g, ci, yy, xx, patch, k);
  Vec<T, VEC> v;
  if (token_masked<int32_t>(mask, b, 1 + patch, g.P)) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) v.v[j] = static_cast<T>(0.f);
  } else {
    v = load_vec<T, VEC>(dpatches + (static_cast<int64_t>(b) * (g.P + 1) + 1 + patch) * g.K + k);
  }
  store_vec<T, VEC>(dimg + static_cast<int64_t>(pix), v);
}

template <typename Launch>
void gather_on(const Launch& launch, const Prepared& p, at::Tensor& patches) {
  const PatchGeom<int32_t> g = geom32(p);
  i32(patches.numel(), "the patch matrix");
  dispatch_float_no_double(p.images.scalar_type(), kOp, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int VW = 16 / sizeof(T);
    const bool vec = pixel_vec<T>(p, p.images.data_ptr(), patches.data_ptr()) == VW;
    const int32_t n = static_cast<int32_t>(patches.numel() / (vec ? VW : 1));
    if (vec)
      launch(gather_kernel<T, VW>, dim3(blocks_for(n)), dim3(kThreads), p.images.data_ptr<T>(), patches.data_ptr<T>(),
             mask_ptr(p), g, n);
    else
      launch(gather_kernel<T, 1>, dim3(blocks_for(n)), dim3(kThreads), p.images.data_ptr<T>(), patches.data_ptr<T>(),
             mask_ptr(p), g, n);
  });
}

template <typename Launch>
void epilogue_on(const Launch& launch, const Prepared& p, const at::Tensor& gemm, at::Tensor& out) {
  const int32_t numel = i32(out.numel(), "the output");
  const float* pos = p.pos_embed.defined() ? p.pos_embed.data_ptr<float>() : nullptr;
  dispatch_float2_no_double(p.images.scalar_type(), p.out_dtype, kOp, [&](auto tag, auto out_tag) {
    using T = typename decltype(tag)::type;
    using O = typename decltype(out_tag)::type;
    // 16-byte accesses on the wider of the two types
    constexpr int VW = 16 / (sizeof(T) > sizeof(O) ? sizeof(T) : sizeof(O));
    auto run = [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      const int32_t n = numel / V;
      launch(epilogue_kernel<T, O, V>, dim3(blocks_for(n)), dim3(kThreads), gemm.data_ptr<T>(), out.data_ptr<O>(),
             p.bias.data_ptr<float>(), p.mask_token.data_ptr<float>(), p.cls_token.data_ptr<float>(), pos,
             mask_ptr(p), static_cast<int32_t>(p.P), static_cast<int32_t>(p.C), n);
    };
    if (p.C % VW == 0 && aligned_to(gemm.data_ptr(), VW * sizeof(T)) && aligned_to(out.data_ptr(), VW * sizeof(O)))
      run(IntTag<VW>{});
    else run(IntTag<1>{});
  });
}

template <typename Launch>
void token_sums_on(const Launch& launch, const Prepared& p, const at::Tensor& grad, at::Tensor& unmasked,
                   at::Tensor& masked) {
  i32(grad.numel(), "grad_out");
  const int32_t n = i32(unmasked.numel(), "the token sums");
  dispatch_float_no_double(p.out_dtype, kOp, [&](auto tag) {   // grad has the output's dtype
    using T = typename decltype(tag)::type;
    launch(token_sums_kernel<T>, dim3(blocks_for(n)), dim3(kThreads), grad.data_ptr<T>(), mask_ptr(p),
           unmasked.data_ptr<float>(), masked.data_ptr<float>(), static_cast<int32_t>(p.B),
           static_cast<int32_t>(p.P), static_cast<int32_t>(p.C));
  });
}

template <typename Launch>
void scatter_on(const Launch& launch, const Prepared& p, const at::Tensor& dpatches, at::Tensor& dimages) {
  const PatchGeom<int32_t> g = geom32(p);
  i32(dpatches.numel(), "the patch-matrix gradient");
  dispatch_float_no_double(p.images.scalar_type(), kOp, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int VW = 16 / sizeof(T);
    const bool vec = pixel_vec<T>(p, dpatches.data_ptr(), dimages.data_ptr()) == VW;
    const int32_t n = static_cast<int32_t>(dimages.numel() / (vec ? VW : 1));
    if (vec)
      launch(scatter_kernel<T, VW>, dim3(blocks_for(n)), dim3(kThreads), dpatches.data_ptr<T>(),
             dimages.data_ptr<T>(), mask_ptr(p), g, n);
    else
      launch(scatter_kernel<T, 1>, dim3(blocks_for(n)), dim3(kThreads), dpatches.data_ptr<T>(),
             dimages.data_ptr<T>(), mask_ptr(p), g, n);
  });
}

}  // namespace dev
}  // namespace mpe
}  // namespace beit_fast
