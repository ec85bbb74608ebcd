"""Visual tokenizers: image view -> (B, h, w) integer codes, the targets of masked image modeling.

Two kinds, one interface (`vocab_size`, `downsample` = view pixels per code, `pixel_mapping` of the view,
`forward(view) -> codes`):
  * `DalleTokenizer`: the DALL-E dVAE encoder (dall_e_encoder.py); view in [0.1, 0.9] (0.8x + 0.1), argmax
    over the logits. BEiT's 112px view gives the 14x14 grid of a 224/16 model.
  * `KMeansTokenizer`: nearest centroid of each standardized p x p patch; fit on the user's own images
    (`fit_kmeans`), no external weights; saved as .safetensors (or a torch file read with weights_only).

`encode(tokenizer, view, dtype)` runs under no_grad (and bf16 autocast when dtype is bf16) and never reads
a value back to the host; `choose_dtype` decides bf16 vs fp32 once, on one batch: bf16 only if it gives
the same codes as fp32. fp16 (only when asked for) runs the dVAE as DALL-E's own code runs it on CUDA, as
unilm's targets were made: every convolution in fp16 but the last.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn as nn

from .dall_e_encoder import load_dall_e_encoder


class DalleTokenizer(nn.Module):
    pixel_mapping = "logit_laplace"

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.vocab_size = encoder.vocab_size
        self.downsample = encoder.downsample

    def forward(self, view: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0.1, 0.9] -> (B, H/8, W/8) int64 codes."""
        return self.encoder(view).argmax(dim=1)


