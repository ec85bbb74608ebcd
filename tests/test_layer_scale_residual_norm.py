"""beit_fast.ops.layer_scale_residual_norm against its PyTorch reference: outputs and every gradient, on the
C++ CPU kernel (fp32, bf16, fp64 gradcheck) and, when a GPU is present, the CUDA kernel (fp32/fp16/bf16)."""
import importlib

import pytest
import torch

from beit_fast._backend import BackendUnavailable, extension
from beit_fast.ops.layer_scale_residual_norm import (layer_scale_residual_norm, layer_scale_residual_norm_ref,
                                                     not_supported_reasons)
from tolerances import assert_two_x, tolerance, ulp

pytestmark = pytest.mark.skipif(extension()[0] is None, reason="beit_fast._C is not built")
ops = torch.ops.beit_fast
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

SHAPES = [(2, 197, 768), (1, 197, 1024), (1, 1, 7), (2, 273, 7), (3, 65, 40)]
# which optional inputs are present: gamma, drop_path_scale, ln_weight, ln_bias
VARIANTS = {
    "full": (True, True, True, True),
    "no_layer_scale_no_drop_path": (False, False, True, True),
    "drop_path_no_layer_scale": (False, True, True, True),
    "no_norm": (True, True, False, False),
    "norm_without_bias": (True, False, True, False),
}


def make_inputs(shape, dtype, variant, device="cpu", y_dtype=None, param_dtype=None, requires_grad=True):
    B, N, C = shape
    has_gamma, has_scale, has_ln, has_bias = VARIANTS[variant]
    y_dtype = y_dtype or dtype
    param_dtype = param_dtype or dtype

    def leaf(t, dt):
        return t.to(device=device, dtype=dt).requires_grad_(requires_grad)

    x = leaf(torch.randn(B, N, C), dtype)
    y = leaf(torch.randn(B, N, C), y_dtype)
    gamma = leaf(0.5 + torch.rand(C), param_dtype) if has_gamma else None
    scale = None
    if has_scale:  # DropPath with keep_prob 0.8: zeros and 1/0.8; one sample kept (else the branch and its
        keep = torch.rand(B) < 0.8          # gradients would all be zero), and with B > 1 one dropped
        keep[-1] = True
        keep[0] = keep[0] if B == 1 else False
        scale = leaf(keep.float() / 0.8, param_dtype)
    w = leaf(1 + 0.2 * torch.randn(C), param_dtype) if has_ln else None
    b = leaf(0.2 * torch.randn(C), param_dtype) if has_bias else None
    return x, y, gamma, scale, w, b


def forward_backward(fn, inputs, grads, eps=1e-6):
    """Outputs and the gradients of every input that requires grad (None where there is none)."""
    for t in inputs:
        if t is not None and t.requires_grad:
            t.grad = None
    s, n = fn(*inputs, eps)
    outs = [s] + ([n] if n is not None else [])
    torch.autograd.backward(outs, [g.to(o.dtype) for g, o in zip(grads, outs)])
    return [s, n] + [None if t is None or not t.requires_grad else t.grad for t in inputs]


NAMES = ["s", "n", "dx", "dy", "dgamma", "ddrop_path_scale", "dln_weight", "dln_bias"]


