"""Edge cases of the fused ops' front ends found in review: double backward through the extension ops,
index tensors made under inference mode, batch 0 in attention, fp64 under autocast, an empty last dim.
The Triton cases run their kernels through the interpreter (tests/conftest.py)."""
import importlib
import os

import pytest
import torch

from beit_fast._backend import extension
from beit_fast.ops.rel_pos_attention import (rel_pos_attention, rel_pos_attention_qkvpacked,
                                             rel_pos_attention_ref)
from beit_fast.relpos import _index_cpu, num_relative_distance, relative_position_index

needs_ext = pytest.mark.skipif(extension()[0] is None, reason="beit_fast._C is not built")
needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="runs the Triton kernels on CPU tensors: needs TRITON_INTERPRET=1")
LSRN = importlib.import_module("beit_fast.ops.layer_scale_residual_norm")
MPE = importlib.import_module("beit_fast.ops.masked_patch_embed")
LG = importlib.import_module("beit_fast.ops.linear_gelu")
LN = importlib.import_module("beit_fast.ops.layer_norm")


def _double_backward(fn, inputs):
    out = fn(*inputs)
    outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o is not None]
    firsts = torch.autograd.grad(sum(o.square().sum() for o in outs), inputs, create_graph=True)
    return torch.autograd.grad(sum(g.square().sum() for g in firsts), inputs, allow_unused=True)


@needs_ext
def test_double_backward_through_the_extension_ops_raises():
    """Their backward is an extension op without an autograd formula: PyTorch would only warn and return no
    (or zero) second-order gradients; the ops raise instead, as the Triton ops do. The reference has them."""
    g = lambda *s: torch.randn(*s, dtype=torch.float64, requires_grad=True)  # noqa: E731
    lsrn_inputs = [g(2, 3, 8), g(2, 3, 8), g(8), None, g(8), g(8)]
    leaves = [t for t in lsrn_inputs if t is not None]

    def lsrn(backend):
        def fn(*ts):
            it = iter(ts)
            args = [next(it) if t is not None else None for t in lsrn_inputs]
            return LSRN.layer_scale_residual_norm(*args, backend=backend)
        return fn
    assert all(t is not None for t in _double_backward(lsrn("reference"), leaves)[:2])
    with pytest.raises(RuntimeError, match="layer_scale_residual_norm: double backward"):
        _double_backward(lsrn("cpp"), leaves)

    images, weight, bias, tok, cls = g(2, 3, 8, 8), g(4, 3, 4, 4), g(4), g(1, 1, 4), g(1, 1, 4)
    mask = torch.tensor([[True, False, False, True]] * 2)

    def mpe(backend):
        return lambda im, w, b, t, c: MPE.masked_patch_embed(im, w, b, mask, t, c, backend=backend)
    assert _double_backward(mpe("reference"), [images, weight, bias, tok, cls])[1] is not None
    with pytest.raises(RuntimeError, match="masked_patch_embed: double backward"):
        _double_backward(mpe("cpp"), [images, weight, bias, tok, cls])
    # a plain first-order backward is untouched
    LSRN.layer_scale_residual_norm(*lsrn_inputs, backend="cpp")[1].sum().backward()


@needs_interpreter
@needs_ext
@pytest.mark.parametrize("with_gamma", [True, False])
def test_drop_path_scale_gradient_keeps_fp64(with_gamma):
    """The drop_path_scale gradient (computed outside the kernel) is accumulated in the inputs' precision
    when that is fp64 (it went through fp32: 7 digits against the reference's 16)."""
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    x, y, gamma, scale, w, b = r(3, 5, 16), r(3, 5, 16), r(16) if with_gamma else None, r(3), r(16), r(16)
    grads = {}
    for backend in ("cpp", "reference"):
        outs = LSRN.layer_scale_residual_norm(x, y, gamma, scale, w, b, backend=backend)
        grads[backend] = torch.autograd.grad(outs[0].sum() + outs[1].square().sum(), scale)[0]
    torch.testing.assert_close(grads["cpp"], grads["reference"], rtol=1e-12, atol=1e-12)