class KMeansTokenizer(nn.Module):
    """Codes = index of the nearest centroid to each standardized patch (flattened C x p x p)."""
    pixel_mapping = "unit"

    def __init__(self, centroids: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, patch_size: int,
                 in_chans: int = 3):
        super().__init__()
        self.patch_size, self.in_chans = int(patch_size), int(in_chans)
        self.register_buffer("centroids", centroids.float().contiguous())
        self.register_buffer("mean", mean.float().contiguous())
        self.register_buffer("std", std.float().contiguous())
        self.register_buffer("half_sqnorm", 0.5 * self.centroids.pow(2).sum(1))

    @property
    def vocab_size(self) -> int:
        return self.centroids.shape[0]

    @property
    def downsample(self) -> int:
        return self.patch_size

    def patches(self, view: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H/p * W/p, C*p*p) standardized patch vectors (row-major patch order)."""
        return (patchify(view, self.patch_size) - self.mean) / self.std

    def forward(self, view: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, H/p, W/p) int64 codes."""
        b, _, h, w = view.shape
        z = self.patches(view)
        # argmin |z - c|^2 = argmax (z.c - |c|^2 / 2)
        scores = z @ self.centroids.t().to(z.dtype) - self.half_sqnorm.to(z.dtype)
        return scores.argmax(-1).view(b, h // self.patch_size, w // self.patch_size)

    def save(self, path: str) -> None:
        from .checkpoint import atomic_torch_save, atomic_write_bytes
        meta = {"kind": "kmeans", "patch_size": str(self.patch_size), "in_chans": str(self.in_chans)}
        tensors = {"centroids": self.centroids, "mean": self.mean, "std": self.std}
        if path.endswith(".safetensors"):
            from safetensors.torch import save as save_bytes
            atomic_write_bytes(path, save_bytes({k: v.cpu().contiguous() for k, v in tensors.items()}, metadata=meta))
        else:
            atomic_torch_save({**{k: v.cpu() for k, v in tensors.items()}, "meta": meta}, path)

    @classmethod
    def load(cls, path: str) -> "KMeansTokenizer":
        t, meta = _read_kmeans(path)
        return cls(t["centroids"], t["mean"], t["std"], int(meta["patch_size"]), int(meta.get("in_chans", 3)))

    @staticmethod
    def file_patch_size(path: str) -> int:
        """Pixels per token side of a saved tokenizer (what the tokenizer view's size must be a multiple of)."""
        return int(_read_kmeans(path)[1]["patch_size"])


def _read_kmeans(path: str) -> tuple:
    """(tensors, metadata) of a k-means tokenizer file; ValueError when it is not one."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}
    else:
        try:
            t = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:   # not a torch file, a pickled module (a DALL-E encoder.pkl), a truncated file
            from .checkpoint import load_failure
            raise ValueError(f"{path} is not a k-means tokenizer file ({load_failure(e)}); make one with "
                             f"`beit-fast fit-tokenizer`") from None
        meta = t.pop("meta", {}) if isinstance(t, dict) else {}
        meta = meta if isinstance(meta, dict) else {}
    if not isinstance(t, dict) or meta.get("kind", "kmeans") != "kmeans" or "centroids" not in t \
            or "patch_size" not in meta:
        raise ValueError(f"{path} is not a k-means tokenizer file (metadata {meta}); make one with "
                         f"`beit-fast fit-tokenizer`")
    _check_kmeans(path, t, meta)
    return t, meta


def _check_kmeans(path, t, meta) -> None:
    try:
        p, c = int(meta["patch_size"]), int(meta.get("in_chans", 3))
    except (TypeError, ValueError):
        raise ValueError(f"{path}: patch_size/in_chans metadata must be integers, got {meta}") from None
    d = c * p * p
    want = {"centroids": None, "mean": (d,), "std": (d,)}
    for k, shape in want.items():
        v = t.get(k)
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            raise ValueError(f"{path}: {k!r} must be a floating-point tensor, got {type(v).__name__}"
                             + (f" {v.dtype}" if isinstance(v, torch.Tensor) else ""))
        if shape and tuple(v.shape) != shape:
            raise ValueError(f"{path}: {k!r} has shape {tuple(v.shape)}, expected {shape} (= in_chans*patch_size^2)")
    cen = t["centroids"]
    if p < 1 or cen.ndim != 2 or cen.shape[0] < 1 or cen.shape[1] != d:
        raise ValueError(f"{path}: centroids {tuple(cen.shape)} must be (vocab_size >= 1, {d}) for "
                         f"{c}x{p}x{p} patches")
    if not (torch.isfinite(cen).all() and torch.isfinite(t["mean"]).all() and (t["std"] > 0).all()
            and torch.isfinite(t["std"]).all()):
        raise ValueError(f"{path}: centroids/mean must be finite and std finite and > 0")


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)*(W/p), C*p*p), patches in row-major order like the model's patch grid."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def _cluster_sums(c: torch.Tensor, idx: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-cluster sums of z, the same bits on every run: CUDA's index_add_ accumulates with float atomics
    (order-dependent) unless deterministic algorithms are on, when torch sorts the indices instead."""
    if z.device.type != "cuda" or torch.are_deterministic_algorithms_enabled():
        return torch.zeros_like(c).index_add_(0, idx, z)
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return torch.zeros_like(c).index_add_(0, idx, z)
    finally:
        torch.use_deterministic_algorithms(False, warn_only=warn_only)


def fit_kmeans(patches: torch.Tensor, vocab_size: int, patch_size: int, in_chans: int = 3, iters: int = 25,
               seed: int = 0, chunk: int = 8192) -> KMeansTokenizer:
    """Lloyd's k-means (k-means++ start) on (N, C*p*p) raw patch vectors in [0, 1]; deterministic for a seed."""
    x = patches.float()
    n = x.shape[0]
    if n < vocab_size:
        raise ValueError(f"k-means needs at least vocab_size={vocab_size} patches, got {n}")
    mean = x.mean(0)
    std = (x.std(0) if n > 1 else torch.zeros_like(mean)).clamp_min(1e-2)   # (one patch: no sample std)
    z = (x - mean) / std
    g = torch.Generator(device="cpu").manual_seed(seed)

    def nearest(c):
        half = 0.5 * c.pow(2).sum(1)
        idx, dist = [], []
        for s in range(0, n, chunk):
            sc = z[s:s + chunk] @ c.t() - half
            best, arg = sc.max(1)
            idx.append(arg)
            dist.append(0.5 * z[s:s + chunk].pow(2).sum(1) - best)  # half squared distance
        return torch.cat(idx), torch.cat(dist)

    # k-means++ on a subsample (sequential in K; the subsample keeps it cheap for large N)
    sub = z[torch.randperm(n, generator=g)[: min(n, 32 * vocab_size)].to(z.device)]
    centers = [sub[torch.randint(len(sub), (1,), generator=g).item()]]
    d2 = (sub - centers[0]).pow(2).sum(1)
    for _ in range(1, vocab_size):
        probs = (d2 / d2.sum()).cpu() if d2.sum() > 0 else torch.full((len(sub),), 1.0 / len(sub))
        i = torch.multinomial(probs, 1, generator=g).item()
        centers.append(sub[i])
        d2 = torch.minimum(d2, (sub - sub[i]).pow(2).sum(1))
    c = torch.stack(centers)
    for _ in range(iters):
        idx, dist = nearest(c)
        sums = _cluster_sums(c, idx, z)
        counts = torch.bincount(idx, minlength=vocab_size).to(z.dtype)
        new = sums / counts.clamp_min(1).unsqueeze(1)
        empty = (counts == 0).nonzero().flatten()
        if len(empty):  # re-seed empty clusters with the worst-fit points
            far = dist.topk(len(empty)).indices
            new[empty] = z[far]
        c = new
    return KMeansTokenizer(c, mean, std, patch_size, in_chans)


def load_tokenizer(kind: str, path: str) -> nn.Module:
    """A tokenizer from a local file: kind 'dvae' (DALL-E encoder) or 'kmeans'."""
    if kind == "dvae":
        return DalleTokenizer(load_dall_e_encoder(path))
    if kind == "kmeans":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"k-means tokenizer file {path!r} not found (make one with "
                                    f"`beit-fast fit-tokenizer`, or leave tokenizer_path empty to fit one)")
        return KMeansTokenizer.load(path)
    raise ValueError(f"unknown tokenizer kind {kind!r} (kmeans | dvae)")


