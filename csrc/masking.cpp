// beit_fast::block_mask (CPU): BEiT's block-wise MaskingGenerator, one seeded generator per row.
//
// The algorithm is unilm's beit/masking_generator.py step for step (see beit_reference.md section 2):
// blocks of random area and aspect ratio are placed until the target count is reached or one call of
// `place_block` finds nothing to add within 10 attempts. Each row draws from its own std::mt19937_64 seeded
// from (seed, row), so a row's mask depends on neither the batch size nor the number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>

#include "error_message.h"

namespace beit_fast {
namespace {

uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

struct MaskParams {
  int64_t height, width, target, min_patches, max_patches;
  double log_min_aspect, log_max_aspect;
};

class RowRng {
 public:
  RowRng(int64_t seed, int64_t row)
      : gen_(splitmix64(splitmix64(static_cast<uint64_t>(seed)) ^ static_cast<uint64_t>(row))) {}
  // Python's random.uniform(a, b) = a + (b - a) * random(); a > b is allowed, as there.
  double uniform(double a, double b) { return a + (b - a) * unit(); }
  // Python's random.randint(lo, hi): both ends included.
  int64_t randint(int64_t lo, int64_t hi) {
    const int64_t n = hi - lo + 1;
    return lo + std::min<int64_t>(n - 1, static_cast<int64_t>(unit() * static_cast<double>(n)));
  }

 private:
  double unit() { return static_cast<double>(gen_() >> 11) * 0x1.0p-53; }  // 53 random bits in [0, 1)
  std::mt19937_64 gen_;
};

// One call of MaskingGenerator._mask: up to 10 attempts; returns the number of newly masked cells.
int64_t place_block(bool* mask, int64_t max_mask, const MaskParams& p, RowRng& rng) {
  int64_t delta = 0;
  for (int attempt = 0; attempt < 10; ++attempt) {
    const double area = rng.uniform(static_cast<double>(p.min_patches), static_cast<double>(max_mask));
    const double aspect = std::exp(rng.uniform(p.log_min_aspect, p.log_max_aspect));
    // std::nearbyint rounds half to even, like Python's round().
    const int64_t h = static_cast<int64_t>(std::nearbyint(std::sqrt(area * aspect)));
    const int64_t w = static_cast<int64_t>(std::nearbyint(std::sqrt(area / aspect)));
    if (w < p.width && h < p.height) {
      const int64_t top = rng.randint(0, p.height - h);
      const int64_t left = rng.randint(0, p.width - w);
      int64_t already = 0;
      for (int64_t i = top; i < top + h; ++i)
        for (int64_t j = left; j < left + w; ++j) already += mask[i * p.width + j];
      const int64_t fresh = h * w - already;
      if (fresh > 0 && fresh <= max_mask) {
        for (int64_t i = top; i < top + h; ++i)
          for (int64_t j = left; j < left + w; ++j) {
            bool& cell = mask[i * p.width + j];
            if (!cell) {
              cell = true;
              ++delta;
            }
          }
      }
    }
    if (delta > 0) break;
  }
  return delta;
}

void fill_row(bool* mask, const MaskParams& p, RowRng& rng) {
  std::fill(mask, mask + p.height * p.width, false);
  int64_t count = 0;
  while (count < p.target) {
    const int64_t max_mask = std::min(p.target - count, p.max_patches);
    const int64_t delta = place_block(mask, max_mask, p, rng);
    if (delta == 0) break;
    count += delta;
  }
}

at::Tensor block_mask_cpu(int64_t batch, int64_t height, int64_t width, int64_t num_masking_patches,
                          int64_t min_num_patches, int64_t max_num_patches, double min_aspect, double max_aspect,
                          int64_t seed) {
  BEIT_CHECK_VALUE(batch >= 0, "block_mask: batch must be >= 0, got ", batch);
  BEIT_CHECK_VALUE(height > 0 && width > 0, "block_mask: height and width must be positive, got ", height, "x", width);
  BEIT_CHECK_VALUE(num_masking_patches >= 0 && num_masking_patches <= height * width,
              "block_mask: num_masking_patches must lie in [0, height*width = ", height * width, "], got ",
              num_masking_patches);
  BEIT_CHECK_VALUE(min_num_patches >= 0, "block_mask: min_num_patches must be >= 0, got ", min_num_patches);
  BEIT_CHECK_VALUE(min_aspect > 0 && min_aspect <= max_aspect,
              "block_mask: need 0 < min_aspect <= max_aspect, got min_aspect=", min_aspect,
              ", max_aspect=", max_aspect);
  MaskParams p{height, width, num_masking_patches, min_num_patches,
               max_num_patches <= 0 ? num_masking_patches : max_num_patches,
               std::log(min_aspect), std::log(max_aspect)};
  at::Tensor out = at::empty({batch, height * width}, at::TensorOptions().dtype(at::kBool));
  bool* data = out.data_ptr<bool>();
  at::parallel_for(0, batch, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      RowRng rng(seed, b);
      fill_row(data + b * height * width, p, rng);
    }
  });
  return out;
}

}  // namespace

// A CPU kernel (what the backend chooser looks for) and, because block_mask takes no tensor argument (the
// dispatcher then finds no backend key), the same function as the fallback for calls without tensors.
TORCH_LIBRARY_IMPL(beit_fast, CPU, m) { m.impl("block_mask", &block_mask_cpu); }
TORCH_LIBRARY_IMPL(beit_fast, CompositeExplicitAutograd, m) { m.impl("block_mask", &block_mask_cpu); }

}  // namespace beit_fast