def check_every_tensor(ours, ref_lp, ref64, dtype, inputs64):
    """Each output and gradient is present exactly where the reference has one and obeys the 2x rule, with
    the slack scaled by the tensor's magnitude: atol * (1 + max|fp64 value|). The drop-path scale's gradient
    is one sum of N*C products dx * gamma * y per sample, computed from the 16-bit dx and branch: its rounding
    error grows like eps * ||those products||_2, and over B = 1 or 2 values the 2x rule's maximum does not
    average it out (ours failed it once at 1.46x), so its slack adds 4 eps ||products||_2 (ours reached 1.38
    eps, PyTorch's bf16 1.92 eps, in 160 draws). Every slack also adds one ulp (of the tensor's dtype) of its
    largest fp64 value: a 16-bit result is one rounding of a sum, and PyTorch's can land closer by luck (dgamma
    in bf16 reached 0.85 of the bound without it in 327 draws: 0.029 off at |dgamma| 4.47, where an ulp is
    0.031). inputs64: the fp64 inputs."""
    for name, o, r, r64 in zip(NAMES, ours, ref_lp, ref64):
        assert (o is None) == (r64 is None), f"{name}: presence differs (ours {o is None}, reference {r64 is None})"
        if o is None:
            continue
        assert o.shape == r64.shape, f"{name}: shape {tuple(o.shape)} vs {tuple(r64.shape)}"
        top = r64.abs().max().item()
        atol = tolerance("layer_scale_residual_norm", dtype).atol * (1.0 + top) + ulp(top, o.dtype)
        if name == "ddrop_path_scale":
            y, gamma = inputs64[1], inputs64[2]
            products = ref64[2] * (y if gamma is None else gamma * y).detach()
            atol += 4 * torch.finfo(o.dtype).eps * products.flatten(1).norm(dim=1).max().item()
        assert_two_x(name, o, r, r64, atol)


def compare_to_reference(shape, dtype, variant, backend, device="cpu", y_dtype=None, eps=1e-6, flat_rows=False):
    """flat_rows: some rows of x + scale * gamma * y constant (y zero there): variance 0, rstd 1/sqrt(eps)."""
    inputs = make_inputs(shape, dtype, variant, device, y_dtype=y_dtype)
    if flat_rows:
        with torch.no_grad():
            inputs[0][:, ::3] = 0.5
            inputs[1][:, ::3] = 0
    inputs64 = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    grads = [torch.randn(shape, device=device) for _ in range(2)]
    fused = lambda *a: layer_scale_residual_norm(*a, backend=backend)  # noqa: E731
    ours = forward_backward(fused, inputs, grads, eps)
    ref_lp = forward_backward(layer_scale_residual_norm_ref, inputs, grads, eps)
    ref64 = forward_backward(layer_scale_residual_norm_ref, inputs64, [g.double() for g in grads], eps)
    assert ours[0].dtype == inputs[0].dtype
    check_every_tensor(ours, ref_lp, ref64, dtype, inputs64)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cpp_matches_reference(shape, dtype, variant):
    compare_to_reference(shape, dtype, variant, "cpp")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("eps", [1e-2, 1e-6])
def test_cpp_eps_counts(dtype, eps):
    """eps where it matters: constant rows (variance 0) and, with 1e-2, every row (unit variance: the
    default 1e-6 on such rows would pass with eps left out)."""
    compare_to_reference((2, 9, 40), dtype, "full", "cpp", eps=eps, flat_rows=True)


@pytest.mark.parametrize("y_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cpp_amp_residual_stream(y_dtype):
    """x (residual stream) fp32, y (branch output under autocast) 16-bit: outputs fp32, dy in y's dtype."""
    compare_to_reference((2, 197, 768), torch.float32, "full", "cpp", y_dtype=y_dtype)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cpp_gradcheck(variant):
    x, y, gamma, scale, w, b = make_inputs((2, 3, 7), torch.float64, variant)
    params = [t for t in (x, y, gamma, w, b) if t is not None]

    def fn(*ps):
        it = iter(ps)
        args = [next(it) if t is not None else None for t in (x, y, gamma)] + [scale]
        args += [next(it) if t is not None else None for t in (w, b)]
        s, n = layer_scale_residual_norm(*args, eps=1e-6, backend="cpp")
        return (s,) if n is None else (s, n)

    assert torch.autograd.gradcheck(fn, params)


def test_cpp_gradcheck_drop_path_scale_grad():
    x, y, gamma, scale, w, b = make_inputs((2, 3, 7), torch.float64, "full")
    scale = scale.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda *a: layer_scale_residual_norm(*a, eps=1e-6, backend="cpp"), (x, y, gamma, scale, w, b))


