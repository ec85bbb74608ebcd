"""layer_norm: Triton (CUDA, or the interpreter on CPU) against the PyTorch reference, forward and every
gradient, weight/bias None, mixed-precision parameters, determinism, opcheck, torch.compile, input errors."""
import os

# conftest.py sets TRITON_INTERPRET before triton loads; this keeps the file runnable on its own.
if "TRITON_INTERPRET" not in os.environ and not os.path.exists("/dev/nvidia0"):
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from beit_fast._backend import BackendUnavailable, interpret_mode  # noqa: E402
from beit_fast.ops.layer_norm import layer_norm, layer_norm_ref, not_supported_reasons  # noqa: E402
from interpreter_bf16 import needs_bf16, refused_without_emulation  # noqa: E402
from poison import PoisonedTorch  # noqa: E402
from tolerances import assert_close, assert_two_x, tolerance  # noqa: E402

EPS = 1e-6

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(DEVICE == "cpu" and not interpret_mode(),
                                  reason="no GPU and TRITON_INTERPRET is not set")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# (x shape): BEiT-B/L (one image, 197 tokens) and awkward ones.
BEIT = [(197, 768), (197, 1024)]
AWKWARD = [(1, 7), (273, 7), (2, 65, 33), (1, 1, 768), (273, 1024)]


def _inputs(shape, dtype, weight=True, bias=True, param_dtype=None, device=DEVICE):
    C = shape[-1]
    pdt = param_dtype or dtype
    # an offset and scale per row make the mean/variance matter
    x = (torch.randn(*shape, device=device, dtype=torch.float32) * 3 + 1).to(dtype).requires_grad_()
    w = (1 + 0.5 * torch.randn(C, device=device, dtype=pdt)).requires_grad_() if weight else None
    b = (0.5 * torch.randn(C, device=device, dtype=pdt)).requires_grad_() if bias else None
    return x, w, b


def _run(fn, x, w, b, dy):
    y = fn(x, w, b)
    params = [t for t in (x, w, b) if t is not None]
    return [y] + list(torch.autograd.grad(y, params, dy))


def _check_against_reference(shape, dtype, weight=True, bias=True, param_dtype=None, eps=EPS, x=None):
    x_, w, b = _inputs(shape, dtype, weight, bias, param_dtype)
    x = x_ if x is None else x.to(DEVICE, dtype).requires_grad_()
    dy = torch.randn(*shape, device=DEVICE, dtype=dtype)
    ours = _run(lambda *a: layer_norm(*a, eps, backend="triton"), x, w, b, dy)
    names = ["y", "dx"] + (["dw"] if weight else []) + (["db"] if bias else [])
    if dtype == torch.float32:
        ref = _run(lambda *a: layer_norm_ref(*a, eps), x, w, b, dy)
        for name, o, r in zip(names, ours, ref):
            assert o.dtype == r.dtype and o.shape == r.shape, name
            assert_close(name, o, r, tolerance("layer_norm", dtype))
        return
    same_dtype = _run(lambda *a: layer_norm_ref(*a, eps), x, w, b, dy)
    exact = _run(lambda *a: layer_norm_ref(*a, eps),
                 *(t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b)), dy.double())
    for name, o, s, e, inp in zip(names, ours, same_dtype, exact, [x, x, w, b] if weight else [x, x, b]):
        assert o.dtype == (x.dtype if name in ("y", "dx") else inp.dtype) and o.shape == e.shape, name
        assert_two_x(name, o, s, e, tolerance("layer_norm", dtype).atol)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", BEIT + AWKWARD, ids=str)
