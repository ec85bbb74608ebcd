"""Data order and per-sample randomness are pure functions of (seed, epoch, index)."""
import os
import random

import numpy as np
import pytest
import torch

from beit_fast.masking import MaskingGenerator
from beit_fast.train.data import DigitsDataset, EpochBatchSampler, Samples, TwoViewTransform


def test_batch_order_is_a_pure_function_of_seed_and_epoch():
    a = EpochBatchSampler(100, 16, seed=3)
    a.set_epoch(2)
    b = EpochBatchSampler(100, 16, seed=3)
    b.set_epoch(2)
    assert list(a) == list(b) and len(list(a)) == 6                          # drop_last: 100 // 16
    b.set_epoch(3)
    assert list(a) != list(b)
    a.set_epoch(2, start_batch=4)                                             # resume: skip, don't load
    full = EpochBatchSampler(100, 16, seed=3)
    full.set_epoch(2)
    assert list(a) == list(full)[4:]


def test_ranks_split_each_global_batch():
    one = EpochBatchSampler(100, 16, seed=0)
    ranks = [EpochBatchSampler(100, 16, seed=0, rank=r, world=2) for r in (0, 1)]
    for s in [one, *ranks]:
        s.set_epoch(5)
    for whole, part0, part1 in zip(one, *ranks):
        assert whole == part0 + part1 and len(part0) == 8


def test_samples_do_not_depend_on_global_rng_and_leave_it_untouched():
    ds = DigitsDataset("train")
    samples = Samples(ds, TwoViewTransform(16, 16, (0.5, 1.0), hflip=0.5, color_jitter=0.4), seed=1,
                      mask_generator=MaskingGenerator((4, 4), 6, 2))
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    first = samples[(2, 7)]
    state = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    torch.manual_seed(123)
    again = samples[(2, 7)]
    for x, y in zip(first[:2] + first[3:4], again[:2] + again[3:4]):
        assert torch.equal(x, y)
    assert first[3].dtype == torch.bool and first[3].shape == (16,) and 0 < int(first[3].sum()) <= 6
    other = samples[(3, 7)]                                                   # next epoch: new crop and mask
    assert not torch.equal(other[0], first[0]) or not torch.equal(other[3], first[3])
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    samples[(2, 7)]
    assert torch.equal(torch.get_rng_state(), state[0]) and random.getstate() == state[1]
    assert (np.random.get_state()[1] == state[2]).all()


def test_held_out_labels_follow_the_training_class_folders(tmp_path):
    """val/ takes train/'s class list: a class folder missing from val/ cannot shift the labels of the
    others, and a class folder train/ lacks is a clear error (also at the early config check)."""
    from PIL import Image
    from beit_fast.train.data import _scan_folder, build_dataset, check_dataset

    def make(split, classes):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / c / "0.png")

    make("train", ["ant", "bee", "cat"])
    make("val", ["ant", "cat"])                    # no bee in the held-out split
    train = build_dataset("folder", "train", str(tmp_path))
    val = build_dataset("folder", "val", str(tmp_path))
    assert train.classes == val.classes == ["ant", "bee", "cat"]
    assert sorted((os.path.basename(os.path.dirname(p)), label) for p, label in val.samples) == [("ant", 0), ("cat", 2)]
    check_dataset("folder", str(tmp_path), ("train", "val"))
    make("val", ["dog"])
    _scan_folder.cache_clear()                     # the scan is cached per process; the tree changed
    with pytest.raises(ValueError, match="class folders the training split does not have: dog"):
        check_dataset("folder", str(tmp_path), ("train", "val"))