def test_index_tensors_made_in_inference_mode():
    """An explicit index made under torch.inference_mode (no version counter) works in the Triton path, and
    the cached window index is never an inference tensor, whoever builds it first."""
    _index_cpu.cache_clear()
    with torch.inference_mode():
        idx = relative_position_index((3, 3))
        q, k, v = (torch.randn(2, 2, 10, 32) for _ in range(3))
        table = torch.randn(num_relative_distance((3, 3)), 2)
        got = rel_pos_attention(q, k, v, table, rel_index=idx, backend="triton")
        torch.testing.assert_close(got, rel_pos_attention_ref(q, k, v, table, rel_index=idx), atol=1e-5, rtol=1e-5)
    assert not _index_cpu(3, 3).is_inference()
    q, k, v = (torch.randn(2, 2, 10, 32, requires_grad=True) for _ in range(3))
    table = torch.randn(num_relative_distance((3, 3)), 2, requires_grad=True)
    rel_pos_attention(q, k, v, table, window_size=(3, 3), backend="triton").sum().backward()
    assert table.grad is not None and torch.isfinite(table.grad).all()


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_interpreter)])
def test_attention_with_batch_zero(backend):
    """B = 0 gives empty outputs and gradients (a zero table gradient), as every other op and the model's
    eager attention do; nothing is launched."""
    R = num_relative_distance((2, 2))
    q, k, v = (torch.randn(0, 2, 5, 16, requires_grad=True) for _ in range(3))
    table = torch.randn(R, 2, requires_grad=True)
    out = rel_pos_attention(q, k, v, table, window_size=(2, 2), backend=backend)
    assert out.shape == (0, 2, 5, 16)
    out.sum().backward()
    assert q.grad.shape == q.shape and torch.equal(table.grad, torch.zeros_like(table))
    qkv = torch.randn(0, 5, 3, 2, 16, requires_grad=True)
    out = rel_pos_attention_qkvpacked(qkv, table, window_size=(2, 2), backend=backend)
    assert out.shape == (0, 5, 32)
    with pytest.raises(ValueError, match="H, N, D >= 1"):
        rel_pos_attention(*(torch.randn(1, 2, 5, 0) for _ in range(3)), table, window_size=(2, 2))


def test_autocast_leaves_fp64_alone():
    """Under autocast, fp64 inputs stay fp64 (autocast casts fp32 / fp16 / bf16 only), as F.linear and conv2d."""
    x, w, b = torch.randn(4, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64), torch.randn(6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert LG.linear_gelu(x, w, b.double()).dtype == torch.float64
        assert LG.linear_gelu(x.float(), w.float(), b).dtype == torch.bfloat16
    images, weight = torch.randn(1, 3, 8, 8, dtype=torch.float64), torch.randn(4, 3, 4, 4, dtype=torch.float64)
    cls = torch.randn(1, 1, 4, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for backend in ("reference",) + (("cpp",) if extension()[0] is not None else ()):
            out = MPE.masked_patch_embed(images, weight, None, None, None, cls, backend=backend)
            assert out.dtype == torch.float64, backend


@needs_interpreter
def test_empty_last_dim_on_the_triton_path():
    """K = 0 (linear_gelu: GELU of the bias, whose gradient still flows) and C = 0 (layer_norm: empty)."""
    x, w = torch.randn(4, 0, requires_grad=True), torch.randn(6, 0, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    y = LG.linear_gelu(x, w, b, backend="triton")
    torch.testing.assert_close(y, LG.linear_gelu_ref(x, w, b))
    y.sum().backward()
    b_ref = b.detach().clone().requires_grad_()
    LG.linear_gelu_ref(x.detach(), w.detach(), b_ref).sum().backward()
    torch.testing.assert_close(b.grad, b_ref.grad)
    assert LN.layer_norm(torch.randn(3, 5, 0), backend="triton").shape == (3, 5, 0)
