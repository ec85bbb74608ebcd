"""rel_pos_attention: Triton kernels (interpreter on CPU, compiled on CUDA) against a float64 reference.

Every forward and gradient (q, k, v, table) is compared; the table gradient is checked for bitwise
reproducibility; the reference itself is checked against a plain eager (timm/unilm-style) implementation.
"""
import os

if "TRITON_INTERPRET" not in os.environ:   # conftest decides; this keeps the file runnable on its own
    import shutil
    if shutil.which("nvidia-smi") is None:
        os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from beit_fast._backend import BackendUnavailable  # noqa: E402
op_mod = importlib.import_module("beit_fast.ops.rel_pos_attention")  # the module (beit_fast.ops.rel_pos_attention is the function)
from beit_fast.ops.rel_pos_attention import (  # noqa: E402
    dropout_keep_mask, not_supported_reasons, num_relative_distance, rel_pos_attention, rel_pos_attention_qkvpacked,
    rel_pos_attention_ref, relative_position_index)
from interpreter_bf16 import needs_bf16, refused_without_emulation  # noqa: E402
from tolerances import assert_close, assert_two_x, tolerance  # noqa: E402

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cuda" if CUDA else "cpu"
RUN_TRITON = CUDA or INTERPRET
needs_triton = pytest.mark.skipif(not RUN_TRITON, reason="needs a GPU or TRITON_INTERPRET=1")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

GRAD_NAMES = ("dq", "dk", "dv", "dtable")


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Kernel outputs start as NaN, so an element a kernel forgets to write fails the comparison."""
    if RUN_TRITON:
        from beit_fast.kernels import rel_pos_attention as K
        monkeypatch.setattr(K, "POISON_OUTPUTS", True)
    yield


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------

def make_inputs(B, H, N, D, dtype, R, *, packed=False, device=DEVICE, table_dtype=torch.float32):
    """Fresh random q, k, v (or packed qkv), a table with visible structure, and an upstream gradient."""
    if packed:
        qkv = torch.randn(B, N, 3, H, D, device=device).to(dtype)
        inputs = [qkv]
    else:
        inputs = [torch.randn(B, H, N, D, device=device).to(dtype) for _ in range(3)]
    table = (torch.randn(R, H, device=device) * 2).to(table_dtype)
    out_shape = (B, N, H * D) if packed else (B, H, N, D)
    grad = torch.randn(out_shape, device=device).to(dtype)
    return inputs, table, grad


def run(fn, inputs, table, grad, **kw):
    """Output and gradients w.r.t. every input tensor and the table."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs + [table]]
    out = fn(*leaves, **kw)
    grads = torch.autograd.grad(out, leaves, grad)
    return out.detach(), [g.detach() for g in grads]


def ref_fn(packed):
    """float64-friendly reference in the same calling convention as the public entry."""
    def f(*args, window_size=None, rel_index=None, scale=None, dropout_mask=None, **_):
        if packed:
            qkv, table = args
            B, N, _, H, D = qkv.shape
            q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
            out = rel_pos_attention_ref(q, k, v, table, window_size, rel_index, scale, dropout_mask)
            return out.transpose(1, 2).reshape(B, N, H * D)
        q, k, v, table = args
        return rel_pos_attention_ref(q, k, v, table, window_size, rel_index, scale, dropout_mask)
    return f


def names(packed):
    return (["dqkv"] if packed else ["dq", "dk", "dv"]) + ["dtable"]


def assert_matches_fp64(packed, inputs, table, grad, out, grads, dtype, ref_kw):
    out64, grads64 = run(ref_fn(packed), [t.double() for t in inputs], table.double(), grad.double(), **ref_kw)
    assert_close("out", out.double(), out64, tolerance("rel_pos_attention", dtype, "out"))
    for name, g, g64 in zip(names(packed), grads, grads64):
        key = "dq" if name == "dqkv" else name
        assert g.dtype == (table.dtype if name == "dtable" else dtype), name
        assert_close(name, g.double(), g64, tolerance("rel_pos_attention", dtype, key))


def random_index(N, R, generator=None):
    return torch.randint(0, R, (N, N), generator=generator)


def unilm_index(wh, ww):
    """The index exactly as unilm's BEiT builds it (loops, no closed form)."""
    n_rel = (2 * wh - 1) * (2 * ww - 1) + 3
    N = wh * ww + 1
    index = torch.zeros(N, N, dtype=torch.long)
    for i in range(wh * ww):
        for j in range(wh * ww):
            yi, xi, yj, xj = i // ww, i % ww, j // ww, j % ww
            index[i + 1, j + 1] = (yi - yj + wh - 1) * (2 * ww - 1) + (xi - xj + ww - 1)
    index[0, 0:] = n_rel - 3
    index[0:, 0] = n_rel - 2
    index[0, 0] = n_rel - 1
    return index


# ----------------------------------------------------------------------------------------------------------
# the reference
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("window", [(14, 14), (3, 5), (1, 1), (8, 8)])
def test_relative_position_index_matches_unilm(window):
    idx = relative_position_index(window)
    assert idx.dtype == torch.long and idx.shape == (window[0] * window[1] + 1,) * 2
    assert torch.equal(idx, unilm_index(*window))
    idx[0, 0] = -5   # the caller owns the returned tensor: the cache is untouched
    assert relative_position_index(window)[0, 0] == num_relative_distance(window) - 1


def test_reference_matches_plain_eager():
    B, H, wh, ww, D = 2, 3, 4, 5, 16
    N, R = wh * ww + 1, num_relative_distance((wh, ww))
    q, k, v = (torch.randn(B, H, N, D, dtype=torch.float64) for _ in range(3))
    table = torch.randn(R, H, dtype=torch.float64)
    # timm's Attention.forward, unfused path, written out
    bias = table[unilm_index(wh, ww).view(-1)].view(N, N, H).permute(2, 0, 1).contiguous()
    attn = (q * D ** -0.5) @ k.transpose(-2, -1) + bias.unsqueeze(0)
    expected = attn.softmax(dim=-1) @ v
    torch.testing.assert_close(rel_pos_attention_ref(q, k, v, table, window_size=(wh, ww)), expected)
    got = rel_pos_attention(q, k, v, table, window_size=(wh, ww), backend="reference")
    torch.testing.assert_close(got, expected)
    # fp16 with upcast: computed in fp32, returned in fp16
    out16 = rel_pos_attention_ref(q.half(), k.half(), v.half(), table.float(), window_size=(wh, ww), upcast=True)
    assert out16.dtype == torch.float16
    assert_close("out16", out16.double(), expected, tolerance("rel_pos_attention.reference_upcast", torch.float16))


# ----------------------------------------------------------------------------------------------------------
# Triton against float64
# ----------------------------------------------------------------------------------------------------------

def case_inputs(B, H, shape, D, dtype, packed, device):
    """N, the index keyword ({'window_size': shape}, or an explicit random rel_index when shape is an int N)
    and make_inputs(...) for one case."""
    if isinstance(shape, tuple):
        N, R = shape[0] * shape[1] + 1, num_relative_distance(shape)
        kw = {"window_size": shape}
    else:
        N, R = shape, 11
        kw = {"rel_index": random_index(N, R).to(device)}
    return N, kw, make_inputs(B, H, N, D, dtype, R, packed=packed, device=device)


# (B, H, window or N, D, dtype, packed); N given as an int means an explicit random rel_index.
CASES = [
    pytest.param(2, 2, (14, 14), 64, torch.float32, False, id="N197-d64-fp32"),
    pytest.param(2, 2, (14, 14), 64, torch.float16, True, id="N197-d64-fp16-packed"),
    pytest.param(1, 12, (14, 14), 64, torch.float16, True, id="beit-base-heads-N197-fp16-packed"),
    pytest.param(3, 1, (8, 8), 32, torch.float32, True, id="N65-d32-fp32-packed-B3"),
    pytest.param(1, 2, (8, 8), 80, torch.float16, False, id="N65-d80-fp16"),
    pytest.param(2, 1, (4, 4), 128, torch.float32, False, id="N17-d128-fp32"),
    pytest.param(1, 2, 1, 32, torch.float32, False, id="N1-index-fp32"),
    pytest.param(2, 2, 7, 64, torch.float16, True, id="N7-index-fp16-packed"),
    pytest.param(1, 2, 273, 32, torch.float32, False, id="N273-index-fp32"),
    pytest.param(1, 2, (24, 24), 64, torch.float16, False, id="N577-d64-fp16"),
    pytest.param(1, 1, (32, 32), 64, torch.float32, True, id="N1025-d64-fp32-packed", marks=pytest.mark.slow),
    pytest.param(1, 16, (14, 14), 64, torch.float32, False, id="beit-large-heads-N197-fp32", marks=pytest.mark.slow),
]


