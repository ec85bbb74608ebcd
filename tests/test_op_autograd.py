"""The fused ops' autograd registrations: an output nobody differentiates costs nothing in the backward.

The Triton ops return internal outputs next to their result (linear_gelu's stored pre-activation, the
attention's log-sum-exp, LayerNorm's mean and rstd). By default torch's autograd engine hands the backward a
zero-filled gradient for each of them, allocated and written every step (for linear_gelu an (M, N) tensor,
as large as the output: ~155 MB per BEiT-B block at batch 128 in bf16). Each op asks for None instead.
"""
import os

if "TRITON_INTERPRET" not in os.environ:   # conftest decides; this keeps the file runnable on its own
    import shutil
    if shutil.which("nvidia-smi") is None:
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from beit_fast._backend import extension, interpret_mode  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

ZERO_FILLS = {"aten.zeros.default", "aten.zeros_like.default", "aten.new_zeros.default", "aten.zero_.default",
              "aten.fill_.Scalar", "aten.full.default", "aten.full_like.default", "aten.new_full.default"}


class _OpLog(TorchDispatchMode):
    """Names of the ops dispatched outside the custom ops (their insides are not seen)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _backward_ops(out, leaves):
    grad = torch.randn_like(out)
    with _OpLog() as log:
        torch.autograd.backward(out, grad)
    assert all(t.grad is not None for t in leaves)
    return log.names


def _linear_gelu():
    from beit_fast.ops.linear_gelu import linear_gelu
    x, w, b = (torch.randn(*s, device=DEVICE, requires_grad=True) for s in ((5, 7, 16), (24, 16), (24,)))
    return linear_gelu(x, w, b, backend="triton", recompute=False), (x, w, b)


def _layer_norm():
    from beit_fast.ops.layer_norm import layer_norm
    x, w, b = (torch.randn(*s, device=DEVICE, requires_grad=True) for s in ((3, 9, 40), (40,), (40,)))
    return layer_norm(x, w, b, 1e-6, backend="triton"), (x, w, b)


def _attention(packed):
    from beit_fast.ops.rel_pos_attention import (num_relative_distance, rel_pos_attention,
                                                 rel_pos_attention_qkvpacked)
    W, B, H, D = (3, 3), 2, 2, 16
    N = W[0] * W[1] + 1
    table = torch.randn(num_relative_distance(W), H, device=DEVICE, requires_grad=True)
    if packed:
        qkv = torch.randn(B, N, 3, H, D, device=DEVICE, requires_grad=True)
        return rel_pos_attention_qkvpacked(qkv, table, window_size=W, backend="triton"), (qkv, table)
    q, k, v = (torch.randn(B, H, N, D, device=DEVICE, requires_grad=True) for _ in range(3))
    return rel_pos_attention(q, k, v, table, window_size=W, backend="triton"), (q, k, v, table)


def _layer_scale_residual_norm():
    from beit_fast.ops.layer_scale_residual_norm import layer_scale_residual_norm
    x, y, g, w, b = (torch.randn(*s, device=DEVICE, requires_grad=True)
                     for s in ((2, 5, 32), (2, 5, 32), (32,), (32,), (32,)))
    s, n = layer_scale_residual_norm(x, y, g, None, w, b, 1e-6)
    return n, (x, y, g, w, b)   # the residual sum s is left unused: its gradient must not be zero-filled


CASES = {
    "linear_gelu": (_linear_gelu, "linear_gelu_triton_bwd"),
    "layer_norm": (_layer_norm, "layer_norm_triton_bwd"),
    "rel_pos_attention": (lambda: _attention(False), "rel_pos_attention_backward"),
    "rel_pos_attention_qkvpacked": (lambda: _attention(True), "rel_pos_attention_qkvpacked_backward"),
    "layer_scale_residual_norm": (_layer_scale_residual_norm, "layer_scale_residual_norm_backward"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_backward_allocates_no_zero_gradients(name):
    make, backward_op = CASES[name]
    if name == "layer_scale_residual_norm":
        if extension()[0] is None:
            pytest.skip("beit_fast._C is not importable")
    elif not (CUDA or interpret_mode()):
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    out, leaves = make()
    names = _backward_ops(out, leaves)
    assert f"beit_fast.{backward_op}.default" in names, names   # the log saw the backward it is about
    filled = [n for n in names if n in ZERO_FILLS]
    assert not filled, f"{name}: the backward filled tensors outside the op: {filled} (all ops: {names})"

