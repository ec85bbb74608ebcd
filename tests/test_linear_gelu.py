"""linear_gelu: Triton (CUDA, or the interpreter on CPU) against the PyTorch reference, forward and every
gradient, store and recompute backward, determinism, opcheck, torch.compile, input errors."""
import os

# conftest.py sets TRITON_INTERPRET before triton loads; this keeps the file runnable on its own.
if "TRITON_INTERPRET" not in os.environ and not os.path.exists("/dev/nvidia0"):
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from beit_fast._backend import BackendUnavailable, interpret_mode  # noqa: E402
from beit_fast.ops.linear_gelu import linear_gelu, linear_gelu_ref, not_supported_reasons  # noqa: E402
from interpreter_bf16 import needs_bf16, refused_without_emulation  # noqa: E402
from poison import PoisonedTorch  # noqa: E402
from tolerances import assert_close, assert_two_x, tolerance, ulp  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(DEVICE == "cpu" and not interpret_mode(),
                                  reason="no GPU and TRITON_INTERPRET is not set")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# (x leading dims, K, N): BEiT-B fc1 (one image, 197 tokens) and awkward shapes (BEiT-L: a token slice).
BEIT_B = ((197,), 768, 3072)
AWKWARD = [((1,), 7, 5), ((273,), 64, 96), ((3, 5, 13), 7, 33), ((65,), 48, 17)]


def _inputs(lead, K, N, dtype, bias=True, device=DEVICE):
    x = torch.randn(*lead, K, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(N, K, device=device, dtype=dtype) / K ** 0.5).requires_grad_()
    b = (0.5 * torch.randn(N, device=device, dtype=dtype)).requires_grad_() if bias else None
    return x, w, b


def _run(fn, x, w, b, dy):
    """Output and gradients (x, w, b) of fn for the upstream gradient dy."""
    y = fn(x, w, b)
    params = [t for t in (x, w, b) if t is not None]
    grads = torch.autograd.grad(y, params, dy)
    return [y] + list(grads)


def _check_against_reference(lead, K, N, dtype, bias=True, recompute=False):
    x, w, b = _inputs(lead, K, N, dtype, bias)
    dy = torch.randn(*lead, N, device=DEVICE, dtype=dtype)
    ours = _run(lambda *a: linear_gelu(*a, backend="triton", recompute=recompute), x, w, b, dy)
    names = ["y", "dx", "dw", "db"]
    if dtype == torch.float32:
        ref = _run(linear_gelu_ref, x, w, b, dy)
        for name, o, r in zip(names, ours, ref):
            assert o.dtype == r.dtype and o.shape == r.shape, name
            assert_close(name, o, r, tolerance("linear_gelu", dtype))
        return
    same_dtype = _run(linear_gelu_ref, x, w, b, dy)
    exact = _run(linear_gelu_ref, *(t.detach().double().requires_grad_() if t is not None else None
                                    for t in (x, w, b)), dy.double())
    for name, o, s, e in zip(names, ours, same_dtype, exact):
        assert o.dtype == dtype and o.shape == e.shape, name
        _two_x_with_ulp(name, o, s, e, "linear_gelu", dtype)


def _two_x_with_ulp(name, ours, ref_lowp, exact, entry, dtype):
    """The 2x rule with a slack of the entry's atol plus one `dtype` ulp of the largest exact value. Each
    gradient comes out of a 16-bit GEMM on a dZ rounded to 16 bits, and ours rounds a different dZ from
    PyTorch's (the recompute GEMM keeps Z in fp32, PyTorch rounds Z first): in a few output elements the two
    roundings fall apart by about an ulp. Without the ulp, dW of (3, 5, 13) x 7 -> 33 in bf16 recompute
    failed in CI (0.177 > 2 x 0.077 + 0.001, values up to ~16) and reached 0.90 of the bound in 600 seeds;
    with it the worst of those seeds was 0.40."""
    atol = tolerance(entry, dtype).atol + ulp(exact.abs().max().item(), dtype)
    assert_two_x(name, ours, ref_lowp, exact, atol)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", AWKWARD, ids=str)
