"""Checkpoint loading: timm/unilm, Hugging Face (4.x file names and 5.x in-memory names), mmseg, files."""
import os
import pickle
import warnings

import pytest
import torch

from beit_fast.models import create_model, load_checkpoint
from beit_fast.relpos import num_relative_distance, resize_rel_pos_bias_table
from test_model import randomize_, rel_err

transformers = pytest.importorskip("transformers")

X = lambda b=2: torch.randn(b, 3, 32, 32)  # noqa: E731


def _same_outputs(a, b, *args):
    a.eval(), b.eval()
    with torch.no_grad():
        torch.testing.assert_close(a(*args), b(*args), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_file_round_trip(tmp_path, suffix):
    src = randomize_(create_model("beit_test_patch4_32", attn_impl="eager"))
    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(src.state_dict(), str(path))
    else:
        torch.save({"model": src.state_dict(), "epoch": 3}, path)
    dst = create_model("beit_test_patch4_32", attn_impl="eager")
    report = load_checkpoint(dst, path, strict=True)
    assert not report.missing_keys and not report.unexpected_keys
    _same_outputs(src, dst, X())


def test_a_folder_loads_its_weights_file(tmp_path):
    """load_checkpoint takes the folders --init takes: a Hugging Face model folder (its model.safetensors) and a
    beit_fast run (its latest step checkpoint); it said "checkpoint file not found" for both."""
    from safetensors.torch import save_file
    old, new = (randomize_(create_model("beit_test_patch4_32", attn_impl="eager")) for _ in range(2))
    (tmp_path / "hf").mkdir()
    save_file(new.state_dict(), str(tmp_path / "hf" / "model.safetensors"))
    (tmp_path / "run").mkdir()
    torch.save({"model": old.state_dict(), "step": 1}, tmp_path / "run" / "checkpoint-0000001.pt")
    torch.save({"model": new.state_dict(), "step": 2}, tmp_path / "run" / "checkpoint-0000002.pt")
    for folder in ("hf", "run"):
        dst = create_model("beit_test_patch4_32", attn_impl="eager")
        load_checkpoint(dst, tmp_path / folder, strict=True)
        _same_outputs(new, dst, X())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_checkpoint(create_model("beit_test_patch4_32"), tmp_path)


def _unilm_pretraining_state_dict(mim):
    """What unilm's run_beit_pretraining saves: {'model': sd} with persistent index buffers."""
    sd = dict(mim.state_dict())
    sd["rel_pos_bias.relative_position_index"] = mim.rel_pos_bias.relative_position_index.clone()
    return {"model": sd, "optimizer": {}, "epoch": 799}


def test_unilm_pretraining_checkpoint_into_finetuning_model():
    mim = randomize_(create_model("beit_test_patch4_32_mim"))
    ck = _unilm_pretraining_state_dict(mim)
    cls = create_model("beit_test_patch4_32")
    with pytest.warns(UserWarning, match="4 model keys missing from the checkpoint .fc_norm.weight"):
        report = load_checkpoint(cls, ck, warn=True)   # a new head, the pretraining heads unused: said once
    shared = mim.rel_pos_bias.relative_position_bias_table
    for blk, mblk in zip(cls.blocks, mim.blocks):
        torch.testing.assert_close(blk.attn.relative_position_bias_table, shared)
        torch.testing.assert_close(blk.attn.qkv.weight, mblk.attn.qkv.weight)
    assert set(report.missing_keys) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    assert set(report.unexpected_keys) == {"mask_token", "norm.weight", "norm.bias", "lm_head.weight", "lm_head.bias"}
    assert any("expanded" in n for n in report.notes)
    with pytest.raises(ValueError, match="strict"):
        load_checkpoint(create_model("beit_test_patch4_32"), ck, strict=True)


def test_shared_and_own_tables_load_as_their_sum():
    """A model with a shared table and tables of its own adds both to its logits; loaded into the fine-tuning
    layout (own tables only) each block's table is their sum (the shared one was silently dropped)."""
    src = randomize_(create_model("beit_test_patch4_32", use_shared_rel_pos_bias=True, attn_impl="eager"))
    dst = create_model("beit_test_patch4_32", attn_impl="eager")
    report = load_checkpoint(dst, src.state_dict(), strict=True)
    assert any("added to the 2 blocks' own tables" in n for n in report.notes), report.notes
    _same_outputs(src, dst, X())


@pytest.mark.parametrize("wrap", ["module", "module_prefix", "mmseg"])
def test_wrappers(wrap):
    src = randomize_(create_model("beit_test_patch4_32", attn_impl="eager"))
    sd = src.state_dict()
    if wrap == "module":
        ck = {"module": sd}
    elif wrap == "module_prefix":
        ck = {f"module.{k}": v for k, v in sd.items()}
    else:
        ck = {"state_dict": {**{f"backbone.{k}": v for k, v in sd.items() if not k.startswith(("head", "fc_norm"))},
                             "decode_head.conv_seg.weight": torch.randn(150, 64, 1, 1)}}
    dst = create_model("beit_test_patch4_32", attn_impl="eager")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        report = load_checkpoint(dst, ck)
    assert [str(w.message).count("checkpoint keys unused") for w in seen] == ([1] if wrap == "mmseg" else [])
    if wrap == "mmseg":
        assert report.unexpected_keys == ["decode_head.conv_seg.weight"]
        assert set(report.missing_keys) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
        torch.testing.assert_close(dst.blocks[1].attn.qkv.weight, src.blocks[1].attn.qkv.weight)
    else:
        _same_outputs(src, dst, X())


def _hf_config(**kw):
    return transformers.BeitConfig(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=256, layer_norm_eps=1e-6,
                                   hidden_act="gelu", layer_scale_init_value=0.1, drop_path_rate=0.0,
                                   attn_implementation="eager", **kw)


def test_hf_classification_parity():
    hf = transformers.BeitForImageClassification(_hf_config(use_relative_position_bias=True, num_labels=10,
                                                            use_mean_pooling=True)).eval()
    randomize_(hf)
    ours = create_model("beit_test_patch4_32", attn_impl="eager").eval()
    report = load_checkpoint(ours, hf.state_dict(), strict=True)
    assert report.source_format.startswith("Hugging Face")
    x = X(3)
    with torch.no_grad():
        assert rel_err(ours(x), hf(pixel_values=x).logits) < 1e-4


def test_hf_masked_image_modeling_parity():
    hf = transformers.BeitForMaskedImageModeling(_hf_config(use_mask_token=True, use_shared_relative_position_bias=True,
                                                            vocab_size=512)).eval()
    randomize_(hf)
    ours = create_model("beit_test_patch4_32_mim", attn_impl="eager").eval()
    load_checkpoint(ours, hf.state_dict(), strict=True)
    x, mask = X(2), torch.rand(2, 64) < 0.4
    with torch.no_grad():
        ref = hf(pixel_values=x, bool_masked_pos=mask).logits  # HF projects all 64 tokens
        assert rel_err(ours(x, mask), ref[mask]) < 1e-4


def test_hf_mim_without_mean_pooling_reports_the_encoder_norm():
    """A transformers MIM model with use_mean_pooling=False has the encoder's final LayerNorm and the head's:
    both mapped to norm.* and one silently overwrote the other; the encoder's is reported as unexpected."""
    hf = transformers.BeitForMaskedImageModeling(_hf_config(use_mask_token=True, use_shared_relative_position_bias=True,
                                                            vocab_size=512, use_mean_pooling=False)).eval()
    randomize_(hf)
    ours = create_model("beit_test_patch4_32_mim", attn_impl="eager").eval()
    with pytest.warns(UserWarning, match="beit.layernorm"):
        report = load_checkpoint(ours, hf.state_dict())
    assert sorted(report.unexpected_keys) == ["beit.layernorm.bias", "beit.layernorm.weight"]
    assert torch.equal(ours.norm.weight, hf.layernorm.weight)           # the head's norm, as the model's


def test_safetensors_shared_tensors_load_under_every_name(tmp_path):
    """safetensors.torch.save_model stores a shared tensor once and names its aliases in the metadata:
    load_checkpoint restores every alias (they came back missing)."""
    from safetensors.torch import save_model
    src = randomize_(create_model("beit_test_patch4_32", attn_impl="eager"))
    for blk in src.blocks[1:]:   # one table object for every block
        blk.attn.relative_position_bias_table = src.blocks[0].attn.relative_position_bias_table
    save_model(src, str(tmp_path / "shared.safetensors"))
    dst = create_model("beit_test_patch4_32", attn_impl="eager")
    report = load_checkpoint(dst, str(tmp_path / "shared.safetensors"), strict=True)
    assert report.missing_keys == []
    for blk in dst.blocks:
        assert torch.equal(blk.attn.relative_position_bias_table, src.blocks[0].attn.relative_position_bias_table)


def unilm_to_hf4(sd):
    """transformers 4.x names, written from the published conversion table (beit_reference.md 10.3)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            p = f"beit.encoder.layer.{i}."
            if rest == "attn.qkv.weight":
                q, kk, vv = v.chunk(3)
                out[p + "attention.attention.query.weight"] = q
                out[p + "attention.attention.key.weight"] = kk
                out[p + "attention.attention.value.weight"] = vv
                continue
            rest = {"attn.q_bias": "attention.attention.query.bias", "attn.v_bias": "attention.attention.value.bias",
                    "attn.relative_position_bias_table":
                        "attention.attention.relative_position_bias.relative_position_bias_table",
                    "gamma_1": "lambda_1", "gamma_2": "lambda_2"}.get(rest, rest)
            for a, b in [("norm1.", "layernorm_before."), ("norm2.", "layernorm_after."),
                         ("attn.proj.", "attention.output.dense."), ("mlp.fc1.", "intermediate.dense."),
                         ("mlp.fc2.", "output.dense.")]:
                rest = rest.replace(a, b) if rest.startswith(a) else rest
            out[p + rest] = v
        elif k in ("cls_token", "mask_token"):
            out[f"beit.embeddings.{k}"] = v
        elif k.startswith("patch_embed.proj."):
            out["beit.embeddings.patch_embeddings.projection." + k.split(".")[-1]] = v
        elif k.startswith("fc_norm."):
            out["beit.pooler.layernorm." + k.split(".")[-1]] = v
        elif k.startswith("head."):
            out["classifier." + k.split(".")[-1]] = v
        elif k == "rel_pos_bias.relative_position_bias_table":
            out["beit.encoder.relative_position_bias.relative_position_bias_table"] = v
        elif k.startswith("norm."):
            out["layernorm." + k.split(".")[-1]] = v
        else:
            out[k] = v
    return out


@pytest.mark.parametrize("name", ["beit_test_patch4_32", "beit_test_patch4_32_mim"])
def test_hf4_published_names(name):
    src = randomize_(create_model(name, attn_impl="eager"))
    dst = create_model(name, attn_impl="eager")
    load_checkpoint(dst, unilm_to_hf4(src.state_dict()), strict=True)
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k


def test_table_and_pos_embed_resize():
    src = randomize_(create_model("beit_test_patch4_32", use_abs_pos_emb=True))
    dst = create_model("beit_test_patch4_32", img_size=48, use_abs_pos_emb=True)  # window 8 -> 12
    report = load_checkpoint(dst, src.state_dict(), strict=True)
    t_src = src.blocks[0].attn.relative_position_bias_table
    t_dst = dst.blocks[0].attn.relative_position_bias_table
    assert t_dst.shape == (num_relative_distance((12, 12)), 2)
    torch.testing.assert_close(t_dst[-3:], t_src[-3:])  # cls rows kept
    # offset (0, 0) sits at the centre of both grids and keeps its value (the geometric grid keeps small offsets)
    c_src = (15 * 15) // 2
    c_dst = (23 * 23) // 2
    torch.testing.assert_close(t_dst[c_dst], t_src[c_src], atol=1e-5, rtol=1e-5)
    assert dst.pos_embed.shape == (1, 145, 64)
    # the patch positions as an 8x8 grid of vectors, resampled bicubically to 12x12; the cls position kept
    grid = src.pos_embed.detach()[0, 1:].reshape(8, 8, 64).permute(2, 0, 1)[None]
    want = torch.nn.functional.interpolate(grid, size=(12, 12), mode="bicubic", align_corners=False)
    torch.testing.assert_close(dst.pos_embed.detach()[0, 1:], want[0].permute(1, 2, 0).reshape(144, 64))
    torch.testing.assert_close(dst.pos_embed.detach()[0, 0], src.pos_embed.detach()[0, 0])
    assert any("resized" in n for n in report.notes)
    with torch.no_grad():
        assert torch.isfinite(dst(torch.randn(1, 3, 48, 48))).all()
    same = resize_rel_pos_bias_table(t_src.detach(), (8, 8), (8, 8))
    assert torch.equal(same, t_src.detach())


def test_shape_mismatch_and_new_head():
    src = randomize_(create_model("beit_test_patch4_32", num_classes=5))
    dst = create_model("beit_test_patch4_32", num_classes=10)
    with pytest.warns(UserWarning, match=r"2 keys of another shape skipped \(head.weight, head.bias\)"):
        report = load_checkpoint(dst, src.state_dict())
    assert set(report.skipped_keys) == {"head.weight", "head.bias"}
    with pytest.raises(ValueError, match=r"cls_token: checkpoint shape \(1, 1, 64\) does not fit"):
        load_checkpoint(create_model("beit_test_patch4_32", embed_dim=32), src.state_dict())
    with pytest.raises(FileNotFoundError):
        load_checkpoint(dst, "/nonexistent/ckpt.pth")


def test_mim_checkpoint_with_another_vocabulary_skips_the_lm_head():
    """A masked-image-modeling checkpoint of another vocabulary (a 256-code tokenizer into a 512-code model)
    loads everything but lm_head, which is listed under skipped_keys (and refused by strict) like a
    classification head of another class count, instead of failing the whole load."""
    src = randomize_(create_model("beit_test_patch4_32_mim", vocab_size=256))
    dst = create_model("beit_test_patch4_32_mim")
    assert dst.lm_head.weight.shape[0] == 512
    with pytest.warns(UserWarning, match=r"2 keys of another shape skipped \(lm_head.weight, lm_head.bias\)"):
        report = load_checkpoint(dst, src.state_dict())
    assert set(report.skipped_keys) == {"lm_head.weight", "lm_head.bias"}
    assert set(report.missing_keys) == {"lm_head.weight", "lm_head.bias"} and not report.unexpected_keys
    for k, v in src.state_dict().items():
        if not k.startswith("lm_head."):
            assert torch.equal(dst.state_dict()[k], v), k
    with pytest.raises(ValueError, match="strict"):
        load_checkpoint(create_model("beit_test_patch4_32_mim"), src.state_dict(), strict=True)


def test_compiled_and_ddp_prefixes_are_stripped():
    """A torch.compile'd model's state dict ('_orig_mod.'), also inside DDP ('module._orig_mod.'), loads."""
    src = randomize_(create_model("beit_test_patch4_32", attn_impl="eager"))
    for prefix in ("_orig_mod.", "module._orig_mod.", "_orig_mod.module."):
        dst = create_model("beit_test_patch4_32", attn_impl="eager")
        report = load_checkpoint(dst, {prefix + k: v for k, v in src.state_dict().items()}, strict=True)
        assert not report.missing_keys and not report.unexpected_keys
        _same_outputs(src, dst, X())


def test_prefixes_are_stripped_only_from_a_whole_state_dict_and_k_bias_is_dropped():
    """A wrapper prefix is stripped only when every key has it (a model's own `module.`-named submodule in an
    unwrapped state dict keeps its name); a stored zero attn.k_bias (some unilm exports) is dropped, as the
    model recomputes it, so a strict load still succeeds."""
    from beit_fast.models.checkpoint import unwrap
    t = torch.zeros(1)
    assert set(unwrap({"module.a": t, "module.b": t})) == {"a", "b"}
    assert set(unwrap({"module.a": t, "b": t})) == {"module.a", "b"}
    src = randomize_(create_model("beit_test_patch4_32", attn_impl="eager"))
    sd = dict(src.state_dict())
    for i in range(len(src.blocks)):
        sd[f"blocks.{i}.attn.k_bias"] = torch.zeros(64)
    dst = create_model("beit_test_patch4_32", attn_impl="eager")
    report = load_checkpoint(dst, sd, strict=True)
    assert any("dropped 2 index/zero-bias buffers" in n for n in report.notes), report.notes
    _same_outputs(src, dst, X())


def test_nothing_loaded_is_an_error_and_partial_loads_warn():
    src = randomize_(create_model("beit_test_patch4_32", attn_impl="eager"))
    dst = create_model("beit_test_patch4_32", attn_impl="eager")
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ValueError, match="none of the checkpoint's .* tensors matches a parameter of this model"):
        load_checkpoint(dst, {"model." + k: v for k, v in src.state_dict().items()})   # a Lightning-style prefix
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())
    partial = {k: v for k, v in src.state_dict().items() if not k.startswith("head.")}
    partial["extra.weight"] = torch.zeros(1)
    with pytest.warns(UserWarning, match=r"2 model keys missing from the checkpoint \(head.weight, head.bias\); "
                                         r"1 checkpoint keys unused \(extra.weight\)"):
        report = load_checkpoint(dst, partial)
    assert report.unexpected_keys == ["extra.weight"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(dst, partial, warn=False)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/beit_fast_pwned",))


def test_pickled_code_is_never_executed(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": _Evil()}, f)
    if os.path.exists("/tmp/beit_fast_pwned"):
        os.remove("/tmp/beit_fast_pwned")
    with pytest.raises(ValueError, match="weights-only"):
        load_checkpoint(create_model("beit_test_patch4_32"), path)
    assert not os.path.exists("/tmp/beit_fast_pwned")


def test_unilm_training_checkpoint_with_args(tmp_path):
    """unilm's run scripts save {'model', 'optimizer', 'epoch', 'scaler', 'args': argparse.Namespace}; the
    Namespace is allowed, other objects still are not."""
    import argparse
    src = randomize_(create_model("beit_test_patch4_32", attn_impl="eager"))
    path = tmp_path / "checkpoint-799.pth"
    torch.save({"model": src.state_dict(), "epoch": 799, "scaler": {"scale": 1024.0},
                "args": argparse.Namespace(lr=1.5e-3, model="beit_base_patch16_224_8k_vocab")}, path)
    dst = create_model("beit_test_patch4_32", attn_impl="eager")
    load_checkpoint(dst, str(path))
    _same_outputs(src, dst, X())
    torch.save({"model": src.state_dict(), "args": _Evil()}, path)
    if os.path.exists("/tmp/beit_fast_pwned"):
        os.remove("/tmp/beit_fast_pwned")
    with pytest.raises(ValueError, match="weights-only"):
        load_checkpoint(dst, str(path))
    assert not os.path.exists("/tmp/beit_fast_pwned")


def _unilm_resample(table, src_w, dst_w):
    """unilm's resampling loop (beit/run_class_finetuning.py) as written there, with SciPy's named successor
    RectBivariateSpline in place of the removed interp2d(kind='cubic')."""
    import numpy as np
    from scipy.interpolate import RectBivariateSpline
    src_size, dst_size = 2 * src_w - 1, 2 * dst_w - 1
    extra, rel = table[-3:], table[:-3]

    def geometric_progression(a, r, n):
        return a * (1.0 - r ** n) / (1.0 - r)
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if geometric_progression(1, q, src_size // 2) > dst_size // 2:
            right = q
        else:
            left = q
    dis, cur = [], 1
    for i in range(src_size // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    x = [-d for d in reversed(dis)] + [0] + dis
    t = dst_size // 2.0
    dx = np.arange(-t, t + 0.1, 1.0)
    cols = [torch.from_numpy(RectBivariateSpline(x, x, rel[:, h].reshape(src_size, src_size).numpy(), kx=3, ky=3)(dx, dx))
            .reshape(-1, 1) for h in range(rel.shape[1])]
    return torch.cat([torch.cat(cols, 1), extra], 0)


@pytest.mark.parametrize("src, dst", [(14, 24), (8, 12), (14, 32), (24, 14), (32, 24)])  # grow and shrink
def test_table_resampling_equals_unilm(src, dst):
    table = torch.randn(num_relative_distance((src, src)), 3, dtype=torch.float64)
    ours = resize_rel_pos_bias_table(table, (src, src), (dst, dst))
    assert torch.equal(ours, _unilm_resample(table, src, dst))


def _unilm_axis_offsets(src_size, dst_size):
    """One axis of unilm's scheme (beit/run_class_finetuning.py), transcribed per axis: the source offsets
    placed on a geometric grid whose ratio q is found by bisection (shrinking as growing); an axis whose size
    does not change keeps its integer offsets."""
    half = src_size // 2
    if dst_size // 2 == half:
        return [float(i) for i in range(-half, half + 1)]
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if (1.0 - q ** half) / (1.0 - q) > dst_size // 2:
            right = q
        else:
            left = q
    dis, cur = [], 1.0
    for i in range(half):
        dis.append(cur)
        cur += q ** (i + 1)
    return [-d for d in reversed(dis)] + [0.0] + dis


@pytest.mark.parametrize("src, dst", [((5, 5), (7, 9)), ((7, 9), (5, 5)), ((5, 5), (5, 9)), ((7, 9), (7, 5))])
def test_non_square_table_resampling_per_axis(src, dst):
    """A non-square resize resamples each axis on its own grid (dy on Wh's, dx on Ww's). The table is
    separable, u(dy) v(dx) + a(dy) + b(dx) per head, so its bicubic tensor-product interpolant is the product
    and sum of 1-D not-a-knot cubic splines (SciPy's CubicSpline, another implementation) through each axis's
    source offsets: every target offset is checked against that, the cls rows are kept. The 1-D splines are
    made on the grid each axis should have, so an axis resampled on the other axis's grid fails."""
    import numpy as np
    from scipy.interpolate import CubicSpline
    sh, sw, dh, dw = 2 * src[0] - 1, 2 * src[1] - 1, 2 * dst[0] - 1, 2 * dst[1] - 1
    g = torch.Generator().manual_seed(sh * 100 + dw)
    u, a = torch.randn(2, sh, 2, dtype=torch.float64, generator=g)
    v, b = torch.randn(2, sw, 2, dtype=torch.float64, generator=g)
    body = u[:, None] * v[None] + a[:, None] + b[None]                     # (sh, sw, heads)
    table = torch.cat([body.reshape(sh * sw, 2), torch.randn(3, 2, dtype=torch.float64, generator=g)])
    out = resize_rel_pos_bias_table(table, src, dst)
    assert out.shape == (num_relative_distance(dst), 2)
    assert torch.equal(out[-3:], table[-3:])
    ys, xs = _unilm_axis_offsets(sh, dh), _unilm_axis_offsets(sw, dw)
    # the integer target offsets; the outermost lie a little past the geometric grid's last source offset
    # (q is bisection's last midpoint), where FITPACK's evaluation clamps them to the grid's span
    ty = np.clip(np.arange(dh) - dh // 2, ys[0], ys[-1])
    tx = np.clip(np.arange(dw) - dw // 2, xs[0], xs[-1])
    for h in range(2):
        su, sa = (CubicSpline(ys, t[:, h].numpy(), bc_type="not-a-knot")(ty) for t in (u, a))
        sv, sb = (CubicSpline(xs, t[:, h].numpy(), bc_type="not-a-knot")(tx) for t in (v, b))
        want = torch.from_numpy(su[:, None] * sv[None] + sa[:, None] + sb[None])
        torch.testing.assert_close(out[:-3, h].reshape(dh, dw), want, atol=1e-9, rtol=1e-9)
    if src[0] == dst[0]:   # an unchanged axis keeps its integer grid: a table of dy alone comes back as it was
        rows = torch.cat([a[:, None].expand(sh, sw, 2).reshape(-1, 2), table[-3:]])
        got = resize_rel_pos_bias_table(rows, src, dst)[:-3].reshape(dh, dw, 2)
        torch.testing.assert_close(got, a[:, None].expand(dh, dw, 2), atol=1e-12, rtol=0)


def test_a_compiled_model_loads_a_checkpoint():
    """torch.compile's wrapper prefixes the model's keys with _orig_mod.; the loader loads into the model inside
    (it stripped the prefix from checkpoints only, and refused: 'none of the checkpoint's tensors matches')."""
    src = create_model("beit_test_patch4_32", fused=False)
    dst = create_model("beit_test_patch4_32", fused=False)
    report = load_checkpoint(torch.compile(dst), src.state_dict(), strict=True)
    assert not report.missing_keys and not report.unexpected_keys
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))


# ---------------------------------------------------------------------------------------------------------
# mutation audit additions (each kills a mutation the tests above let through)
# ---------------------------------------------------------------------------------------------------------

def test_strict_refuses_an_unexpected_key_alone():
    """strict=True raises for a checkpoint key the model does not have, even when nothing is missing."""
    src = randomize_(create_model("beit_test_patch4_32", attn_impl="eager"))
    sd = {**src.state_dict(), "extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"strict load failed(.|\n)*unexpected keys \(1\): extra.weight"):
        load_checkpoint(create_model("beit_test_patch4_32", attn_impl="eager"), sd, strict=True)


@pytest.mark.parametrize("outer, inner", [("model", "module"), ("state_dict", "model"), ("module", "state_dict")])
def test_nested_wrappers(outer, inner):
    """Wrappers nest (a deepspeed {'module': ...} saved under unilm's {'model': ...}, an mmseg {'state_dict':
    ...} around either): every level is unwrapped."""
    src = randomize_(create_model("beit_test_patch4_32", attn_impl="eager"))
    dst = create_model("beit_test_patch4_32", attn_impl="eager")
    load_checkpoint(dst, {outer: {inner: src.state_dict()}, "epoch": 1}, strict=True)
    _same_outputs(src, dst, X())


def test_a_ddp_model_loads_into_the_model_inside():
    """DistributedDataParallel's state dict prefixes every key with module.: the loader loads into the model
    inside it (as it does for torch.compile's wrapper)."""
    import tempfile
    import torch.distributed as dist
    src = randomize_(create_model("beit_test_patch4_32", attn_impl="eager"))
    dst = create_model("beit_test_patch4_32", attn_impl="eager")
    with tempfile.NamedTemporaryFile() as f:
        dist.init_process_group("gloo", init_method=f"file://{f.name}", rank=0, world_size=1)
        try:
            ddp = torch.nn.parallel.DistributedDataParallel(dst)
            report = load_checkpoint(ddp, src.state_dict(), strict=True)
        finally:
            dist.destroy_process_group()
    assert not report.missing_keys and not report.unexpected_keys
    _same_outputs(src, dst, X())


def test_table_of_another_head_count_or_no_square_window_is_refused_by_name():
    """A relative-position table that cannot be resized says why: another head count (another model size), or
    a row count that is no square window's (2W-1)^2 + 3 (instead of a KeyError / TypeError from inside)."""
    src = randomize_(create_model("beit_test_patch4_32", attn_impl="eager"))
    sd = dict(src.state_dict())
    key = "blocks.0.attn.relative_position_bias_table"
    with pytest.raises(ValueError, match=r"is for 2 attention heads, the model's \(228, 4\) for 4"):
        load_checkpoint(create_model("beit_test_patch4_32", num_heads=4, attn_impl="eager"), sd)
    from beit_fast.relpos import window_from_table_rows
    for rows in (229, 4 * 4 + 3):   # no square (2W-1)^2, and an even side's square
        assert window_from_table_rows(rows) is None
        sd[key] = torch.randn(rows, 2)
        with pytest.raises(ValueError, match=rf"{rows} rows is no square window's \(2W-1\)\^2 \+ 3"):
            load_checkpoint(create_model("beit_test_patch4_32", attn_impl="eager"), sd)


def test_hf_layer_without_its_key_weight_is_refused():
    """A Hugging Face layer with query and value weights but no key weight cannot make attn.qkv: a ValueError
    names the layer (a KeyError from inside the converter said nothing)."""
    src = randomize_(create_model("beit_test_patch4_32", attn_impl="eager"))
    hf = unilm_to_hf4(src.state_dict())
    del hf["beit.encoder.layer.1.attention.attention.key.weight"]
    with pytest.raises(ValueError, match="layer 1 lacks one of query/key/value weights"):
        load_checkpoint(create_model("beit_test_patch4_32", attn_impl="eager"), hf)


@pytest.mark.parametrize("kind", ["BeitModel", "Data2VecVisionForImageClassification"])
def test_bare_hf_model_and_data2vec_parity(kind):
    """transformers' BeitModel (keys without the `beit.` prefix: embeddings.*, layers.N.*, pooler.*) and a
    data2vec-vision classifier (`data2vec_vision.` prefix, transformers 4.x layer names) load as BEiT."""
    kw = dict(use_relative_position_bias=True, use_mean_pooling=True)
    if kind == "BeitModel":
        hf = transformers.BeitModel(_hf_config(**kw))
        ours = create_model("beit_test_patch4_32", num_classes=0, attn_impl="eager")   # pooled features
    else:
        base = _hf_config(**kw).to_dict()
        base.pop("model_type", None)
        hf = transformers.Data2VecVisionForImageClassification(transformers.Data2VecVisionConfig(**{**base,
                                                                                                   "num_labels": 10}))
        ours = create_model("beit_test_patch4_32", attn_impl="eager")
    randomize_(hf.eval())
    report = load_checkpoint(ours.eval(), hf.state_dict(), strict=True)
    assert report.source_format.startswith("Hugging Face")
    x = X(2)
    with torch.no_grad():
        out = hf(pixel_values=x)
        want = out.pooler_output if kind == "BeitModel" else out.logits
        assert rel_err(ours(x), want) < 1e-4


def test_a_model_with_shared_and_own_tables_round_trips():
    """Into a model that has a shared table and tables of its own, a checkpoint of the same layout loads as it
    is (the shared table is expanded only for a model without one)."""
    src = randomize_(create_model("beit_test_patch4_32", use_shared_rel_pos_bias=True, attn_impl="eager"))
    dst = create_model("beit_test_patch4_32", use_shared_rel_pos_bias=True, attn_impl="eager")
    report = load_checkpoint(dst, src.state_dict(), strict=True)
    assert not any("expanded" in n for n in report.notes), report.notes
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k
