// Host-side flow of beit_fast::masked_patch_embed, shared by the CPU (.cpp) and CUDA (.cu) files: argument
// checks, the GEMMs (at::mm: MKL/oneDNN on the CPU, cuBLAS on the GPU) and the order of the device kernels.
// Each device supplies the same four small kernels (gather, epilogue, token_sums, scatter) and a fixed-order
// column sum; their per-element math is in masked_patch_embed.cuh.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

namespace beit_fast {
namespace mpe {

struct Prepared {
  int64_t B = 0, Cin = 0, H = 0, W = 0, ph = 0, pw = 0, Wp = 0, P = 0, C = 0, K = 0;
  at::Tensor images;    // (B, Cin, H, W) contiguous, dtype T
  at::Tensor weight2d;  // (C, K) contiguous, dtype T
  at::Tensor mask;      // (B, P) bool contiguous, or undefined
  // Small parameters in the accumulation dtype (fp32; fp64 for fp64 images): (C), (C), (C), (1+P, C).
  at::Tensor bias, mask_token, cls_token, pos_embed;  // pos_embed undefined when absent
  // The output's dtype, as the reference's type promotion gives it: images' dtype promoted with cls_token's
  // (and mask_token's when there is a mask, pos_embed's when present). Under autocast: the fp32 parameters'.
  at::ScalarType out_dtype = at::kFloat;
  at::ScalarType acc_dtype = at::kFloat;  // fp64 when images or the output are fp64, else fp32
};

struct Kernels {
  // patches (B*(1+P), K) in T: pixels of unmasked patches, zero rows at cls and masked positions.
  void (*gather)(const Prepared&, at::Tensor& patches);
  // gemm (B, 1+P, C) in T holds patches @ weight^T; writes the final tokens into out (B, 1+P, C) in
  // out_dtype, which is gemm itself (in place) when out_dtype is T.
  void (*epilogue)(const Prepared&, const at::Tensor& gemm, at::Tensor& out);
  // For grad (B, 1+P, C) in out_dtype: unmasked[t] = sum over images where token t is not masked, masked[t] = sum over
  // images where it is; both (1+P, C) in the accumulation dtype, summed over b in order.
  void (*token_sums)(const Prepared&, const at::Tensor& grad, at::Tensor& unmasked, at::Tensor& masked);
  // dimages (B, Cin, H, W) from dpatches (B*(1+P), K): zero at masked patches.
  void (*scatter)(const Prepared&, const at::Tensor& dpatches, at::Tensor& dimages);
  // (R, C) -> (C), summed over rows in a fixed order (deterministic).
  at::Tensor (*column_sum)(const at::Tensor& rows);
};

using BackwardResult = std::tuple<c10::optional<at::Tensor>, c10::optional<at::Tensor>, c10::optional<at::Tensor>,
                                  c10::optional<at::Tensor>, c10::optional<at::Tensor>, c10::optional<at::Tensor>>;

Prepared prepare(const at::Tensor& images, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                 const c10::optional<at::Tensor>& bool_masked_pos, const c10::optional<at::Tensor>& mask_token,
                 const at::Tensor& cls_token, const c10::optional<at::Tensor>& pos_embed, bool allow_double);

at::Tensor forward_impl(const Kernels& k, const at::Tensor& images, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& bool_masked_pos,
                        const c10::optional<at::Tensor>& mask_token,
                        const at::Tensor& cls_token, const c10::optional<at::Tensor>& pos_embed, bool allow_double);

BackwardResult backward_impl(const Kernels& k, const at::Tensor& grad_out, const at::Tensor& images,
                             const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                             const c10::optional<at::Tensor>& bool_masked_pos,
                             const c10::optional<at::Tensor>& mask_token,
                             const at::Tensor& cls_token, const c10::optional<at::Tensor>& pos_embed,
                             std::array<bool, 6> output_mask, bool allow_double);

}  // namespace mpe
}  // namespace beit_fast