def test_awkward_shapes(shape, dtype):
    _check_against_reference(*shape, dtype)


@needs_triton
def test_beit_base_fc1():
    # the full BEiT-B fc1 GEMM for one image, once: about 10 s in the interpreter
    _check_against_reference(*BEIT_B, torch.float16)


@needs_triton
@pytest.mark.parametrize("dtype,K,N,recompute", [(torch.float32, 768, 3072, False),
                                                 (torch.float16, 1024, 4096, True)], ids=str)
def test_beit_fc1_token_slice(dtype, K, N, recompute):
    # BEiT-B / BEiT-L weights on a 17-token slice keep the interpreter fast
    _check_against_reference((17,), K, N, dtype, recompute=recompute)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [((273,), 64, 96), ((3, 5, 13), 7, 33)], ids=str)
def test_recompute_backward(shape, dtype):
    _check_against_reference(*shape, dtype, recompute=True)


@needs_triton
@pytest.mark.parametrize("recompute", [False, True])
def test_no_bias(recompute):
    _check_against_reference((40,), 24, 80, torch.float32, bias=False, recompute=recompute)


@needs_triton
def test_recompute_env_default(monkeypatch):
    monkeypatch.setenv("BEIT_FAST_LINEAR_GELU_RECOMPUTE", "1")
    _check_against_reference((33,), 16, 40, torch.float32)


@needs_triton
def test_strided_bias():
    """A bias that is a view with a step (the kernel reads it with unit stride)."""
    x, w, _ = _inputs((20,), 32, 48, torch.float32)
    b = torch.randn(96, device=DEVICE)[::2].requires_grad_()
    ours = torch.autograd.grad(linear_gelu(x, w, b, backend="triton").square().sum(), (x, w, b))
    ref = torch.autograd.grad(linear_gelu_ref(x, w, b).square().sum(), (x, w, b))
    for name, o, r in zip(["dx", "dw", "db"], ours, ref):
        assert_close(name, o, r, tolerance("linear_gelu", torch.float32))


def test_int32_offset_limit_is_a_reason():
    from beit_fast.ops.linear_gelu import not_supported_reasons
    x = torch.empty((2**19, 768), device="meta")
    assert any("int32" in r for r in not_supported_reasons("triton", x, torch.empty((4096, 768), device="meta")))
    assert not any("int32" in r for r in not_supported_reasons("triton", x, torch.empty((3072, 768), device="meta")))
    # a view with gaps: 2**20 rows of 768 taken from rows of 4096 elements (the last row starts 4.3e9 in)
    # has only 8e8 elements, but the kernel's row offset x stride products pass 2**31
    gapped = torch.empty((2**20, 4096), device="meta")[:, :768]
    w = torch.empty((64, 768), device="meta")
    assert any("'x'" in r and "'weight'" not in r for r in not_supported_reasons("triton", gapped, w))
    assert not any("int32" in r for r in not_supported_reasons("triton", gapped.contiguous(), w))
    wide_w = torch.empty((64, 2**26), device="meta")[:, :768]   # so for the weight
    assert any("'weight'" in r for r in not_supported_reasons("triton", torch.empty((8, 768), device="meta"), wide_w))