@pytest.mark.parametrize("y_grad", [True, False], ids=["y_grad", "y_frozen"])
def test_drop_path_scale_gradient_with_x_frozen(y_grad):
    """drop_path_scale's gradient is computed from the residual gradient dx, which the backward must compute
    even when x itself does not require grad (a frozen residual stream, e.g. the first block's input with a
    frozen embedding). fp64, against the reference's autograd; x gets no gradient."""
    x, y, gamma, scale, w, b = make_inputs((2, 3, 8), torch.float64, "full")
    scale = torch.rand(2, dtype=torch.float64).requires_grad_()   # no zero entry: every sample has a gradient
    x = x.detach()
    y = y.detach().requires_grad_(y_grad)
    gs, gn = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 3, 8, dtype=torch.float64)
    wanted = [t for t in (y, gamma, scale, w, b) if t.requires_grad]
    results = []
    for fn in (lambda *a: layer_scale_residual_norm(*a, backend="cpp"), layer_scale_residual_norm_ref):
        s, n = fn(x, y, gamma, scale, w, b, 1e-6)
        results.append(torch.autograd.grad([s, n], wanted, [gs, gn]))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", ["cpp", "reference", "auto"])
def test_drop_path_scale_of_the_wrong_shape_is_refused(backend):
    """drop_path_scale must be (B,): a (1,) or (B, 1) scale is refused by every backend (the reference would
    broadcast it over the batch, the C++ kernel refuses it: they must agree)."""
    x, y, gamma, _, w, _ = make_inputs((3, 4, 8), torch.float32, "full", requires_grad=False)
    for bad in (torch.tensor([2.0]), torch.ones(3, 1), torch.ones(4)):
        with pytest.raises(ValueError, match=r"drop_path_scale must have shape \(B,\) = \(3,\)"):
            layer_scale_residual_norm(x, y, gamma, bad, w, None, backend=backend)


def test_opcheck_float64():
    """float64 inputs (the C++ CPU kernel's extra dtype): the op returns float64 mean and rstd, and its fake
    function must say so (opcheck compares them)."""
    x, y, gamma, scale, w, b = make_inputs((2, 5, 24), torch.float64, "full")
    s, n, mean, rstd = ops.layer_scale_residual_norm(x, y, gamma, scale, w, b, 1e-6)
    assert {t.dtype for t in (s, n, mean, rstd)} == {torch.float64}
    torch.library.opcheck(ops.layer_scale_residual_norm, (x, y, gamma, scale, w, b, 1e-6))

