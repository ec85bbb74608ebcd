// beit_fast::masked_patch_embed: argument checks, the device-independent flow (gather -> GEMM -> epilogue,
// and its backward) and the CPU kernels. CUDA kernels: masked_patch_embed_cuda.cu.
#include "masked_patch_embed.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "dtype_dispatch.h"
#include "masked_patch_embed.cuh"
#include "partial_sums.h"

namespace beit_fast {
namespace mpe {
namespace {

constexpr const char* kOp = "masked_patch_embed";

bool present(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

void check_device(const at::Tensor& images, const at::Tensor& t, const char* name) {
  BEIT_CHECK_VALUE(t.device() == images.device(), kOp, ": ", name, " is on ", t.device(), " but images are on ",
              images.device(), "; all tensors must be on one device");
}

at::Tensor small_param(const at::Tensor& t, const at::Tensor& images, at::IntArrayRef shape, const char* name,
                       const char* shape_name, at::ScalarType acc) {
  check_device(images, t, name);
  BEIT_CHECK_VALUE(t.sizes() == shape, kOp, ": ", name, " must have shape ", shape_name, " = ", shape, ", got ",
                    t.sizes());
  BEIT_CHECK_VALUE(at::isFloatingType(t.scalar_type()), kOp, ": ", name, " must be floating point, got ",
                    t.scalar_type());
  return t.to(acc).contiguous();
}

}  // namespace

Prepared prepare(const at::Tensor& images, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                 const c10::optional<at::Tensor>& bool_masked_pos, const c10::optional<at::Tensor>& mask_token,
                 const at::Tensor& cls_token, const c10::optional<at::Tensor>& pos_embed, bool allow_double) {
  BEIT_CHECK_VALUE(images.dim() == 4, kOp, ": images must have shape (B, Cin, H, W), got ", images.sizes());
  BEIT_CHECK_VALUE(weight.dim() == 4 && weight.size(1) == images.size(1) && weight.size(0) > 0 && weight.size(1) > 0,
              kOp, ": weight must have shape (C, Cin, ph, pw) with Cin = images.size(1) = ", images.size(1),
              ", got weight ", weight.sizes(), " for images ", images.sizes());
  check_device(images, weight, "weight");
  Prepared p;
  p.B = images.size(0);
  p.Cin = images.size(1);
  p.H = images.size(2);
  p.W = images.size(3);
  p.C = weight.size(0);
  p.ph = weight.size(2);
  p.pw = weight.size(3);
  BEIT_CHECK_VALUE(p.ph > 0 && p.pw > 0 && p.H % p.ph == 0 && p.W % p.pw == 0 && p.H > 0 && p.W > 0, kOp,
              ": the image size ", p.H, "x", p.W, " must be a positive multiple of the patch size ", p.ph, "x", p.pw,
              " (images ", images.sizes(), ", weight ", weight.sizes(), ")");
  BEIT_CHECK_VALUE(weight.scalar_type() == images.scalar_type(), kOp, ": weight must have the dtype of images (",
              images.scalar_type(), "), got ", weight.scalar_type());
  dispatch_float(images.scalar_type(), allow_double, kOp, [](auto) {});
  p.Wp = p.W / p.pw;
  p.P = (p.H / p.ph) * p.Wp;
  p.K = p.Cin * p.ph * p.pw;
  // The reference's promotion: conv output (images' dtype) blended with mask_token, cat with cls_token, + pos_embed.
  p.out_dtype = at::promote_types(images.scalar_type(), cls_token.scalar_type());
  if (present(bool_masked_pos) && present(mask_token))
    p.out_dtype = at::promote_types(p.out_dtype, mask_token->scalar_type());
  if (present(pos_embed)) p.out_dtype = at::promote_types(p.out_dtype, pos_embed->scalar_type());
  if (at::isFloatingType(p.out_dtype))
    dispatch_float(p.out_dtype, allow_double, kOp, [](auto) {});  // a clear error for fp64 tokens on CUDA
  p.acc_dtype = images.scalar_type() == at::kDouble || p.out_dtype == at::kDouble ? at::kDouble : at::kFloat;
  p.images = images.contiguous();
  p.weight2d = weight.reshape({p.C, p.K}).contiguous();
  // An absent bias or mask_token reads as zeros: the kernels keep one code path.
  const auto zeros = [&] { return at::zeros({p.C}, images.options().dtype(p.acc_dtype)); };
  p.bias = present(bias) ? small_param(*bias, images, {p.C}, "bias", "(C,)", p.acc_dtype) : zeros();
  BEIT_CHECK_VALUE(present(mask_token) || !present(bool_masked_pos), kOp,
                    ": bool_masked_pos was given without mask_token");
  p.mask_token = present(mask_token)
                     ? small_param(*mask_token, images, {1, 1, p.C}, "mask_token", "(1, 1, C)", p.acc_dtype).view({p.C})
                     : zeros();
  p.cls_token = small_param(cls_token, images, {1, 1, p.C}, "cls_token", "(1, 1, C)", p.acc_dtype).view({p.C});
  if (present(pos_embed))
    p.pos_embed = small_param(*pos_embed, images, {1, 1 + p.P, p.C}, "pos_embed", "(1, 1 + P, C)", p.acc_dtype)
                      .view({1 + p.P, p.C});
  if (present(bool_masked_pos)) {
    const at::Tensor& m = *bool_masked_pos;
    check_device(images, m, "bool_masked_pos");
    BEIT_CHECK_VALUE(m.scalar_type() == at::kBool, kOp, ": bool_masked_pos must be bool, got ", m.scalar_type());
    BEIT_CHECK_VALUE(m.dim() == 2 && m.size(0) == p.B && m.size(1) == p.P, kOp,
                ": bool_masked_pos must have shape (B, P) = (", p.B, ", ", p.P, ") for images ", images.sizes(),
                " and patch ", p.ph, "x", p.pw, ", got ", m.sizes());
    p.mask = m.contiguous();
  }
  return p;
}

at::Tensor forward_impl(const Kernels& k, const at::Tensor& images, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& bool_masked_pos,
                        const c10::optional<at::Tensor>& mask_token,
                        const at::Tensor& cls_token, const c10::optional<at::Tensor>& pos_embed, bool allow_double) {
  // Autograd is registered from Python around this op; the ATen calls below must not record a graph.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Prepared p = prepare(images, weight, bias, bool_masked_pos, mask_token, cls_token, pos_embed, allow_double);
  at::Tensor out = at::empty({p.B, 1 + p.P, p.C}, p.images.options().dtype(p.out_dtype));
  if (p.B == 0) return out;
  at::Tensor patches = at::empty({p.B * (1 + p.P), p.K}, p.images.options());
  k.gather(p, patches);
  // The GEMM writes straight into the output buffer and the epilogue rewrites it in place; when the tokens
  // are wider than the GEMM's dtype (autocast), the GEMM writes a scratch buffer the epilogue reads once.
  at::Tensor gemm = p.out_dtype == p.images.scalar_type() ? out : at::empty({p.B, 1 + p.P, p.C}, p.images.options());
  at::Tensor gemm2d = gemm.view({p.B * (1 + p.P), p.C});
  at::mm_out(gemm2d, patches, p.weight2d.t());
  k.epilogue(p, gemm, out);
  return out;
}

BackwardResult backward_impl(const Kernels& k, const at::Tensor& grad_out, const at::Tensor& images,
                             const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                             const c10::optional<at::Tensor>& bool_masked_pos,
                             const c10::optional<at::Tensor>& mask_token,
                             const at::Tensor& cls_token, const c10::optional<at::Tensor>& pos_embed,
                             std::array<bool, 6> need, bool allow_double) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Prepared p = prepare(images, weight, bias, bool_masked_pos, mask_token, cls_token, pos_embed, allow_double);
  check_device(images, grad_out, "grad_out");
  const std::array<int64_t, 3> out_shape{p.B, 1 + p.P, p.C};
  BEIT_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(out_shape) && grad_out.scalar_type() == p.out_dtype, kOp,
              "_backward: grad_out must have shape ", at::IntArrayRef(out_shape), " and the output's dtype ",
              p.out_dtype, ", got ", grad_out.sizes(), " ", grad_out.scalar_type());
  BEIT_CHECK_VALUE(!need[5] || p.pos_embed.defined(), kOp,
                    "_backward: the pos_embed gradient was requested without pos_embed");
  BEIT_CHECK_VALUE(!need[2] || present(bias), kOp, "_backward: the bias gradient was requested without bias");
  BEIT_CHECK_VALUE(!need[3] || present(mask_token), kOp,
                    "_backward: the mask_token gradient was requested without mask_token");
  const at::Tensor grad = grad_out.contiguous();
  // The GEMMs run in images' dtype (as the reference's conv backward gets the gradient cast back to it); the
  // token sums read grad as it is.
  const at::Tensor g2d = grad.to(p.images.scalar_type()).view({p.B * (1 + p.P), p.C});
  BackwardResult res;
  if (need[0]) {
    at::Tensor dimages = at::empty_like(p.images);
    if (p.B > 0) k.scatter(p, at::mm(g2d, p.weight2d), dimages);
    std::get<0>(res) = dimages;
  }
  if (need[1]) {
    at::Tensor patches = at::empty({p.B * (1 + p.P), p.K}, p.images.options());
    if (p.B > 0) k.gather(p, patches);
    // Zero rows (cls, masked) add nothing: masked patches do not reach the weight gradient.
    std::get<1>(res) = at::mm(g2d.t(), patches).view(weight.sizes());
  }
  if (need[2] || need[3] || need[4] || need[5]) {
    auto acc = p.images.options().dtype(p.acc_dtype);
    at::Tensor unmasked = at::empty({1 + p.P, p.C}, acc), masked = at::empty({1 + p.P, p.C}, acc);
    k.token_sums(p, grad, unmasked, masked);
    if (need[2]) std::get<2>(res) = k.column_sum(unmasked.narrow(0, 1, p.P).contiguous()).to(bias->scalar_type());
    if (need[3])
      std::get<3>(res) = k.column_sum(masked.narrow(0, 1, p.P).contiguous()).to(mask_token->scalar_type())
                             .view({1, 1, p.C});
    if (need[4]) {
      at::Tensor d = at::empty({1, 1, p.C}, acc.dtype(cls_token.scalar_type()));
      d.view({p.C}).copy_(unmasked.select(0, 0));
      std::get<4>(res) = d;
    }
    if (need[5]) std::get<5>(res) = unmasked.add(masked).to(pos_embed->scalar_type()).view({1, 1 + p.P, p.C});
  }
  return res;
}

// ---------------------------------------------------------------------------------------------- CPU kernels
namespace {

PatchGeom<int64_t> geom(const Prepared& p) { return {p.Cin, p.H, p.W, p.ph, p.pw, p.Wp, p.P, p.K}; }

const bool* mask_ptr(const Prepared& p) { return p.mask.defined() ? p.mask.data_ptr<bool>() : nullptr; }

void gather_cpu(const Prepared& p, at::Tensor& patches) {
  dispatch_float(p.images.scalar_type(), true, kOp, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto g = geom(p);
    const T* img = p.images.data_ptr<T>();
    T* out = patches.data_ptr<T>();
    const bool* mask = mask_ptr(p);
    const int64_t T1 = 1 + p.P;
    at::parallel_for(0, p.B * T1, std::max<int64_t>(1, 32768 / p.K), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / T1, t = r % T1;
        T* dst = out + r * p.K;
        if (t == 0 || token_masked<int64_t>(mask, b, t, p.P)) {
          std::fill(dst, dst + p.K, T(0));
          continue;
        }
        for (int64_t k = 0; k < p.K; ++k) dst[k] = img[pixel_offset<int64_t>(g, b, t - 1, k)];
      }
    });
  });
}

