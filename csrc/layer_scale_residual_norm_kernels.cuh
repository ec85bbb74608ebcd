// beit_fast::layer_scale_residual_norm, CUDA kernels (fp32 / fp16 / bf16 with fp32 accumulation, and x fp32
// with y fp16/bf16 for the AMP residual stream), and their host-side launch written against a launcher
// (launch.cuh): layer_scale_residual_norm_cuda.cu launches them on a CUDA stream, the tests
// (tests/cuda_emulator) run the same code on the CPU. Per-element math: layer_scale_residual_norm.cuh.
//
// Forward: one warp per row (kWarpRows rows per block) where a row fits in 32 lanes x 8 vectors, else one block
// per row; each thread keeps NV vectors of VEC elements of the row in registers, so x and y are read once and
// s and n written once; mean and variance come from two reductions (warp shuffles, or block sums) over the
// values held in registers (two-pass variance, no cancellation).
// Backward: a grid of G blocks walks the rows (row = blockIdx.x + i * G) with the block-per-row thread-to-column
// map, loading a short row's successor while it reduces and writes the row.
// Each thread accumulates the gamma / ln_weight / ln_bias gradient of its columns in registers over its
// block's rows and writes them to row blockIdx.x of a (G, C) fp32 partial buffer; a fixed-order column sum
// then adds the G rows. No atomics: deterministic for a given shape and grid size (set by the GPU model and
// by the kernel variant, which depends on the tensors' 16-byte alignment: the same shape with differently
// aligned gradients may sum in another order).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "dtype_dispatch.h"
#include "layer_scale_residual_norm.cuh"
#include "layer_scale_residual_norm.h"
#include "vec.cuh"

namespace beit_fast {
namespace lsrn {
namespace dev {

constexpr const char* kOp = "layer_scale_residual_norm (CUDA)";
constexpr int kMaxThreadsVec = 256;      // vectorized kernels: up to 256 threads x NV vectors per row
constexpr int kMaxThreadsScalar = 1024;  // scalar fallback (C not a multiple of the vector width)
constexpr int kScalarNV = 8;
constexpr int64_t kMinRowsPerBlock = 16;  // backward: at least this many rows per block (bounds the partials)
constexpr int kWarpRows = 4;              // forward, warp-per-row plan: rows (one per warp) per block

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32); every thread gets the same value, added in warp order.
__device__ __forceinline__ float block_sum(float v, float* smem) {
  v = warp_sum(v);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  __syncthreads();  // an earlier reduction may still be reading smem
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  float t = 0.f;
  for (int i = 0; i < nw; ++i) t += smem[i];
  return t;
}

__device__ __forceinline__ void block_sum2(float& a, float& b, float* smem) {
  a = warp_sum(a);
  b = warp_sum(b);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) {
    smem[warp] = a;
    smem[32 + warp] = b;
  }
  __syncthreads();
  a = 0.f;
  b = 0.f;
  for (int i = 0; i < nw; ++i) {
    a += smem[i];
    b += smem[32 + i];
  }
}

// One row of the forward, by the `stride` threads t = 0 .. stride-1 that share it: thread t holds the vectors
// t, t + stride, ... of the row in registers. `sum` adds a value over those threads (every one gets the total).
template <typename Tx, typename Ty, int VEC, int NV, typename Sum>
__device__ __forceinline__ void forward_row(const Tx* __restrict__ x, const Ty* __restrict__ y,
                                            const float* __restrict__ gamma, const float* __restrict__ scale,
                                            const float* __restrict__ w, const float* __restrict__ b,
                                            Tx* __restrict__ s, Tx* __restrict__ n, float* __restrict__ mean,
                                            float* __restrict__ rstd, int64_t row, int64_t N, int C, float eps,
                                            int t, int stride, Sum sum) {
  const int64_t base = row * C;
  const float sc = scale ? scale[row / N] : 1.f;
  const int nvec = C / VEC;
  float v[NV][VEC];
  float total = 0.f;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int vi = t + i * stride;
    if (vi < nvec) {
      const int c0 = vi * VEC;
      const Vec<Tx, VEC> xv = load_vec<Tx, VEC>(x + base + c0);
      const Vec<Ty, VEC> yv = load_vec<Ty, VEC>(y + base + c0);
      float gam[VEC];
      load_f32<VEC>(gamma, c0, gam, 1.f);
      Vec<Tx, VEC> sv;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float r = residual<float>(static_cast<float>(xv.v[j]), static_cast<float>(yv.v[j]), gam[j], sc);
        sv.v[j] = static_cast<Tx>(r);
        v[i][j] = static_cast<float>(sv.v[j]);
        total += v[i][j];
      }
      store_vec<Tx, VEC>(s + base + c0, sv);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[i][j] = 0.f;
    }
  }
  if (n == nullptr) return;  // uniform over the row's threads: no LayerNorm requested
  const float mu = sum(total) / static_cast<float>(C);
  float sq = 0.f;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    if (t + i * stride < nvec) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) sq += (v[i][j] - mu) * (v[i][j] - mu);
    }
  }
  const float rs = rstd_from<float>(sum(sq), C, eps);
  if (t == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int vi = t + i * stride;
    if (vi < nvec) {
      const int c0 = vi * VEC;
      float wv[VEC], bv[VEC];
      load_f32<VEC>(w, c0, wv, 1.f);
      load_f32<VEC>(b, c0, bv, 0.f);
      Vec<Tx, VEC> nv;
#pragma unroll
      for (int j = 0; j < VEC; ++j) nv.v[j] = static_cast<Tx>(normalize<float>(v[i][j], mu, rs, wv[j], bv[j]));
      store_vec<Tx, VEC>(n + base + c0, nv);
    }
  }
}

