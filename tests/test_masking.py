"""Block-wise masking: the Python reference's statistics and constraints, the batched API, the C++ op."""
import numpy as np
import pytest
import torch

from beit_fast import masking
from beit_fast.masking import MaskingGenerator, block_mask_ref, block_masks

# The reference algorithm's count distribution for 14x14 / 75 (beit_reference.md section 2, 20k draws):
# mean 74.47, exactly 75 in 67% of draws, never above 75.
REF_MEAN, REF_P75 = 74.47, 0.67


class _Recording(np.ndarray):
    """A mask that records every block (h, w) the generator looks at."""
    blocks: list

    def __getitem__(self, item):
        if isinstance(item, tuple) and all(isinstance(s, slice) for s in item):
            self.blocks.append((item[0].stop - item[0].start, item[1].stop - item[1].start))
        return super().__getitem__(item)


def test_reference_count_distribution():
    gen = MaskingGenerator((14, 14), 75, seed=123)
    counts = np.array([gen().sum() for _ in range(3000)])
    assert counts.max() <= 75
    assert abs(counts.mean() - REF_MEAN) < 0.3
    assert abs((counts == 75).mean() - REF_P75) < 0.04


def test_reference_blocks_obey_constraints(monkeypatch):
    per_mask = []
    real_zeros = np.zeros

    def recording_zeros(shape, dtype=float):
        arr = real_zeros(shape, dtype=dtype).view(_Recording)
        arr.blocks = []
        per_mask.append(arr.blocks)
        return arr

    monkeypatch.setattr(masking.np, "zeros", recording_zeros)
    gen = MaskingGenerator((14, 14), 75, min_num_patches=16, min_aspect=0.3, seed=7)
    for _ in range(200):
        gen()
    assert len(per_mask) == 200 and all(per_mask)     # every mask recorded its blocks
    for blocks in per_mask:
        for i, (h, w) in enumerate(blocks):
            assert 1 <= h < 14 and 1 <= w < 14
            # h = round(sqrt(area * r)), w = round(sqrt(area / r)), r in [0.3, 1/0.3]
            assert (h + 0.5) / max(w - 0.5, 1e-9) >= 0.3 and (h - 0.5) / (w + 0.5) <= 1 / 0.3
            if i == 0:  # the first block draws its area from [16, 75]; later ones from [16, budget left]
                assert (h + 0.5) * (w + 0.5) >= 16


def test_negative_seeds_do_not_repeat_positive_ones():
    """random.Random seeds an int by its absolute value: seed -s gave seed s's masks (as the C++ op does not)."""
    a, b = MaskingGenerator((14, 14), 75, seed=3), MaskingGenerator((14, 14), 75, seed=-3)
    assert not all(np.array_equal(a(), b()) for _ in range(5))
    pos, neg = block_mask_ref(4, (14, 14), 75, seed=1), block_mask_ref(4, (14, 14), 75, seed=-1)
    assert not any(torch.equal(p, n) for p, n in zip(pos, neg))
    assert torch.equal(neg, block_mask_ref(4, (14, 14), 75, seed=-1))   # still a seed


def test_reference_rows_of_neighbouring_seeds_do_not_repeat():
    """Row b of block_mask_ref is seeded from (seed, b) so that consecutive seeds (a run's successive
    batches) draw new masks: seeding row b with seed + b made seed s+1's rows seed s's rows shifted by one
    (row b of seed s+1 = row b+1 of seed s), the same masks again in a new order."""
    for s in (0, 1, 7):
        a, b = block_mask_ref(8, (14, 14), 75, seed=s), block_mask_ref(8, (14, 14), 75, seed=s + 1)
        assert len({tuple(r.tolist()) for r in a}) == 8               # the rows of one seed differ, too
        repeated = [(i, j) for i in range(8) for j in range(8) if torch.equal(a[i], b[j])]
        assert not repeated, f"seed {s + 1} repeats seed {s}'s rows (row pairs {repeated})"