@pytest.mark.parametrize("which", ["sum", "norm"])
def test_gradient_of_one_output_only(which):
    """The unused output's gradient arrives as None (not materialized); the result must not change."""
    x, y, gamma, scale, w, b = make_inputs((2, 5, 16), torch.float64, "full")
    params = (x, y, gamma, w, b)

    def grads(fn):
        s, n = fn(x, y, gamma, scale, w, b)
        out = torch.autograd.grad((s if which == "sum" else n).pow(2).sum(), params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(out, params)]

    for got, want in zip(grads(lambda *a: layer_scale_residual_norm(*a, backend="cpp")),
                         grads(layer_scale_residual_norm_ref)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("variant", ["full", "no_norm", "no_layer_scale_no_drop_path"])
def test_opcheck(variant):
    x, y, gamma, scale, w, b = make_inputs((2, 5, 24), torch.float32, variant)
    torch.library.opcheck(ops.layer_scale_residual_norm, (x, y, gamma, scale, w, b, 1e-6))


def test_opcheck_backward():
    x, y, gamma, scale, w, b = make_inputs((2, 5, 24), torch.float32, "full", requires_grad=False)
    s, n, mean, rstd = ops.layer_scale_residual_norm(x, y, gamma, scale, w, b, 1e-6)
    gs, gn = torch.randn_like(s), torch.randn_like(s)
    torch.library.opcheck(ops.layer_scale_residual_norm_backward,
                          (gs, gn, s, y, y.dtype, gamma, scale, w, b, mean, rstd, [True] * 5))
    torch.library.opcheck(ops.layer_scale_residual_norm_backward,
                          (gs, None, s, None, y.dtype, gamma, scale, w, b, mean, rstd, [True, True, False, True, False]))
    # a gradient for a LayerNorm output that was never made (no ln_weight) is refused, not read through null
    with pytest.raises(ValueError, match="grad_norm given without ln_weight"):
        ops.layer_scale_residual_norm_backward(gs, gn, s, None, y.dtype, gamma, scale, None, None, mean, rstd,
                                               [True, True, False, False, False])


@pytest.mark.parametrize("public", [False, True], ids=["op_fullgraph", "public_function"])
def test_torch_compile(public):
    """The registered op (fake + autograd) traces into one graph; the public function also runs compiled
    (the backend chooser may graph-break: it imports beit_fast._C)."""
    x, y, gamma, scale, w, b = make_inputs((2, 5, 24), torch.float32, "full")

    def f(x, y, gamma, scale, w, b):
        if public:
            s, n = layer_scale_residual_norm(x, y, gamma, scale, w, b, backend="cpp")
        else:
            s, n, _, _ = ops.layer_scale_residual_norm(x, y, gamma, scale, w, b, 1e-6)
        return (s * n).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=not public)
    g_c = torch.autograd.grad(compiled(x, y, gamma, scale, w, b), (x, y, gamma, w, b))
    g_e = torch.autograd.grad(f(x, y, gamma, scale, w, b), (x, y, gamma, w, b))
    for a, e in zip(g_c, g_e):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_parameter_gradients_deterministic(dtype):
    inputs = make_inputs((4, 197, 768), dtype, "full")
    grads = [torch.randn(4, 197, 768) for _ in range(2)]
    fused = lambda *a: layer_scale_residual_norm(*a, backend="cpp")  # noqa: E731
    first = forward_backward(fused, inputs, grads)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # a different split of the rows among threads
        second = forward_backward(fused, inputs, grads)
    finally:
        torch.set_num_threads(threads)
    third = forward_backward(fused, inputs, grads)
    for name, a, b, c in zip(NAMES, first, second, third):
        if a is not None:
            assert torch.equal(a, b) and torch.equal(a, c), f"{name} differs between runs"


def test_no_norm_returns_none():
    x, y, gamma, scale, _, _ = make_inputs((2, 4, 8), torch.float32, "no_norm")
    s, n = layer_scale_residual_norm(x, y, gamma, scale, backend="cpp")
    assert n is None and s.shape == x.shape


@pytest.mark.parametrize("bad, match", [
    (lambda x, y, g, w: (x[0], y[0], g, w), r"x must have shape \(B, N, C\)"),
    (lambda x, y, g, w: (x, y[:, :3], g, w), r"y must have x's shape"),
    (lambda x, y, g, w: (x, y, g[:5], w), r"gamma must have shape \(C,\) = \(8,\)"),
    (lambda x, y, g, w: (x, y, g, w[None]), r"ln_weight must have shape \(C,\)"),
    (lambda x, y, g, w: (x, y[:1], g, w), r"y must have x's shape \(2, 4, 8\), got \(1, 4, 8\)"),
    (lambda x, y, g, w: (x, y, g.view(1, 1, 8), w), r"gamma must have shape \(C,\) = \(8,\), got \(1, 1, 8\)"),
    (lambda x, y, g, w: (x, y, g.to("meta"), w), r"gamma is on meta but x is on cpu"),
    (lambda x, y, g, w: (x.long(), y, g, w), r"x must be floating point"),
])
@pytest.mark.parametrize("backend", ["cpp", "reference", "auto"])
def test_bad_shapes_raise_clear_errors(bad, match, backend):
    """Checked in Python before a backend is chosen, so the reference refuses what the C++ op refuses."""
    x, y, gamma, _, w, _ = make_inputs((2, 4, 8), torch.float32, "full", requires_grad=False)
    x, y, gamma, w = bad(x, y, gamma, w)
    with pytest.raises(ValueError, match=match):
        layer_scale_residual_norm(x, y, gamma, None, w, None, backend=backend)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_bias_without_weight_and_negative_eps_are_refused(backend):
    x, y, gamma, _, w, _ = make_inputs((2, 4, 8), torch.float32, "full", requires_grad=False)
    with pytest.raises(ValueError, match="ln_bias was given without ln_weight"):
        layer_scale_residual_norm(x, y, gamma, None, None, w, backend=backend)
    with pytest.raises(ValueError, match="eps must be >= 0, got -1"):
        layer_scale_residual_norm(x, y, gamma, None, w, None, -1.0, backend=backend)


