"""The data pipeline against the reference (§4): the folder scan, the seeded RNGs, the digits / synthetic sets,
each view's interpolation, normalization and jitter, the fine-tuning and evaluation transforms, evaluation's
order, and the tokenizer view's patch order and range (tests from a mutation audit of data.py)."""
import os
import random

import numpy as np
import pytest
import torch

from test_train_data import _fresh_seed, _unit

from beit_fast.masking import MaskingGenerator
from beit_fast.train.data import DigitsDataset, EpochBatchSampler, Samples, TwoViewTransform

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _random_image(h, w, seed=None):
    from PIL import Image
    rng = np.random.default_rng(_fresh_seed() if seed is None else seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_folder_scan_lists_every_extension_any_case_nested_and_linked_folders_in_sorted_order(tmp_path):
    """Every extension torchvision's ImageFolder reads, in either case, is an image; images in nested folders
    belong to their top-level class folder; symlinked class folders and subfolders are followed; the list is
    sorted by folder then name (a stable order, whatever order the file system lists)."""
    from beit_fast.train.data import FolderDataset
    root, outside = tmp_path / "root", tmp_path / "outside"
    extensions = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")   # torchvision's
    names = [f"{i:02d}{ext.upper() if i % 2 else ext}" for i, ext in enumerate(extensions + extensions)]
    (root / "a" / "sub" / "deeper").mkdir(parents=True)
    (outside / "linked_sub").mkdir(parents=True)
    (outside / "linked_class").mkdir()
    for name in names:
        _random_image(4, 4, 0).save(root / "a" / name, format="PNG")   # the scan goes by name only
    (root / "a" / "notes.txt").write_text("not an image")
    _random_image(4, 4, 0).save(root / "a" / "sub" / "deeper" / "n.png")
    _random_image(4, 4, 0).save(root / "a" / "sub" / "m.png")
    _random_image(4, 4, 0).save(outside / "linked_sub" / "s.png")
    _random_image(4, 4, 0).save(outside / "linked_class" / "c.png")
    os.symlink(outside / "linked_sub", root / "a" / "zlink")
    os.symlink(outside / "linked_class", root / "b")
    ds = FolderDataset(str(root))
    got = [(os.path.relpath(p, root), label) for p, label in ds.samples]
    want = ([(f"a/{n}", 0) for n in sorted(names)] + [("a/sub/m.png", 0), ("a/sub/deeper/n.png", 0),
                                                      ("a/zlink/s.png", 0), ("b/c.png", 1)])
    assert ds.classes == ["a", "b"] and got == want


def test_samples_seed_python_numpy_and_torch_and_restore_each():
    """Every RNG a transform may draw from (timm's RandAugment: python and numpy; torchvision: torch) is seeded
    by (seed, epoch, index), and each global state is left as it was before the sample (not only as it would
    be after seeding)."""
    ds = DigitsDataset("train")

    def draws(img):
        return torch.tensor([random.random(), float(np.random.rand()), float(torch.rand(()))])

    samples = Samples(ds, draws, seed=_fresh_seed())
    results = []
    for k in (1, 2):
        random.seed(k)
        np.random.seed(k)
        torch.manual_seed(k)
        before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
        results.append(samples[(0, 3)][0])
        assert random.getstate() == before[0]
        assert (np.random.get_state()[1] == before[1]).all()
        assert torch.equal(torch.get_rng_state(), before[2])
    assert torch.equal(results[0], results[1])
    assert not torch.equal(samples[(0, 4)][0], results[0])


def test_each_image_of_an_epoch_gets_its_own_mask():
    """The mask seed includes the index: the images of one epoch do not all share one mask."""
    samples = Samples(DigitsDataset("train"), lambda img: torch.zeros(1), seed=_fresh_seed(),
                      mask_generator=MaskingGenerator((14, 14), 75, 16))
    masks = {tuple(samples[(0, i)][2].tolist()) for i in range(8)}
    assert len(masks) >= 6


def test_digits_split_and_pixel_range():
    """Digits: a stratified 80/20 split (1437 / 360, disjoint, 35-37 of each class held out) with pixel values
    0..16 mapped to round(v * 255 / 16)."""
    from sklearn.datasets import load_digits
    train, val = DigitsDataset("train"), DigitsDataset("val")
    assert (len(train), len(val)) == (1437, 360)
    counts = np.bincount(val.targets, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37, counts
    allowed = {round(v * 255 / 16) for v in range(17)}
    assert set(np.unique(train.images).tolist()) <= allowed and train.images.max() == 255
    d = load_digits()
    scaled = (d.images * (255 / 16)).round().astype(np.uint8)
    keys = {a.tobytes() for a in scaled}
    assert all(a.tobytes() in keys for a in val.images[:20])
    img, label = val.load(0)
    assert img.mode == "RGB" and img.size == (8, 8) and label == val.targets[0]


def test_synthetic_data_labels_and_splits():
    from beit_fast.train.data import build_dataset
    train = build_dataset("synthetic", "train", img_size=8, synthetic_size=40, num_classes=4, seed=3)
    val = build_dataset("synthetic", "val", img_size=8, synthetic_size=40, num_classes=4, seed=3)
    assert (len(train), len(val)) == (40, 10)
    assert [train.load(i)[1] for i in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert np.array_equal(np.asarray(train.load(5)[0]), np.asarray(train.load(5)[0]))          # per index
    assert not np.array_equal(np.asarray(train.load(0)[0]), np.asarray(val.load(0)[0]))        # other images


def test_pretraining_color_jitter_is_the_reference_one():
    """Reference §4: ColorJitter(0.4, 0.4, 0.4) (no hue) on the image before the crop, shared by both views."""
    t = TwoViewTransform(8, 8, (1.0, 1.0), (1.0, 1.0), hflip=0.0, color_jitter=0.4, interpolation="nearest",
                         second_interpolation="nearest")
    j = t.jitter
    assert j.brightness == j.contrast == j.saturation == (0.6, 1.4) and j.hue is None
    img = _random_image(8, 8)
    torch.manual_seed(_fresh_seed())
    outs = [t(img) for _ in range(20)]
    assert sum(not torch.allclose(tok, _unit(img), atol=1e-3) for _, tok in outs) >= 18
    for patch, tok in outs:
        torch.testing.assert_close(patch * 0.5 + 0.5, tok, rtol=0, atol=1e-6)


def test_crop_aspect_ratio_follows_ratio():
    """ratio=(4, 4), scale=(0.25, 0.25) on a 64x64 image: the crop is 64 wide and 16 high, so it spans every
    column (a ratio near 1 spans about half of them)."""
    from PIL import Image
    cols = np.tile(np.arange(0, 256, 4, dtype=np.uint8)[None, :, None], (64, 1, 3))      # column c holds 4c
    img = Image.fromarray(cols)
    t = TwoViewTransform(64, 64, (0.25, 0.25), (4.0, 4.0), hflip=0.0, color_jitter=0.0, interpolation="nearest",
                         second_interpolation="nearest")
    torch.manual_seed(_fresh_seed())
    for _ in range(5):
        _, tok = t(img)
        assert len(torch.unique(tok[0])) == 64


def test_fine_tuning_transforms_are_unilms():
    """Reference §4: fine-tuning trains with timm's create_transform(is_training=True, color_jitter=0.4,
    auto_augment='rand-m9-mstd0.5-inc1', interpolation='bicubic', re_prob=0.25, re_mode='pixel', re_count=1,
    mean, std) and evaluates with Resize(int(size / crop_pct), bicubic) + CenterCrop(size)."""
    from timm.data import create_transform
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F
    from beit_fast.train import preset
    from beit_fast.train.data import classify_transform, eval_transform
    cfg = preset("finetune", "beit_base_224")
    ref = create_transform(224, is_training=True, color_jitter=0.4, auto_augment="rand-m9-mstd0.5-inc1",
                           interpolation="bicubic", re_prob=0.25, re_mode="pixel", re_count=1,
                           mean=tuple(cfg.mean), std=tuple(cfg.std))
    assert repr(classify_transform(cfg, train=True)) == repr(ref)
    assert "mode=pixel" in repr(ref) and "interpolation=bicubic" in repr(ref)
    # evaluation, behaviourally: a 40x24 image, crop_pct 0.5 -> shorter side 32, centre 16x16
    img = _random_image(40, 24)
    for interp in ("nearest", "bicubic"):
        got = eval_transform(16, 0.5, interp, IMAGENET_MEAN, IMAGENET_STD)(img)
        small = F.resize(img, 32, InterpolationMode[interp.upper()])
        want = F.normalize(F.to_tensor(F.center_crop(small, [16, 16])), IMAGENET_MEAN, IMAGENET_STD)
        assert got.shape == (3, 16, 16)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_an_unreadable_held_out_image_is_a_marked_placeholder(tmp_path):
    """substitute=False (evaluation): an unreadable image is a placeholder with label 0 and skipped = 1, which
    engine.evaluate leaves out (no substitute: a duplicate would count twice)."""
    from beit_fast.train.data import FolderDataset
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _random_image(4, 4).save(tmp_path / "a" / "0.png")
    (tmp_path / "b" / "1.png").write_bytes(b"")
    samples = Samples(FolderDataset(str(tmp_path)), lambda img: torch.from_numpy(np.asarray(img).copy()), seed=0,
                      substitute=False)
    with pytest.warns(UserWarning, match="skipping unreadable image .*1.png"):
        img, label, skipped = samples[(0, 1)]
    assert (label, skipped) == (0, 1) and int(img.sum()) == 0
    assert samples[(0, 0)][1:] == (0, 0)


@pytest.mark.parametrize("n, batch, world", [(5, 4, 2), (11, 8, 4), (3, 8, 4), (16, 8, 2)])
def test_evaluation_order_covers_each_image_once_split_evenly(n, batch, world):
    """drop_last=False (evaluation): every image exactly once over all ranks, the tail included, each global
    batch split between the ranks as evenly as possible; len() is what iteration yields."""
    parts = [EpochBatchSampler(n, batch, seed=0, rank=r, world=world, shuffle=False, drop_last=False)
             for r in range(world)]
    got = [[i for _, i in b] for p in parts for b in p]
    assert sorted(i for b in got for i in b) == list(range(n))
    per_batch = [[len(b) for b in p] + [0] * (max(len(list(q)) for q in parts) - len(list(p))) for p in parts]
    for sizes in zip(*per_batch):
        assert max(sizes) - min(sizes) <= 1, per_batch


def test_sampler_len_is_what_it_yields_after_a_resume():
    s = EpochBatchSampler(100, 16, seed=3)
    for start in (0, 2, 6):
        s.set_epoch(1, start_batch=start)
        assert len(s) == len(list(s)) == 6 - start


def test_patchify_orders_patches_row_major_like_the_mask_grid():
    """Token k of the tokenizer's codes is the patch at row k // w, column k % w (the model's patch order and
    the flattened mask's): a transposed grid would pair every masked position with another patch's code."""
    from beit_fast.train.tokenizer import patchify
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    got = patchify(x, 2)                                          # a 2x3 grid of 2x2 patches
    assert got.shape == (2, 6, 12)
    for k in range(6):
        r, c = divmod(k, 3)
        torch.testing.assert_close(got[:, k], x[:, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2].reshape(2, 12), rtol=0, atol=0)


def test_k_means_is_fit_on_unit_range_views():
    """The k-means tokenizer encodes the tokenizer view in [0, 1] (pixel_mapping 'unit'): it must be fit on
    patches in that range too."""
    from beit_fast.train.tokenizer import KMeansTokenizer
    from beit_fast.train.tokenizer_fitting import collect_patches
    assert KMeansTokenizer.pixel_mapping == "unit"
    x = collect_patches(DigitsDataset("train"), 8, 4, max_images=16, max_patches=10 ** 6, seed=_fresh_seed())
    assert x.shape == (16 * 4, 3 * 4 * 4)
    assert x.min() >= 0 and x.min() < 0.05 and x.max() <= 1 and x.max() > 0.9


def test_a_symlink_loop_in_a_class_folder_is_walked_once(tmp_path):
    """followlinks=True and a link back to its own folder ("loop -> ."): each image once, not once per level
    until ELOOP (41 times; with two such links, 2^40 paths: the scan never ended)."""
    from beit_fast.train.data import FolderDataset
    (tmp_path / "c" / "sub").mkdir(parents=True)
    _random_image(4, 4, 0).save(tmp_path / "c" / "0.png")
    _random_image(4, 4, 0).save(tmp_path / "c" / "sub" / "1.png")
    os.symlink(".", tmp_path / "c" / "loop")
    got = [os.path.relpath(p, tmp_path) for p, _ in FolderDataset(str(tmp_path)).samples]
    assert got == ["c/0.png", "c/sub/1.png"]


def test_an_empty_class_folder_keeps_its_label_and_warns(tmp_path):
    """A class folder with no images keeps its label slot (labels follow the sorted class folders, so the
    others' labels do not shift) and the scan warns, naming it and its label (torchvision's ImageFolder
    raises; here a held-out split may lack a class, and the run goes on knowing)."""
    from beit_fast.train.data import FolderDataset
    for cls in ("a", "b", "c"):
        (tmp_path / cls).mkdir()
    _random_image(4, 4, 0).save(tmp_path / "a" / "0.png")
    _random_image(4, 4, 1).save(tmp_path / "c" / "1.png")
    with pytest.warns(UserWarning, match=r"class folder\(s\) without images: b \(label 1\)"):
        ds = FolderDataset(str(tmp_path))
    assert ds.classes == ["a", "b", "c"] and [label for _, label in ds.samples] == [0, 2]


# ------------------------------------------------------------- from a second mutation audit of data.py
def test_each_sample_seeds_numpy_by_its_own_index():
    """timm's RandAugment picks its operations with numpy: numpy is seeded per (seed, epoch, index) like python
    and torch (one fixed numpy seed gave every image the same operations)."""
    samples = Samples(DigitsDataset("train"), lambda img: torch.tensor(float(np.random.rand())), seed=_fresh_seed())
    draws = [float(samples[(e, i)][0]) for e in (0, 1) for i in range(4)]
    assert len(set(draws)) == len(draws)
    assert draws == [float(samples[(e, i)][0]) for e in (0, 1) for i in range(4)]


def test_digits_split_is_the_documented_one():
    """The held-out digits are train_test_split(test_size=0.2, random_state=0, stratify=targets)'s: another split
    would evaluate a fine-tuned demo model on images it was trained on."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    _, va = train_test_split(np.arange(len(d.target)), test_size=0.2, random_state=0, stratify=d.target)
    val = DigitsDataset("val")
    assert np.array_equal(val.targets, d.target[va])
    assert np.array_equal(val.images, (d.images[va] * (255 / 16)).round().astype(np.uint8))


def test_synthetic_images_differ_between_indices():
    from beit_fast.train.data import SyntheticDataset
    ds = SyntheticDataset(4, 8, seed=_fresh_seed())
    images = [np.asarray(ds.load(i)[0]).tobytes() for i in range(4)]
    assert len(set(images)) == 4


def test_32_bit_grayscale_above_255_is_read_as_16_bit():
    """Mode I (PIL opens some 16-bit PNGs so) with values above 255 is 16-bit data: 30000 -> 117, not the
    brightest pixel stretched to white."""
    from PIL import Image
    from beit_fast.train.data import to_rgb
    a = np.full((2, 2), 30000, dtype=np.int32)
    assert np.asarray(to_rgb(Image.fromarray(a, "I")))[0, 0].tolist() == [117] * 3


def test_a_folder_data_set_scales_16_bit_images(tmp_path):
    """FolderDataset.load goes through to_rgb: a mid-grey 16-bit PNG in a class folder is mid-grey, not white."""
    from PIL import Image
    from beit_fast.train.data import FolderDataset
    (tmp_path / "c").mkdir()
    Image.fromarray(np.full((4, 4), 30000, dtype=np.uint16)).save(tmp_path / "c" / "grey16.png")
    img, label = FolderDataset(str(tmp_path)).load(0)
    assert img.mode == "RGB" and np.asarray(img)[0, 0].tolist() == [117] * 3 and label == 0


def test_a_hidden_folder_is_not_a_class(tmp_path):
    """.ipynb_checkpoints (or .git, ...) beside the class folders is not a class: it would take a label."""
    from beit_fast.train.data import FolderDataset
    for folder in ("a", "b", ".ipynb_checkpoints"):
        (tmp_path / folder).mkdir()
        _random_image(4, 4, 0).save(tmp_path / folder / "0.png")
    ds = FolderDataset(str(tmp_path))
    assert ds.classes == ["a", "b"] and [label for _, label in ds.samples] == [0, 1]


def test_each_view_uses_its_own_interpolation():
    """The patch view is resized with `interpolation`, the tokenizer view with `second_interpolation` (reference
    §4: bicubic and lanczos); whole image, no flip or jitter, so each view is the resized image."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F
    img = _random_image(24, 24)
    for first, second in (("nearest", "bilinear"), ("bicubic", "lanczos")):
        t = TwoViewTransform(16, 12, (1.0, 1.0), (1.0, 1.0), hflip=0.0, color_jitter=0.0, interpolation=first,
                             second_interpolation=second)
        patch, tok = t(img)
        want_patch = F.to_tensor(F.resize(img, [16, 16], InterpolationMode[first.upper()]))
        want_tok = F.to_tensor(F.resize(img, [12, 12], InterpolationMode[second.upper()]))
        torch.testing.assert_close(patch * 0.5 + 0.5, want_patch, rtol=0, atol=1e-6)
        torch.testing.assert_close(tok, want_tok, rtol=0, atol=1e-6)


def test_patch_view_is_normalized_with_the_configs_mean_and_std():
    """(x - mean) / std per channel with ImageNet's constants (the default 0.5 / 0.5 cannot tell mean from std);
    the tokenizer view is not normalized."""
    img = _random_image(8, 8)
    t = TwoViewTransform(8, 8, (1.0, 1.0), (1.0, 1.0), hflip=0.0, color_jitter=0.0, interpolation="nearest",
                         second_interpolation="nearest", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    patch, tok = t(img)
    unit = _unit(img)
    torch.testing.assert_close(tok, unit, rtol=0, atol=1e-6)
    want = (unit - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(patch, want, rtol=1e-5, atol=1e-5)


def test_fine_tuning_crop_takes_scale_and_ratio_from_the_config():
    """crop_ratio (like crop_scale) reaches timm's random-resized crop: ratio (4, 4), scale (0.25, 0.25) on a
    64x64 image whose column c holds 4c is a 64 x 16 crop spanning every column."""
    import dataclasses
    from PIL import Image
    from beit_fast.train import preset
    from beit_fast.train.data import classify_transform
    cfg = dataclasses.replace(preset("finetune", "demo"), img_size=64, crop_scale=(0.25, 0.25), crop_ratio=(4.0, 4.0),
                              auto_augment=None, re_prob=0.0, color_jitter=0.0, hflip=0.0, interpolation="nearest",
                              mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    img = Image.fromarray(np.tile(np.arange(0, 256, 4, dtype=np.uint8)[None, :, None], (64, 1, 3)))
    t = classify_transform(cfg, train=True)
    torch.manual_seed(_fresh_seed())
    for _ in range(5):
        assert len(torch.unique(t(img)[0])) == 64


def test_a_global_batch_that_the_ranks_cannot_share_evenly_is_refused():
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        EpochBatchSampler(100, 16, seed=0, rank=0, world=3)


def test_num_batches_caps_an_epoch():
    """num_batches (pretraining: whole optimizer steps x accumulation; fitting a tokenizer: the images it needs)
    limits the batches of an epoch, and never past what the data holds."""
    capped = EpochBatchSampler(100, 16, seed=0, num_batches=4)
    assert len(capped) == len(list(capped)) == 4
    more = EpochBatchSampler(100, 16, seed=0, num_batches=50)
    assert len(more) == len(list(more)) == 6


@pytest.mark.parametrize("n, batch, world", [(3, 8, 4), (9, 8, 4), (14, 8, 4)])
def test_evaluation_batches_are_never_empty_and_in_order(n, batch, world):
    """A rank whose share of the uneven last batch is empty yields no batch (an empty one cannot be collated);
    shuffle=False visits the images in order; the tail's shares differ by one image at most (14 = 8 + 6 over
    4 ranks: 2, 2, 1, 1)."""
    parts = [EpochBatchSampler(n, batch, seed=_fresh_seed(), rank=r, world=world, shuffle=False, drop_last=False)
             for r in range(world)]
    batches = [list(p) for p in parts]
    assert all(b for rank in batches for b in rank)
    for rank, got in enumerate(batches):
        assert [i for b in got for _, i in b] == [i for i in range(n) if i % batch % world == rank]
    tail = [len(got[-1]) if len(got) == -(-n // batch) else 0 for got in batches]
    assert max(tail) - min(tail) <= 1, tail


def test_a_root_without_val_has_no_held_out_split(tmp_path):
    """A root of class folders is the training split only: the held-out split is not the training images
    again."""
    from beit_fast.train.data import build_dataset, folder_split
    (tmp_path / "cat").mkdir()
    _random_image(4, 4, 0).save(tmp_path / "cat" / "0.png")
    assert folder_split(str(tmp_path), "train") == str(tmp_path) and folder_split(str(tmp_path), "val") is None
    with pytest.raises(FileNotFoundError, match="no val/ folder"):
        build_dataset("folder", "val", str(tmp_path))