@needs_triton
@pytest.mark.parametrize("packed", [False, True], ids=["qkv", "packed"])
def test_half_precision_table(packed):
    """A fp16 table (a model cast to half): the kernels read it as fp32 and return its gradient in fp16."""
    N, kw, (inputs, _, grad) = case_inputs(2, 2, (4, 4), 32, torch.float16, packed, DEVICE)
    table = (torch.randn(num_relative_distance((4, 4)), 2, device=DEVICE) * 2).half()
    fn = rel_pos_attention_qkvpacked if packed else rel_pos_attention
    out, grads = run(fn, inputs, table, grad, backend="triton", **kw)
    assert grads[-1].dtype == torch.float16
    assert_matches_fp64(packed, inputs, table, grad, out, grads, torch.float16, kw)


@needs_triton
@pytest.mark.parametrize("B,H,shape,D,dtype,packed", CASES)
def test_triton_matches_fp64_reference(B, H, shape, D, dtype, packed):
    N, kw, (inputs, table, grad) = case_inputs(B, H, shape, D, dtype, packed, DEVICE)
    fn = rel_pos_attention_qkvpacked if packed else rel_pos_attention
    out, grads = run(fn, inputs, table, grad, backend="triton", **kw)
    assert out.shape == grad.shape and out.dtype == dtype
    assert_matches_fp64(packed, inputs, table, grad, out, grads, dtype, kw)


@pytest.mark.skipif(CUDA or not INTERPRET, reason="interpreter check of the GPU tile shapes")
@pytest.mark.parametrize("config,D,dtype", [
    ("16bit_d64", 64, torch.float16), ("16bit_d128", 80, torch.float16), ("fp32", 128, torch.float32),
    pytest.param("16bit_d64", 64, torch.bfloat16, marks=needs_bf16()),
    pytest.param("16bit_d128", 80, torch.bfloat16, marks=needs_bf16())], ids=str)
def test_gpu_tile_configs(monkeypatch, config, D, dtype):
    """The GPU's tile shapes (128-row forward, 32x64 dK/dV, 64x32 dQ, ...) run through the same masks here;
    in bf16 (emulated) under the 2x rule."""
    from beit_fast.kernels import rel_pos_attention as K
    monkeypatch.setattr(K, "pick_configs", lambda *a: K.CONFIGS[config])
    W = (8, 8)
    if dtype == torch.bfloat16:
        _check_two_x(2, 1, W, D, dtype, False, device=DEVICE)
        return
    inputs, table, grad = make_inputs(2, 1, 65, D, dtype, num_relative_distance(W))
    out, grads = run(rel_pos_attention, inputs, table, grad, window_size=W, backend="triton")
    assert_matches_fp64(False, inputs, table, grad, out, grads, dtype, {"window_size": W})


def test_tail_tiles():
    """The inner loops run N // block whole blocks unmasked, then the rest in the smallest power of two >= 16
    (wgmma's smallest N / K extent) that holds it; -1 = no peeling (every step masked)."""
    from beit_fast.kernels.rel_pos_attention import _tail
    assert [_tail(n, 64) for n in (197, 273, 50, 64, 128, 1, 577, 97)] == [16, 32, 64, 0, 0, 16, 16, 64]
    assert [_tail(n, 32) for n in (197, 7, 32)] == [16, 16, 0]
    assert _tail(197, 16) == 16 and _tail(197, 64, peel=False) == -1
    # the last program's own tile: smaller only when that saves rows, and only when the config asks
    from beit_fast.kernels.rel_pos_attention import _block_tail
    assert [_block_tail(n, 64, True) for n in (197, 273, 50, 128, 1)] == [16, 32, 0, 0, 16]
    assert _block_tail(197, 128, True) == 0 and _block_tail(197, 64, False) == 0


@pytest.mark.skipif(CUDA or not INTERPRET, reason="interpreter check of every loop ending (a GPU runs its own "
                    "tile configs at the odd N of the other tests; 20 more compiles would not fit gpu_check's time)")
@pytest.mark.parametrize("shape,tail", [(64, 0), (128, 0), ((7, 7), 64), (97, 64), (273, 32)])
@pytest.mark.parametrize("peel", [True, False])
def test_inner_loop_tails(monkeypatch, shape, tail, peel):
    """Every inner-loop ending of the three kernels (the interpreter's 64-wide blocks): N a multiple of the
    block (no tail step), tails of 32 and of a whole masked block, and the unpeeled masked loop; each kernel's
    last program with its smaller own tile (block_tail) under both."""
    from beit_fast.kernels import rel_pos_attention as K
    cfg = K.TileConfig(64, 64, tail=peel, block_tail=True)
    monkeypatch.setattr(K, "pick_configs", lambda *a: K.AttnConfigs(cfg, cfg, cfg))
    N, kw, (inputs, table, grad) = case_inputs(2, 1, shape, 16, torch.float32, False, DEVICE)
    assert K._tail(N, 64) == tail
    out, grads = run(rel_pos_attention, inputs, table, grad, backend="triton", **kw)
    assert_matches_fp64(False, inputs, table, grad, out, grads, torch.float32, kw)


@needs_triton
@pytest.mark.parametrize("shape,dtype,tile", [
    ((14, 14), torch.float16, None), ((3, 5), torch.float32, None), (37, torch.float32, None),
    ((7, 7), torch.float32, (32, 32, False, True))],
    ids=["N197-fp16", "window3x5-fp32", "index-N37-fp32", "N50-masked-loops-blocktail"])
def test_dense_bias_is_bitwise_the_gather(monkeypatch, shape, dtype, tile):
    """A tile config with dense_bias reads the bias from the launcher's (H, N, N_pad) expansion of the table
    instead of gathering it in the kernel: the same fp32 values, so the output and every gradient are bitwise
    those of the gathering kernels (each kernel switched alone, then all three), for BEiT's window layout and
    an explicit index; also with 32x32 tiles whose inner loops mask every step (reading columns past N_pad)
    and whose last programs take a 32-row block tail."""
    import dataclasses
    from beit_fast.kernels import rel_pos_attention as K
    N, kw, (inputs, table, grad) = case_inputs(2, 2, shape, 32, dtype, True, DEVICE)
    if tile is None:
        base = K.pick_configs(32, dtype, torch.device(DEVICE))
    else:
        t = K.TileConfig(tile[0], tile[1], tail=tile[2], block_tail=tile[3])
        base = K.AttnConfigs(t, t, t)
    results = {}
    for which in ("none", "fwd", "dkdv", "dq", "all"):
        if which in ("none", "all"):
            cfgs = K.with_dense_bias(base, which == "all")
        else:
            cfgs = dataclasses.replace(base, **{which: dataclasses.replace(getattr(base, which), dense_bias=True)})
        monkeypatch.setattr(K, "pick_configs", lambda *a, c=cfgs: c)
        results[which] = run(rel_pos_attention_qkvpacked, inputs, table, grad, backend="triton", **kw)
    out0, grads0 = results["none"]
    assert torch.isfinite(out0).all() and all(torch.isfinite(g).all() for g in grads0)
    for which, (out, grads) in results.items():
        assert torch.equal(out, out0), which
        assert all(torch.equal(a, b) for a, b in zip(grads, grads0)), which


@needs_triton
def test_bench_dense_bias_switch_pins_both_sides(monkeypatch):
    """bench_attention's "ours*" providers pin their kernels' bias source and launch path (dense_bias(kernels,
    cached_launch)): the kernels each provider names read the expansion and the others gather, whatever
    BEIT_FAST_ATTN_DENSE_BIAS (kernels.rel_pos_attention.DENSE_BIAS) says, launches go through the launch
    cache or not, and both settings come back afterwards."""
    import sys
    from beit_fast.kernels import rel_pos_attention as K
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    try:
        bench_attention = importlib.import_module("bench_attention")
    finally:
        sys.path.pop(0)
    sources, expansions = [], []
    real_for_kernel, real_expand = K._BiasArgs.for_kernel, K._expand_bias
    monkeypatch.setattr(K._BiasArgs, "for_kernel", lambda self, cfg, key_major=False:
                        sources.append(cfg.dense_bias) or real_for_kernel(self, cfg, key_major))
    monkeypatch.setattr(K, "_expand_bias", lambda b, query_major=True, key_major=False:
                        expansions.append((query_major, key_major)) or real_expand(b, query_major, key_major))
    W = (3, 3)
    inputs, table, grad = make_inputs(1, 2, 10, 16, torch.float32, num_relative_distance(W), packed=True)
    from beit_fast.kernels import _launch
    launch_setting = _launch.ENABLED
    assert set(bench_attention.OURS_VARIANTS) == {p for p in bench_attention.PROVIDERS if p.startswith("ours")}
    for setting in (None, frozenset(), frozenset(K.KERNELS), frozenset({"dkdv"})):
        monkeypatch.setattr(K, "DENSE_BIAS", setting)
        for name, (dense, cached) in bench_attention.OURS_VARIANTS.items():
            sources.clear()
            expansions.clear()
            with bench_attention.dense_bias(dense, cached):
                assert _launch.ENABLED == (cached and _launch.CONVENTION is not None)
                run(rel_pos_attention_qkvpacked, inputs, table, grad, window_size=W, backend="triton")
                if dense is None:   # the configs decide, whatever the setting
                    assert K.DENSE_BIAS is None
                    cfgs = K.pick_configs(16, torch.float32, torch.device(DEVICE))
                    dense = [k for k in K.KERNELS if getattr(cfgs, k).dense_bias]
            assert sources == [k in dense for k in ("fwd", "dkdv", "dq")], (setting, name, sources)
            # the forward's query-major expansion, then one launch for the backward's: dQ's query-major and /
            # or dK/dV's key-major one
            want = [(True, False)] * ("fwd" in dense)
            want += [("dq" in dense, "dkdv" in dense)] if {"dq", "dkdv"} & set(dense) else []
            assert expansions == want, (setting, name, expansions)
            assert K.DENSE_BIAS is setting and _launch.ENABLED == launch_setting


