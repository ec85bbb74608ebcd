"""The Triton launchers run on their tensors' GPU, not on torch's current one (Triton launches on the current
device): a CPU check of the guard's logic with torch.cuda's device calls stood in, and on a machine with two
GPUs every fused op on cuda:1 while cuda:0 is current, against the reference on cuda:1."""
import contextlib

import pytest
import torch

from beit_fast import ops

pytest.importorskip("triton")
from beit_fast.kernels._device import on_device_of_first_arg  # noqa: E402


class _Arg:
    def __init__(self, device):
        self.device = torch.device(device)


@pytest.mark.parametrize("device,current,switches", [("cuda:1", 0, True), ("cuda:0", 0, False),
                                                     ("cuda:2", 2, False), ("cpu", 0, False)])
def test_guard_makes_the_argument_device_current(monkeypatch, device, current, switches):
    entered = []

    @contextlib.contextmanager
    def fake_device(dev):
        entered.append(torch.device(dev))
        yield

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "device", fake_device)
    seen = []

    @on_device_of_first_arg
    def launcher(t, a, *, b):
        seen.append((list(entered), a, b))   # what was current while the launcher ran
        return "result"

    assert launcher(_Arg(device), 1, b=2) == "result"
    assert seen == [([torch.device(device)] if switches else [], 1, 2)]
    assert launcher.__name__ == "launcher"


needs_two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                    reason="needs two CUDA devices")


def _grads(fn, inputs):
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*inputs)
    out = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward([o for o in out], [torch.ones_like(o) for o in out])
    return [o.detach() for o in out] + [t.grad for t in inputs if t.grad is not None]


OPS = ["layer_norm", "linear_gelu", "rel_pos_attention", "masked_patch_embed", "layer_scale_residual_norm"]


def _case(op, dev):
    """(fn(*inputs, backend=...), inputs, the fused backend) for `op` with small inputs on `dev`."""
    g = torch.Generator(device="cpu").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(dev)  # noqa: E731
    fn = getattr(ops, op)
    if op == "layer_norm":
        return fn, [r(2, 197, 64), r(64), r(64)], "triton"
    if op == "linear_gelu":
        return fn, [r(2, 197, 64), r(96, 64), r(96)], "triton"
    if op == "rel_pos_attention":
        wh = ww = 14
        R = (2 * wh - 1) * (2 * ww - 1) + 3
        attn = lambda q, k, v, t, backend: fn(q, k, v, t, window_size=(wh, ww), backend=backend)  # noqa: E731
        return attn, [r(2, 3, 197, 32), r(2, 3, 197, 32), r(2, 3, 197, 32), r(R, 3)], "triton"
    if op == "masked_patch_embed":
        mask = torch.rand(2, 16, generator=g).lt(0.4).to(dev)
        return fn, [r(2, 3, 64, 64), r(32, 3, 16, 16), r(32), mask, r(1, 1, 32), r(1, 1, 32), r(1, 17, 32)], "cuda"
    drop_path_scale = torch.tensor([1.0, 2.0], device=dev)
    return fn, [r(2, 197, 64), r(2, 197, 64), r(64), drop_path_scale, r(64), r(64)], "cuda"


def _compare(fn, inputs, backend):
    got = _grads(lambda *a: fn(*a, backend=backend), inputs)
    want = _grads(lambda *a: fn(*a, backend="reference"), inputs)
    assert len(got) == len(want) > len(inputs) // 2
    for a, b in zip(got, want):
        assert a.device == inputs[0].device
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


@needs_two_gpus
@pytest.mark.parametrize("op", OPS)
def test_ops_run_on_the_tensors_gpu_when_another_is_current(op):
    fn, inputs, backend = _case(op, torch.device("cuda:1"))
    with torch.cuda.device(0):
        assert torch.cuda.current_device() == 0
        _compare(fn, inputs, backend)