def test_bad_dtype_and_device_raise_clear_errors():
    x, y, gamma, _, w, _ = make_inputs((2, 4, 8), torch.float32, "full", requires_grad=False)
    with pytest.raises(BackendUnavailable, match="needs equal dtypes"):
        layer_scale_residual_norm(x, y.double(), gamma, None, w, None, backend="cpp")
    with pytest.raises(ValueError, match="y must have x's dtype"):
        ops.layer_scale_residual_norm(x, y.double(), gamma, None, w, None, 1e-6)
    with pytest.raises(ValueError, match="drop_path_scale must have shape"):
        ops.layer_scale_residual_norm(x, y, gamma, torch.ones(3), w, None, 1e-6)
    with pytest.raises(ValueError, match="ln_bias was given without ln_weight"):
        ops.layer_scale_residual_norm(x, y, gamma, None, None, w, 1e-6)


def test_auto_backend_on_cpu_is_cpp():
    x, y, gamma, scale, w, b = make_inputs((1, 3, 8), torch.float32, "full", requires_grad=False)
    assert not_supported_reasons("cpp", x, y, gamma, scale, w, b) == []
    assert not_supported_reasons("cuda", x, y, gamma, scale, w, b)  # CPU tensors
    s, n = layer_scale_residual_norm(x.requires_grad_(), y, gamma, scale, w, b)
    assert type(s.grad_fn).__name__ == "LayerScaleResidualNormBackward"   # the extension's op ran
    s_ref, n_ref = layer_scale_residual_norm_ref(x, y, gamma, scale, w, b)
    torch.testing.assert_close(s, s_ref)
    torch.testing.assert_close(n, n_ref)


def test_long_rows_get_aligned_data_for_the_cuda_kernel(monkeypatch):
    """Rows over 8192 elements run only on the 16-byte vector path: the op hands the kernel a misaligned view
    as an aligned copy (not a reason to fall back), an aligned one as it is; under torch.compile's tracing or
    for a tensor subclass (no address to read: data_ptr raises or lies there) always a copy."""
    lsrn = importlib.import_module("beit_fast.ops.layer_scale_residual_norm")
    C = 16384
    base = torch.zeros(2 * C + 8, dtype=torch.bfloat16)
    aligned, shifted = base[:2 * C].view(1, 2, C), base[1:2 * C + 1].view(1, 2, C)
    gamma, w = torch.ones(C), torch.ones(C)
    assert shifted.data_ptr() % 16 != 0
    why = " ".join(not_supported_reasons("cuda", shifted, aligned, gamma, None, w, None))
    assert "aligned" not in why and "row limit" not in why
    assert lsrn._aligned_or_copy(aligned) is aligned
    fixed = lsrn._aligned_or_copy(shifted)
    assert fixed.data_ptr() % 16 == 0 and fixed.is_contiguous() and torch.equal(fixed, shifted)
    assert lsrn._aligned_or_copy(None) is None
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(aligned)
        assert lsrn._aligned_or_copy(fake) is not fake
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert lsrn._aligned_or_copy(aligned) is not aligned
    why = " ".join(not_supported_reasons("cuda", torch.zeros(1, 2, C + 1, dtype=torch.bfloat16), aligned[..., :C + 1],
                                          torch.ones(C + 1), None, torch.ones(C + 1), None))
    assert "row limit" in why   # C not a multiple of the vector width: no vector path


