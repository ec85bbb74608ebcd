// beit_fast._C: the Python module object and the one place where the beit_fast op schemas are declared.
// Kernels register themselves per dispatch key (CPU, CUDA) in their own files with TORCH_LIBRARY_IMPL.
#include <torch/extension.h>

TORCH_LIBRARY(beit_fast, m) {
  // Block-wise masking (BEiT's MaskingGenerator), one mask per row, seeded: (B, height*width) bool.
  m.def("block_mask(int batch, int height, int width, int num_masking_patches, int min_num_patches, "
        "int max_num_patches, float min_aspect, float max_aspect, int seed) -> Tensor");
}

static bool built_with_cuda() {
#ifdef BEIT_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "beit_fast C++/CUDA extension; ops are registered under torch.ops.beit_fast";
  m.def("built_with_cuda", &built_with_cuda, "whether the CUDA sources were compiled in");
}