def test_dense_bias_setting(monkeypatch):
    """BEIT_FAST_ATTN_DENSE_BIAS overrides the kernels' bias source: 1 every kernel, 0 none, or a
    comma-separated subset of kernels; anything else is refused, naming what is accepted."""
    from beit_fast.kernels import rel_pos_attention as K
    for value, want in (("", None), ("0", frozenset()), ("1", frozenset({"fwd", "dkdv", "dq"})),
                        ("fwd,dq", frozenset({"fwd", "dq"})), (" dkdv ", frozenset({"dkdv"}))):
        monkeypatch.setenv("BEIT_FAST_ATTN_DENSE_BIAS", value)
        assert K._dense_bias_setting() == want, value
    for bad in ("yes", "fwd,dv", ","):
        monkeypatch.setenv("BEIT_FAST_ATTN_DENSE_BIAS", bad)
        with pytest.raises(ValueError, match=r"must be 0, 1 or a comma-separated subset of \('fwd', 'dkdv', 'dq'\)"):
            K._dense_bias_setting()
    monkeypatch.setattr(K, "DENSE_BIAS", frozenset(K.KERNELS))
    cfgs = K.pick_configs(64, torch.float16, torch.device(DEVICE))
    assert all(getattr(cfgs, k).dense_bias for k in ("fwd", "dkdv", "dq"))
    assert K.with_dense_bias(cfgs, False) == K.with_dense_bias(K.CONFIGS["interpret" if DEVICE == "cpu"
                                                                        else "16bit_d64"], False)
    with pytest.raises(TypeError, match="names of kernels"):
        K.with_dense_bias(cfgs, "fwd")
    monkeypatch.setattr(K, "DENSE_BIAS", frozenset({"fwd", "dq"}))
    cfgs = K.pick_configs(64, torch.float16, torch.device(DEVICE))
    assert (cfgs.fwd.dense_bias, cfgs.dkdv.dense_bias, cfgs.dq.dense_bias) == (True, False, True)
    assert K.with_dense_bias(cfgs, ("dkdv",)) == K.with_dense_bias(K.with_dense_bias(cfgs, True), {"dkdv"})


def test_dense_bias_expansion_matches_the_table():
    """_expand_bias: [h, i, j] = log2(e) * table[index[i, j], h] in fp32 (rows padded to 16 elements), and its
    key-major transpose [h, j, i] (dK/dV's), for the window layout (index derived from the window) and an
    explicit index."""
    if not RUN_TRITON:
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    from beit_fast.kernels import rel_pos_attention as K
    W = (3, 4)
    N, R = 13, num_relative_distance(W)
    table = torch.randn(R, 3, device=DEVICE)
    index = relative_position_index(W).to(DEVICE)
    want = (table.float() * K.LOG2E)[index].permute(2, 0, 1)
    for kw in ({"window_size": W}, {"rel_index": index}):
        b = K._BiasArgs(table, kw.get("rel_index"), kw.get("window_size"), N)
        got, none = K._expand_bias(b)
        assert none is None and got.shape == (3, N, 16) and got.stride(1) == 16
        torch.testing.assert_close(got[:, :, :N], want, rtol=0, atol=0)
        assert torch.equal(got[:, :, N:], torch.zeros(3, N, 16 - N, device=DEVICE))   # padding: zeros
        none, got_t = K._expand_bias(b, query_major=False, key_major=True)
        assert none is None and got_t.shape == (3, N, 16) and got_t.stride(1) == 16
        torch.testing.assert_close(got_t[:, :, :N], want.transpose(1, 2), rtol=0, atol=0)
        assert torch.equal(got_t[:, :, N:], torch.zeros(3, N, 16 - N, device=DEVICE))
        both = K._expand_bias(b, query_major=True, key_major=True)   # one launch writing both
        assert torch.equal(both[0], got) and torch.equal(both[1], got_t)


def test_dense_bias_size_cap(monkeypatch):
    """The tile configs' dense_bias is honoured while one expansion fits DENSE_MAX_BYTES; past it the kernels
    gather, unless BEIT_FAST_ATTN_DENSE_BIAS (kernels.rel_pos_attention.DENSE_BIAS) asks for the expansion."""
    if not RUN_TRITON:
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    from beit_fast.kernels import rel_pos_attention as K
    W, N = (3, 4), 13
    table = torch.randn(num_relative_distance(W), 3, device=DEVICE)
    dense_cfg = K.TileConfig(64, 64, dense_bias=True)
    bytes_needed = 3 * N * 16 * 4
    for cap, setting, want_dense in ((bytes_needed, None, True), (bytes_needed - 1, None, False),
                                     (bytes_needed - 1, frozenset(K.KERNELS), True)):
        monkeypatch.setattr(K, "DENSE_MAX_BYTES", cap)
        monkeypatch.setattr(K, "DENSE_BIAS", setting)
        b = K._BiasArgs(table, None, W, N)
        for key_major, dense_src in ((False, K.SRC_DENSE_ID), (True, K.SRC_DENSE_T_ID)):
            src = b.for_kernel(dense_cfg, key_major=key_major)[-1]
            assert src == (dense_src if want_dense else K.SRC_WINDOW_ID), (cap, setting, key_major)
        assert (b._dense is not None) == want_dense and (b._dense_t is not None) == want_dense


@needs_triton
@pytest.mark.parametrize("groups", [1, 3, 5])
def test_batch_groups(monkeypatch, groups):
    """dBias partials over G batch groups (uneven split for G=3 of B=5) reduce to the same table gradient."""
    from beit_fast.kernels import rel_pos_attention as K
    monkeypatch.setattr(K, "num_batch_groups", lambda B, *a: min(B, groups))
    W = (3, 3)
    inputs, table, grad = make_inputs(5, 2, 10, 16, torch.float32, num_relative_distance(W), packed=True)
    out, grads = run(rel_pos_attention_qkvpacked, inputs, table, grad, window_size=W, backend="triton")
    assert_matches_fp64(True, inputs, table, grad, out, grads, torch.float32, {"window_size": W})


def _packed_dq(B, H, N, D, dtype, device="meta"):
    return torch.empty(B, N, 3, H, D, dtype=dtype, device=device)[:, :, 0].transpose(1, 2)


