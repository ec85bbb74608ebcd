"""The k-means visual tokenizer: fit, save/reload, code shapes, bf16 check."""
import pytest
import torch

from beit_fast.train.tokenizer import (KMeansTokenizer, choose_dtype, encode, fit_kmeans, load_tokenizer,
                                       patchify)


def _images(n=24, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 1, size // 4, size // 4, generator=g)        # blocky images: clusterable patches
    return torch.nn.functional.interpolate(base, scale_factor=4, mode="nearest").expand(n, 3, size, size).clone()


def test_patchify_order_matches_the_patch_grid():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    p = patchify(x, 4)
    assert p.shape == (2, 4, 48)
    torch.testing.assert_close(p[1, 2].view(3, 4, 4), x[1, :, 4:8, 0:4])   # patch (row 1, col 0)


def test_fit_save_reload_gives_identical_codes(tmp_path):
    imgs = _images()
    tok = fit_kmeans(patchify(imgs, 4).flatten(0, 1), vocab_size=16, patch_size=4, iters=10, seed=0)
    codes = encode(tok, imgs)
    assert codes.shape == (24, 16) and codes.dtype == torch.int64
    assert len(codes.unique()) > 8                                     # the codebook is used
    for name in ("tok.safetensors", "tok.pt"):
        tok.save(str(tmp_path / name))
        again = load_tokenizer("kmeans", str(tmp_path / name))
        assert isinstance(again, KMeansTokenizer) and again.patch_size == 4 and again.vocab_size == 16
        assert torch.equal(encode(again, imgs), codes)
    same = fit_kmeans(patchify(imgs, 4).flatten(0, 1), vocab_size=16, patch_size=4, iters=10, seed=0)
    assert torch.equal(same.centroids, tok.centroids)                 # deterministic for a seed


def test_codes_are_nearest_centroids():
    imgs = _images(8)
    tok = fit_kmeans(patchify(imgs, 4).flatten(0, 1), vocab_size=12, patch_size=4, iters=5, seed=1)
    z = tok.patches(imgs)
    brute = torch.cdist(z, tok.centroids.expand(len(z), -1, -1)).argmin(-1)
    assert torch.equal(encode(tok, imgs), brute)


def test_fitted_centroids_are_the_means_of_their_patches():
    """Lloyd's fixed point: after enough iterations every used centroid is the mean of the (normalized)
    patches coded to it, and the fit beats its own k-means++ start (a fit whose update step did nothing
    would keep the start)."""
    imgs = _images(24)
    x = patchify(imgs, 4).flatten(0, 1)
    tok = fit_kmeans(x, vocab_size=10, patch_size=4, iters=60, seed=0)
    z, codes = tok.patches(imgs).reshape(-1, x.shape[1]), encode(tok, imgs).reshape(-1)
    for k in codes.unique():
        torch.testing.assert_close(tok.centroids[k], z[codes == k].mean(0), atol=1e-5, rtol=1e-5)
    start = fit_kmeans(x, vocab_size=10, patch_size=4, iters=0, seed=0)

    def inertia(t):
        return (t.patches(imgs).reshape(-1, x.shape[1]) - t.centroids[encode(t, imgs).reshape(-1)]).pow(2).sum()
    assert inertia(tok) < inertia(start)


def _blobs(k, per=50, seed=0):
    """k tight, well separated blobs of 48-dim patch vectors (blob j: 0.5 + 0.4 in dimension j, small noise)."""
    g = torch.Generator().manual_seed(seed)
    x, label = torch.full((k * per, 48), 0.5), torch.arange(k).repeat_interleave(per)
    x[torch.arange(k * per), label] += 0.4
    x[:, :k] += 0.002 * torch.randn(k * per, k, generator=g)
    return x, label


@pytest.mark.parametrize("k", [3, 4])
def test_kmeans_plus_plus_start_takes_one_centre_per_blob(k):
    """k-means++ weighs each point by its squared distance to the NEAREST centre chosen so far: with k tight
    blobs and k codes, the start (iters=0) has one centre in every blob, for every seed. (Weighing by the
    distance to the last centre only gave a blob chosen before as much weight as a new one: two centres in
    one blob, another blob without.)"""
    x, label = _blobs(k)
    for seed in range(8):
        tok = fit_kmeans(x, vocab_size=k, patch_size=4, iters=0, seed=seed)
        z = (x - tok.mean) / tok.std
        blob_of_centre = label[torch.cdist(tok.centroids, z).argmin(1)]
        assert sorted(blob_of_centre.tolist()) == list(range(k)), f"seed {seed}: centres in blobs {blob_of_centre}"


def test_empty_clusters_are_reseeded_with_the_worst_fit_points():
    """A cluster left empty by a step is re-seeded with the point farthest from its centre. 2000 copies of one
    patch and three outliers at growing distances: k-means++ on its subsample (96 of 2003 points) nearly
    always sees only the copies, and starts with 3 equal centres; one step later one cluster holds every point
    (its centre their mean) and the two empty ones restart at the two farthest outliers (not at copies of
    the common patch, the best-fit points)."""
    x = torch.full((2003, 48), 0.5)
    x[-3:, 0] += torch.tensor([0.1, 0.2, 0.3])
    degenerate = 0
    for seed in range(5):
        start = fit_kmeans(x, vocab_size=3, patch_size=4, iters=0, seed=seed)
        if not bool((start.centroids == start.centroids[0]).all()):
            continue        # the subsample held an outlier: no empty cluster to look at
        degenerate += 1
        tok = fit_kmeans(x, vocab_size=3, patch_size=4, iters=1, seed=seed)
        z = (x - tok.mean) / tok.std
        got = sorted(tok.centroids.tolist())
        want = sorted([z.mean(0).tolist(), z[-1].tolist(), z[-2].tolist()])
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-4, rtol=1e-5)
    assert degenerate >= 3