def test_16_bit_grayscale_images_are_scaled_not_clipped(tmp_path):
    """PIL's convert("RGB") clips 16-bit values at 255 (a mid-grey 16-bit PNG came out white)."""
    from PIL import Image
    from beit_fast.train.data import to_rgb
    a = np.full((4, 4), 30000, dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "grey16.png")
    img = Image.open(tmp_path / "grey16.png")
    assert img.mode.startswith("I")
    assert np.asarray(to_rgb(img))[0, 0].tolist() == [117, 117, 117]          # 30000 / 65535 * 255
    assert np.asarray(to_rgb(Image.fromarray(a.astype(np.int32) // 256, "I")))[0, 0].tolist() == [117] * 3
    assert np.asarray(to_rgb(Image.new("RGB", (2, 2), (10, 20, 30))))[0, 0].tolist() == [10, 20, 30]
    # a dark 16-bit PNG (every value below 256) is still 16-bit data, nearly black: not read as 8-bit
    Image.fromarray(np.full((4, 4), 200, dtype=np.uint16)).save(tmp_path / "dark16.png")
    assert np.asarray(to_rgb(Image.open(tmp_path / "dark16.png")))[0, 0].tolist() == [1, 1, 1]   # 200/65535*255


def test_float_grayscale_images_are_scaled_not_blackened():
    """PIL's convert("RGB") truncates mode-F values in [0, 1] to 0 or 1 of 255 (a grey image came out black)."""
    from PIL import Image
    from beit_fast.train.data import to_rgb
    img = Image.fromarray(np.full((3, 3), 0.5, dtype=np.float32), "F")
    assert img.mode == "F"
    assert np.asarray(to_rgb(img))[0, 0].tolist() == [128] * 3                # round(0.5 * 255)
    assert np.asarray(to_rgb(Image.fromarray(np.full((2, 2), 200.0, np.float32), "F")))[0, 0].tolist() == [200] * 3
    # one +inf pixel, or a slight overshoot past 1, does not turn a [0, 1] image black; NaN reads as 0
    odd = np.array([[0.5, np.inf], [1.0001, np.nan]], dtype=np.float32)
    assert np.asarray(to_rgb(Image.fromarray(odd, "F")))[..., 0].tolist() == [[128, 255], [255, 0]]


def test_each_unreadable_image_is_counted_once(tmp_path):
    """Two unreadable files side by side: index 0's draws for a readable substitute may hit file 1 too, but
    each file is one skipped image (a search that passed over its neighbour counted 3 for the epoch)."""
    from PIL import Image
    from beit_fast.train.data import FolderDataset, Samples
    (tmp_path / "c").mkdir()
    for i in range(5):
        Image.new("RGB", (4, 4), (i * 40, 0, 0)).save(tmp_path / "c" / f"{i}.png")
    for i in (0, 1):                      # sorted first: 0.png and 1.png
        (tmp_path / "c" / f"{i}.png").write_bytes(b"\x89PNG not really")
    samples = Samples(FolderDataset(str(tmp_path)), lambda img: torch.zeros(1), seed=0)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        counts = [samples[(0, i)][-1] for i in range(len(samples))]
    assert counts == [1, 1, 0, 0, 0]


def test_a_run_of_unreadable_images_is_replaced_by_images_drawn_at_random(tmp_path):
    """A class folder copied from macOS holds a ._<name> metadata file beside each image, all sorted first:
    hidden files are not images. A run of unreadable files longer than the substitute's 50 tries (the next
    index each time: the run died) is replaced by readable images drawn at random (the next readable one
    stood in for the whole run: one image many times an epoch), deterministically."""
    from PIL import Image
    from beit_fast.train.data import FolderDataset, Samples
    (tmp_path / "c").mkdir()
    for i in range(60):
        Image.new("RGB", (4, 4), (i, 0, 0)).save(tmp_path / "c" / f"img{i:03d}.png")
        (tmp_path / "c" / f"._img{i:03d}.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
        if i < 55:   # a run of 55 unreadable images first, then 5 readable ones
            (tmp_path / "c" / f"img{i:03d}.png").write_bytes(b"\x89PNG truncated")
    (tmp_path / "c" / ".ipynb_checkpoints").mkdir()        # a hidden folder's images are not the data set's
    Image.new("RGB", (4, 4)).save(tmp_path / "c" / ".ipynb_checkpoints" / "img000-checkpoint.png")
    base = FolderDataset(str(tmp_path))
    assert len(base) == 60 and not any("/." in p for p, _ in base.samples)
    samples = Samples(base, lambda img: torch.tensor(float(np.asarray(img)[0, 0, 0])), seed=0)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        got = [samples[(0, i)] for i in range(len(samples))]
        again = [samples[(0, i)] for i in range(len(samples))]
    assert [g[-1] for g in got] == [1] * 55 + [0] * 5            # each unreadable image counted once
    reds = [int(g[0]) for g in got]
    assert set(reds) <= set(range(55, 60)) and len(set(reds[:55])) == 5    # every readable one stands in
    assert reds == [int(g[0]) for g in again]                      # seeded by (seed, epoch, index)


def test_train_subset_spans_every_class_of_a_folder(tmp_path):
    """train_subset / val_subset = n take n images spread over the data set: a folder data set lists its images
    class by class, and its first n held only the first classes."""
    from PIL import Image
    from beit_fast.train.data import FolderDataset, Subset
    for c in range(10):
        (tmp_path / f"class{c}").mkdir()
        for i in range(20):
            Image.new("RGB", (4, 4), (c, i, 0)).save(tmp_path / f"class{c}" / f"{i}.png")
    sub = Subset(FolderDataset(str(tmp_path)), 50)
    labels = [sub.load(i)[1] for i in range(len(sub))]
    assert len(sub) == 50 and sorted(set(labels)) == list(range(10)) and labels.count(0) == 5
    assert [sub.samples[i][1] for i in range(len(sub))] == labels           # the names its warnings give
    assert len(Subset(FolderDataset(str(tmp_path)), 500)) == 200


def test_a_folder_scan_sees_files_added_since_the_last_check(tmp_path):
    """The scan is cached for the run that follows its check, and redone by the next check (a second run
    in the same process)."""
    from PIL import Image
    from beit_fast.train.data import build_dataset, check_dataset
    (tmp_path / "train" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "a" / "0.png")
    check_dataset("folder", str(tmp_path))
    assert len(build_dataset("folder", "train", str(tmp_path))) == 1
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "a" / "1.png")
    check_dataset("folder", str(tmp_path))
    assert len(build_dataset("folder", "train", str(tmp_path))) == 2


def test_a_root_with_val_but_no_train_folder_is_refused(tmp_path):
    import pytest
    from PIL import Image
    from beit_fast.train.data import check_dataset
    for folder in ("cat", "val/cat"):
        (tmp_path / folder).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / folder / "0.png")
    check_dataset("folder", str(tmp_path / "val"), ("train",))      # class folders directly: fine
    with pytest.raises(FileNotFoundError, match="has a val/ folder but no train/ folder"):
        check_dataset("folder", str(tmp_path), ("train",))


def test_eval_transform_follows_unilm_crop_pct():
    """Resize(int(size / crop_pct)) + CenterCrop(size); crop_pct None: 224/256 below 384 px, 1 from 384 px."""
    import pytest
    from torchvision import transforms as T

    from beit_fast.train.data import eval_transform

    def resize(size, pct):
        return next(t.size for t in eval_transform(size, pct, "bicubic", (0.5,) * 3, (0.5,) * 3).transforms
                    if isinstance(t, T.Resize))
    assert resize(224, None) == 256 and resize(384, None) == 384 and resize(512, None) == 512
    assert resize(224, 0.9) == 248 and resize(16, 1.0) == 16   # int(), as unilm: 224 / 0.9 = 248.9
    with pytest.raises(ValueError, match=r"crop_pct must be in \(0, 1\]"):
        eval_transform(224, 0.0, "bicubic", (0.5,) * 3, (0.5,) * 3)


def _fresh_seed():
    """A data seed drawn from the test's (session-seeded) torch RNG: each run checks other samples."""
    return int(torch.randint(1 << 30, ()))


def test_each_epoch_shuffles_the_images_anew():
    """order(e) is a permutation drawn from (seed, e): epoch 1 visits the images in another order than epoch 0
    (a generator seeded by the seed alone repeated one order every epoch; the (epoch, index) pairs it yields
    differ by their epoch only)."""
    seed = _fresh_seed()
    sampler = EpochBatchSampler(64, 8, seed=seed)
    orders = [sampler.order(e) for e in range(3)]
    for o in orders:
        assert sorted(o.tolist()) == list(range(64))
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])
    visited = []
    for e in (0, 1):
        sampler.set_epoch(e)
        visited.append([i for batch in sampler for _, i in batch])
    assert visited[0] == orders[0].tolist() and visited[1] == orders[1].tolist()
    assert visited[0] != visited[1]
    assert torch.equal(EpochBatchSampler(64, 8, seed=seed).order(1), orders[1])      # a pure function


