"""The eager fast path of the fused ops (beit_fast/ops/_eager.py): in plain eager mode each op runs through a
torch.autograd.Function over the same implementation and backward as its torch.library registration; it must
give the registered op's results bit for bit, and everything that must see the op itself (dispatch modes,
torch.func transforms, tracing) must get the registered op."""
import importlib
import os

if "TRITON_INTERPRET" not in os.environ:   # conftest decides; this keeps the file runnable on its own
    import shutil
    if shutil.which("nvidia-smi") is None:
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from beit_fast._backend import extension, interpret_mode  # noqa: E402
from beit_fast.ops import _eager  # noqa: E402
from test_op_autograd import CASES, CUDA, DEVICE, _OpLog  # noqa: E402

# the Function's backward node, as autograd names it: "<class name>Backward"
FAST_NODES = {"linear_gelu": "LinearGeluTriton", "layer_norm": "LayerNormTriton",
              "rel_pos_attention": "RelPosAttentionTriton",
              "rel_pos_attention_qkvpacked": "RelPosAttentionQKVPackedTriton",
              "layer_scale_residual_norm": "LayerScaleResidualNorm", "masked_patch_embed": "MaskedPatchEmbed"}


def _masked_patch_embed():
    from beit_fast.ops.masked_patch_embed import masked_patch_embed
    img, w, b, tok, cls = (torch.randn(*s, device=DEVICE, requires_grad=True)
                           for s in ((2, 3, 8, 8), (6, 3, 4, 4), (6,), (1, 1, 6), (1, 1, 6)))
    mask = torch.rand(2, 4, device=DEVICE) < 0.5
    return masked_patch_embed(img, w, b, mask, tok, cls), (img, w, b, tok, cls)


ALL = {**{name: make for name, (make, _) in CASES.items()}, "masked_patch_embed": _masked_patch_embed}


def _skip_unless_runnable(name):
    if name in ("layer_scale_residual_norm", "masked_patch_embed"):
        if extension()[0] is None:
            pytest.skip("beit_fast._C is not importable")
    elif not (CUDA or interpret_mode()):
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")


