// Per-element math of beit_fast::masked_patch_embed, shared by the CPU kernels (.cpp) and the CUDA kernels
// (.cu). I is the index type (int64_t on the CPU, int32_t on the GPU where the host checked the sizes);
// A is the accumulation type.
//
// A Conv2d whose kernel equals its stride is a GEMM over non-overlapping patches: row (b, 1 + p) of the
// patch matrix holds the Cin * ph * pw pixels of patch p of image b in the order of the conv weight
// (ci, i, j), so out = patches @ weight.view(C, K)^T. Row (b, 0) (the cls position) and the rows of masked
// patches are zero in the patch matrix; the epilogue then writes cls_token / mask_token there.
#pragma once

#include <cstdint>

#include "hostdevice.cuh"

namespace beit_fast {
namespace mpe {

template <typename I>
struct PatchGeom {
  I Cin, H, W, ph, pw, Wp, P, K;  // K = Cin * ph * pw; P = (H / ph) * (W / pw); Wp = W / pw
};

// Offset in the (B, Cin, H, W) images of element k of patch `patch` of image b.
template <typename I>
BEIT_HD I pixel_offset(const PatchGeom<I>& g, I b, I patch, I k) {
  const I area = g.ph * g.pw;
  const I ci = k / area, r = k - ci * area;
  const I i = r / g.pw, j = r - i * g.pw;
  const I py = patch / g.Wp, px = patch - py * g.Wp;
  return ((b * g.Cin + ci) * g.H + py * g.ph + i) * g.W + px * g.pw + j;
}

// The inverse: for pixel (ci, yy, xx) of an image, its patch index and its column k in the patch matrix.
template <typename I>
BEIT_HD void patch_of_pixel(const PatchGeom<I>& g, I ci, I yy, I xx, I& patch, I& k) {
  const I py = yy / g.ph, i = yy - py * g.ph;
  const I px = xx / g.pw, j = xx - px * g.pw;
  patch = py * g.Wp + px;
  k = (ci * g.ph + i) * g.pw + j;
}

// Whether token t (0 = cls, 1 + p = patch p) of image b is masked; mask is (B, P) or null.
template <typename I>
BEIT_HD bool token_masked(const bool* mask, I b, I t, I P) {
  return mask != nullptr && t > 0 && mask[b * P + (t - 1)];
}

// Output token t: cls_token at t = 0, mask_token at masked patches, conv output + bias elsewhere; then the
// absolute position embedding (0 when absent). The reference's x * (1 - w) + mask_token * w selects exactly
// one of the two for finite x.
template <typename A>
BEIT_HD A token_value(bool is_cls, bool masked, A gemm, A bias, A mask_token, A cls_token, A pos) {
  const A v = is_cls ? cls_token : (masked ? mask_token : gemm + bias);
  return v + pos;
}

}  // namespace mpe
}  // namespace beit_fast