// Block-per-row forward: long rows (more than 32 * 8 vectors) and the scalar path.
template <typename Tx, typename Ty, int VEC, int NV>
__global__ void __launch_bounds__(VEC == 1 ? kMaxThreadsScalar : kMaxThreadsVec)
    forward_kernel(const Tx* __restrict__ x, const Ty* __restrict__ y, const float* __restrict__ gamma,
                   const float* __restrict__ scale, const float* __restrict__ w, const float* __restrict__ b,
                   Tx* __restrict__ s, Tx* __restrict__ n, float* __restrict__ mean, float* __restrict__ rstd,
                   int64_t /*rows: the grid*/, int64_t N, int C, float eps) {
  __shared__ float smem[32];
  BEIT_SHARED_ARRAY(smem);
  forward_row<Tx, Ty, VEC, NV>(x, y, gamma, scale, w, b, s, n, mean, rstd, blockIdx.x, N, C, eps, threadIdx.x,
                               blockDim.x, [&](float v) { return block_sum(v, smem); });
}

// Warp-per-row forward (vectorized rows of at most 32 * 8 vectors: C <= 2048 in 16-bit, 1024 in fp32, which
// covers BEiT's 768 and 1024): kWarpRows rows per block, a row's sums are warp shuffles, no barrier. A block of
// one short row would leave most of the SM's block slots holding few bytes in flight.
template <typename Tx, typename Ty, int VEC, int NV>
__global__ void __launch_bounds__(32 * kWarpRows)
    forward_warp_kernel(const Tx* __restrict__ x, const Ty* __restrict__ y, const float* __restrict__ gamma,
                        const float* __restrict__ scale, const float* __restrict__ w, const float* __restrict__ b,
                        Tx* __restrict__ s, Tx* __restrict__ n, float* __restrict__ mean, float* __restrict__ rstd,
                        int64_t rows, int64_t N, int C, float eps) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpRows + (threadIdx.x >> 5);
  if (row >= rows) return;  // the whole warp: none of its lanes is left waiting at a shuffle
  forward_row<Tx, Ty, VEC, NV>(x, y, gamma, scale, w, b, s, n, mean, rstd, row, N, C, eps, threadIdx.x & 31, 32,
                               [](float v) { return warp_sum(v); });
}