# ------------------------------------------------------------------------------------------------- GPU only
@needs_cuda
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(8, 197, 4096), (2, 33, 6000)], ids=str)
def test_cuda_matches_reference(shape, dtype, variant):
    compare_to_reference(shape, dtype, variant, "cuda", device="cuda")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("eps", [1e-2, 1e-6])
@pytest.mark.parametrize("C", [40, 768], ids=str)   # the scalar and the vectorized / warp-per-row plans
def test_cuda_eps_counts(dtype, eps, C):
    compare_to_reference((2, 9, C), dtype, "full", "cuda", device="cuda", eps=eps, flat_rows=True)


@needs_cuda
@pytest.mark.parametrize("y_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_amp_residual_stream(y_dtype):
    compare_to_reference((4, 197, 768), torch.float32, "full", "cuda", device="cuda", y_dtype=y_dtype)


@needs_cuda
def test_cuda_misaligned_inputs_use_the_scalar_path():
    """Contiguous tensors that start 2 bytes past a 16-byte boundary: C = 768 but no vector loads."""
    B, N, C = 2, 197, 768

    def misaligned():
        return torch.randn(B * N * C + 1, device="cuda", dtype=torch.bfloat16)[1:].view(B, N, C).requires_grad_()

    x, y = misaligned(), misaligned()
    _, _, gamma, scale, w, b = make_inputs((B, N, C), torch.bfloat16, "full", device="cuda")
    inputs = (x, y, gamma, scale, w, b)
    grads = [torch.randn(B, N, C, device="cuda") for _ in range(2)]
    ours = forward_backward(lambda *a: layer_scale_residual_norm(*a, backend="cuda"), inputs, grads)
    ref_lp = forward_backward(layer_scale_residual_norm_ref, inputs, grads)
    inputs64 = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    ref64 = forward_backward(layer_scale_residual_norm_ref, inputs64, [g.double() for g in grads])
    check_every_tensor(ours, ref_lp, ref64, torch.bfloat16, inputs64)


@needs_cuda
def test_cuda_long_misaligned_and_aligned_rows_run():
    """Rows over 8192 elements (vector path only): a misaligned x runs through an aligned copy, forward and
    backward (gradients misaligned too)."""
    B, N, C = 1, 3, 12288
    shifted = torch.randn(B * N * C + 1, device="cuda", dtype=torch.bfloat16)[1:].view(B, N, C)
    y = torch.randn(B, N, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gamma, w, b = (torch.randn(C, device="cuda", requires_grad=True) for _ in range(3))
    for x in (shifted, shifted.clone()):
        assert not_supported_reasons("cuda", x, y, gamma, None, w, b) == []
        x = x.detach().requires_grad_()
        inputs = (x, y, gamma, None, w, b)
        grads = [torch.randn(B * N * C + 1, device="cuda", dtype=torch.bfloat16)[1:].view(B, N, C)
                 for _ in range(2)]   # misaligned gradients too
        ours = forward_backward(lambda *a: layer_scale_residual_norm(*a, backend="cuda"), inputs, grads)
        ref_lp = forward_backward(layer_scale_residual_norm_ref, inputs, grads)
        inputs64 = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in inputs]
        ref64 = forward_backward(layer_scale_residual_norm_ref, inputs64, [g.double() for g in grads])
        check_every_tensor(ours, ref_lp, ref64, torch.bfloat16, inputs64)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_parameter_gradients_deterministic(dtype):
    inputs = make_inputs((16, 197, 768), dtype, "full", device="cuda")
    grads = [torch.randn(16, 197, 768, device="cuda") for _ in range(2)]
    fused = lambda *a: layer_scale_residual_norm(*a, backend="cuda")  # noqa: E731
    first = forward_backward(fused, inputs, grads)
    second = forward_backward(fused, inputs, grads)
    for name, a, b in zip(NAMES, first, second):
        if a is not None:
            assert torch.equal(a, b), f"{name} differs between runs"


@needs_cuda
def test_cuda_opcheck():
    x, y, gamma, scale, w, b = make_inputs((2, 5, 64), torch.bfloat16, "full", device="cuda")
    torch.library.opcheck(ops.layer_scale_residual_norm, (x, y, gamma, scale, w, b, 1e-6))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cpp_statistics_are_those_of_the_stored_sum(dtype):
    """The LayerNorm statistics are those of s as stored (rounded to x's dtype), summed in fp32, as the unfused
    reference computes them: mean and rstd agree with fp64 statistics of the returned s to fp32 accuracy. The
    2x rule on n does not see statistics of the unrounded sum (2.7e-4 off in bf16), nor a sum accumulated in
    x's dtype; the emulator's comparison with the CUDA kernels does, but it is skipped where a GPU is present."""
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(2, 197, 768, generator=g).to(dtype) for _ in range(2))
    gamma = (0.5 + torch.rand(768, generator=g)).to(dtype)
    w, b = torch.ones(768, dtype=dtype), torch.zeros(768, dtype=dtype)
    s, n, mean, rstd = ops.layer_scale_residual_norm(x, y, gamma, None, w, b, 1e-6)
    s64 = s.double()
    torch.testing.assert_close(mean.double(), s64.mean(-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(rstd.double(), (s64.var(-1, unbiased=False) + 1e-6).rsqrt(), rtol=5e-6, atol=0)


@pytest.mark.parametrize("change, match", [
    (dict(sum=lambda t: t[0]), r"sum must have shape \(B, N, C\) with C > 0"),
    (dict(grad_sum=lambda t: t[:, :4]), r"grad_sum must match the forward output"),
    (dict(grad_norm=lambda t: t.double()), r"grad_norm must match the forward output"),
    (dict(y=lambda t: None), r"the gamma gradient needs y"),
    (dict(y=lambda t: t[:, :4]), r"y must have shape"),
    (dict(gamma=lambda t: None), r"the gamma gradient was requested without gamma"),
    (dict(ln_bias=lambda t: None), r"the ln_bias gradient was requested without ln_bias"),
    (dict(mean=lambda t: None), r"mean and rstd are needed when ln_weight is given"),
    (dict(mean=lambda t: t.double()), r"mean and rstd must have shape \(B, N\) = \[2, 5\] and dtype Float"),
    (dict(rstd=lambda t: t[:, :4]), r"mean and rstd must have shape \(B, N\)"),
])
def test_the_backward_op_itself_refuses_bad_inputs(change, match):
    """torch.ops.beit_fast.layer_scale_residual_norm_backward called directly refuses inputs its kernels would
    read out of bounds or through null (the autograd formula never passes them; a user calling the op may)."""
    x, y, gamma, scale, w, b = make_inputs((2, 5, 24), torch.float32, "full", requires_grad=False)
    s, n, mean, rstd = ops.layer_scale_residual_norm(x, y, gamma, scale, w, b, 1e-6)
    args = dict(grad_sum=torch.randn_like(s), grad_norm=torch.randn_like(s), sum=s, y=y, y_dtype=y.dtype,
                gamma=gamma, scale=scale, ln_weight=w, ln_bias=b, mean=mean, rstd=rstd)
    for k, f in change.items():
        args[k] = f(args[k])
    with pytest.raises(ValueError, match=match):
        ops.layer_scale_residual_norm_backward(*args.values(), [True] * 5)
