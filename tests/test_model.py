"""The BEiT model: parity with timm and transformers, attention paths, init, bad input."""
import math

import pytest
import torch

import beit_fast
from beit_fast.models import create_model, list_models, load_checkpoint
from beit_fast.relpos import num_relative_distance, relative_position_index

timm = pytest.importorskip("timm")


def randomize_(model, scale=0.05):
    """Fill every parameter (tables, gammas, biases included) with random values, so parity tests compare
    real computations rather than zero-initialized tables and 0.001-scaled heads."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + scale * torch.randn_like(p))
            else:
                p.copy_(scale * torch.randn_like(p))
    return model


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", ["beit_base_patch16_224", "beit_large_patch16_224"])
def test_logits_match_timm(name):
    ours = create_model(name, attn_impl="eager").eval()
    ref = timm.create_model(name, pretrained=False).eval()
    randomize_(ref)
    load_checkpoint(ours, ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert a.shape == (1, 1000)
    assert rel_err(a, b) < 1e-4
    # and timm loads ours: the key layouts are the same
    ref2 = timm.create_model(name, pretrained=False).eval()
    ref2.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        assert rel_err(ref2(x), a) < 1e-4


@pytest.mark.parametrize("impl", ["eager", "sdpa", "fused", "fused-triton"])
def test_attention_paths_agree_logits_and_grads(impl, monkeypatch):
    """attn_impl is a config choice; all paths give the same logits and gradients. "fused-triton" forces
    the Triton kernel through the interpreter (CPU tensors; on a GPU test_fused_model's bf16 test covers it)."""
    if impl == "fused-triton":
        import os
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("runs the Triton kernel on CPU tensors: needs TRITON_INTERPRET=1")
        monkeypatch.setenv("BEIT_FAST_BACKEND", "triton")
        impl = "fused"
    base = randomize_(create_model("beit_test_patch4_32", attn_impl="eager", fused=False))
    other = create_model("beit_test_patch4_32", attn_impl=impl, fused=False)
    other.load_state_dict(base.state_dict())
    x = torch.randn(3, 3, 32, 32)
    outs = []
    for m in (base, other):
        m.zero_grad()
        y = m(x)
        (y.square().sum()).backward()
        outs.append((y, {n: p.grad.clone() for n, p in m.named_parameters()}))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-4)
    for n, g in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][n], g, atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")


def test_mim_logits_only_on_masked_positions():
    m = randomize_(create_model("beit_test_patch4_32_mim", attn_impl="eager")).eval()
    x = torch.randn(2, 3, 32, 32)
    mask = torch.rand(2, m.num_patches) < 0.4
    logits = m(x, mask)
    assert logits.shape == (int(mask.sum()), 512)
    all_tokens = m(x, mask, return_all_tokens=True)
    torch.testing.assert_close(logits, all_tokens[mask])
    # the trainer's sync-free path: the masked positions counted beforehand select the same rows, bitwise
    assert torch.equal(m(x, mask, masked_index=mask.flatten().nonzero().squeeze(1)), logits)
    # the mask token replaces the embedding of masked patches only: changing masked pixels changes nothing
    x2 = x.clone()
    pix = mask[0].view(8, 8).repeat_interleave(4, 0).repeat_interleave(4, 1)
    x2[0][:, pix] = torch.randn_like(x2[0][:, pix])
    with torch.no_grad():
        a = m.forward_features(x, mask)
        b = m.forward_features(x2, mask)
    torch.testing.assert_close(a, b)


def test_shared_and_per_layer_tables():
    mim = create_model("beit_test_patch4_32_mim")
    assert mim.rel_pos_bias.relative_position_bias_table.shape == (num_relative_distance((8, 8)), 2)
    assert all(b.attn.relative_position_bias_table is None for b in mim.blocks)
    both = create_model("beit_test_patch4_32", use_shared_rel_pos_bias=True, attn_impl="eager")
    randomize_(both).eval()
    # own + shared table == one summed table
    single = create_model("beit_test_patch4_32", attn_impl="eager").eval()
    sd = both.state_dict()
    shared = sd.pop("rel_pos_bias.relative_position_bias_table")
    for i in range(2):
        sd[f"blocks.{i}.attn.relative_position_bias_table"] = sd[f"blocks.{i}.attn.relative_position_bias_table"] + shared
    single.load_state_dict(sd)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(single(x), both(x))