template <typename Tx, typename Ty, int VEC, int NV>
__global__ void __launch_bounds__(VEC == 1 ? kMaxThreadsScalar : kMaxThreadsVec)
    backward_kernel(const Tx* __restrict__ gs, const Tx* __restrict__ gn, const Tx* __restrict__ s,
                    const Ty* __restrict__ y, const float* __restrict__ gamma, const float* __restrict__ scale,
                    const float* __restrict__ w, const float* __restrict__ mean, const float* __restrict__ rstd,
                    Tx* __restrict__ dx, Ty* __restrict__ dy, float* __restrict__ pg, float* __restrict__ pw,
                    float* __restrict__ pb, int64_t rows, int64_t N, int C) {
  __shared__ float smem[64];
  BEIT_SHARED_ARRAY(smem);
  const int nvec = C / VEC;
  float acc_g[NV][VEC], acc_w[NV][VEC], acc_b[NV][VEC];
#pragma unroll
  for (int i = 0; i < NV; ++i)
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc_g[i][j] = acc_w[i][j] = acc_b[i][j] = 0.f;

  // The row's four inputs (those the outputs need), NV vectors per thread.
  auto load_row = [&](int64_t row, Vec<Tx, VEC>* sv, Vec<Tx, VEC>* nv, Vec<Tx, VEC>* gsv, Vec<Ty, VEC>* yv) {
    const int64_t base = row * C;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int vi = threadIdx.x + i * blockDim.x;
      if (vi < nvec) {
        const int64_t o = base + vi * VEC;
        if (gn != nullptr) {
          sv[i] = load_vec<Tx, VEC>(s + o);
          nv[i] = load_vec<Tx, VEC>(gn + o);
        }
        if (gs != nullptr) gsv[i] = load_vec<Tx, VEC>(gs + o);
        if (pg != nullptr) yv[i] = load_vec<Ty, VEC>(y + o);
      }
    }
  };
  // Short rows (NV <= 2: BEiT's 768 and 1024 channels take NV = 1) prefetch the block's next row while this
  // one is reduced and written, so each thread has two rows of loads in flight across the block reduction's
  // barriers; longer rows (more registers per row) load each row as they reach it.
  constexpr bool kPrefetch = NV <= 2;
  Vec<Tx, VEC> sv[NV] = {}, nv[NV] = {}, gsv[NV] = {};   // (zeros where a row has no such input: the
  Vec<Ty, VEC> yv[NV] = {};                                //  prefetch copies whole buffers)
  if (kPrefetch && blockIdx.x < rows) load_row(blockIdx.x, sv, nv, gsv, yv);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t base = row * C;
    const float sc = scale ? scale[row / N] : 1.f;
    Vec<Tx, VEC> sv_next[NV] = {}, nv_next[NV] = {}, gsv_next[NV] = {};
    Vec<Ty, VEC> yv_next[NV] = {};
    if constexpr (kPrefetch) {
      if (row + gridDim.x < rows) load_row(row + gridDim.x, sv_next, nv_next, gsv_next, yv_next);
    } else {
      load_row(row, sv, nv, gsv, yv);   // all four issued before the block reduction
    }
    float xh[NV][VEC], g[NV][VEC];
    float sum_g = 0.f, sum_gx = 0.f, rs = 0.f;
    if (gn != nullptr) {  // uniform over the grid
      const float mu = mean[row];
      rs = rstd[row];
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const int vi = threadIdx.x + i * blockDim.x;
        float wv[VEC] = {};
        if (vi < nvec) load_f32<VEC>(w, vi * VEC, wv, 1.f);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          if (vi < nvec) {
            const float d = static_cast<float>(nv[i].v[j]);
            xh[i][j] = xhat_of<float>(static_cast<float>(sv[i].v[j]), mu, rs);
            g[i][j] = d * wv[j];
            sum_g += g[i][j];
            sum_gx += g[i][j] * xh[i][j];
            acc_w[i][j] += d * xh[i][j];
            acc_b[i][j] += d;
          } else {
            xh[i][j] = g[i][j] = 0.f;
          }
        }
      }
      block_sum2(sum_g, sum_gx, smem);
    }
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int vi = threadIdx.x + i * blockDim.x;
      if (vi >= nvec) continue;
      const int c0 = vi * VEC;
      float gam[VEC];
      load_f32<VEC>(gamma, c0, gam, 1.f);
      Vec<Tx, VEC> dxv;
      Vec<Ty, VEC> dyv;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float dsum = gs != nullptr ? static_cast<float>(gsv[i].v[j]) : 0.f;
        const float ds =
            gn != nullptr ? residual_grad<float>(dsum, g[i][j], xh[i][j], rs, sum_g, sum_gx, C) : dsum;
        dxv.v[j] = static_cast<Tx>(ds);
        dyv.v[j] = static_cast<Ty>(branch_grad<float>(ds, gam[j], sc));
        if (pg != nullptr) acc_g[i][j] += gamma_grad_term<float>(ds, static_cast<float>(yv[i].v[j]), sc);
      }
      if (dx != nullptr) store_vec<Tx, VEC>(dx + base + c0, dxv);
      if (dy != nullptr) store_vec<Ty, VEC>(dy + base + c0, dyv);
    }
    if constexpr (kPrefetch) {
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        sv[i] = sv_next[i];
        nv[i] = nv_next[i];
        gsv[i] = gsv_next[i];
        yv[i] = yv_next[i];
      }
    }
  }
  const int64_t prow = static_cast<int64_t>(blockIdx.x) * C;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int vi = threadIdx.x + i * blockDim.x;
    if (vi >= nvec) continue;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int c = vi * VEC + j;
      if (pg != nullptr) pg[prow + c] = acc_g[i][j];
      if (pw != nullptr) pw[prow + c] = acc_w[i][j];
      if (pb != nullptr) pb[prow + c] = acc_b[i][j];
    }
  }
}

