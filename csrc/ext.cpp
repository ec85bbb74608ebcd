// beit_fast._C: the Python module object and the one place where the beit_fast op schemas are declared.
// Kernels register themselves per dispatch key (CPU, CUDA) in their own files with TORCH_LIBRARY_IMPL;
// autograd and fake (meta) functions are registered from Python, in beit_fast/ops/<op>.py.
#include <torch/extension.h>

#include <cstdint>
#include <sstream>
#include <string>

TORCH_LIBRARY(beit_fast, m) {
  // Block-wise masking (BEiT's MaskingGenerator), one mask per row, seeded: (B, height*width) bool.
  m.def("block_mask(int batch, int height, int width, int num_masking_patches, int min_num_patches, "
        "int max_num_patches, float min_aspect, float max_aspect, int seed) -> Tensor");

  // Patch embedding (Conv2d with kernel = stride) + mask-token replacement + cls token + absolute position
  // embedding: images (B, Cin, H, W), weight (C, Cin, ph, pw), bias (C), bool_masked_pos (B, P) bool,
  // mask_token / cls_token (1, 1, C), pos_embed (1, 1+P, C) -> (B, 1+P, C) in images' dtype. bias, the mask
  // and pos_embed may be None; mask_token may be None when the mask is.
  m.def("masked_patch_embed(Tensor images, Tensor weight, Tensor? bias, Tensor? bool_masked_pos, "
        "Tensor? mask_token, Tensor cls_token, Tensor? pos_embed) -> Tensor");
  // Gradients of (images, weight, bias, mask_token, cls_token, pos_embed); None where output_mask is false.
  m.def("masked_patch_embed_backward(Tensor grad_out, Tensor images, Tensor weight, Tensor? bias, "
        "Tensor? bool_masked_pos, Tensor? mask_token, Tensor cls_token, Tensor? pos_embed, bool[6] output_mask) "
        "-> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)");

  // s = x + drop_path_scale[:, None, None] * (gamma * y); n = LayerNorm(s; ln_weight, ln_bias, eps).
  // x (B, N, C); y (B, N, C) in x's dtype (or fp16/bf16 when x is fp32); gamma, ln_weight, ln_bias (C);
  // drop_path_scale (B). Returns (s, n, mean, rstd); n, mean, rstd are None when ln_weight is None.
  // mean / rstd (B, N) are fp32 (fp64 for fp64 inputs) and exist for the backward.
  m.def("layer_scale_residual_norm(Tensor x, Tensor y, Tensor? gamma, Tensor? drop_path_scale, "
        "Tensor? ln_weight, Tensor? ln_bias, float eps) -> (Tensor, Tensor?, Tensor?, Tensor?)");
  // Gradients of (x, y, gamma, ln_weight, ln_bias) given the gradients of s and n (None = zero);
  // y is needed only for the gamma gradient; None where output_mask is false.
  m.def("layer_scale_residual_norm_backward(Tensor? grad_sum, Tensor? grad_norm, Tensor sum, Tensor? y, "
        "ScalarType y_dtype, Tensor? gamma, Tensor? drop_path_scale, Tensor? ln_weight, Tensor? ln_bias, "
        "Tensor? mean, Tensor? rstd, bool[5] output_mask) -> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)");
}

static bool built_with_cuda() {
#ifdef BEIT_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// TORCH_CUDA_ARCH_LIST as built, encoded by setup.py (_arch_token: "sm8v0_sm9v0_ptx9v0"); "" without CUDA.
#define BEIT_FAST_STRINGIFY2(x) #x
#define BEIT_FAST_STRINGIFY(x) BEIT_FAST_STRINGIFY2(x)
static std::string cuda_archs() {
#ifdef BEIT_FAST_CUDA_ARCHS
  return BEIT_FAST_STRINGIFY(BEIT_FAST_CUDA_ARCHS);
#else
  return "";
#endif
}

// Why setup.py skipped the CUDA sources, hex-encoded UTF-8 (a macro value cannot carry arbitrary text
// through every compiler's command line); "" when they were built, or by an older setup.py.
static std::string cuda_skip_reason_hex() {
#ifdef BEIT_FAST_CUDA_SKIPPED
  return BEIT_FAST_STRINGIFY(BEIT_FAST_CUDA_SKIPPED);
#else
  return "";
#endif
}

// Diagnosis only (bench/cpp_errors.py, tests/test_cpp_messages.py): what a std::ostringstream made in this
// library writes for 1234567 and 0.5. Not "1234567 0.5" (or a crash) when the extension carries its own
// libstdc++; the ops' error messages do not depend on it (error_message.h).
static std::string stream_format_probe() {
  std::ostringstream ss;
  ss << int64_t{1234567} << ' ' << 0.5;
  return ss.str();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "beit_fast C++/CUDA extension; ops are registered under torch.ops.beit_fast";
  m.def("built_with_cuda", &built_with_cuda, "whether the CUDA sources were compiled in");
  m.def("cuda_archs", &cuda_archs, "the GPU architectures the CUDA sources were compiled for (setup.py's code)");
  m.def("_cuda_skip_reason_hex", &cuda_skip_reason_hex, "why setup.py skipped the CUDA sources (hex UTF-8)");
  m.def("_stream_format_probe", &stream_format_probe, "diagnosis: an ostringstream's output for 1234567 and 0.5");
}