void epilogue_cpu(const Prepared& p, const at::Tensor& gemm_t, at::Tensor& out_t) {
  dispatch_float2(p.images.scalar_type(), p.out_dtype, true, kOp, [&](auto tag, auto out_tag) {
    using T = typename decltype(tag)::type;
    using O = typename decltype(out_tag)::type;
    using A = acc_pair_t<T, O>;
    const T* gemm = gemm_t.data_ptr<T>();
    O* out = out_t.data_ptr<O>();
    const A *bias = p.bias.data_ptr<A>(), *mtok = p.mask_token.data_ptr<A>(), *cls = p.cls_token.data_ptr<A>();
    const A* pos = p.pos_embed.defined() ? p.pos_embed.data_ptr<A>() : nullptr;
    const bool* mask = mask_ptr(p);
    const int64_t T1 = 1 + p.P, C = p.C;
    at::parallel_for(0, p.B * T1, std::max<int64_t>(1, 32768 / C), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / T1, t = r % T1;
        const bool masked = token_masked<int64_t>(mask, b, t, p.P);
        const T* src = gemm + r * C;
        O* row = out + r * C;
        for (int64_t c = 0; c < C; ++c)
          row[c] = static_cast<O>(token_value<A>(t == 0, masked, static_cast<A>(src[c]), bias[c], mtok[c], cls[c],
                                                 pos ? pos[t * C + c] : A(0)));
      }
    });
  });
}