def test_against_reference(shape, dtype):
    _check_against_reference(shape, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_eps_counts(dtype):
    """eps where it matters: a large eps on rows of variance ~0.01, and constant rows (variance 0: rstd is
    1/sqrt(eps) exactly); with BEiT's 1e-6 on unit-variance rows an eps left out would pass."""
    x = 0.1 * torch.randn(6, 40)
    x[1] = 0.75            # constant rows
    x[4] = -2.0
    _check_against_reference((6, 40), dtype, eps=1e-2, x=x)
    _check_against_reference((6, 40), dtype, eps=1e-6, x=x)


@needs_triton
@pytest.mark.parametrize("weight,bias", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("shape", [(273, 7), (5, 768)], ids=str)
def test_weight_or_bias_none(shape, weight, bias):
    _check_against_reference(shape, torch.float32, weight, bias)


@needs_triton
def test_fp32_parameters_with_fp16_input():
    _check_against_reference((197, 768), torch.float16, param_dtype=torch.float32)


@needs_triton
def test_non_contiguous_input_and_expanded_grad():
    x, _, _ = _inputs((100, 40), torch.float32)
    _, w2, b2 = _inputs((40, 100), torch.float32)
    xt = x.detach().t().requires_grad_()   # (40, 100) column-major
    # sum()'s gradient reaches the op as an expanded (all strides 0) tensor
    ours = torch.autograd.grad(layer_norm(xt, w2, b2, backend="triton").sum(), (xt, w2, b2))
    ref = torch.autograd.grad(layer_norm_ref(xt, w2, b2).sum(), (xt, w2, b2))
    for name, o, r in zip(["dx", "dw", "db"], ours, ref):
        assert_close(name, o, r, tolerance("layer_norm", torch.float32))


@needs_triton
def test_strided_parameters():
    """Weight and bias that are views with a step (the kernel reads parameters with unit stride)."""
    x, _, _ = _inputs((30, 40), torch.float32)
    w = torch.randn(80, device=DEVICE)[::2].requires_grad_()
    b = torch.randn(120, device=DEVICE)[1::3].requires_grad_()
    ours = torch.autograd.grad(layer_norm(x, w, b, backend="triton").square().sum(), (x, w, b))
    ref = torch.autograd.grad(layer_norm_ref(x, w, b).square().sum(), (x, w, b))
    for name, o, r in zip(["dx", "dw", "db"], ours, ref):
        assert_close(name, o, r, tolerance("layer_norm", torch.float32))


def test_int32_offset_limit_is_a_reason():
    from beit_fast.ops.layer_norm import not_supported_reasons
    huge = torch.empty((2**21, 1024), device="meta")
    assert any("int32" in r for r in not_supported_reasons("triton", huge))
    assert not any("int32" in r for r in not_supported_reasons("triton", torch.empty((2**20, 1024), device="meta")))
    gapped = torch.empty((2**20, 4096), device="meta")[:, :1024]   # 2**30 elements spanning ~2**32
    assert any("int32" in r for r in not_supported_reasons("triton", gapped))
    # one row expanded over 2**19 + 1 rows spans 4096 elements, but y and dx are dense: 2**31 + 4096
    expanded = torch.empty((1, 4096), device="meta").expand(2**19 + 1, 4096)
    assert any("int32" in r for r in not_supported_reasons("triton", expanded))


@needs_triton
def test_a_gradient_with_wide_strides_reaches_the_kernel_int32_addressable(monkeypatch):
    """torch.cat's backward hands the op a narrow view of its gradient (strides the forward never checked):
    the launcher passes it through int32_addressable (a copy once they reach 2**31; recorded here)."""
    from beit_fast.kernels import layer_norm as kernels
    seen = []
    monkeypatch.setattr(kernels, "int32_addressable", lambda t: seen.append(t.stride()) or t)
    x, w, b = _inputs((6, 40), torch.float32)
    other = torch.randn(6, 40, device=DEVICE)
    ours = torch.autograd.grad(torch.cat([layer_norm(x, w, b, backend="triton"), other], -1).square().sum(),
                               (x, w, b))
    ref = torch.autograd.grad(torch.cat([layer_norm_ref(x, w, b), other], -1).square().sum(), (x, w, b))
    assert seen == [(80, 1)]
    for name, o, r in zip(["dx", "dw", "db"], ours, ref):
        assert_close(name, o, r, tolerance("layer_norm", torch.float32))


@needs_triton
def test_parameter_grads_bitwise_deterministic():
    x, w, b = _inputs((273, 768), torch.float32)
    dy = torch.randn(273, 768, device=DEVICE)
    runs = [_run(lambda *a: layer_norm(*a, backend="triton"), x, w, b, dy) for _ in range(2)]
    for name, a, c in zip(["y", "dx", "dw", "db"], *runs):
        assert torch.equal(a, c), f"{name} differs between two identical runs"


@needs_triton
@pytest.mark.parametrize("shape", [(273, 7), (37, 100)], ids=str)
def test_every_output_element_written(monkeypatch, shape):
    from beit_fast.kernels import layer_norm as kernels
    monkeypatch.setattr(kernels, "torch", PoisonedTorch())
    _check_against_reference(shape, torch.float32)


def test_gradcheck_float64_dispatch():
    # auto on CPU tensors dispatches to the reference (on CUDA too: fp64 is not a Triton dtype)
    x, w, b = _inputs((3, 6), torch.float64, device="cpu")
    assert torch.autograd.gradcheck(lambda *a: layer_norm(*a), (x, w, b))
    assert torch.autograd.gradcheck(lambda x: layer_norm(x, None, None), (x,))


@needs_triton
def test_opcheck_registered_ops():
    x, w, b = _inputs((9, 7), torch.float32)
    for args in ((x, w, b, EPS), (x, None, None, 1e-5), (x, w, None, EPS), (x, None, b, EPS)):
        torch.library.opcheck(torch.ops.beit_fast.layer_norm_triton.default, args)
    xd, wd = x.detach(), w.detach()
    _, mean, rstd = torch.ops.beit_fast.layer_norm_triton(xd, wd, None, EPS)
    dy = torch.randn(9, 7, device=DEVICE)
    for weight in (wd, None):
        for needs in ((True, True, True), (True, False, False), (False, True, True)):
            torch.library.opcheck(torch.ops.beit_fast.layer_norm_triton_bwd.default,
                                  (dy, xd, weight, mean, rstd, torch.float32, *needs))
    # no rows (an empty batch): dw and db are zeros, two tensors (one shared would break the op's no-alias rule)
    x0 = torch.randn(0, 7, device=DEVICE)
    _, mean0, rstd0 = torch.ops.beit_fast.layer_norm_triton(x0, wd, wd, EPS)
    args0 = (torch.zeros(0, 7, device=DEVICE), x0, wd, mean0, rstd0, torch.float32, True, True, True)
    _, dw0, db0 = torch.ops.beit_fast.layer_norm_triton_bwd(*args0)
    assert dw0.data_ptr() != db0.data_ptr() and not dw0.any() and not db0.any()
    torch.library.opcheck(torch.ops.beit_fast.layer_norm_triton_bwd.default, args0)


@needs_triton
def test_torch_compile_fullgraph():
    x, w, b = _inputs((2, 9, 24), torch.float32)
    dy = torch.randn(2, 9, 24, device=DEVICE)

    def f(x, w, b):
        return layer_norm(x * 2.0, w, b, backend="triton") + 1.0

    compiled = torch.compile(f, fullgraph=True)
    for name, o, r in zip(["y", "dx", "dw", "db"], _run(compiled, x, w, b, dy), _run(f, x, w, b, dy)):
        assert_close(name, o, r, tolerance("layer_norm", torch.float32))


def test_auto_on_cpu_is_reference():
    x, w, b = _inputs((5, 8), torch.float32, device="cpu")
    assert torch.equal(layer_norm(x, w, b), layer_norm_ref(x, w, b))
    assert not_supported_reasons("triton", x, w, b, auto=True)


def test_forced_backend_that_cannot_run_lists_reasons(monkeypatch):
    x, w, b = _inputs((5, 8), torch.float32, device="cpu")
    with pytest.raises(BackendUnavailable, match="not one of this op's backends"):
        layer_norm(x, w, b, backend="cpp")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        layer_norm(x, w, b, backend="triton")


@needs_triton
def test_unsupported_inputs_raise_on_triton():
    x, w, b = _inputs((5, 8), torch.float64)
    with pytest.raises(BackendUnavailable, match="float64"):
        layer_norm(x, w, b, backend="triton")
    with pytest.raises(BackendUnavailable, match="16384"):
        layer_norm(torch.randn(1, 16385, device=DEVICE), backend="triton")
    if DEVICE == "cpu":   # the stock interpreter computes on bf16's raw bits
        x, w, b = _inputs((5, 8), torch.bfloat16)
        with pytest.MonkeyPatch.context() as m:
            refused_without_emulation(m)
            with pytest.raises(BackendUnavailable, match="bf16"):
                layer_norm(x, w, b, backend="triton")


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_bad_inputs_raise_value_error(backend):
    x = torch.randn(4, 8)
    w = torch.randn(8)
    b = torch.randn(8)
    with pytest.raises(ValueError, match=r"weight must have shape \(C,\) = \(8,\)"):
        layer_norm(x, torch.randn(7), b, backend=backend)
    with pytest.raises(ValueError, match=r"bias must have shape \(C,\) = \(8,\)"):
        layer_norm(x, w, torch.randn(8, 1), backend=backend)
    with pytest.raises(ValueError, match="dtype"):
        layer_norm(x, w.double(), b.double(), backend=backend)
    with pytest.raises(ValueError, match="share a dtype"):
        layer_norm(x.half(), w.half(), b, backend=backend)
    with pytest.raises(ValueError, match="floating"):
        layer_norm(x.long(), None, None, backend=backend)
    with pytest.raises(ValueError, match="meta"):
        layer_norm(x, w.to("meta"), b, backend=backend)
    for eps in (-1e-6, float("nan")):   # NaN out of the reference, not an error, otherwise
        with pytest.raises(ValueError, match="eps must be >= 0"):
            layer_norm(x, w, b, eps, backend=backend)


# ------------------------------------------------------------------------------------------- GPU only

@needs_bf16()
@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(64, 197, 768), (32, 197, 1024), (273, 7), (1, 1024)] if DEVICE == "cuda" else
                         BEIT + AWKWARD, ids=str)
def test_bf16_two_x_rule(shape, param_dtype):
    """bf16 against fp64 within 2x PyTorch's own bf16 error: BEiT-B/L batches on a GPU; one image and the awkward
    shapes on the CPU (the interpreter with bf16 emulated, tests/interpreter_bf16.py)."""
    _check_against_reference(shape, torch.bfloat16, param_dtype=param_dtype)
