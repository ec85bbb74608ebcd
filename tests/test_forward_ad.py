"""Forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) through the fused ops: the kernels have no
forward-mode formula, and through their registrations the tangents were dropped without a word (no tangent
under a dual level, a zero one under jvp). auto now takes the reference, whose tangents are right; a backend
asked for by name says why it cannot run."""
import os

if "TRITON_INTERPRET" not in os.environ:   # conftest decides; this keeps the file runnable on its own
    import shutil
    if shutil.which("nvidia-smi") is None:
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.autograd.forward_ad as fwAD  # noqa: E402

from beit_fast._backend import BackendUnavailable, extension  # noqa: E402
from beit_fast.ops.layer_norm import layer_norm  # noqa: E402
from beit_fast.ops.layer_scale_residual_norm import layer_scale_residual_norm  # noqa: E402
from beit_fast.ops.linear_gelu import linear_gelu  # noqa: E402
from beit_fast.ops.masked_patch_embed import masked_patch_embed  # noqa: E402
from beit_fast.ops.rel_pos_attention import num_relative_distance, rel_pos_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _cases():
    """name -> (fn(x, backend), x, the backend auto takes without forward AD here, the fused backends)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE)   # noqa: E731
    w, b, W, y, gamma = r(16), r(16), r(8, 16), r(2, 5, 16), r(16)
    images, pw, pb, tok, cls, pos = r(2, 3, 8, 8), r(16, 3, 4, 4), r(16), r(1, 1, 16), r(1, 1, 16), r(1, 5, 16)
    mask = torch.tensor([[True, False, True, False], [False, False, True, True]], device=DEVICE)
    k, v, table = r(2, 2, 5, 8), r(2, 2, 5, 8), r(num_relative_distance((2, 2)), 2)
    cpp = [] if extension()[0] is None else ["cpp"]
    return {
        "layer_norm": (lambda x, be: layer_norm(x, w, b, backend=be), r(2, 5, 16), ["triton"]),
        "linear_gelu": (lambda x, be: linear_gelu(x, W, None, backend=be), r(2, 5, 16), ["triton"]),
        "rel_pos_attention": (lambda x, be: rel_pos_attention(x, k, v, table, window_size=(2, 2), backend=be),
                              r(2, 2, 5, 8), ["triton"]),
        "layer_scale_residual_norm": (lambda x, be: layer_scale_residual_norm(x, y, gamma, None, w, b,
                                                                              backend=be)[1],
                                      r(2, 5, 16), cpp + ["cuda"]),
        "masked_patch_embed": (lambda x, be: masked_patch_embed(x, pw, pb, mask, tok, cls, pos, backend=be),
                               images, cpp + ["cuda"]),
    }


CASES = _cases()


def _runnable(backend):
    if backend == "triton":
        return DEVICE == "cuda" or INTERPRET
    if backend == "cuda":
        return DEVICE == "cuda" and extension()[0] is not None
    return DEVICE == "cpu"


@pytest.mark.parametrize("name", list(CASES))
def test_jvp_and_dual_tangents_equal_the_references(name, monkeypatch):
    monkeypatch.delenv("BEIT_FAST_BACKEND", raising=False)
    fn, x, fused = CASES[name]
    t = torch.randn_like(x)
    want_out, want = torch.func.jvp(lambda a: fn(a, "reference"), (x,), (t,))
    assert want.abs().max() > 0
    out, got = torch.func.jvp(lambda a: fn(a, "auto"), (x,), (t,))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    with fwAD.dual_level():
        got = fwAD.unpack_dual(fn(fwAD.make_dual(x, t), "auto")).tangent
    assert got is not None
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for backend in fused:
        if not _runnable(backend):
            continue
        with pytest.raises(BackendUnavailable, match="forward-mode AD"):
            torch.func.jvp(lambda a: fn(a, backend), (x,), (t,))
        with fwAD.dual_level(), pytest.raises(BackendUnavailable, match="forward-mode AD"):
            fn(fwAD.make_dual(x, t), backend)
        with fwAD.dual_level():   # a dual level without dual inputs keeps the fused kernel
            torch.testing.assert_close(fn(x, backend), want_out, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(CASES))
def test_vmap_inside_forward_ad_takes_the_reference(name, monkeypatch):
    """A vmap inside forward-mode AD (torch.func.jvp of a vmapped function, or vmap under a dual level): the
    inputs the op sees are batched wrappers, on which unpack_dual has no batching rule. The backend choice
    raised 'Batching rule not implemented for aten::_unpack_dual' from that check; auto now takes the
    reference, whose tangents are right."""
    monkeypatch.delenv("BEIT_FAST_BACKEND", raising=False)
    fn, x, _ = CASES[name]
    xs = torch.stack([x, torch.randn_like(x)])
    ts = torch.randn_like(xs)
    want = torch.func.jvp(torch.vmap(lambda a: fn(a, "reference")), (xs,), (ts,))[1]
    got = torch.func.jvp(torch.vmap(lambda a: fn(a, "auto")), (xs,), (ts,))[1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with fwAD.dual_level():
        got = fwAD.unpack_dual(torch.vmap(lambda a: fn(a, "auto"))(fwAD.make_dual(xs, ts))).tangent
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_forward_over_reverse_takes_the_reference(name, monkeypatch):
    """A Hessian-vector product, torch.func.jvp of torch.func.grad (what torch.func.hessian does): the op's
    inputs are grad wrappers whose tangent unpack_dual does not see, and only the functorch interpreter stack
    says a jvp is active; auto must still take the reference."""
    monkeypatch.delenv("BEIT_FAST_BACKEND", raising=False)
    fn, x, _ = CASES[name]
    t = torch.randn_like(x)

    def hvp(backend):
        return torch.func.jvp(torch.func.grad(lambda a: fn(a, backend).pow(2).sum()), (x,), (t,))[1]
    want = hvp("reference")
    assert want.abs().max() > 0
    torch.testing.assert_close(hvp("auto"), want, rtol=1e-4, atol=1e-4)