def test_relative_position_index_layout():
    idx = relative_position_index((14, 14))
    r = num_relative_distance((14, 14))
    assert r == 732 and idx.shape == (197, 197)
    assert idx[0, 0] == r - 1 and (idx[0, 1:] == r - 3).all() and (idx[1:, 0] == r - 2).all()
    # closed form for patch tokens (kernel_anchors section 0)
    for i, j in [(1, 1), (1, 196), (50, 120), (196, 3)]:
        p, q = i - 1, j - 1
        assert idx[i, j] == (p // 14 - q // 14 + 13) * 27 + (p % 14 - q % 14 + 13)
    assert idx[1:, 1:].max() < r - 3
    timm_idx = timm.layers.gen_relative_position_index((14, 14), class_token=True)
    assert torch.equal(idx, timm_idx)


def test_init_follows_the_reference():
    mim = create_model("beit_small_patch16_224_8k_vocab")
    w = mim.blocks[0].mlp.fc1.weight
    assert w.abs().max() <= 0.02 + 1e-7  # unilm pretraining truncates at +-1 std
    assert abs(w.std().item() - 0.02 * 0.5396) < 0.001
    assert mim.patch_embed.proj.weight.abs().max() <= 0.02 + 1e-7
    # proj / fc2 rescaled by 1/sqrt(2 * (layer_id + 1))
    ratio = mim.blocks[5].attn.proj.weight.std() / mim.blocks[5].attn.qkv.weight.std()
    assert abs(ratio.item() - 1 / math.sqrt(12)) < 0.05
    cls = create_model("beit_small_patch16_224")
    assert abs(cls.head.weight.std().item() - 0.02 * 0.001) < 0.002 * 0.001  # head init scale 0.001
    assert abs(cls.blocks[0].mlp.fc1.weight.std().item() - 0.02) < 0.002
    assert torch.all(cls.blocks[0].gamma_1 == 0.1)
    assert torch.all(create_model("beit_large_patch16_224", depth=1).blocks[0].gamma_1 == 1e-5)
    assert create_model("beit_test_patch4_32", init_values=None).blocks[0].gamma_1 is None


def test_registry_names():
    names = list_models()
    for n in ["beit_base_patch16_224", "beit_large_patch16_224", "beit_base_patch16_384", "beit_large_patch16_384",
              "beit_base_patch16_224_8k_vocab", "beit_large_patch16_224_8k_vocab", "beit_tiny_patch16_224",
              "beit_small_patch16_224", "beit_test_patch4_32", "beit_test_patch4_32_mim"]:
        assert n in names
    m = beit_fast.create_model("beit_base_patch16_384", depth=1)
    assert m.window_size == (24, 24) and m.blocks[0].attn.relative_position_bias_table.shape == (2212, 12)
    with pytest.raises(ValueError, match="unknown model"):
        create_model("beit_huge")
    with pytest.raises(ValueError, match="unknown BeitConfig fields"):
        create_model("beit_test_patch4_32", nonsense=1)


def test_drop_path_and_grad_checkpointing():
    """Activation checkpointing recomputes each block with the drop-path draws of its first run (the RNG state
    is preserved), so outputs and every gradient equal the plain run's."""
    m = randomize_(create_model("beit_test_patch4_32", drop_path_rate=0.5, attn_impl="eager"))
    x = torch.randn(4, 3, 32, 32)
    m.train()
    grads = []
    for checkpointing in (False, True):
        m.set_grad_checkpointing(checkpointing)
        m.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        out = m(x)
        out.square().sum().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = grads
    torch.testing.assert_close(a, b)
    assert ga.keys() == gb.keys() and len(ga) == len(list(m.parameters()))
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], msg=lambda msg: f"grad of {n}: {msg}")
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), m(x))


