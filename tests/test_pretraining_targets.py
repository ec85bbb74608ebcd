"""Pretraining's targets and masks: the tokenizer encodes the tokenizer view, the masks follow the config's
masking values, the compiled run's padding counts nowhere, and a resumed run keeps its tokenizer dtype."""
import dataclasses
import math
import os

import pytest
import torch

from test_train_loop import losses, tiny_pretrain, tokenizer_file  # noqa: F401  (tokenizer_file: a fixture)

from beit_fast.train import pretrain
from beit_fast.train.checkpoint import load, step_checkpoints


@pytest.fixture(scope="module")
def small_view_tokenizer_file(tmp_path_factory):
    """A k-means tokenizer of 2px patches: its 8px view gives the 4x4 grid of a 16px image in 4px patches,
    so the tokenizer view (8px) and the patch view (16px) differ in size."""
    from beit_fast.train.data import DigitsDataset
    from beit_fast.train.tokenizer_fitting import fit_on_dataset
    path = tmp_path_factory.mktemp("tok2") / "kmeans2.safetensors"
    fit_on_dataset(DigitsDataset("train"), 8, 2, 32, max_images=128, iters=10).save(str(path))
    return str(path)


def _record_instances(monkeypatch, module, name) -> list:
    """module.name (a class) replaced by a subclass that records every instance made: -> the list."""
    made = []
    base = getattr(module, name)

    class Recording(base):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            made.append(self)

    monkeypatch.setattr(module, name, Recording)
    return made


def test_targets_are_the_codes_of_the_tokenizer_view(tmp_path, small_view_tokenizer_file, monkeypatch):
    """The training targets are the tokenizer's codes of the second view (second_img_size px, pixels in [0, 1]
    for k-means), not of the patch view the model sees (img_size px, normalized with mean / std: other
    pixels, and here another size, whose codes index other positions)."""
    from beit_fast.train import pretraining
    seen = []
    real = pretraining.encode

    def spy(tokenizer, view, dtype=torch.float32):
        seen.append(view.detach().clone())
        return real(tokenizer, view, dtype)

    monkeypatch.setattr(pretraining, "encode", spy)
    pretrain(tiny_pretrain(tmp_path / "run", epochs=1, tokenizer_path=small_view_tokenizer_file, second_img_size=8,
                           stop_at_step=2))
    assert len(seen) == 2                                          # one encode per step (batch 16)
    for view in seen:
        assert view.shape == (16, 3, 8, 8), view.shape             # second_img_size, not img_size (16)
        assert view.min() >= 0 and view.max() <= 1                 # the unit view: the patch view is in [-1, 1]
        assert view.min() == 0 and view.max() > 0.9                # digits: black background, bright strokes
    assert not torch.equal(seen[0], seen[1])


def test_masks_follow_the_configured_masking_values(tmp_path, tokenizer_file, monkeypatch):
    """The block masks are drawn with the config's num_mask_patches, min_mask_patches, max_mask_patches and
    min_mask_aspect (min_mask_patches, the smallest block, was once given num_mask_patches' place)."""
    import beit_fast.masking as masking
    made = _record_instances(monkeypatch, masking, "MaskingGenerator")
    pretrain(tiny_pretrain(tmp_path / "run", epochs=1, tokenizer_path=tokenizer_file, num_mask_patches=9,
                           min_mask_patches=3, max_mask_patches=5, min_mask_aspect=0.5, stop_at_step=1))
    assert len(made) == 1
    gen = made[0]
    assert (gen.height, gen.width) == (4, 4)                               # 16px images in 4px patches
    assert gen.num_masking_patches == 9 and gen.min_num_patches == 3 and gen.max_num_patches == 5
    assert gen.log_aspect_ratio == pytest.approx((math.log(0.5), math.log(2.0)))


def test_compiled_pretraining_ignores_the_padding_when_the_masked_counts_vary(tmp_path, tokenizer_file,
                                                                              monkeypatch):
    """14 of 16 patches with blocks of at least 2: the masking often gives an image fewer than 14, so the
    compiled run (torch.compile stubbed) really pads the batch's masked positions to 16 x 14; the padding's
    labels are ignored by the loss and its rows count nowhere in the masked-token accuracy (the mean over the
    padded rows was lower), so losses and accuracies are the eager run's."""
    from beit_fast.train import engine
    extra = {"epochs": 1, "tokenizer_path": tokenizer_file, "log_every": 1, "num_mask_patches": 14,
             "min_mask_patches": 2}
    pretrain(tiny_pretrain(tmp_path / "eager", **extra))
    calls = []
    real = engine.host_nonzero

    def spy(mask, device, pad_to=0):
        idx, n = real(mask, device, pad_to)
        calls.append((idx.shape, n, pad_to))
        return idx, n

    monkeypatch.setattr(engine, "host_nonzero", spy)
    monkeypatch.setattr(engine.torch, "compile", lambda model, **kw: model)
    pretrain(tiny_pretrain(tmp_path / "padded", compile=True, **extra))
    assert len(calls) == 4 and {(s, p) for s, _, p in calls} == {((16 * 14,), 16 * 14)}
    assert sum(n < 16 * 14 for _, n, _ in calls) >= 2, calls              # padding really happened
    for key in ("loss", "mlm_acc"):
        a, b = losses(tmp_path / "eager", key), losses(tmp_path / "padded", key)
        assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
        torch.testing.assert_close([v for _, v in b], [v for _, v in a], rtol=1e-6, atol=0)