def test_a_malformed_tokenizer_file_is_a_clear_error(tmp_path):
    """Tokenizer files whose tensors do not fit their metadata fail on loading, naming what is wrong (they
    used to pass the config check and fail at the first batch, or give every patch code 0)."""
    tok = fit_kmeans(patchify(_images(), 4).flatten(0, 1), vocab_size=8, patch_size=4, iters=2, seed=0)
    bad = {"mean of 3 channels of 8 px patches": (dict(mean=torch.zeros(192)), r"'mean' has shape \(192,\)"),
           "1-D centroids": (dict(centroids=torch.zeros(48)), r"centroids \(48,\) must be"),
           "no codes": (dict(centroids=torch.zeros(0, 48)), "vocab_size >= 1"),
           "zero std": (dict(std=torch.zeros(48)), "std finite and > 0"),
           "integer centroids": (dict(centroids=torch.zeros(8, 48, dtype=torch.int64)), "floating-point")}
    for what, (change, match) in bad.items():
        tensors = {**dict(centroids=tok.centroids, mean=tok.mean, std=tok.std), **change}
        torch.save({**tensors, "meta": {"kind": "kmeans", "patch_size": "4", "in_chans": "3"}}, tmp_path / "bad.pt")
        with pytest.raises(ValueError, match=match):
            load_tokenizer("kmeans", str(tmp_path / "bad.pt"))
    one = fit_kmeans(torch.rand(1, 48), vocab_size=1, patch_size=4, iters=2)   # one patch: std was NaN
    assert torch.isfinite(one.std).all() and torch.isfinite(one.centroids).all()


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="fit-tokenizer"):
        load_tokenizer("kmeans", str(tmp_path / "nope.safetensors"))


def test_bf16_used_only_when_codes_are_identical():
    imgs = _images(8)
    # Well separated centroids: bf16 rounding cannot change the argmin -> bf16 is chosen.
    far = KMeansTokenizer(torch.eye(48)[:4] * 100, torch.zeros(48), torch.ones(48), 4)
    assert choose_dtype(far, imgs)[0] == torch.bfloat16
    # Centroids closer together than bf16's resolution of the scores -> fall back to fp32.
    near = KMeansTokenizer(torch.full((2, 48), 0.5) + torch.tensor([[0.0], [1e-4]]), torch.zeros(48),
                           torch.ones(48), 4)
    view = torch.full((1, 3, 4, 4), 0.50006)
    dtype, why = choose_dtype(near, view)
    assert dtype == torch.float32 and "fp32" in why
    assert choose_dtype(near, view, "bf16")[0] == torch.bfloat16       # forced
    assert choose_dtype(far, imgs, "fp32")[0] == torch.float32


