"""The C++ beit_fast::block_mask (BEiT's block-wise MaskingGenerator, one seeded generator per row)."""
import math

import numpy as np
import pytest
import torch

from beit_fast._backend import extension

pytestmark = pytest.mark.skipif(extension()[0] is None, reason="beit_fast._C is not built")

# BEiT pretraining: 14x14 patches, 75 masked, blocks of at least 16 patches, aspect in [0.3, 1/0.3].
BEIT = dict(height=14, width=14, num_masking_patches=75, min_num_patches=16, max_num_patches=-1,
            min_aspect=0.3, max_aspect=1 / 0.3)


def block_mask(batch, seed, **overrides):
    a = {**BEIT, **overrides}
    return torch.ops.beit_fast.block_mask(batch, a["height"], a["width"], a["num_masking_patches"],
                                          a["min_num_patches"], a["max_num_patches"], a["min_aspect"],
                                          a["max_aspect"], seed)


def test_shape_and_dtype():
    m = block_mask(5, 0)
    assert m.shape == (5, 196) and m.dtype == torch.bool and m.device.type == "cpu"
    assert block_mask(0, 0).shape == (0, 196)


def test_seeded_reproducible_and_thread_independent():
    a = block_mask(64, 123)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        b = block_mask(64, 123)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, b)
    assert torch.equal(a[:10], block_mask(10, 123)), "a row must not depend on the batch size"


def test_different_seeds_differ():
    a, b = block_mask(32, 1), block_mask(32, 2)
    assert not torch.equal(a, b)
    assert (a != b).any(1).float().mean() > 0.9
    assert (block_mask(32, 1)[0] != block_mask(32, 1)[1]).any(), "rows of one batch must differ"


def test_max_num_patches_nonpositive_means_target():
    assert torch.equal(block_mask(16, 7, max_num_patches=0), block_mask(16, 7, max_num_patches=75))
    assert torch.equal(block_mask(16, 7, max_num_patches=-1), block_mask(16, 7, max_num_patches=75))


def test_counts_match_the_reference_distribution():
    counts = block_mask(4000, 0).sum(1).double()
    assert counts.max() <= 75
    # Simulating unilm's generator (beit_reference.md section 2): mean 74.47, exactly 75 in 67% of draws.
    assert abs(counts.mean().item() - 74.47) < 0.25, counts.mean()
    assert abs((counts == 75).double().mean().item() - 0.67) < 0.04
    assert counts.min() >= 12  # the first block alone has at least 12 cells (area >= 16, rounded sides)


@pytest.mark.parametrize("target, min_patches, max_patches", [(10, 4, -1), (40, 4, 10), (98, 16, -1)])
def test_counts_never_exceed_target(target, min_patches, max_patches):
    counts = block_mask(500, 3, num_masking_patches=target, min_num_patches=min_patches,
                        max_num_patches=max_patches).sum(1)
    assert counts.max() <= target
    assert counts.float().mean() > 0.8 * target


def test_first_block_is_a_large_component():
    """Blocks are rectangles: the one containing the first block has >= 12 cells (4-connected)."""
    from scipy import ndimage

    masks = block_mask(300, 5).view(300, 14, 14).numpy()
    for m in masks:
        labels, n = ndimage.label(m)
        sizes = np.bincount(labels.ravel())[1:]
        assert n >= 1 and sizes.max() >= 12


def test_single_block_respects_the_constraints():
    """With target = min = 16, the first block is often the whole mask: check its rectangle."""
    masks = block_mask(400, 11, num_masking_patches=16, min_num_patches=16).view(400, 14, 14)
    checked = 0
    for m in masks:
        ys, xs = torch.nonzero(m, as_tuple=True)
        h, w = (ys.max() - ys.min() + 1).item(), (xs.max() - xs.min() + 1).item()
        if h * w != m.sum().item():
            continue  # more than one block
        checked += 1
        assert h < 14 and w < 14 and 12 <= h * w <= 16
        area_max_aspect = max(h / w, w / h)
        assert area_max_aspect <= (math.sqrt(16 / 0.3) + 0.5) / (math.sqrt(16 * 0.3) - 0.5)
    assert checked > 100