def _node_names(t):
    """Class names of the autograd nodes from t's grad_fn down to the inputs."""
    names, todo = [], [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None:
            names.append(type(node).__name__)
            todo.extend(n for n, _ in node.next_functions)
    return names


def _run(name, seed):
    torch.manual_seed(seed)
    out, leaves = ALL[name]()
    grad = torch.randn_like(out)
    torch.autograd.backward(out, grad)
    return out.detach(), [t.grad for t in leaves], _node_names(out)


@pytest.mark.parametrize("name", list(ALL))
def test_fast_path_equals_registered_op(name, monkeypatch):
    """Same inputs (fresh random, one seed for both runs): outputs and every gradient bitwise equal; the fast
    path is the one taken by default, the registered op's when it is switched off."""
    _skip_unless_runnable(name)
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    out_fast, grads_fast, nodes_fast = _run(name, seed)
    monkeypatch.setattr(_eager, "eager", lambda *args: False)
    out_reg, grads_reg, nodes_reg = _run(name, seed)
    assert f"{FAST_NODES[name]}Backward" in nodes_fast and f"{FAST_NODES[name]}Backward" not in nodes_reg, \
        (nodes_fast, nodes_reg)
    assert torch.equal(out_fast, out_reg)
    for i, (a, b) in enumerate(zip(grads_fast, grads_reg)):
        assert a is not None and b is not None and torch.equal(a, b), f"{name}: gradient of input {i} differs"


@pytest.mark.parametrize("name", ["layer_norm", "layer_scale_residual_norm"])
def test_dispatch_mode_sees_the_registered_op(name):
    """A TorchDispatchMode (make_fx, FlopCounterMode, op logs) sees beit_fast's op in the forward, not its
    insides: under a mode the registered op runs."""
    _skip_unless_runnable(name)
    op = {"layer_norm": "beit_fast.layer_norm_triton.default",
          "layer_scale_residual_norm": "beit_fast.layer_scale_residual_norm.default"}[name]
    with _OpLog() as log:
        ALL[name]()
    assert op in log.names, log.names


def test_vmap_over_a_fused_op(monkeypatch):
    """torch.func.vmap runs the registered op (through PyTorch's per-sample fallback); an autograd.Function
    without a vmap rule would raise. The fast path's Function is replaced by one that fails: a plain call
    reaches it, the vmapped call does not."""
    _skip_unless_runnable("layer_norm")
    ln = importlib.import_module("beit_fast.ops.layer_norm")

    class Refuse:
        @staticmethod
        def apply(*args):
            raise AssertionError("the fast path ran")

    monkeypatch.setattr(ln, "_LayerNormFn", Refuse)
    x, w, b = torch.randn(3, 2, 16, device=DEVICE), torch.randn(16, device=DEVICE), torch.randn(16, device=DEVICE)
    with pytest.raises(AssertionError, match="the fast path ran"):
        ln.layer_norm(x, w, b, backend="triton")
    out = torch.func.vmap(lambda t: ln.layer_norm(t, w, b, backend="triton"))(x)
    assert torch.allclose(out, ln.layer_norm_ref(x, w, b), atol=1e-5, rtol=1e-5)


def test_jit_trace_records_the_extension_op():
    """torch.jit.trace records beit_fast's op (an autograd.Function would be an unexportable Python op)."""
    if extension()[0] is None:
        pytest.skip("beit_fast._C is not importable")
    mpe = importlib.import_module("beit_fast.ops.masked_patch_embed")
    img, w, b, cls = torch.randn(2, 3, 8, 8), torch.randn(6, 3, 4, 4), torch.randn(6), torch.randn(1, 1, 6)
    traced = torch.jit.trace(lambda i: mpe.masked_patch_embed(i, w, b, None, None, cls, backend="cpp"), (img,))
    assert "beit_fast::masked_patch_embed" in str(traced.graph)
    assert torch.equal(traced(img), mpe.masked_patch_embed(img, w, b, None, None, cls, backend="cpp"))


@pytest.mark.parametrize("name", ["layer_norm", "linear_gelu", "rel_pos_attention", "rel_pos_attention_qkvpacked"])
def test_double_backward_through_a_triton_op_raises(name):
    """create_graph=True through a Triton op: its backward runs as the registered backward op (which has no
    autograd formula), so the first-order gradients are connected to it and differentiating them again
    raises PyTorch's "no autograd formula" error, instead of the fast path's kernels returning gradients
    silently cut from the graph (wrong, zero or missing second-order gradients)."""
    _skip_unless_runnable(name)
    make, backward_op = CASES[name]
    out, leaves = make()
    grads = torch.autograd.grad(out, leaves, torch.randn_like(out), create_graph=True)
    assert all(g.requires_grad for g in grads), [g.requires_grad for g in grads]
    with pytest.raises(RuntimeError, match=f"beit_fast.{backward_op}.default but no autograd formula"):
        torch.autograd.grad(sum(g.square().sum() for g in grads), leaves, allow_unused=True)


def test_eager_refuses_everything_but_plain_eager_execution():
    """_eager.eager: True for plain tensors and Parameters; False for a tensor subclass (FakeTensor,
    FunctionalTensor, a user's wrapper), under a forward-AD dual level, a dispatch mode, a functorch transform
    or torch.jit tracing: each of them must see the registered op."""
    from torch.utils._python_dispatch import TorchDispatchMode
    x, p = torch.randn(3), torch.nn.Parameter(torch.randn(3))
    assert _eager.eager(x, p, 1.0, None)

    class Sub(torch.Tensor):
        pass
    assert not _eager.eager(x, x.as_subclass(Sub))
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
    assert not _eager.eager(fake)
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        assert not _eager.eager(x)
    assert _eager.eager(x)

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))
    with Mode():
        assert not _eager.eager(x)
    seen = []
    torch.vmap(lambda t: seen.append(_eager.eager(t)) or t)(torch.randn(2, 3))
    assert seen == [False]