def test_each_epoch_draws_a_new_mask_for_an_image():
    """A sample's block mask is seeded with (seed, epoch, index): the same image gets another mask in the next
    epoch (a mask seeded without the epoch repeated each image's mask every epoch), and the same one again
    when (epoch, index) comes back."""
    seed = _fresh_seed()
    samples = Samples(DigitsDataset("train"), lambda img: torch.zeros(1), seed=seed,
                      mask_generator=MaskingGenerator((14, 14), 75, 16))
    for i in range(4):
        masks = [samples[(e, i)][2] for e in (0, 1, 2)]
        assert all(m.shape == (196,) and 0 < int(m.sum()) <= 75 for m in masks)
        assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2]), i
        assert torch.equal(samples[(1, i)][2], masks[1])


def _grey_digit(index=0):
    """A digit image (8x8 RGB) that is not its own mirror image."""
    img, _ = DigitsDataset("train").load(index)
    a = np.asarray(img)
    assert not (a == a[:, ::-1]).all()
    return img


def _unit(img):
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255


def test_tokenizer_view_logit_laplace_mapping():
    """pixel_mapping="logit_laplace" (the DALL-E encoder's input) maps the tokenizer view x in [0, 1] to
    0.8 x + 0.1 (dall_e.map_pixels, eps 0.1), the same crop as "unit"; the patch view is unchanged."""
    from beit_fast.train.data import seeded
    img = _grey_digit()
    seed = _fresh_seed()
    views = {}
    for mapping in ("unit", "logit_laplace"):
        t = TwoViewTransform(16, 8, (0.5, 1.0), hflip=0.5, color_jitter=0.4, pixel_mapping=mapping)
        with seeded(seed):
            views[mapping] = t(img)
    (patch_u, tok_u), (patch_l, tok_l) = views["unit"], views["logit_laplace"]
    assert tok_u.shape == tok_l.shape == (3, 8, 8) and patch_u.shape == (3, 16, 16)
    assert torch.equal(patch_u, patch_l)
    torch.testing.assert_close(tok_l, 0.8 * tok_u + 0.1, rtol=0, atol=1e-6)
    assert tok_u.min() >= 0 and tok_u.max() <= 1 and tok_l.min() >= 0.1 - 1e-6 and tok_l.max() <= 0.9 + 1e-6
    assert tok_u.max() - tok_u.min() > 0.2                 # not a flat view: the mapping is tested on a range
    # the unit range's ends (a black and a white pixel, whole image, no jitter) land on 0.1 and 0.9
    whole = TwoViewTransform(8, 8, (1.0, 1.0), (1.0, 1.0), hflip=0.0, color_jitter=0.0, interpolation="nearest",
                             second_interpolation="nearest", pixel_mapping="logit_laplace")
    _, tok = whole(img)
    torch.testing.assert_close(tok, 0.8 * _unit(img) + 0.1, rtol=0, atol=1e-6)