class _OneCodeDiffersInBf16(torch.nn.Module):
    """A stub tokenizer: code 0 for every patch, except the first patch of the batch, whose code is 1 when
    its matmul runs in bf16 (under encode's bf16 autocast): 1 code of B * 64 differs."""
    pixel_mapping = "unit"

    def forward(self, view):
        b, _, h, w = view.shape
        codes = torch.zeros(b, h // 4, w // 4, dtype=torch.int64)
        low = (view.flatten(1)[:1, :1] @ torch.ones(1, 1)).dtype == torch.bfloat16
        codes[0, 0, 0] = int(low)
        return codes


def test_fp32_when_a_single_code_of_many_differs_in_bf16():
    """'auto' takes bf16 only when its codes are identical to fp32's: one code of 512 (0.2%, well under any
    tolerance a rate threshold would allow) changed is enough to keep fp32."""
    view = torch.rand(8, 3, 32, 32)
    stub = _OneCodeDiffersInBf16()
    ref, low = encode(stub, view), encode(stub, view, torch.bfloat16)
    assert ref.numel() == 512 and int((ref != low).sum()) == 1              # the stub does what it says
    dtype, why = choose_dtype(stub, view)
    assert dtype == torch.float32, why
    assert "0.20%" in why


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fit_on_cuda_is_deterministic_for_a_seed():
    """Many patches per cluster: float atomics would add them in a different order on each run."""
    g = torch.Generator().manual_seed(1)
    patches = torch.rand(200_000, 48, generator=g).cuda()
    before = torch.are_deterministic_algorithms_enabled()
    fits = [fit_kmeans(patches, vocab_size=64, patch_size=4, iters=5, seed=0).centroids for _ in range(3)]
    assert all(torch.equal(f, fits[0]) for f in fits[1:])
    assert torch.are_deterministic_algorithms_enabled() == before      # the global switch is restored


def test_a_tokenizer_file_with_non_finite_values_or_a_wrong_code_width_is_refused(tmp_path):
    """A NaN / inf in the centroids, mean or std (a fit that diverged, a corrupted file) would make every code
    the same or arbitrary without a word; centroids of another patch size fail at the first batch. Both are
    refused on loading, in either file format."""
    tok = KMeansTokenizer(torch.randn(8, 48), torch.rand(48), torch.rand(48) + 0.5, 4)
    meta = {"kind": "kmeans", "patch_size": "4", "in_chans": "3"}
    for name in ("bad.pt", "bad.safetensors"):
        for key in ("centroids", "mean", "std"):
            for value in (float("nan"), float("inf")):
                tensors = dict(centroids=tok.centroids.clone(), mean=tok.mean.clone(), std=tok.std.clone())
                tensors[key].view(-1)[5] = value
                _save_kmeans_file(tmp_path / name, tensors, meta)
                with pytest.raises(ValueError, match="must be finite"):
                    load_tokenizer("kmeans", str(tmp_path / name))
        wide = dict(centroids=torch.randn(8, 192), mean=tok.mean, std=tok.std)    # 8 px patches' width
        _save_kmeans_file(tmp_path / name, wide, meta)
        with pytest.raises(ValueError, match=r"centroids \(8, 192\) must be \(vocab_size >= 1, 48\)"):
            load_tokenizer("kmeans", str(tmp_path / name))


def _save_kmeans_file(path, tensors, meta):
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    else:
        torch.save({**tensors, "meta": meta}, path)


def test_fit_kmeans_needs_one_patch_per_code():
    fit_kmeans(torch.rand(8, 48), vocab_size=8, patch_size=4, iters=1)              # as many patches as codes
    with pytest.raises(ValueError, match="at least vocab_size=8 patches, got 7"):
        fit_kmeans(torch.rand(7, 48), vocab_size=8, patch_size=4, iters=1)


def test_chunked_assignment_gives_the_unchunked_fit():
    """fit_kmeans assigns the patches in chunks (8192 by default, more on any real data set): the fit must not
    depend on the chunk size, the re-seeding of empty clusters (which ranks all patches by their distance)
    included. Data of test_empty_clusters_are_reseeded_with_the_worst_fit_points (outliers in the last
    chunk), and random patches."""
    x = torch.full((2003, 48), 0.5)
    x[-3:, 0] += torch.tensor([0.1, 0.2, 0.3])
    for data, k, iters in ((x, 3, 1), (torch.rand(2000, 48), 16, 3)):
        for seed in range(2):
            whole = fit_kmeans(data, vocab_size=k, patch_size=4, iters=iters, seed=seed)
            chunked = fit_kmeans(data, vocab_size=k, patch_size=4, iters=iters, seed=seed, chunk=500)
            torch.testing.assert_close(chunked.centroids, whole.centroids, atol=1e-5, rtol=1e-5)


def test_codes_of_a_non_square_view_follow_its_patch_grid():
    """(B, C, H, W) -> (B, H/p, W/p): rows of the code grid are rows of patches, also when H != W."""
    tok = KMeansTokenizer(torch.randn(6, 48), torch.zeros(48), torch.ones(48), 4)
    view = torch.rand(2, 3, 8, 12)
    codes = tok(view)
    assert codes.shape == (2, 2, 3)
    assert torch.equal(codes[1, 1, 2], tok(view[1:, :, 4:8, 8:12]).flatten()[0])


class _Bf16Fails(torch.nn.Module):
    """A stub tokenizer whose forward raises under bf16 autocast (an op with no bf16 kernel on a device)."""
    pixel_mapping = "unit"

    def forward(self, view):
        if torch.is_autocast_enabled(view.device.type) and \
                torch.get_autocast_dtype(view.device.type) == torch.bfloat16:
            raise RuntimeError("no bf16 kernel for this op")
        b, _, h, w = view.shape
        return torch.zeros(b, h // 4, w // 4, dtype=torch.int64)


def test_auto_keeps_fp32_when_bf16_fails():
    dtype, why = choose_dtype(_Bf16Fails(), torch.rand(2, 3, 8, 8))
    assert dtype == torch.float32 and "bf16 failed" in why and "no bf16 kernel" in why, why


def test_auto_takes_bf16_only_when_every_rank_got_identical_codes(monkeypatch):
    """Distributed: the mismatch is max-reduced over the ranks, so all ranks decide alike: this rank's codes are
    identical in bf16, another rank's are not (simulated all-reduce) -> fp32 here too."""
    from beit_fast.train import runtime
    imgs = _images(8)
    far = KMeansTokenizer(torch.eye(48)[:4] * 100, torch.zeros(48), torch.ones(48), 4)
    rt = runtime.Runtime(torch.device("cpu"), rank=0, world=2)
    seen = []

    def all_reduce(t, rt, op="mean"):
        seen.append((float(t), op))
        return torch.maximum(t, torch.tensor(others))
    monkeypatch.setattr(runtime, "all_reduce", all_reduce)
    for others, want in ((0.0, torch.bfloat16), (0.01, torch.float32)):
        seen.clear()
        dtype, why = choose_dtype(far, imgs, rt=rt)
        assert dtype == want and seen == [(0.0, "max")], (others, why, seen)
    assert "1.00%" in why


def test_fit_tokenizer_fits_on_max_images_and_max_patches_with_its_settings(tmp_path, monkeypatch):
    """`fit-tokenizer` collects the patches of at most max_images images (the loader's batches are 64), keeps
    at most max_patches of them, and fits with its own vocab_size / iters / seed."""
    from beit_fast.train import tokenizer_fitting
    from beit_fast.train.config import TokenizerFitConfig
    from beit_fast.train.data import DigitsDataset
    x = tokenizer_fitting.collect_patches(DigitsDataset("train"), 16, 4, max_images=10, max_patches=10**6, seed=3)
    assert x.shape == (10 * 16, 48) and 0 <= float(x.min()) and float(x.max()) <= 1
    with pytest.raises(ValueError, match="view size 18 is not a multiple of its patch size 4"):
        tokenizer_fitting.collect_patches(DigitsDataset("train"), 18, 4, max_images=10, max_patches=100, seed=3)
    calls = []
    real = tokenizer_fitting.fit_kmeans
    monkeypatch.setattr(tokenizer_fitting, "fit_kmeans",
                        lambda x, *a, **k: calls.append((tuple(x.shape), a, k)) or real(x, *a, **k))
    cfg = TokenizerFitConfig(output=str(tmp_path / "t.safetensors"), img_size=16, patch_size=4, vocab_size=8,
                             max_images=10, max_patches=100, iters=2, seed=5, device="cpu", num_workers=0)
    tokenizer_fitting.fit_tokenizer(cfg)
    assert calls == [((100, 48), (8, 4), {"in_chans": 3, "iters": 2, "seed": 5})]
    assert load_tokenizer("kmeans", cfg.output).vocab_size == 8