def test_a_resumed_run_keeps_its_tokenizer_dtype(tmp_path, tokenizer_file, monkeypatch):
    """tokenizer_dtype=auto is decided once, on the first batch, and recorded in the checkpoints; a resumed
    run encodes in the recorded dtype even where a check on its own first batch would decide otherwise (its
    targets would change mid-run). The check is stubbed: fp32 in the first run, bf16 if asked again."""
    from beit_fast.train import pretraining
    real_choose, real_encode = pretraining.choose_dtype, pretraining.encode
    fresh, dtypes = [], []

    def choose(tokenizer, view, requested="auto", rt=None, resumed=None):
        if resumed is not None:
            return real_choose(tokenizer, view, requested, rt, resumed)
        return fresh[0], "stubbed check"

    def encode(tokenizer, view, dtype=torch.float32):
        dtypes.append(dtype)
        return real_encode(tokenizer, view, dtype)

    monkeypatch.setattr(pretraining, "choose_dtype", choose)
    monkeypatch.setattr(pretraining, "encode", encode)
    extra = {"epochs": 2, "tokenizer_path": tokenizer_file, "tokenizer_dtype": "auto"}
    fresh[:] = [torch.float32]
    pretrain(tiny_pretrain(tmp_path / "run", stop_at_step=3, **extra))
    assert dtypes == [torch.float32] * 3
    assert load(step_checkpoints(str(tmp_path / "run"))[-1])["metrics"]["tokenizer_dtype"] == "float32"
    fresh[:] = [torch.bfloat16]
    dtypes.clear()
    got = pretrain(tiny_pretrain(tmp_path / "run", resume="auto", **extra))
    assert got["step"] == 8 and dtypes == [torch.float32] * 5
    assert load(step_checkpoints(str(tmp_path / "run"))[-1])["metrics"]["tokenizer_dtype"] == "float32"


def test_the_two_views_take_the_configured_transform_values(tmp_path, tokenizer_file, monkeypatch):
    """Pretraining builds its two-view transform from the config: each view's own interpolation (the tokenizer
    view's second_interpolation is not the patch view's), crop scale / ratio, flip, jitter, mean / std, and the
    tokenizer's pixel mapping."""
    from torchvision.transforms import InterpolationMode
    from beit_fast.train import pretraining
    made = _record_instances(monkeypatch, pretraining, "TwoViewTransform")
    pretrain(tiny_pretrain(tmp_path / "run", epochs=1, tokenizer_path=tokenizer_file, interpolation="bilinear",
                           second_interpolation="nearest", crop_scale=(0.5, 0.9), crop_ratio=(0.7, 1.2), hflip=0.3,
                           color_jitter=0.2, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4), stop_at_step=1))
    assert len(made) == 1
    t = made[0]
    assert (t.interp, t.second_interp) == (InterpolationMode.BILINEAR, InterpolationMode.NEAREST)
    assert (t.size, t.second_size, t.scale, t.ratio, t.hflip) == (16, 16, (0.5, 0.9), (0.7, 1.2), 0.3)
    assert t.jitter.brightness == pytest.approx((0.8, 1.2)) and t.pixel_mapping == "unit"
    norm = t.normalize.transforms[1]
    assert tuple(norm.mean) == (0.4, 0.5, 0.6) and tuple(norm.std) == (0.2, 0.3, 0.4)


def test_a_vocab_size_override_that_differs_from_a_named_k_means_file_is_refused(tmp_path, tokenizer_file):
    """check() cannot know a named k-means file's codes: pretraining refuses a model_overrides.vocab_size other
    than the file's once the file is read, before the model is built (it trained a 64-way head on 32 codes);
    the file's own count is accepted."""
    from beit_fast.train.config import ConfigError
    from beit_fast.train import engine
    cfg = tiny_pretrain(tmp_path / "run", tokenizer_path=tokenizer_file, stop_at_step=1)
    bad = dataclasses.replace(cfg, model_overrides={**cfg.model_overrides, "vocab_size": 64})
    with pytest.raises(ConfigError, match=r"model_overrides.vocab_size=64 differs from the tokenizer's 32 codes"):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(engine, "build_model", lambda *a, **k: pytest.fail("the model was built"))
            pretrain(bad)
    assert not os.listdir(tmp_path / "run")
    pretrain(dataclasses.replace(cfg, model_overrides={**cfg.model_overrides, "vocab_size": 32}))
    assert (tmp_path / "run" / "log.jsonl").exists()
