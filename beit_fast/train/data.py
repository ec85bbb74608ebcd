"""Data: datasets, BEiT's two-view transform, block masks, and a resumable, shardable batch order.

Reproducibility by construction:
  * the order of epoch e is `randperm(n)` from a generator seeded with (seed, e): a pure function;
  * global batch j of an epoch is order[j*B:(j+1)*B] (B = global batch) and rank r of W takes the r-th
    slice of it, so a batch holds the same images whatever the number of processes;
  * every sample's augmentation and mask come from RNGs seeded with (seed, epoch, index), inside
    whichever worker draws it, so results do not depend on num_workers;
  * resuming skips the batches already consumed: the sampler starts at the saved batch, nothing is loaded
    and discarded.
Unreadable images are skipped with a warning and counted (the count travels with the batch): in training the
next readable image takes the place of one that cannot be read; in evaluation (Samples(substitute=False)) a
placeholder does, which engine.evaluate leaves out of every metric and reports as skipped_images.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import random
import warnings
from typing import Optional

import numpy as np
import torch
from PIL import Image

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def seed_for(*parts: int) -> int:
    """A 63-bit seed mixed from integers (stable across processes and Python versions)."""
    h = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


@contextlib.contextmanager
def seeded(seed: int):
    """Seed python, numpy and torch's CPU RNG for the block.

    In the main process the previous states are restored afterwards (the training loop's own streams must
    not depend on data loading); DataLoader workers own their RNGs, so they skip the (slow) restore."""
    in_worker = torch.utils.data.get_worker_info() is not None
    if not in_worker:
        py, npy, th = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.default_generator.manual_seed(seed)   # torch.manual_seed would also reseed every GPU (slow)
    try:
        yield
    finally:
        if not in_worker:
            random.setstate(py)
            np.random.set_state(npy)
            torch.default_generator.set_state(th)


# ------------------------------------------------------------------------------------------- datasets
class DigitsDataset:
    """scikit-learn's handwritten digits (1797 8x8 grey images, 10 classes) as RGB PIL images.

    Fixed split: a stratified 80/20 split with random_state=0 -> 1437 train, 360 held-out."""

    def __init__(self, split: str = "train"):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        d = load_digits()
        idx = np.arange(len(d.target))
        tr, va = train_test_split(idx, test_size=0.2, random_state=0, stratify=d.target)
        keep = tr if split == "train" else va
        self.images = (d.images[keep] * (255.0 / 16.0)).round().astype(np.uint8)  # values 0..16 -> 0..255
        self.targets = d.target[keep].astype(np.int64)
        self.classes = [str(i) for i in range(10)]

    def __len__(self):
        return len(self.targets)

    def load(self, i: int):
        return Image.fromarray(self.images[i], mode="L").convert("RGB"), int(self.targets[i])


class SyntheticDataset:
    """Random RGB images (deterministic per index) for benchmarks and tests."""

    def __init__(self, n: int, img_size: int, num_classes: int = 10, seed: int = 0):
        self.n, self.size, self.num_classes, self.seed = n, img_size, num_classes, seed
        self.classes = [str(i) for i in range(num_classes)]

    def __len__(self):
        return self.n

    def load(self, i: int):
        rng = np.random.default_rng(seed_for(self.seed, i))
        return Image.fromarray(rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8)), i % self.num_classes


class FolderDataset:
    """An ImageFolder tree (root/<class>/<image>); images that cannot be read are skipped at load time."""

    def __init__(self, root: str, classes: Optional[tuple] = None):
        """classes: the class names that define the labels (a held-out split takes train/'s, so that a class
        folder missing from it cannot shift the labels of the others); None: root's own class folders."""
        self.root = root
        self.classes, self.samples = _scan_folder(os.path.abspath(root), classes)
        if not self.samples:
            raise FileNotFoundError(
                f"no images in {root!r}: expected an ImageFolder tree {root}/<class>/<image> with extensions "
                f"{', '.join(IMG_EXTENSIONS)}")

    def __len__(self):
        return len(self.samples)

    def load(self, i: int):
        path, label = self.samples[i]
        with open(path, "rb") as f:
            return to_rgb(Image.open(f)), label