@pytest.mark.parametrize("kwargs, match", [
    (dict(height=0), "height and width must be positive"),
    (dict(num_masking_patches=197), r"num_masking_patches must lie in \[0, height\*width = 196\]"),
    (dict(min_aspect=0.0), "need 0 < min_aspect <= max_aspect"),
    (dict(min_aspect=3.0, max_aspect=2.0), "need 0 < min_aspect <= max_aspect"),
    (dict(min_num_patches=-1), "min_num_patches must be >= 0"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        block_mask(2, 0, **kwargs)
    with pytest.raises(ValueError, match="batch must be >= 0"):
        block_mask(-1, 0)


def test_matches_python_masking_generator_distribution():
    """Both generators seeded from the test's seed (so BEIT_FAST_TEST_SEED replays a failure); the bounds are
    about 13 (mean count) and 5 (share of exactly 75) standard deviations."""
    from beit_fast.masking import MaskingGenerator
    py_seed, cpp_seed = (int(s) for s in torch.randint(0, 2**31 - 1, (2,)))
    gen = MaskingGenerator((14, 14), num_masking_patches=75, max_num_patches=None, min_num_patches=16,
                           min_aspect=0.3, max_aspect=1 / 0.3, seed=py_seed)
    py = np.array([np.asarray(gen()).sum() for _ in range(2000)], dtype=np.float64)
    cpp = block_mask(4000, cpp_seed).sum(1).double().numpy()
    assert py.max() <= 75
    assert abs(py.mean() - cpp.mean()) < 0.35, (py.mean(), cpp.mean())
    assert abs((py == 75).mean() - (cpp == 75).mean()) < 0.06


@pytest.mark.parametrize("seed", [0, 1, 6, 7])
def test_rows_of_neighbouring_seeds_do_not_repeat(seed):
    """Row b is seeded from (seed, b) so that a run's successive seeds draw new masks: mixing the row into the
    seed before hashing it (splitmix64(seed ^ row)) made row b of seed s+1 row b ^ 1 of seed s for even s (the
    reference's test_reference_rows_of_neighbouring_seeds_do_not_repeat, for the C++ op)."""
    a, b = block_mask(8, seed), block_mask(8, seed + 1)
    assert len({tuple(r.tolist()) for r in a}) == 8
    repeated = [(i, j) for i in range(8) for j in range(8) if torch.equal(a[i], b[j])]
    assert not repeated, f"seed {seed + 1} repeats seed {seed}'s rows (row pairs {repeated})"


@pytest.mark.parametrize("height, width, aspect", [(4, 8, 2.0), (8, 4, 0.5)], ids=["tall", "wide"])
def test_a_block_spanning_the_grid_is_never_placed(height, width, aspect):
    """unilm's bound is strict (w < width and h < height): with area 8 and aspect 2 every candidate is a 4x2
    block (2x4 for aspect 1/2), as tall (wide) as the 4-row (4-column) grid, so no block is ever placed and the
    mask stays empty, as the Python reference's does; a bound of <= placed it."""
    args = dict(height=height, width=width, num_masking_patches=8, min_num_patches=8, max_num_patches=-1,
                min_aspect=aspect, max_aspect=aspect)
    from beit_fast.masking import block_mask_ref
    ref = block_mask_ref(16, (height, width), 8, 8, None, aspect, aspect, seed=0)
    assert not ref.any()
    assert not block_mask(16, 0, **args).any()
    # one row (column) less in the grid's other side leaves the block room: it is placed then
    grown = dict(args, height=height + 1) if aspect > 1 else dict(args, width=width + 1)
    assert block_mask(16, 0, **grown).sum(1).eq(8).all()


def test_block_aspect_ratios_are_log_uniform():
    """The aspect ratio is exp(uniform(log min, log max)): for [0.3, 1/0.3], tall and wide blocks are equally
    likely (a uniform draw in [0.3, 3.33] makes 77% of them tall). Single-block masks (target = min = 16)."""
    masks = block_mask(2000, 13, num_masking_patches=16, min_num_patches=16).view(2000, 14, 14)
    tall = wide = 0
    for m in masks:
        ys, xs = torch.nonzero(m, as_tuple=True)
        h, w = (ys.max() - ys.min() + 1).item(), (xs.max() - xs.min() + 1).item()
        if h * w != m.sum().item():
            continue
        tall, wide = tall + (h > w), wide + (w > h)
    assert tall + wide > 500
    assert abs(tall - wide) < 0.15 * (tall + wide), (tall, wide)