def encode(tokenizer: nn.Module, view: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, C, H, W) tokenizer view -> (B, h*w) int64 codes; no grad, no host sync."""
    if dtype == torch.float16 and isinstance(tokenizer, DalleTokenizer):
        view = view.half()                # the encoder's Conv2d then follows DALL-E's use_float16 flags
        ctx = nullcontext()
    elif dtype in (torch.bfloat16, torch.float16):
        ctx = torch.autocast(view.device.type, dtype=dtype)
    else:
        ctx = nullcontext()
    with torch.no_grad(), ctx:
        return tokenizer(view).flatten(1)


def choose_dtype(tokenizer: nn.Module, view: torch.Tensor, requested: str = "auto", rt=None,
                 resumed: Optional[str] = None) -> tuple:
    """(dtype, reason). 'auto': bf16 iff it reproduces the fp32 codes on this batch exactly (one host sync);
    in a distributed run bf16 only if it did so on every rank's batch; a resumed run keeps the decision
    its checkpoint recorded (`resumed`, see token_meta)."""
    if requested == "fp32":
        return torch.float32, "fp32 (requested)"
    if requested == "bf16":
        return torch.bfloat16, "bf16 (requested)"
    if requested == "fp16":
        return torch.float16, "fp16 (requested)"
    if resumed in _TOKEN_DTYPES:
        return _TOKEN_DTYPES[resumed], f"{resumed} (as decided before the run was resumed)"
    ref = encode(tokenizer, view, torch.float32)
    try:
        low = encode(tokenizer, view, torch.bfloat16)
        mismatch = (low != ref).float().mean()
    except RuntimeError as e:  # bf16 autocast unsupported for an op on this device
        low, mismatch, failure = None, torch.ones((), device=view.device), e
    if rt is not None and rt.distributed:
        from . import runtime
        mismatch = runtime.all_reduce(mismatch, rt, op="max")
    mismatch = mismatch.item()
    if mismatch == 0.0:
        return torch.bfloat16, "bf16 (identical codes to fp32 on a check batch)"
    if low is None:
        return torch.float32, f"fp32 (bf16 failed: {failure})"
    return torch.float32, f"fp32 (bf16 changed up to {mismatch:.2%} of the codes on a rank's check batch)"


_TOKEN_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def token_meta(dtype: Optional[torch.dtype]) -> dict:
    """The tokenizer dtype decision as a checkpoint records it."""
    return {} if dtype is None else {"tokenizer_dtype": str(dtype).replace("torch.", "")}