def to_rgb(img):
    """An RGB image. 16-bit grayscale (PIL modes I;16*) is scaled to 8 bits, as is 32-bit integer grayscale
    (mode I, as PIL opens some 16-bit PNGs) whose values exceed 255: PIL's convert("RGB") clips them at 255,
    turning most such images white. 32-bit float grayscale (mode F, e.g. from TIFF) whose finite values peak
    at most at 2 is taken as unit range (convert would make it black; values past 1, an interpolation's
    overshoot, clip to white), else as mode I; NaN and -inf read as 0, +inf as the finite peak."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        a = np.asarray(img, dtype=np.float64)
        finite = np.isfinite(a)
        peak = float(a[finite].max(initial=0))
        a = np.where(finite, a, np.where(a == np.inf, peak, 0.0))
        if img.mode.startswith("I;16"):
            top = 65535.0
        elif img.mode == "F" and peak <= 2:
            top = 1.0
        else:
            top = 255.0 if peak <= 255 else max(65535.0, peak)
        img = Image.fromarray(np.clip(np.rint(a / top * 255.0), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def class_folders(root: str) -> list:
    """The class folders of an ImageFolder tree (its sorted top-level subfolders; nothing below is read)."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


@functools.lru_cache(maxsize=8)
def _scan_folder(root: str, classes: Optional[tuple] = None):
    """(classes, [(path, label)]) of an ImageFolder tree, labelled by position in `classes` (default: root's
    sorted class folders); cached so the early check and the run share one scan."""
    found = class_folders(root)
    if classes is None:
        classes = tuple(found)
    extra = [c for c in found if c not in classes]
    if extra:
        raise ValueError(f"{root!r} has class folders the training split does not have: {', '.join(extra[:5])}"
                         + (f" (+{len(extra) - 5} more)" if len(extra) > 5 else "")
                         + "; labels follow the class folders of train/")
    label_of = {c: i for i, c in enumerate(classes)}
    samples = []
    for cls in found:
        walked, seen = [], set()
        for folder, subfolders, files in os.walk(os.path.join(root, cls), followlinks=True):
            real = os.path.realpath(folder)
            if real in seen:   # a symlink back to a folder already walked (a loop: "a/loop -> ."): once only
                subfolders[:] = []
                continue
            seen.add(real)
            # (pruned while walking; sorted, so that of a folder and a link to it the same one is kept everywhere)
            subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
            walked.append((folder, files))
        for folder, files in sorted(walked):
            for name in sorted(files):   # (hidden files: macOS's ._<name> metadata beside every image, ...)
                if name.lower().endswith(IMG_EXTENSIONS) and not name.startswith("."):
                    samples.append((os.path.join(folder, name), label_of[cls]))
    empty = sorted(set(found) - {classes[label] for _, label in samples})
    if empty and samples:   # (no images at all: the callers' error says so)
        warnings.warn(f"{root!r}: class folder(s) without images: "
                      + ", ".join(f"{c} (label {label_of[c]})" for c in empty[:5])
                      + (f" (+{len(empty) - 5} more)" if len(empty) > 5 else "")
                      + "; their labels stay reserved (labels follow the sorted class folders), so no image of "
                      "this split has them", stacklevel=2)
    return list(classes), samples


def folder_split(data_path: str, split: str) -> Optional[str]:
    """root/train or root/val when they exist; for train, a root holding class folders directly (not one
    that has a val/ split: its class folders would include val)."""
    sub = os.path.join(data_path, split)
    if os.path.isdir(sub):
        return sub
    if split == "train" and os.path.isdir(os.path.join(data_path, "val")):
        raise FileNotFoundError(f"{data_path!r} has a val/ folder but no train/ folder beside it: expected "
                                f"{data_path}/train/<class>/<image> and {data_path}/val/<class>/<image>")
    return data_path if split == "train" else None