@pytest.mark.parametrize("case", [
    # (dq, G asked) -> (in dQ, G used, rows per chunk, chunk stride in fp32)
    ("contiguous BEiT-B bf16 B=128", lambda: torch.empty(128, 12, 197, 64, dtype=torch.bfloat16, device="meta"),
     11, (True, 11, 1, 208)),
    # rows of 197 fp32 are 208 apart (16-aligned); each token's 12*64 bf16 = 384 fp32 hold one;
    # 128*197 rows / (12*197) per group -> 10 groups
    ("packed BEiT-B bf16 B=128", lambda: _packed_dq(128, 12, 197, 64, torch.bfloat16), 11, (True, 10, 1, 3 * 384)),
    # BEiT-L: 16*64 bf16 = 512 fp32 per token, two rows of 208; 64*197*2 / (16*197) -> 8 of the 9 asked
    ("packed BEiT-L bf16 B=64", lambda: _packed_dq(64, 16, 197, 64, torch.bfloat16), 9, (True, 8, 2, 3 * 512)),
    # room for 5 groups of the 11 asked: under half, so a buffer of their own
    ("packed BEiT-B bf16 B=64", lambda: _packed_dq(64, 12, 197, 64, torch.bfloat16), 11, (False, 11, 1, 208)),
    # a token's 2*8 fp16 = 8 fp32 cannot hold a row of 17
    ("packed, rows longer than a token", lambda: _packed_dq(4, 2, 17, 8, torch.float16), 2, (False, 2, 1, 32)),
    # a (B, N, H, D) tensor seen as (B, H, N, D): one chunk per token too; 9*64 fp32 hold 36 rows of 4 (16 apart)
    ("(B, N, H, D) transposed", lambda: torch.empty(2, 4, 9, 64, device="meta").transpose(1, 2), 1,
     (True, 1, 36, 576)),
    ("a view of part of each row", lambda: torch.empty(2, 4, 9, 128, device="meta")[..., :64], 1,
     (False, 1, 1, 16)),
])
def test_partials_layout(case):
    """Where the table gradient's partials go: into dQ's memory when they fit with at least half the groups."""
    from beit_fast.kernels import rel_pos_attention as K
    _, make_dq, G, want = case
    dq = make_dq()
    B, H, N, D = dq.shape
    part = K._partials_layout(dq, G, H, N, in_dq=True)
    assert (part.in_dq, part.G, part.rows_per_chunk, part.chunk_stride) == want
    assert part.buf.dtype == torch.float32
    if part.in_dq:   # every row of every group inside dQ's own elements (packed: not dK's or dV's)
        rows = torch.arange(part.G * H * N)
        pitch = part.row_pitch
        assert pitch % 16 == 0 and pitch >= N and part.chunk_stride % 16 == 0
        start = (rows // part.rows_per_chunk) * part.chunk_stride + (rows % part.rows_per_chunk) * pitch
        f32 = dq.element_size() / 4
        chunk, chunks = (pitch, dq.numel() * f32 // pitch) if dq.is_contiguous() else (H * D * f32, B * N)
        assert int((start % part.chunk_stride).max()) + pitch <= chunk   # the whole padded row is written
        assert int(start.max()) // part.chunk_stride < chunks
    else:
        assert part.buf.shape == (G * H * N, part.row_pitch)
    assert not K._partials_layout(dq, G, H, N, in_dq=False).in_dq


@needs_triton
@pytest.mark.parametrize("packed,dtype,shape,in_dq", [
    (True, torch.float16, (3, 2, 10, 32), True),    # 2*32 fp16 = 32 fp32 per token: 2 rows of 10 (16 apart)
    (True, torch.float32, (2, 2, 17, 16), True),    # 32 fp32 per token: one row of 17 (pitch 32)
    (True, torch.float16, (2, 2, 17, 8), False),    # 8 fp32 per token: no room, own buffer
    (False, torch.float32, (3, 2, 10, 16), True),   # contiguous dQ
    (False, torch.float16, (1, 2, 37, 8), False),   # 1*2*37*8 fp16 = 296 fp32: 6 rows of 48, not 2*37
])
def test_partials_in_dq_memory(monkeypatch, packed, dtype, shape, in_dq):
    """The table gradient through partials kept in dQ's memory (which the dQ kernel then overwrites: outputs
    start as NaN and are poisoned again after the partials are reduced) or in a buffer of their own."""
    from beit_fast.kernels import rel_pos_attention as K
    seen = []
    layout = K._partials_layout
    monkeypatch.setattr(K, "_partials_layout", lambda *a: seen.append(layout(*a)) or seen[-1])
    monkeypatch.setattr(K, "num_batch_groups", lambda B, *a: min(B, 2))
    B, H, N, D = shape
    W = {10: (3, 3), 17: (4, 4), 37: (6, 6)}[N]
    inputs, table, grad = make_inputs(B, H, N, D, dtype, num_relative_distance(W), packed=packed)
    fn = rel_pos_attention_qkvpacked if packed else rel_pos_attention
    out, grads = run(fn, inputs, table, grad, window_size=W, backend="triton")
    assert [p.in_dq for p in seen] == [in_dq]
    assert_matches_fp64(packed, inputs, table, grad, out, grads, dtype, {"window_size": W})


@needs_triton
def test_packed_equals_unpacked_and_custom_scale():
    B, H, N, D, W = 2, 2, 17, 32, (4, 4)
    (qkv,), table, grad = make_inputs(B, H, N, D, torch.float32, num_relative_distance(W), packed=True)
    kw = {"window_size": W, "scale": 0.3, "backend": "triton"}
    out_p, (dqkv, dt_p) = run(rel_pos_attention_qkvpacked, [qkv], table, grad, **kw)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    out_u, (dq, dk, dv, dt_u) = run(rel_pos_attention, [q, k, v], table, grad.view(B, N, H, D).transpose(1, 2), **kw)
    torch.testing.assert_close(out_p, out_u.transpose(1, 2).reshape(B, N, H * D), atol=0, rtol=0)
    torch.testing.assert_close(dqkv, torch.stack([g.transpose(1, 2) for g in (dq, dk, dv)], 2), atol=0, rtol=0)
    torch.testing.assert_close(dt_p, dt_u, atol=0, rtol=0)
    assert_matches_fp64(True, [qkv], table, grad, out_p, [dqkv, dt_p], torch.float32, {"window_size": W, "scale": 0.3})


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("masked", [float("-inf"), torch.finfo(torch.float32).min], ids=["-inf", "finfo.min"])
def test_keys_masked_through_a_minus_inf_table_row(dtype, masked):
    """An explicit rel_index may mask pairs through a table row of -inf (or finfo.min, -inf once the kernels
    scale it by log2(e)). Every key of the first key block masked used to make each row NaN (the online
    softmax's max stayed -inf: exp2(-inf - -inf)), output and every gradient; the reference is finite."""
    B, H, N, D, R = 2, 2, 80, 16, 10
    inputs, table, grad = make_inputs(B, H, N, D, dtype, R)
    table[R - 1] = masked
    index = random_index(N, R - 1)
    index[:, :64] = R - 1                       # keys 0..63 (the first block and more) masked for every query
    index = index.to(DEVICE)
    out, grads = run(rel_pos_attention, inputs, table, grad, rel_index=index, backend="triton")
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert_matches_fp64(False, inputs, table, grad, out, grads, dtype, dict(rel_index=index))


@needs_triton
def test_window_index_in_kernel_equals_explicit_index():
    W = (3, 5)
    N, R = 16, num_relative_distance(W)
    inputs, table, grad = make_inputs(2, 2, N, 32, torch.float32, R)
    a = run(rel_pos_attention, inputs, table, grad, window_size=W, backend="triton")
    b = run(rel_pos_attention, inputs, table, grad, rel_index=relative_position_index(W).to(DEVICE), backend="triton")
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dropout_matches_reference_with_reproduced_mask(dtype):
    B, H, W, D, p = 2, 2, (4, 4), 32, 0.3
    N, R = 17, num_relative_distance(W)
    inputs, table, grad = make_inputs(B, H, N, D, dtype, R)
    seed = 1234
    out, grads = run(rel_pos_attention, inputs, table, grad, window_size=W, dropout_p=p, dropout_seed=seed,
                     backend="triton")
    keep = dropout_keep_mask(seed, B, H, N, p, device=DEVICE)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.05
    mask = keep.double() / (1 - p)
    assert_matches_fp64(False, inputs, table, grad, out, grads, dtype, {"window_size": W, "dropout_mask": mask})
    again = run(rel_pos_attention, inputs, table, grad, window_size=W, dropout_p=p, dropout_seed=seed,
                backend="triton")
    torch.testing.assert_close(again[0], out, atol=0, rtol=0)
    other = rel_pos_attention(*inputs, table, window_size=W, dropout_p=p, dropout_seed=seed + 1, backend="triton")
    assert not torch.equal(other, out)


@needs_triton
def test_dropout_mask_statistics():
    """The keep-mask the kernels draw (the oracle of the dropout tests is this same draw, so its randomness is
    checked here): keep rate 1 - p in every (batch, head) and across rows and columns, a different mask in
    every (batch, head) and for every seed, and rows uncorrelated (agreement p^2 + (1-p)^2). Binomial bounds
    at 6 sigma or more."""
    B, H, N, p = 2, 3, 64, 0.3
    keep = dropout_keep_mask(4321, B, H, N, p, device=DEVICE).float().reshape(B * H, N, N)
    assert torch.allclose(keep.mean((1, 2)), torch.full((B * H,), 1 - p, device=DEVICE), atol=0.05)
    for dim in (1, 2):   # every row / column keeps 1 - p of its N entries on average over the masks
        assert (keep.mean((0, dim)) - (1 - p)).abs().max().item() < 0.15
    agree = 1 - p * (1 - p) * 2                                  # chance two independent entries agree
    flat = keep.reshape(B * H, -1)
    for i in range(B * H):
        for j in range(i):
            assert abs((flat[i] == flat[j]).float().mean().item() - agree) < 0.05, (i, j)
    rows = (keep[:, 1:] == keep[:, :-1]).float().mean().item()   # neighbouring rows, and columns
    cols = (keep[:, :, 1:] == keep[:, :, :-1]).float().mean().item()
    assert abs(rows - agree) < 0.02 and abs(cols - agree) < 0.02, (rows, cols)
    other = dropout_keep_mask(4322, B, H, N, p, device=DEVICE).float().reshape(B * H, -1)
    assert abs((other == flat).float().mean().item() - agree) < 0.02
    # seeds past 32 bits and negative ones are seeds of their own: no (batch, head) of theirs repeats one of
    # another seed (the head once went into the key's high word: seed + 2**32 gave seed's masks a head over)
    for far in (4321 + 2**32, 4321 - 2**32, -4321):
        alias = dropout_keep_mask(far, B, H, N, p, device=DEVICE).reshape(B * H, -1)
        for i in range(B * H):
            for j in range(B * H):
                assert abs((alias[i].float() == flat[j]).float().mean().item() - agree) < 0.05, (far, i, j)


@needs_triton
def test_dropout_without_seed_draws_from_torch_generator():
    """Without dropout_seed the kernel's seed is drawn from torch's generator: replayed by manual_seed,
    different for another seed, and the generator advances; dropout really applies."""
    W = (2, 2)
    inputs, table, _ = make_inputs(1, 2, 5, 16, torch.float32, num_relative_distance(W))
    rng_state = torch.cuda.get_rng_state if DEVICE == "cuda" else torch.get_rng_state
    torch.manual_seed(7)
    before = rng_state()
    a = rel_pos_attention(*inputs, table, window_size=W, dropout_p=0.5, backend="triton")
    assert not torch.equal(rng_state(), before)
    torch.manual_seed(7)
    b = rel_pos_attention(*inputs, table, window_size=W, dropout_p=0.5, backend="triton")
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.manual_seed(8)
    assert not torch.equal(rel_pos_attention(*inputs, table, window_size=W, dropout_p=0.5, backend="triton"), a)
    assert not torch.equal(rel_pos_attention(*inputs, table, window_size=W, backend="triton"), a)


@pytest.mark.parametrize("packed", [False, True])
def test_reference_dropout_follows_its_seed(packed):
    """The reference backend's dropout is reproducible from dropout_seed (its own generator; the global
    generator neither decides the mask nor advances), and different seeds give different masks."""
    W = (2, 2)
    inputs, table, _ = make_inputs(1, 2, 5, 16, torch.float32, num_relative_distance(W), packed=packed)
    fn = rel_pos_attention_qkvpacked if packed else rel_pos_attention

    def go(seed):
        return fn(*inputs, table, window_size=W, dropout_p=0.5, backend="reference", dropout_seed=seed)
    torch.manual_seed(1)
    a = go(3)
    state = torch.get_rng_state()
    torch.manual_seed(2)
    b = go(torch.tensor([3]))
    assert torch.equal(a, b) and not torch.equal(a, go(4))
    torch.manual_seed(2)
    go(3)
    torch.manual_seed(1)
    assert torch.equal(torch.get_rng_state(), state)


@needs_triton
@pytest.mark.parametrize("packed", [False, True])
def test_table_gradient_is_bitwise_deterministic(packed):
    B, H, W, D = 5, 2, (4, 4), 32   # several batches per group: the partial sums see read-modify-writes
    inputs, table, grad = make_inputs(B, H, 17, D, torch.float32, num_relative_distance(W), packed=packed)
    fn = rel_pos_attention_qkvpacked if packed else rel_pos_attention
    first = run(fn, inputs, table, grad, window_size=W, backend="triton")[1]
    second = run(fn, inputs, table, grad, window_size=W, backend="triton")[1]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_triton
def test_frozen_table_and_partial_grads():
    W = (2, 3)
    (q, k, v), table, grad = make_inputs(2, 2, 7, 32, torch.float32, num_relative_distance(W))
    q = q.requires_grad_()
    out = rel_pos_attention(q, k, v, table, window_size=W, backend="triton")
    (dq,) = torch.autograd.grad(out, [q], grad)
    q64 = q.detach().double().requires_grad_()
    ref = rel_pos_attention_ref(q64, k.double(), v.double(), table.double(), window_size=W)
    (dq64,) = torch.autograd.grad(ref, [q64], grad.double())
    assert_close("dq", dq.double(), dq64, tolerance("rel_pos_attention", torch.float32, "dq"))


@needs_triton
@pytest.mark.parametrize("packed", [False, True], ids=["qkv", "packed"])
def test_table_gradient_when_only_the_table_requires_grad(packed):
    """The backward computes the table gradient whenever the table requires grad, whatever q, k, v (or qkv)
    do: frozen here, with (plain layout) q and k requiring grad and v frozen as a second case. Each gradient
    asked for matches the fp64 reference."""
    W = (2, 3)
    R = num_relative_distance(W)
    inputs, table, grad = make_inputs(2, 2, 7, 32, torch.float32, R, packed=packed)
    fn = rel_pos_attention_qkvpacked if packed else rel_pos_attention
    ref = ref_fn(packed)
    trainable = [[]] if packed else [[], [0, 1]]   # which of q, k, v require grad besides the table
    for which in trainable:
        leaves = [t.detach().clone().requires_grad_(i in which) for i, t in enumerate(inputs)]
        tbl = table.detach().clone().requires_grad_()
        wanted = [leaves[i] for i in which] + [tbl]
        got = torch.autograd.grad(fn(*leaves, tbl, window_size=W, backend="triton"), wanted, grad)
        leaves64 = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
        tbl64 = table.detach().double().requires_grad_()
        want = torch.autograd.grad(ref(*leaves64, tbl64, window_size=W), [leaves64[i] for i in which] + [tbl64],
                                   grad.double())
        for name, g, g64 in zip(["dq", "dk"][:len(which)] + ["dtable"], got, want):
            assert_close(f"{name} (trainable inputs {which})", g.double(), g64,
                         tolerance("rel_pos_attention", torch.float32, name))


@needs_triton
def test_transposed_windows_in_one_process():
    """Windows (3, 5) and (5, 3) have the same N (16) and the same table size R (48) but different indexes:
    the per-window data cached for the kernels (the in-kernel index's token parts, the table gradient's
    inverse index) is keyed by the window, not by N or R. Both windows, one after the other (each order),
    match the fp64 reference in the output and the table gradient."""
    for windows in (((3, 5), (5, 3)), ((5, 3), (3, 5))):
        for W in windows:
            N, R = W[0] * W[1] + 1, num_relative_distance(W)
            assert (N, R) == (16, 48)
            (q, k, v), table, grad = make_inputs(1, 2, N, 16, torch.float32, R)
            tbl = table.clone().requires_grad_()
            out = rel_pos_attention(q, k, v, tbl, window_size=W, backend="triton")
            (dtable,) = torch.autograd.grad(out, [tbl], grad)
            tbl64 = table.double().requires_grad_()
            out64 = rel_pos_attention_ref(q.double(), k.double(), v.double(), tbl64, window_size=W)
            (dtable64,) = torch.autograd.grad(out64, [tbl64], grad.double())
            assert_close(f"out {W}", out.detach().double(), out64, tolerance("rel_pos_attention", torch.float32, "out"))
            assert_close(f"dtable {W}", dtable.double(), dtable64,
                         tolerance("rel_pos_attention", torch.float32, "dtable"))


def _expected_window_parts(wh, ww):
    return torch.tensor([0] + [(p // ww) * (2 * ww - 1) + p % ww for p in range(wh * ww)], dtype=torch.int32)


@needs_cuda
def test_window_parts_built_on_a_busy_stream_are_ready_for_every_stream(monkeypatch):
    """The cached token parts of a window, first built on a side stream still busy with earlier work, are
    read straight away on another stream: the build is waited for before the tensor is cached and shared."""
    from beit_fast.kernels import rel_pos_attention as K
    monkeypatch.setattr(K, "_PARTS_CACHE", {})
    device = torch.device("cuda", torch.cuda.current_device())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)   # keeps the side stream busy (about 0.1 s) before the build's kernels
        parts = K._window_parts(14, 14, device)
    assert torch.equal(parts.cpu(), _expected_window_parts(14, 14))   # read on the default stream
    assert K._window_parts(14, 14, device) is parts


@needs_cuda
def test_window_parts_built_under_graph_capture_are_not_cached(monkeypatch):
    """A first build inside CUDA graph capture is written only when the graph replays: it is not cached (an
    eager call after the capture would otherwise read a tensor nothing has written); the captured one holds
    the parts after a replay, and the next eager call builds and caches its own."""
    from beit_fast.kernels import rel_pos_attention as K
    monkeypatch.setattr(K, "_PARTS_CACHE", {})
    device = torch.device("cuda", torch.cuda.current_device())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = K._window_parts(6, 5, device)
    assert K._PARTS_CACHE == {}
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured.cpu(), _expected_window_parts(6, 5))
    eager = K._window_parts(6, 5, device)
    assert eager is not captured and torch.equal(eager.cpu(), _expected_window_parts(6, 5))
    assert list(K._PARTS_CACHE) == [(6, 5, str(device))]


@needs_triton
def test_window_parts_match_the_unilm_index():
    """The parts on the kernels' device (the CPU under the interpreter) give unilm's index for every pair of
    patch tokens: part(i) + centre - part(j)."""
    from beit_fast.kernels import rel_pos_attention as K
    for wh, ww in ((14, 14), (3, 5), (1, 4)):
        parts = K._window_parts(wh, ww, torch.device(DEVICE)).cpu()
        assert torch.equal(parts, _expected_window_parts(wh, ww))
        centre = (wh - 1) * (2 * ww - 1) + ww - 1
        index = unilm_index(wh, ww)
        assert torch.equal((parts[1:, None] + centre - parts[None, 1:]).long(), index[1:, 1:].long())


@needs_triton
def test_one_explicit_index_with_tables_of_different_sizes():
    """The range check and the inverse index of an explicit index are cached per tensor and per table size R:
    the same index (values up to 11) with a 12-row table, then a 6-row one, is refused (ValueError, by both
    backends, not an IndexError from the reference's gather or an out-of-bounds kernel read); then with a
    20-row table it is valid, and its inverse has 20 rows and the gradients match the reference."""
    from beit_fast.kernels import rel_pos_attention as K
    N = 5
    (q, k, v), _, grad = make_inputs(1, 2, N, 16, torch.float32, 12)
    index = random_index(N, 12).to(DEVICE)
    index[0, 0] = 11

    def check(R):
        table = (torch.randn(R, 2, device=DEVICE) * 2)
        got = run(rel_pos_attention, [q, k, v], table, grad, rel_index=index, backend="triton")
        assert_matches_fp64(False, [q, k, v], table, grad, got[0], got[1], torch.float32, {"rel_index": index})

    check(12)
    small = torch.randn(6, 2, device=DEVICE)
    for backend in ("reference", "triton"):
        with pytest.raises(ValueError, match=r"\[0, 6\).*got values in \[\d+, 11\]"):
            rel_pos_attention(q, k, v, small, rel_index=index, backend=backend)
    # the cached inverse for R = 20 is that of R = 20 (checked before a kernel reads it: a stale 12-row one
    # would send the kernels past its end)
    perm, start, count, max_count = K.inverse_index_once(index, 20)
    fresh = K.build_inverse_index(index.clone(), 20)
    assert start.shape == count.shape == (20,)
    for name, a, b in zip(["perm", "start", "count"], (perm, start, count), fresh[:3]):
        assert torch.equal(a, b), name
    assert max_count == fresh[3]
    check(20)


# ----------------------------------------------------------------------------------------------------------
# bad inputs, backend selection
# ----------------------------------------------------------------------------------------------------------

def _good(B=2, H=2, W=(2, 2), D=16):
    N, R = W[0] * W[1] + 1, num_relative_distance(W)
    return [torch.randn(B, H, N, D) for _ in range(3)], torch.randn(R, H)


@pytest.mark.parametrize("mutate,match", [
    (lambda a, kw: a.__setitem__(1, torch.randn(2, 2, 4, 16)), r"\(B, H, N, D\)"),
    (lambda a, kw: a.__setitem__(0, torch.randn(2, 5, 16)), r"\(B, H, N, D\)"),
    (lambda a, kw: a.__setitem__(3, torch.randn(13, 2)), r"\(12, 2\)"),
    (lambda a, kw: a.__setitem__(3, torch.randn(12, 3)), r"\(R, H\) = \(R, 2\)"),
    (lambda a, kw: kw.update(window_size=(3, 3)), r"N = Wh\*Ww \+ 1 = 10"),
    (lambda a, kw: kw.update(window_size=(2, 0)), r"positive"),
    (lambda a, kw: kw.update(window_size=(2.7, 2)), r"pair of ints"),   # int() would make it (2, 2)
    (lambda a, kw: kw.update(rel_index=torch.zeros(5, 5, dtype=torch.long)), r"exactly one"),
    (lambda a, kw: kw.update(window_size=None), r"exactly one"),
    (lambda a, kw: kw.update(window_size=None, rel_index=torch.zeros(4, 5, dtype=torch.long)), r"\(5, 5\)"),
    (lambda a, kw: kw.update(window_size=None, rel_index=torch.zeros(5, 5)), r"integer"),
    (lambda a, kw: kw.update(window_size=None, rel_index=torch.full((5, 5), 12)), r"\[0, 12\)"),
    (lambda a, kw: a.__setitem__(2, a[2].half()), r"dtype"),
    (lambda a, kw: a.__setitem__(0, a[0].long()), r"dtype"),
    (lambda a, kw: a.__setitem__(3, a[3].long()), r"floating"),
    (lambda a, kw: kw.update(dropout_p=1.0), r"dropout_p"),
    (lambda a, kw: a.__setitem__(3, a[3].to("meta")), r"bias_table is on meta but q is on cpu"),
    (lambda a, kw: a.__setitem__(1, a[1].to("meta")), r"k is on meta but q is on cpu"),
])
def test_bad_inputs_raise_value_error(mutate, match):
    (q, k, v), table = _good()
    args, kw = [q, k, v, table], {"window_size": (2, 2)}
    mutate(args, kw)
    for backend in ("reference", "triton"):
        with pytest.raises(ValueError, match=match):
            rel_pos_attention(*args, backend=backend, **kw)


@needs_triton
@pytest.mark.parametrize("bad", [12, -1])
def test_kernels_refuse_an_out_of_range_index(bad):
    """The kernels gather through an explicit index unchecked, so their launchers check its range first; the
    public op checks it up front on every device, for the reference too (on a GPU its indexing would wrap -1
    to the last table row, or trip a device-side assert)."""
    from beit_fast.kernels import rel_pos_attention as K
    device = "cuda" if CUDA else "cpu"
    (q, k, v), table = _good()
    q, k, v, table = (t.to(device) for t in (q, k, v, table))
    index = torch.zeros(5, 5, dtype=torch.long, device=device)
    index[2, 3] = bad
    with pytest.raises(ValueError, match=r"\[0, 12\).*got values in"):
        K.rel_pos_attention_fwd(q, k, v, table, index, None, 0.25, 0.0, None, torch.empty_like(q))
    with pytest.raises(ValueError, match=r"\[0, 12\).*got values in"):
        K.build_inverse_index(index, 12)
    for backend in ("reference", "triton") if CUDA else ("reference",):
        with pytest.raises(ValueError, match=r"\[0, 12\).*got values in"):
            rel_pos_attention(q, k, v, table, rel_index=index, backend=backend)


@needs_triton
def test_explicit_index_is_checked_and_inverted_once_per_version(monkeypatch):
    """An explicit index passed every step costs its range check (a host sync) and its inverse (an argsort
    and a sync) on the first step only; changed in place, it is checked and inverted again, and the
    gradients follow the new index."""
    from beit_fast import relpos
    from beit_fast.kernels import rel_pos_attention as K
    calls = {"check": 0, "build": 0}
    check, build = relpos.check_index_range, K.build_inverse_index

    def counted(name, fn):
        def wrapper(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapper
    monkeypatch.setattr(relpos, "check_index_range", counted("check", check))
    monkeypatch.setattr(K, "build_inverse_index", counted("build", build))
    (q, k, v), table = _good()
    q, k, v, table = (t.to(DEVICE) for t in (q, k, v, table))
    g = torch.Generator().manual_seed(0)
    index = random_index(5, 12, g).to(DEVICE)
    grad = torch.randn_like(q)
    for _ in range(3):
        got = run(rel_pos_attention, [q, k, v], table, grad, rel_index=index, backend="triton")
    assert calls == {"check": 1, "build": 1}
    index.copy_(random_index(5, 12, g).to(DEVICE))   # in place: a new version of the same tensor
    got = run(rel_pos_attention, [q, k, v], table, grad, rel_index=index, backend="triton")
    assert calls == {"check": 2, "build": 2}
    assert_matches_fp64(False, [q, k, v], table, grad, got[0], got[1], q.dtype, {"rel_index": index.clone()})


@needs_triton
def test_a_gradient_with_wide_strides_reaches_the_kernels_int32_addressable(monkeypatch):
    """torch.cat's backward hands the packed op a narrow view of its gradient (strides the forward never
    checked): the backward passes it through int32_addressable (a copy once one batch element spans 2**31;
    recorded here at a small size, and the gradients still right)."""
    from beit_fast.kernels import rel_pos_attention as K
    seen = []
    monkeypatch.setattr(K, "int32_addressable", lambda t, **kw: seen.append((t.stride(), kw)) or t)
    W = (2, 2)
    (qkv,), table, _ = make_inputs(2, 2, 5, 16, torch.float32, num_relative_distance(W), packed=True)
    qkv.requires_grad_(), table.requires_grad_()
    other = torch.randn(2, 5, 32, device=DEVICE)
    ours = torch.autograd.grad(torch.cat([rel_pos_attention_qkvpacked(qkv, table, window_size=W, backend="triton"),
                                          other], -1).square().sum(), (qkv, table))
    ref = torch.autograd.grad(torch.cat([rel_pos_attention_qkvpacked(qkv, table, window_size=W, backend="reference"),
                                         other], -1).square().sum(), (qkv, table))
    assert seen == [((320, 16, 64, 1), {"batch_in_int64": True})]   # (B, H, N, D) view of (B, N, 2*H*D)
    for name, key, o, r in zip(["dqkv", "dtable"], ["dq", "dtable"], ours, ref):
        assert_close(name, o, r, tolerance("rel_pos_attention", torch.float32, key))


def test_int32_addressable_leaves_the_int64_batch_term_alone():
    from beit_fast.kernels._device import int32_addressable
    per_batch_wide = torch.empty(2, 3, 2**31, device="meta")[:, :, :8]     # a row of batch 0 starts past 2**31
    assert int32_addressable(per_batch_wide, batch_in_int64=True).stride() == (24, 8, 1)
    batch_wide = torch.empty(3, 2**31, device="meta")[:, :8].view(3, 1, 8)  # only the batch stride is large
    assert int32_addressable(batch_wide, batch_in_int64=True) is batch_wide
    assert int32_addressable(batch_wide).stride() == (8, 8, 1)


def test_per_index_cache_forgets_dead_tensors_and_old_versions():
    import gc
    from beit_fast.relpos import PerIndexTensor
    cache = PerIndexTensor()
    a = torch.zeros(3, 3, dtype=torch.long)
    cache.put(a, 12, "inverse of a")
    assert cache.get(a, 12) == "inverse of a" and cache.get(a, 13) is None
    assert cache.get(a.clone(), 12) is None                      # another tensor with the same values
    a.add_(1)
    assert cache.get(a, 12) is None                              # changed in place: a new version
    cache.put(a, 12, "inverse of a, version 1")
    version = a._version
    a.data = torch.ones(3, 3, dtype=torch.long)                  # new memory behind the same tensor
    assert cache.get(a, 12) is None, (version, a._version)
    del a
    gc.collect()
    assert cache._entries == {}                                  # dropped with its tensor


def test_bad_packed_shape():
    table = torch.randn(12, 2)
    with pytest.raises(ValueError, match=r"\(B, N, 3, H, D\)"):
        rel_pos_attention_qkvpacked(torch.randn(2, 5, 2, 2, 16), table, window_size=(2, 2))
    with pytest.raises(ValueError, match=r"\(R, H\) = \(R, 3\)"):
        rel_pos_attention_qkvpacked(torch.randn(2, 5, 3, 3, 16), table, window_size=(2, 2))


def test_backend_selection_errors(monkeypatch):
    (q, k, v), table = _good()
    with pytest.raises(BackendUnavailable, match="not one of this op's backends"):
        rel_pos_attention(q, k, v, table, window_size=(2, 2), backend="cuda")
    if INTERPRET:   # (an interpreter the conftest turned off, e.g. Triton < 3.7 with numpy >= 2.4, has no bf16 check)
        with monkeypatch.context() as m:   # the stock interpreter computes on bf16's raw bits
            refused_without_emulation(m)
            with pytest.raises(BackendUnavailable, match="bf16"):
                rel_pos_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), table, window_size=(2, 2),
                                  backend="triton")
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
            rel_pos_attention(q, k, v, table, window_size=(2, 2), backend="triton")
    with pytest.raises(BackendUnavailable, match="fp16, bf16 or fp32"):
        rel_pos_attention(q.double(), k.double(), v.double(), table, window_size=(2, 2), backend="triton")
    big = torch.randn(1, 2, 5, 160)
    assert any("head dim 160" in r for r in not_supported_reasons("triton", big, big, big, table, (2, 2)))
    # a sequence-first packed layout, (N, B, 3, H, D) storage seen as (B, N, 3, H, D), at B = 342, N = 1025,
    # H * D = 2048: a row's offset (N - 1) * B * 3 * H * D passes int32 (meta tensors: no memory)
    B, N, H, D = 342, 1025, 16, 128
    table = torch.empty(num_relative_distance((32, 32)), H, device="meta")
    seq_first = torch.empty(N, B, 3, H, D, device="meta").transpose(0, 1)
    q, k, v = (seq_first[:, :, i].transpose(1, 2) for i in range(3))
    assert any("past the kernels' int32 offsets" in r for r in not_supported_reasons("triton", q, k, v, table))
    q, k, v = (seq_first[:171, :, i].transpose(1, 2) for i in range(3))    # half: strides keep the span
    assert any("past the kernels' int32 offsets" in r for r in not_supported_reasons("triton", q, k, v, table))
    q, k, v = (torch.empty(B, N, 3, H, D, device="meta")[:, :, i].transpose(1, 2) for i in range(3))
    assert not any("int32" in r for r in not_supported_reasons("triton", q, k, v, table))   # batch-first


def test_auto_backend_and_env_override(monkeypatch):
    (q, k, v), table = _good()
    calls = []
    monkeypatch.setattr(op_mod, "_reference", lambda *a: calls.append("reference") or rel_pos_attention_ref(*a[:6]))
    monkeypatch.delenv("BEIT_FAST_BACKEND", raising=False)
    rel_pos_attention(q, k, v, table, window_size=(2, 2))
    assert calls == ["reference"]   # CPU tensors: auto never picks the interpreter
    if INTERPRET and not CUDA:
        monkeypatch.setenv("BEIT_FAST_BACKEND", "triton")
        out = rel_pos_attention(q, k, v, table, window_size=(2, 2))
        assert calls == ["reference"]
        assert_close("out", out, rel_pos_attention_ref(q, k, v, table, (2, 2)),
                     tolerance("rel_pos_attention.backend_env", torch.float32))


# ----------------------------------------------------------------------------------------------------------
# torch.library
# ----------------------------------------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_opcheck(packed, dropout):
    W = (2, 2)
    N, R = 5, num_relative_distance(W)
    inputs, table, _ = make_inputs(1, 2, N, 16, torch.float32, R, packed=packed)
    seed = torch.tensor([3], dtype=torch.int64, device=DEVICE) if dropout else None
    leaves = [t.requires_grad_() for t in inputs + [table]]
    if packed:
        op, args = torch.ops.beit_fast.rel_pos_attention_qkvpacked.default, (*leaves, None, 2, 2, 0.25, dropout, seed)
    else:
        op, args = torch.ops.beit_fast.rel_pos_attention.default, (*leaves, None, 2, 2, 0.25, dropout, seed)
    torch.library.opcheck(op, args)
    idx = random_index(N, R).to(DEVICE)
    args = (*leaves, idx, 0, 0, 0.25, dropout, seed)
    torch.library.opcheck(op, args)


@needs_triton
@pytest.mark.parametrize("packed", [False, True], ids=["qkv", "packed"])
def test_backward_op_returns_the_table_gradient_in_the_table_dtype(packed):
    """The registered backward op returns the table gradient in the table's dtype (fp16 here: a model cast to
    half) as its fake (meta) function says; autograd would cast a wrong dtype silently, torch.compile's
    traced graph would not. Checked directly and with opcheck."""
    W = (2, 2)
    N, R = 5, num_relative_distance(W)
    inputs, _, grad = make_inputs(1, 2, N, 16, torch.float32, R, packed=packed)
    table = (torch.randn(R, 2, device=DEVICE) * 2).half()
    if packed:
        out, lse = torch.ops.beit_fast.rel_pos_attention_qkvpacked(inputs[0], table, None, 2, 2, 0.25, 0.0, None)
        op, args = (torch.ops.beit_fast.rel_pos_attention_qkvpacked_backward.default,
                    (grad, inputs[0], out, lse, table, None, 2, 2, 0.25, 0.0, None, True))
    else:
        out, lse = torch.ops.beit_fast.rel_pos_attention(*inputs, table, None, 2, 2, 0.25, 0.0, None)
        op, args = (torch.ops.beit_fast.rel_pos_attention_backward.default,
                    (grad, *inputs, out, lse, table, None, 2, 2, 0.25, 0.0, None, True))
    dtable = op(*args)[-1]
    assert dtable.dtype == torch.float16 and dtable.shape == table.shape
    torch.library.opcheck(op, args)


@needs_triton
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_triton(compile_backend):
    """The Triton path (custom ops) inside a compiled model: one graph, no breaks, the same loss and gradients
    (of the table bitwise; of the projection and its input through the packed qkv)."""
    W = (2, 2)
    B, H, N, D = 2, 2, 5, 16
    qkv_proj = torch.nn.Linear(H * D, 3 * H * D).to(DEVICE)
    table = torch.nn.Parameter(torch.randn(num_relative_distance(W), H, device=DEVICE))
    weight = torch.randn(B, N, H * D, device=DEVICE)                 # a loss whose dO is not uniform

    def block(x):
        qkv = qkv_proj(x).view(B, N, 3, H, D)
        return (rel_pos_attention_qkvpacked(qkv, table, window_size=W, backend="triton") * weight).sum()

    x = torch.randn(B, N, H * D, device=DEVICE, requires_grad=True)
    leaves = {"table": table, "qkv_proj.weight": qkv_proj.weight, "qkv_proj.bias": qkv_proj.bias, "x": x}
    results = []
    for fn in (torch.compile(block, fullgraph=True, backend=compile_backend), block):
        for t in leaves.values():
            t.grad = None
        loss = fn(x)
        loss.backward()
        results.append((loss.detach(), {n: t.grad.clone() for n, t in leaves.items()}))
    (loss, grads), (eager, eager_grads) = results
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(grads["table"], eager_grads["table"], atol=0, rtol=0)
    for n in ("qkv_proj.weight", "qkv_proj.bias", "x"):
        torch.testing.assert_close(grads[n], eager_grads[n], msg=lambda m: f"{n}: {m}")


def test_torch_compile_fullgraph_reference():
    W = (2, 2)
    (q, k, v), table = _good(W=W)
    table.requires_grad_()
    f = torch.compile(lambda *a: rel_pos_attention(*a, window_size=W, backend="reference"), fullgraph=True,
                      backend="aot_eager")
    torch.testing.assert_close(f(q, k, v, table), rel_pos_attention_ref(q, k, v, table, W))


# ----------------------------------------------------------------------------------------------------------
# CUDA only: bf16 / fp16 under the 2x rule, determinism at BEiT-B size
# ----------------------------------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,W,D,packed", [(4, 12, (14, 14), 64, True), (2, 16, (24, 24), 64, False),
                                            (3, 4, (8, 8), 80, False), (2, 4, (14, 14), 128, True),
                                            (2, 4, (14, 14), 32, False)])
