"""`beit-fast fit-tokenizer`: fit a k-means visual tokenizer on your own images (no external weights)."""
from __future__ import annotations

import os
import time

import torch

from . import config as config_mod
from .data import EpochBatchSampler, Samples, build_dataset, make_loader, seed_for
from .tokenizer import KMeansTokenizer, fit_kmeans, patchify


def collect_patches(dataset, view_size: int, patch_size: int, max_images: int, max_patches: int, seed: int,
                    num_workers: int = 0) -> torch.Tensor:
    """(N, C*p*p) raw patch vectors in [0, 1] from a seeded subset of the images (resize + center crop)."""
    from torchvision import transforms as T
    if view_size % patch_size:
        raise ValueError(f"tokenizer view size {view_size} is not a multiple of its patch size {patch_size}")
    transform = T.Compose([T.Resize(view_size, interpolation=T.InterpolationMode.BICUBIC),
                           T.CenterCrop(view_size), T.ToTensor()])
    n = min(len(dataset), max_images)
    sampler = EpochBatchSampler(len(dataset), 64, seed, drop_last=False, num_batches=-(-n // 64))
    loader = make_loader(Samples(dataset, transform, seed), sampler, num_workers)
    chunks, seen = [], 0
    for views, _labels, _skipped in loader:
        views = views[: n - seen]
        seen += len(views)
        chunks.append(patchify(views, patch_size).flatten(0, 1))
        if seen >= n:
            break
    x = torch.cat(chunks)
    if len(x) > max_patches:
        keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed_for(seed, 7)))[:max_patches]
        x = x[keep]
    return x


def fit_on_dataset(dataset, view_size: int, patch_size: int, vocab_size: int, max_images: int = 10000,
                   max_patches: int = config_mod.TokenizerFitConfig.max_patches, iters: int = 25, seed: int = 0,
                   device: str = "cpu", num_workers: int = 0) -> KMeansTokenizer:
    x = collect_patches(dataset, view_size, patch_size, max_images, max_patches, seed, num_workers)
    tok = fit_kmeans(x.to(device), vocab_size, patch_size, in_chans=3, iters=iters, seed=seed)
    return tok.cpu()


def fit_tokenizer(config: config_mod.TokenizerFitConfig = None) -> str:
    """Fit and save a k-means tokenizer; returns the path written."""
    cfg = config_mod.check(config if config is not None else config_mod.TokenizerFitConfig())
    if cfg.img_size % cfg.patch_size:
        raise config_mod.ConfigError(f"img_size {cfg.img_size} must be a multiple of patch_size {cfg.patch_size}")
    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else ("cpu" if cfg.device == "auto" else cfg.device)
    t0 = time.perf_counter()
    dataset = build_dataset(cfg.dataset, "train", cfg.data_path, cfg.img_size)
    tok = fit_on_dataset(dataset, cfg.img_size, cfg.patch_size, cfg.vocab_size, cfg.max_images, cfg.max_patches,
                         cfg.iters, cfg.seed, device, cfg.num_workers)
    os.makedirs(os.path.dirname(os.path.abspath(cfg.output)), exist_ok=True)
    tok.save(cfg.output)
    print(f"k-means tokenizer: {cfg.vocab_size} codes of {cfg.patch_size}x{cfg.patch_size} patches on a "
          f"{cfg.img_size}px view, fit on {min(len(dataset), cfg.max_images)} images in "
          f"{time.perf_counter() - t0:.1f} s -> {cfg.output}", flush=True)
    return cfg.output