def build_dataset(dataset: str, split: str, data_path: str = "", img_size: int = 32, synthetic_size: int = 1024,
                  num_classes: int = 10, seed: int = 0, classes: Optional[tuple] = None):
    """classes (folder datasets): the class names that define the labels (eval passes the fine-tuning run's);
    None: the train/ split's class folders (a held-out split takes those too, when train/ is there)."""
    if dataset == "digits":
        return DigitsDataset(split)
    if dataset == "synthetic":
        n = synthetic_size if split == "train" else max(synthetic_size // 4, 1)
        return SyntheticDataset(n, img_size, num_classes, seed=seed + (0 if split == "train" else 1))
    if dataset == "folder":
        root = folder_split(data_path, split)
        if root is None:
            raise FileNotFoundError(f"no {split}/ folder under {data_path!r}")
        train_root = os.path.join(data_path, "train")
        if classes is None and split != "train" and os.path.isdir(train_root):
            classes = class_folders(train_root)
        return FolderDataset(root, tuple(classes) if classes is not None else None)
    raise ValueError(f"unknown dataset {dataset!r} (digits | folder | synthetic)")


def check_dataset(dataset: str, data_path: str, splits=("train",)) -> None:
    """Fail fast (before any model is built) when the data cannot be found. Scans the folders afresh (the
    run that follows reuses this scan): a process that runs again after files changed sees them."""
    _scan_folder.cache_clear()
    if dataset in ("digits", "synthetic"):
        return
    if dataset != "folder":
        raise ValueError(f"unknown dataset {dataset!r} (digits | folder | synthetic)")
    if not data_path:
        raise ValueError("dataset=folder needs data_path=<root holding train/ and val/ ImageFolder trees>")
    if not os.path.isdir(data_path):
        raise FileNotFoundError(f"data_path {data_path!r} is not a folder")
    for split in splits:
        if folder_split(data_path, split) is None:
            raise FileNotFoundError(f"dataset=folder: {data_path!r} has no {split}/ subfolder")
        build_dataset("folder", split, data_path)  # raises when there are no images or unknown classes


class Subset:
    """n items spread evenly over a dataset (items k * len // n): a folder data set lists its images class by
    class, so its first n would hold only the first classes. Keeps .load, .classes and .samples (for skip
    warnings)."""

    LAYOUT = "spread"   # recorded in every checkpoint: an older beit_fast took the first n (engine.resume)

    def __init__(self, base, n: int):
        self.base, self.n = base, min(n, len(base))
        self.index = [k * len(base) // self.n for k in range(self.n)]
        samples = getattr(base, "samples", None)
        self.samples = [samples[k] for k in self.index] if samples is not None else None
        self.classes = getattr(base, "classes", None)

    def __len__(self):
        return self.n

    def load(self, i: int):
        return self.base.load(self.index[i])


# ------------------------------------------------------------------------------------------ transforms
INTERPOLATIONS = ("bicubic", "bilinear", "lanczos", "nearest")   # torchvision InterpolationMode names, lower case


def _interp(name: str):
    from torchvision.transforms import InterpolationMode
    if name not in INTERPOLATIONS:
        raise KeyError(name)
    return InterpolationMode[name.upper()]


class TwoViewTransform:
    """BEiT's pretraining views from one random crop (reference §4).

    img -> (patch view (3, S, S) normalized with mean/std, tokenizer view (3, s, s) in [0, 1] or [0.1, 0.9])."""

    def __init__(self, size: int, second_size: int, scale=(0.08, 1.0), ratio=(0.75, 4 / 3), hflip: float = 0.5,
                 color_jitter: float = 0.4, interpolation: str = "bicubic", second_interpolation: str = "lanczos",
                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), pixel_mapping: str = "unit"):
        from torchvision import transforms as T
        self.size, self.second_size, self.scale, self.ratio = size, second_size, tuple(scale), tuple(ratio)
        self.jitter = T.ColorJitter(color_jitter, color_jitter, color_jitter) if color_jitter > 0 else None
        self.hflip = hflip
        self.interp, self.second_interp = _interp(interpolation), _interp(second_interpolation)
        self.normalize = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
        self.to_tensor = T.ToTensor()
        self.pixel_mapping = pixel_mapping

    def __call__(self, img):
        from torchvision.transforms import RandomResizedCrop
        from torchvision.transforms import functional as F
        if self.jitter is not None:
            img = self.jitter(img)
        if self.hflip > 0 and torch.rand(1).item() < self.hflip:
            img = F.hflip(img)
        i, j, h, w = RandomResizedCrop.get_params(img, self.scale, self.ratio)
        patch = F.resized_crop(img, i, j, h, w, [self.size, self.size], self.interp)
        token = F.resized_crop(img, i, j, h, w, [self.second_size, self.second_size], self.second_interp)
        token = self.to_tensor(token)
        if self.pixel_mapping == "logit_laplace":
            token = 0.8 * token + 0.1   # dall_e map_pixels with eps 0.1
        return self.normalize(patch), token


def classify_transform(cfg, train: bool):
    """Fine-tuning: timm's create_transform (RandAugment, random erasing ...); eval: resize + center crop."""
    from timm.data import create_transform
    if train:
        return create_transform(
            cfg.img_size, is_training=True, scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio),
            hflip=cfg.hflip, color_jitter=cfg.color_jitter or None, auto_augment=cfg.auto_augment or None,
            interpolation=cfg.interpolation, re_prob=cfg.re_prob, re_mode="pixel", re_count=1,
            mean=tuple(cfg.mean), std=tuple(cfg.std))
    return eval_transform(cfg.img_size, cfg.crop_pct, cfg.interpolation, cfg.mean, cfg.std)