def test_cuda_low_precision_two_x_rule(dtype, B, H, W, D, packed):
    _check_two_x(B, H, W, D, dtype, packed)


def _stored_output_effect(inputs, table, grad, kw, out, out64, packed):
    """What the table gradient inherits from reading the kernel's own stored 16-bit output: the backward's
    Delta_i = dO_i . O_i (flash attention's; the (B, H, N, N) probabilities are never kept) uses the rounded
    O, and each dtable entry sums -P_ij (Delta_i - Delta64_i) over its (query, key) pairs. Measured in fp64
    from this run's output: (R, H)."""
    q, k, v = [inputs[0].select(2, i).permute(0, 2, 1, 3) for i in range(3)] if packed else inputs
    q, k, v, table = (t.double() for t in (q, k, v, table))
    B, H, N, D = q.shape
    as_bhnd = (lambda t: t.view(B, N, H, D).transpose(1, 2)) if packed else (lambda t: t)
    do, o, o64 = (as_bhnd(t).double() for t in (grad, out, out64))
    index = kw["rel_index"] if "rel_index" in kw else relative_position_index(kw["window_size"]).to(q.device)
    bias = table[index.reshape(-1)].view(N, N, H).permute(2, 0, 1)
    p = (q @ k.transpose(-2, -1) * kw.get("scale", D ** -0.5) + bias).softmax(-1)
    d_delta = (do * (o - o64)).sum(-1)                                     # (B, H, N)
    effect = torch.zeros_like(table)
    effect.index_add_(0, index.reshape(-1), -(p * d_delta[..., None]).sum(0).permute(1, 2, 0).reshape(-1, H))
    return effect