def test_hflip_is_the_probability_of_flipping():
    """hflip=p flips the image with probability p (both views): 1 always, 0 never, 0.25 about a quarter of the
    time (a reversed comparison flipped with probability 1 - p)."""
    img = _grey_digit()
    unit = _unit(img)

    def make(p):   # the whole image at its own size, nearest: each view is the (flipped) image itself
        return TwoViewTransform(8, 8, (1.0, 1.0), (1.0, 1.0), hflip=p, color_jitter=0.0, interpolation="nearest",
                                second_interpolation="nearest")

    def flipped(t):
        patch, tok = t(img)
        torch.testing.assert_close(patch * 0.5 + 0.5, tok, rtol=0, atol=1e-6)
        if torch.equal(tok, unit):
            return False
        assert torch.equal(tok, unit.flip(-1))
        return True

    torch.manual_seed(_fresh_seed())
    assert all(flipped(make(1.0)) for _ in range(20))
    assert not any(flipped(make(0.0)) for _ in range(20))
    count = sum(flipped(make(0.25)) for _ in range(400))
    assert 50 <= count <= 150, count                      # mean 100, sd 8.7 (a flip with 1 - p: 300)


def test_both_views_come_from_one_crop():
    """BEiT's two views are one random crop resized twice: the tokenizer's targets describe the very region
    the model sees (a second crop made the targets those of another region). Same size and interpolation:
    the patch view, un-normalized, is the tokenizer view."""
    from beit_fast.train.data import SyntheticDataset
    ds = SyntheticDataset(6, 32, seed=_fresh_seed())
    for interp in ("bilinear", "bicubic"):
        t = TwoViewTransform(12, 12, (0.08, 0.5), hflip=0.5, color_jitter=0.4, interpolation=interp,
                             second_interpolation=interp)
        for i in range(len(ds)):
            patch, tok = t(ds.load(i)[0])
            torch.testing.assert_close(patch * 0.5 + 0.5, tok, rtol=0, atol=1e-6)


def test_fine_tuning_transform_takes_hflip_and_color_jitter_from_the_config():
    """classify_transform(cfg, train=True) flips with the config's hflip (0: never, 1: always; a fixed 0.5
    ignored it) and jitters colours only when color_jitter > 0."""
    import dataclasses
    from PIL import Image
    from beit_fast.train import preset
    from beit_fast.train.data import classify_transform
    rng = np.random.default_rng(_fresh_seed())
    img = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    base = dataclasses.replace(preset("finetune", "demo"), img_size=16, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
                               auto_augment=None, re_prob=0.0, color_jitter=0.0, interpolation="nearest",
                               mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    unit = _unit(img)

    def views(**kw):
        t = classify_transform(dataclasses.replace(base, **kw), train=True)
        return [t(img) for _ in range(24)]

    torch.manual_seed(_fresh_seed())
    for x in views(hflip=0.0):
        torch.testing.assert_close(x, unit, rtol=0, atol=1e-6)
    for x in views(hflip=1.0):
        torch.testing.assert_close(x, unit.flip(-1), rtol=0, atol=1e-6)
    jittered = views(hflip=0.0, color_jitter=0.4)
    assert sum(not torch.allclose(x, unit, atol=1e-3) for x in jittered) >= 20