// How a row of C elements maps onto a block: VEC elements per access, NV accesses per thread. Only the (B, N, C)
// tensors need 16-byte alignment for the plan; the (C,) parameters come as float4s where they are aligned
// and as scalars otherwise (load_f32).
struct Plan {
  int vec, nv, threads;
  int warp_rows = 0;  // > 0: one row per warp, this many rows per block (forward_warp_kernel)
};

// warp_per_row: the forward may take a row per warp when the row fits (at most 8 vectors per lane).
inline Plan make_plan(int64_t C, int vec_width, bool vec_ok, bool warp_per_row = false) {
  if (vec_ok && C % vec_width == 0) {
    const int64_t nvec = C / vec_width;
    if (warp_per_row && nvec <= 32 * 8) {
      for (int nv : {1, 2, 4, 8})
        if (32 * nv >= nvec) return {vec_width, nv, 32 * kWarpRows, kWarpRows};
    }
    for (int nv : {1, 2, 4, 8}) {
      const int64_t threads = (nvec + nv - 1) / nv;
      if (threads <= kMaxThreadsVec) return {vec_width, nv, static_cast<int>((threads + 31) / 32 * 32)};
    }
  }
  const int64_t threads = (C + kScalarNV - 1) / kScalarNV;
  const bool vec_would_fit = C % vec_width == 0 && C <= kMaxThreadsVec * 8 * vec_width;
  BEIT_CHECK(threads <= kMaxThreadsScalar || !vec_would_fit, kOp, ": rows of C = ", C, " > ",
             kMaxThreadsScalar * kScalarNV, " elements need every row tensor (x, y, the gradients, the outputs) ",
             "16-byte aligned (contiguous from an aligned address); here one is not");
  BEIT_CHECK(threads <= kMaxThreadsScalar, kOp, ": C = ", C, " is too large (at most ", kMaxThreadsScalar * kScalarNV,
              ", or ", kMaxThreadsVec * 8 * vec_width, " when C is a multiple of ", vec_width, ")");
  return {1, kScalarNV, static_cast<int>((threads + 31) / 32 * 32)};
}

template <typename T>
const T* cptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; }
template <typename T>
T* mptr(at::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; }

// Calls f.template operator()<VEC, NV> for the plan's instantiation (C++17: through a tag pair).
template <int VW, typename F>
void dispatch_plan(const Plan& p, F&& f) {
  if (p.vec == 1) return f(IntTag<1>{}, IntTag<kScalarNV>{});
  switch (p.nv) {
    case 1: return f(IntTag<VW>{}, IntTag<1>{});
    case 2: return f(IntTag<VW>{}, IntTag<2>{});
    case 4: return f(IntTag<VW>{}, IntTag<4>{});
    default: return f(IntTag<VW>{}, IntTag<8>{});
  }
}


// BEIT_FAST_LSRN_FORWARD=block keeps the forward on one block per row for every C (an A/B knob for the
// benchmarks; unset or "warp": a row per warp where it fits). Read at each launch.
inline bool forward_warp_per_row() {
  const char* v = std::getenv("BEIT_FAST_LSRN_FORWARD");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "warp") == 0) return true;
  BEIT_CHECK_VALUE(std::strcmp(v, "block") == 0, kOp, ": BEIT_FAST_LSRN_FORWARD must be warp or block, got '", v,
                   "'");
  return false;
}