def _check_two_x(B, H, shape, D, dtype, packed, dropout_p=0.0, device="cuda"):
    """Triton against fp64 within 2x the error of PyTorch's same-dtype attention (+ atol); shape is a
    window (wh, ww) or N with an explicit random index. With dropout both references use the kernel's mask.
    dtable's slack also holds what it inherits from the stored 16-bit output (_stored_output_effect,
    measured): at 17 tokens and head dim 128, Delta's |dO . O| reaches ~17, and that term alone (0.148 of an
    error of 0.155 at |dtable| ~ 7 in one seed) made about 1 seed in 120 fail the bare rule in bf16;
    PyTorch's eager softmax backward reads its P instead of O."""
    N, kw, (inputs, table, grad) = case_inputs(B, H, shape, D, dtype, packed, device)
    fn = rel_pos_attention_qkvpacked if packed else rel_pos_attention
    ref_kw = dict(kw)
    if dropout_p:
        kw.update(dropout_p=dropout_p, dropout_seed=77)
        ref_kw["dropout_mask"] = dropout_keep_mask(77, B, H, N, dropout_p, device=device).double() / (1 - dropout_p)
    out, grads = run(fn, inputs, table, grad, backend="triton", **kw)
    # in the inputs' dtype (an fp32 result would sit closer to the fp64 reference than PyTorch's and pass easily)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads[:-1]) and grads[-1].dtype == table.dtype
    out_t, grads_t = run(ref_fn(packed), inputs, table, grad, **ref_kw)                  # torch, same dtype
    out64, grads64 = run(ref_fn(packed), [t.double() for t in inputs], table.double(), grad.double(), **ref_kw)
    atol = tolerance("rel_pos_attention.two_x", dtype).atol
    inherited = _stored_output_effect(inputs, table, grad, kw, out, out64, packed).abs().max().item()
    for name, a, b, c in zip(["out"] + names(packed), [out] + grads, [out_t] + grads_t, [out64] + grads64):
        assert_two_x(name, a, b, c, atol + (inherited if name == "dtable" else 0.0))