@needs_triton
@pytest.mark.parametrize("api", ["legacy", "new"])
def test_fp32_dot_precision_follows_either_tf32_switch(api):
    """fp32 matmuls use TF32 only when torch's switch says so, set through the legacy flag or (torch >= 2.9)
    the fp32_precision API, after which reading the legacy flag raises."""
    from beit_fast.kernels import linear_gelu as K
    matmul = torch.backends.cuda.matmul
    if api == "new" and not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch < 2.9 has no fp32_precision API")
    saved_new = getattr(matmul, "fp32_precision", None)
    saved_legacy = matmul.allow_tf32   # readable: no test leaves the two APIs mixed (asserted below)
    try:
        assert K._dot_precision(torch.float32) == "ieee" and K._dot_precision(torch.float16) == "tf32"
        if api == "new":
            matmul.fp32_precision = "tf32"
        else:
            matmul.allow_tf32 = True
        assert K._dot_precision(torch.float32) == "tf32"
        # a launch with the switch on, against fp64 (TF32 is coarser than the fp32 tolerance)
        x, w, b = _inputs((9,), 16, 24, torch.float32, True)
        dy = torch.randn(9, 24, device=DEVICE)
        ours = _run(lambda *a: linear_gelu(*a, backend="triton"), x, w, b, dy)
        exact = _run(linear_gelu_ref, *(t.detach().double().requires_grad_() for t in (x, w, b)), dy.double())
        for name, o, e in zip(["y", "dx", "dw", "db"], ours, exact):
            assert o.dtype == torch.float32, name
            assert_close(name, o.double(), e, tolerance("linear_gelu.tf32", torch.float32))
    finally:
        # restored through the API that changed it: mixing them (legacy set, new restore) leaves torch >= 2.9
        # in a state where reading the legacy flag raises, as inductor's matmul lowering did up to torch 2.10
        if api == "new":
            matmul.fp32_precision = saved_new
        else:
            matmul.allow_tf32 = saved_legacy
    assert matmul.allow_tf32 == saved_legacy


@needs_triton
def test_non_contiguous_inputs_and_expanded_grad():
    x, w, b = _inputs((20,), 32, 48, torch.float32)
    xt = x.detach().t().contiguous().t().requires_grad_()    # (20, 32) column-major
    wt = w.detach().t().contiguous().t().requires_grad_()
    # sum()'s gradient reaches the op as an expanded (all strides 0) tensor
    ours = torch.autograd.grad(linear_gelu(xt, wt, b, backend="triton").sum(), (xt, wt, b))
    ref = torch.autograd.grad(linear_gelu_ref(xt, wt, b).sum(), (xt, wt, b))
    for name, o, r in zip(["dx", "dw", "db"], ours, ref):
        assert_close(name, o, r, tolerance("linear_gelu", torch.float32))


@needs_triton
@pytest.mark.parametrize("recompute", [False, True])
def test_a_gradient_with_wide_strides_reaches_the_kernels_int32_addressable(monkeypatch, recompute):
    """torch.cat's backward hands the op a narrow view of its gradient: strides the forward never checked.
    The kernels' row offsets are int32, so the launcher passes dy through int32_addressable (a copy once the
    strides reach 2**31; recorded here at a small size, and the gradients still right)."""
    from beit_fast.kernels import linear_gelu as kernels
    seen = []
    monkeypatch.setattr(kernels, "int32_addressable", lambda t: seen.append(t.stride()) or t)
    x, w, b = _inputs((20,), 32, 48, torch.float32)
    other = torch.randn(20, 48, device=DEVICE)
    ours = torch.autograd.grad(torch.cat([linear_gelu(x, w, b, backend="triton", recompute=recompute), other],
                                         -1).square().sum(), (x, w, b))
    ref = torch.autograd.grad(torch.cat([linear_gelu_ref(x, w, b), other], -1).square().sum(), (x, w, b))
    assert seen == [(96, 1)]
    for name, o, r in zip(["dx", "dw", "db"], ours, ref):
        assert_close(name, o, r, tolerance("linear_gelu", torch.float32))


def test_int32_addressable_copies_only_past_int32():
    from beit_fast.kernels._device import int32_addressable
    wide = torch.empty(3, 2**31, device="meta")[:, :16]            # row 2 starts at element 2**32
    assert int32_addressable(wide).stride() == (16, 1)
    fits = torch.empty(3, 2**29, device="meta")[:, :16]
    assert int32_addressable(fits) is fits