template <typename Tx, typename Ty, typename Launch>
void launch_forward(const Launch& launch, const Forward& a, at::Tensor& s, at::Tensor& n, at::Tensor& mean,
                    at::Tensor& rstd) {
  constexpr int VW = 16 / sizeof(Tx);
  const bool vec_ok = aligned_to(a.x.data_ptr(), 16) && aligned_to(a.y.data_ptr(), VW * sizeof(Ty)) &&
                      aligned_to(s.data_ptr(), 16) && (!n.defined() || aligned_to(n.data_ptr(), 16));
  const Plan plan = make_plan(a.C, VW, vec_ok, forward_warp_per_row());
  const int64_t rows = a.B * a.N;
  dispatch_plan<VW>(plan, [&](auto vec, auto nv) {
    constexpr int V = decltype(vec)::value, NVv = decltype(nv)::value;
    // both forward kernels take the same arguments; only the kernel and its grid differ
    auto run = [&](auto kernel, int64_t blocks) {
      launch(kernel, dim3(static_cast<unsigned>(blocks)), dim3(plan.threads), a.x.data_ptr<Tx>(),
             a.y.data_ptr<Ty>(), cptr<float>(a.gamma), cptr<float>(a.scale), cptr<float>(a.w), cptr<float>(a.b),
             s.data_ptr<Tx>(), mptr<Tx>(n), mptr<float>(mean), mptr<float>(rstd), rows, a.N,
             static_cast<int>(a.C), static_cast<float>(a.eps));
    };
    if constexpr (V > 1) {   // the warp plan is vectorized only (make_plan): no scalar instantiation of it
      if (plan.warp_rows > 0)
        return run(forward_warp_kernel<Tx, Ty, V, NVv>, (rows + plan.warp_rows - 1) / plan.warp_rows);
    }
    run(forward_kernel<Tx, Ty, V, NVv>, rows);
  });
}

// The backward's grid-stride launch. The grid is as many blocks as the GPU holds at once (the launcher's
// occupancy query times sms; blocks beyond that would run as a second wave with the same share of rows each,
// after the first wave's blocks, close to doubling the time), at most one per kMinRowsPerBlock rows. It
// allocates the (grid, C) fp32 partials of the parameter gradients that `need` asks for.
template <typename Tx, typename Ty, typename Launch>
void launch_backward(const Launch& launch, const Backward& a, int sms, at::Tensor& dx, at::Tensor& dy,
                     at::Tensor& pg, at::Tensor& pw, at::Tensor& pb, std::array<bool, 3> need) {
  constexpr int VW = 16 / sizeof(Tx);
  const bool vec_ok = aligned_to(cptr<Tx>(a.grad_sum), 16) && aligned_to(cptr<Tx>(a.grad_norm), 16) &&
                      aligned_to(a.sum.data_ptr(), 16) && aligned_to(cptr<Ty>(a.y), VW * sizeof(Ty)) &&
                      aligned_to(cptr<Tx>(dx), 16) && aligned_to(cptr<Ty>(dy), VW * sizeof(Ty));
  const Plan plan = make_plan(a.C, VW, vec_ok);
  const int64_t rows = a.B * a.N;
  dispatch_plan<VW>(plan, [&](auto vec, auto nv) {
    const auto kernel = backward_kernel<Tx, Ty, decltype(vec)::value, decltype(nv)::value>;
    const int64_t resident = int64_t{sms} * std::max(1, launch.blocks_per_sm(kernel, plan.threads));
    const int64_t grid =
        std::max<int64_t>(1, std::min<int64_t>(resident, (rows + kMinRowsPerBlock - 1) / kMinRowsPerBlock));
    auto partial = [&](bool want) {
      return want ? at::empty({grid, a.C}, a.sum.options().dtype(at::kFloat)) : at::Tensor();
    };
    pg = partial(need[0]);
    pw = partial(need[1]);
    pb = partial(need[2]);
    launch(kernel, dim3(static_cast<unsigned>(grid)), dim3(plan.threads), cptr<Tx>(a.grad_sum),
           cptr<Tx>(a.grad_norm), a.sum.data_ptr<Tx>(), cptr<Ty>(a.y), cptr<float>(a.gamma), cptr<float>(a.scale),
           cptr<float>(a.w), cptr<float>(a.mean), cptr<float>(a.rstd), mptr<Tx>(dx), mptr<Ty>(dy), mptr<float>(pg),
           mptr<float>(pw), mptr<float>(pb), rows, a.N, static_cast<int>(a.C));
  });
}