@pytest.mark.parametrize("fused", [False, True])
def test_grad_checkpointing_checkpoints_each_block_in_training_only(fused, monkeypatch):
    """With the switch on, a training forward with autograd on runs every block (fused or not) through torch's
    checkpoint, once, in order; in eval mode, under no_grad or with the switch off, none."""
    from beit_fast.models import beit as beit_mod
    calls = []
    real = beit_mod.checkpoint
    monkeypatch.setattr(beit_mod, "checkpoint", lambda fn, *a, **k: calls.append(fn) or real(fn, *a, **k))
    m = create_model("beit_test_patch4_32", fused=fused)
    x = torch.randn(2, 3, 32, 32)
    each_block = list(m.blocks)   # (the fused model too calls its blocks as modules under checkpointing)
    for switch, training, grad, want in ((True, True, True, each_block), (True, False, True, []),
                                         (True, True, False, []), (False, True, True, [])):
        m.set_grad_checkpointing(switch)
        m.train(training)
        calls.clear()
        with torch.set_grad_enabled(grad):
            m(x)
        assert calls == want, (switch, training, grad)


@pytest.mark.parametrize("fused", [False, True])
def test_compiled_grad_checkpointing_keeps_the_forwards_drop_path(fused, monkeypatch):
    """Compiled with activation checkpointing, the backward must use the forward's drop-path masks (eager
    checkpointing restores the RNG state for its recompute; compiled, the partitioner must save random ops'
    results rather than draw them again). Check: find the drop-path draws that reproduce a compiled step's
    output in eager mode without checkpointing (batch 1: four branches, kept or dropped), and compare the
    compiled step's gradients with eager's under those draws."""
    import copy
    import itertools
    from beit_fast.models import beit as beit_mod
    m = randomize_(create_model("beit_test_patch4_32_mim", drop_path_rate=0.6, fused=fused))
    for blk in m.blocks:
        blk.drop_path = 0.6
    eager = copy.deepcopy(m).train()
    m.train()
    m.set_grad_checkpointing(True)
    x, mask = torch.randn(1, 3, 32, 32), torch.rand(1, 64) < 0.4
    idx = mask.reshape(-1).nonzero().squeeze(1)

    def step(model, seed=None):
        model.zero_grad(set_to_none=True)
        if seed is not None:
            torch.manual_seed(seed)
        out = model(x, mask, masked_index=idx)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in getattr(model, "_orig_mod", model).named_parameters()
                              if p.grad is not None}

    compiled, draw, mixed = torch.compile(m), beit_mod.drop_path_scale, 0
    for seed in range(4):
        out, grads = step(compiled, seed)
        for combo in itertools.product([0.0, 1 / 0.4], repeat=4):   # the order the blocks draw them in
            scales = iter(combo)
            monkeypatch.setattr(beit_mod, "drop_path_scale",
                                lambda B, p, training, ref: torch.full((B,), next(scales), dtype=ref.dtype))
            want, want_grads = step(eager)
            if torch.allclose(want, out, rtol=1e-4, atol=1e-5):
                break
        else:
            raise AssertionError(f"seed {seed}: no drop-path draw reproduces the compiled output")
        monkeypatch.setattr(beit_mod, "drop_path_scale", draw)
        mixed += len(set(combo)) > 1
        assert grads.keys() == want_grads.keys()
        for n in grads:
            torch.testing.assert_close(grads[n], want_grads[n], rtol=1e-4, atol=1e-6,
                                       msg=lambda msg: f"seed {seed}, draws {combo}, grad of {n}: {msg}")
    assert mixed, "every seed kept or dropped all branches: nothing was checked"