@needs_triton
@pytest.mark.parametrize("recompute", [False, True])
def test_parameter_grads_bitwise_deterministic(recompute):
    x, w, b = _inputs((197,), 64, 160, torch.float32)
    dy = torch.randn(197, 160, device=DEVICE)
    runs = [_run(lambda *a: linear_gelu(*a, backend="triton", recompute=recompute), x, w, b, dy) for _ in range(2)]
    for name, a, c in zip(["y", "dx", "dw", "db"], *runs):
        assert torch.equal(a, c), f"{name} differs between two identical runs"


@needs_triton
@pytest.mark.parametrize("recompute", [False, True])
def test_every_output_element_written(monkeypatch, recompute):
    from beit_fast.kernels import linear_gelu as kernels
    monkeypatch.setattr(kernels, "torch", PoisonedTorch())
    _check_against_reference((70,), 20, 130, torch.float32, recompute=recompute)


@needs_triton
@pytest.mark.parametrize("dt", [pytest.param(torch.bfloat16, marks=needs_bf16()), torch.float16], ids=str)
def test_autocast_casts_like_f_linear(dt):
    x, w, b = _inputs((2, 9), 16, 24, torch.float32)
    dy = torch.randn(2, 9, 24, device=DEVICE, dtype=dt)
    with torch.autocast(DEVICE, dtype=dt):
        ours = _run(lambda *a: linear_gelu(*a, backend="triton"), x, w, b, dy)
        ref = _run(linear_gelu_ref, x, w, b, dy)
    assert ours[0].dtype == ref[0].dtype == dt
    assert all(g.dtype == torch.float32 for g in ours[1:])
    # both against the exact (fp64) computation on the inputs autocast rounds to dt: the 2x rule
    exact = _run(linear_gelu_ref, *(t.detach().to(dt).double().requires_grad_() for t in (x, w, b)), dy.double())
    for name, o, r, e in zip(["y", "dx", "dw", "db"], ours, ref, exact):
        _two_x_with_ulp(name, o, r, e, "linear_gelu.autocast", dt)


def test_gradcheck_float64_dispatch():
    # auto on CPU tensors dispatches to the reference (on CUDA too: fp64 is not a Triton dtype)
    x, w, b = _inputs((2, 3), 5, 4, torch.float64, device="cpu")
    assert torch.autograd.gradcheck(lambda *a: linear_gelu(*a), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: linear_gelu(x, w, None), (x, w))


@needs_triton
def test_opcheck_registered_ops():
    x, w, b = _inputs((9,), 7, 11, torch.float32)
    for save in (True, False):
        torch.library.opcheck(torch.ops.beit_fast.linear_gelu_triton.default, (x, w, b, save))
    torch.library.opcheck(torch.ops.beit_fast.linear_gelu_triton.default, (x, w, None, True))
    xd, wd, bd = x.detach(), w.detach(), b.detach()
    dy = torch.randn(9, 11, device=DEVICE)
    _, z = torch.ops.beit_fast.linear_gelu_triton(xd, wd, bd, True)
    for preact in (z, None):
        for needs in ((True, True, True), (True, False, False), (False, True, True)):
            torch.library.opcheck(torch.ops.beit_fast.linear_gelu_triton_bwd.default, (dy, xd, wd, bd, preact, *needs))


@needs_triton
def test_backward_op_returns_db_in_the_bias_dtype():
    """The registered backward op returns db in the bias dtype (fp16 inputs: the kernel sums db in fp32) as
    its fake function says; autograd would cast a wrong dtype silently, a traced graph would not. Checked
    directly and with opcheck, in store and recompute mode."""
    x, w, b = (t.detach() for t in _inputs((9,), 7, 11, torch.float16))
    dy = torch.randn(9, 11, device=DEVICE, dtype=torch.float16)
    _, z = torch.ops.beit_fast.linear_gelu_triton(x, w, b, True)
    op = torch.ops.beit_fast.linear_gelu_triton_bwd.default
    for preact in (z, None):
        dx, dw, db = op(dy, x, w, b, preact, True, True, True)
        assert (dx.dtype, dw.dtype, db.dtype) == (torch.float16,) * 3
        assert db.shape == b.shape
        torch.library.opcheck(op, (dy, x, w, b, preact, True, True, True))