inline void check_rows(int64_t rows) {
  BEIT_CHECK(rows <= static_cast<int64_t>(std::numeric_limits<int32_t>::max()), kOp, ": B * N = ", rows,
              " rows exceed the grid limit 2^31 - 1");
}

// The op on the launcher's device, after the caller's device check: allocation, dispatch, launch.
template <typename Launch>
ForwardResult forward_on(const Launch& launch, const at::Tensor& x, const at::Tensor& y,
                         const c10::optional<at::Tensor>& gamma, const c10::optional<at::Tensor>& drop_path_scale,
                         const c10::optional<at::Tensor>& ln_weight, const c10::optional<at::Tensor>& ln_bias,
                         double eps) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // autograd is registered from Python
  const Forward a = prepare_forward(x, y, gamma, drop_path_scale, ln_weight, ln_bias, eps, /*allow_double=*/false);
  at::Tensor s = at::empty_like(a.x);
  at::Tensor n, mean, rstd;
  if (a.w.defined()) {
    n = at::empty_like(a.x);
    mean = at::empty({a.B, a.N}, a.x.options().dtype(at::kFloat));
    rstd = at::empty_like(mean);
  }
  const int64_t rows = a.B * a.N;
  check_rows(rows);
  if (rows > 0) {
    dispatch_pair_no_double(a.x.scalar_type(), a.y.scalar_type(), kOp, [&](auto tx, auto ty) {
      launch_forward<typename decltype(tx)::type, typename decltype(ty)::type>(launch, a, s, n, mean, rstd);
    });
  }
  if (!a.w.defined()) return {s, c10::nullopt, c10::nullopt, c10::nullopt};
  return {s, n, mean, rstd};
}

// The backward on the launcher's device. The grid is a function of the shape, of sms (the GPU's multiprocessor
// count) and of the kernel's occupancy on that GPU model only (launch_backward), which makes the parameter
// gradients deterministic; column_sum adds the (grid, C) partial rows in a fixed order.
template <typename Launch>
BackwardResult backward_on(const Launch& launch, int sms, at::Tensor (*column_sum)(const at::Tensor&),
                           const c10::optional<at::Tensor>& grad_sum, const c10::optional<at::Tensor>& grad_norm,
                           const at::Tensor& sum, const c10::optional<at::Tensor>& y, at::ScalarType y_dtype,
                           const c10::optional<at::Tensor>& gamma, const c10::optional<at::Tensor>& drop_path_scale,
                           const c10::optional<at::Tensor>& ln_weight, const c10::optional<at::Tensor>& ln_bias,
                           const c10::optional<at::Tensor>& mean, const c10::optional<at::Tensor>& rstd,
                           std::array<bool, 5> output_mask) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Backward a = prepare_backward(grad_sum, grad_norm, sum, y, y_dtype, gamma, drop_path_scale, ln_weight,
                                      ln_bias, mean, rstd, output_mask, /*allow_double=*/false);
  const int64_t rows = a.B * a.N;
  check_rows(rows);
  const bool ln_grads = a.grad_norm.defined();
  at::Tensor dx, dy;  // not a structured binding: the kernel lambda captures them (C++17)
  std::tie(dx, dy) = allocate_input_grads(a);
  const std::array<bool, 3> need{a.need[2], a.need[3] && ln_grads, a.need[4] && ln_grads};
  at::Tensor pg, pw, pb;   // (grid, C) partials, allocated with the launch's grid
  if (rows > 0 && (dx.defined() || dy.defined() || need[0] || need[1] || need[2])) {
    dispatch_pair_no_double(a.sum.scalar_type(), a.y_dtype, kOp, [&](auto tx, auto ty) {
      launch_backward<typename decltype(tx)::type, typename decltype(ty)::type>(launch, a, sms, dx, dy, pg, pw, pb,
                                                                                 need);
    });
  }
  return backward_result(a, dx, dy, pg, pw, pb, column_sum);
}

}  // namespace dev
}  // namespace lsrn
}  // namespace beit_fast
