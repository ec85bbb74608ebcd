// beit_fast's CUDA ops with their kernels run by the CPU emulator (emulator.h), registered as
// torch.ops.beit_fast_emulated.*: the same schemas as torch.ops.beit_fast.*, CPU tensors in and out.
// Compiled by tests/test_cuda_emulated.py together with csrc/masked_patch_embed.cpp and
// csrc/layer_scale_residual_norm.cpp (their host-side flow, without their op registration).
#include "emulator.h"  // first: it defines the CUDA keywords the kernel headers use

#include <torch/library.h>

#include "layer_scale_residual_norm_kernels.cuh"
#include "masked_patch_embed_kernels.cuh"
#include "partial_sums_kernels.cuh"

namespace beit_fast {
namespace {

using cuda_emulator::EmulatedLaunch;

void check_cpu(const at::Tensor& t, const char* what) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "beit_fast_emulated: ", what, " must be a CPU tensor (the emulator runs ",
                    "the CUDA kernels on the CPU), got ", t.device());
}

at::Tensor column_sum(const at::Tensor& part) {
  check_cpu(part, "part");
  TORCH_CHECK_VALUE(part.dim() == 2 && part.is_contiguous() && part.scalar_type() == at::kFloat,
                    "beit_fast_emulated.column_sum: expected a contiguous (R, C) float32 tensor, got ", part.sizes(),
                    " ", part.scalar_type());
  return colsum::column_sum_on(EmulatedLaunch{}, part);
}

lsrn::ForwardResult lsrn_forward(const at::Tensor& x, const at::Tensor& y, const c10::optional<at::Tensor>& gamma,
                                 const c10::optional<at::Tensor>& drop_path_scale,
                                 const c10::optional<at::Tensor>& ln_weight,
                                 const c10::optional<at::Tensor>& ln_bias, double eps) {
  check_cpu(x, "x");
  return lsrn::dev::forward_on(EmulatedLaunch{}, x, y, gamma, drop_path_scale, ln_weight, ln_bias, eps);
}

// sms stands for the GPU's multiprocessor count, which sets the backward's grid.
lsrn::BackwardResult lsrn_backward(const c10::optional<at::Tensor>& grad_sum,
                                   const c10::optional<at::Tensor>& grad_norm, const at::Tensor& sum,
                                   const c10::optional<at::Tensor>& y, at::ScalarType y_dtype,
                                   const c10::optional<at::Tensor>& gamma,
                                   const c10::optional<at::Tensor>& drop_path_scale,
                                   const c10::optional<at::Tensor>& ln_weight,
                                   const c10::optional<at::Tensor>& ln_bias, const c10::optional<at::Tensor>& mean,
                                   const c10::optional<at::Tensor>& rstd, std::array<bool, 5> output_mask,
                                   int64_t sms) {
  check_cpu(sum, "sum");
  return lsrn::dev::backward_on(EmulatedLaunch{}, static_cast<int>(sms), &column_sum, grad_sum, grad_norm, sum, y,
                                y_dtype, gamma, drop_path_scale, ln_weight, ln_bias, mean, rstd, output_mask);
}

void gather(const mpe::Prepared& p, at::Tensor& patches) { mpe::dev::gather_on(EmulatedLaunch{}, p, patches); }
void epilogue(const mpe::Prepared& p, const at::Tensor& gemm, at::Tensor& out) {
  mpe::dev::epilogue_on(EmulatedLaunch{}, p, gemm, out);
}
void token_sums(const mpe::Prepared& p, const at::Tensor& grad, at::Tensor& unmasked, at::Tensor& masked) {
  mpe::dev::token_sums_on(EmulatedLaunch{}, p, grad, unmasked, masked);
}
void scatter(const mpe::Prepared& p, const at::Tensor& dpatches, at::Tensor& dimages) {
  mpe::dev::scatter_on(EmulatedLaunch{}, p, dpatches, dimages);
}

const mpe::Kernels kEmulatedKernels{&gather, &epilogue, &token_sums, &scatter, &column_sum};

at::Tensor mpe_forward(const at::Tensor& images, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       const c10::optional<at::Tensor>& bool_masked_pos, const c10::optional<at::Tensor>& mask_token,
                       const at::Tensor& cls_token, const c10::optional<at::Tensor>& pos_embed) {
  check_cpu(images, "images");
  return mpe::forward_impl(kEmulatedKernels, images, weight, bias, bool_masked_pos, mask_token, cls_token, pos_embed,
                           /*allow_double=*/false);
}

mpe::BackwardResult mpe_backward(const at::Tensor& grad_out, const at::Tensor& images, const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& bias,
                                 const c10::optional<at::Tensor>& bool_masked_pos,
                                 const c10::optional<at::Tensor>& mask_token, const at::Tensor& cls_token,
                                 const c10::optional<at::Tensor>& pos_embed, std::array<bool, 6> output_mask) {
  check_cpu(images, "images");
  return mpe::backward_impl(kEmulatedKernels, grad_out, images, weight, bias, bool_masked_pos, mask_token, cls_token,
                            pos_embed, output_mask, /*allow_double=*/false);
}

// Kernel launches, blocks run, barriers released and warp shuffles exchanged since the module was loaded: lets
// a test check that the kernels and reductions it meant to exercise really ran.
std::vector<int64_t> launch_stats() {
  const cuda_emulator::Scheduler& s = cuda_emulator::scheduler();
  return {s.launches, s.blocks, s.barriers, s.shuffles};
}

// For the emulator's own test: lane 0 waits at a barrier while the rest of its warp shuffles, which can never
// complete on a GPU; the emulator must report a deadlock.
__global__ void broken_kernel(float* out) {
  float v = 1.f;
  if (threadIdx.x == 0) __syncthreads();
  else v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

void broken_kernel_for_tests() {
  at::Tensor out = at::zeros({32});
  EmulatedLaunch{}(broken_kernel, dim3(1), dim3(32), out.data_ptr<float>());
}

}  // namespace
}  // namespace beit_fast

TORCH_LIBRARY(beit_fast_emulated, m) {
  m.def("column_sum(Tensor part) -> Tensor", &beit_fast::column_sum);
  m.def("layer_scale_residual_norm(Tensor x, Tensor y, Tensor? gamma, Tensor? drop_path_scale, "
        "Tensor? ln_weight, Tensor? ln_bias, float eps) -> (Tensor, Tensor?, Tensor?, Tensor?)",
        &beit_fast::lsrn_forward);
  m.def("layer_scale_residual_norm_backward(Tensor? grad_sum, Tensor? grad_norm, Tensor sum, Tensor? y, "
        "ScalarType y_dtype, Tensor? gamma, Tensor? drop_path_scale, Tensor? ln_weight, Tensor? ln_bias, "
        "Tensor? mean, Tensor? rstd, bool[5] output_mask, int sms) -> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)",
        &beit_fast::lsrn_backward);
  m.def("masked_patch_embed(Tensor images, Tensor weight, Tensor? bias, Tensor? bool_masked_pos, "
        "Tensor? mask_token, Tensor cls_token, Tensor? pos_embed) -> Tensor",
        &beit_fast::mpe_forward);
  m.def("masked_patch_embed_backward(Tensor grad_out, Tensor images, Tensor weight, Tensor? bias, "
        "Tensor? bool_masked_pos, Tensor? mask_token, Tensor cls_token, Tensor? pos_embed, bool[6] output_mask) "
        "-> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)",
        &beit_fast::mpe_backward);
  m.def("launch_stats() -> int[]", &beit_fast::launch_stats);
  m.def("broken_kernel_for_tests() -> ()", &beit_fast::broken_kernel_for_tests);
}