@needs_triton
@pytest.mark.parametrize("recompute", [False, True])
def test_preactivation_saved_only_when_a_gradient_can_follow(monkeypatch, recompute):
    """Store mode keeps the (M, N) pre-activation for the backward, as large as the output: the forward asks
    the kernel for it only when grad mode is on and an input requires grad (and never in recompute mode);
    in inference (no_grad, or nothing requiring grad) it is not written."""
    from beit_fast.kernels import linear_gelu as K
    seen = []
    fwd = K.linear_gelu_fwd
    monkeypatch.setattr(K, "linear_gelu_fwd", lambda x, w, b, save_preact: seen.append(save_preact) or
                        fwd(x, w, b, save_preact))
    x, w, b = _inputs((3, 5), 8, 6, torch.float32)
    frozen = [t.detach() for t in (x, w, b)]
    linear_gelu(*frozen, backend="triton", recompute=recompute)
    with torch.no_grad():
        linear_gelu(x, w, b, backend="triton", recompute=recompute)
    y = linear_gelu(x, w, b, backend="triton", recompute=recompute)
    assert seen == [False, False, not recompute]
    dy = torch.randn_like(y)
    ours = torch.autograd.grad(y, (x, w, b), dy)
    ref = torch.autograd.grad(linear_gelu_ref(x, w, b), (x, w, b), dy)
    for name, o, r in zip(["dx", "dw", "db"], ours, ref):
        assert_close(name, o, r, tolerance("linear_gelu", torch.float32))


def test_tf32_switch_inherited_from_the_global_fp32_precision(monkeypatch):
    """torch >= 2.9: matmul.fp32_precision "none" means "inherit torch.backends.fp32_precision". The installed
    torch's getter may resolve the inheritance itself (torch 2.14 does); one whose getter reports "none"
    must still be read as TF32 when the global setting says "tf32", and as IEEE otherwise. Stubbed (runs on
    any torch): the real switches are process-wide, and other tests restore them through the API that set
    them."""
    import types
    from beit_fast._backend import tf32_matmul
    for global_setting, expected in (("tf32", True), ("ieee", False), ("none", False)):
        stub = types.SimpleNamespace(fp32_precision=global_setting,
                                     cuda=types.SimpleNamespace(matmul=types.SimpleNamespace(fp32_precision="none")))
        monkeypatch.setattr(torch, "backends", stub)
        assert tf32_matmul() is expected, global_setting
        monkeypatch.undo()
    stub = types.SimpleNamespace(fp32_precision="tf32",   # an explicit per-backend setting beats the global one
                                 cuda=types.SimpleNamespace(matmul=types.SimpleNamespace(fp32_precision="ieee")))
    monkeypatch.setattr(torch, "backends", stub)
    assert tf32_matmul() is False


@needs_triton
def test_torch_compile_fullgraph():
    x, w, b = _inputs((2, 9), 16, 24, torch.float32)
    dy = torch.randn(2, 9, 24, device=DEVICE)

    def f(x, w, b):
        return linear_gelu(x, w, b, backend="triton") * 2.0

    compiled = torch.compile(f, fullgraph=True)
    for name, o, r in zip(["y", "dx", "dw", "db"], _run(compiled, x, w, b, dy), _run(f, x, w, b, dy)):
        assert_close(name, o, r, tolerance("linear_gelu", torch.float32))


def test_auto_on_cpu_is_reference():
    x, w, b = _inputs((5,), 8, 6, torch.float32, device="cpu")
    assert torch.equal(linear_gelu(x, w, b), linear_gelu_ref(x, w, b))
    assert not_supported_reasons("triton", x, w, b, auto=True)