def eval_transform(img_size: int, crop_pct: Optional[float], interpolation: str, mean, std):
    """unilm's evaluation: Resize(int(size / crop_pct)) and a centre crop, crop_pct 224/256 below 384 px and 1
    from 384 px on when None."""
    from torchvision import transforms as T
    if crop_pct is None:
        crop_pct = 224 / 256 if img_size < 384 else 1.0
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return T.Compose([T.Resize(int(img_size / crop_pct), interpolation=_interp(interpolation)),
                      T.CenterCrop(img_size), T.ToTensor(), T.Normalize(tuple(mean), tuple(std))])


# --------------------------------------------------------------------------------- samples and order
class Samples(torch.utils.data.Dataset):
    """Index (epoch, i) -> (*transformed views, label, [mask], skipped), all RNG seeded by (seed, epoch, i).

    `mask_generator` (a beit_fast.masking.MaskingGenerator) gets its RNG reseeded per sample.
    substitute: an unreadable image is replaced by a readable one drawn at random (seeded as the rest; the next
    one would stand in for a whole run of unreadable files, many times an epoch) (training); else (evaluation,
    where a duplicate would count twice) by a black placeholder with label 0 and skipped = 1, which
    engine.evaluate leaves out."""

    TRIES = 50   # draws for a readable substitute: all fail only when nearly every image is unreadable

    def __init__(self, base, transform, seed: int, mask_generator=None, substitute: bool = True):
        self.base, self.transform, self.seed, self.mask_generator = base, transform, seed, mask_generator
        self.substitute = substitute

    def __len__(self):
        return len(self.base)

    def _load(self, i: int):
        """The image, or a readable one drawn at random (or, without substitute, a placeholder); returns (img,
        label, 1 if image i itself was unreadable else 0). Runs inside the sample's seeded() block."""
        tries = 1 + (self.TRIES if self.substitute and len(self.base) > 1 else 0)
        for attempt in range(tries):
            j = i if attempt == 0 else random.randrange(len(self.base))
            try:
                img, label = self.base.load(j)
                # counted once, by the index of the unreadable image itself (not by each index whose search
                # for a readable substitute passed over it)
                return img, label, int(attempt > 0)
            except Exception as e:  # corrupt, truncated or unreadable files are not fatal
                where = getattr(self.base, "samples", None)
                name = where[j][0] if where else j
                warnings.warn(f"skipping unreadable image {name}: {type(e).__name__}: {e}")
        if not self.substitute:
            return Image.new("RGB", (8, 8)), 0, 1
        raise RuntimeError(f"image {i} and the {tries - 1} drawn to replace it were all unreadable (of "
                           f"{len(self.base)} images); is the data folder intact?")

    def __getitem__(self, key):
        epoch, i = key
        with seeded(seed_for(self.seed, epoch, i)):
            img, label, skipped = self._load(i)
            views = self.transform(img)
            views = views if isinstance(views, tuple) else (views,)
            out = [*views, label]
            if self.mask_generator is not None:
                self.mask_generator.rng.seed(seed_for(self.seed, epoch, i, 1))
                out.append(torch.from_numpy(self.mask_generator().reshape(-1)))
        out.append(skipped)
        return tuple(out)


class EpochBatchSampler:
    """Yields this rank's part of each global batch as [(epoch, index), ...]; see the module docstring."""

    def __init__(self, n: int, global_batch: int, seed: int, rank: int = 0, world: int = 1,
                 shuffle: bool = True, drop_last: bool = True, num_batches: Optional[int] = None):
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by the {world} processes")
        self.n, self.global_batch, self.seed, self.rank, self.world = n, global_batch, seed, rank, world
        self.shuffle, self.drop_last = shuffle, drop_last
        full = n // global_batch if drop_last else -(-n // global_batch)
        self.num_batches = full if num_batches is None else min(num_batches, full)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(seed_for(self.seed, epoch)))

    def __len__(self):
        return self.num_batches - self.start

    def __iter__(self):
        order = self.order(self.epoch).tolist()
        per_rank = self.global_batch // self.world
        for b in range(self.start, self.num_batches):
            batch = order[b * self.global_batch:(b + 1) * self.global_batch]
            if self.drop_last:
                mine = batch[self.rank * per_rank:(self.rank + 1) * per_rank]
            else:  # eval: an uneven tail is split as evenly as possible, nothing is repeated
                mine = batch[self.rank::self.world]
            if mine:
                yield [(self.epoch, i) for i in mine]


def make_loader(samples: Samples, sampler: EpochBatchSampler, num_workers: int, pin_memory: bool = False):
    # A private generator: creating an iterator must not draw from the global torch RNG (resume parity).
    return torch.utils.data.DataLoader(
        samples, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
        persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(0))