@needs_bf16()
@pytest.mark.parametrize("B,H,shape,D,dtype,packed", [   # the same cases, named for the dtype they run in
    pytest.param(*c.values, id=c.id.replace("fp32", "bf16").replace("fp16", "bf16"), marks=c.marks) for c in CASES])
def test_bf16_on_every_case(B, H, shape, D, dtype, packed):
    """The interpreter cases (odd N, explicit index, batch 1-3, head dims 32-128) in bf16: on the GPU, or on
    the CPU through the interpreter with bf16 emulated (tests/interpreter_bf16.py)."""
    _check_two_x(B, H, shape, D, torch.bfloat16, packed, device=DEVICE)


@pytest.mark.parametrize("dtype", [
    pytest.param(torch.bfloat16, marks=needs_bf16()), pytest.param(torch.float16, marks=needs_triton)], ids=str)
def test_dropout_two_x_rule(dtype):
    _check_two_x(2, 4, (14, 14), 64, dtype, False, dropout_p=0.1, device=DEVICE)


@needs_cuda
def test_cuda_one_batch_group_equals_many(monkeypatch):
    """G = 1: one program per (key block, head) adds all 16 batches into its partials, a read-modify-write
    ordered by tl.debug_barrier only (the interpreter runs a program's lanes in lockstep and cannot test it);
    against the default G and repeated bitwise."""
    from beit_fast.kernels import rel_pos_attention as K
    W = (14, 14)
    inputs, table, grad = make_inputs(16, 12, 197, 64, torch.bfloat16, num_relative_distance(W), packed=True,
                                      device="cuda")
    many = run(rel_pos_attention_qkvpacked, inputs, table, grad, window_size=W, backend="triton")[1][1]
    monkeypatch.setattr(K, "num_batch_groups", lambda *a: 1)
    one = run(rel_pos_attention_qkvpacked, inputs, table, grad, window_size=W, backend="triton")[1][1]
    again = run(rel_pos_attention_qkvpacked, inputs, table, grad, window_size=W, backend="triton")[1][1]
    assert torch.equal(one, again)
    torch.testing.assert_close(one, many, rtol=0, atol=1e-5 * many.abs().max().item())