def test_seeded_and_reproducible():
    a = MaskingGenerator((14, 14), 75, seed=5)
    b = MaskingGenerator((14, 14), 75, seed=5)
    assert all(np.array_equal(a(), b()) for _ in range(20))
    for backend in ("reference", "cpp"):
        if backend == "cpp" and masking.not_supported_reasons("cpp"):
            continue
        m1 = block_masks(16, (14, 14), 75, seed=3, backend=backend)
        m2 = block_masks(16, (14, 14), 75, seed=3, backend=backend)
        m3 = block_masks(16, (14, 14), 75, seed=4, backend=backend)
        assert m1.dtype == torch.bool and m1.shape == (16, 196)
        assert torch.equal(m1, m2) and not torch.equal(m1, m3)
        assert int(m1.sum(1).max()) <= 75


@pytest.mark.parametrize("size, target", [((8, 8), 25), ((24, 24), 230), ((6, 10), 20)])
def test_other_grids(size, target):
    m = block_masks(64, size, target, min_num_patches=4, seed=1, backend="reference")
    assert m.shape == (64, size[0] * size[1])
    counts = m.sum(1)
    assert counts.max() <= target and counts.float().mean() > 0.8 * target


def test_cpp_matches_reference_distribution():
    if masking.not_supported_reasons("cpp"):
        pytest.skip("; ".join(masking.not_supported_reasons("cpp")))
    cpp = block_masks(4000, (14, 14), 75, seed=11, backend="cpp").sum(1).numpy()
    ref = block_masks(4000, (14, 14), 75, seed=11, backend="reference").sum(1).numpy()
    assert cpp.max() <= 75
    assert abs(cpp.mean() - ref.mean()) < 0.3
    # count histograms close (total variation distance)
    bins = np.arange(0, 77)
    hc = np.histogram(cpp, bins)[0] / len(cpp)
    hr = np.histogram(ref, bins)[0] / len(ref)
    assert 0.5 * np.abs(hc - hr).sum() < 0.06
    # per-patch masking frequency is spatially similar (same block geometry)
    fc = block_masks(4000, (14, 14), 75, seed=12, backend="cpp").float().mean(0)
    fr = block_masks(4000, (14, 14), 75, seed=12, backend="reference").float().mean(0)
    assert (fc - fr).abs().max() < 0.06


@pytest.mark.parametrize("kwargs, match", [
    (dict(input_size=(0, 14)), "positive"),
    (dict(num_masking_patches=197), r"\[0, 196\]"),
    (dict(min_num_patches=0), "min_num_patches"),
    (dict(min_aspect=-1.0), "min_aspect"),
    (dict(min_aspect=0.0), r"min_aspect must be > 0, got 0.0"),
    (dict(input_size=(14, 14, 3)), r"input_size must be an int or two ints"),
    (dict(num_masking_patches=75.0), r"num_masking_patches must be an int, got 75.0"),
])
def test_bad_arguments(kwargs, match):
    args = dict(input_size=(14, 14), num_masking_patches=75)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        MaskingGenerator(**args)
    with pytest.raises(ValueError, match=match):
        block_masks(2, **args)


def _recorded_blocks(monkeypatch, gen, n):
    """(h, w) of every block `gen` looks at over n masks (through _Recording)."""
    blocks = []
    real_zeros = np.zeros

    def recording_zeros(shape, dtype=float):
        arr = real_zeros(shape, dtype=dtype).view(_Recording)
        arr.blocks = blocks
        return arr

    monkeypatch.setattr(masking.np, "zeros", recording_zeros)
    for _ in range(n):
        gen()
    monkeypatch.undo()
    return blocks