void token_sums_cpu(const Prepared& p, const at::Tensor& grad_t, at::Tensor& unmasked_t, at::Tensor& masked_t) {
  dispatch_float2(p.images.scalar_type(), p.out_dtype, true, kOp, [&](auto tag, auto out_tag) {
    using O = typename decltype(out_tag)::type;
    using A = acc_pair_t<typename decltype(tag)::type, O>;
    const O* grad = grad_t.data_ptr<O>();
    A *um = unmasked_t.data_ptr<A>(), *mk = masked_t.data_ptr<A>();
    const bool* mask = mask_ptr(p);
    const int64_t T1 = 1 + p.P, C = p.C;
    at::parallel_for(0, T1, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        A *u = um + t * C, *m = mk + t * C;
        std::fill(u, u + C, A(0));
        std::fill(m, m + C, A(0));
        for (int64_t b = 0; b < p.B; ++b) {  // images in order: deterministic
          A* dst = token_masked<int64_t>(mask, b, t, p.P) ? m : u;
          const O* src = grad + (b * T1 + t) * C;
          for (int64_t c = 0; c < C; ++c) dst[c] += static_cast<A>(src[c]);
        }
      }
    });
  });
}

void scatter_cpu(const Prepared& p, const at::Tensor& dpatches_t, at::Tensor& dimages_t) {
  dispatch_float(p.images.scalar_type(), true, kOp, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto g = geom(p);
    const T* dpatches = dpatches_t.data_ptr<T>();
    T* dimg = dimages_t.data_ptr<T>();
    const bool* mask = mask_ptr(p);
    const int64_t T1 = 1 + p.P;
    // One task per image row (b, ci, yy).
    at::parallel_for(0, p.B * p.Cin * p.H, std::max<int64_t>(1, 8192 / p.W), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t yy = r % p.H, ci = (r / p.H) % p.Cin, b = r / (p.H * p.Cin);
        T* dst = dimg + r * p.W;
        for (int64_t xx = 0; xx < p.W; ++xx) {
          int64_t patch, k;
          patch_of_pixel<int64_t>(g, ci, yy, xx, patch, k);
          dst[xx] = token_masked<int64_t>(mask, b, 1 + patch, p.P) ? T(0) : dpatches[(b * T1 + 1 + patch) * p.K + k];
        }
      }
    });
  });
}