@pytest.mark.parametrize("bad, match", [
    (lambda: torch.randn(2, 3, 16, 16), r"\(B, 3, 32, 32\)"),
    (lambda: torch.randn(2, 1, 32, 32), r"\(B, 3, 32, 32\)"),
    (lambda: torch.randn(3, 32, 32), "4-D"),
    (lambda: torch.randint(0, 255, (2, 3, 32, 32)), r"floating-point tensor \(B, 3, 32, 32\)"),
    (lambda: torch.randn(2, 3, 32, 32, device="meta"), r"\(B, 3, 32, 32\) must be on the model's device cpu"),
    (lambda: torch.randn(2, 3, 32, 32, dtype=torch.float64), r"\(B, 3, 32, 32\) must have the model's dtype "
                                                             r"torch.float32 .*got torch.float64"),
])
@pytest.mark.parametrize("fused", [False, True])
def test_bad_images(bad, match, fused):
    m = create_model("beit_test_patch4_32", fused=fused)
    with pytest.raises(ValueError, match=match):
        m(bad())


def test_low_precision_images_under_autocast():
    """bf16 images into an fp32 model are fine under autocast (the usual mixed-precision setup)."""
    m = create_model("beit_test_patch4_32")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)).shape == (2, 10)


def test_bad_masks():
    m = create_model("beit_test_patch4_32_mim")
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"\(2, 64\)"):
        m(x, torch.zeros(2, 63, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"torch.bool tensor \(2, 64\)"):
        m(x, torch.zeros(2, 64))
    with pytest.raises(ValueError, match=r"\(2, 64\) must be on the images' device cpu"):
        m(x, torch.zeros(2, 64, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match=r"\(2, 64\)"):
        m(x, torch.zeros(1, 64, dtype=torch.bool))
    assert m(x, torch.zeros(2, 8, 8, dtype=torch.bool)).shape == (0, 512)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    with pytest.raises(ValueError, match="masked_index must be a 1-D int64 tensor"):
        m(x, mask, masked_index=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="masked_index must be a 1-D int64 tensor"):
        m(x, mask, masked_index=torch.zeros(1, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="no mask token"):
        create_model("beit_test_patch4_32").forward_features(x, torch.zeros(2, 64, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_impl"):
        create_model("beit_test_patch4_32", attn_impl="flash")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        create_model("beit_test_patch4_32", img_size=30)
    # each of these built a model that then failed (ZeroDivisionError, IndexError) or ran wrong (NaN logits
    # from a negative eps in the reference path, which the fused LayerNorm refuses; negative layer scales)
    for bad, match in ((dict(num_heads=0), "num_heads must be >= 1, got 0"),
                       (dict(depth=0), "depth must be >= 1, got 0"),
                       (dict(mlp_ratio=0.0), "mlp_ratio must be a finite number > 0"),
                       (dict(layer_norm_eps=-1.0), "layer_norm_eps must be a finite number > 0, got -1.0"),
                       (dict(layer_norm_eps=float("nan")), "layer_norm_eps must be a finite number > 0, got nan"),
                       (dict(init_values=-0.1), r"init_values \(layer scale\) must be None, 0")):
        with pytest.raises(ValueError, match=match):
            create_model("beit_test_patch4_32", **bad)
    assert create_model("beit_test_patch4_32", init_values=0.0).blocks[0].gamma_1 is None


@pytest.mark.parametrize("fused", [False, True])
def test_cls_token_pooling_matches_timm(fused):
    """use_mean_pooling=False (unilm --use_cls, timm global_pool='token'): the final LayerNorm on all tokens,
    then the cls token (row 0) into the head; the logits equal timm's Beit with global_pool='token' loaded
    with the same random weights (only mean pooling was compared with a reference)."""
    from timm.models.beit import Beit as TimmBeit
    ref = TimmBeit(img_size=32, patch_size=4, num_classes=10, global_pool="token", embed_dim=64, depth=2,
                   num_heads=2, init_values=0.1, use_abs_pos_emb=False, use_rel_pos_bias=True).eval()
    randomize_(ref)
    ours = create_model("beit_test_patch4_32", use_mean_pooling=False, attn_impl="eager", fused=fused).eval()
    load_checkpoint(ours, ref.state_dict(), strict=True)
    assert ours.fc_norm is None and isinstance(ours.norm, torch.nn.LayerNorm)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert a.shape == (3, 10)
    assert rel_err(a, b) < 1e-4


def _dropout_pattern(got, want, p):
    """got must be `want` with each element either zeroed or scaled by 1/(1-p) (inverted dropout); returns
    the share of zeroed elements (where `want` is nonzero)."""
    nz = want != 0
    assert nz.float().mean() > 0.99, "the undropped values must be nonzero to see the pattern"
    dropped = (got == 0) & nz
    kept = ~dropped & nz
    torch.testing.assert_close(got[kept], want[kept] / (1 - p), rtol=1e-5, atol=1e-6)
    return dropped[nz].float().mean().item()


@pytest.mark.parametrize("fused", [False, True])
def test_dropout_after_the_embedding(fused):
    """drop_rate also drops the embedded tokens (unilm's pos_drop, after the cls token and absolute
    positions): in training the first block's input is the embedding with a share p of its elements zeroed
    and the rest scaled by 1/(1-p); in eval it is the embedding itself."""
    p = 0.25
    m = randomize_(create_model("beit_test_patch4_32", drop_rate=p, attn_impl="eager", fused=fused))
    x = torch.randn(4, 3, 32, 32)
    seen = []
    m.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        want = m.embed(x, None, False)
        m.eval()(x)
        torch.testing.assert_close(seen[-1], want, rtol=1e-5, atol=1e-6)
        torch.manual_seed(0)
        m.train()(x)
    share = _dropout_pattern(seen[-1], want, p)
    assert abs(share - p) < 0.03, share     # 4 x 65 x 64 elements: the share's std is 0.0034


@pytest.mark.parametrize("impl", ["eager", "sdpa", "fused", "fused-triton"])
def test_attention_dropout_density_and_scale(impl, monkeypatch):
    """attn_drop_rate drops attention probabilities (after the softmax) in training, on every attention path,
    with density p and the kept ones scaled by 1/(1-p). Read off directly: a 2x2 grid (5 tokens), q = k = 0
    and a zero bias table (uniform probabilities 1/5), token j's value the unit vector j in each head and an
    identity projection, so the block's attention output holds the dropped probability matrix itself. The
    reference (eager F.dropout, SDPA's dropout) and the fused kernel draw different masks (the fused op's
    reference backend draws torch.rand, the kernels Philox), so this checks each path's pattern rather than
    parity between them. "fused-triton": the Triton kernel's in-kernel Philox dropout through the interpreter."""
    batch, tol = 200, 0.03              # 200 x 5 x 10 probabilities: the share's std is 0.0065
    if impl == "fused-triton":
        import os
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("runs the Triton kernel on CPU tensors: needs TRITON_INTERPRET=1")
        monkeypatch.setenv("BEIT_FAST_BACKEND", "triton")
        impl = "fused"
        batch, tol = 24, 0.06           # the interpreter runs a program per (row block, head, sample): std 0.013
    p, N, C = 0.3, 5, 64
    m = create_model("beit_test_patch4_32", img_size=8, attn_drop_rate=p, attn_impl=impl, fused=False)
    attn = m.blocks[0].attn
    d = attn.head_dim
    with torch.no_grad():
        for t in attn.parameters():
            t.zero_()
        attn.qkv.weight[2 * C:].copy_(torch.eye(C))   # v = x, q = k = 0
        attn.proj.weight.copy_(torch.eye(C))
    x = torch.zeros(batch, N, C)
    for j in range(N):
        for h in range(attn.num_heads):
            x[:, j, h * d + j] = 1.0
    with torch.no_grad():
        probs = attn.eval()(x)
        assert torch.allclose(probs, x.sum(1, keepdim=True).expand_as(x) / N)   # eval: no dropout
        torch.manual_seed(0)
        dropped = attn.train()(x)
    sel = [h * d + j for h in range(attn.num_heads) for j in range(N)]
    share = _dropout_pattern(dropped[..., sel], probs[..., sel], p)
    assert abs(share - p) < tol, share
    assert (dropped[..., [c for c in range(C) if c not in sel]] == 0).all()


def test_drop_path_rate_rises_linearly_over_depth():
    """Stochastic depth decay rule (unilm, timm): block i drops its branches with probability
    drop_path_rate * i / (depth - 1): none in the first block, the full rate in the last. Behaviourally: the
    first block of a model with drop_path_rate=0.5 gives the same output in training as in eval."""
    m = randomize_(create_model("beit_test_patch4_32", depth=5, drop_path_rate=0.4, attn_impl="eager"))
    assert [b.drop_path for b in m.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    m = randomize_(create_model("beit_test_patch4_32", drop_path_rate=0.5, attn_impl="eager"))
    x = torch.randn(8, 65, 64)
    with torch.no_grad():
        first, last = m.blocks[0], m.blocks[1]
        torch.manual_seed(0)
        torch.testing.assert_close(first.train()(x), first.eval()(x))
        torch.manual_seed(0)
        assert not torch.allclose(last.train()(x), last.eval()(x))


@pytest.mark.parametrize("pretraining", [True, False])
def test_fix_init_weight_rescales_proj_and_fc2(pretraining):
    """unilm/timm fix_init_weight: block i's attn.proj and mlp.fc2 weights are their init divided by
    sqrt(2 (i + 1)). Pretraining truncates at +-1 std, so the largest |weight| of those layers is just below
    0.02 / sqrt(2 (i + 1)); fine-tuning's std is 0.02 / sqrt(2 (i + 1)) against fc1's and qkv's 0.02."""
    name = "beit_test_patch4_32_mim" if pretraining else "beit_test_patch4_32"
    m = create_model(name, depth=4)
    for i, blk in enumerate(m.blocks):
        s = math.sqrt(2.0 * (i + 1))
        for lin, ref in ((blk.attn.proj, blk.attn.qkv), (blk.mlp.fc2, blk.mlp.fc1)):
            w = lin.weight
            if pretraining:
                assert 0.95 * 0.02 / s < w.abs().max() <= 0.02 / s + 1e-7, (i, w.abs().max())
            ratio = (w.std() / ref.weight.std()).item()
            assert abs(ratio * s - 1) < 0.08, (i, ratio, 1 / s)   # std errors ~1.3%; without the rescale: s - 1 >= 0.41


def test_finetuning_patch_embed_keeps_pytorch_conv_init():
    """The fine-tuning model initializes its Linear layers (trunc normal, std 0.02) and LayerNorms only, as
    unilm's modeling_finetune and timm's Beit do: the patch embedding keeps nn.Conv2d's default init,
    uniform in +-1/sqrt(fan_in) for weight and bias (kaiming_uniform with a = sqrt(5)). The pretraining
    model draws it from the +-1 std truncated normal, with a zero bias."""
    cls = create_model("beit_test_patch4_32").patch_embed.proj
    bound = 1 / math.sqrt(3 * 4 * 4)
    assert cls.weight.abs().max() <= bound and cls.bias.abs().max() <= bound
    assert abs(cls.weight.std().item() - bound / math.sqrt(3)) < 0.1 * bound / math.sqrt(3)
    assert cls.bias.abs().min() > 0
    mim = create_model("beit_test_patch4_32_mim").patch_embed.proj
    assert mim.weight.abs().max() <= 0.02 + 1e-7 and torch.all(mim.bias == 0)


def test_config_rejects_rates_of_one_and_uneven_heads():
    """A dropout / drop-path rate must lie in [0, 1): 1 drops everything (inverted dropout's 1/(1-p) is a
    division by zero, a drop-path rate of 1 makes the last block's branches always dropped). embed_dim must
    split evenly into heads (the attention's view(B, N, 3, H, D) fails or mixes heads)."""
    for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
        with pytest.raises(ValueError, match=rf"{name} must be in \[0, 1\), got 1.0"):
            create_model("beit_test_patch4_32", **{name: 1.0})
        create_model("beit_test_patch4_32", **{name: 0.99})
    with pytest.raises(ValueError, match=r"embed_dim \(64\) must be divisible by num_heads \(3\)"):
        create_model("beit_test_patch4_32", num_heads=3)
    with pytest.raises(ValueError, match=r"embed_dim \(60\) must be divisible by num_heads \(8\)"):
        beit_fast.models.BeitConfig(embed_dim=60, num_heads=8)