def test_reference_aspect_ratio_is_log_uniform(monkeypatch):
    """The aspect ratio r = h/w is drawn log-uniformly in [min_aspect, 1/min_aspect] (exp of a uniform log,
    unilm's log_aspect_ratio), so tall and wide blocks are equally likely (log r is symmetric about 0) and
    r < 1/sqrt(1/0.3) as likely as r > sqrt(1/0.3). A uniform r in [0.3, 3.33] would make 77% of the blocks
    tall. The area is fixed (min = max = 16) to keep the shape a function of r only."""
    gen = MaskingGenerator((14, 14), 16, min_num_patches=16, seed=3)
    blocks = [(h, w) for h, w in _recorded_blocks(monkeypatch, gen, 1500) if h != w]
    assert len(blocks) > 1000
    tall = sum(h > w for h, w in blocks) / len(blocks)
    assert abs(tall - 0.5) < 0.05, tall          # the share's std is below 0.016
    logr = np.log([h / w for h, w in blocks])
    assert abs(logr.mean()) < 0.05, logr.mean()  # its std is below 0.01 (uniform r: about 0.4)


def test_reference_blocks_respect_max_num_patches(monkeypatch):
    """max_num_patches bounds each block (unilm's max_mask_patches_per_block): the block's target area is
    drawn from [min_num_patches, min(budget left, max_num_patches)], so every rectangle looked at has
    (h - 1/2)(w - 1/2) <= max_num_patches (h, w are the rounded square roots of area * r and area / r); the
    masks still reach the target from several blocks."""
    gen = MaskingGenerator((14, 14), 40, min_num_patches=4, max_num_patches=8, seed=5)
    blocks = _recorded_blocks(monkeypatch, gen, 300)
    assert len(blocks) > 300 * 4
    big = [(h, w) for h, w in blocks if (h - 0.5) * (w - 0.5) > 8]
    assert not big, big[:5]
    gen = MaskingGenerator((14, 14), 40, min_num_patches=4, max_num_patches=8, seed=5)
    counts = np.array([gen().sum() for _ in range(200)])
    assert counts.max() <= 40 and counts.mean() > 0.8 * 40


def test_reference_nonpositive_max_num_patches_means_target():
    """max_num_patches None, 0 or negative: no bound per block beyond the target (as the C++ op takes -1);
    the masks are those of max_num_patches = num_masking_patches, draw for draw."""
    want = MaskingGenerator((14, 14), 75, max_num_patches=75, seed=9)
    gens = [MaskingGenerator((14, 14), 75, max_num_patches=v, seed=9) for v in (None, 0, -1)]
    for _ in range(20):
        m = want()
        assert m.sum() > 0
        for g in gens:
            assert np.array_equal(g(), m)
    assert torch.equal(block_masks(8, (14, 14), 75, max_num_patches=0, seed=2, backend="reference"),
                       block_masks(8, (14, 14), 75, max_num_patches=75, seed=2, backend="reference"))


@pytest.mark.parametrize("size", [(5, 12), (12, 5)])
def test_cpp_masks_on_a_non_square_grid(size):
    """block_masks' C++ op gets (height, width) in that order: on a non-square grid its single-block masks
    are rectangles of the (H, W) grid in row-major order (with the sides swapped they are rectangles of the
    transposed grid, which are no rectangles read as (H, W)) as often as the reference's are (72% here:
    the rest are two blocks, the first one short of the target), and the per-patch masking frequency matches
    the reference's."""
    if masking.not_supported_reasons("cpp"):
        pytest.skip("; ".join(masking.not_supported_reasons("cpp")))
    H, W = size

    def rectangles(backend):
        masks = block_masks(600, size, 6, min_num_patches=6, seed=4, backend=backend).view(600, H, W)
        count = 0
        for m in masks:
            ys, xs = torch.nonzero(m, as_tuple=True)
            h, w = (ys.max() - ys.min() + 1).item(), (xs.max() - xs.min() + 1).item()
            count += h * w == m.sum().item() and h < H and w < W
        return count
    ref = rectangles("reference")
    assert ref > 0.6 * 600 and abs(rectangles("cpp") - ref) < 60, (rectangles("cpp"), ref)
    fc = block_masks(3000, size, 20, min_num_patches=4, seed=6, backend="cpp").float().mean(0)
    fr = block_masks(3000, size, 20, min_num_patches=4, seed=6, backend="reference").float().mean(0)
    assert (fc - fr).abs().max() < 0.08, (fc - fr).abs().max()   # transposed: 0.3