const Kernels kCpuKernels{&gather_cpu, &epilogue_cpu, &token_sums_cpu, &scatter_cpu, &column_sum_cpu};

at::Tensor forward_cpu(const at::Tensor& images, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       const c10::optional<at::Tensor>& bool_masked_pos, const c10::optional<at::Tensor>& mask_token,
                       const at::Tensor& cls_token, const c10::optional<at::Tensor>& pos_embed) {
  return forward_impl(kCpuKernels, images, weight, bias, bool_masked_pos, mask_token, cls_token, pos_embed, true);
}

BackwardResult backward_cpu(const at::Tensor& grad_out, const at::Tensor& images, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& bool_masked_pos,
                            const c10::optional<at::Tensor>& mask_token, const at::Tensor& cls_token,
                            const c10::optional<at::Tensor>& pos_embed, std::array<bool, 6> output_mask) {
  return backward_impl(kCpuKernels, grad_out, images, weight, bias, bool_masked_pos, mask_token, cls_token, pos_embed,
                       output_mask, true);
}

}  // namespace

// The CUDA-kernel tests compile this file into their own module for its host-side flow, without
// registering the ops a second time.
#ifndef BEIT_FAST_NO_OP_REGISTRATION
TORCH_LIBRARY_IMPL(beit_fast, CPU, m) {
  m.impl("masked_patch_embed", &forward_cpu);
  m.impl("masked_patch_embed_backward", &backward_cpu);
}
#endif

}  // namespace mpe
}  // namespace beit_fast