def test_forced_backend_that_cannot_run_lists_reasons(monkeypatch):
    x, w, b = _inputs((5,), 8, 6, torch.float32, device="cpu")
    with pytest.raises(BackendUnavailable, match="not one of this op's backends"):
        linear_gelu(x, w, b, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        linear_gelu(x, w, b, backend="triton")


@needs_triton
def test_unsupported_dtypes_raise_on_triton():
    x, w, b = _inputs((5,), 8, 6, torch.float64)
    with pytest.raises(BackendUnavailable, match="float64"):
        linear_gelu(x, w, b, backend="triton")
    if DEVICE == "cpu":   # the stock interpreter computes on bf16's raw bits
        x, w, b = _inputs((5,), 8, 6, torch.bfloat16)
        with pytest.MonkeyPatch.context() as m:
            refused_without_emulation(m)
            with pytest.raises(BackendUnavailable, match="bf16"):
                linear_gelu(x, w, b, backend="triton")


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_bad_inputs_raise_value_error(backend):
    x = torch.randn(4, 8)
    w = torch.randn(6, 8)
    b = torch.randn(6)
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        linear_gelu(x, torch.randn(6, 7), b, backend=backend)
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        linear_gelu(x, torch.randn(6, 8, 1), b, backend=backend)
    with pytest.raises(ValueError, match=r"\(N,\) = \(6,\)"):
        linear_gelu(x, w, torch.randn(5), backend=backend)
    with pytest.raises(ValueError, match="dtype"):
        linear_gelu(x, w.half(), b, backend=backend)
    with pytest.raises(ValueError, match="dtype"):
        linear_gelu(x.long(), w.long(), b.long(), backend=backend)
    with pytest.raises(ValueError, match="one device"):
        linear_gelu(x, w.to("meta"), b, backend=backend)


# ------------------------------------------------------------------------------------------- GPU only

@needs_bf16()
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("shape", [((8, 197), 768, 3072), ((4, 197), 1024, 4096), ((273,), 7, 33)] if DEVICE == "cuda" else
                         [BEIT_B] + AWKWARD, ids=str)
def test_bf16_two_x_rule(shape, recompute):
    """bf16 against fp64 within 2x PyTorch's own bf16 error: BEiT-B/L batches on a GPU; one image and the awkward
    shapes on the CPU (the interpreter with bf16 emulated, tests/interpreter_bf16.py)."""
    _check_against_reference(*shape, torch.bfloat16, recompute=recompute)


@pytest.mark.skipif(DEVICE == "cuda" or not interpret_mode(), reason="interpreter check of the GPU tile shapes")
@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=needs_bf16())], ids=str)
@pytest.mark.parametrize("config", ["m128_n256_k64_w8_s3", "m128_n128_k64_w8_s4", "m128_n128_k32_w4_s4",
                                    "m64_n128_k64_w4_s4", "m64_n64_k64_w4_s3"])
@pytest.mark.parametrize("recompute", [False, True], ids=["store", "recompute"])
def test_gpu_gemm_configs(monkeypatch, config, dtype, recompute):
    """Every GPU GEMM tile (the autotuner's candidates) on a shape with a partial tile on every edge (M, N and
    the K loop), forward and backward under the 2x rule; with recompute the backward's GEMM (dGELU epilogue,
    bias-gradient partials per 32 rows) runs in the tile too."""
    from beit_fast.kernels import linear_gelu as K
    monkeypatch.setattr(K, "_INTERPRET_CONFIG", K.GPU_GEMM_CONFIGS[config])
    _check_against_reference((273,), 100, 300, dtype, recompute=recompute)


def test_fp32_ieee_gemms_tune_only_the_tiles_that_fit():
    """The tuner's early prune: fp32 without TF32 (FMA units) tries only tiles of at most 128x128 with K steps
    of 64 (the others spill on sm_90); 16-bit and TF32 launches try every config."""
    from beit_fast.kernels import linear_gelu as K
    configs = list(K.GPU_GEMM_CONFIGS.values())
    kept = K.prune_gemm_configs(configs, {}, DOT_PRECISION="ieee")
    assert [c.name for c in kept] == ["m128_n128_k64_w8_s4", "m64_n128_k64_w4_s4", "m64_n64_k64_w4_s3"]
    assert K.prune_gemm_configs(configs, {}, DOT_PRECISION="tf32") == configs