@needs_cuda
def test_cuda_table_gradient_deterministic_beit_base():
    W = (14, 14)
    inputs, table, grad = make_inputs(32, 12, 197, 64, torch.bfloat16, num_relative_distance(W), packed=True,
                                      device="cuda")
    first = run(rel_pos_attention_qkvpacked, inputs, table, grad, window_size=W, backend="triton")[1]
    for _ in range(3):
        again = run(rel_pos_attention_qkvpacked, inputs, table, grad, window_size=W, backend="triton")[1]
        assert torch.equal(first[1], again[1])


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_autocast_casts_q_k_v_like_sdpa(backend):
    """Under torch.autocast q, k, v are cast to the autocast dtype as scaled_dot_product_attention casts them
    (so both backends compute in it, and mixed q / k / v dtypes are accepted); the table keeps its dtype and
    its gradient's. fp16 autocast on CPU tensors (the interpreter cannot do bf16)."""
    (q, k, v), table = _good()
    q, k, v, table = (t.to(DEVICE) for t in (q, k, v, table))
    q = q.half()   # mixed: refused outside autocast
    with pytest.raises(ValueError, match="share one floating dtype"):
        rel_pos_attention(q, k, v, table, window_size=(2, 2), backend=backend)
    grad = torch.randn(q.shape, device=DEVICE).half()
    with torch.autocast(DEVICE, dtype=torch.float16):
        got = run(lambda q, k, v, t: rel_pos_attention(q, k, v, t, window_size=(2, 2), backend=backend),
                  [q, k, v], table, grad)
    want = run(lambda q, k, v, t: rel_pos_attention(q, k, v, t, window_size=(2, 2), backend=backend),
               [t.half() for t in (q, k, v)], table, grad)
    assert got[0].dtype == torch.float16 and got[1][3].dtype == table.dtype
    assert torch.equal(got[0], want[0])
    for name, a, b in zip(GRAD_NAMES, got[1], want[1]):
        torch.testing.assert_close(a.float(), b.float(), msg=lambda m, name=name: f"{name}: {m}")



@needs_triton
@pytest.mark.parametrize("B, H, limit", [(2, 3, 4), (6, 2, 9), (5, 2, 9)])
def test_batch_and_heads_past_the_grid_axis_limit(monkeypatch, B, H, limit):
    """B*H past CUDA's 65535 on grid axis 1 spills onto axis 2 (_bh_grid; a limit lowered here to reach it at a
    small size): output, every gradient and the dropout mask bitwise those of one axis."""
    from beit_fast.kernels import rel_pos_attention as K
    W = (2, 2)
    (q, k, v), table, grad = make_inputs(B, H, 5, 16, torch.float32, num_relative_distance(W))
    kw = dict(window_size=W, dropout_p=0.3, dropout_seed=1234, backend="triton")
    one_axis = run(rel_pos_attention, [q, k, v], table, grad, **kw)
    mask = dropout_keep_mask(1234, B, H, 5, 0.3, device=DEVICE)
    monkeypatch.setattr(K, "GRID_YZ_MAX", limit)
    y, z = K._bh_grid(B, H)
    assert z > 1 and y * z == B * H and y <= limit
    split = run(rel_pos_attention, [q, k, v], table, grad, **kw)
    assert torch.equal(split[0], one_axis[0])
    for name, a, b in zip(GRAD_NAMES, split[1], one_axis[1]):
        assert torch.equal(a, b), name
    assert torch.equal(dropout_keep_mask(1234, B, H, 5, 0.3, device=DEVICE), mask)
