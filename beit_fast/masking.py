"""BEiT's block-wise masking (unilm `beit/masking_generator.py`).

`MaskingGenerator` is the pure-Python reference (the oracle); `block_masks` is the batched API that runs
the C++ op `torch.ops.beit_fast.block_mask` when the extension is built (same algorithm, a per-row
generator seeded from (seed, row), rows in parallel), else the reference.

Defaults follow BEiT's pretraining: 75 of 196 patches for 224/16, blocks of at least 16 patches, aspect
ratio in [0.3, 1/0.3], up to 10 tries per block. The count is at most the target and varies per image.
"""
from __future__ import annotations

import math
import operator
import random
from typing import Optional

import numpy as np
import torch

from ._backend import choose, common_reasons, has_kernel


def _check_args(input_size, num_masking_patches, min_num_patches, max_num_patches, min_aspect, max_aspect):
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    try:
        height, width = (int(v) for v in input_size)
    except (TypeError, ValueError):
        raise ValueError(f"input_size must be an int or two ints (height, width), got {input_size!r}") from None
    if height <= 0 or width <= 0:
        raise ValueError(f"input_size must be two positive ints (height, width), got {input_size}")
    for name, v in (("num_masking_patches", num_masking_patches), ("min_num_patches", min_num_patches)):
        try:
            operator.index(v)   # ints, numpy ints; not floats
        except TypeError:
            raise ValueError(f"{name} must be an int, got {v!r}") from None
    if not 0 <= num_masking_patches <= height * width:
        raise ValueError(f"num_masking_patches must be in [0, {height * width}] for a {height}x{width} grid, "
                         f"got {num_masking_patches}")
    if min_num_patches < 1:
        raise ValueError(f"min_num_patches must be >= 1, got {min_num_patches}")
    max_num_patches = num_masking_patches if max_num_patches is None or max_num_patches <= 0 else max_num_patches
    if not min_aspect > 0:
        raise ValueError(f"min_aspect must be > 0, got {min_aspect}")
    max_aspect = max_aspect or 1.0 / min_aspect
    if not 0 < min_aspect <= max_aspect:
        raise ValueError(f"need 0 < min_aspect <= max_aspect, got {min_aspect}, {max_aspect}")
    return height, width, int(max_num_patches), float(max_aspect)


def _seed(seed: Optional[int]):
    """random.Random's seed for `seed`: itself when None or >= 0 (as unilm seeds Python's random), else a
    string naming it (Random seeds ints by their absolute value, so -s would repeat +s's masks)."""
    return seed if seed is None or seed >= 0 else f"beit_fast.masking seed {int(seed)}"


class MaskingGenerator:
    """Callable returning one (height, width) bool numpy mask; seeded with `seed` (None = nondeterministic)."""

    def __init__(self, input_size=(14, 14), num_masking_patches: int = 75, min_num_patches: int = 16,
                 max_num_patches: Optional[int] = None, min_aspect: float = 0.3, max_aspect: Optional[float] = None,
                 seed: Optional[int] = None):
        self.height, self.width, self.max_num_patches, max_aspect = _check_args(
            input_size, num_masking_patches, min_num_patches, max_num_patches, min_aspect, max_aspect)
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.rng = random.Random(_seed(seed))

    def __repr__(self):
        return (f"MaskingGenerator({self.height}x{self.width} -> {self.num_masking_patches}, "
                f"min {self.min_num_patches}, max {self.max_num_patches} per block)")

    def _mask(self, mask: np.ndarray, max_mask_patches: int) -> int:
        delta = 0
        for _ in range(10):
            target_area = self.rng.uniform(self.min_num_patches, max_mask_patches)
            aspect = math.exp(self.rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if w < self.width and h < self.height:
                top = self.rng.randint(0, self.height - h)
                left = self.rng.randint(0, self.width - w)
                block = mask[top:top + h, left:left + w]
                new = h * w - int(block.sum())
                if 0 < new <= max_mask_patches:
                    delta += new
                    block[...] = True
            if delta > 0:
                break
        return delta

    def __call__(self) -> np.ndarray:
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < self.num_masking_patches:
            delta = self._mask(mask, min(self.num_masking_patches - count, self.max_num_patches))
            if delta == 0:
                break
            count += delta
        return mask


def block_mask_ref(batch: int, input_size=(14, 14), num_masking_patches: int = 75, min_num_patches: int = 16,
                   max_num_patches: Optional[int] = None, min_aspect: float = 0.3,
                   max_aspect: Optional[float] = None, seed: int = 0) -> torch.Tensor:
    """(batch, H*W) bool from the Python reference, row b seeded with (seed, b)."""
    rows = []
    for b in range(batch):
        gen = MaskingGenerator(input_size, num_masking_patches, min_num_patches, max_num_patches, min_aspect,
                               max_aspect, seed=seed * 1_000_003 + b)
        rows.append(torch.from_numpy(gen().reshape(-1)))
    if not rows:
        h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
        return torch.zeros((0, h * w), dtype=torch.bool)
    return torch.stack(rows)


def not_supported_reasons(backend: str, auto: bool = False) -> list[str]:
    why = common_reasons(backend, ["cpu"], auto=auto)
    if backend == "cpp" and not why and not has_kernel("beit_fast::block_mask", "CPU"):
        why.append("the extension has no CPU kernel for beit_fast::block_mask")
    return why


device_independent_reasons = not_supported_reasons   # for `info`: masks are made on the CPU for any model device


def block_masks(batch: int, input_size=(14, 14), num_masking_patches: int = 75, min_num_patches: int = 16,
                max_num_patches: Optional[int] = None, min_aspect: float = 0.3, max_aspect: Optional[float] = None,
                seed: int = 0, backend: str = "auto") -> torch.Tensor:
    """Batched block-wise masks: (batch, H*W) bool CPU tensor, reproducible for a given seed.

    backend: "auto" (the C++ op when built, else the reference), "cpp" or "reference". The two backends
    draw from different generators, so they agree in distribution, not bit for bit."""
    height, width, max_num, max_aspect = _check_args(input_size, num_masking_patches, min_num_patches,
                                                     max_num_patches, min_aspect, max_aspect)
    if batch < 0:
        raise ValueError(f"batch must be >= 0, got {batch}")
    b = choose("block_mask", backend, lambda be, auto: not_supported_reasons(be, auto), ("cpp", "reference"))
    if b == "cpp":
        return torch.ops.beit_fast.block_mask(batch, height, width, num_masking_patches, min_num_patches,
                                              max_num, min_aspect, max_aspect, int(seed))
    return block_mask_ref(batch, (height, width), num_masking_patches, min_num_patches, max_num, min_aspect,
                          max_aspect, seed)
